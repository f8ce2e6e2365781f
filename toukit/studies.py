"""Studies that factorize models: TOU's initial error by rank and noise scale, and rank policies at equal budgets.

They sit above `toukit.methods` (they call `apply_tou` on copies of a model); the spectrum tables they start from
sit below, in `toukit.spectrum`.
"""
import copy
from typing import Sequence, Tuple

import numpy as np
import pandas as pd
import torch
from torch import nn

from .calibration import capture_layer_inputs
from .methods import apply_tou
from .models import call_model
from .ranks import RankSpec
from .spectrum import layer_columns, pattern_cost, budget_policies, spectrum_table
from .targets import QKV_PARTS, Targets, dense_weight, layer_matrices, model_family

__all__ = ['tou_errors', 'budget_study']


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
                        merged = merged.view(3, -1, merged.shape[1])[QKV_PARTS.index(part)]
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
