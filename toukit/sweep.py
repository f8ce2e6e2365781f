"""Learning-rate sweeps and the two comparison protocols, built on `toukit.train.run` (the loop stays one loop).

    toukit sweep --preset demo    # the grid on seed 0, each method at its best rate on 3 seeds, the paper's rate

Four stages, each skipping runs whose successful record exists, so an interrupted sweep picks up where it
stopped (a run that was killed continues from its last checkpoint):
1. grid: every method at every learning rate of its grid (the preset's `lr_grid`), on the first seed;
2. tuned: each method at the rate with the best final validation accuracy of stage 1 (ties: the first rate in the
   grid), on every seed; the first seed's run is stage 1's;
3. runner_up: where the second-best rate of stage 1 is within the validation set's noise of the best
   (`toukit.lr_choice.close_runner_up` states the rule), that rate on every seed too, so that each claim can be
   reported both ways (`toukit.lr_choice.claims_both_ways`); nothing for a method whose choice is clear;
4. paper: every method at the preset's shared learning rate (the TOU paper's constant 5e-5), on every seed.
Test accuracy is never read while choosing. Seeds change the head's init, the data order, TOU's noise and the
random factors of DeLoRA and the adapters; the train/validation/test split stays fixed (`split_seed`).

Each run executes `notebooks/train.ipynb` with papermill in a fresh kernel (its executed copy goes to
`<results_dir>/notebooks/<run id>.ipynb`), so every run's peak memory and training memory are its own, not
the remains of the runs before it in one process. The manifest `<results_dir>/<preset>.sweep.json` names the
runs of each protocol and the chosen rates; it is rewritten after every run, and `toukit.load_runs` reads it
into the `protocol` column. `progress` (`toukit sweep --status`) says how far a sweep has got without running
anything.
"""
import dataclasses
import datetime as _dt
import functools
import json
import math
import os
import socket
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Union

import pandas as pd
import torch
from tqdm.auto import tqdm

from .config import PRESETS, TrainConfig, resolve_config
from .lr_choice import close_runner_up, select_lr
from .methods import METHODS
from .notebooks import run_notebook
from .ranks import DEFAULT_FRACTION
from .results import MANIFEST_SUFFIX, finished_record, now, read_manifest, write_record
from .runstate import can_resume, lock_owner, process_alive
from .spectrum import spectrum_table
from .studies import budget_policies
from .train import preset_model

__all__ = ['sweep', 'plan', 'select_lr', 'check_grid', 'manifest_path', 'PROTOCOLS', 'STAGES', 'rank_plan',
           'rank_study', 'study_specs', 'progress']

PROTOCOLS = ('grid', 'tuned', 'paper')  # the comparison protocols
STAGES = ('grid', 'tuned', 'runner_up', 'paper')  # what a sweep runs, in order: the protocols and the close runner-ups


def check_grid(grid: Dict[str, Sequence[float]], methods: Optional[Sequence[str]] = None) -> Dict[str, List[float]]:
    """`grid` as method -> sorted list of rates; a ValueError names an unknown method or a bad rate."""
    if not isinstance(grid, dict) or not grid:
        raise ValueError(f'lr grid={grid!r}: expected a non-empty dict of method -> learning rates')
    out = {}
    for method, rates in grid.items():
        if method not in METHODS:
            raise ValueError(f'lr grid for method={method!r}: unknown; choose from {", ".join(METHODS)}')
        rates = list(rates) if isinstance(rates, (list, tuple)) else [rates]
        if not rates:
            raise ValueError(f'lr grid for {method}: empty; give at least one learning rate')
        for lr in rates:
            if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (0 < lr < math.inf):
                raise ValueError(f'lr grid for {method}: lr={lr!r} must be a positive number')
        out[method] = sorted(float(lr) for lr in set(rates))
    missing = [m for m in (methods or []) if m not in out]
    if missing:
        raise ValueError(f'lr grid has no rates for methods {missing}')
    return out


