"""What a run measures and how: the synchronising timer, peak memory and the memory the training steps add.

Training runs (`toukit.train`) and the benchmarks (`benchmarks/bench.py`) both measure with these, so a record's
cost fields and a benchmark's ratios share one definition (`MEMORY_DEFINITIONS`, written into every record).
"""
import contextlib
import os
import resource
import threading
import time
from typing import Iterator, List

import torch

__all__ = ['MEMORY_DEFINITIONS', 'MemoryMeter', 'rss_mib', 'peak_mib', 'allocated_mib', 'reset_peak',
           'peak_since_reset_mib', 'synchronize', 'timed']

MEMORY_DEFINITIONS = {
    'cuda_max_allocated': dict(
        peak_memory_mib='the most CUDA memory allocated at any point of the run (building and preparing the model, '
                        'training, evaluation, merge; torch.cuda.max_memory_allocated), over every resumed segment',
        train_memory_mib='the most CUDA memory allocated during the training steps above what was allocated just '
                         'before the first (the model prepared, no optimizer state yet): gradients, optimizer state, '
                         'activations; over every resumed segment'),
    'process_peak_rss': dict(
        peak_memory_mib="the process's peak resident set size over the run (building and preparing the model, "
                        'training, evaluation, merge; getrusage ru_maxrss), over every resumed segment',
        train_memory_mib='the peak RSS sampled during the training steps above the RSS just before the first (the '
                         'model prepared, no optimizer state yet): gradients, optimizer state, activations; over '
                         'every resumed segment'),
}


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU), so a clock read after it covers that work."""
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def timed(device: torch.device) -> Iterator[List[float]]:
    """Seconds of the block's work on `device`, synchronised at both ends: `with timed(d) as t: ...; t[0]`."""
    synchronize(device)
    elapsed = [0.0]
    t0 = time.perf_counter()
    try:
        yield elapsed
    finally:
        synchronize(device)
        elapsed[0] = time.perf_counter() - t0


def rss_mib() -> float:
    """The process's resident set size now, in MiB (Linux /proc; 0 where it cannot be read)."""
    try:
        with open('/proc/self/statm') as f:
            return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2 ** 20
    except (OSError, ValueError, IndexError):
        return 0.0


def peak_mib(device: torch.device) -> float:
    """The most memory held so far: the CUDA allocator's peak on a GPU, the process's peak RSS on the CPU."""
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def allocated_mib(device: torch.device) -> float:
    """Memory held now: the CUDA allocator's on a GPU, the process RSS on the CPU."""
    if device.type == 'cuda':
        return torch.cuda.memory_allocated(device) / 2 ** 20
    return rss_mib()


def reset_peak(device: torch.device) -> None:
    """Start a new peak: the CUDA allocator's, or on Linux the process's peak RSS (VmHWM, via clear_refs)."""
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
    except OSError:
        pass  # then the peak is the process's whole life's, model building included: an overestimate


def peak_since_reset_mib(device: torch.device) -> float:
    """The peak since `reset_peak` (on the CPU, VmHWM; the life-long peak where /proc cannot say)."""
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    try:
        with open('/proc/self/status') as f:
            return next(int(line.split()[1]) for line in f if line.startswith('VmHWM:')) / 1024
    except (OSError, StopIteration):
        return peak_mib(device)


class MemoryMeter:
    """Peak memory in MiB, and the part of it the training steps add (`MEMORY_DEFINITIONS`).

    On a GPU: `torch.cuda.max_memory_allocated`; the training window's peak above what was allocated just before the
    first step. On the CPU: the process's peak RSS, and the peak RSS sampled every `interval` seconds during the
    training window above the RSS at its start. The window opens before a resumed run loads its optimizer state, so
    that state counts in it as it does when an uninterrupted run's first step allocates it.
    """

    def __init__(self, device: torch.device, interval: float = 0.005):
        self.device, self.interval = device, interval
        self.kind = 'cuda_max_allocated' if device.type == 'cuda' else 'process_peak_rss'
        self.baseline = self.train_peak = None
        self.before_training = 0.0  # a GPU's peak before its statistics were reset for the training window
        self._stop = threading.Event()
        self._thread = None
        if device.type == 'cuda':
            torch.cuda.reset_peak_memory_stats(device)

    def peak_mib(self) -> float:
        """The most memory the process has held so far (on a GPU, before and during the training window too)."""
        if self.device.type == 'cuda':
            return max(self.before_training, peak_mib(self.device))
        return peak_mib(self.device)

    def start_training(self) -> None:
        """Open the training window: call once the model is ready, before any optimizer state exists."""
        if self.device.type == 'cuda':
            self.before_training = self.peak_mib()
            self.baseline = allocated_mib(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        self.baseline = self.train_peak = rss_mib()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.train_peak = max(self.train_peak, rss_mib())

    def train_mib(self) -> float:
        """The MiB the training window has added over its baseline so far (0 before it opens)."""
        if self.baseline is None:
            return 0.0
        if self.device.type == 'cuda':
            return peak_mib(self.device) - self.baseline
        return max(self.train_peak, rss_mib()) - self.baseline

    def stop_training(self) -> float:
        """Close the training window; the MiB it added."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        return self.train_mib()
