"""Which linears a method touches, per model family, and the q/k/v view of a fused attention projection.

Everything toukit knows about a model's layout lives here, in one `Family` description per model family:
which module names mark the family, which block a layer belongs to, which linears are attention and which MLP,
which are the blocks' attention and MLP output projections, and which projection fuses q, k and v. The rest of
toukit asks these functions (`model_family`, `layer_kind`, `block_index`, `layer_type`, `fused_splits`,
`output_projections`) and never matches layer names itself. A model of no known family exposes every
nn.Linear but its head under `targets='all'`; anything that needs layer kinds on it raises with its linears listed.
"""
import fnmatch
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

__all__ = ['Targets', 'Family', 'FAMILIES', 'model_family', 'find_targets', 'fused_splits', 'classifier_names',
           'QKVSplit', 'split_qkv', 'fuse_qkv', 'get_submodule_parent', 'layer_kind', 'block_index', 'layer_type',
           'output_projections', 'describe_linears', 'require_family', 'QKV_PARTS', 'matches']

Targets = Union[str, Sequence[str], None]


@dataclass(frozen=True)
class Family:
    """A model family's layout, as regular expressions searched in full module names.

    Attributes:
        name: the family's name.
        detect: a module name only this family has.
        block: captures a layer's block (depth) index as group 1.
        attention: the attention linears (q, k, v or a fused q/k/v, and the output projection).
        mlp: the MLP (feed-forward) linears.
        attention_output: the attention output projection of each block (where an adapter goes).
        mlp_output: the MLP output projection of each block.
        fused_qkv: a projection that holds q, k and v stacked (out = 3 * in), or None.
    """
    name: str
    detect: str
    block: str
    attention: str
    mlp: str
    attention_output: str
    mlp_output: str
    fused_qkv: Optional[str] = None


FAMILIES = {
    'vit': Family(  # timm VisionTransformer and relatives: blocks.N.attn.qkv / proj, blocks.N.mlp.fc1 / fc2
        name='vit',
        detect=r'(^|\.)blocks\.\d+\.attn\.qkv$',
        block=r'(?:^|\.)blocks\.(\d+)\.',
        attention=r'(^|\.)blocks\.\d+\.attn\.(qkv|q|k|v|qkv\.[qkv]|proj)$',
        mlp=r'(^|\.)blocks\.\d+\.mlp\.fc[12]$',
        attention_output=r'(^|\.)blocks\.\d+\.attn\.proj$',
        mlp_output=r'(^|\.)blocks\.\d+\.mlp\.fc2$',
        fused_qkv=r'(^|\.)blocks\.\d+\.attn\.qkv$',
    ),
    'bert': Family(  # Hugging Face BERT / RoBERTa / MiniLM encoders
        name='bert',
        detect=r'(^|\.)layer\.\d+\.attention\.self\.query$',
        block=r'(?:^|\.)layer\.(\d+)\.',
        attention=r'(^|\.)layer\.\d+\.attention\.(self\.(query|key|value)|output\.dense)$',
        mlp=r'(^|\.)layer\.\d+\.(intermediate\.dense|output\.dense)$',
        attention_output=r'(^|\.)layer\.\d+\.attention\.output\.dense$',
        mlp_output=r'(^|\.)layer\.\d+\.output\.dense$',
    ),
}
CLASSIFIER_NAMES = ('head', 'classifier', 'fc', 'head.fc')
QKV_PARTS = ('q', 'k', 'v')


def model_family(model: nn.Module) -> Optional[Family]:
    """The model's `Family` (found from its module names), or None."""
    names = [n for n, _ in model.named_modules()]
    for family in FAMILIES.values():
        if any(re.search(family.detect, n) for n in names):
            return family
    return None


def layer_kind(family: Optional[Family], name: str) -> Optional[str]:
    """'attention', 'mlp' or None (no family, or a linear outside the blocks' attention and MLP)."""
    if family is None:
        return None
    if re.search(family.mlp, name):
        return 'mlp'
    return 'attention' if re.search(family.attention, name) else None


