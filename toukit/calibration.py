"""A layer's calibration inputs and their whitening factors: what activation-aware factorization and rank
allocation read from a few batches of data.

    batches = [x for x, _ in first_batches(loader, 4)]  # the inputs of the first 4 (inputs, labels) batches
    inputs = capture_layer_inputs(model, batches)       # name -> the rows each targeted linear sees
    factors = layer_whitening(model, batches)           # name -> L with L L^T = X^T X (+ damping)
"""
import itertools
from typing import Dict, Iterable

import torch
from torch import nn

from .linalg import whitening_factor
from .targets import Targets, dense_shape, find_targets

__all__ = ['first_batches', 'capture_layer_inputs', 'layer_whitening']


def first_batches(loader: Iterable, n: int) -> list:
    """The first `n` batches of `loader` (fewer when it has fewer), as a list; no batch after them is drawn."""
    return list(itertools.islice(loader, n))


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
                try:  # a batch is a dict of tensors (text) or one tensor (images), as `toukit.models.call_model` calls
                    model(**batch) if isinstance(batch, dict) else model(batch)
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
        width = dense_shape(linear)[1]
        if x.shape[-1] != width:
            raise ValueError(f'calibration inputs of {name} are {x.shape[-1]} wide; the layer takes {width}')
        factors[name] = whitening_factor(x)
    return factors
