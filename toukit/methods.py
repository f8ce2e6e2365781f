"""Fine-tuning methods: one registry, name -> prepare(model, **options), and the TOU entry points.

A method only prepares a model (replaces layers, sets `requires_grad`); the training loop is shared.
What the task added to the pretrained backbone (its head) trains in every method. `merge` turns any prepared
model back into its original architecture: toukit layers become the dense layers they were built from, peft LoRA
layers merge into theirs, split q/k/v projections fuse again.
"""
import functools
import inspect
import sys
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from .calibration import layer_whitening
from .layers import (AdapterLinear, DeLoRALinear, FactorizedLinear, QKVSplit, SVFitLinear, ToukitLayer, fuse_qkv,
                     split_qkv)
from .linalg import check_finite, check_rank, factorize_iter, svd_many
from .ranks import DEFAULT_FRACTION, RankPolicy, RankSpec, allocate_ranks, layer_policies, parse_rank
from .targets import (Targets, dense_weight, find_targets, fused_splits, get_submodule_parent, layer_kind,
                      model_family, new_modules, output_projections, qkv_blocks, require_family)

__all__ = ['DEFAULT_NOISE_SCALE', 'METHODS', 'apply_method', 'apply_tou', 'merge', 'count_parameters',
           'method_names', 'method_label', 'is_prepared', 'has_method_layers', 'describe_preparation']

DEFAULT_NOISE_SCALE = 1e-3  # alpha; chosen by the noise-scale study (notebooks/reconstruction.ipynb, README)


def _is_peft_layer(module: nn.Module) -> bool:
    tuners = sys.modules.get('peft.tuners.tuners_utils')  # no peft layer can exist before peft is imported
    return tuners is not None and isinstance(module, tuners.BaseTunerLayer)


def _method_layers(model: nn.Module) -> List[str]:
    """'<layer class> at <name>' for every layer a method put into `model` (toukit's or peft's)."""
    return [f'{type(m).__name__} at {n}' for n, m in model.named_modules()
            if isinstance(m, (ToukitLayer, QKVSplit, AdapterLinear)) or _is_peft_layer(m)]


def has_method_layers(model: nn.Module) -> bool:
    """Whether a method put layers of its own into `model` (toukit's, peft's, or a split q/k/v view)."""
    return bool(_method_layers(model))


def describe_preparation(model: nn.Module) -> Optional[str]:
    """What a method did to `model`, for messages: toukit's mark and the first method layer; None if untouched."""
    layers = _method_layers(model)
    mark = getattr(model, 'toukit_method', None)
    parts = ([f'method {mark!r}'] if mark else []) + layers[:1]
    return ', '.join(parts) or None


def is_prepared(model: nn.Module) -> bool:
    """Whether a method was applied to `model` (toukit's mark, or a layer a method put there)."""
    return describe_preparation(model) is not None


def _check_untouched(model: nn.Module) -> None:
    applied = describe_preparation(model)
    if applied:
        raise ValueError(f'model already prepared ({applied}); applying a method twice would stack it: '
                         f'start from an untouched model or call toukit.merge(model) first')


@contextmanager
def _unchanged_on_error(model: nn.Module):
    """Run a preparation; if it raises, put every module, parameter and `requires_grad` back as it was.

    Preparations replace modules and tensors (they never write into a weight in place), so a shallow snapshot
    of each module's attribute dicts and of each parameter's data and flag restores the model exactly.
    """
    def copy_dict(d):
        return {k: (v.copy() if isinstance(v, dict) else v) for k, v in d.items()}
    modules = [(m, copy_dict(m.__dict__)) for m in model.modules()]
    params = [(p, p.data, p.requires_grad) for p in model.parameters()]
    try:
        yield
    except BaseException:
        for module, saved in modules:
            module.__dict__.clear()
            module.__dict__.update(copy_dict(saved))
        for p, data, requires_grad in params:
            p.data = data
            p.requires_grad_(requires_grad)
        raise


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, child = get_submodule_parent(model, name)
    if isinstance(parent, nn.MultiheadAttention):
        if isinstance(new, ToukitLayer):
            new.read_by_parent = True  # its forward reads out_proj.weight as a matrix: formed there, deliberately
        elif isinstance(new, AdapterLinear):
            raise ValueError(f'{name}: nn.MultiheadAttention reads {child}.weight directly, never calling {child}, '
                             f'so an adapter there would be bypassed; choose other targets')
    setattr(parent, child, new)


