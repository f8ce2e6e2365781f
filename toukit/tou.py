"""TOU's preparation: every targeted weight W becomes A B by truncated SVD (A = U_r S_r frozen, B = V_r^T trained),
batched by shape, ranks by any policy of `toukit.ranks`, optionally activation-aware; and the ablation that keeps
the truncation residual W - A B frozen beside the factors.
"""
import functools
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from .calibration import layer_whitening
from .layers import FactorizedLinear, ResidualFactorizedLinear
from .linalg import check_finite, factorize_iter
from .ranks import DEFAULT_FRACTION, RankPolicy, RankSpec, allocate_ranks, layer_policies, parse_rank
from .surgery import check_untouched, replace_layer
from .targets import (Targets, dense_weight, find_targets, fused_splits, layer_kind, model_family, qkv_blocks,
                      require_family)

__all__ = ['DEFAULT_NOISE_SCALE', 'apply_tou']

DEFAULT_NOISE_SCALE = 1e-3  # alpha; chosen by the noise-scale study (notebooks/reconstruction.ipynb, README)


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
        residual: bool = False,
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
        residual: keep the truncation residual R = W - A B (taken after the noise) frozen beside the factors
            (`ResidualFactorizedLinear`): the layer starts out computing W exactly, and B's update still lies in the
            span of A's columns. The ablation that removes the truncation and keeps the restriction; R costs a dense
            matrix per layer in memory and a dense matmul per step.

    Returns:
        `model`, modified in place; `model.toukit_ranks` holds the rank of every factorized layer (JSON-ready, a
        rank pattern that `apply_tou` replays).
    """
    check_untouched(model)
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
    for name, layer in _factorized_layers(model, pairs, owners, owner_of, noise_scale, seed, residual):
        if freeze_mlp and layer_kind(family, name) == 'mlp':
            layer.requires_grad_(False)
        if chunk is None:  # every layer is built before the model changes
            built.append((name, layer))
        else:  # bounded memory: each original weight goes as soon as its layer is built
            replace_layer(model, name, layer)
    for name, layer in built:
        replace_layer(model, name, layer)
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
                       noise_scale: float, seed: int, residual: bool = False
                       ) -> Iterator[Tuple[str, FactorizedLinear]]:
    """(name, FactorizedLinear) of each layer as soon as `pairs` (`factorize_iter`'s (block, (A, B))) holds all of
    its blocks (a ResidualFactorizedLinear with `residual`); layer i's noise is seeded with seed + i."""
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
        cls = ResidualFactorizedLinear if residual else FactorizedLinear
        layer = cls.from_linear(model.get_submodule(name), a.shape[-1], noise_scale=noise_scale, seed=seed + i,
                                splits=splits, factors=(a, b), name=name)
        del a, b
        yield name, layer

