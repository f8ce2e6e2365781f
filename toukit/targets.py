"""Which linears a method touches, per model family; the q/k/v blocks of a fused attention projection and the one
(out x in) reading of a dense layer's weight, Conv1D's included.

Everything toukit knows about a model's layout lives here, in one `Family` description computed from the model's
module tree: which block a layer belongs to, which linears are attention and which MLP, which are the blocks'
attention and MLP output projections, and which projection fuses q, k and v. The rest of toukit asks these
functions (`model_family`, `layer_kind`, `block_index`, `layer_type`, `fused_splits`, `output_projections`) and
never matches layer names itself.

The description comes from structure, not from per-model name lists, so timm ViTs, BERT/RoBERTa/DeBERTa,
DistilBERT, GPT-2, GPT-NeoX, BLOOM, OPT, Llama, Mistral, Qwen2, T5, BART, HF ViT, DeiT and Swin all resolve the
same way: a *block* is an element of a ModuleList (or Sequential) of same-class modules that holds an attention
module, the innermost such; inside a block, every dense layer (nn.Linear or transformers' Conv1D) under a module
whose class name says attention ('Attention', 'Attn') is attention, and every other one is MLP; dense layers
outside blocks (embedding projections, poolers, heads, patch merging) are neither and are never targets by
default, nor is anything that shares its weight with an embedding or is the model's output embedding. A model with
no block exposes every dense layer but its head under `targets='all'`; anything that needs layer kinds on it raises
with its linears listed.
"""
import copy
import fnmatch
import re
import sys
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ['Targets', 'Family', 'model_family', 'find_targets', 'fused_splits', 'new_modules', 'get_submodule_parent',
           'layer_kind', 'block_index', 'layer_type', 'output_projections', 'layer_matrices', 'describe_linears',
           'require_family', 'QKV_PARTS', 'matches', 'dense_types', 'is_dense', 'is_conv1d', 'conv1d_orientation',
           'dense_weight', 'dense_shape', 'dense_template', 'restore_dense', 'qkv_blocks', 'qkv_part',
           'FUSED_QKV_NAMES']

Targets = Union[str, Sequence[str], None]
ATTENTION_CLASS = re.compile(r'Attention|Attn')  # class names of attention modules, in timm and transformers
# projections that stack q, k and v as three contiguous row blocks (out = 3 * in). GPT-NeoX's and BLOOM's
# query_key_value interleave them per head, so they are not split: each stays one matrix
FUSED_QKV_NAMES = ('qkv', 'c_attn', 'Wqkv')
QKV_PARTS = ('q', 'k', 'v')


def dense_types() -> tuple:
    """The dense layer classes: nn.Linear, and transformers' Conv1D (GPT-2) once transformers is imported."""
    pytorch_utils = sys.modules.get('transformers.pytorch_utils')  # no Conv1D exists before transformers loads
    return (nn.Linear,) + ((pytorch_utils.Conv1D,) if pytorch_utils is not None else ())


def is_dense(module: nn.Module) -> bool:
    """Whether `module` computes x W^T + b: nn.Linear or Conv1D, or a subclass that keeps their forward or whose own
    forward computes the same (Falcon's FalconLinear; checked once on one random row). A subclass whose forward
    computes something else (Llama 4's router returns scores and logits) is never a target."""
    types = dense_types()
    if not isinstance(module, types):
        return False
    if any(type(module).forward is t.forward for t in types):
        return True
    if module not in _OWN_FORWARD:
        _OWN_FORWARD[module] = _computes_dense(module)
    return _OWN_FORWARD[module]


_OWN_FORWARD = weakref.WeakKeyDictionary()  # dense subclass with a forward of its own -> whether it is x W^T + b


def _computes_dense(module: nn.Module) -> bool:
    weight = conv1d_orientation(module.weight, is_conv1d(module))
    if weight.device.type == 'meta':
        return False
    x = torch.randn(1, weight.shape[1], generator=torch.Generator().manual_seed(0)).to(weight)
    with torch.no_grad():  # the probe and its expected output: no autograd graph (and no warning reading them)
        try:
            out = module(x)
        except Exception:  # noqa: BLE001 - any failure: not a plain dense layer
            return False
        expected = F.linear(x, weight, getattr(module, 'bias', None)).float()
    tol = 1e-4 if weight.dtype in (torch.float32, torch.float64) else 3e-2  # bf16 / fp16 round at ~1e-2
    return isinstance(out, torch.Tensor) and out.shape == expected.shape and torch.allclose(
        out.float(), expected, rtol=tol, atol=tol * float(expected.abs().max().clamp_min(1e-6)))


