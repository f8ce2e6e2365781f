"""Your own data: a table file, an image folder or a torch Dataset, read, checked and hashed once into a `Source`."""
import hashlib
import os
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from .base import (EXACT, HELD_OUT_VAL_FRACTION, SPLIT_FRACTIONS, SPLITS, DataBundle, ImageFileDataset, LoadOptions,
                   Source, class_labels, decode_image, first_of_each, image_transform, limited, stratified_split,
                   subsets, tokenized_sets)
from .registry import builtin_dataset
from .tables import SPLIT_NAMES, read_table

TABLE_SUFFIXES = ('.csv', '.tsv', '.jsonl', '.json', '.parquet')
IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg', '.bmp', '.gif', '.tif', '.tiff', '.webp')
MIN_PER_CLASS = 5  # a stratified split needs a few examples of each class in every part
SHOWN = 10  # string labels of a torch Dataset named in the note that maps them


def is_source(name) -> bool:
    """Whether `name` is your data rather than a built-in: a torch Dataset's name, or a path (a table file's suffix,
    a path separator, an existing folder), whether it exists or not (`read_source` says when it does not)."""
    if not isinstance(name, str) or builtin_dataset(name) is not None:
        return False
    separators = [s for s in ('/', os.sep, os.altsep) if s]
    return (name.startswith('python:') or name.lower().endswith(TABLE_SUFFIXES) or any(s in name for s in separators)
            or Path(name).expanduser().is_dir())


def dataset_source(dataset: Dataset, name: Optional[str] = None) -> Source:
    """A map-style torch Dataset of (input, label) pairs as a `Source` that holds it, named
    'python:<class>:<hash of its labels and inputs>' (or 'python:<name>:<hash>'): that name is the run's `dataset`.

    Every item is read and checked: an (input, label) pair, a label that is a class index (an int, a numpy integer
    or a 0-d integer tensor, 0 or more: the classes are 0..K-1) or a class name (a str: the classes are the names in
    sorted order, said in the source's notes), and one input shape (a dict input: the same keys and shapes).

    Raises:
        ValueError: naming the Dataset, the item's index and the value: it is not a map-style Dataset or is empty;
            an item is not a pair; a label is negative, a float, a bool, None or a tensor of one or more dimensions
            (one-hot), or ints and strings are mixed; an input's shape differs from item 0's; an input cannot be
            hashed; or it holds one class only.
    """
    if not hasattr(dataset, '__getitem__') or not hasattr(dataset, '__len__'):
        raise ValueError(f'dataset: a {type(dataset).__name__} is not a map-style torch Dataset (no __getitem__ and '
                         f'__len__)')
    where = f'dataset {name or type(dataset).__name__}'
    if len(dataset) == 0:
        raise ValueError(f'{where}: empty (no items)')
    digest, labels, first = hashlib.sha256(), [], None
    for i in range(len(dataset)):
        x, y = _pair(dataset[i], i, where)
        labels.append(_item_label(y, i, where))
        shape = _input_shape(x)
        if first is not None and shape != first:
            raise ValueError(f'{where}: item {i} has an input of shape {shape} where item 0 has {first}; every '
                             f'input must have one shape (a dict input: the same keys and shapes)')
        first = shape
        digest.update(repr(labels[-1]).encode())
        for t in (x.values() if isinstance(x, dict) else [x]):
            digest.update(_content(t, i))
    hash12 = digest.hexdigest()[:12]
    key = f'python:{name or type(dataset).__name__}:{hash12}'
    indices, classes, notes = _item_classes(labels, key)
    held = dataset if not notes else NamedLabels(dataset, {c: k for k, c in enumerate(classes)})
    return Source('python', key, list(range(len(dataset))), indices, classes, None, hash12, read=len(dataset),
                  notes=notes, dataset=held)


class NamedLabels(Dataset):
    """A Dataset whose labels are class names, giving each item's class index instead."""

    def __init__(self, dataset: Dataset, index: Dict[str, int]):
        self.dataset, self.index = dataset, index

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        x, y = self.dataset[i]
        return x, self.index[y]


def _pair(item, index: int, where: str) -> tuple:
    if isinstance(item, (tuple, list)) and len(item) == 2:
        return item
    what = f'a {type(item).__name__} of {len(item)} values' if isinstance(item, (tuple, list)) else \
        f'a {type(item).__name__}'
    raise ValueError(f'{where}: item {index} is {what}, not an (input, label) pair')


