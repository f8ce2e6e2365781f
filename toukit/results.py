"""Run records: one JSON per run, written atomically, and `load_runs()` turning a folder of them into a table.

A record reads:
    {"run": {"id", "created", "config"}, "status": "ok" | "diverged" | "failed" | "interrupted" | "running",
     "error": ...,
     "metrics": {"epochs": [{epoch, val_accuracy, val_loss, test_accuracy, test_loss, train_loss, train_seconds,
                             data_seconds}, ...],
                 "steps": [{step, epoch, loss}, ...],
                 "final": {val_accuracy, test_accuracy, test_predictions, test_labels, val_predictions,
                           val_labels, merge, merged_*, ...}},
     "cost": {"train_seconds", "data_seconds", "factorize_seconds", "peak_memory_mib", "train_memory_mib",
              "memory_kind", "trainable_params", "total_params", "num_workers"},
     "env": {"toukit", "git_sha", "torch", "python", "device", "platform"}}

A run's id (`toukit.config.run_id`) is readable and unique: `{preset}_{method}_lr{lr}_s{seed}_{hash}`, the hash
over every config field that changes the result. A sweep (`toukit.sweep`) writes a manifest `<preset>.sweep.json`
beside the records naming the runs of each protocol; `load_runs` reads it (`read_manifest`) into the `protocol`
column.
"""
import datetime as _dt
import functools
import json
import os
import platform
import socket
import subprocess
import tempfile
import warnings
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import pandas as pd
import torch

from .runstate import process_alive
from .methods import method_label, method_names

__all__ = ['write_record', 'redo_path', 'read_record', 'read_manifest', 'finished_record', 'load_runs', 'history',
           'environment', 'now', 'table1', 'format_table1', 'write_tables', 'records_by_method', 'with_protocol',
           'missing_runs', 'runs_by_task', 'diverged_runs', 'PAPER_TABLE1', 'MANIFEST_SUFFIX']

MANIFEST_SUFFIX = '.sweep.json'
FINISHED = ('ok', 'diverged')  # a run's final statuses: the sweep makes neither again


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec='seconds')


@functools.lru_cache(maxsize=None)
def _git_sha() -> str:
    """The commit of the source this process imported (read once, so later commits do not relabel its runs)."""
    try:
        here = Path(__file__).resolve().parent
        return subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=here, capture_output=True, text=True,
                              timeout=5).stdout.strip() or 'unknown'
    except (OSError, subprocess.SubprocessError):
        return 'unknown'


def _version() -> str:
    try:
        return version('toukit')
    except PackageNotFoundError:
        return 'not installed'


def environment(device: str = 'cpu') -> dict:
    """toukit version, git sha, torch and Python versions, device name and CPU count."""
    name = torch.cuda.get_device_name(0) if device.startswith('cuda') and torch.cuda.is_available() else (
        f'cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)')
    return dict(toukit=_version(), git_sha=_git_sha(), torch=torch.__version__, python=platform.python_version(),
                device=name, platform=platform.platform())


def write_record(record: dict, path: Union[str, Path]) -> Path:
    """Write `record` as JSON to `path` atomically (a temporary file renamed over it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix='.tmp')
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes it private; a record is for everyone who can read the folder
        with os.fdopen(fd, 'w') as f:
            json.dump(record, f, indent=1, default=str)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _read_json(path: Union[str, Path]) -> dict:
    with open(path) as f:
        return json.load(f)


def read_record(path: Union[str, Path]) -> dict:
    """The run record at `path`."""
    return _read_json(path)


def read_manifest(path: Union[str, Path]) -> dict:
    """The sweep manifest at `path` (`<preset>.sweep.json`, `<preset>.ranks.sweep.json`)."""
    return _read_json(path)


def redo_path(record_path: Path) -> Path:
    """Where a redo writes its record until it finishes (beside the finished record it will replace; `load_runs`
    reads only *.json)."""
    return record_path.with_name(record_path.name + '.redo')


def finished_record(path: Union[str, Path]) -> Optional[dict]:
    """The record at `path` if its run finished (status 'ok', or 'diverged': its loss became non-finite, a result
    of its learning rate), else None; a file there that cannot be read is reported by name (a warning) and counts
    as not done, so the run is made again rather than the command failing."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        record = read_record(path)
    except (OSError, ValueError) as e:
        warnings.warn(f'{path}: unreadable run record ({type(e).__name__}: {e}); the run will be made again')
        return None
    return record if record.get('status') in FINISHED else None


