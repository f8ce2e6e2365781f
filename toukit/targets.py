"""Which linears a method touches, per model family, and the q/k/v view of a fused attention projection.

Families are recognised from module names, so a timm ViT, a Hugging Face BERT-like encoder and the
toukit text classifier built on one all resolve without configuration. A model of no known family
exposes every nn.Linear under `targets='all'`.
"""
import fnmatch
import re
from collections import OrderedDict
from typing import List, Optional, Sequence, Union

import torch
from torch import nn

__all__ = ['Targets', 'model_family', 'find_targets', 'fused_splits', 'classifier_names', 'QKVSplit', 'split_qkv',
           'fuse_qkv', 'get_submodule_parent', 'is_mlp']

Targets = Union[str, Sequence[str], None]

# name patterns (regular expressions, searched in the full module name) per family and part
FAMILIES = {
    'vit': {  # timm VisionTransformer and relatives: blocks.N.attn.qkv / proj, blocks.N.mlp.fc1 / fc2
        'detect': r'(^|\.)blocks\.\d+\.attn\.qkv$',
        'attention': r'(^|\.)blocks\.\d+\.attn\.(qkv|q|k|v|qkv\.[qkv]|proj)$',
        'mlp': r'(^|\.)blocks\.\d+\.mlp\.fc[12]$',
    },
    'bert': {  # Hugging Face BERT / RoBERTa / MiniLM encoders
        'detect': r'(^|\.)layer\.\d+\.attention\.self\.query$',
        'attention': r'(^|\.)layer\.\d+\.attention\.(self\.(query|key|value)|output\.dense)$',
        'mlp': r'(^|\.)layer\.\d+\.(intermediate\.dense|output\.dense)$',
    },
}
CLASSIFIER_NAMES = ('head', 'classifier', 'fc', 'head.fc')


def model_family(model: nn.Module) -> Optional[str]:
    """'vit', 'bert' or None, from the model's module names."""
    names = [n for n, _ in model.named_modules()]
    for family, spec in FAMILIES.items():
        if any(re.search(spec['detect'], n) for n in names):
            return family
    return None


def is_mlp(model_or_family, name: str) -> bool:
    """Whether module `name` is an MLP (feed-forward) linear of its family."""
    family = model_or_family if isinstance(model_or_family, (str, type(None))) else model_family(model_or_family)
    return family is not None and re.search(FAMILIES[family]['mlp'], name) is not None


def classifier_names(model: nn.Module) -> List[str]:
    """Names of the classifier head's modules (timm's pretrained_cfg['classifier'], else common names)."""
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    candidates = [cfg['classifier']] if isinstance(cfg.get('classifier'), str) else list(CLASSIFIER_NAMES)
    modules = dict(model.named_modules())
    return [c for c in candidates if c in modules]


def _matches(name: str, pattern: str) -> bool:
    return name == pattern or name.endswith('.' + pattern) or fnmatch.fnmatchcase(name, pattern)


def find_targets(model: nn.Module, targets: Targets = 'all', module_type=nn.Linear) -> 'OrderedDict[str, nn.Module]':
    """The modules of `module_type` a method should touch, in `named_modules()` order.

    Args:
        model: any nn.Module.
        targets: 'all' (every linear inside the transformer blocks: not embeddings, not the head), 'attention',
            'mlp', or a list of module-name patterns (a full name, a name suffix such as 'fc1', or a glob).
        module_type: the class (or tuple) of modules to return.

    Raises:
        ValueError: targets that match nothing; the message lists the linears the model has.
    """
    targets = 'all' if targets is None else targets
    family = model_family(model)
    candidates = [(n, m) for n, m in model.named_modules() if isinstance(m, module_type)]
    if isinstance(targets, str) and targets in ('all', 'attention', 'mlp'):
        if family is None:
            if targets != 'all':
                raise ValueError(f'targets={targets!r} needs a known model family (timm ViT or BERT-like); '
                                 f'this model has none: pass a list of module names')
            head = set(classifier_names(model))
            found = [(n, m) for n, m in candidates if n not in head]
        else:
            parts = ('attention', 'mlp') if targets == 'all' else (targets,)
            found = [(n, m) for n, m in candidates if any(re.search(FAMILIES[family][p], n) for p in parts)]
    else:
        patterns = [targets] if isinstance(targets, str) else list(targets)
        if not patterns or not all(isinstance(p, str) for p in patterns):
            raise ValueError(f'targets={targets!r}: expected "all", "attention", "mlp" or a list of name patterns')
        found = [(n, m) for n, m in candidates if any(_matches(n, p) for p in patterns)]
    if not found:
        have = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        shown = ', '.join(have[:12]) + (f', ... ({len(have)} in all)' if len(have) > 12 else '')
        raise ValueError(f'targets={targets!r} match no {getattr(module_type, "__name__", "module")} in the model; '
                         f'its linears are: {shown or "none"}')
    return OrderedDict(found)


