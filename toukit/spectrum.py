"""Model-level spectrum tables and studies built on `toukit.linalg`: one row per weight matrix.

A fused q/k/v projection gives three rows (part 'q', 'k', 'v'), as the TOU paper counts its matrices.
"""
import math
from typing import Dict, Iterator, Mapping, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
import torch
from torch import nn

from .linalg import (effective_rank, energy_curve, rank_for_energy, relative_error, singular_values_many,
                     stable_rank, whitening_factor)
from .models import call_model
from .ranks import DEFAULT_FRACTION, RankSpec, allocate_budget, layer_policies, parse_rank
from .targets import (QKV_PARTS, Family, Targets, block_index, dense_weight, find_targets, fused_splits, layer_kind,
                      layer_type, model_family)

__all__ = ['layer_matrices', 'spectrum_table', 'rank_table', 'ENERGY_LEVELS']

ENERGY_LEVELS = (0.5, 0.9, 0.99)


def layer_matrices(model: nn.Module, targets: Targets = None) -> Iterator[Tuple[str, Optional[str], torch.Tensor]]:
    """(name, part, weight) for every targeted linear; a fused q/k/v projection yields its three blocks."""
    family = model_family(model)
    for name, linear in find_targets(model, targets).items():
        weight = dense_weight(linear).detach()
        splits = fused_splits(family, name, linear)
        if splits == 1:
            yield name, None, weight
        else:
            for part, block in zip(QKV_PARTS, weight.view(splits, -1, weight.shape[1]).unbind(0)):
                yield name, part, block


def _layer_columns(family: Optional[Family], name: str, part: Optional[str]) -> dict:
    """The name, part, type, block and kind columns of a weight matrix's row (kind 'other' outside attention/MLP)."""
    return dict(name=name, part=part, type=layer_type(family, name, part), block=block_index(family, name),
                kind=layer_kind(family, name) or 'other')


def spectrum_table(model: nn.Module, targets: Targets = None, energy_levels: Sequence[float] = ENERGY_LEVELS,
                   calibration=None) -> pd.DataFrame:
    """One row per targeted weight matrix with its spectrum's summary.

    With `calibration` (model inputs, or layer name -> inputs; see `layer_whitening`) the spectrum is that of W L,
    L the whitening factor of the layer's inputs: the spectrum of its outputs on those inputs, which is what an
    activation-aware truncation keeps (`apply_tou(..., calibration=...)`).

    Columns: name (as `named_modules()` gives it), part (q/k/v of a fused projection, else None), type (the
    layer's name without its block index), block (depth), kind (attention/mlp/other), out_features,
    in_features, max_rank, fro_norm, spectral_norm, stable_rank, effective_rank, rank_e50 / rank_e90 /
    rank_e99 (the rank needed for that energy) and singular_values (a float64 numpy array, descending).
    """
    family = model_family(model)
    entries = list(layer_matrices(model, targets))
    if calibration is not None:
        factors = layer_whitening(model, calibration, targets)
        entries = [(name, part, w.double() @ factors[name]) for name, part, w in entries]
    spectra = singular_values_many([w for _, _, w in entries])
    rows = []
    for (name, part, weight), s in zip(entries, spectra):
        row = dict(**_layer_columns(family, name, part), out_features=weight.shape[0], in_features=weight.shape[1],
                   max_rank=min(weight.shape),
                   fro_norm=float(s.square().sum().sqrt()), spectral_norm=float(s[0]),
                   stable_rank=stable_rank(s), effective_rank=effective_rank(s))
        for level in energy_levels:
            row[f'rank_e{round(level * 100):d}'] = rank_for_energy(s, level)
        row['singular_values'] = s.numpy()
        rows.append(row)
    return pd.DataFrame(rows)


