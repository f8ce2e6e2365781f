"""Your own data: a table file, an image folder or a torch Dataset, read and hashed once into a `Source`."""
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from .base import (HELD_OUT_VAL_FRACTION, SPLIT_FRACTIONS, SPLITS, DataBundle, ImageFileDataset, LoadOptions,
                   check_images, class_labels, first_of_each, image_transform, limited, stratified_split, subsets,
                   tokenized_sets)
from .registry import builtin_dataset

TABLE_SUFFIXES = ('.csv', '.tsv', '.jsonl', '.json', '.parquet')
IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg', '.bmp', '.gif', '.tif', '.tiff', '.webp')
SPLIT_NAMES = {'train': 'train', 'val': 'val', 'valid': 'val', 'validation': 'val', 'dev': 'val', 'test': 'test'}
MIN_PER_CLASS = 5  # a stratified split needs a few examples of each class in every part


@dataclass
class Source:
    """Your data, read: inputs (texts, image files, or indices of a torch Dataset's items), integer labels, the class
    names, each example's given split (None: split by the stratified rule), and what the record says of it."""
    origin: str  # 'table', 'image_folder' or 'python': the record's `source`
    name: str  # the file's or folder's path; a torch Dataset's 'python:<class>:<hash12>' (the config's `dataset`)
    inputs: list
    labels: np.ndarray
    classes: List[str]
    splits: Optional[np.ndarray]
    sha256: str  # of the file, of the folder's names and images; a torch Dataset's: the first 12 hex digits
    duplicates: int = 0  # exact copies dropped (whitespace-normalised texts, byte-identical images): first kept
    dataset: Optional[Dataset] = field(default=None, repr=False)  # origin 'python': the Dataset itself

    def describe(self) -> dict:
        """What a run record's `data` says of the source."""
        return dict(source=self.origin, path=self.name, sha256=self.sha256, duplicates_dropped=self.duplicates)


def is_source(name) -> bool:
    """Whether `name` is your data (a table file, an image folder, a torch Dataset's name) rather than a built-in."""
    if not isinstance(name, str) or builtin_dataset(name) is not None:
        return False
    return name.startswith('python:') or name.lower().endswith(TABLE_SUFFIXES) or Path(name).expanduser().is_dir()


def dataset_source(dataset: Dataset, name: Optional[str] = None) -> Source:
    """A map-style torch Dataset of (input, label) pairs as a `Source` that holds it, named
    'python:<class>:<hash of its labels and inputs>' (or 'python:<name>:<hash>'): that name is the run's `dataset`.

    Raises:
        ValueError: it is not a map-style Dataset, an input cannot be hashed, or it holds one class only.
    """
    if not hasattr(dataset, '__getitem__') or not hasattr(dataset, '__len__'):
        raise ValueError(f'dataset: a {type(dataset).__name__} is not a map-style torch Dataset (no __getitem__ and '
                         f'__len__)')
    digest, labels = hashlib.sha256(), []
    for i in range(len(dataset)):
        x, y = dataset[i]
        labels.append(int(y))
        digest.update(repr(int(y)).encode())
        for t in (x.values() if isinstance(x, dict) else [x]):
            digest.update(_content(t, i))
    hash12 = digest.hexdigest()[:12]
    key = f'python:{name or type(dataset).__name__}:{hash12}'
    class_labels([f'class{y}' for y in labels], key)  # two classes at least
    return Source('python', key, list(range(len(dataset))), np.asarray(labels, dtype=np.int64),
                  [f'class{i}' for i in range(max(labels) + 1)], None, hash12, dataset=dataset)