def is_conv1d(module: nn.Module) -> bool:
    """Whether `module` is transformers' Conv1D (GPT-2), which stores its weight as (in x out)."""
    conv1d = dense_types()[1:]
    return bool(conv1d) and isinstance(module, conv1d)


def conv1d_orientation(weight: torch.Tensor, conv1d: bool) -> torch.Tensor:
    """A dense weight between its (out x in) form and its stored form: transposed for Conv1D, which stores (in x
    out), as it is otherwise. The transpose is its own inverse, so this reads a stored weight and writes one."""
    return weight.T if conv1d else weight


def dense_weight(module: nn.Module) -> torch.Tensor:
    """A dense layer's weight as (out x in), whatever its layout (Conv1D stores in x out); a toukit layer's
    effective weight (formed: for analysis and merge, never in a forward)."""
    if hasattr(module, 'effective_weight'):
        return module.effective_weight()
    return conv1d_orientation(module.weight, is_conv1d(module))


def qkv_blocks(tensor: torch.Tensor, splits: int = 3) -> Tuple[torch.Tensor, ...]:
    """The `splits` equal row blocks of a fused projection's weight (out x in) or bias (out), as views: q, k and v
    for splits=3, the tensor itself for splits=1."""
    return tensor.reshape(splits, tensor.shape[0] // splits, *tensor.shape[1:]).unbind(0)


def qkv_part(tensor: torch.Tensor, part: str) -> torch.Tensor:
    """The q, k or v block (`part`) of a fused q/k/v projection's weight or bias."""
    return qkv_blocks(tensor)[QKV_PARTS.index(part)]


def dense_shape(module: nn.Module) -> Tuple[int, int]:
    """(out, in) of a dense layer or a toukit layer, without forming any matrix."""
    if hasattr(module, 'effective_weight'):
        return module.out_features, module.in_features
    shape = tuple(module.weight.shape)
    return shape[::-1] if is_conv1d(module) else shape


def dense_template(module: nn.Module) -> nn.Module:
    """A weightless copy of a dense layer (nn.Linear, any subclass, Conv1D): its class, attributes and buffers, with
    its own parameters on the meta device, so `restore_dense` can rebuild it without guessing a constructor.

    Raises:
        ValueError: a subclass of nn.Linear whose weight is not (out_features x in_features): toukit could not
            restore its layout.
    """
    if isinstance(module, nn.Linear) and tuple(module.weight.shape) != (module.out_features, module.in_features):
        raise ValueError(f'{type(module).__name__}: weight of shape {tuple(module.weight.shape)} is not (out_features, '
                         f'in_features) = ({module.out_features}, {module.in_features}); toukit cannot restore this '
                         f'layer at merge')
    memo = {id(p): nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device='meta'), requires_grad=p.requires_grad)
            for p in module.parameters(recurse=False)}
    return copy.deepcopy(module, memo)


def restore_dense(template: nn.Module, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> nn.Module:
    """`template` (from `dense_template`) as a working layer computing x W^T + b, W given as (out x in): the same
    class and layout, a bias exactly when the template has one, each parameter's `requires_grad` kept.

    Raises:
        ValueError: a weight or bias that does not fit the template, or a bias given to a layer without one (or
            none to a layer with one).
    """
    layer = copy.deepcopy(template)
    stored = conv1d_orientation(weight, is_conv1d(layer))
    name = type(layer).__name__
    if tuple(stored.shape) != tuple(layer.weight.shape):
        raise ValueError(f'{name}: a weight of shape {tuple(weight.shape)} (out x in) does not fit its stored '
                         f'weight of shape {tuple(layer.weight.shape)}')
    has_bias = getattr(layer, 'bias', None) is not None
    if has_bias != (bias is not None):
        raise ValueError(f'{name}: the layer was built {"with" if has_bias else "without"} a bias, and the merge '
                         f'brings {"none" if bias is None else "one"}')
    layer.weight = nn.Parameter(stored.detach().contiguous().clone(), requires_grad=template.weight.requires_grad)
    if has_bias:
        layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=template.bias.requires_grad)
    return layer