def _check_seeds(seeds: Sequence[int]) -> List[int]:
    seeds = list(seeds) if isinstance(seeds, (list, tuple)) else [seeds]
    if not seeds or any(isinstance(s, bool) or not isinstance(s, int) for s in seeds):
        raise ValueError(f'seeds={seeds!r}: expected a non-empty list of ints')
    if len(set(seeds)) != len(seeds):
        raise ValueError(f'seeds={seeds!r}: repeated seeds')
    return seeds


def _check_overrides(overrides: Optional[dict], own: Sequence[str] = ()) -> dict:
    """More TrainConfig fields for every run; a ValueError names one the sweep sets itself or an unknown one."""
    overrides = dict(overrides or {})
    fields = {f.name for f in dataclasses.fields(TrainConfig)} - {'method_options'}
    for key in overrides:
        if key in ('method', 'preset', 'lr', 'seed', 'results_dir', 'run_name', *own):
            raise ValueError(f'overrides: {key!r} is set by the sweep itself (run_name: every run has its own id)')
        if key not in fields:
            raise ValueError(f'overrides: {key!r} is not a training parameter; choose from {", ".join(sorted(fields))}')
    return overrides


STUDY_FIELDS = ('rank', 'calibration_batches')  # what the rank study sets in each run itself


def _check_budgets(budgets: Sequence[float]) -> List[float]:
    budgets = list(budgets) if isinstance(budgets, (list, tuple)) else [budgets]
    if not budgets:
        raise ValueError('budgets=[]: give at least one budget')
    largest = 1 / DEFAULT_FRACTION  # uniform rank 0.375 b reaches full rank
    for b in budgets:
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not 0 < b <= largest:
            raise ValueError(f'budgets: budget={b!r} must be a number in (0, {largest:.6g}] (a multiple of what '
                             f'uniform rank {DEFAULT_FRACTION} spends; the largest is full rank)')
    if len(set(budgets)) != len(budgets):
        raise ValueError(f'budgets={budgets!r}: repeated budgets')
    return budgets


def manifest_path(results_dir: str, preset: str) -> Path:
    return Path(results_dir) / f'{preset}{MANIFEST_SUFFIX}'  # the rank study's: <preset>.ranks.sweep.json


def _config(preset: str, method: str, lr: float, seed: int, results_dir: str, overrides: dict) -> TrainConfig:
    return resolve_config(TrainConfig(method=method, preset=preset, lr=lr, seed=seed, results_dir=results_dir,
                                      **overrides))


def plan(preset: str = 'demo', methods: Optional[Sequence[str]] = None, seeds: Sequence[int] = (0, 1, 2),
         grid: Optional[Dict[str, Sequence[float]]] = None, results_dir: str = 'results',
         overrides: Optional[dict] = None) -> dict:
    """The sweep's manifest as far as the records on disk allow: grid, chosen rates and the runs of each protocol.

    A method's tuned runs, and its runner-up runs where its choice is close, are listed once all of its grid runs
    have finished.
    """
    if preset not in PRESETS:
        raise ValueError(f'preset={preset!r}: unknown; choose one of {", ".join(PRESETS)}')
    methods = list(methods or METHODS)
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ValueError(f'methods={bad!r}: unknown; choose from {", ".join(METHODS)}')
    seeds = _check_seeds(seeds)
    grid = check_grid(grid if grid is not None else PRESETS[preset].get('lr_grid', {}), methods)
    overrides = _check_overrides(overrides)
    paper_lr = resolve_config(TrainConfig(preset=preset)).lr
    runs = {p: {} for p in STAGES}
    configs, selected = {}, {}
    for method in methods:
        grid_configs = {lr: _config(preset, method, lr, seeds[0], results_dir, overrides) for lr in grid[method]}
        runs['grid'][method] = [c.name for c in grid_configs.values()]
        grid_records = {lr: finished_record(c.record_path) for lr, c in grid_configs.items()}
        best = select_lr(grid_records)
        tuned, runner_up = [], []
        if best is not None:
            selected[method] = best
            tuned = [_config(preset, method, best, s, results_dir, overrides) for s in seeds]
            runs['tuned'][method] = [c.name for c in tuned]
            try:
                second = close_runner_up(grid_records)
            except ValueError as e:  # grid records the rule cannot compare: the sweep goes on without the runner-up
                warnings.warn(f'{preset} {method}: no runner-up runs, the choice cannot be tested ({e})')
                second = None
            if second is not None:
                runner_up = [_config(preset, method, second, s, results_dir, overrides) for s in seeds]
                runs['runner_up'][method] = [c.name for c in runner_up]
        paper = [_config(preset, method, paper_lr, s, results_dir, overrides) for s in seeds]
        runs['paper'][method] = [c.name for c in paper]
        for c in list(grid_configs.values()) + tuned + runner_up + paper:
            configs[c.name] = c
    parameters = {name: dict(method=c.method, preset=preset, lr=c.lr, seed=c.seed, **overrides)
                  for name, c in configs.items()}
    return dict(name=preset, preset=preset, created=now(), methods=methods, seeds=seeds, grid=grid, paper_lr=paper_lr,
                selected_lr=selected, overrides=overrides, runs=runs, configs=configs, parameters=parameters)


