"""The arithmetic of one training step and of one evaluation, shared by a run (`toukit.train`) and the benchmarks:
batches to the device, bf16 autocast, the seeded RNGs, the accelerate engine of a distributed or tracked run."""
import os
import random
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from .meter import timed
from .models import call_model

__all__ = ['set_seed', 'device_of', 'make_engine', 'to_device', 'autocast', 'train_step', 'evaluate']


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def device_of(name: str) -> torch.device:
    """The torch device a config's `device` names ('auto': CUDA when this machine has it, else the CPU)."""
    if name == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    return torch.device(name)


def make_engine(device: str, log_with: Optional[str], trackers_dir: Path, name: str, tracked: dict):
    """A run's accelerate Accelerator, set up in this one place, or None for a plain single process.

    Under `torchrun --nproc_per_node=N` or `accelerate launch` (WORLD_SIZE > 1) it runs DDP with each global batch
    split over the processes; with `log_with` it logs to that tracker under `trackers_dir` (the run `name`, with
    the `tracked` settings). A single process without a tracker trains without it (the same arithmetic).
    """
    if int(os.environ.get('WORLD_SIZE', '1')) == 1 and not log_with:
        return None
    from accelerate import Accelerator  # imported only for a distributed or tracked run: it is slow to import
    from accelerate.utils import DataLoaderConfiguration
    on_cpu = device == 'cpu' or (device == 'auto' and not torch.cuda.is_available())
    engine = Accelerator(cpu=on_cpu, log_with=log_with or None,  # cpu: gloo processes, not a silent one
                         project_dir=str(trackers_dir), dataloader_config=DataLoaderConfiguration(split_batches=True))
    if log_with:
        engine.init_trackers(name, config=tracked)
    return engine


def to_device(batch, device: torch.device):
    """An (inputs, labels) batch on `device`; inputs a tensor or a dict of tensors."""
    inputs, labels = batch
    if isinstance(inputs, dict):
        inputs = {k: v.to(device, non_blocking=True) for k, v in inputs.items()}
    else:
        inputs = inputs.to(device, non_blocking=True)
    return inputs, labels.to(device, non_blocking=True)


def autocast(device: torch.device, precision: str):
    """bf16 autocast for precision 'bf16'; a disabled autocast (fp32) otherwise."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == 'bf16')


def train_step(net: nn.Module, optimizer: torch.optim.Optimizer, inputs, labels: torch.Tensor, precision: str,
               engine=None) -> torch.Tensor:
    """One forward (under `precision`), backward and optimizer step; the loss (the global batch's with `engine`)."""
    with autocast(labels.device, precision):
        loss = F.cross_entropy(call_model(net, inputs).float(), labels)
    optimizer.zero_grad(set_to_none=True)
    if engine is not None:
        engine.backward(loss)
    else:
        loss.backward()
    optimizer.step()
    if engine is not None:  # the global batch's loss: the mean of the processes' equal shares
        loss = engine.reduce(loss.detach(), reduction='mean')
    return loss


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, precision: str = 'fp32',
             engine=None) -> dict:
    """Accuracy, mean loss, the logits and labels (on the CPU) and the seconds it took, of `model` on `loader`.

    With an accelerate `engine` of several processes, each evaluates its shard and the logits and labels of all
    are gathered (`gather_for_metrics`), so every process gets the metrics of the whole set.
    """
    model.eval()
    correct, total, loss_sum, all_logits, all_labels = 0, 0, 0.0, [], []
    with timed(torch.device('cpu')) as seconds:
        for batch in loader:
            inputs, labels = to_device(batch, device)
            with autocast(device, precision):
                logits = call_model(model, inputs).float()
            if engine is not None and engine.num_processes > 1:
                logits, labels = engine.gather_for_metrics((logits.contiguous(), labels))
            loss_sum += F.cross_entropy(logits, labels, reduction='sum').item()
            correct += (logits.argmax(-1) == labels).sum().item()
            total += labels.numel()
            all_logits.append(logits.cpu())
            all_labels.append(labels.cpu())
    return dict(accuracy=correct / max(total, 1), loss=loss_sum / max(total, 1), logits=torch.cat(all_logits),
                labels=torch.cat(all_labels), seconds=seconds[0])