@dataclass(frozen=True)
class Family:
    """A model's layout, computed from its module tree (`model_family`).

    Attributes:
        name: `config.model_type` when the model has a transformers config (also inside a wrapper), else the
            model's class name.
        kinds: dense layer name -> 'attention' or 'mlp', for every dense layer inside a block.
        blocks: dense layer name -> (the block's module name, its index in its block list).
        attention_outputs: the last dense layer of each attention module (where an adapter goes).
        mlp_outputs: the last MLP dense layer of each block.
        fused_qkv: the attention projections that stack q, k and v.
    """
    name: str
    kinds: Dict[str, str] = field(default_factory=dict)
    blocks: Dict[str, Tuple[str, int]] = field(default_factory=dict)
    attention_outputs: Tuple[str, ...] = ()
    mlp_outputs: Tuple[str, ...] = ()
    fused_qkv: Tuple[str, ...] = ()


def _block_lists(model: nn.Module) -> List[Tuple[str, List[Tuple[str, nn.Module]]]]:
    """(list name, [(element name, element)]) of every ModuleList / Sequential of same-class elements with
    attention inside."""
    found = []
    for name, module in model.named_modules():
        if not isinstance(module, (nn.ModuleList, nn.Sequential)) or len(module) == 0:
            continue
        elements = list(module.named_children())
        if len({type(m) for _, m in elements}) != 1:
            continue
        if any(ATTENTION_CLASS.search(type(sub).__name__) for _, m in elements for sub in m.modules()):
            prefix = f'{name}.' if name else ''
            found.append((name, [(prefix + n, m) for n, m in elements]))
    return found


def _model_type(model: nn.Module) -> Optional[str]:
    for module in model.modules():
        config = getattr(module, 'config', None)
        if getattr(config, 'model_type', None):
            return config.model_type
    return None


def model_family(model: nn.Module) -> Optional[Family]:
    """The model's `Family` (its blocks and the kind of every dense layer in them), or None if it has no block."""
    block_of = {}  # element name -> index, for the innermost block lists
    lists = _block_lists(model)
    list_names = {n for n, _ in lists}
    for _, elements in lists:
        for index, (name, element) in enumerate(elements):
            inner = any(isinstance(m, (nn.ModuleList, nn.Sequential)) and f'{name}.{n}' in list_names
                        for n, m in element.named_modules() if n)
            if not inner:
                block_of[name] = index
    if not block_of:
        return None
    modules = dict(model.named_modules())
    kinds, blocks, attention_outputs, mlp_last, fused = {}, {}, {}, {}, []
    for name, module in modules.items():
        if not (is_dense(module) or hasattr(module, 'effective_weight')):  # a toukit layer stands for its dense layer
            continue
        parts = name.split('.')
        ancestors = ['.'.join(parts[:i]) for i in range(len(parts) - 1, 0, -1)]  # nearest first
        block = next((a for a in ancestors if a in block_of), None)
        if block is None:
            continue
        inside = ancestors[:ancestors.index(block)]
        # the outermost attention module in the block (BERT's BertAttention holds BertSelfAttention and its output)
        attention = next((a for a in reversed(inside) if ATTENTION_CLASS.search(type(modules[a]).__name__)), None)
        kinds[name] = 'attention' if attention else 'mlp'
        blocks[name] = (block, block_of[block])
        if attention:
            attention_outputs[attention] = name  # the last dense layer registered under it
            out_f, in_f = dense_shape(module)
            if parts[-1] in FUSED_QKV_NAMES and out_f == 3 * in_f:
                fused.append(name)
        else:
            mlp_last[block] = name
    return Family(name=_model_type(model) or type(model).__name__, kinds=kinds, blocks=blocks,
                  attention_outputs=tuple(attention_outputs.values()), mlp_outputs=tuple(mlp_last.values()),
                  fused_qkv=tuple(fused))


def layer_kind(family: Optional[Family], name: str) -> Optional[str]:
    """'attention', 'mlp' or None (no family, or a dense layer outside the blocks)."""
    return None if family is None else family.kinds.get(name)


def block_index(family: Optional[Family], name: str) -> Optional[int]:
    """The block (depth) a layer belongs to, within its block list, or None."""
    entry = None if family is None else family.blocks.get(name)
    return None if entry is None else entry[1]


