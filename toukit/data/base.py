"""What every dataset shares: the bundle, the dataset classes, one split, one tokenizer helper, one de-duplication."""
import contextlib
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

SPLITS = ('train', 'val', 'test')
SPLIT_FRACTIONS = (0.6, 0.2, 0.2)  # train / validation / test of a dataset without an official test set
HELD_OUT_VAL_FRACTION = 0.1  # datasets with an official test set: validation's share of the training set
EXACT, CONFLICTING = 'exact duplicates', 'conflicting duplicates'  # two of the reasons a row is dropped


@dataclass
class DataBundle:
    """A dataset's train, validation and test sets, preprocessed for one model, and what the record says of it."""
    train: Dataset
    val: Dataset
    test: Dataset
    classes: List[str]
    modality: str  # 'text' or 'image'
    source: Optional[dict] = None  # your data: Source.describe() (origin, path, content hash, duplicates dropped)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


@dataclass
class Source:
    """Your data, read: inputs (texts, image files, or indices of a torch Dataset's items), integer labels, the class
    names, each example's given split (None: split by the stratified rule), and what was dropped, skipped or
    normalised on the way (said back by `toukit.data.source_summary`)."""
    origin: str  # 'table', 'image_folder' or 'python': the record's `source`
    name: str  # the file's or folder's path; a torch Dataset's 'python:<class>:<hash12>' (the config's `dataset`)
    inputs: list
    labels: np.ndarray
    classes: List[str]
    splits: Optional[np.ndarray]
    sha256: str  # of the file, of the folder's names and images; a torch Dataset's: the first 12 hex digits
    read: int = 0  # rows, image files or items read, before any was dropped
    dropped: Dict[str, list] = field(default_factory=dict)  # reason -> the data rows (from 1) or files dropped
    notes: List[str] = field(default_factory=list)  # each normalisation applied, in words
    skipped: List[str] = field(default_factory=list)  # an image folder's entries that are not images, or hidden
    given_split: Optional[str] = None  # where the given split comes from: "column 'part'", 'folders train/, test/'
    dataset: Optional[Dataset] = field(default=None, repr=False)  # origin 'python': the Dataset itself

    @property
    def duplicates(self) -> int:
        """Exact copies dropped (whitespace-normalised texts with the same label, byte-identical images): first kept."""
        return len(self.dropped.get(EXACT, []))

    def describe(self) -> dict:
        """What a run record's `data` says of the source."""
        return dict(source=self.origin, path=self.name, sha256=self.sha256, duplicates_dropped=self.duplicates)


@dataclass(frozen=True)
class LoadOptions:
    """How to load and cut a dataset: `load_dataset`'s arguments, as one object every loader takes."""
    root: Path  # where downloadable datasets live, and where the rotten_tomatoes table is written
    split_seed: int
    max_length: int  # tokens per text
    limits: Tuple[Optional[int], Optional[int], Optional[int]]  # train / val / test: at most so many examples
    download: bool
    image_size: Optional[int]


def model_modality(model, modality: Optional[str] = None) -> str:
    """`modality` if given, else what `model` takes: text when it has a tokenizer, images otherwise."""
    return modality or ('text' if getattr(model, 'tokenizer_path', None) else 'image')


class TextDataset(Dataset):
    """Pre-tokenized texts: items are ({'input_ids', 'attention_mask'}, label)."""

    def __init__(self, encodings: dict, labels: Sequence[int]):
        self.input_ids = encodings['input_ids']
        self.attention_mask = encodings['attention_mask']
        self.labels = torch.as_tensor(labels, dtype=torch.long)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return dict(input_ids=self.input_ids[i], attention_mask=self.attention_mask[i]), self.labels[i]


class ImageArrayDataset(Dataset):
    """uint8 images (N x H x W or N x H x W x C) and labels, through a PIL transform."""

    def __init__(self, images: np.ndarray, labels: Sequence[int], transform: Optional[Callable] = None):
        self.images, self.labels, self.transform = images, np.asarray(labels, dtype=np.int64), transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        image = Image.fromarray(self.images[i]).convert('RGB')
        return (self.transform(image) if self.transform else image), int(self.labels[i])