def sweep(preset: str = 'demo', methods: Optional[Sequence[str]] = None, seeds: Sequence[int] = (0, 1, 2),
          grid: Optional[Dict[str, Sequence[float]]] = None, results_dir: str = 'results',
          overrides: Optional[dict] = None, redo: Union[bool, str] = False, stages: Sequence[str] = STAGES,
          progress: bool = True, poll_seconds: float = 30.0) -> dict:
    """Run the grid, then each method's best rate on every seed (and its runner-up where the choice is close), then
    the paper's shared rate; returns the manifest.

    Args:
        preset: 'demo', 'paper' or 'test'.
        methods: default every registered method.
        seeds: the first one runs the grid.
        grid: method -> learning rates; default the preset's `lr_grid`.
        results_dir: records and the manifest.
        overrides: more TrainConfig fields for every run (e.g. epochs or max_steps_per_epoch for a quick check).
        redo: run again where a successful record exists; a time (ISO 8601, as records write it, e.g.
            '2026-12-05T13:30:00+00:00'): run again where it finished before that time, so that a re-run spread over
            several sweeps (sessions, machines) redoes each run once.
        stages: which of 'grid', 'tuned', 'runner_up', 'paper' to run (all by default, in that order).
        progress: progress bars.
        poll_seconds: how often to look again while every run left is held by another worker of this host.

    The manifest keeps the methods an earlier sweep of the same preset, seeds, overrides and paper rate listed and
    this one leaves out, so methods can be swept in turns into one comparison.

    Several `toukit sweep` processes can share one results folder (one per core or GPU, say): each skips the runs
    whose lock another live process holds, and waits for them (polling) while nothing else is left, since their
    records may decide tuned rates. Runs held from another host are left to it and listed at the end.

    A run that fails is recorded as failed and the sweep goes on with the next; the failures are raised together
    at the end.
    """
    bad = [s for s in stages if s not in STAGES]
    if bad:
        raise ValueError(f'stages={bad!r}: choose from {", ".join(STAGES)}')
    results_dir = str(Path(results_dir).resolve())  # the notebooks run elsewhere
    return _execute(lambda: plan(preset, methods, seeds, grid, results_dir, overrides),
                    [s for s in STAGES if s in stages], results_dir, redo, progress, poll_seconds,
                    keep_others=True)