def apply_tou(
        model: nn.Module,
        rank: RankSpec = DEFAULT_FRACTION,
        targets: Targets = 'all',
        noise_scale: float = DEFAULT_NOISE_SCALE,
        freeze_mlp: bool = False,
        seed: int = 0,
        svd_method: str = 'gram',
        calibration=None,
        chunk: Optional[int] = None,
) -> nn.Module:
    """Replace the targeted linears of `model` in place by TOU FactorizedLinear layers.

    Each weight W becomes A B by truncated SVD (A = U_r S_r frozen, B = V_r^T trained) plus N(0, noise_scale^2)
    noise on both. A fused q/k/v projection is factorized as three separate matrices with one forward. All
    same-shape matrices share one batched SVD. Parameters outside the targets keep their `requires_grad`.
    With `calibration`, the factorization is activation-aware (SVD-LLM's whitening, `toukit.linalg.factorize`):
    A B is the rank-r matrix closest to W on the layer's calibration inputs, rebalanced so that B's rows have unit
    norm as plain TOU's do (`toukit.linalg.balance_factors`: the same alpha and rate fit).

    Args:
        model: a transformer (see `toukit.targets`: timm and Hugging Face families), or any module (then every
            dense layer but the head is a target).
        rank: an int, a fraction of min(out, in), 'energy:T', 'ght' or 'budget:B' (see `toukit.ranks.parse_rank`;
            a budget is allocated by `toukit.allocate_ranks`), or a rank pattern {module name or
            pattern: any of those but a budget} (see `layer_policies`). q, k and v of a fused projection share
            the largest of their three ranks. With calibration, energy and ght read the whitened spectrum.
        targets: 'all', 'attention', 'mlp' or module-name patterns (see `toukit.targets.find_targets`).
        noise_scale: the paper's alpha.
        freeze_mlp: the paper's "TOU frozen FFN": MLP linears are factorized too, but nothing in them trains.
        seed: seeds the noise (layer i uses seed + i).
        svd_method: 'gram' (eigh of each Gram matrix, batched by shape: the fastest on CPUs, and as accurate as
            'exact' for the kept triplets; see `toukit.linalg.truncated_svd`), 'exact' (`torch.linalg.svd`) or
            'randomized' (`torch.svd_lowrank`; needs a fixed or fractional rank). Ignored with calibration.
        calibration: model inputs (a batch or a list of a few training batches), or layer name -> inputs.
        chunk: factorize at most this many same-shape matrices per batched call, and replace each layer as soon as
            its factors exist, so that its original weight is freed: memory stays the model's plus a few chunks'
            worth, not a multiple of the model (the factors are the same; a spectrum-based rank then costs two
            passes of SVDs, and an error midway, out of memory say, leaves the layers done so far factorized).
            None: all of a shape at once, and every layer is built before the model changes.

    Returns:
        `model`, modified in place; `model.toukit_ranks` holds the rank of every factorized layer (JSON-ready, a
        rank pattern that `apply_tou` replays).
    """
    _check_untouched(model)
    found = find_targets(model, targets)
    family = require_family(model, 'freeze_mlp (TOU frozen FFN)') if freeze_mlp else model_family(model)
    policies = _tou_policies(model, rank, found, calibration, chunk)
    factors = layer_whitening(model, calibration, list(found)) if calibration is not None else {}
    blocks, whitening, owners, owner_of = _weight_blocks(found, family, factors)
    if freeze_mlp and not any(layer_kind(family, name) == 'mlp' for name, _, _ in owners):
        raise ValueError(f'freeze_mlp=True but targets={targets!r} hold no MLP linear: nothing would be frozen')
    del found  # from here on only the model and `blocks` hold the weights, and factorize_iter empties `blocks`
    if any(p.needs_spectrum for p in policies.values()) or factors:
        if svd_method == 'randomized' and not factors:
            raise ValueError(f"rank={rank}: svd_method='randomized' needs a fixed or fractional rank")
        rule = functools.partial(_block_ranks, owners, policies)  # the whole spectrum decides each rank
    else:
        rule = _block_ranks(owners, policies)
    pairs = factorize_iter(blocks, rule, method=svd_method, whitening=whitening if factors else None, seed=seed,
                           chunk=chunk)
    built = []
    for name, layer in _factorized_layers(model, pairs, owners, owner_of, noise_scale, seed):
        if freeze_mlp and layer_kind(family, name) == 'mlp':
            layer.requires_grad_(False)
        if chunk is None:  # every layer is built before the model changes
            built.append((name, layer))
        else:  # bounded memory: each original weight goes as soon as its layer is built
            _replace(model, name, layer)
    for name, layer in built:
        _replace(model, name, layer)
    model.toukit_ranks = {name: model.get_submodule(name).rank for name, _, _ in owners}
    return model


