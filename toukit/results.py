"""Run records: one JSON per run, written atomically, and `load_runs()` turning a folder of them into a table.

A record reads:
    {"run": {"id", "created", "config"}, "status": "ok" | "failed" | "running", "error": ...,
     "metrics": {"epochs": [{epoch, val_accuracy, val_loss, train_loss, train_seconds}, ...],
                 "steps": [{step, epoch, loss}, ...], "final": {...}},
     "cost": {"train_seconds", "factorize_seconds", "peak_memory_mib", "memory_kind", "trainable_params",
              "total_params"},
     "env": {"toukit", "git_sha", "torch", "python", "device", "platform"}}
"""
import datetime as _dt
import json
import os
import platform
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Union

import pandas as pd

__all__ = ['write_record', 'read_record', 'load_runs', 'history', 'environment', 'now', 'main_runs', 'table1',
           'format_table1', 'write_tables', 'records_by_method', 'PAPER_TABLE1']


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec='seconds')


def _git_sha() -> str:
    try:
        here = Path(__file__).resolve().parent
        return subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=here, capture_output=True, text=True,
                              timeout=5).stdout.strip() or 'unknown'
    except (OSError, subprocess.SubprocessError):
        return 'unknown'


def environment(device: str = 'cpu') -> dict:
    """toukit version, git sha, torch and Python versions, device name and CPU count."""
    import torch
    from . import __version__
    name = torch.cuda.get_device_name(0) if device.startswith('cuda') and torch.cuda.is_available() else (
        f'cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)')
    return dict(toukit=__version__, git_sha=_git_sha(), torch=torch.__version__, python=platform.python_version(),
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


def read_record(path: Union[str, Path]) -> dict:
    with open(path) as f:
        return json.load(f)


def _row(record: dict, path: Path) -> dict:
    config = record['run']['config']
    final = record.get('metrics', {}).get('final', {})
    cost = record.get('cost', {})
    return dict(
        run_id=record['run']['id'], status=record.get('status'), method=config.get('method'),
        preset=config.get('preset'), model=config.get('model'), dataset=config.get('dataset'),
        seed=config.get('seed'), rank=str(config.get('rank')), noise_scale=config.get('noise_scale'),
        targets=str(config.get('targets')), epochs=config.get('epochs'), batch_size=config.get('batch_size'),
        lr=config.get('lr'), val_accuracy=final.get('val_accuracy'), best_val_accuracy=final.get('best_val_accuracy'),
        merged_val_accuracy=final.get('merged_val_accuracy'), trainable_params=cost.get('trainable_params'),
        total_params=cost.get('total_params'), train_seconds=cost.get('train_seconds'),
        factorize_seconds=cost.get('factorize_seconds'), peak_memory_mib=cost.get('peak_memory_mib'),
        memory_kind=cost.get('memory_kind'), device=record.get('env', {}).get('device'),
        created=record['run'].get('created'), path=str(path),
    )


def load_runs(path: Union[str, Path] = 'results', status: Union[str, None] = None) -> pd.DataFrame:
    """One row per run record (*.json) under `path`; unreadable files are skipped with a warning.

    Args:
        path: a folder (searched recursively) or a single record.
        status: keep only records with this status ('ok', 'failed'); None keeps all.

    Returns:
        A DataFrame (see `_row` for its columns); `df.attrs['skipped']` lists skipped files and why.
    """
    path = Path(path)
    if not path.exists():
        raise ValueError(f'path={str(path)!r}: no such file or folder of run records')
    files = [path] if path.is_file() else sorted(path.rglob('*.json'))
    rows, skipped = [], []
    for f in files:
        try:
            rows.append(_row(read_record(f), f))
        except (OSError, ValueError, KeyError, TypeError) as e:
            skipped.append(f'{f}: {type(e).__name__}: {e}')
    if skipped:
        warnings.warn(f'load_runs skipped {len(skipped)} file(s): ' + '; '.join(skipped[:5]))
    df = pd.DataFrame(rows)
    if status is not None and not df.empty:
        df = df[df.status == status].reset_index(drop=True)
    df.attrs['skipped'] = skipped
    return df


def history(record_or_path, kind: str = 'epochs') -> pd.DataFrame:
    """A record's per-epoch ('epochs') or per-step ('steps') history as a DataFrame."""
    record = read_record(record_or_path) if isinstance(record_or_path, (str, Path)) else record_or_path
    if kind not in ('epochs', 'steps'):
        raise ValueError(f"kind={kind!r}: must be 'epochs' or 'steps'")
    return pd.DataFrame(record['metrics'][kind])



# ---------------------------------------------------------------------------------------------------------------
# tables

PAPER_TABLE1 = pd.DataFrame([  # the TOU paper's Table 1: ViT-B/16 on CIFAR-100, RTX 4070 Ti, 12 epochs
    dict(method='ft', trainable_m=85.55, total_m=85.55, accuracy=92.06, train_seconds=2 * 3600 + 33 * 60, memory_mib=11982),
    dict(method='lora', trainable_m=0.59, total_m=86.47, accuracy=89.46, train_seconds=3600 + 13 * 60, memory_mib=10976),
    dict(method='tou', trainable_m=24.83, total_m=48.72, accuracy=91.09, train_seconds=53 * 60, memory_mib=9752),
    dict(method='tou_frozen_ffn', trainable_m=11.51, total_m=48.72, accuracy=90.40, train_seconds=52 * 60,
         memory_mib=9408),
])


def main_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs named {preset}_{method}_s{seed} (the method comparison), without study runs such as noise sweeps."""
    if runs.empty:
        return runs
    expected = runs.preset + '_' + runs.method + '_s' + runs.seed.astype(str)
    return runs[(runs.run_id == expected) & (runs.status == 'ok')].reset_index(drop=True)


def table1(runs: pd.DataFrame) -> pd.DataFrame:
    """The paper's Table 1 from run records: one row per method (mean over seeds, with the spread and count).

    Columns: method, trainable_params, total_params, val_accuracy (mean), val_accuracy_std, seeds, train_seconds,
    peak_memory_mib, time_vs_ft and memory_vs_ft (ratios to FT's means, when an FT run is present).
    """
    from .plots import METHOD_ORDER
    runs = main_runs(runs)
    if runs.empty:
        raise ValueError('no successful method runs ({preset}_{method}_s{seed}.json) to tabulate')
    grouped = runs.groupby('method')
    table = grouped.agg(trainable_params=('trainable_params', 'first'), total_params=('total_params', 'first'),
                        val_accuracy=('val_accuracy', 'mean'), val_accuracy_std=('val_accuracy', 'std'),
                        seeds=('seed', 'nunique'), train_seconds=('train_seconds', 'mean'),
                        peak_memory_mib=('peak_memory_mib', 'mean')).reset_index()
    order = {m: i for i, m in enumerate(METHOD_ORDER)}
    table = table.sort_values('method', key=lambda s: s.map(lambda m: order.get(m, len(order)))).reset_index(drop=True)
    if 'ft' in set(table.method):
        ft = table[table.method == 'ft'].iloc[0]
        table['time_vs_ft'] = table.train_seconds / ft.train_seconds
        table['memory_vs_ft'] = table.peak_memory_mib / ft.peak_memory_mib
    return table


def format_table1(table: pd.DataFrame) -> pd.DataFrame:
    """Table 1 with the paper's columns and units, ready to print."""
    from .plots import method_label
    acc = (table.val_accuracy * 100).map('{:.2f}'.format)
    if table.seeds.max() > 1:
        acc = acc + (table.val_accuracy_std.fillna(0) * 100).map(' ± {:.2f}'.format)
    out = pd.DataFrame({'Method': table.method.map(method_label),
                        'Trainable params (M)': (table.trainable_params / 1e6).round(2),
                        'Total params (M)': (table.total_params / 1e6).round(2),
                        'Accuracy (%)': acc,
                        'Train time (s)': table.train_seconds.round(0).astype(int),
                        'Peak memory (MiB)': table.peak_memory_mib.round(0).astype(int)})
    if 'time_vs_ft' in table:
        out['Time / FT'] = table.time_vs_ft.round(2)
        out['Memory / FT'] = table.memory_vs_ft.round(2)
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
    """method -> list of full run records (for curves), from a load_runs() table, in the paper's method order."""
    from .plots import METHOD_ORDER
    order = {m: i for i, m in enumerate(METHOD_ORDER)}
    out = {}
    for row in sorted(runs.itertuples(), key=lambda r: (order.get(r.method, len(order)), r.seed)):
        out.setdefault(row.method, []).append(read_record(row.path))
    return out
