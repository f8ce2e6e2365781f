"""Model-level spectrum tables and studies built on `toukit.linalg`: one row per weight matrix.

A fused q/k/v projection gives three rows (part 'q', 'k', 'v'), as the TOU paper counts its matrices.
"""
import math
from typing import Dict, Mapping, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
import torch
from torch import nn

from .calibration import capture_layer_inputs, layer_whitening
from .linalg import effective_rank, energy_curve, rank_for_energy, relative_error, singular_values_many, stable_rank
from .ranks import DEFAULT_FRACTION, RankSpec, allocate_spectra, layer_policies, parse_rank, uniform_cost
from .targets import Family, Targets, block_index, layer_kind, layer_matrices, layer_type, model_family

__all__ = ['layer_matrices', 'spectrum_table', 'rank_table', 'ENERGY_LEVELS']

ENERGY_LEVELS = (0.5, 0.9, 0.99)


def layer_columns(family: Optional[Family], name: str, part: Optional[str]) -> dict:
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
        row = dict(**layer_columns(family, name, part), out_features=weight.shape[0], in_features=weight.shape[1],
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


def allocate_from_table(table: pd.DataFrame, budget, cost: str = 'trainable') -> Dict[str, int]:
    """`toukit.ranks.allocate_ranks` on a spectrum table: layer name -> rank, the parts (q, k, v) of a name sharing
    one rank."""
    layers = [(name, [torch.as_tensor(s) for s in parts.singular_values],
               list(zip(parts.out_features, parts.in_features))) for name, parts in table.groupby('name', sort=False)]
    return allocate_spectra(layers, budget, cost)


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
            rows.append(dict(**layer_columns(family, name, part), fraction=float(f), rank=k,
                             output_error=float(torch.linalg.norm(approx - reference) / torch.linalg.norm(reference)),
                             weight_error=relative_error(s, k)))
    return pd.DataFrame(rows)


def pattern_cost(table: pd.DataFrame, ranks: Dict[str, int], cost: str = 'trainable') -> int:
    """Parameters TOU spends under a rank pattern: rank times `in` (B's row) for every matrix of every layer,
    plus `out` (A's column) with cost='total'."""
    return int(sum(ranks[name] * int(parts.in_features.sum() + (parts.out_features.sum() if cost == 'total' else 0))
                   for name, parts in table.groupby('name', sort=False)))


def _uniform_cost(table: pd.DataFrame, cost: str = 'trainable') -> int:
    """What uniform rank 0.375 of min(out, in) spends over a spectrum table's layers (`toukit.ranks.uniform_cost`)."""
    return uniform_cost([(name, [], list(zip(parts.out_features, parts.in_features)))
                         for name, parts in table.groupby('name', sort=False)], cost)


def _energy_for_budget(table: pd.DataFrame, spend: float, iterations: int = 40) -> str:
    """The largest energy threshold whose ranks (q, k, v sharing their largest, as apply_tou does) cost <= spend."""
    def cost(threshold):
        return pattern_cost(table, rank_table(table, f'energy:{threshold!r}').groupby('name', sort=False)['rank']
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


__all__ += ['error_curves', 'total_error', 'compare_policies', 'layer_output_errors', 'allocate_from_table',
            'layer_columns', 'pattern_cost', 'budget_policies', 'BUDGET_POLICIES']