Owner = Tuple[str, int, Tuple[int, int]]  # a factorized layer: its name, its blocks (3 for a fused q/k/v), their shape


def _tou_policies(model: nn.Module, rank: RankSpec, found: Mapping[str, nn.Module], calibration,
                  chunk: Optional[int]) -> Dict[str, RankPolicy]:
    """Each target's rank policy; a budget is allocated over the targets first (`allocate_ranks`)."""
    if not isinstance(rank, Mapping) and parse_rank(rank).model_level:
        rank = allocate_ranks(model, parse_rank(rank).value, targets=list(found), calibration=calibration,
                              objective='activation' if calibration is not None else 'weight', chunk=chunk)
    return layer_policies(rank, found)


def _weight_blocks(found: Mapping[str, nn.Module], family, factors: Dict[str, torch.Tensor]
                   ) -> Tuple[List[torch.Tensor], List[Optional[torch.Tensor]], List[Owner], List[int]]:
    """The matrices to factorize, one per block (q, k and v of a fused projection apart, as views of its weight),
    each block's whitening factor (or None), the layers that own them, and each block's owner index."""
    blocks, whitening, owners, owner_of = [], [], [], []
    for name, linear in found.items():
        weight = dense_weight(linear).detach()
        check_finite(weight, f'{name}.weight')
        splits = fused_splits(family, name, linear)
        out_f, in_f = weight.shape
        owner_of.extend([len(owners)] * splits)
        blocks.extend(qkv_blocks(weight, splits))
        whitening.extend([factors.get(name)] * splits)
        owners.append((name, splits, (out_f // splits, in_f)))
    return blocks, whitening, owners, owner_of


def _block_ranks(owners: Sequence[Owner], policies: Dict[str, RankPolicy],
                 spectra: Optional[Sequence[torch.Tensor]] = None) -> List[int]:
    """One rank per block: q, k and v of a fused projection share the largest of their three."""
    ranks, start = [], 0
    for name, splits, shape in owners:
        parts = [None] * splits if spectra is None else spectra[start:start + splits]
        ranks.extend([max(policies[name].resolve(shape, s, name=name) for s in parts)] * splits)
        start += splits
    return ranks


def _factorized_layers(model: nn.Module, pairs, owners: Sequence[Owner], owner_of: Sequence[int],
                       noise_scale: float, seed: int) -> Iterator[Tuple[str, FactorizedLinear]]:
    """(name, FactorizedLinear) of each layer as soon as `pairs` (`factorize_iter`'s (block, (A, B))) holds all of
    its blocks; layer i's noise is seeded with seed + i."""
    pending = {}  # owner index -> block index -> its (A, B)
    for j, pair in pairs:
        i = owner_of[j]
        name, splits, _ = owners[i]
        pending.setdefault(i, {})[j] = pair
        if len(pending[i]) < splits:
            continue
        parts = [done for _, done in sorted(pending.pop(i).items())]  # q, k, v in their order
        a, b = torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts])
        del parts
        layer = FactorizedLinear.from_linear(model.get_submodule(name), a.shape[-1], noise_scale=noise_scale,
                                             seed=seed + i, splits=splits, factors=(a, b), name=name)
        del a, b
        yield name, layer


def merge(model: nn.Module) -> nn.Module:
    """Turn every factorized or adapted layer back into nn.Linear, in place; returns `model`.

    toukit layers merge to their effective weight; peft LoRA/PiSSA layers merge with peft's `safe_merge`
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
            _replace(model, name, module.merge())
        elif _is_peft_layer(module) and hasattr(module, 'get_base_layer'):
            module.merge(safe_merge=True)
            _replace(model, name, module.get_base_layer())
    fuse_qkv(model)
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
    defaults: Dict[str, object] = field(default_factory=dict)


METHODS: Dict[str, Method] = {}  # in the order tables and figures show them


def _register(label: str, description: str, mergeable: bool = True):
    def wrap(fn):
        sig = inspect.signature(fn)
        defaults = {k: p.default for k, p in list(sig.parameters.items())[1:]}
        METHODS[fn.__name__] = Method(fn.__name__, fn, label, description, mergeable, defaults)
        return fn
    return wrap


def method_names() -> List[str]:
    """The registered methods, in the order tables and figures show them."""
    return list(METHODS)


def method_label(method: str) -> str:
    """A method's display name ('Full TOU' for 'tou'); unknown names are returned as they are."""
    return METHODS[method].label if method in METHODS else method


def _split_view(model: nn.Module) -> None:
    """Freeze `model` and show a fused q/k/v as three matrices, as the paper counts LoRA's parameters."""
    model.requires_grad_(False)
    split_qkv(model)


def _replace_targets(model: nn.Module, targets: Targets, build: Callable[[int, str, nn.Linear], nn.Module]) -> None:
    _split_view(model)
    for i, (name, linear) in enumerate(find_targets(model, targets).items()):
        _replace(model, name, build(i, name, linear))


@_register('FT', 'full fine-tuning: every parameter trains')
def ft(model: nn.Module) -> None:
    model.requires_grad_(True)


def _peft_lora(model: nn.Module, targets: Targets, **config) -> None:
    from peft import LoraConfig, inject_adapter_in_model  # imported here: ~3 s at import, only LoRA and PiSSA use it
    _split_view(model)
    found = find_targets(model, targets)
    for name, linear in found.items():
        check_rank(config['r'], tuple(dense_weight(linear).shape), name)
    bypassed = [n for n in found if isinstance(get_submodule_parent(model, n)[0], nn.MultiheadAttention)]
    if bypassed:
        raise ValueError(f'{bypassed[0]}: nn.MultiheadAttention reads its out_proj weight directly, never calling the '
                         f'module, so a peft LoRA layer there would be bypassed; choose other targets')
    names = list(found)
    with warnings.catch_warnings():  # GPT-2 mixes Conv1D and split nn.Linear targets: peft sets fan_in_fan_out
        warnings.filterwarnings('ignore', message='fan_in_fan_out is set to')  # per layer, and says so each time
        inject_adapter_in_model(LoraConfig(target_modules=names, bias='none', **config), model)


@_register('LoRA', 'LoRA through peft on the target linears (q, k, v as separate matrices)')
def lora(model: nn.Module, rank: int = 8, targets: Targets = 'attention', alpha: Optional[float] = None,
         dropout: float = 0.0) -> None:
    _peft_lora(model, targets, r=rank, lora_alpha=alpha or rank, lora_dropout=dropout)


@_register('PiSSA', "PiSSA through peft: LoRA initialised from the top-r singular triplets, residual frozen")
def pissa(model: nn.Module, rank: int = 8, targets: Targets = 'attention', alpha: Optional[float] = None,
          dropout: float = 0.0) -> None:
    _peft_lora(model, targets, r=rank, lora_alpha=alpha or rank, lora_dropout=dropout, init_lora_weights='pissa')


@_register('Full TOU', 'full TOU: truncated-SVD factors of attention and MLP, A frozen, B and all other parameters '
                       'train')
def tou(model: nn.Module, rank: RankSpec = DEFAULT_FRACTION, targets: Targets = 'all',
        noise_scale: float = DEFAULT_NOISE_SCALE, seed: int = 0, svd_method: str = 'gram', calibration=None,
        chunk: Optional[int] = None) -> None:
    model.requires_grad_(True)
    apply_tou(model, rank=rank, targets=targets, noise_scale=noise_scale, seed=seed, svd_method=svd_method,
              calibration=calibration, chunk=chunk)


@_register('TOU frozen FFN', 'TOU frozen FFN: like tou, but nothing in the factorized MLP trains')
def tou_frozen_ffn(model: nn.Module, rank: RankSpec = DEFAULT_FRACTION, targets: Targets = 'all',
                   noise_scale: float = DEFAULT_NOISE_SCALE, seed: int = 0, svd_method: str = 'gram',
                   calibration=None, chunk: Optional[int] = None) -> None:
    model.requires_grad_(True)
    apply_tou(model, rank=rank, targets=targets, noise_scale=noise_scale, freeze_mlp=True, seed=seed,
              svd_method=svd_method, calibration=calibration, chunk=chunk)


@_register('SVFit', 'SVFit: only the top-r singular values of each target train (r by energy threshold by default)')
def svfit(model: nn.Module, rank: RankSpec = 'energy:0.99', targets: Targets = 'all') -> None:
    policy = parse_rank(rank)
    _split_view(model)
    found = find_targets(model, targets)
    weights = {name: dense_weight(linear).detach() for name, linear in found.items()}
    for name, weight in weights.items():
        check_finite(weight, f'{name}.weight')
    svds = svd_many([w.double() for w in weights.values()], method='exact')
    for (name, linear), svd in zip(found.items(), svds):
        rank_ = policy.resolve(tuple(weights[name].shape), svd[1], name)
        _replace(model, name, SVFitLinear.from_linear(linear, rank_, name=name, svd=svd))


@_register('DeLoRA', 'DeLoRA: frozen random factors with a trainable r x r core, started at zero')
def delora(model: nn.Module, rank: int = 32, targets: Targets = 'attention', scaling: float = 1.0,
           seed: int = 0) -> None:
    _replace_targets(model, targets, lambda i, name, linear: DeLoRALinear.from_linear(
        linear, rank, scaling=scaling, seed=seed + i, name=name))


@_register('Adapter', 'bottleneck adapters (Houlsby) after every attention and MLP output projection',
           mergeable=False)
def adapter(model: nn.Module, width: int = 16, seed: int = 0) -> None:
    model.requires_grad_(False)
    for i, (name, linear) in enumerate(output_projections(model).items()):
        _replace(model, name, AdapterLinear.from_linear(linear, width, seed=seed + i, name=name))


@_register('BitFit', 'BitFit: only the biases (and the head) train')
def bitfit(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith('bias'))


def apply_method(model: nn.Module, method: str, **options) -> nn.Module:
    """Prepare `model` in place for fine-tuning with `method`; what the task added to the pretrained backbone (its
    head: `toukit.targets.new_modules`) trains under every method.

    Args:
        model: an untouched model.
        method: a name in `toukit.METHODS` (ft, bitfit, lora, pissa, tou, tou_frozen_ffn, svfit, delora).
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
    _check_untouched(model)
    heads = new_modules(model)  # read before the method changes the module tree
    # a rollback snapshot holds every original weight until the end; chunk= exists to free them as it goes
    rollback = _unchanged_on_error(model) if options.get('chunk') is None else nullcontext()
    with rollback:
        spec.prepare(model, **{k: v for k, v in options.items() if v is not None and k in spec.defaults})
        for head in heads:
            model.get_submodule(head).requires_grad_(True)
    model.toukit_method = method
    model.toukit_new_modules = heads
    return model
