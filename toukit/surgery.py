"""Module surgery shared by every method: put a layer in place of another, see what a method put into a model,
and put a model back exactly as it was when a preparation fails.
"""
import sys
from contextlib import contextmanager
from typing import Callable, List, Optional

from torch import nn

from .layers import AdapterLinear, QKVSplit, ToukitLayer, split_qkv
from .targets import Targets, find_targets, get_submodule_parent

__all__ = ['is_peft_layer', 'method_layers', 'has_method_layers', 'describe_preparation', 'is_prepared',
           'check_untouched', 'unchanged_on_error', 'replace_layer', 'split_view', 'replace_targets']


def is_peft_layer(module: nn.Module) -> bool:
    tuners = sys.modules.get('peft.tuners.tuners_utils')  # no peft layer can exist before peft is imported
    return tuners is not None and isinstance(module, tuners.BaseTunerLayer)


def method_layers(model: nn.Module) -> List[str]:
    """'<layer class> at <name>' for every layer a method put into `model` (toukit's or peft's)."""
    return [f'{type(m).__name__} at {n}' for n, m in model.named_modules()
            if isinstance(m, (ToukitLayer, QKVSplit, AdapterLinear)) or is_peft_layer(m)]


def has_method_layers(model: nn.Module) -> bool:
    """Whether a method put layers of its own into `model` (toukit's, peft's, or a split q/k/v view)."""
    return bool(method_layers(model))


def describe_preparation(model: nn.Module) -> Optional[str]:
    """What a method did to `model`, for messages: toukit's mark and the first method layer; None if untouched."""
    layers = method_layers(model)
    mark = getattr(model, 'toukit_method', None)
    parts = ([f'method {mark!r}'] if mark else []) + layers[:1]
    return ', '.join(parts) or None


def is_prepared(model: nn.Module) -> bool:
    """Whether a method was applied to `model` (toukit's mark, or a layer a method put there)."""
    return describe_preparation(model) is not None


def check_untouched(model: nn.Module) -> None:
    applied = describe_preparation(model)
    if applied:
        raise ValueError(f'model already prepared ({applied}); applying a method twice would stack it: '
                         f'start from an untouched model or call toukit.merge(model) first')


@contextmanager
def unchanged_on_error(model: nn.Module):
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


def replace_layer(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, child = get_submodule_parent(model, name)
    if isinstance(parent, nn.MultiheadAttention):
        if isinstance(new, ToukitLayer):
            new.read_by_parent = True  # its forward reads out_proj.weight as a matrix: formed there, deliberately
        elif isinstance(new, AdapterLinear):
            raise ValueError(f'{name}: nn.MultiheadAttention reads {child}.weight directly, never calling {child}, '
                             f'so an adapter there would be bypassed; choose other targets')
    setattr(parent, child, new)


def split_view(model: nn.Module) -> None:
    """Freeze `model` and show a fused q/k/v as three matrices, as the paper counts LoRA's parameters."""
    model.requires_grad_(False)
    split_qkv(model)


def replace_targets(model: nn.Module, targets: Targets, build: Callable[[int, str, nn.Linear], nn.Module]) -> None:
    """`split_view`, then each target (the i-th, by name) replaced by `build(i, name, linear)`."""
    split_view(model)
    for i, (name, linear) in enumerate(find_targets(model, targets).items()):
        replace_layer(model, name, build(i, name, linear))