def _status(record: dict) -> Optional[str]:
    """The record's status; 'interrupted' for a 'running' record whose process (on this host) is gone."""
    status, env = record.get('status'), record.get('env', {})
    if status == 'running' and env.get('pid') and env.get('host') == socket.gethostname():
        if not process_alive(env['pid']):
            return 'interrupted'
    return status


def _row(record: dict, path: Path) -> dict:
    config = record['run']['config']
    final = record.get('metrics', {}).get('final', {})
    cost = record.get('cost', {})
    return dict(
        run_id=record['run']['id'], status=_status(record), method=config.get('method'),
        preset=config.get('preset'), model=config.get('model'), dataset=config.get('dataset'),
        seed=config.get('seed'), split_seed=config.get('split_seed'), rank=str(config.get('rank')),
        noise_scale=config.get('noise_scale'), targets=str(config.get('targets')), epochs=config.get('epochs'),
        batch_size=config.get('batch_size'), lr=config.get('lr'), val_accuracy=final.get('val_accuracy'),
        test_accuracy=final.get('test_accuracy'), best_val_accuracy=final.get('best_val_accuracy'),
        merged_val_accuracy=final.get('merged_val_accuracy'), merged_test_accuracy=final.get('merged_test_accuracy'),
        merged_max_abs_logit_diff=final.get('merged_max_abs_logit_diff'), merge=final.get('merge'),
        trainable_params=cost.get('trainable_params'), total_params=cost.get('total_params'),
        train_seconds=cost.get('train_seconds'), data_seconds=cost.get('data_seconds'),
        factorize_seconds=cost.get('factorize_seconds'), peak_memory_mib=cost.get('peak_memory_mib'),
        train_memory_mib=cost.get('train_memory_mib'), memory_kind=cost.get('memory_kind'),
        inference_seconds=final.get('inference_seconds'), device=record.get('env', {}).get('device'),
        created=record['run'].get('created'), error=record.get('error'), path=str(path),
    )


def _protocols(manifests) -> dict:
    """run id -> the protocols ('grid', 'tuned', 'paper') and stages ('runner_up') sweep manifests list it under."""
    out = {}
    for manifest in manifests:
        for protocol, by_method in manifest.get('runs', {}).items():
            for ids in by_method.values():
                for i in ids:
                    out.setdefault(i, set()).add(protocol)
    return out


def load_runs(path: Union[str, Path] = 'results', status: Union[str, None] = None) -> pd.DataFrame:
    """One row per run record (*.json) under `path`; unreadable files are skipped with a warning.

    Args:
        path: a folder (searched recursively) or a single record.
        status: keep only records with this status ('ok', 'failed'); None keeps all.

    Returns:
        A DataFrame (see `_row` for its columns) with a `protocol` column: the protocols of the sweep manifests
        (`*.sweep.json`) found under `path` that list the run, joined by '+' in the order grid, tuned, runner_up, paper
        (e.g. 'grid+paper'), or '' for a run of no sweep. `df.attrs['skipped']` lists skipped files and why;
        `df.attrs['manifests']` holds the manifests, for `missing_runs`.
    """
    path = Path(path)
    if not path.exists():
        raise ValueError(f'path={str(path)!r}: no such file or folder of run records')
    files = [path] if path.is_file() else sorted(path.rglob('*.json'))
    rows, skipped, manifests = [], [], []
    for f in files:
        try:
            if f.name.endswith(MANIFEST_SUFFIX):
                manifests.append(read_manifest(f))
            else:
                rows.append(_row(read_record(f), f))
        except (OSError, ValueError, KeyError, TypeError) as e:
            skipped.append(f'{f}: {type(e).__name__}: {e}')
    if skipped:
        warnings.warn(f'load_runs skipped {len(skipped)} file(s): ' + '; '.join(skipped[:5]))
    df = pd.DataFrame(rows)
    if not df.empty:
        protocols = _protocols(manifests)
        order = {'grid': 0, 'tuned': 1, 'runner_up': 2, 'paper': 3}
        df['protocol'] = df.run_id.map(lambda i: '+'.join(sorted(protocols.get(i, ()), key=lambda p: order.get(p, 4))))
    if status is not None and not df.empty:
        df = df[df.status == status].reset_index(drop=True)
    df.attrs['skipped'] = skipped
    df.attrs['manifests'] = manifests
    return df


