"""Fine-tuning methods: one registry, name -> prepare(model, **options), and `apply_method` / `merge` around it.

A method only prepares a model (replaces layers, sets `requires_grad`); the training loop is shared.
What the task added to the pretrained backbone (its head) trains in every method. `merge` turns any prepared
model back into its original architecture: toukit layers become the dense layers they were built from, peft LoRA
layers merge into theirs, split q/k/v projections fuse again. TOU's preparation is `toukit.tou`, PEFT's LoRA family
`toukit.peft_methods`, module surgery `toukit.surgery`.
"""
import inspect
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

from torch import nn

from . import peft_methods
from .layers import AdapterLinear, DeLoRALinear, SVFitLinear, ToukitLayer, fuse_qkv
from .linalg import check_finite, svd_many
from .ranks import DEFAULT_FRACTION, RankSpec, parse_rank
from .surgery import (check_untouched, describe_preparation, has_method_layers, is_peft_layer, is_prepared,
                      replace_layer, replace_targets, split_view, unchanged_on_error)
from .targets import Targets, dense_weight, find_targets, new_modules, output_projections
from .tou import DEFAULT_NOISE_SCALE, apply_tou

__all__ = ['DEFAULT_NOISE_SCALE', 'METHODS', 'Method', 'apply_method', 'apply_tou', 'merge', 'count_parameters',
           'method_names', 'method_label', 'is_prepared', 'has_method_layers', 'describe_preparation']


def merge(model: nn.Module) -> nn.Module:
    """Turn every factorized or adapted layer back into nn.Linear, in place; returns `model`.

    toukit layers merge to their effective weight; peft's LoRA-family layers merge with peft's `safe_merge`
    (which refuses non-finite weights, as toukit's layers do); split q/k/v projections fuse back. Afterwards
    `model.state_dict()` loads with strict=True into an untouched model of the original architecture.

    Raises:
        ValueError: the model holds bottleneck adapters, which add modules and cannot merge (nothing is changed).
    """
    adapters = [n for n, m in model.named_modules() if isinstance(m, AdapterLinear)]
    if adapters:
        raise ValueError(f'merge: {len(adapters)} bottleneck adapters (first at {adapters[0]}) add computation and '
                         f'cannot merge into the original architecture; deploy the model with them')
    for name, module in list(model.named_modules()):
        if isinstance(module, ToukitLayer):
            replace_layer(model, name, module.merge())
        elif is_peft_layer(module) and hasattr(module, 'get_base_layer'):
            module.merge(safe_merge=True)
            replace_layer(model, name, module.get_base_layer())
    fuse_qkv(model)
    if hasattr(model, 'peft_config') and not any(is_peft_layer(m) for m in model.modules()):
        del model.peft_config  # peft's injection left its config on the model; nothing of peft is left to configure
    for mark in ('toukit_method', 'toukit_ranks', 'toukit_new_modules'):
        if hasattr(model, mark):
            delattr(model, mark)
    return model


def count_parameters(model: nn.Module) -> Tuple[int, int]:
    """(trainable, total) parameter counts; shared tensors are counted once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


# ---------------------------------------------------------------------------------------------------------------
# the registry


@dataclass(frozen=True)
class Method:
    name: str
    prepare: Callable[..., None]
    label: str  # for tables and figures
    description: str
    mergeable: bool = True  # False: the method adds modules, so the trained model keeps them
    # what a run hands the method from the training split, as `calibration`: 'inputs' (the first batches' inputs),
    # 'batches' ((inputs, labels) of the first batches); '' nothing unless asked for (TOU takes inputs if given)
    data: str = ''
    # True for the TOU family, whose preparation may move the starting weights off the pretrained ones (noise,
    # truncation): a run's update summary also measures the update from the prepared start (`start_*` columns,
    # `UpdateBaseline.capture_start`). TOU + residual's start computes W up to rounding; it is measured the same way
    moves_start: bool = False
    defaults: Dict[str, object] = field(default_factory=dict)


METHODS: Dict[str, Method] = {}  # in the order tables and figures show them


def _register(prepare: Callable[..., None], label: str, description: str, mergeable: bool = True,
              data: str = '', moves_start: bool = False) -> None:
    defaults = {k: p.default for k, p in list(inspect.signature(prepare).parameters.items())[1:]}
    METHODS[prepare.__name__] = Method(prepare.__name__, prepare, label, description, mergeable, data, moves_start,
                                       defaults)


def method_names() -> List[str]:
    """The registered methods, in the order tables and figures show them."""
    return list(METHODS)


def method_label(method: str) -> str:
    """A method's display name ('Full TOU' for 'tou'); unknown names are returned as they are."""
    return METHODS[method].label if method in METHODS else method