def layer_type(family: Optional[Family], name: str, part: Optional[str] = None) -> str:
    """A layer's type independent of its depth, e.g. 'attn.qkv[q]' or 'attention.self.query'.

    With several block lists (an encoder and a decoder), the list's name stays in front: 'decoder.block.*.x'.
    """
    entry = None if family is None else family.blocks.get(name)
    short = name
    if entry is not None:
        block, _ = entry
        short = name[len(block) + 1:]
        lists = {b.rsplit('.', 1)[0] if '.' in b else '' for b, _ in family.blocks.values()}
        if len(lists) > 1:
            short = f'{block.rsplit(".", 1)[0]}.*.{short}'
    return f'{short}[{part}]' if part else short


def describe_linears(model: nn.Module, limit: int = 12) -> str:
    """The model's dense layer names, for error messages."""
    have = [n for n, m in model.named_modules() if is_dense(m)]
    shown = ', '.join(have[:limit]) + (f', ... ({len(have)} in all)' if len(have) > limit else '')
    return shown or 'none'


def require_family(model: nn.Module, what: str) -> Family:
    """The model's family, or a ValueError saying `what` needs one and listing the model's linears."""
    family = model_family(model)
    if family is None:
        raise ValueError(f'{what} needs to know which linears are attention and which MLP, and this model has no '
                         f'transformer block toukit recognises (a list of same-class modules with an attention '
                         f'module inside); its linears are: {describe_linears(model)}. Pass targets as a list of '
                         f'module-name patterns instead')
    return family


def _backbones(model: nn.Module) -> List[str]:
    """Names of the pretrained backbones inside `model`, outermost first: for each Hugging Face model, its base model
    (the child named by `base_model_prefix`, or the model itself when it is a base model such as BertModel)."""
    found = []
    for name, module in model.named_modules():
        if any(name == b or name.startswith(b + '.') or b == '' for b in found):
            continue
        prefix = getattr(module, 'base_model_prefix', None)
        if not isinstance(prefix, str) or not hasattr(module, 'config'):
            continue
        base = getattr(module, prefix, None) if prefix else None
        found.append(f'{name}.{prefix}'.lstrip('.') if isinstance(base, nn.Module) else name)
    return found


def new_modules(model: nn.Module) -> List[str]:
    """The modules a task adds to the pretrained backbone (its head): they train under every method.

    Decided from loading where loading told: a model built by `toukit.create_model` from a local Hugging Face
    checkpoint lists the modules whose weights the checkpoint lacked (`toukit_new_modules_from_loading`: a new
    classifier, a pooler the checkpoint did not have). Otherwise from the module tree: timm's classifier as its
    `pretrained_cfg` names it; for a Hugging Face model every module with parameters outside the base model
    (`base_model_prefix`), whoever built the model (DistilBERT's pre_classifier and classifier, a score, a head of any
    name around an encoder), except in a model with output embeddings (a language-modelling head, MLM transforms
    included, is pretrained) and anything sharing its weight with an embedding; any other model: its last dense
    layer. Returned as the outermost such modules, in module order.
    """
    loaded = getattr(model, 'toukit_new_modules_from_loading', None)
    if loaded is not None:
        return list(loaded)
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    modules = dict(model.named_modules())
    if cfg.get('classifier'):
        names = [cfg['classifier']] if isinstance(cfg['classifier'], str) else list(cfg['classifier'])
        return [n for n in names if n in modules]
    backbones = _backbones(model)
    if not backbones:
        dense = [n for n, m in modules.items() if is_dense(m)]
        return dense[-1:]
    language_models = [n for n, m in modules.items() if _output_embeddings(m) is not None]
    embedded = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}

    def pretrained(name: str, module: nn.Module) -> bool:
        inside = any(b == '' or name == b or name.startswith(b + '.') or b.startswith(name + '.')
                     for b in backbones + language_models)
        return inside or not name or id(getattr(module, 'weight', None)) in embedded

    found = []
    for name, module in modules.items():
        if any(name.startswith(f + '.') for f in found) or next(module.parameters(), None) is None:
            continue
        if not any(pretrained(n, m) for n, m in module.named_modules(prefix=name)):
            found.append(name)
    return found


def _output_embeddings(module: nn.Module) -> Optional[nn.Module]:
    """A Hugging Face model's output embeddings (its LM head), or None (no such head, or not such a model)."""
    get = getattr(type(module), 'get_output_embeddings', None)
    if get is None or not hasattr(module, 'config'):
        return None
    try:
        return get(module)
    except (AttributeError, NotImplementedError):
        return None