def rank_table(table: pd.DataFrame, rank: RankSpec) -> pd.DataFrame:
    """Per-layer rank, parameters kept and relative weight error a rank policy gives, from a spectrum table.

    `rank` is any rank spec `apply_tou` takes: per layer ('energy:0.9', 'ght', ...), a budget ('budget:1.0',
    allocated over the table's matrices by `allocate_from_table`) or a rank pattern.

    Adds columns: policy, rank, params_dense (out*in), params_factored (r*(out+in)), kept (their ratio),
    energy_kept, relative_error (= sqrt of the tail energy).
    """
    if not isinstance(rank, Mapping) and parse_rank(rank).model_level:
        label, rank = str(parse_rank(rank)), allocate_from_table(table, parse_rank(rank).value)
    else:
        label = str(parse_rank(rank)) if not isinstance(rank, Mapping) else 'pattern'
    policies = layer_policies(rank, dict.fromkeys(table.name))
    out = table.drop(columns=['singular_values']).copy()
    per_name = {}  # q, k and v of a fused projection share the largest of their ranks, as apply_tou builds them
    for row in table.itertuples():
        r = policies[row.name].resolve((row.out_features, row.in_features), torch.as_tensor(row.singular_values),
                                       name=row.name)
        per_name[row.name] = max(per_name.get(row.name, 0), r)
    ranks, errors, energies = [], [], []
    for row in table.itertuples():
        s = torch.as_tensor(row.singular_values)
        r = per_name[row.name]
        ranks.append(r)
        errors.append(relative_error(s, r))
        energies.append(float(energy_curve(s)[r - 1]))
    out['policy'] = label
    out['rank'] = ranks
    out['params_dense'] = out.out_features * out.in_features
    out['params_factored'] = out['rank'] * (out.out_features + out.in_features)
    out['kept'] = out.params_factored / out.params_dense
    out['energy_kept'] = energies
    out['relative_error'] = errors
    return out


# ---------------------------------------------------------------------------------------------------------------
# studies: rank policies, reconstruction error, noise scale


def error_curves(table: pd.DataFrame, fractions: Sequence[float] = tuple(np.linspace(0.02, 1.0, 50))) -> pd.DataFrame:
    """Relative weight error of each layer's rank-k truncation, k = fraction * max_rank (long form).

    Columns: name, part, type, block, kind, fraction, rank, relative_error, energy_kept.
    """
    rows = []
    for row in table.itertuples():
        s = torch.as_tensor(row.singular_values)
        curve = energy_curve(s)
        for f in fractions:
            k = max(1, min(row.max_rank, int(round(f * row.max_rank))))
            rows.append(dict(name=row.name, part=row.part, type=row.type, block=row.block, kind=row.kind,
                             fraction=float(f), rank=k, relative_error=relative_error(s, k),
                             energy_kept=float(curve[k - 1])))
    return pd.DataFrame(rows)


def total_error(ranks: pd.DataFrame) -> float:
    """Relative error of all targeted weights together: sqrt(sum of tail energies / sum of energies)."""
    energy = ranks.fro_norm ** 2
    return float(np.sqrt((energy * ranks.relative_error ** 2).sum() / energy.sum()))


def compare_policies(table: pd.DataFrame, policies: Sequence[RankSpec]) -> pd.DataFrame:
    """One row per rank policy: parameters kept (factored / dense, over all targets), the total relative error,
    the mean and worst layer error, and the smallest and largest rank it gives."""
    rows = []
    for spec in policies:
        ranks = rank_table(table, spec)
        rows.append(dict(policy=str(parse_rank(spec)), kind=parse_rank(spec).kind,
                         params_factored=int(ranks.params_factored.sum()), params_dense=int(ranks.params_dense.sum()),
                         kept=float(ranks.params_factored.sum() / ranks.params_dense.sum()),
                         total_error=total_error(ranks), mean_layer_error=float(ranks.relative_error.mean()),
                         max_layer_error=float(ranks.relative_error.max()), min_rank=int(ranks['rank'].min()),
                         max_rank=int(ranks['rank'].max())))
    return pd.DataFrame(rows)


def capture_layer_inputs(model: nn.Module, inputs, targets: Targets = None) -> Dict[str, torch.Tensor]:
    """The input each targeted linear sees when `model` runs on `inputs` (flattened to rows x in_features).

    `inputs` is one batch (a tensor or a dict of tensors) or a list of batches, whose rows are concatenated.
    Padding positions of text batches are included (they pass through the linears like any token).
    """
    batches = inputs if isinstance(inputs, (list, tuple)) else [inputs]
    captured, hooks = {}, []
    for name, linear in find_targets(model, targets).items():
        def hook(module, args, _out, name=name):
            captured.setdefault(name, []).append(args[0].detach().reshape(-1, args[0].shape[-1]))
        hooks.append(linear.register_forward_hook(hook))
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()
            for i, batch in enumerate(batches):
                try:
                    call_model(model, batch)
                except (RuntimeError, TypeError, ValueError, AssertionError) as e:
                    shape = ({k: tuple(v.shape) for k, v in batch.items()} if isinstance(batch, dict)
                             else tuple(getattr(batch, 'shape', ())))
                    raise ValueError(f'calibration batch {i} of shape {shape} does not fit the model: {e}') from None
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return {name: torch.cat(rows) for name, rows in captured.items()}


