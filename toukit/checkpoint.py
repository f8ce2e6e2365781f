"""Checkpoints that let a killed run continue exactly, and locks that keep two processes off one run.

A run's checkpoint lives next to its record, `results/<run id>.ckpt/`:
    params-<step>.safetensors   the trainable parameters (everything else is rebuilt, deterministically, from
                                the config: the pretrained weights, the seeded head, the factorization)
    state.pt                    the optimizer state, the step, the epoch and the step within it, every RNG state
                                (Python, NumPy, torch, CUDA), the data order's generator state at the start of the
                                epoch in progress, the metrics so far, and the run's id and config
`state.pt` is written last, atomically, and names its parameters file: it is the commit point, so a process killed
while writing leaves the previous checkpoint whole. A successful run deletes its checkpoint.

The lock `results/<run id>.lock` holds the owner's host and pid; a second process refuses the run while the owner
lives, and takes the lock over from a dead one.
"""
import json
import os
import random
import socket
from pathlib import Path
from typing import Optional

import numpy as np
import torch

__all__ = ['checkpoint_dir', 'save_checkpoint', 'load_checkpoint', 'has_checkpoint', 'remove_checkpoint',
           'checkpoint_problem', 'can_resume',
           'RunLock', 'RunLockedError', 'lock_owner', 'process_alive', 'rng_states', 'set_rng_states']


class RunLockedError(RuntimeError):
    """Another live process is running the same run."""


def checkpoint_dir(record_path: Path) -> Path:
    return Path(record_path).with_suffix('.ckpt')


def has_checkpoint(record_path: Path) -> bool:
    return (checkpoint_dir(record_path) / 'state.pt').exists()


def rng_states() -> dict:
    states = dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state())
    if torch.cuda.is_available():
        states['cuda'] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    random.setstate(states['python'])
    np.random.set_state(states['numpy'])
    torch.set_rng_state(states['torch'])
    if 'cuda' in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states['cuda'])


def save_checkpoint(record_path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> Path:
    """Write the trainable parameters and `state` (plus the optimizer's) atomically; returns the folder."""
    from safetensors.torch import save_file
    folder = checkpoint_dir(record_path)
    folder.mkdir(parents=True, exist_ok=True)
    params_name = f'params-{state["step"]}.safetensors'
    params = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    tmp = folder / (params_name + '.tmp')
    save_file(params, str(tmp))
    os.replace(tmp, folder / params_name)
    tmp = folder / 'state.pt.tmp'
    torch.save(dict(state, params_file=params_name, optimizer=optimizer.state_dict()), tmp)
    os.replace(tmp, folder / 'state.pt')  # the commit point
    for old in folder.glob('params-*.safetensors'):
        if old.name != params_name:
            old.unlink(missing_ok=True)
    return folder


def load_checkpoint(record_path: Path, identity: dict, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer) -> dict:
    """Load the checkpoint of `record_path` into `model` and `optimizer`; returns its state.

    Raises:
        ValueError: no checkpoint, an unreadable one (named), or one made by a different configuration (method,
            rank, model, ...: its identity differs from `identity`).
    """
    folder = checkpoint_dir(record_path)
    if not (folder / 'state.pt').exists():
        raise ValueError(f'resume: no checkpoint at {folder}; run without resume to start this run')
    try:
        state, params = _read(folder)
    except Exception as e:  # noqa: BLE001 - any unreadable file is reported by name
        raise ValueError(f'resume: the checkpoint {folder} is unreadable ({type(e).__name__}: {e}); delete it to '
                         f'start over') from None
    if state.get('identity') != identity:
        theirs, ours = state.get('identity') or {}, identity
        diff = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
        raise ValueError(f'resume: the checkpoint {folder} was made by a different configuration (differs in '
                         f'{", ".join(diff)}); refusing to load it')
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(trainable) != set(params):
        missing, extra = sorted(set(trainable) - set(params)), sorted(set(params) - set(trainable))
        raise ValueError(f'resume: the checkpoint {folder} holds other trainable parameters than the model '
                         f'(missing: {missing[:5]}, unexpected: {extra[:5]})')
    with torch.no_grad():
        for name, p in trainable.items():
            p.copy_(params[name])
    optimizer.load_state_dict(state['optimizer'])
    return state


def _read(folder: Path):
    """(state, trainable parameters) of a checkpoint folder."""
    from safetensors.torch import load_file
    state = torch.load(folder / 'state.pt', map_location='cpu', weights_only=False)
    return state, load_file(str(folder / state['params_file']))


def checkpoint_problem(record_path: Path) -> Optional[str]:
    """Why the run's checkpoint cannot be resumed from ('<folder> is unreadable (...)'), or None if it reads."""
    folder = checkpoint_dir(record_path)
    try:
        _read(folder)
    except Exception as e:  # noqa: BLE001 - any unreadable file is reported by name
        return f'{folder} is unreadable ({type(e).__name__}: {e})'
    return None


def can_resume(record_path: Path, report=print) -> bool:
    """Whether the run has a readable checkpoint; an unreadable one is reported by name and removed (the run
    then starts over), so one corrupt file never stops a sweep."""
    if not has_checkpoint(record_path):
        return False
    problem = checkpoint_problem(record_path)
    if problem:
        report(f'{problem}: removing it; the run starts over')
        remove_checkpoint(record_path)
        return False
    return True


def remove_checkpoint(record_path: Path) -> None:
    folder = checkpoint_dir(record_path)
    if folder.exists():
        for f in folder.iterdir():
            f.unlink(missing_ok=True)
        folder.rmdir()


def process_alive(pid: int) -> bool:
    """Whether process `pid` of this host runs (a zombie, dead but not yet reaped by its parent, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()[0] != 'Z'
    except (OSError, IndexError):  # no /proc (macOS): trust the signal
        return True


def lock_owner(record_path: Path) -> Optional[dict]:
    """The owner ({'host', 'pid'}) of the run's lock while it may be running: None without a lock, or when its owner
    was a process of this host that is gone. An owner on another host cannot be checked and counts as running."""
    path = Path(record_path).with_suffix('.lock')
    try:
        owner = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        owner = {}  # being written, or unreadable: someone holds it
    if owner.get('host') == socket.gethostname() and owner.get('pid') and not process_alive(owner['pid']):
        return None
    return owner


class RunLock:
    """An exclusive lock on one run, `<record>.lock`, that a dead owner does not hold forever."""

    def __init__(self, record_path: Path):
        self.path = Path(record_path).with_suffix('.lock')
        self.owned = False

    def __enter__(self) -> 'RunLock':
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = dict(host=socket.gethostname(), pid=os.getpid())
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = lock_owner(self.path)
                if owner is None:
                    self.path.unlink(missing_ok=True)  # its owner died: take it over
                    continue
                raise RunLockedError(f'{self.path.stem}: already running (lock {self.path} held by pid '
                                     f'{owner.get("pid")} on {owner.get("host")}); wait for it, or delete the lock '
                                     f'if that process is gone') from None
            with os.fdopen(fd, 'w') as f:
                json.dump(me, f)
            self.owned = True
            return self
        raise RunLockedError(f'{self.path}: could not take the lock')

    def __exit__(self, *exc) -> None:
        if self.owned:
            self.path.unlink(missing_ok=True)
            self.owned = False