def _content(value, index: int) -> bytes:
    """The bytes an input's hash reads: its data, never a summary or a memory address (which `repr` may give)."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().contiguous().numpy().tobytes()
    if isinstance(value, np.ndarray):
        return np.ascontiguousarray(value).tobytes()
    if isinstance(value, (str, int, float)):
        return repr(value).encode()
    if hasattr(value, 'tobytes') and hasattr(value, 'size'):  # a PIL image
        return value.tobytes()
    raise ValueError(f'dataset item {index}: an input of type {type(value).__name__} cannot be hashed for the run '
                     f'id; give tensors, arrays, PIL images or strings')


# the last file or folder read, by path, modification time and columns: a run's config check, its id and its data
# share one read, and a sweep over many files keeps only one in memory
_LAST_READ: Dict[tuple, Source] = {}


def read_source(name: str, text_column: str = 'text', label_column: str = 'label',
                split_column: Optional[str] = None) -> Source:
    """Read a table file or an image folder (the last one read is kept, by path and modification time).

    Raises:
        ValueError: naming the file and the problem: it does not exist or is empty, a missing column (listing the
            columns there are), a label column with missing values, one class only, a split column with values
            other than train / val / validation / test, an unreadable image; or `name` is a torch Dataset's
            ('python:...'), which is read from the Dataset itself (`dataset_source`).
    """
    if name.startswith('python:'):
        raise ValueError(f'dataset={name!r}: a torch Dataset is read from the object, not its name; pass the Dataset '
                         f'itself (train.run(data=...)) or its Source (toukit.data.dataset_source)')
    path = Path(name).expanduser()
    if not path.exists():
        raise ValueError(f'dataset={name!r}: no such file or folder')
    key = (str(path.resolve()), path.stat().st_mtime_ns, text_column, label_column, split_column)
    if key not in _LAST_READ:
        source = _read_image_folder(path) if path.is_dir() else _read_table(path, text_column, label_column,
                                                                             split_column)
        _LAST_READ.clear()
        _LAST_READ[key] = source
    return _LAST_READ[key]


def _splits_of(values, where: str) -> np.ndarray:
    unknown = sorted({str(v) for v in values if str(v).strip().lower() not in SPLIT_NAMES})
    if unknown:
        raise ValueError(f'{where}: unknown split values {unknown[:5]}; use train, val (or validation) and test')
    return np.asarray([SPLIT_NAMES[str(v).strip().lower()] for v in values])


def _read_frame(path: Path) -> pd.DataFrame:
    """The rows of a table file, by its suffix; an unreadable or empty one is refused, naming it."""
    if path.stat().st_size == 0:
        raise ValueError(f'{path}: the file is empty')
    suffix = path.suffix.lower()
    try:
        if suffix == '.parquet':
            frame = pd.read_parquet(path)
        elif suffix in ('.jsonl', '.json'):
            frame = pd.read_json(path, lines=True)
        else:
            frame = pd.read_csv(path, sep='\t' if suffix == '.tsv' else ',')
    except Exception as e:  # noqa: BLE001 - any parser's failure is reported with the file's name
        raise ValueError(f'{path}: not a readable {suffix[1:]} table ({type(e).__name__}: {e})') from None
    if frame.empty:
        raise ValueError(f'{path}: the table has no rows')
    return frame


def _read_table(path: Path, text_column: str, label_column: str, split_column: Optional[str]) -> Source:
    frame = _read_frame(path)
    for role, column in (('text', text_column), ('label', label_column), ('split', split_column)):
        if column is not None and column not in frame:
            raise ValueError(f'{path}: no {role} column {column!r}; its columns are {", ".join(map(str, frame))}')
    missing = int(frame[label_column].isna().sum())
    if missing:
        raise ValueError(f'{path}: the label column {label_column!r} has {missing} missing values')
    labels, classes = class_labels(frame[label_column].tolist(), str(path))
    splits = _splits_of(frame[split_column].tolist(), f'{path}, column {split_column!r}') if split_column else None
    texts = frame[text_column].fillna('').astype(str).tolist()
    keep = first_of_each([' '.join(t.split()) for t in texts])  # a copy on each side of a split would leak test
    return Source('table', str(path), [texts[i] for i in keep], labels[keep], classes,
                  None if splits is None else splits[keep], hashlib.sha256(path.read_bytes()).hexdigest(),
                  duplicates=len(texts) - len(keep))


def _read_image_folder(path: Path) -> Source:
    subfolders = sorted(p.name for p in path.iterdir() if p.is_dir())
    split_dirs = [d for d in subfolders if d.lower() in SPLIT_NAMES  # a split holds class folders; a class, images
                  and any(p.is_dir() for p in (path / d).iterdir())]
    roots = [(path / d, SPLIT_NAMES[d.lower()]) for d in split_dirs] if split_dirs else [(path, None)]
    if split_dirs and 'train' not in {s for _, s in roots}:
        raise ValueError(f'{path}: split folders {split_dirs} without a train/ folder')
    classes = sorted({c.name for root, _ in roots for c in root.iterdir() if c.is_dir()})
    found, digest = [], hashlib.sha256()  # (file, class, split, content hash) of every image, in a fixed order
    for root, split in roots:
        for c in sorted(p for p in root.iterdir() if p.is_dir()):
            for f in sorted(p for p in c.rglob('*') if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES):
                content = f.read_bytes()
                digest.update(f'{f.relative_to(path)}\n'.encode())
                digest.update(content)
                found.append((str(f), c.name, split, hashlib.sha256(content).digest()))
    keep = first_of_each([key for *_, key in found])  # a copy on each side of a split would leak test into train
    kept = [found[i] for i in keep]
    files, names, splits = [f for f, *_ in kept], [c for _, c, *_ in kept], [s for _, _, s, _ in kept]
    if not files:
        raise ValueError(f'{path}: no images ({", ".join(IMAGE_SUFFIXES)}) in class folders; expected '
                         f'<class>/<image> or train/<class>/<image>')
    class_labels(names, str(path))  # two classes at least
    index = {n: i for i, n in enumerate(classes)}
    labels = np.asarray([index[n] for n in names], dtype=np.int64)
    return Source('image_folder', str(path), files, labels, classes,
                  np.asarray(splits) if split_dirs else None, digest.hexdigest(), len(found) - len(keep))


def source_parts(source: Source, split_seed: int) -> List[np.ndarray]:
    """train / val / test indices: a given split kept (test stays test; a train without val gives 10% of it to
    validation, stratified), else stratified 60/20/20, all seeded by `split_seed`."""
    counts = np.bincount(source.labels, minlength=len(source.classes))
    if counts.min() < MIN_PER_CLASS:
        few = [f'{source.classes[i]} ({counts[i]})' for i in np.flatnonzero(counts < MIN_PER_CLASS)]
        raise ValueError(f'{source.name}: too few examples to split by class: {", ".join(few[:5])}; give at least '
                         f'{MIN_PER_CLASS} of each class')
    if source.splits is None:
        return stratified_split(source.labels, SPLIT_FRACTIONS, split_seed)
    where = {s: np.flatnonzero(source.splits == s) for s in SPLITS}
    if not len(where['test']):
        raise ValueError(f'{source.name}: the given splits have no test examples')
    if not len(where['val']):
        keep, val = stratified_split(source.labels[where['train']], (1 - HELD_OUT_VAL_FRACTION,
                                                                      HELD_OUT_VAL_FRACTION), split_seed)
        where['train'], where['val'] = where['train'][keep], where['train'][val]
    return [where[s] for s in SPLITS]


def source_bundle(source: Source, model, modality: str, options: LoadOptions) -> DataBundle:
    """The train, validation and test sets of a read `source`, preprocessed for `model` (which takes `modality`)."""
    parts = limited(source_parts(source, options.split_seed), options)
    if source.origin == 'table':
        if modality != 'text':
            raise ValueError(f'{source.name}: a table of texts; the model takes {modality} input')
        sets = tokenized_sets(source.inputs, source.labels, parts, getattr(model, 'tokenizer_path', None),
                              options.max_length)
    elif source.origin == 'image_folder':
        if modality != 'image':
            raise ValueError(f'{source.name}: a folder of images; the model takes {modality} input')
        check_images([source.inputs[i] for i in np.concatenate(parts)])
        full = ImageFileDataset(source.inputs, source.labels, image_transform(model, options.image_size))
        sets = subsets([full] * 3, parts)
    else:
        sets = subsets([source.dataset] * 3, parts)
    return DataBundle(*sets, source.classes, modality, source.describe())