def _item_label(y, index: int, where: str):
    """An item's label as an int (a class index) or a str (a class name); anything else is refused."""
    if isinstance(y, str):
        return str(y)
    value = y.item() if isinstance(y, (np.generic, np.ndarray, torch.Tensor)) and np.ndim(y) == 0 else y
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(y, (np.ndarray, torch.Tensor)) and np.ndim(y) > 0:
        problem = f'a {type(y).__name__} of shape {tuple(y.shape)}: a one-hot or multi-label target?'
    else:
        problem = 'negative' if isinstance(value, int) and not isinstance(value, bool) else \
            f'a {type(value).__name__}'
    text = repr(y) if len(repr(y)) <= 60 else repr(y)[:57] + '...'
    raise ValueError(f'{where}: item {index} has the label {text} ({problem}); a label is a class index 0..K-1 '
                     f'(int) or a class name (str)')


def _input_shape(x):
    """What must be the same for every input: a tensor's or array's shape, a dict's keys and their shapes."""
    if isinstance(x, dict):
        return {k: _input_shape(v) for k, v in x.items()}
    if hasattr(x, 'shape'):
        return tuple(x.shape)
    if hasattr(x, 'size') and hasattr(x, 'mode'):  # a PIL image
        return f'{x.mode} image {x.size[0]}x{x.size[1]}'
    return type(x).__name__


def _item_classes(labels: list, key: str):
    """(class indices, class names, notes) of a Dataset's labels: ints are the indices, of classes 'class0' to
    'class<K-1>'; strings are class names, in sorted order (said in a note)."""
    strings = [isinstance(v, str) for v in labels]
    if any(strings) and not all(strings):
        odd = strings.index(not strings[0])
        raise ValueError(f'{key}: item {odd} has the label {labels[odd]!r} where item 0 has {labels[0]!r}; labels '
                         f'are all class indices (int) or all class names (str)')
    indices, names = class_labels(labels, key)  # two classes at least
    if strings[0]:
        shown = ', '.join(f'{n!r} -> {k}' for k, n in enumerate(names[:SHOWN])) + (' ...' if len(names) > SHOWN
                                                                                    else '')
        return indices, names, [f'string labels mapped to classes in sorted order: {shown}']
    return np.asarray(labels, dtype=np.int64), [f'class{i}' for i in range(max(labels) + 1)], []


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
    """Read a table file (`toukit.data.tables`) or an image folder, checking every row or image (the last one read
    is kept, by path and modification time).

    Raises:
        ValueError: naming the file, the column or item, the row and the value: no such file or folder, an empty
            file, a missing column (listing the columns there are), a missing label, a dict or list as a text or
            label, labels mixing numbers and words or differing only in case, a split value other than train / val
            / validation / test, one class only, an image that does not decode, a folder inside a class folder; or
            `name` is a torch Dataset's ('python:...'), which is read from the Dataset itself (`dataset_source`).
    """
    if name.startswith('python:'):
        raise ValueError(f'dataset={name!r}: a torch Dataset is read from the object, not its name; pass the Dataset '
                         f'itself (train.run(data=...)) or its Source (toukit.data.dataset_source)')
    path = Path(name).expanduser()
    if not path.exists():
        raise ValueError(f'dataset={name!r}: no such file or folder')
    key = (str(path.resolve()), path.stat().st_mtime_ns, text_column, label_column, split_column)
    if key not in _LAST_READ:
        source = _read_image_folder(path) if path.is_dir() else read_table(path, text_column, label_column,
                                                                            split_column)
        _LAST_READ.clear()
        _LAST_READ[key] = source
    return _LAST_READ[key]


