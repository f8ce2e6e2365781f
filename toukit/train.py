"""One training loop for every method: only the method's prepare() differs.

    config = TrainConfig(method='tou')          # the 'demo' preset: MiniLM on BBC News, offline, CPU
    record = run(config)                        # trains, validates each epoch, merges, writes results/<run>.json

AdamW at a constant learning rate (the TOU paper's setting), validation after every epoch, the training loss
every step. The record holds the training wall time (evaluation excluded), the time spent preparing the model
(factorizing, for TOU), peak memory (CUDA max_memory_allocated on a GPU, the process's peak RSS on the CPU) and
parameter counts. Methods that change the architecture are merged back after training and validated again.
"""
import dataclasses
import math
import random
import resource
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from .data import load_dataset, num_classes_of
from .methods import METHODS, apply_method, count_parameters, has_method_layers, merge
from .models import create_model
from .ranks import parse_rank
from .results import environment, now, write_record

__all__ = ['TrainConfig', 'PRESETS', 'resolve_config', 'run', 'evaluate', 'set_seed']

# Presets fill the fields a user leaves as None; any explicit value overrides its preset.
PRESETS: Dict[str, dict] = {
    # offline on 2 CPU cores: the bundled all-MiniLM-L6-v2 on BBC News. rank 0.375 of min(out, in) is the
    # paper's 288/768, i.e. 144 on MiniLM's 384-wide matrices.
    # 64 tokens (headline and lead) keep a 3-epoch run within minutes on 2 cores.
    'demo': dict(model='minilm', dataset='bbc', epochs=3, batch_size=32, lr=5e-5, max_length=64,
                 ranks=dict(tou=0.375, tou_frozen_ffn=0.375, lora=8, pissa=8, delora=32, svfit='energy:0.99')),
    # the TOU paper: ViT-B/16 (ImageNet weights) on CIFAR-100, 12 epochs, batch 64, AdamW 5e-5; needs a GPU
    # and internet for the weights and data
    'paper': dict(model='vit_base_patch16_224', dataset='cifar100', epochs=12, batch_size=64, lr=5e-5,
                  download=True, ranks=dict(tou=288, tou_frozen_ffn=288, lora=8, pissa=8, delora=32,
                                            svfit='energy:0.99')),
    # seconds on a CPU: timm's test_vit on synthetic images (tests and smoke runs)
    'test': dict(model='test_vit', dataset='synthetic', epochs=2, batch_size=16, lr=1e-3, pretrained=False,
                 train_limit=64, val_limit=32, ranks=dict(tou=8, tou_frozen_ffn=8, lora=4, pissa=4, delora=4,
                                                          svfit='energy:0.9')),
}