def fused_splits(name: str, module: nn.Module) -> int:
    """How many equal matrices a linear fuses: 3 for a q/k/v projection named '...qkv', else 1."""
    if name.split('.')[-1] == 'qkv' and module.out_features == 3 * module.in_features:
        return 3
    return 1


def get_submodule_parent(model: nn.Module, name: str):
    """(parent module, attribute name) of the submodule called `name`."""
    parent_name, _, child = name.rpartition('.')
    return (model.get_submodule(parent_name) if parent_name else model), child


class QKVSplit(nn.Module):
    """A fused q/k/v projection seen as three linears `q`, `k`, `v`; the output is their concatenation.

    Methods that act on separate square matrices (LoRA through peft, SVFit, DeLoRA) use this view, so every
    method sees the attention as the TOU paper counts it; `fuse_qkv` turns it back into one nn.Linear.
    """

    def __init__(self, q: nn.Module, k: nn.Module, v: nn.Module):
        super().__init__()
        self.q, self.k, self.v = q, k, v

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> 'QKVSplit':
        d_in, d_out = linear.in_features, linear.out_features // 3
        parts = []
        for i in range(3):
            part = nn.Linear(d_in, d_out, bias=linear.bias is not None, device=linear.weight.device,
                             dtype=linear.weight.dtype)
            with torch.no_grad():
                part.weight.copy_(linear.weight[i * d_out:(i + 1) * d_out])
                if linear.bias is not None:
                    part.bias.copy_(linear.bias[i * d_out:(i + 1) * d_out])
            part.weight.requires_grad_(linear.weight.requires_grad)
            if part.bias is not None:
                part.bias.requires_grad_(linear.bias.requires_grad)
            parts.append(part)
        return cls(*parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.q(x), self.k(x), self.v(x)], dim=-1)

    def to_linear(self) -> nn.Linear:
        parts = [self.q, self.k, self.v]
        if not all(isinstance(p, nn.Linear) for p in parts):
            raise ValueError('QKVSplit.to_linear: merge the q, k, v layers into nn.Linear first (toukit.merge)')
        d_in, d_out = parts[0].in_features, parts[0].out_features
        has_bias = parts[0].bias is not None
        w = parts[0].weight
        linear = nn.Linear(d_in, 3 * d_out, bias=has_bias, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            linear.weight.copy_(torch.cat([p.weight for p in parts]))
            if has_bias:
                linear.bias.copy_(torch.cat([p.bias for p in parts]))
        return linear


def split_qkv(model: nn.Module) -> List[str]:
    """Replace every fused q/k/v nn.Linear in the model by a QKVSplit; returns the names replaced."""
    replaced = []
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and fused_splits(name, module) == 3:
            parent, child = get_submodule_parent(model, name)
            setattr(parent, child, QKVSplit.from_linear(module))
            replaced.append(name)
    return replaced


def fuse_qkv(model: nn.Module) -> List[str]:
    """Turn every QKVSplit back into one nn.Linear; returns the names fused."""
    fused = []
    for name, module in list(model.named_modules()):
        if isinstance(module, QKVSplit):
            parent, child = get_submodule_parent(model, name)
            setattr(parent, child, module.to_linear())
            fused.append(name)
    return fused