def layer_whitening(model: nn.Module, calibration, targets: Targets = None) -> Dict[str, torch.Tensor]:
    """Name -> whitening factor L (`toukit.linalg.whitening_factor`) of each targeted linear's inputs.

    Args:
        calibration: model inputs (a batch or a list of batches, e.g. a few training batches), or a dict of
            layer name -> that layer's inputs (rows x in_features).
    """
    found = find_targets(model, targets)
    if isinstance(calibration, dict) and all(isinstance(v, torch.Tensor) for v in calibration.values()) and set(
            calibration) & set(found):
        inputs = calibration
    else:
        inputs = capture_layer_inputs(model, calibration, list(found))
    factors = {}
    for name, linear in found.items():
        if name not in inputs:
            raise ValueError(f'calibration has no inputs for {name}')
        x = inputs[name]
        width = dense_weight(linear).shape[1]
        if x.shape[-1] != width:
            raise ValueError(f'calibration inputs of {name} are {x.shape[-1]} wide; the layer takes {width}')
        factors[name] = whitening_factor(x)
    return factors


def allocate_ranks(model: nn.Module, budget, targets: Targets = 'all', cost: str = 'trainable',
                   objective: str = 'weight', calibration=None) -> Dict[str, int]:
    """Per-layer TOU ranks that minimise the summed relative squared truncation error under a parameter budget.

    Each targeted layer's error at rank r is ||W - W_r||_F^2 / ||W||_F^2 (objective 'weight'), or the same for
    W L with L the whitening factor of its inputs (objective 'activation': the error of the layer's outputs on
    the calibration inputs). Relative, so that every layer counts alike whatever its scale: with absolute errors
    the few layers of largest norm would take the whole budget. A fused q/k/v projection is one layer of three
    matrices sharing one rank (as `FactorizedLinear` holds it): its rank step removes the three matrices' k-th
    singular values at once and costs three times.

    Args:
        model: the untouched model.
        budget: parameters to spend (int), or a multiple of what uniform rank 0.375 of min(out, in) spends
            (float; 1.0 spends the same).
        targets: as `apply_tou`.
        cost: 'trainable' (a rank costs `in` per matrix: B's row) or 'total' (`in + out`: A's column too).
        objective: 'weight' or 'activation' (needs `calibration`).
        calibration: model inputs, or layer name -> inputs (see `layer_whitening`).

    Returns:
        Layer name -> rank, in the model's order; `apply_tou(model, rank=...)` takes it as a rank pattern.
    """
    if objective not in ('weight', 'activation'):
        raise ValueError(f"objective={objective!r}: must be 'weight' or 'activation'")
    if objective == 'activation' and calibration is None:
        raise ValueError("objective='activation' needs calibration inputs")
    table = spectrum_table(model, targets, calibration=calibration if objective == 'activation' else None)
    return allocate_from_table(table, budget, cost)


def allocate_from_table(table: pd.DataFrame, budget, cost: str = 'trainable') -> Dict[str, int]:
    """`allocate_ranks` on a spectrum table: layer name -> rank, the parts (q, k, v) of a name sharing one rank."""
    if cost not in ('trainable', 'total'):
        raise ValueError(f"cost={cost!r}: must be 'trainable' or 'total'")
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget > 0:
        raise ValueError(f'budget={budget!r}: must be a positive int (parameters) or float (a multiple of the '
                         f'uniform-rank cost)')
    gains, costs = [], []
    names = list(dict.fromkeys(table.name))
    for name in names:
        parts = table[table.name == name]
        spectra = [torch.as_tensor(s).square() for s in parts.singular_values]
        length = min(len(s) for s in spectra)
        gains.append(sum(s[:length] for s in spectra) / sum(float(s.sum()) for s in spectra))
        costs.append(int(parts.in_features.sum() + (parts.out_features.sum() if cost == 'total' else 0)))
    spend = budget * _uniform_cost(table, cost) if isinstance(budget, float) else budget
    return dict(zip(names, allocate_budget(gains, costs, spend)))



