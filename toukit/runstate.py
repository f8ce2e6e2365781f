"""A run's state on disk: the checkpoints that let a killed run continue exactly, and the locks that keep two
processes off one run.

A run's checkpoint lives next to its record, `results/<run id>.ckpt/`:
    tensors-<step>.safetensors  everything training changes in the model: the trainable parameters and every
                                buffer (BatchNorm's running statistics among them); the rest is rebuilt,
                                deterministically, from the config (the pretrained weights, the seeded head, the
                                factorization)
    optimizer-<step>.pt         the optimizer's state
    state.pt                    the `RunState` (step, epoch and step within it, times, memory, metrics, the data
                                order's generator at the start of the epoch in progress, every RNG state: Python,
                                NumPy, torch, CUDA) and the run's identity
`state.pt` is written last, atomically, and names the other two files: it is the commit point, so a process killed
while writing leaves the previous checkpoint whole. A successful run deletes its checkpoint.

accelerate's `save_state` / `load_state` is not used: it saves the whole model (a TOU model's frozen factors and
every frozen pretrained weight, which the config rebuilds exactly), and it needs an `Accelerator`, which a plain
single-process run does not create. The optimizer is loaded apart from the model (`load_optimizer`) so that a
resumed run allocates its state inside the training-memory window, as an uninterrupted run's first step does.

The lock `results/<run id>.lock` is an flock (released by the kernel when its process dies, however it dies) on a
file naming the owner's host and pid; a second process refuses the run while the owner lives.
"""
import contextlib
import dataclasses
import fcntl
import json
import os
import random
import signal
import socket
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from safetensors.torch import load_file, save_file

__all__ = ['RunState', 'checkpoint_dir', 'save_checkpoint', 'read_checkpoint', 'restore_model', 'load_optimizer',
           'has_checkpoint', 'remove_checkpoint',
           'checkpoint_problem', 'can_resume',
           'RunLock', 'RunLockedError', 'lock_owner', 'process_alive', 'rng_states', 'set_rng_states',
           'sigterm_as_interrupt', 'sigterm_deferred', 'say_checkpoint']


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


@dataclass
class RunState:
    """What a run has done so far: the one object a checkpoint writes and a resume reads, and that the record's cost
    fields are written from (`cost_fields`), so an interrupted and an uninterrupted run report alike."""
    created: str
    step: int = 0
    epoch: int = 1  # the epoch in progress (epochs + 1 once every epoch is done)
    step_in_epoch: int = 0  # its steps already done
    train_seconds: float = 0.0  # the finished epochs' training steps (waiting for data excluded)
    data_seconds: float = 0.0  # the finished epochs' waits for data
    epoch_seconds: float = 0.0  # the same for the epoch in progress, so far
    epoch_data: float = 0.0
    train_memory_mib: float = 0.0  # the most memory the training steps added, over every segment of the run
    peak_memory_mib: float = 0.0  # the most memory the process held, over every segment of the run
    metrics: dict = field(default_factory=lambda: dict(epochs=[], steps=[], final={}))
    resumed: List[dict] = field(default_factory=list)
    generator: Optional[torch.Tensor] = None  # the data order's generator at the start of the epoch in progress
    rng: Optional[dict] = None  # every RNG's state at the checkpoint

    def cost_fields(self) -> Dict[str, float]:
        return dict(train_seconds=self.train_seconds, data_seconds=self.data_seconds,
                    train_memory_mib=self.train_memory_mib, peak_memory_mib=self.peak_memory_mib)