def block_index(family: Optional[Family], name: str) -> Optional[int]:
    """The block (depth) a layer belongs to, or None."""
    match = re.search(family.block, name) if family is not None else None
    return int(match.group(1)) if match else None


def layer_type(family: Optional[Family], name: str, part: Optional[str] = None) -> str:
    """A layer's type independent of its depth, e.g. 'attn.qkv[q]' or 'attention.self.query'."""
    short = name[re.search(family.block, name).end():] if block_index(family, name) is not None else name
    return f'{short}[{part}]' if part else short


def describe_linears(model: nn.Module, limit: int = 12) -> str:
    """The model's nn.Linear names, for error messages."""
    have = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    shown = ', '.join(have[:limit]) + (f', ... ({len(have)} in all)' if len(have) > limit else '')
    return shown or 'none'


def require_family(model: nn.Module, what: str) -> Family:
    """The model's family, or a ValueError saying `what` needs one and listing the model's linears."""
    family = model_family(model)
    if family is None:
        raise ValueError(f'{what} needs to know which linears are attention and which MLP, and this model is of no '
                         f'known family ({", ".join(FAMILIES)}); its linears are: {describe_linears(model)}. '
                         f'Pass targets as a list of module-name patterns instead')
    return family


def classifier_names(model: nn.Module) -> List[str]:
    """Names of the classifier head's modules (timm's pretrained_cfg['classifier'], else common names)."""
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    candidates = [cfg['classifier']] if isinstance(cfg.get('classifier'), str) else list(CLASSIFIER_NAMES)
    modules = dict(model.named_modules())
    return [c for c in candidates if c in modules]


def matches(name: str, pattern: str) -> bool:
    """Whether module `name` is `pattern`, ends with '.' + `pattern`, or matches it as a glob."""
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
    candidates = [(n, m) for n, m in model.named_modules() if isinstance(m, module_type)]
    if isinstance(targets, str) and targets in ('all', 'attention', 'mlp'):
        family = model_family(model)
        if family is None and targets == 'all':
            head = set(classifier_names(model))
            found = [(n, m) for n, m in candidates if n not in head]
        else:
            family = require_family(model, f'targets={targets!r}')
            kinds = ('attention', 'mlp') if targets == 'all' else (targets,)
            found = [(n, m) for n, m in candidates if layer_kind(family, n) in kinds]
    else:
        patterns = [targets] if isinstance(targets, str) else list(targets)
        if not patterns or not all(isinstance(p, str) for p in patterns):
            raise ValueError(f'targets={targets!r}: expected "all", "attention", "mlp" or a list of name patterns')
        found = [(n, m) for n, m in candidates if any(matches(n, p) for p in patterns)]
    if not found:
        raise ValueError(f'targets={targets!r} match no {getattr(module_type, "__name__", "module")} in the model; '
                         f'its linears are: {describe_linears(model)}')
    return OrderedDict(found)


def output_projections(model: nn.Module) -> 'OrderedDict[str, nn.Linear]':
    """Every block's attention output and MLP output projection (where bottleneck adapters go), in order."""
    family = require_family(model, 'the adapter method')
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)
             and (re.search(family.attention_output, n) or re.search(family.mlp_output, n))]
    return OrderedDict(found)


def fused_splits(family: Optional[Family], name: str, module: nn.Module) -> int:
    """How many equal matrices a linear fuses: 3 for its family's q/k/v projection, else 1."""
    if (family is not None and family.fused_qkv and re.search(family.fused_qkv, name)
            and isinstance(module, nn.Linear) and module.out_features == 3 * module.in_features):
        return 3
    return 1


def get_submodule_parent(model: nn.Module, name: str) -> Tuple[nn.Module, str]:
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
    replaced, family = [], model_family(model)
    for name, module in list(model.named_modules()):
        if fused_splits(family, name, module) == 3:
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
