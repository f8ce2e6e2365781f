"""Studies that factorize models or compare rank policies: reconstruction error by rank, TOU's initial error by rank
and noise scale, and rank policies at equal budgets.

They sit above `toukit.methods` (they call `apply_tou` on copies of a model); the spectrum tables they start from
sit below, in `toukit.spectrum`.
"""
import copy
import math
from typing import Dict, Sequence, Tuple

import numpy as np
import pandas as pd
import torch
from torch import nn

from .calibration import capture_layer_inputs
from .linalg import energy_curve, relative_error
from .tou import apply_tou
from .models import call_model
from .ranks import DEFAULT_FRACTION, RankSpec, parse_rank, rank_from_fraction, uniform_cost
from .spectrum import layer_columns, rank_table, spectrum_table, total_error
from .targets import Targets, dense_weight, layer_matrices, model_family, qkv_part

__all__ = ['error_curves', 'compare_policies', 'layer_output_errors', 'pattern_cost',
           'budget_policies', 'tou_errors', 'budget_study']



def error_curves(table: pd.DataFrame, fractions: Sequence[float] = tuple(np.linspace(0.02, 1.0, 50))) -> pd.DataFrame:
    """Relative weight error of each layer's rank-k truncation, k = fraction * max_rank (long form).

    Columns: name, part, type, block, kind, fraction, rank, relative_error, energy_kept.
    """
    rows = []
    for row in table.itertuples():
        s = torch.as_tensor(row.singular_values)
        curve = energy_curve(s)
        for f in fractions:
            k = rank_from_fraction(f, row.max_rank)
            rows.append(dict(name=row.name, part=row.part, type=row.type, block=row.block, kind=row.kind,
                             fraction=float(f), rank=k, relative_error=relative_error(s, k),
                             energy_kept=float(curve[k - 1])))
    return pd.DataFrame(rows)


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
            k = rank_from_fraction(f, len(s))
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
                    merged = modules[name].effective_weight()
                    if part is not None:
                        merged = qkv_part(merged, part)
                    diff = float(torch.linalg.norm((merged - w).double()) ** 2)
                    energy = float(torch.linalg.norm(w.double()) ** 2)
                    num, den = num + diff, den + energy
                    layer_rows.append(dict(rank=str(rank), noise_scale=alpha, **layer_columns(family, name, part),
                                           weight_error=float(np.sqrt(diff / energy))))
            total_rows.append(dict(rank=str(rank), noise_scale=alpha, weight_error=float(np.sqrt(num / den)),
                                   logit_error=_relative(logits, reference)))
    return pd.DataFrame(layer_rows), pd.DataFrame(total_rows)


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
                    approx = factored[name].effective_weight().double()
                    x = inputs[name].double()
                    w_num += float((approx - w).square().sum())
                    w_den += float(w.square().sum())
                    o_num += float((x @ (approx - w).T).square().sum())
                    o_den += float((x @ w.T).square().sum())
                logits = torch.cat([call_model(prepared.eval(), batch) for batch in (
                    heldout if isinstance(heldout, (list, tuple)) else [heldout])])
            rows.append(dict(budget=budget, policy=policy, trainable=pattern_cost(table, prepared.toukit_ranks),
                             weight_error=(w_num / w_den) ** 0.5, output_error=(o_num / o_den) ** 0.5,
                             logit_error=_relative(logits, reference)))
    return pd.DataFrame(rows)
