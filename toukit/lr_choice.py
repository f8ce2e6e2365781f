"""Choosing a learning rate on validation, and choices too close to call: the runner-up rate, its runs, and the
claims under it.

The sweep tunes each method on the best final validation accuracy of one seed (`select_lr`). When the runner-up
rate is within the validation set's noise of the best (`close_runner_up`), the choice is a coin toss that may carry
a claim: the sweep's 'runner_up' stage runs that rate on every seed too, and `claims_both_ways` reports every claim
under the chosen rates and with those runner-up rates substituted.
"""
import math
from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
from scipy import stats

from .claims import CLAIMS, pooled_claims
from .config import run_id
from .results import FINISHED, read_record, with_protocol

__all__ = ['select_lr', 'runner_up_margin', 'close_runner_up', 'lr_margins', 'runner_up_plan', 'tuned_both_ways',
           'claims_both_ways', 'sweep_manifest', 'Z95']

Z95 = 1.959963984540054  # the standard normal's 97.5th percentile: a two-sided 95% test


def select_lr(records: Dict[float, Optional[dict]]) -> Optional[float]:
    """The learning rate whose record has the best final validation accuracy; None while any record is missing.

    Ties go to the first rate in `records`' order. Only `metrics.final.val_accuracy` is read, never test accuracy.
    A rate whose run diverged (status 'diverged') is finished but never chosen.
    """
    if not records or any(r is None for r in records.values()):
        return None
    best, best_acc = None, -1.0
    for lr, record in records.items():
        if record.get('status') == 'diverged':
            continue
        acc = record['metrics']['final']['val_accuracy']
        if acc > best_acc:
            best, best_acc = lr, acc
    return best


def runner_up_margin(grid_records_by_lr: Dict[float, Optional[dict]]) -> Optional[dict]:
    """How far the chosen rate's validation accuracy is ahead of the runner-up's, against the validation noise.

    The rule: the best rate is `select_lr`'s; the runner-up is the best of the other rates that did
    not diverge (ties: the first in the grid's order). Their margin is tested at the 95% level:
    - when both records hold per-example validation correctness (`metrics.final.val_predictions` and
      `val_labels`), McNemar's exact test: of the m examples exactly one of the two rates gets right, the best gets
      k; the choice is decided when a fair coin would give k or a count as far from m / 2 with probability below
      0.05 (two-sided binomial, `scipy.stats.binomtest`). Exact, so a margin made of a handful of examples is not
      decided by a normal approximation (4 of 4 disagreements won is p = 0.125: close). The threshold reported is
      the smallest margin that m disagreements could decide, (2 k* - m) / n (inf where none could: m < 6);
    - else (the records of this version hold only the accuracy), the binomial standard error of the difference of
      two independent accuracies on n validation examples (`data.val_size`): the threshold is
      1.96 sqrt(p1 (1 - p1) / n1 + p2 (1 - p2) / n2) = 1.96 se, and p = 2 (1 - Phi(|margin| / se)). The two runs
      see the same examples, and their errors overlap, so the paired standard error would be smaller: this
      approximation is conservative, calling more choices close than a paired test would.
    The choice is close when |margin| is below the threshold (p >= 0.05), or zero (a tie).

    Args:
        grid_records_by_lr: learning rate -> the grid run's record (None while it has not finished), in the grid's
            order, as `select_lr` takes them.

    Returns:
        None while the grid is unfinished or with fewer than two rates that did not diverge; else best, runner_up
        (rates), margin and threshold (in accuracy points), test ('paired' or 'binomial'), p_value (two-sided)
        and close.

    Raises:
        ValueError: the binomial test with a record that does not say its validation set's size; the paired test
            with records of different validation labels.
    """
    best = select_lr(grid_records_by_lr)
    others = {lr: r for lr, r in grid_records_by_lr.items() if lr != best}
    second = select_lr(others) if best is not None and others else None
    if second is None:
        return None
    a, b = grid_records_by_lr[best], grid_records_by_lr[second]
    right_a, right_b = _val_correct(a), _val_correct(b)
    if right_a is not None and right_b is not None:
        labels_a, labels_b = (np.asarray(r['metrics']['final']['val_labels']) for r in (a, b))
        if not np.array_equal(labels_a, labels_b):
            raise ValueError(f'lr {best:g} and {second:g}: their records hold different validation labels '
                             f'({len(labels_a)} and {len(labels_b)} examples); a paired test needs one validation set')
        n, won, lost = len(right_a), int((right_a & ~right_b).sum()), int((~right_a & right_b).sum())
        margin, p_value, test = (won - lost) / n, _mcnemar_p(won, lost), 'paired'
        threshold = _mcnemar_threshold(won + lost) / n
        close = p_value >= 0.05  # the same as |margin| < threshold, by construction rather than by monotonicity
    else:
        (pa, na), (pb, nb) = _accuracy_and_size(a), _accuracy_and_size(b)
        margin, test = pa - pb, 'binomial'
        se = math.sqrt(pa * (1 - pa) / na + pb * (1 - pb) / nb)
        threshold = Z95 * se
        p_value = float(2 * stats.norm.sf(abs(margin) / se)) if se > 0 else float(margin == 0)
        close = abs(margin) < threshold or margin == 0
    return dict(best=best, runner_up=second, margin=margin * 100, threshold=threshold * 100, test=test,
                p_value=p_value, close=bool(close))