@dataclass
class TrainConfig:
    """One fine-tuning run. Fields left None come from the preset, then from the method's own defaults."""
    method: str = 'tou'
    preset: str = 'demo'
    model: Optional[str] = None
    dataset: Optional[str] = None
    rank: Union[int, float, str, None] = None  # TOU/SVFit: int, fraction or 'energy:T'; LoRA/PiSSA/DeLoRA: int
    noise_scale: Optional[float] = None  # TOU's alpha
    targets: Union[str, List[str], None] = None  # 'all', 'attention', 'mlp' or module-name patterns
    epochs: Optional[int] = None
    batch_size: Optional[int] = None
    lr: Optional[float] = None
    weight_decay: float = 0.01
    seed: int = 0
    max_length: Optional[int] = None
    train_limit: Optional[int] = None
    val_limit: Optional[int] = None
    max_steps_per_epoch: Optional[int] = None
    pretrained: Optional[bool] = None
    checkpoint: Optional[str] = None
    download: Optional[bool] = None
    data_root: str = 'data'
    device: str = 'auto'
    precision: str = 'fp32'  # or 'bf16' (autocast)
    results_dir: str = 'results'
    run_name: Optional[str] = None  # default: {preset}_{method}_s{seed}
    save_weights: bool = False  # write the merged model's weights next to the record (safetensors)
    num_workers: int = 0
    extra: Dict[str, object] = field(default_factory=dict)  # more method options, e.g. {'svd_method': ...}

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f'method={self.method!r}: unknown; choose one of {", ".join(METHODS)}')
        if self.preset not in PRESETS:
            raise ValueError(f'preset={self.preset!r}: unknown; choose one of {", ".join(PRESETS)}')
        for name in ('epochs', 'batch_size', 'max_length', 'train_limit', 'val_limit', 'max_steps_per_epoch'):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f'{name}={value!r}: must be an int >= 1')
        if self.lr is not None and not (isinstance(self.lr, (int, float)) and 0 < self.lr < math.inf):
            raise ValueError(f'lr={self.lr!r}: must be a positive number')
        if self.noise_scale is not None and not (isinstance(self.noise_scale, (int, float))
                                                 and 0 <= self.noise_scale < math.inf):
            raise ValueError(f'noise_scale={self.noise_scale!r}: must be a finite number >= 0')
        if self.precision not in ('fp32', 'bf16'):
            raise ValueError(f"precision={self.precision!r}: must be 'fp32' or 'bf16'")
        if self.dataset is not None:
            num_classes_of(self.dataset)
        if self.rank is not None:
            policy = parse_rank(self.rank)  # validates; '288' -> 288, '0.375' -> 0.375, 'energy:0.9' stays
            self.rank = str(policy) if policy.needs_spectrum else policy.value

    @property
    def name(self) -> str:
        return self.run_name or f'{self.preset}_{self.method}_s{self.seed}'

    @property
    def record_path(self) -> Path:
        return Path(self.results_dir) / f'{self.name}.json'

    def method_options(self) -> dict:
        """The keyword options this config gives its method (only those the method takes)."""
        takes = METHODS[self.method].defaults
        options = dict(rank=self.rank, noise_scale=self.noise_scale, targets=self.targets, seed=self.seed,
                       **self.extra)
        unknown = set(self.extra) - set(takes)
        if unknown:
            raise ValueError(f'extra={self.extra!r}: method {self.method!r} takes no option {", ".join(unknown)}')
        return {k: v for k, v in options.items() if k in takes and v is not None}


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
    defaults = dict(epochs=3, batch_size=32, lr=5e-5, max_length=128, pretrained=True, download=False)
    for k, v in defaults.items():
        if getattr(config, k) is None and k not in filled:
            filled[k] = v
    return dataclasses.replace(config, **filled)


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


def _forward(model: nn.Module, inputs) -> torch.Tensor:
    return model(**inputs) if isinstance(inputs, dict) else model(inputs)


def _autocast(device: torch.device, precision: str):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == 'bf16')


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, precision: str = 'fp32',
             return_logits: bool = False):
    """(accuracy, mean loss[, logits]) of `model` on `loader`."""
    model.eval()
    correct, total, loss_sum, all_logits = 0, 0, 0.0, []
    for batch in loader:
        inputs, labels = _to(batch, device)
        with _autocast(device, precision):
            logits = _forward(model, inputs).float()
        loss_sum += F.cross_entropy(logits, labels, reduction='sum').item()
        correct += (logits.argmax(-1) == labels).sum().item()
        total += labels.numel()
        if return_logits:
            all_logits.append(logits.cpu())
    out = (correct / max(total, 1), loss_sum / max(total, 1))
    return out + (torch.cat(all_logits),) if return_logits else out


class _Memory:
    """Peak memory in MiB: CUDA's max_memory_allocated on a GPU, else the process's peak resident set size."""

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = 'cuda_max_allocated' if device.type == 'cuda' else 'process_peak_rss'
        if device.type == 'cuda':
            torch.cuda.reset_peak_memory_stats(device)

    def peak_mib(self) -> float:
        if self.device.type == 'cuda':
            return torch.cuda.max_memory_allocated(self.device) / 2 ** 20
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run(config: Optional[TrainConfig] = None, progress: bool = True, **overrides) -> dict:
    """Fine-tune one model with one method and write its run record; returns the record.

    A run that raises leaves a record with status 'failed', the error and the history so far.
    """
    config = resolve_config(config, **overrides)
    device = _device(config.device)
    path = config.record_path
    record = dict(run=dict(id=config.name, created=now(), config=dataclasses.asdict(config)), status='running',
                  metrics=dict(epochs=[], steps=[], final={}), cost={}, env=environment(str(device)))
    try:
        _train(config, device, record, progress, path)
        record['status'] = 'ok'
    except BaseException as e:
        record['status'] = 'failed'
        record['error'] = ''.join(traceback.format_exception_only(type(e), e)).strip()
        record['traceback'] = traceback.format_exc()
        raise
    finally:
        record['finished'] = now()
        write_record(record, path)
    return record


