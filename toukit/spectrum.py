"""Tables of the pretrained weights, built on `toukit.linalg`: one row per weight matrix.

A fused q/k/v projection gives three rows (part 'q', 'k', 'v'), as the TOU paper counts its matrices. What a rank
policy gives each matrix (`rank_table`) is read from these tables; studies that factorize models or compare
policies are in `toukit.studies`.
"""
from typing import Dict, Mapping, Optional, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from .calibration import layer_whitening
from .linalg import effective_rank, energy_curve, rank_for_energy, relative_error, singular_values_many, stable_rank
from .ranks import RankSpec, allocate_spectra, layer_policies, parse_rank
from .targets import Family, Targets, block_index, layer_kind, layer_matrices, layer_type, model_family

__all__ = ['spectrum_table', 'rank_table', 'total_error', 'allocate_from_table', 'energy_rank_grid', 'layer_columns',
           'ENERGY_LEVELS']

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


def total_error(ranks: pd.DataFrame) -> float:
    """Relative error of all targeted weights together (a `rank_table`): sqrt(sum of tail energies / sum of
    energies)."""
    energy = ranks.fro_norm ** 2
    return float(np.sqrt((energy * ranks.relative_error ** 2).sum() / energy.sum()))

def allocate_from_table(table: pd.DataFrame, budget, cost: str = 'trainable') -> Dict[str, int]:
    """`toukit.ranks.allocate_ranks` on a spectrum table: layer name -> rank, the parts (q, k, v) of a name sharing
    one rank."""
    layers = [(name, [torch.as_tensor(s) for s in parts.singular_values],
               list(zip(parts.out_features, parts.in_features))) for name, parts in table.groupby('name', sort=False)]
    return allocate_spectra(layers, budget, cost)


def energy_rank_grid(table: pd.DataFrame, threshold: float) -> pd.DataFrame:
    """The rank an energy threshold needs, as a fraction of the max rank, by layer type (rows) and block (columns),
    from a spectrum table: what `toukit.plots.plot_rank_heatmap` draws."""
    frame = table.assign(needed=[rank_for_energy(torch.as_tensor(s), threshold) / m
                                 for s, m in zip(table.singular_values, table.max_rank)])
    return frame.pivot_table(index='type', columns='block', values='needed', sort=False)
