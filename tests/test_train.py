import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

import toukit
from toukit import data, results, train

ROOT = Path(__file__).resolve().parent.parent
METHODS = ['ft', 'lora', 'pissa', 'tou', 'tou_frozen_ffn', 'svfit', 'delora', 'bitfit']


@pytest.mark.notebook
@pytest.mark.parametrize('method', METHODS)
def test_train_notebook_writes_record(method, tmp_path):
    papermill = pytest.importorskip('papermill')
    papermill.execute_notebook(str(ROOT / 'notebooks' / 'train.ipynb'), str(tmp_path / 'out.ipynb'), cwd=str(ROOT),
                               parameters=dict(method=method, preset='test', epochs=2, max_steps_per_epoch=2,
                                               results_dir=str(tmp_path)), progress_bar=False)
    record = json.loads((tmp_path / f'test_{method}_s0.json').read_text())
    assert record['status'] == 'ok'
    assert record['run']['config']['method'] == method
    assert [e['epoch'] for e in record['metrics']['epochs']] == [1, 2]
    assert len(record['metrics']['steps']) == 4
    cost = record['cost']
    assert 0 < cost['trainable_params'] <= cost['total_params'] and cost['train_seconds'] > 0
    assert cost['peak_memory_mib'] > 0
    final = record['metrics']['final']
    if method not in ('ft', 'bitfit'):  # these never change the architecture
        assert final['merged_val_accuracy'] == final['val_accuracy']
        assert final['merged_max_abs_logit_diff'] < 1e-3
    table = results.load_runs(tmp_path)
    assert table.method.tolist() == [method] and table.status.tolist() == ['ok']


def test_text_pipeline_on_real_bbc_subset(tmp_path):
    record = train.run(method='tou', preset='demo', model='tiny-bert', epochs=1, train_limit=40, val_limit=20,
                       max_length=32, batch_size=8, lr=1e-3, results_dir=str(tmp_path), progress=False)
    assert record['status'] == 'ok'
    assert record['data']['classes'] == ['business', 'entertainment', 'politics', 'sports', 'tech']
    assert record['data']['train_size'] == 40 and record['data']['val_size'] == 20
    assert record['metrics']['final']['merged_val_accuracy'] == record['metrics']['final']['val_accuracy']


def test_bbc_split_is_stratified_and_seeded():
    model = toukit.create_model('tiny-bert', num_classes=5)
    a = data.load_dataset('bbc', model, seed=0, max_length=8)
    b = data.load_dataset('bbc', model, seed=0, max_length=8)
    assert len(a.train) + len(a.val) == 2225 and len(a.val) == 445
    assert torch.equal(a.val.input_ids, b.val.input_ids)
    share = np.bincount(a.val.labels.numpy()) / np.bincount(a.train.labels.numpy())
    assert np.allclose(share, 0.25, atol=0.01)


def test_failed_run_leaves_failed_record(tmp_path):
    with pytest.raises(ValueError, match='cifar100'):
        train.run(method='tou', preset='test', dataset='cifar100', data_root=str(tmp_path / 'none'),
                  results_dir=str(tmp_path), progress=False)
    record = json.loads((tmp_path / 'test_tou_s0.json').read_text())
    assert record['status'] == 'failed' and 'cifar100' in record['error']
    table = results.load_runs(tmp_path)
    assert table.status.tolist() == ['failed']
    assert results.load_runs(tmp_path, status='ok').empty


def _write_cifar100(root: Path, n_train=6, n_test=4):
    folder = root / 'cifar-100-python'
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in (('train', n_train), ('test', n_test)):
        # the layout of the python version of CIFAR-100 (pickled by Python 2, read with encoding='latin1')
        entry = {'data': rng.integers(0, 256, (n, 3072), dtype=np.uint8), 'fine_labels': list(range(n)),
                 'coarse_labels': [0] * n, 'filenames': [f'{i}.png' for i in range(n)]}
        with open(folder / name, 'wb') as f:
            pickle.dump(entry, f, protocol=2)
    with open(folder / 'meta', 'wb') as f:
        pickle.dump({'fine_label_names': [f'c{i}' for i in range(100)], 'coarse_label_names': ['x'] * 20}, f,
                    protocol=2)


