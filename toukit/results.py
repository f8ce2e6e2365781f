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

__all__ = ['write_record', 'read_record', 'load_runs', 'history', 'environment', 'now']


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