def matches(name: str, pattern: str) -> bool:
    """Whether module `name` is `pattern`, ends with '.' + `pattern`, or matches it as a glob."""
    return name == pattern or name.endswith('.' + pattern) or fnmatch.fnmatchcase(name, pattern)


def head_names(model: nn.Module) -> List[str]:
    """Dense layers that are a head: the classifier, the output embeddings, or tied to any embedding's weight."""
    modules = dict(model.named_modules())
    heads = {n for head in new_modules(model) for n, m in modules[head].named_modules(prefix=head) if is_dense(m)}
    output = getattr(model, 'get_output_embeddings', None)
    output = output() if callable(output) else None
    tied = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for name, module in model.named_modules():
        if is_dense(module) and (module is output or id(module.weight) in tied):
            heads.add(name)
    return sorted(heads)


def find_targets(model: nn.Module, targets: Targets = 'all', module_type=None) -> 'OrderedDict[str, nn.Module]':
    """The dense layers a method should touch, in `named_modules()` order.

    Args:
        model: any nn.Module.
        targets: 'all' (every dense layer inside the transformer blocks: not embeddings, not the head), 'attention',
            'mlp', or a list of module-name patterns (a full name, a name suffix such as 'fc1', or a glob).
        module_type: the class (or tuple) of modules to return; default nn.Linear and Conv1D.

    Raises:
        ValueError: targets that match nothing, or that match a head (a classifier, an LM head, a layer tied to an
            embedding: never factorized); the message lists the model's linears.
    """
    targets = 'all' if targets is None else targets
    module_type = module_type or dense_types()
    candidates = [(n, m) for n, m in model.named_modules() if isinstance(m, module_type) and is_dense(m)]
    heads = set(head_names(model))
    if isinstance(targets, str) and targets in ('all', 'attention', 'mlp'):
        family = model_family(model)
        if family is None and targets == 'all':
            found = [(n, m) for n, m in candidates if n not in heads]
        else:
            family = require_family(model, f'targets={targets!r}')
            kinds = ('attention', 'mlp') if targets == 'all' else (targets,)
            found = [(n, m) for n, m in candidates if layer_kind(family, n) in kinds and n not in heads]
    else:
        patterns = [targets] if isinstance(targets, str) else list(targets)
        if not patterns or not all(isinstance(p, str) for p in patterns):
            raise ValueError(f'targets={targets!r}: expected "all", "attention", "mlp" or a list of name patterns')
        found = [(n, m) for n, m in candidates if any(matches(n, p) for p in patterns)]
        hit = [n for n, _ in found if n in heads]
        if hit:
            raise ValueError(f'targets={targets!r} match the head {", ".join(hit)} (a classifier, an LM head or a '
                             f'layer tied to an embedding): heads are never factorized; its other linears are: '
                             f'{describe_linears(model)}')
    if not found:
        raise ValueError(f'targets={targets!r} match no {getattr(module_type, "__name__", "dense layer")} in the '
                         f'model; its linears are: {describe_linears(model)}')
    return OrderedDict(found)


def output_projections(model: nn.Module) -> 'OrderedDict[str, nn.Module]':
    """Every attention module's output projection and every block's MLP output (where adapters go), in order."""
    family = require_family(model, 'the adapter method')
    wanted = set(family.attention_outputs) | set(family.mlp_outputs)
    return OrderedDict((n, m) for n, m in model.named_modules() if n in wanted)


def fused_splits(family: Optional[Family], name: str, module: nn.Module) -> int:
    """How many equal matrices a dense layer fuses: 3 for a q/k/v projection of its family, else 1."""
    return 3 if family is not None and name in family.fused_qkv and is_dense(module) else 1


def get_submodule_parent(model: nn.Module, name: str) -> Tuple[nn.Module, str]:
    """(parent module, attribute name) of the submodule called `name`."""
    parent_name, _, child = name.rpartition('.')
    return (model.get_submodule(parent_name) if parent_name else model), child


def layer_matrices(model: nn.Module, targets: Targets = None) -> Iterator[Tuple[str, Optional[str], torch.Tensor]]:
    """(name, part, weight) for every targeted linear; a fused q/k/v projection yields its three blocks."""
    family = model_family(model)
    for name, linear in find_targets(model, targets).items():
        weight = dense_weight(linear).detach()
        if fused_splits(family, name, linear) == 1:
            yield name, None, weight
        else:
            for part, block in zip(QKV_PARTS, qkv_blocks(weight)):
                yield name, part, block