def progress(preset: str = 'demo', methods: Optional[Sequence[str]] = None, seeds: Sequence[int] = (0, 1, 2),
             grid: Optional[Dict[str, Sequence[float]]] = None, results_dir: str = 'results',
             overrides: Optional[dict] = None, redo_before: Optional[str] = None,
             stages: Sequence[str] = STAGES) -> pd.DataFrame:
    """How far a sweep has got, without running anything: per stage and method, the runs planned as far as the
    records decide (tuned and runner-up runs appear once a method's grid is finished), how many have finished (since
    `redo_before`, when given, as `sweep(redo=...)` counts them), how many a live process is running, and how many
    are left. A run that belongs to two stages is counted in each. `toukit sweep --status` prints it.
    """
    if redo_before is not None:
        _redo_time(redo_before)
    manifest = plan(preset, methods, seeds, grid, results_dir, overrides)
    rows = []
    for stage in [s for s in STAGES if s in stages]:
        for method, names in manifest['runs'][stage].items():
            paths = [manifest['configs'][n].record_path for n in names]
            finished = sum(_finished(p, redo_before) for p in paths)
            running = sum(lock_owner(p) is not None for p in paths)
            rows.append(dict(stage=stage, method=method, planned=len(paths), finished=finished, running=running,
                             left=len(paths) - finished))
    return pd.DataFrame(rows, columns=['stage', 'method', 'planned', 'finished', 'running', 'left'])


def rank_plan(preset: str = 'demo', budgets: Sequence[float] = (0.5, 1.0, 1.5), seeds: Sequence[int] = (0, 1, 2),
              lr: Optional[float] = None, calibration_batches: int = 4, results_dir: str = 'results',
              overrides: Optional[dict] = None, specs: Optional[Dict[float, dict]] = None,
              grid: Optional[Dict[str, Sequence[float]]] = None) -> dict:
    """The adaptive-rank study's manifest: full TOU under each policy of `toukit.studies.budget_policies` at each
    budget, on every seed, at one learning rate.

    Args:
        budgets: multiples of what uniform rank 0.375 spends on B. On the demo, whose TOU rank is that fraction,
            budget 1.0's uniform runs are the sweep's tuned TOU runs (the same ids: run once).
        lr: None: the rate the sweep chose for full TOU on validation (`plan(...)['selected_lr']['tou']`).
        calibration_batches: training batches the activation-aware policy factorizes on.
        overrides: more TrainConfig fields for every run.
        specs: budget -> policy -> (rank, calibrated), as `study_specs` gives (computed when None).
        grid: the sweep's grid, when it was not the preset's (for lr=None).

    Runs are grouped by '<policy> @ <budget>' under the stage 'ranks'; `load_runs` reads the manifest
    (`<preset>.ranks.sweep.json`) into the `protocol` column, and `toukit.claims.rank_study_table` into a table.
    """
    seeds, budgets = _check_seeds(seeds), _check_budgets(budgets)
    if isinstance(calibration_batches, bool) or not isinstance(calibration_batches, int) or calibration_batches < 1:
        raise ValueError(f'calibration_batches={calibration_batches!r}: must be a positive int')
    overrides = _check_overrides(overrides, own=STUDY_FIELDS)
    if lr is None:
        lr = plan(preset, ['tou'], seeds, grid, results_dir, overrides)['selected_lr'].get('tou')
        if lr is None:
            raise ValueError(f'lr=None: the {preset} sweep has not chosen full TOU\'s rate on validation yet (its '
                             f'grid is unfinished): run `toukit sweep --preset {preset} --methods tou` or pass lr')
    specs = specs if specs is not None else study_specs(preset, budgets, overrides)
    runs, configs, parameters, policies = {}, {}, {}, {}
    for budget in budgets:
        for policy, (rank, calibrated) in specs[budget].items():
            extra = dict(overrides, rank=rank, **(dict(calibration_batches=calibration_batches) if calibrated else {}))
            group = f'{policy} @ {budget:g}'
            runs[group] = []
            for seed in seeds:
                config = _config(preset, 'tou', lr, seed, results_dir, extra)
                if config.name in policies:
                    other = policies[config.name]
                    raise ValueError(f'{group} and {other["policy"]} @ {other["budget"]:g} are one run ({config.name}, '
                                     f'rank={rank!r}): choose budgets further apart')
                configs[config.name] = config
                parameters[config.name] = dict(method='tou', preset=preset, lr=lr, seed=seed, **extra)
                policies[config.name] = dict(policy=policy, budget=budget)
                runs[group].append(config.name)
    return dict(name=f'{preset}.ranks', preset=preset, created=now(), budgets=budgets, seeds=seeds, lr=lr,
                calibration_batches=calibration_batches, overrides=overrides,
                specs=[dict(budget=b, policy=p, rank=r, calibrated=c)
                       for b in budgets for p, (r, c) in specs[b].items()],
                policies=policies, runs={'ranks': runs}, configs=configs, parameters=parameters)