def _train(config: TrainConfig, device: torch.device, record: dict, progress: bool, path: Path) -> None:
    from tqdm.auto import tqdm
    set_seed(config.seed)
    model = create_model(config.model, num_classes_of(config.dataset), pretrained=config.pretrained,
                         checkpoint=config.checkpoint, seed=config.seed)
    data = load_dataset(config.dataset, model, root=config.data_root, seed=config.seed, max_length=config.max_length,
                        train_limit=config.train_limit, val_limit=config.val_limit, download=config.download)
    generator = torch.Generator().manual_seed(config.seed)
    train_loader = DataLoader(data.train, batch_size=config.batch_size, shuffle=True, generator=generator,
                              num_workers=config.num_workers, pin_memory=device.type == 'cuda')
    val_loader = DataLoader(data.val, batch_size=config.batch_size * 2, num_workers=config.num_workers)

    model.to(device)
    memory = _Memory(device)
    t0 = time.perf_counter()
    apply_method(model, config.method, **config.method_options())
    if device.type == 'cuda':
        torch.cuda.synchronize()
    factorize_seconds = time.perf_counter() - t0  # new layers are built on their weights' device
    trainable, total = count_parameters(model)
    record['cost'].update(trainable_params=trainable, total_params=total, factorize_seconds=factorize_seconds,
                          memory_kind=memory.kind)
    record['data'] = dict(train_size=len(data.train), val_size=len(data.val), classes=data.classes)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)  # constant lr
    steps_per_epoch = len(train_loader) if config.max_steps_per_epoch is None else min(
        len(train_loader), config.max_steps_per_epoch)
    step, train_seconds = 0, 0.0
    metrics = record['metrics']
    for epoch in range(1, config.epochs + 1):
        model.train()
        bar = tqdm(total=steps_per_epoch, desc=f'{config.method} epoch {epoch}/{config.epochs}', disable=not progress,
                   leave=False)
        losses = []
        if device.type == 'cuda':
            torch.cuda.synchronize()
        t_epoch = time.perf_counter()
        for i, batch in enumerate(train_loader):
            if i >= steps_per_epoch:
                break
            inputs, labels = _to(batch, device)
            with _autocast(device, config.precision):
                loss = F.cross_entropy(_forward(model, inputs).float(), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            losses.append(loss.item())
            if not math.isfinite(losses[-1]):
                raise FloatingPointError(f'training loss is {losses[-1]} at step {step} (epoch {epoch})')
            metrics['steps'].append(dict(step=step, epoch=epoch, loss=losses[-1]))
            bar.set_postfix(loss=f'{losses[-1]:.4f}')
            bar.update()
        if device.type == 'cuda':
            torch.cuda.synchronize()
        epoch_seconds = time.perf_counter() - t_epoch
        train_seconds += epoch_seconds
        bar.close()
        val_accuracy, val_loss, logits = evaluate(model, val_loader, device, config.precision, return_logits=True)
        metrics['epochs'].append(dict(epoch=epoch, step=step, train_loss=float(np.mean(losses)), val_loss=val_loss,
                                      val_accuracy=val_accuracy, train_seconds=epoch_seconds))
        record['cost'].update(train_seconds=train_seconds, peak_memory_mib=memory.peak_mib())
        write_record(record, path)  # a partial record after every epoch: a dead run loses at most one epoch
        if progress:
            print(f'epoch {epoch}: train loss {np.mean(losses):.4f}  val loss {val_loss:.4f}  '
                  f'val accuracy {val_accuracy:.4f}  ({epoch_seconds:.1f}s)')

    final = dict(val_accuracy=metrics['epochs'][-1]['val_accuracy'], val_loss=metrics['epochs'][-1]['val_loss'],
                 best_val_accuracy=max(e['val_accuracy'] for e in metrics['epochs']), steps=step)
    if has_method_layers(model):
        # merge back into the original architecture and check nothing changed against the last validation
        merge(model)
        merged_accuracy, _, merged_logits = evaluate(model, val_loader, device, config.precision, return_logits=True)
        final.update(merged_val_accuracy=merged_accuracy, merged_params=count_parameters(model)[1],
                     merged_max_abs_logit_diff=float((merged_logits - logits).abs().max()))
    metrics['final'] = final
    if config.save_weights:
        from safetensors.torch import save_model
        merge(model)  # a no-op when already merged (or never prepared: ft, bitfit)
        save_model(model, str(path.with_suffix('.safetensors')))