def missing_runs(runs: pd.DataFrame, preset: str, protocol: str, methods: Optional[Sequence[str]] = None) -> List[str]:
    """What the sweep manifests of a `load_runs` table plan for `preset` under `protocol` ('grid', 'tuned', 'paper',
    or the stage 'runner_up') that has no finished run in `runs` (status 'ok', or 'diverged': final, as for the
    sweep): run ids, and '<method>: not planned yet' for a method whose tuned (or runner-up) runs wait on its grid (a
    method whose grid chose clearly has no runner-up runs: nothing missing). Empty when the protocol is complete, or
    when no manifest plans it (runs of no sweep: nothing to check).

    Args:
        methods: only these methods' runs (default: every method the manifests list).
    """
    missing = []
    for manifest in runs.attrs.get('manifests', []):
        planned = manifest.get('runs', {})
        if manifest.get('preset') != preset or not isinstance(planned, dict) or protocol not in planned:
            continue
        done = set(runs.run_id[runs.status.isin(FINISHED)]) if len(runs) else set()
        wanted = [m for m in manifest.get('methods', []) if methods is None or m in methods]
        waits_on_grid = planned.get('tuned', {}) if protocol == 'runner_up' else planned[protocol]
        missing += [f'{m}: not planned yet' for m in wanted if not waits_on_grid.get(m)]
        missing += [i for m in wanted for i in planned[protocol].get(m, []) if i not in done]
    return list(dict.fromkeys(missing))  # two manifests of one preset (a copy in a subfolder) list a run once


def with_protocol(runs: pd.DataFrame, protocol: str) -> pd.DataFrame:
    """The successful runs of one protocol ('grid', 'tuned' or 'paper', or the stage 'runner_up') of a `load_runs`
    table."""
    if runs.empty or 'protocol' not in runs:
        return runs.iloc[0:0]
    keep = runs.protocol.str.split('+').map(lambda ps: protocol in ps) & (runs.status == 'ok')
    return runs[keep].reset_index(drop=True)


def diverged_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs of a `load_runs` table whose loss became non-finite (status 'diverged'), one row each: preset,
    method, lr, seed, protocol, run_id and error (where the loss became non-finite).

    A diverged run is final (a sweep does not make it again) and no table of successful runs (`with_protocol`)
    holds it: a diverged tuned, runner-up or paper run leaves its method's `seeds` there one short; this is the list
    that says which.
    """
    columns = ['preset', 'method', 'lr', 'seed', 'protocol', 'run_id', 'error']
    if runs.empty or 'status' not in runs:
        return pd.DataFrame(columns=columns)
    out = runs.loc[runs.status == 'diverged', columns]
    return out.sort_values(['preset', 'method', 'lr', 'seed'], kind='stable').reset_index(drop=True)


def runs_by_task(runs: pd.DataFrame, protocol: str, tasks: Sequence[str] = ()) -> Dict[str, pd.DataFrame]:
    """task (preset) -> its successful runs of `protocol` (`with_protocol`), from a `load_runs` table of every task:
    the input of the tables across tasks (`toukit.claims.pooled_claims`, `toukit.gap`, `toukit.method_table`).

    Args:
        runs: a `load_runs` table.
        protocol: 'grid', 'tuned' or 'paper'.
        tasks: the presets, in the order the tables show them (one name or several); empty: every preset in
            `runs`, sorted. A task without runs of `protocol` maps to an empty table (its rows: not measured).
    """
    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    present = sorted(set(runs.preset)) if len(runs) else []
    return {t: with_protocol(runs[runs.preset == t], protocol) if t in present else runs.iloc[0:0]
            for t in (tasks or present)}


def history(record_or_path, kind: str = 'epochs') -> pd.DataFrame:
    """A record's per-epoch ('epochs') or per-step ('steps') history as a DataFrame."""
    record = read_record(record_or_path) if isinstance(record_or_path, (str, Path)) else record_or_path
    if kind not in ('epochs', 'steps'):
        raise ValueError(f"kind={kind!r}: must be 'epochs' or 'steps'")
    return pd.DataFrame(record['metrics'][kind])


# ---------------------------------------------------------------------------------------------------------------
# tables