@contextlib.contextmanager
def unreadable_image(path) -> Iterator[None]:
    """Turn any failure to open or decode the image file `path` into a ValueError naming it."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - PIL raises several kinds
        raise ValueError(f'{path}: unreadable image ({type(e).__name__}: {e})') from None


def decode_image(path, content: bytes) -> None:
    """Decode the image file `path` whose bytes are `content` in full (a truncated file is caught, where PIL's
    `verify()` reads the header only); a ValueError names the file."""
    with unreadable_image(path), Image.open(io.BytesIO(content)) as image:
        image.load()


class ImageFileDataset(Dataset):
    """Image files and labels, through a PIL transform; an unreadable file raises a ValueError naming it."""

    def __init__(self, files: Sequence[str], labels: Sequence[int], transform: Optional[Callable] = None):
        self.files, self.labels, self.transform = list(files), np.asarray(labels, dtype=np.int64), transform

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        with unreadable_image(self.files[i]), Image.open(self.files[i]) as f:
            image = f.convert('RGB')
        return (self.transform(image) if self.transform else image), int(self.labels[i])


def stratified_split(labels: Sequence[int], fractions: Sequence[float], seed: int) -> List[np.ndarray]:
    """Indices of disjoint, stratified parts with the given shares of `labels` (the fractions sum to 1)."""
    from sklearn.model_selection import train_test_split  # scikit-learn takes a second to import: only when splitting
    if not np.isclose(sum(fractions), 1.0) or min(fractions) <= 0:
        raise ValueError(f'fractions={tuple(fractions)!r}: must be positive and sum to 1')
    labels = np.asarray(labels)
    rest, parts = np.arange(len(labels)), []
    for i, f in enumerate(fractions[:-1]):
        share = f / sum(fractions[i:])  # of what is left
        take, rest = train_test_split(rest, train_size=share, random_state=seed, stratify=labels[rest])
        parts.append(np.sort(take))
    return parts + [np.sort(rest)]


def limit_indices(indices: np.ndarray, limit: Optional[int], seed: int) -> np.ndarray:
    """At most `limit` of `indices`, a seeded random (not first-n) choice so every class stays represented."""
    if limit is None or limit >= len(indices):
        return indices
    return np.sort(np.random.default_rng(seed).choice(indices, size=limit, replace=False))


def limited(parts: Sequence[np.ndarray], options: LoadOptions) -> List[np.ndarray]:
    """Each of the train, val and test `parts` cut to its limit in `options`."""
    return [limit_indices(idx, lim, options.split_seed) for idx, lim in zip(parts, options.limits)]


def subsets(datasets: Sequence[Dataset], parts: Sequence[np.ndarray]) -> List[Dataset]:
    """The train, val and test sets: each of `parts` taken from its dataset in `datasets`."""
    return [torch.utils.data.Subset(ds, idx.tolist()) for ds, idx in zip(datasets, parts)]


def first_of_each(keys: Sequence) -> np.ndarray:
    """Indices of the first occurrence of each key, in order: de-duplication keeps the first copy."""
    seen, keep = set(), []
    for i, key in enumerate(keys):
        if key not in seen:
            seen.add(key)
            keep.append(i)
    return np.asarray(keep, dtype=np.int64)


def class_labels(values: Sequence, where: str) -> Tuple[np.ndarray, List[str]]:
    """(integer labels, class names) of label values, all numbers or all strings: the classes in sorted (numbers:
    numeric) order, named by their text (so labels 0..K-1 keep their index); one class only is refused, naming
    `where`."""
    ordered = sorted(set(values))
    if len(ordered) < 2:
        raise ValueError(f'{where}: one class only ({ordered[0] if ordered else "none"}); a classifier needs two or '
                         f'more')
    index = {v: i for i, v in enumerate(ordered)}
    return np.asarray([index[v] for v in values], dtype=np.int64), [str(v) for v in ordered]


def tokenized_sets(texts: Sequence[str], labels: Sequence[int], parts: Sequence[np.ndarray], tokenizer_path: str,
                   max_length: int) -> List[TextDataset]:
    """A `TextDataset` per part of `parts` (indices into `texts` and `labels`), tokenized by the model's tokenizer
    in one call, truncated and padded to `max_length` tokens."""
    from transformers import AutoTokenizer  # transformers takes a while to import: only for text
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    enc = tokenizer([texts[i] for i in np.concatenate(parts)], truncation=True, max_length=max_length,
                    padding='max_length', return_tensors='pt')
    labels, bounds = np.asarray(labels), np.cumsum([0] + [len(p) for p in parts])
    return [TextDataset({k: v[a:b] for k, v in enc.items()}, labels[idx])
            for idx, a, b in zip(parts, bounds[:-1], bounds[1:])]


def image_transform(model, image_size: Optional[int] = None):
    """The model's pretrained preprocessing (resize to its input size, normalise); no augmentation, as the
    paper names none. A model that brings its own (a local Hugging Face checkpoint's image processor) gives it as
    `image_transform`. With `image_size`, images are resized to that square side instead (a ViT interpolates its
    position embeddings), keeping the model's normalisation."""
    own = getattr(model, 'image_transform', None)
    if own is not None:
        if image_size is None:
            return own
        from torchvision import transforms  # torchvision takes a second to import: only for images
        normalize = [t for t in own.transforms if isinstance(t, transforms.Normalize)]
        resize = next((t for t in own.transforms if isinstance(t, transforms.Resize)), None)
        mode = resize.interpolation if resize is not None else transforms.InterpolationMode.BILINEAR
        return transforms.Compose([transforms.Resize((image_size, image_size), interpolation=mode),
                                   transforms.ToTensor(), *normalize])
    import timm.data  # timm takes seconds to import: only for images
    config = timm.data.resolve_data_config(model=model)
    if image_size is not None:
        config.update(input_size=(3, image_size, image_size), crop_pct=1.0)
    return timm.data.create_transform(**config, is_training=False)


def sample_batch(bundle: DataBundle, n: int = 32, split: str = 'val'):
    """The first `n` examples of a split as one batch: (inputs, labels), inputs a tensor or a dict of tensors."""
    if split not in SPLITS:
        raise ValueError(f'split={split!r}: must be one of {", ".join(SPLITS)}')
    dataset = getattr(bundle, split)
    loader = torch.utils.data.DataLoader(dataset, batch_size=min(n, len(dataset)), shuffle=False)
    return next(iter(loader))
