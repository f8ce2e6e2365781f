"""PEFT's LoRA family, prepared through peft itself (no copies of its code): LoRA, PiSSA, DoRA, MiCA, OLoRA, and the
data-driven EVA (the input activations' principal directions) and LoRA-GA (the gradient's singular directions).

Each takes the same rank r on the same targets as LoRA (q, k and v as separate matrices), so the family differs
only in how the factors start and what trains; trainable parameters then differ a little (DoRA adds a magnitude
per output, MiCA trains only A) and every record counts them. Left out: CorDA (peft 0.21.2's `preprocess_corda`
fails on 3-D hidden states: its covariance hook calls `t()`, which takes at most 2 dimensions).
"""
import warnings
from typing import Optional, Sequence

import torch.nn.functional as F
from torch import nn

from .linalg import check_rank
from .models import call_model
from .surgery import split_view
from .targets import Targets, dense_weight, find_targets, get_submodule_parent

__all__ = ['lora', 'pissa', 'dora', 'mica', 'olora', 'eva', 'loraga']


def _lora_targets(model: nn.Module, targets: Targets, rank: int) -> list:
    """`split_view`, then the target names, refused where a LoRA layer could not work: rank too large, or a
    projection nn.MultiheadAttention reads as a matrix."""
    split_view(model)
    found = find_targets(model, targets)
    for name, linear in found.items():
        check_rank(rank, tuple(dense_weight(linear).shape), name)
    bypassed = [n for n in found if isinstance(get_submodule_parent(model, n)[0], nn.MultiheadAttention)]
    if bypassed:
        raise ValueError(f'{bypassed[0]}: nn.MultiheadAttention reads its out_proj weight directly, never calling the '
                         f'module, so a peft LoRA layer there would be bypassed; choose other targets')
    return list(found)


def _config(names: list, rank: int, alpha: Optional[float], dropout: float, **options):
    from peft import LoraConfig  # imported here: ~3 s at import, only the LoRA family uses it
    return LoraConfig(target_modules=names, r=rank, lora_alpha=alpha or rank, lora_dropout=dropout, bias='none',
                      **options)


def _inject(model: nn.Module, config) -> None:
    from peft import inject_adapter_in_model
    with warnings.catch_warnings():  # GPT-2 mixes Conv1D and split nn.Linear targets: peft sets fan_in_fan_out
        warnings.filterwarnings('ignore', message='fan_in_fan_out is set to')  # per layer, and says so each time
        inject_adapter_in_model(config, model)


def _peft_lora(model: nn.Module, rank: int, targets: Targets, alpha: Optional[float], dropout: float,
               **options) -> None:
    _inject(model, _config(_lora_targets(model, targets, rank), rank, alpha, dropout, **options))


def lora(model: nn.Module, rank: int = 8, targets: Targets = 'attention', alpha: Optional[float] = None,
         dropout: float = 0.0) -> None:
    _peft_lora(model, rank, targets, alpha, dropout)


def pissa(model: nn.Module, rank: int = 8, targets: Targets = 'attention', alpha: Optional[float] = None,
          dropout: float = 0.0) -> None:
    _peft_lora(model, rank, targets, alpha, dropout, init_lora_weights='pissa')


def dora(model: nn.Module, rank: int = 8, targets: Targets = 'attention', alpha: Optional[float] = None,
         dropout: float = 0.0) -> None:
    _peft_lora(model, rank, targets, alpha, dropout, use_dora=True)


def mica(model: nn.Module, rank: int = 8, targets: Targets = 'attention', alpha: Optional[float] = None,
         dropout: float = 0.0) -> None:
    _peft_lora(model, rank, targets, alpha, dropout, init_lora_weights='mica')
    for name, p in model.named_parameters():  # peft freezes B in its MiCA variant; say so if a version does not
        if '.lora_B.' in name and p.requires_grad:
            raise RuntimeError(f'MiCA: peft left {name} trainable; this peft version does not freeze B')


def olora(model: nn.Module, rank: int = 8, targets: Targets = 'attention', alpha: Optional[float] = None,
          dropout: float = 0.0) -> None:
    _peft_lora(model, rank, targets, alpha, dropout, init_lora_weights='olora')


def _calibration(method: str, calibration) -> list:
    if calibration is None or isinstance(calibration, dict) or not isinstance(calibration, Sequence) or not calibration:
        raise ValueError(f'{method} starts from the training data: give calibration= a list of training batches '
                         f'(a run takes its first calibration_batches), got {type(calibration).__name__}')
    return list(calibration)


def eva(model: nn.Module, rank: int = 8, targets: Targets = 'attention', alpha: Optional[float] = None,
        dropout: float = 0.0, rho: float = 2.0, calibration=None) -> None:
    """EVA: A starts from the top right singular vectors of each target's input activations on the calibration
    batches (peft's incremental PCA), ranks redistributed by explained variance up to rho * r; B starts at zero.
    Text batches use their attention mask (padding is left out); images use every token."""
    from peft import EvaConfig, get_peft_model, initialize_lora_eva_weights
    batches = _calibration('eva', calibration)
    names = _lora_targets(model, targets, rank)
    text = isinstance(batches[0], dict)
    wrapped = get_peft_model(model, _config(names, rank, alpha, dropout, init_lora_weights='eva',
                                            eva_config=EvaConfig(rho=rho)), low_cpu_mem_usage=True)
    options = {} if text else dict(  # peft's defaults read an attention mask; an image batch is one tensor
        forward_fn=lambda m, x: m(x), prepare_model_inputs_fn=None,
        prepare_layer_inputs_fn=lambda layer_input, _, __: layer_input[0].reshape(-1, layer_input[0].shape[-1]))
    initialize_lora_eva_weights(wrapped, dataloader=batches, show_progress_bar=False, **options)
    del wrapped  # the injected layers live in `model` itself; the wrapper only held it


def loraga(model: nn.Module, rank: int = 8, targets: Targets = 'attention', alpha: Optional[float] = None,
           dropout: float = 0.0, calibration=None) -> None:
    """LoRA-GA: A and B start from the singular vectors of each target weight's gradient, averaged over the
    calibration batches ((inputs, labels), cross-entropy through the new head), and the base weight gives up their
    start so the model starts where it was (peft's `preprocess_loraga`)."""
    from peft import LoraGAConfig, preprocess_loraga
    batches = _calibration('loraga', calibration)
    if not all(isinstance(b, (tuple, list)) and len(b) == 2 for b in batches):
        raise ValueError('loraga needs (inputs, labels) calibration batches: its start is the loss gradient')
    names = _lora_targets(model, targets, rank)
    config = _config(names, rank, alpha, dropout, init_lora_weights='lora_ga', lora_ga_config=LoraGAConfig())

    def train_step():
        for inputs, labels in batches:
            out = call_model(model, inputs)  # a transformers model of the user's returns an output with .logits
            F.cross_entropy(getattr(out, 'logits', out).float(), labels).backward()

    with warnings.catch_warnings():  # peft counts backward calls with full backward hooks, which warn when nothing
        warnings.filterwarnings('ignore', message='Full backward hook is firing')  # before a target needs a gradient
        preprocess_loraga(model, config, train_step)  # each target's mean gradient, read (and dropped) at injection
    _inject(model, config)