def test_cifar100_loader_reads_cifar_pickle_format(tmp_path):
    _write_cifar100(tmp_path)
    import timm
    model = timm.create_model('test_vit', num_classes=100)
    bundle = data.load_dataset('cifar100', model, root=str(tmp_path))
    assert len(bundle.train) == 6 and len(bundle.val) == 4 and bundle.num_classes == 100
    image, label = bundle.train[3]
    assert image.shape == (3, 160, 160) and label == 3  # resized to the model's input size


def test_fashion_mnist_reads_idx_files(tmp_path, monkeypatch):
    import gzip
    folder = tmp_path / 'fm'
    folder.mkdir()
    images = np.arange(3 * 28 * 28, dtype=np.uint8).reshape(3, 28, 28)
    for stem, arr in (('train-images-idx3', images), ('t10k-images-idx3', images),
                      ('train-labels-idx1', np.array([1, 2, 3], np.uint8)),
                      ('t10k-labels-idx1', np.array([4, 5, 6], np.uint8))):
        header = bytes([0, 0, 8, arr.ndim]) + b''.join(int(d).to_bytes(4, 'big') for d in arr.shape)
        with gzip.open(folder / f'{stem}-ubyte.gz', 'wb') as f:
            f.write(header + arr.tobytes())
    monkeypatch.setattr(data, 'FASHION_MNIST_DIR', folder)
    import timm
    bundle = data.load_dataset('fashion_mnist', timm.create_model('test_vit', num_classes=10))
    image, label = bundle.val[1]
    assert image.shape == (3, 160, 160) and label == 5


def test_missing_dataset_says_how_to_get_it(tmp_path):
    import timm
    with pytest.raises(ValueError, match='download=True'):
        data.load_dataset('cifar100', timm.create_model('test_vit', num_classes=100), root=str(tmp_path))


@pytest.mark.parametrize('field, value, match', [
    ('epochs', 0, 'epochs=0'), ('batch_size', -1, 'batch_size=-1'), ('lr', -1.0, 'lr=-1.0'),
    ('method', 'nope', "method='nope'"), ('preset', 'nope', "preset='nope'"), ('noise_scale', -0.1, 'noise_scale=-0.1'),
    ('dataset', 'imagenet', "dataset='imagenet'"), ('rank', 'energy:2', 'threshold=2.0'),
    ('precision', 'fp8', "precision='fp8'")])
def test_config_rejects_bad_values(field, value, match):
    with pytest.raises(ValueError, match=match):
        train.TrainConfig(**{field: value})


def test_presets_resolve_and_overrides_win():
    config = train.resolve_config(train.TrainConfig(method='lora', preset='paper'))
    assert (config.model, config.dataset, config.epochs, config.batch_size, config.lr, config.rank) == (
        'vit_base_patch16_224', 'cifar100', 12, 64, 5e-5, 8)
    assert train.resolve_config(train.TrainConfig(method='tou', preset='paper')).rank == 288
    config = train.resolve_config(train.TrainConfig(method='tou', preset='demo', epochs=1, rank='0.5'))
    assert config.epochs == 1 and config.rank == 0.5 and config.noise_scale == toukit.DEFAULT_NOISE_SCALE


def test_load_runs_skips_unreadable(tmp_path):
    (tmp_path / 'broken.json').write_text('{not json')
    results.write_record(dict(run=dict(id='x', config=dict(method='ft')), status='ok'), tmp_path / 'x.json')
    with pytest.warns(UserWarning, match='skipped 1'):
        table = toukit.load_runs(tmp_path)
    assert table.run_id.tolist() == ['x'] and len(table.attrs['skipped']) == 1