def layer_output_errors(model: nn.Module, inputs, fractions: Sequence[float], targets: Targets = None) -> pd.DataFrame:
    """Functional error per layer: ||X (W - W_k)^T|| / ||X W^T|| on the inputs each layer really sees.

    Each layer is truncated alone (its input comes from the untouched model). Columns: name, part, type, block,
    kind, fraction, rank, output_error, weight_error.
    """
    captured = capture_layer_inputs(model, inputs, targets)
    family = model_family(model)
    rows = []
    for name, part, weight in layer_matrices(model, targets):
        x = captured[name].double()
        w = weight.double()
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        reference = x @ w.T
        xv = x @ vh.T  # the input in the right singular basis: truncation drops trailing columns
        for f in fractions:
            k = max(1, min(len(s), int(round(f * len(s)))))
            approx = (xv[:, :k] * s[:k]) @ u[:, :k].T
            rows.append(dict(**_layer_columns(family, name, part), fraction=float(f), rank=k,
                             output_error=float(torch.linalg.norm(approx - reference) / torch.linalg.norm(reference)),
                             weight_error=relative_error(s, k)))
    return pd.DataFrame(rows)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm((a - b).double()) / torch.linalg.norm(b.double()))


def tou_errors(model: nn.Module, inputs, ranks: Sequence[RankSpec], noise_scales: Sequence[float] = (0.0,),
               targets: Targets = None, seed: int = 0) -> Tuple[pd.DataFrame, pd.DataFrame]:
    """The error TOU's initial factorization makes, for each rank and noise scale alpha.

    The model is factorized as `apply_tou` does it (truncated SVD, then N(0, alpha^2) on both factors).

    Returns:
        (layers, totals): `layers` has one row per (rank, noise_scale, weight matrix) with the relative weight
        error ||W - A'B'||_F / ||W||_F; `totals` one row per (rank, noise_scale) with the error of all targeted
        weights together (weight_error) and the relative error of the model's logits on `inputs` (logit_error).
    """
    import copy
    from .methods import apply_tou
    family = model_family(model)
    with torch.no_grad():
        reference = call_model(model.eval(), inputs)
    originals = list(layer_matrices(model, targets))
    layer_rows, total_rows = [], []
    for rank in ranks:
        for alpha in noise_scales:
            factored = apply_tou(copy.deepcopy(model), rank=rank, targets=targets, noise_scale=alpha, seed=seed)
            modules = dict(factored.named_modules())
            num = den = 0.0
            with torch.no_grad():
                logits = call_model(factored.eval(), inputs)
                for name, part, w in originals:
                    merged = modules[name].weight
                    if part is not None:
                        merged = merged.view(3, -1, merged.shape[1])[QKV_PARTS.index(part)]
                    diff = float(torch.linalg.norm((merged - w).double()) ** 2)
                    energy = float(torch.linalg.norm(w.double()) ** 2)
                    num, den = num + diff, den + energy
                    layer_rows.append(dict(rank=str(rank), noise_scale=alpha, **_layer_columns(family, name, part),
                                           weight_error=float(np.sqrt(diff / energy))))
            total_rows.append(dict(rank=str(rank), noise_scale=alpha, weight_error=float(np.sqrt(num / den)),
                                   logit_error=_relative(logits, reference)))
    return pd.DataFrame(layer_rows), pd.DataFrame(total_rows)


def _pattern_cost(table: pd.DataFrame, ranks: Dict[str, int], cost: str = 'trainable') -> int:
    """Parameters TOU spends under a rank pattern: rank times `in` (B's row) for every matrix of every layer,
    plus `out` (A's column) with cost='total'."""
    return int(sum(ranks[name] * int(parts.in_features.sum() + (parts.out_features.sum() if cost == 'total' else 0))
                   for name, parts in table.groupby('name', sort=False)))


def _uniform_cost(table: pd.DataFrame, cost: str = 'trainable') -> int:
    """What uniform rank 0.375 of min(out, in) spends: the unit of a budget given as a float."""
    return _pattern_cost(table, {name: max(1, int(round(DEFAULT_FRACTION * int(parts.max_rank.min()))))
                                 for name, parts in table.groupby('name', sort=False)}, cost)


