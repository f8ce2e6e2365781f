"""Model-level spectrum tables and studies built on `toukit.linalg`: one row per weight matrix.

A fused q/k/v projection gives three rows (part 'q', 'k', 'v'), as the TOU paper counts its matrices.
"""
import re
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
import torch
from torch import nn

from .linalg import effective_rank, energy_curve, rank_for_energy, relative_error, stable_rank
from .ranks import RankSpec, parse_rank
from .targets import Targets, find_targets, fused_splits, is_mlp, model_family

__all__ = ['layer_matrices', 'spectrum_table', 'rank_table', 'ENERGY_LEVELS']

ENERGY_LEVELS = (0.5, 0.9, 0.99)
QKV_PARTS = ('q', 'k', 'v')


def layer_matrices(model: nn.Module, targets: Targets = None) -> Iterator[Tuple[str, Optional[str], torch.Tensor]]:
    """(name, part, weight) for every targeted linear; a fused q/k/v projection yields its three blocks."""
    for name, linear in find_targets(model, targets).items():
        weight = linear.weight.detach()
        splits = fused_splits(name, linear)
        if splits == 1:
            yield name, None, weight
        else:
            for part, block in zip(QKV_PARTS, weight.view(splits, -1, weight.shape[1]).unbind(0)):
                yield name, part, block


def _layer_info(family: Optional[str], name: str) -> Tuple[Optional[int], str]:
    match = re.search(r'(?:blocks|layer)\.(\d+)\.', name)
    block = int(match.group(1)) if match else None
    kind = 'mlp' if is_mlp(family, name) else ('attention' if family and re.search(r'att', name) else 'other')
    return block, kind


def _short_type(name: str, part: Optional[str]) -> str:
    """A layer type independent of depth, e.g. 'attn.qkv[q]' or 'attention.self.query'."""
    short = re.sub(r'^.*?(?:blocks|layer)\.\d+\.', '', name)
    return f'{short}[{part}]' if part else short


def _batched_svdvals(matrices: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    groups: Dict[tuple, List[int]] = {}
    for i, m in enumerate(matrices):
        groups.setdefault(tuple(m.shape), []).append(i)
    out: List[Optional[torch.Tensor]] = [None] * len(matrices)
    for idx in groups.values():
        s = torch.linalg.svdvals(torch.stack([matrices[i].to('cpu', torch.float64) for i in idx]))
        for j, i in enumerate(idx):
            out[i] = s[j]
    return out


def spectrum_table(model: nn.Module, targets: Targets = None,
                   energy_levels: Sequence[float] = ENERGY_LEVELS) -> pd.DataFrame:
    """One row per targeted weight matrix with its spectrum's summary.

    Columns: name (as `named_modules()` gives it), part (q/k/v of a fused projection, else None), type (the
    layer's name without its block index), block (depth), kind (attention/mlp/other), out_features,
    in_features, max_rank, fro_norm, spectral_norm, stable_rank, effective_rank, rank_e50 / rank_e90 /
    rank_e99 (the rank needed for that energy) and singular_values (a float64 numpy array, descending).
    """
    family = model_family(model)
    entries = list(layer_matrices(model, targets))
    spectra = _batched_svdvals([w for _, _, w in entries])
    rows = []
    for (name, part, weight), s in zip(entries, spectra):
        block, kind = _layer_info(family, name)
        row = dict(name=name, part=part, type=_short_type(name, part), block=block, kind=kind,
                   out_features=weight.shape[0], in_features=weight.shape[1], max_rank=min(weight.shape),
                   fro_norm=float(s.square().sum().sqrt()), spectral_norm=float(s[0]),
                   stable_rank=stable_rank(s), effective_rank=effective_rank(s))
        for level in energy_levels:
            row[f'rank_e{round(level * 100):d}'] = rank_for_energy(s, level)
        row['singular_values'] = s.numpy()
        rows.append(row)
    return pd.DataFrame(rows)


def rank_table(table: pd.DataFrame, rank: RankSpec) -> pd.DataFrame:
    """Per-layer rank, parameters kept and relative weight error a rank policy gives, from a spectrum table.

    Adds columns: policy, rank, params_dense (out*in), params_factored (r*(out+in)), kept (their ratio),
    energy_kept, relative_error (= sqrt of the tail energy).
    """
    policy = parse_rank(rank)
    out = table.drop(columns=['singular_values']).copy()
    ranks, errors, energies = [], [], []
    for row in table.itertuples():
        s = torch.as_tensor(row.singular_values)
        r = policy.resolve((row.out_features, row.in_features), s, name=row.name)
        ranks.append(r)
        errors.append(relative_error(s, r))
        energies.append(float(energy_curve(s)[r - 1]))
    out['policy'] = str(policy)
    out['rank'] = ranks
    out['params_dense'] = out.out_features * out.in_features
    out['params_factored'] = out['rank'] * (out.out_features + out.in_features)
    out['kept'] = out.params_factored / out.params_dense
    out['energy_kept'] = energies
    out['relative_error'] = errors
    return out


def singular_values_of(table: pd.DataFrame, name: str, part: Optional[str] = None) -> np.ndarray:
    """The singular values stored in a spectrum table's row for layer `name` (and `part`)."""
    rows = table[(table.name == name) & (table.part.isna() if part is None else table.part == part)]
    if rows.empty:
        raise ValueError(f'name={name!r}, part={part!r}: not in the table; it has {", ".join(table.name.unique()[:8])}')
    return rows.iloc[0].singular_values