PAPER_TABLE1 = pd.DataFrame([  # the TOU paper's Table 1: ViT-B/16 on CIFAR-100, RTX 4070 Ti, 12 epochs
    dict(method='ft', trainable_m=85.55, total_m=85.55, accuracy=92.06, train_seconds=2 * 3600 + 33 * 60,
         memory_mib=11982),
    dict(method='lora', trainable_m=0.59, total_m=86.47, accuracy=89.46, train_seconds=3600 + 13 * 60,
         memory_mib=10976),
    dict(method='tou', trainable_m=24.83, total_m=48.72, accuracy=91.09, train_seconds=53 * 60, memory_mib=9752),
    dict(method='tou_frozen_ffn', trainable_m=11.51, total_m=48.72, accuracy=90.40, train_seconds=52 * 60,
         memory_mib=9408),
])


def _method_order(methods) -> dict:
    order = {m: i for i, m in enumerate(method_names())}
    return {m: order.get(m, len(order)) for m in methods}


def table1(runs: pd.DataFrame) -> pd.DataFrame:
    """The paper's Table 1 from successful run records: one row per method, mean over seeds.

    Pass one protocol's runs (`with_protocol`): every row then holds one learning rate. Columns: method, lr,
    trainable_params, total_params, test_accuracy (mean) and test_accuracy_std, val_accuracy (mean), seeds,
    train_seconds, train_memory_mib, peak_memory_mib, and time_vs_ft / memory_vs_ft (ratios of train seconds and
    of training memory to FT's means, when an FT run is present).
    """
    runs = runs[runs.status == 'ok'] if 'status' in runs else runs
    if runs.empty:
        raise ValueError('no successful runs to tabulate')
    lrs = runs.groupby('method').lr.nunique()
    if (lrs > 1).any():
        raise ValueError(f'methods {list(lrs[lrs > 1].index)} have runs at several learning rates: pass one '
                         f'protocol\'s runs (toukit.results.with_protocol)')
    table = runs.groupby('method').agg(
        lr=('lr', 'first'), trainable_params=('trainable_params', 'first'), total_params=('total_params', 'first'),
        test_accuracy=('test_accuracy', 'mean'), test_accuracy_std=('test_accuracy', 'std'),
        val_accuracy=('val_accuracy', 'mean'), seeds=('seed', 'nunique'), train_seconds=('train_seconds', 'mean'),
        train_memory_mib=('train_memory_mib', 'mean'), peak_memory_mib=('peak_memory_mib', 'mean')).reset_index()
    table = table.sort_values('method', key=lambda s: s.map(_method_order(s))).reset_index(drop=True)
    if 'ft' in set(table.method):
        ft = table[table.method == 'ft'].iloc[0]
        table['time_vs_ft'] = table.train_seconds / ft.train_seconds
        table['memory_vs_ft'] = table.train_memory_mib / ft.train_memory_mib
    return table


def format_table1(table: pd.DataFrame) -> pd.DataFrame:
    """Table 1 with the paper's columns and units, ready to print."""
    acc = (table.test_accuracy * 100).map('{:.2f}'.format)
    if table.seeds.max() > 1:
        acc = acc + (table.test_accuracy_std.fillna(0) * 100).map(' ± {:.2f}'.format)
    out = pd.DataFrame({'Method': table.method.map(method_label),
                        'lr': table.lr.map('{:g}'.format),
                        'Trainable params (M)': (table.trainable_params / 1e6).round(2),
                        'Total params (M)': (table.total_params / 1e6).round(2),
                        'Test accuracy (%)': acc,
                        'Seeds': table.seeds,
                        'Train time (s)': table.train_seconds.round(0).astype(int),
                        'Training memory (MiB)': table.train_memory_mib.round(0).astype(int),
                        'Peak memory (MiB)': table.peak_memory_mib.round(0).astype(int)})
    if 'time_vs_ft' in table:
        out['Time / FT'] = table.time_vs_ft.round(2)
        out['Training memory / FT'] = table.memory_vs_ft.round(2)
    return out


def write_tables(table: pd.DataFrame, stem: Union[str, Path]) -> list:
    """Write `table` as stem.csv, stem.md and stem.tex; returns the paths."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_suffix('.csv'), stem.with_suffix('.md'), stem.with_suffix('.tex')]
    table.to_csv(paths[0], index=False)
    paths[1].write_text(table.to_markdown(index=False) + '\n')
    paths[2].write_text(table.to_latex(index=False, escape=True))
    return paths


def records_by_method(runs: pd.DataFrame) -> dict:
    """method -> list of full run records (for curves), from a load_runs() table, in the registry's method order."""
    order = _method_order(set(runs.method))
    out = {}
    for row in sorted(runs.itertuples(), key=lambda r: (order[r.method], r.seed)):
        out.setdefault(row.method, []).append(read_record(row.path))
    return out