def study_specs(preset: str, budgets: Sequence[float], overrides: Optional[dict] = None,
                results_dir: Optional[str] = None) -> Dict[float, dict]:
    """budget -> `toukit.studies.budget_policies` of the preset's model.

    The specs a study's manifest (`<results_dir>/<preset>.ranks.sweep.json`) already holds are reused, so that every
    worker, on any machine, plans the same runs (an energy threshold from slightly different singular values could
    differ in its last digit). A model with random weights is drawn from seed 0.
    """
    known, overrides = {}, overrides or {}
    manifest = Path(results_dir or '.') / f'{preset}.ranks{MANIFEST_SUFFIX}'
    if results_dir is not None and manifest.exists():
        stored = read_manifest(manifest)
        spectrum_keys = ('model', 'pretrained', 'targets')  # what the spectra depend on
        if all(stored.get('overrides', {}).get(k) == overrides.get(k) for k in spectrum_keys):
            for spec in stored.get('specs', []):
                known.setdefault(spec['budget'], {})[spec['policy']] = (spec['rank'], spec['calibrated'])
    missing = [b for b in budgets if b not in known]
    if missing:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            _, net = preset_model(preset, overrides.get('model'), overrides.get('pretrained'))
        table = spectrum_table(net, overrides.get('targets') or 'all')
        known.update({b: budget_policies(table, b) for b in missing})
    return {b: known[b] for b in budgets}


def rank_study(preset: str = 'demo', budgets: Sequence[float] = (0.5, 1.0, 1.5), seeds: Sequence[int] = (0, 1, 2),
               lr: Optional[float] = None, calibration_batches: int = 4, results_dir: str = 'results',
               overrides: Optional[dict] = None, redo: bool = False, progress: bool = True,
               poll_seconds: float = 30.0, grid: Optional[Dict[str, Sequence[float]]] = None) -> dict:
    """Run the adaptive-rank study (`rank_plan`) as `sweep` runs its protocols: skipping finished runs, resuming
    killed ones, sharing the folder with other workers (started with the same arguments); returns the manifest."""
    results_dir, budgets = str(Path(results_dir).resolve()), _check_budgets(budgets)
    # the specs once, not at every re-plan
    specs = study_specs(preset, budgets, _check_overrides(overrides, STUDY_FIELDS), results_dir)
    lr = rank_plan(preset, budgets, seeds, lr, calibration_batches, results_dir, overrides, specs, grid)['lr']
    return _execute(lambda: rank_plan(preset, budgets, seeds, lr, calibration_batches, results_dir,
                                      overrides, specs), ['ranks'], results_dir, redo, progress, poll_seconds)