def _energy_for_budget(table: pd.DataFrame, spend: float, iterations: int = 40) -> str:
    """The largest energy threshold whose ranks (q, k, v sharing their largest, as apply_tou does) cost <= spend."""
    def cost(threshold):
        return _pattern_cost(table, rank_table(table, f'energy:{threshold!r}').groupby('name', sort=False)['rank']
                             .max().to_dict())
    low, high = 1e-6, 1.0
    for _ in range(iterations):
        mid = (low + high) / 2
        low, high = (mid, high) if cost(mid) <= spend else (low, mid)
    return f'energy:{max(1e-6, math.floor(low * 1e4) / 1e4)!r}'  # rounded down: a short, stable run id


BUDGET_POLICIES = ('uniform', 'energy threshold', 'budget (weights)', 'budget (activations)')


def budget_policies(table: pd.DataFrame, budget: float) -> Dict[str, Tuple[object, bool]]:
    """The equal-budget study's policies at `budget` (a multiple of what uniform rank 0.375 spends on B):
    policy -> (rank spec for `apply_tou` / `TrainConfig.rank`, whether it needs calibration inputs).

    uniform: the fraction 0.375 b; energy threshold: the largest (to 1e-4) whose cost fits; budget (weights): the
    allocation on weight spectra; budget (activations): the allocation on whitened spectra, with activation-aware
    factors.
    """
    spend = budget * _uniform_cost(table)
    return {'uniform': (DEFAULT_FRACTION * budget, False),
            'energy threshold': (_energy_for_budget(table, spend), False),
            'budget (weights)': (f'budget:{float(budget)}', False),
            'budget (activations)': (f'budget:{float(budget)}', True)}


def budget_study(model: nn.Module, budgets: Sequence[float], heldout, calibration, targets: Targets = 'all'
                 ) -> pd.DataFrame:
    """Rank policies at equal trainable-parameter budgets, before any training (the adaptive-rank study, part a).

    For each budget b (a multiple of what uniform rank 0.375 spends on B): uniform rank 0.375 b, the energy
    threshold whose cost fits the budget, the budget allocation on weights, and the budget allocation on
    activations with activation-aware factors (`calibration`). Each is applied with zero noise and measured on
    `heldout` inputs the calibration never saw.

    Returns:
        One row per (budget, policy): trainable (B's parameters), weight_error (relative, all targets together),
        output_error (every layer alone on the inputs it sees in the untouched model, relative, all together) and
        logit_error (relative, the whole factorized model).
    """
    import copy
    from .methods import apply_tou
    table = spectrum_table(model, targets)
    names = list(dict.fromkeys(table.name))
    inputs = capture_layer_inputs(model, heldout, names)
    with torch.no_grad():
        reference = torch.cat([call_model(model.eval(), batch) for batch in (
            heldout if isinstance(heldout, (list, tuple)) else [heldout])])
    modules = dict(model.named_modules())
    rows = []
    for budget in budgets:
        for policy, (rank, calibrated) in budget_policies(table, budget).items():
            prepared = apply_tou(copy.deepcopy(model), rank=rank, targets=targets, noise_scale=0.0,
                                 calibration=calibration if calibrated else None)
            factored = dict(prepared.named_modules())
            w_num = w_den = o_num = o_den = 0.0
            with torch.no_grad():
                for name in names:
                    w = dense_weight(modules[name]).double()
                    approx = factored[name].weight.double()
                    x = inputs[name].double()
                    w_num += float((approx - w).square().sum())
                    w_den += float(w.square().sum())
                    o_num += float((x @ (approx - w).T).square().sum())
                    o_den += float((x @ w.T).square().sum())
                logits = torch.cat([call_model(prepared.eval(), batch) for batch in (
                    heldout if isinstance(heldout, (list, tuple)) else [heldout])])
            rows.append(dict(budget=budget, policy=policy, trainable=_pattern_cost(table, prepared.toukit_ranks),
                             weight_error=(w_num / w_den) ** 0.5, output_error=(o_num / o_den) ** 0.5,
                             logit_error=_relative(logits, reference)))
    return pd.DataFrame(rows)


__all__ += ['error_curves', 'total_error', 'compare_policies', 'capture_layer_inputs', 'layer_output_errors',
            'tou_errors', 'layer_whitening', 'allocate_ranks', 'allocate_from_table', 'budget_study',
            'budget_policies', 'BUDGET_POLICIES']