# ---------------------------------------------------------------------------------------------------------------
# toukit's own preparations (PEFT's LoRA family: toukit.peft_methods)


def ft(model: nn.Module) -> None:
    model.requires_grad_(True)


def tou(model: nn.Module, rank: RankSpec = DEFAULT_FRACTION, targets: Targets = 'all',
        noise_scale: float = DEFAULT_NOISE_SCALE, seed: int = 0, svd_method: str = 'gram', calibration=None,
        chunk: Optional[int] = None) -> None:
    model.requires_grad_(True)
    apply_tou(model, rank=rank, targets=targets, noise_scale=noise_scale, seed=seed, svd_method=svd_method,
              calibration=calibration, chunk=chunk)


def tou_frozen_ffn(model: nn.Module, rank: RankSpec = DEFAULT_FRACTION, targets: Targets = 'all',
                   noise_scale: float = DEFAULT_NOISE_SCALE, seed: int = 0, svd_method: str = 'gram',
                   calibration=None, chunk: Optional[int] = None) -> None:
    model.requires_grad_(True)
    apply_tou(model, rank=rank, targets=targets, noise_scale=noise_scale, freeze_mlp=True, seed=seed,
              svd_method=svd_method, calibration=calibration, chunk=chunk)


def tou_residual(model: nn.Module, rank: RankSpec = DEFAULT_FRACTION, targets: Targets = 'all',
                 noise_scale: float = DEFAULT_NOISE_SCALE, seed: int = 0, svd_method: str = 'gram',
                 chunk: Optional[int] = None) -> None:
    model.requires_grad_(True)
    apply_tou(model, rank=rank, targets=targets, noise_scale=noise_scale, seed=seed, svd_method=svd_method,
              chunk=chunk, residual=True)


def tou_full_rank(model: nn.Module, rank: RankSpec = 1.0, targets: Targets = 'all',
                  noise_scale: float = DEFAULT_NOISE_SCALE, seed: int = 0, svd_method: str = 'gram',
                  chunk: Optional[int] = None) -> None:
    try:
        policy = parse_rank(rank)
    except (TypeError, ValueError):  # a per-layer pattern, or no rank at all
        policy = None
    if policy is None or policy.kind != 'fraction' or policy.value != 1.0:  # the int 1 is a fixed rank of one
        raise ValueError(f'tou_full_rank: rank={rank!r}; this ablation is full TOU at rank 1.0, the fraction (use '
                         f'method tou for another rank)')
    model.requires_grad_(True)
    apply_tou(model, rank=rank, targets=targets, noise_scale=noise_scale, seed=seed, svd_method=svd_method,
              chunk=chunk)


def svfit(model: nn.Module, rank: RankSpec = 'energy:0.99', targets: Targets = 'all') -> None:
    policy = parse_rank(rank)
    split_view(model)
    found = find_targets(model, targets)
    weights = {name: dense_weight(linear).detach() for name, linear in found.items()}
    for name, weight in weights.items():
        check_finite(weight, f'{name}.weight')
    svds = svd_many([w.double() for w in weights.values()], method='exact')
    for (name, linear), svd in zip(found.items(), svds):
        rank_ = policy.resolve(tuple(weights[name].shape), svd[1], name)
        replace_layer(model, name, SVFitLinear.from_linear(linear, rank_, name=name, svd=svd))


def delora(model: nn.Module, rank: int = 32, targets: Targets = 'attention', scaling: float = 1.0,
           seed: int = 0) -> None:
    replace_targets(model, targets, lambda i, name, linear: DeLoRALinear.from_linear(
        linear, rank, scaling=scaling, seed=seed + i, name=name))


def adapter(model: nn.Module, width: int = 16, seed: int = 0) -> None:
    model.requires_grad_(False)
    for i, (name, linear) in enumerate(output_projections(model).items()):
        replace_layer(model, name, AdapterLinear.from_linear(linear, width, seed=seed + i, name=name))


def bitfit(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith('bias'))