def _execute(planner: Callable[[], dict], stages: Sequence[str], results_dir: str, redo: Union[bool, str],
             progress: bool, poll_seconds: float, keep_others: bool = False) -> dict:
    """Run what `planner()` lists under each stage (re-planned as records arrive) until nothing is left; write the
    manifest after every run (with `keep_others`, merged into the one on disk: `_merged`). The loop of `sweep` and
    `rank_study`."""
    if isinstance(redo, str):
        _redo_time(redo)  # refuses a malformed or naive time before any run
    failures, done = [], set()
    started = redo if isinstance(redo, str) else now()  # under redo, a record finished since then is this redo's
    write = functools.partial(_write_manifest, results_dir=results_dir, keep_others=keep_others)
    while True:  # passes until nothing is left that this process can run
        ran, busy = False, []
        for stage in stages:
            manifest = planner()  # the records so far decide, e.g., the tuned rates
            ids = [i for group in manifest['runs'][stage].values() for i in group]
            for name in tqdm(ids, desc=f'{manifest["name"]}: {stage}', disable=not progress):
                config = manifest['configs'][name]
                if name in done or _finished(config.record_path, started if redo else None):
                    _adopt_scratch(Path(results_dir) / 'notebooks' / f'{name}.ipynb', config.record_path)
                    continue
                if lock_owner(config.record_path) is not None:  # another worker runs it
                    busy.append(name)
                    continue
                parameters = dict(manifest['parameters'][name], results_dir=results_dir, overwrite=redo,
                                  resume=can_resume(config.record_path))
                executed = Path(results_dir) / 'notebooks' / f'{name}.ipynb'
                scratch = executed.with_name(f'.{name}.{socket.gethostname()}.{os.getpid()}.ipynb')  # this worker's
                try:
                    run_notebook('train.ipynb', scratch, parameters, cwd=Path.cwd(), progress=progress)
                except Exception as e:  # noqa: BLE001 - the run's own record says why; the sweep goes on
                    refusal = _refusal(e)
                    if refusal == 'locked' or (not redo and refusal == 'finished'):
                        scratch.unlink(missing_ok=True)  # another worker took it first, or finished it meanwhile
                        if refusal == 'locked':
                            busy.append(name)
                        else:
                            done.add(name)
                        continue
                    failures.append(f'{name}: {type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}')
                finally:
                    if scratch.exists():
                        os.replace(scratch, executed)
                done.add(name)
                ran = True
                write(planner())
        freed = [n for n in busy if lock_owner(manifest['configs'][n].record_path) is None]
        if not ran and not freed and not any(_held_here(manifest['configs'][n].record_path) for n in busy):
            break  # (a run freed since this pass found it held, its owner gone meanwhile, is tried in another pass)
        if not ran:  # every run left is another local worker's; their records may unlock tuned runs
            time.sleep(poll_seconds)
    manifest = planner()
    if busy:
        print(f'{manifest["name"]}: {len(busy)} run(s) left to other workers: {", ".join(sorted(set(busy)))}')
    write(manifest)
    if failures:
        raise RuntimeError(f'{len(failures)} sweep run(s) failed (records say why): ' + '; '.join(failures))
    return manifest


def _adopt_scratch(executed: Path, record_path: Path) -> None:
    """Put in place the executed notebook that a worker of this host left as its scratch copy when it died between
    the run's record and the end of the notebook (killed while the last cells ran): a run that is finished is never
    run again, so that copy is the only one of its run. Only a copy newer than the record, which the executed
    notebook is not, from a process that no longer runs, is taken (the newest, where several are). The other copies
    of stopped workers, attempts that a later one finished (resumed or run anew), are removed; a live worker's stay."""
    host = socket.gethostname()
    try:
        finished_at = record_path.stat().st_mtime
        in_place = executed.exists() and executed.stat().st_mtime >= finished_at
        copies = sorted(executed.parent.glob(f'.{executed.stem}.{host}.*.ipynb'), key=lambda c: c.stat().st_mtime)
        newer = {c for c in copies if c.stat().st_mtime >= finished_at}
    except OSError:
        return
    pids = {c: c.stem.rsplit('.', 1)[-1] for c in copies}  # .<run id>.<host>.<pid>
    dead = [c for c in copies if pids[c].isdigit() and not process_alive(int(pids[c]))]
    taken = [c for c in dead if c in newer and not in_place]
    if taken:
        os.replace(taken[-1], executed)
        print(f'{executed.name}: put in place from a stopped worker\'s copy ({taken[-1].name}; its last cells may not '
              f'have run)')
    for c in dead:
        if c not in taken[-1:]:
            c.unlink(missing_ok=True)


