"""Any dataset, built-in or yours, by name or as a read `Source`: `load_dataset` and `num_classes_of`."""
import os
from pathlib import Path
from typing import Optional

from .base import DataBundle, LoadOptions, model_modality
from .registry import BuiltinDataset, builtin_dataset, builtin_names
from .sources import TABLE_SUFFIXES, Source, is_source, read_source, source_bundle


def _builtin(name: str) -> BuiltinDataset:
    dataset = builtin_dataset(name)
    if dataset is None:
        raise ValueError(f'dataset={name!r}: unknown; choose one of {", ".join(builtin_names())}, or give a table file '
                         f'({", ".join(TABLE_SUFFIXES)}), an image folder or a torch Dataset')
    return dataset


def num_classes_of(name: str, text_column: str = 'text', label_column: str = 'label',
                   split_column: Optional[str] = None) -> int:
    """The number of classes of a built-in dataset, a table file or an image folder (read for it)."""
    if is_source(name):
        return len(read_source(name, text_column, label_column, split_column).classes)
    return _builtin(name).num_classes


def load_dataset(
        name: Optional[str],
        model=None,
        modality: Optional[str] = None,
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
        source: Optional[Source] = None,
) -> DataBundle:
    """Train, validation and test sets of dataset `name` (or of `source`), preprocessed for `model`.

    Args:
        name: 'bbc', 'rotten_tomatoes', 'cifar100', 'fashion_mnist', 'synthetic', a table file or an image folder;
            ignored when `source` is given.
        model: the model the data feeds (its tokenizer or image config); None only for 'synthetic' or a torch
            Dataset's source.
        modality: 'text' or 'image', what the model takes (from the model when None).
        root: where downloadable datasets live, and where the rotten_tomatoes table is written.
        split_seed: seeds the stratified split (and the synthetic data); keep it fixed to compare runs.
        max_length: tokens per text.
        train_limit, val_limit, test_limit: keep only a seeded random subset of so many examples (quick runs).
        download: let torchvision download cifar100 / fashion_mnist when they are not on disk.
        image_size: resize images to this square side instead of the model's input size.
        text_column, label_column, split_column: a table file's columns (see the package's docstring).
        source: your data already read (`read_source`, `dataset_source`): not read again.
    """
    options = LoadOptions(Path(os.path.expanduser(root)) if root is not None else None, split_seed, max_length,
                          (train_limit, val_limit, test_limit), download, image_size)
    if source is None and is_source(name):
        source = read_source(name, text_column, label_column, split_column)
    if source is not None:
        return source_bundle(source, model, model_modality(model, modality), options)
    dataset = _builtin(name)
    modality = model_modality(model, modality)
    if dataset.modality not in ('any', modality):
        raise ValueError(f'dataset={name!r} is {dataset.modality} data; the model takes {modality} input')
    return dataset.loader(model, modality, options)