# the table, in the order tables and figures show the methods
_register(ft, 'FT', 'full fine-tuning: every parameter trains')
_register(peft_methods.lora, 'LoRA', 'LoRA through peft on the target linears (q, k, v as separate matrices)')
_register(peft_methods.pissa, 'PiSSA', 'PiSSA through peft: LoRA initialised from the top-r singular triplets, '
                                       'residual frozen')
_register(peft_methods.dora, 'DoRA', 'DoRA through peft: LoRA on the direction of each weight and a trained '
                                     'magnitude per output')
_register(peft_methods.mica, 'MiCA', 'MiCA through peft: B frozen at the r minor left singular vectors, A trains '
                                     'from zero')
_register(peft_methods.olora, 'OLoRA', 'OLoRA through peft: LoRA initialised from a QR decomposition of the weight, '
                                       'residual frozen')
_register(peft_methods.eva, 'EVA', 'EVA through peft: A from the principal directions of the inputs on training '
                                   'batches, ranks redistributed by explained variance', data='inputs')
_register(peft_methods.loraga, 'LoRA-GA', "LoRA-GA through peft: A and B from the loss gradient's singular "
                                          'directions on training batches, residual frozen', data='batches')
_register(tou, 'Full TOU', 'full TOU: truncated-SVD factors of attention and MLP, A frozen, B and all other '
                           'parameters train', moves_start=True)
_register(tou_frozen_ffn, 'TOU frozen FFN', 'TOU frozen FFN: like tou, but nothing in the factorized MLP trains',
          moves_start=True)
_register(tou_residual, 'TOU + residual', 'ablation: full TOU with the truncation residual W - A B kept frozen '
                                          '(the start computes W; B still moves in the top-r left subspace only)',
          moves_start=True)
_register(tou_full_rank, 'Full-rank TOU', "ablation: full TOU at rank 1.0 (no truncation; the start is W plus TOU's "
                                          'noise; the update is unrestricted for out <= in, bounded by the column '
                                          'space of W for a tall matrix)', moves_start=True)
_register(svfit, 'SVFit', 'SVFit: only the top-r singular values of each target train (r by energy threshold by '
                          'default)')
_register(delora, 'DeLoRA', 'DeLoRA: frozen random factors with a trainable r x r core, started at zero')
_register(adapter, 'Adapter', 'bottleneck adapters (Houlsby) after every attention and MLP output projection',
          mergeable=False)
_register(bitfit, 'BitFit', 'BitFit: only the biases (and the head) train')


def apply_method(model: nn.Module, method: str, **options) -> nn.Module:
    """Prepare `model` in place for fine-tuning with `method`; what the task added to the pretrained backbone (its
    head: `toukit.targets.new_modules`) trains under every method.

    Args:
        model: an untouched model.
        method: a name in `toukit.METHODS` (`toukit.method_names()`).
        **options: the method's keyword options (see `METHODS[method].defaults`); None means the default, and
            an option the method does not take raises unless it is None.

    Returns:
        `model`, marked with `model.toukit_method`; `model.toukit_new_modules` lists the head's modules that train.

    Raises:
        ValueError: an unknown method or option, or any bad value the method finds; the model is then exactly
            as it was (modules, parameters and `requires_grad`), so a corrected call can follow. With TOU's
            `chunk` (bounded memory) no rollback copy is kept: bad values are still refused before any layer
            changes, but an error midway (out of memory) leaves the layers done so far factorized.
    """
    if method not in METHODS:
        raise ValueError(f'method={method!r}: unknown; choose one of {", ".join(METHODS)}')
    spec = METHODS[method]
    unknown = sorted(k for k, v in options.items() if k not in spec.defaults and v is not None)
    if unknown:
        raise ValueError(f'method={method!r} takes no option {", ".join(unknown)}; '
                         f'its options are {", ".join(spec.defaults) or "none"}')
    check_untouched(model)
    heads = new_modules(model)  # read before the method changes the module tree
    # a rollback snapshot holds every original weight until the end; chunk= exists to free them as it goes
    rollback = unchanged_on_error(model) if options.get('chunk') is None else nullcontext()
    with rollback:
        spec.prepare(model, **{k: v for k, v in options.items() if v is not None and k in spec.defaults})
        for head in heads:
            model.get_submodule(head).requires_grad_(True)
    model.toukit_method = method
    model.toukit_new_modules = heads
    return model