def _read_image_folder(path: Path) -> Source:
    entries = sorted(path.iterdir())
    split_dirs = [p for p in entries if p.is_dir() and p.name.lower() in SPLIT_NAMES  # a split holds class
                  and any(q.is_dir() for q in p.iterdir())]  # folders; a class, images
    roots = [(p, SPLIT_NAMES[p.name.lower()]) for p in split_dirs] if split_dirs else [(path, None)]
    if split_dirs and 'train' not in {s for _, s in roots}:
        raise ValueError(f'{path}: split folders {[p.name for p in split_dirs]} without a train/ folder')
    skipped = [_entry(p, path) for p in entries if p not in split_dirs] if split_dirs else []
    folders = []  # (class folder, split)
    for root, split in roots:
        for p in sorted(root.iterdir()):
            if p.is_dir() and not p.name.startswith('.'):
                folders.append((p, split))
            else:
                skipped.append(_entry(p, path))
    classes = sorted({c.name for c, _ in folders})
    found, digest = [], hashlib.sha256()  # (file, class, split, content hash) of every image, in a fixed order
    for c, split in folders:
        for f in _class_images(c, path, skipped):
            content = f.read_bytes()
            decode_image(f, content)
            digest.update(f'{f.relative_to(path)}\n'.encode())
            digest.update(content)
            found.append((str(f), c.name, split, hashlib.sha256(content).digest()))
    keep = first_of_each([key for *_, key in found])  # a copy on each side of a split would leak test into train
    kept = [found[i] for i in keep]
    if not kept:
        raise ValueError(f'{path}: no images ({", ".join(IMAGE_SUFFIXES)}) in class folders; expected '
                         f'<class>/<image> or train/<class>/<image>')
    class_labels([c for _, c, *_ in kept], str(path))  # two classes at least
    index = {n: i for i, n in enumerate(classes)}
    labels = np.asarray([index[c] for _, c, *_ in kept], dtype=np.int64)
    splits = np.asarray([s for *_, s, _ in kept]) if split_dirs else None
    dropped = {EXACT: [str(Path(found[i][0]).relative_to(path)) for i in sorted(set(range(len(found))) - set(keep))]}
    return Source('image_folder', str(path), [f for f, *_ in kept], labels, classes, splits, digest.hexdigest(),
                  read=len(found), dropped=dropped, skipped=skipped,
                  given_split=f'folders {", ".join(p.name + "/" for p in split_dirs)}' if split_dirs else None)


def _entry(p: Path, root: Path) -> str:
    """A skipped entry as the summary lists it: its path under the folder read, a folder's with a trailing '/'."""
    return str(p.relative_to(root)) + ('/' if p.is_dir() else '')


def _class_images(folder: Path, root: Path, skipped: List[str]) -> List[Path]:
    """The image files of a class folder, sorted; its other files (and hidden entries) are added to `skipped`.

    Raises:
        ValueError: the class folder holds a folder (not merged into the class: name it as a class of its own).
    """
    images = []
    for f in sorted(folder.iterdir()):
        if f.name.startswith('.') or (f.is_file() and f.suffix.lower() not in IMAGE_SUFFIXES):
            skipped.append(_entry(f, root))
        elif f.is_dir():
            raise ValueError(f'{f}: a folder inside the class folder {folder.name!r}; a class folder holds image '
                             f'files only (<class>/<image> or train/<class>/<image>): move its images up, or make '
                             f'it a class folder of its own')
        else:
            images.append(f)
    return images


def source_parts(source: Source, split_seed: int) -> List[np.ndarray]:
    """train / val / test indices: a given split kept (test stays test; a train without val gives 10% of it to
    validation, stratified), else stratified 60/20/20, all seeded by `split_seed`.

    Raises:
        ValueError: fewer than `MIN_PER_CLASS` examples of a class; given splits without test examples, or with a
            class in val or test that train lacks (naming the class and the split).
    """
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
    per_split = {s: np.bincount(source.labels[idx], minlength=len(source.classes)) for s, idx in where.items()}
    for split in ('val', 'test'):
        for k in np.flatnonzero((per_split[split] > 0) & (per_split['train'] == 0)):
            raise ValueError(f'{source.name}: class {source.classes[k]!r} is in {split} ({per_split[split][k]} '
                             f'examples) but not in train; a model cannot learn a class it never sees: give train '
                             f'examples of it, or leave it out')
    if not len(where['val']):
        for k in np.flatnonzero((per_split['train'] > 0) & (per_split['train'] < 2)):
            raise ValueError(f'{source.name}: class {source.classes[k]!r} has 1 train example, too few to hold out '
                             f'validation from; give a val split or more train examples of it')
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
        full = ImageFileDataset(source.inputs, source.labels, image_transform(model, options.image_size))
        sets = subsets([full] * 3, parts)
    else:
        sets = subsets([source.dataset] * 3, parts)
    return DataBundle(*sets, source.classes, modality, source.describe())