def _refusal(error: Exception) -> Optional[str]:
    """Why `toukit.train.run` refused to start the run of a notebook that failed: 'locked' (RunLockedError: another
    process runs it), 'finished' (RecordExistsError: its record exists), or None (the run itself failed). Read from
    the exception class name papermill reports (`PapermillExecutionError.ename`)."""
    return {'RunLockedError': 'locked', 'RecordExistsError': 'finished'}.get(getattr(error, 'ename', None))


def _redo_time(text: str) -> _dt.datetime:
    """`text` as an aware time (a redo time: records finished since then are kept)."""
    try:
        # a trailing Z (UTC) as +00:00: Python 3.10's fromisoformat reads only the offset
        when = _dt.datetime.fromisoformat(text[:-1] + '+00:00' if text.endswith(('Z', 'z')) else text)
    except ValueError:
        raise ValueError(f'redo={text!r}: expected True, False or an ISO 8601 time such as '
                         f'2026-12-05T13:30:00+00:00') from None
    if when.tzinfo is None:
        raise ValueError(f'redo={text!r}: the time needs its offset (records write UTC times, e.g. '
                         f'{text}+00:00)')
    return when


def _finished(record_path: Path, since: Optional[str]) -> bool:
    """A finished record exists (made at `since` or later, when given: under redo, by this sweep or a worker beside
    it). Times compare as instants, whatever offset each is written with."""
    record = finished_record(record_path)
    if record is None or since is None:
        return record is not None
    try:
        return _redo_time(str(record.get('finished', ''))) >= _redo_time(since)
    except ValueError:  # a record without a readable finishing time is not this redo's
        return False


def _held_here(record_path: Path) -> bool:
    owner = lock_owner(record_path)  # {} while its owner is writing it
    return owner is not None and owner.get('host', socket.gethostname()) == socket.gethostname()


def _write_manifest(manifest: dict, results_dir: str, keep_others: bool = False) -> Path:
    public = {k: v for k, v in manifest.items() if k not in ('configs', 'parameters')}
    path = Path(results_dir) / f'{manifest["name"]}{MANIFEST_SUFFIX}'
    return write_record(_merged(public, path) if keep_others else public, path)


def _merged(manifest: dict, path: Path) -> dict:
    """`manifest` with the methods the sweep manifest at `path` lists and it does not, when both sweeps share their
    preset, seeds, overrides and paper rate (their protocols then mean the same); otherwise `manifest` as it is."""
    try:
        old = read_manifest(path)
    except (OSError, ValueError):
        return manifest
    protocol = ('preset', 'seeds', 'overrides', 'paper_lr')
    as_written = json.loads(json.dumps({key: manifest[key] for key in protocol}, default=str))  # as written: lists
    changed = [key for key in protocol if old.get(key) != as_written[key]]
    others = [m for m in old.get('methods', []) if m not in manifest['methods']]
    if changed:
        if others:
            warnings.warn(f'{path}: the sweep written before listed {", ".join(others)} under another protocol '
                          f'({", ".join(changed)} differ); the new manifest lists only {", ".join(manifest["methods"])}')
        return manifest
    if not others:
        return manifest
    every = set(manifest['methods']) | set(others)
    order = [m for m in METHODS if m in every] + sorted(every - set(METHODS))
    merged = dict(manifest, methods=order, runs={})

    def source(m):  # this sweep's entries for its own methods (even where it has none), the old ones for the others
        return manifest if m in manifest['methods'] else old

    for key in ('grid', 'selected_lr'):
        merged[key] = {m: v for m in order for v in [source(m).get(key, {}).get(m)] if v is not None}
    for stage in STAGES:
        merged['runs'][stage] = {m: runs for m in order for runs in [source(m).get('runs', {}).get(stage, {}).get(m)]
                                 if runs is not None}
    return merged