def _training_tensors(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """The tensors training changes: trainable parameters and every buffer, by name."""
    tensors = {n: p for n, p in model.named_parameters() if p.requires_grad}
    tensors.update(model.named_buffers())
    return tensors


def save_checkpoint(record_path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: RunState,
                    identity: dict) -> Path:
    """Write the model's trainable parameters and buffers, the optimizer and `state` atomically; returns the folder."""
    folder = checkpoint_dir(record_path)
    folder.mkdir(parents=True, exist_ok=True)
    names = dict(tensors_file=f'tensors-{state.step}.safetensors', optimizer_file=f'optimizer-{state.step}.pt')
    tensors = {n: t.detach().cpu().clone() for n, t in _training_tensors(model).items()}
    tmp = folder / (names['tensors_file'] + '.tmp')
    save_file(tensors, str(tmp))
    os.replace(tmp, folder / names['tensors_file'])
    tmp = folder / (names['optimizer_file'] + '.tmp')
    torch.save(optimizer.state_dict(), tmp)
    os.replace(tmp, folder / names['optimizer_file'])
    tmp = folder / 'state.pt.tmp'
    torch.save(dict(state=dataclasses.asdict(state), identity=identity, **names), tmp)
    os.replace(tmp, folder / 'state.pt')  # the commit point
    for old in folder.iterdir():
        if old.name not in names.values() and old.name != 'state.pt':
            old.unlink(missing_ok=True)
    return folder


def read_checkpoint(record_path: Path, identity: dict) -> Tuple[RunState, Dict[str, torch.Tensor]]:
    """(the run state, the saved tensors by name) of `record_path`'s checkpoint.

    Raises:
        ValueError: no checkpoint, an unreadable one (named), or one made by a different configuration (method,
            rank, model, ...: its identity differs from `identity`).
    """
    folder = checkpoint_dir(record_path)
    if not (folder / 'state.pt').exists():
        raise ValueError(f'resume: no checkpoint at {folder}; run without resume to start this run')
    try:
        saved, tensors = _read(folder)
    except Exception as e:  # noqa: BLE001 - any unreadable file is reported by name
        raise ValueError(f'resume: the checkpoint {folder} is unreadable ({type(e).__name__}: {e}); delete it to '
                         f'start over') from None
    if saved.get('identity') != identity:
        theirs, ours = saved.get('identity') or {}, identity
        diff = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
        raise ValueError(f'resume: the checkpoint {folder} was made by a different configuration (differs in '
                         f'{", ".join(diff)}); refusing to load it')
    return RunState(**saved['state']), tensors


def restore_model(record_path: Path, model: torch.nn.Module, tensors: Dict[str, torch.Tensor]) -> None:
    """Copy a checkpoint's tensors into `model`'s trainable parameters and buffers (they must match by name)."""
    own = _training_tensors(model)
    if set(own) != set(tensors):
        missing, extra = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
        raise ValueError(f'resume: the checkpoint {checkpoint_dir(record_path)} holds other trainable parameters or '
                         f'buffers than the model (missing: {missing[:5]}, unexpected: {extra[:5]})')
    with torch.no_grad():
        for name, t in own.items():
            t.copy_(tensors[name])


def load_optimizer(record_path: Path, optimizer: torch.optim.Optimizer) -> None:
    """Load the checkpoint's optimizer state into `optimizer` (its moments are allocated here)."""
    folder = checkpoint_dir(record_path)
    saved = torch.load(folder / 'state.pt', map_location='cpu', weights_only=False)
    optimizer.load_state_dict(torch.load(folder / saved['optimizer_file'], map_location='cpu', weights_only=False))


def _read(folder: Path):
    """(the saved state dict, the model's saved tensors) of a checkpoint folder; the optimizer file is checked to
    exist, not read."""
    saved = torch.load(folder / 'state.pt', map_location='cpu', weights_only=False)
    if not (folder / saved['optimizer_file']).exists():
        raise FileNotFoundError(folder / saved['optimizer_file'])
    return saved, load_file(str(folder / saved['tensors_file']))


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


def _read_owner(fd: int) -> dict:
    try:
        owner = json.loads(os.pread(fd, 4096, 0) or b'{}')
    except ValueError:  # being written
        owner = {}
    return owner if isinstance(owner, dict) else {}


def _held(fd: int) -> bool:
    """Whether a live process holds the lock file open as `fd`. The check takes a shared flock for an instant, so
    checks never collide with each other, and `RunLock` retries past one."""
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    fcntl.flock(fd, fcntl.LOCK_UN)
    return False


def lock_owner(record_path: Path) -> Optional[dict]:
    """The owner ({'host', 'pid'}) of the run's lock while a live process holds it, else None.

    The lock is an flock on `<run id>.lock`, which the kernel releases when its process dies however it dies, so a
    killed run's lock file is free to take (on another host too, where the folder's file system supports flock; on
    one whose flocks are local to each host, run each run from one host). A lock file this process may not read
    counts as held.
    """
    try:
        fd = os.open(Path(record_path).with_suffix('.lock'), os.O_RDONLY)
    except FileNotFoundError:
        return None
    except OSError:
        return {}
    try:
        owner = _read_owner(fd)
        return owner if _held(fd) else None
    finally:
        os.close(fd)


class RunLock:
    """An exclusive lock on one run, `<record>.lock`: an flock, so a dead owner never holds it."""

    ATTEMPTS, PAUSE = 20, 0.05  # a `lock_owner` check holds the flock for an instant: retry past it

    def __init__(self, record_path: Path):
        self.path = Path(record_path).with_suffix('.lock')
        self.fd = None

    def _refuse(self, owner: dict, why: str = '') -> RunLockedError:
        return RunLockedError(f'{self.path.stem}: already running (lock {self.path} held by pid {owner.get("pid")} '
                              f'on {owner.get("host")}{why}); wait for it')

    def _take(self, fd: int) -> bool:
        """Take the flock on `fd` unless a live owner holds it (then False)."""
        for attempt in range(self.ATTEMPTS):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                if attempt + 1 < self.ATTEMPTS:
                    time.sleep(self.PAUSE)
        return False

    def __enter__(self) -> 'RunLock':
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = dict(host=socket.gethostname(), pid=os.getpid(), flock=True)
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
            except PermissionError as e:
                raise self._refuse({}, f', not writable by this user: {e.strerror}') from None
            try:
                owner = _read_owner(fd)
                if not self._take(fd):
                    raise self._refuse(owner)
                try:
                    current = os.stat(self.path).st_ino
                except FileNotFoundError:
                    current = None
                if current == os.fstat(fd).st_ino:  # not a file its last owner removed as we opened it
                    os.ftruncate(fd, 0)
                    os.pwrite(fd, json.dumps(me).encode(), 0)
                    self.fd = fd
                    return self
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)  # while still holding it: a waiting opener sees a new inode
            os.close(self.fd)
            self.fd = None


@contextlib.contextmanager
def sigterm_as_interrupt():
    """SIGTERM (a scheduler's or `kill`'s) raises KeyboardInterrupt in the main thread, as Ctrl-C does, so the run
    ends the same way: a record that says interrupted, its checkpoint kept, its lock released."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt('SIGTERM')

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def sigterm_deferred():
    """SIGTERM held back inside the block (a run's last record write: whole, and its checkpoint removed only after
    it), delivered when it ends."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})


def say_checkpoint(name: str, record_path: Path, finished: bool) -> None:
    """A run that finds a checkpoint of its own id and is not resuming says so, and how to resume it instead (with
    --redo when a finished record of the run exists, which only a redo replaces)."""
    if not has_checkpoint(record_path):
        return
    redo = ' --redo' if finished else ''
    warnings.warn(f'{name}: a checkpoint of this run is in {checkpoint_dir(record_path)}; this run starts over and '
                  f'replaces it. To continue it instead: toukit train ...{redo} --resume, '
                  f'-p resume True{" -p overwrite True" if finished else ""}, or run(config, resume=True'
                  f'{", overwrite=True" if finished else ""})', stacklevel=3)