def _mcnemar_p(won: int, lost: int) -> float:
    """McNemar's exact two-sided p: `won` of the `won + lost` discordant examples against a fair coin (1 with none)."""
    return float(stats.binomtest(won, won + lost, 0.5).pvalue) if won + lost else 1.0


def _mcnemar_threshold(discordant: int) -> float:
    """The smallest lead (won - lost, in examples) that McNemar's exact test decides at 5% among `discordant`
    disagreements; inf where even all of them won would not."""
    for won in range((discordant + 1) // 2, discordant + 1):
        if _mcnemar_p(won, discordant - won) < 0.05:
            return float(2 * won - discordant)
    return math.inf


def close_runner_up(grid_records_by_lr: Dict[float, Optional[dict]]) -> Optional[float]:
    """The runner-up learning rate when it is within the validation set's noise of the chosen one, else None (the
    rule: `runner_up_margin`)."""
    margin = runner_up_margin(grid_records_by_lr)
    return margin['runner_up'] if margin is not None and margin['close'] else None


def _val_correct(record: dict) -> Optional[np.ndarray]:
    final = record['metrics']['final']
    if final.get('val_predictions') is None or final.get('val_labels') is None:
        return None
    predictions, labels = np.asarray(final['val_predictions']), np.asarray(final['val_labels'])
    if predictions.shape != labels.shape:
        raise ValueError(f'{record.get("run", {}).get("id", "a record")}: {len(predictions)} validation predictions '
                         f'for {len(labels)} labels')
    return predictions == labels


def _accuracy_and_size(record: dict):
    size = record.get('data', {}).get('val_size')
    if not size:
        raise ValueError(f'run {record.get("run", {}).get("id", "?")}: its record has no data.val_size, the size of '
                         f'the validation set the binomial test needs')
    return record['metrics']['final']['val_accuracy'], size


def _grid_records(manifest: dict, method: str, runs: pd.DataFrame, load: Callable[[str], dict]) -> dict:
    """lr -> the finished grid record of `method` (None where there is none), in the grid's order."""
    out = {}
    for lr, name in zip(manifest['grid'][method], manifest['runs']['grid'][method]):
        found = runs[(runs.run_id == name) & runs.status.isin(FINISHED)] if len(runs) else runs
        out[lr] = load(found.path.iloc[0]) if len(found) else None
    return out


def lr_margins(manifest: dict, runs: pd.DataFrame, load: Optional[Callable[[str], dict]] = None) -> pd.DataFrame:
    """`runner_up_margin` of every method of a sweep: one row per method whose grid has finished.

    Args:
        manifest: the sweep's manifest (`<preset>.sweep.json`, `toukit.results.read_manifest`).
        runs: a `load_runs` table holding the sweep's grid runs.
        load: reads a record from its path (default `toukit.results.read_record`).

    Returns:
        Columns: preset, method, best, runner_up, margin, threshold, test, p_value, close.
    """
    load = load or read_record
    rows = []
    for method in manifest['runs']['grid']:
        margin = runner_up_margin(_grid_records(manifest, method, runs, load))
        if margin is not None:
            rows.append(dict(preset=manifest['preset'], method=method, **margin))
    return pd.DataFrame(rows, columns=['preset', 'method', 'best', 'runner_up', 'margin', 'threshold', 'test',
                                       'p_value', 'close'])


def runner_up_plan(manifest: dict, runs: pd.DataFrame, load: Optional[Callable[[str], dict]] = None) -> pd.DataFrame:
    """The runs a sweep still needs to tune its close choices both ways: per method whose runner-up rate is close
    (`runner_up_margin`), that rate on every seed of the sweep (the first seed's run is the grid's).

    The sweep's 'runner_up' stage runs them (`toukit sweep --preset <task> --stages runner_up`); the ids listed are
    the ones it gives them.

    Args:
        manifest: the sweep's manifest (`<preset>.sweep.json`).
        runs: a `load_runs` table holding the sweep's runs.
        load: reads a record from its path (default `toukit.results.read_record`).

    Returns:
        `lr_margins`' close rows, with seeds (the sweep's), run_ids (the runner-up rate's run on each seed) and
        missing (those without a finished record in `runs`).
    """
    load = load or read_record
    margins = lr_margins(manifest, runs, load)
    plan = margins[margins.close].drop(columns='close').reset_index(drop=True)
    done = set(runs.run_id[runs.status.isin(FINISHED)]) if len(runs) else set()
    ids = []
    for row in plan.itertuples():  # the grid run's config on every seed: the ids the sweep would give them
        config = _grid_records(manifest, row.method, runs, load)[row.runner_up]['run']['config']
        ids.append([run_id(dict(config, seed=s)) for s in manifest['seeds']])
    plan['seeds'] = [list(manifest['seeds'])] * len(plan)
    plan['run_ids'] = ids
    plan['missing'] = [[i for i in names if i not in done] for names in ids]
    return plan


def tuned_both_ways(runs: pd.DataFrame, tasks: Sequence[str] = (), load: Optional[Callable[[str], dict]] = None
                    ) -> Tuple[Dict[str, pd.DataFrame], Dict[str, pd.DataFrame], Dict[str, set]]:
    """Each task's tuned runs twice: as chosen, and with the runner-up rate substituted for every method whose choice
    was close (`runner_up_plan`), all at once: that rate's grid run on the first seed and its runs on the others, as
    far as they exist (`runner_up_plan` lists the runs left).

    Args:
        runs: a `load_runs` table of every task (its `preset` column), with its sweep manifests (`attrs`).
        tasks: the presets; empty: every preset in `runs`.
        load: reads a record from its path (default `toukit.results.read_record`).

    Returns:
        chosen (task -> the tuned protocol's runs), swapped (task -> the same with the runner-ups substituted) and
        substituted (task -> the methods swapped), ready for `toukit.claims.pooled_claims` or
        `toukit.gap.gap_decomposition`.

    Raises:
        ValueError: a task without a sweep manifest in `runs.attrs['manifests']`.
    """
    load = load or read_record
    tasks = [tasks] if isinstance(tasks, str) else list(tasks) or sorted(set(runs.preset))
    chosen, swapped, substituted = {}, {}, {}
    for task in tasks:
        task_runs = runs[runs.preset == task]
        plan = runner_up_plan(_manifest(runs, task), task_runs, load)
        tuned = with_protocol(task_runs, 'tuned')
        extra = task_runs[task_runs.run_id.isin(sum(plan.run_ids, [])) & (task_runs.status == 'ok')]
        chosen[task] = tuned
        swapped[task] = pd.concat([tuned[~tuned.method.isin(plan.method)], extra.drop_duplicates('run_id')],
                                  ignore_index=True)
        substituted[task] = set(plan.method)
    return chosen, swapped, substituted


def claims_both_ways(runs: pd.DataFrame, tasks: Sequence[str] = (), n_boot: int = 4000, seed: int = 0,
                     load: Optional[Callable[[str], dict]] = None) -> pd.DataFrame:
    """Every claim of `toukit.claims.CLAIMS`, per task and pooled (`toukit.claims.pooled_claims`), twice: under the
    tuned protocol's chosen rates, and with the runner-up rate substituted for every method whose choice was close
    (`tuned_both_ways`; the `seeds` column says how many seeds a claim used). A claim comparing two close methods
    thus sees both swapped together, not one at a time.

    Args:
        runs: a `load_runs` table of every task (its `preset` column), with its sweep manifests (`attrs`).
        tasks: the presets to report; empty: every preset in `runs`.
        n_boot: bootstrap replicates of the accuracy claims.
        seed: seeds the bootstrap (the same generator for both ways; where the runner-up has fewer seeds, the draws
            differ).
        load: reads a record from its path (default `toukit.results.read_record`).

    Returns:
        `pooled_claims`' rows under choice 'chosen' and then 'runner-up', with a `rates` column: for a task's row,
        the rate of each method compared ('tou 0.0002 (runner-up), ft 5e-05'); for a pooled row, each task's.

    Raises:
        ValueError: a task without a sweep manifest in `runs.attrs['manifests']`.
    """
    load = load or read_record
    chosen, swapped, substituted = tuned_both_ways(runs, tasks, load)
    frames = []
    for choice, by_task in (('chosen', chosen), ('runner-up', swapped)):
        table = pooled_claims(by_task, n_boot=n_boot, seed=seed, load=load)
        marked = substituted if choice == 'runner-up' else {}
        table['rates'] = [_rates(row.statement, row.task, by_task, marked) for row in table.itertuples()]
        frames.append(table.assign(choice=choice))
    out = pd.concat(frames, ignore_index=True)
    return out[['choice'] + [c for c in out.columns if c != 'choice']]


def sweep_manifest(runs: pd.DataFrame, task: str) -> Optional[dict]:
    """The learning-rate sweep's manifest of `task` (`<task>.sweep.json`, with a grid) among a `load_runs` table's
    manifests (the first, where a copy sits in a subfolder too); None without one."""
    for manifest in runs.attrs.get('manifests', []):
        if manifest.get('preset') == task and 'grid' in manifest.get('runs', {}):
            return manifest
    return None


def _manifest(runs: pd.DataFrame, task: str) -> dict:
    manifest = sweep_manifest(runs, task)
    if manifest is None:
        raise ValueError(f'task {task!r}: no sweep manifest ({task}.sweep.json) among the runs\' manifests, so its '
                         f'chosen rates cannot be checked (load_runs reads them from the results folder)')
    return manifest


def _rates(statement: str, task: str, by_task: Dict[str, pd.DataFrame], substituted: Dict[str, set]) -> str:
    """The rates a claim's row compared: 'tou 0.0002 (runner-up), ft 5e-05'; each task's for a pooled row."""
    methods = {s: pair for _, s, pair, *_ in CLAIMS}.get(statement)
    if methods is None:  # claim (f): every merged run, whatever its rate
        return ''

    def one(name: str) -> str:
        runs = by_task[name]
        lrs = [(m, runs.lr[runs.method == m]) for m in methods]
        return ', '.join(f'{m} {lr.iloc[0]:g}' + ' (runner-up)' * (m in substituted.get(name, ()))
                         for m, lr in lrs if len(lr))

    if task != 'pooled':
        return one(task)
    return '; '.join(f'{name}: {one(name)}' for name in by_task)
