import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

import toukit
from toukit import config, data, results, train

ROOT = Path(__file__).resolve().parent.parent
METHODS = toukit.method_names()


@pytest.mark.parametrize('method', METHODS)
def test_every_method_writes_its_record(method, tmp_path):
    """Every method through the whole pipeline; TOU's through the training notebook (papermill), the others through
    `train.run`, which is what the notebook calls (a kernel per method would add a minute to the suite)."""
    parameters = dict(method=method, preset='test', epochs=2, max_steps_per_epoch=2, results_dir=str(tmp_path))
    if method == 'tou':
        papermill = pytest.importorskip('papermill')
        papermill.execute_notebook(str(ROOT / 'notebooks' / 'train.ipynb'), str(tmp_path / 'out.ipynb'),
                                   cwd=str(ROOT), parameters=parameters, progress_bar=False)
    else:
        train.run(progress=False, **parameters)
    [path] = tmp_path.glob(f'test_{method}_lr0.001_s0_*.json')
    record = json.loads(path.read_text())
    assert record['status'] == 'ok'
    assert record['run']['config']['method'] == method
    assert [e['epoch'] for e in record['metrics']['epochs']] == [1, 2]
    assert len(record['metrics']['steps']) == 4
    cost = record['cost']
    assert 0 < cost['trainable_params'] <= cost['total_params'] and cost['train_seconds'] > 0
    assert cost['peak_memory_mib'] > 0 and cost['train_memory_mib'] >= 0 and cost['data_seconds'] >= 0
    final = record['metrics']['final']
    assert len(final['test_predictions']) == len(final['test_labels']) == record['data']['test_size']
    if method in ('ft', 'bitfit'):  # these never change the architecture
        assert final['merge'].startswith('nothing to merge')
    elif method == 'adapter':
        assert final['merge'].startswith('not applicable')
    else:
        assert final['merge'] == 'merged'
        assert final['merged_test_accuracy'] == final['test_accuracy']
        assert final['merged_val_accuracy'] == final['val_accuracy']
        assert final['merged_max_abs_logit_diff'] < 1e-3
    table = results.load_runs(tmp_path)
    assert table.method.tolist() == [method] and table.status.tolist() == ['ok']


def test_text_pipeline_on_real_bbc_subset(tmp_path):
    record = train.run(method='tou', preset='demo', model='tiny-bert', epochs=1, train_limit=40, val_limit=20,
                       test_limit=10, max_length=32, batch_size=8, lr=1e-3, results_dir=str(tmp_path), progress=False)
    assert record['status'] == 'ok'
    assert record['data']['classes'] == ['business', 'entertainment', 'politics', 'sports', 'tech']
    assert (record['data']['train_size'], record['data']['val_size'], record['data']['test_size']) == (40, 20, 10)
    final = record['metrics']['final']
    assert final['merged_val_accuracy'] == final['val_accuracy']
    assert final['merged_test_accuracy'] == final['test_accuracy']


def test_bbc_split_is_three_way_disjoint_stratified_and_fixed():
    model = toukit.create_model('tiny-bert', num_classes=5)
    a = data.load_dataset('bbc', model, max_length=64)
    b = data.load_dataset('bbc', model, max_length=64)
    sizes = [len(a.train), len(a.val), len(a.test)]
    assert sum(sizes) == 2107 and sizes == [1264, 421, 422]  # 2,225 files less 118 (near-)duplicates
    for split in data.SPLITS:
        assert torch.equal(getattr(a, split).input_ids, getattr(b, split).input_ids)  # the same on every call
    rows = {s: {tuple(r) for r in getattr(a, s).input_ids.tolist()} for s in data.SPLITS}
    assert not rows['train'] & rows['test'] and not rows['val'] & rows['test'] and not rows['train'] & rows['val']
    counts = {s: np.bincount(getattr(a, s).labels.numpy()) for s in data.SPLITS}
    assert np.allclose(counts['val'] / counts['train'], 1 / 3, atol=0.01)
    assert np.allclose(counts['test'] / counts['train'], 1 / 3, atol=0.01)
    other = data.load_dataset('bbc', model, max_length=64, split_seed=1)
    assert not torch.equal(other.test.input_ids, a.test.input_ids)


def test_stratified_split_is_disjoint_and_covers_everything():
    labels = np.repeat(np.arange(5), [10, 20, 30, 40, 50])
    parts = data.stratified_split(labels, (0.6, 0.2, 0.2), seed=3)
    joined = np.concatenate(parts)
    assert sorted(joined) == list(range(len(labels)))
    for part, share in zip(parts, (0.6, 0.2, 0.2)):
        assert np.allclose(np.bincount(labels[part], minlength=5) / np.bincount(labels), share, atol=0.05)
    with pytest.raises(ValueError, match='fractions'):
        data.stratified_split(labels, (0.5, 0.2), seed=0)


def test_failed_run_leaves_failed_record(tmp_path):
    with pytest.raises(ValueError, match='cifar100'):
        train.run(method='tou', preset='test', dataset='cifar100', data_root=str(tmp_path / 'none'),
                  results_dir=str(tmp_path), progress=False)
    [path] = tmp_path.glob('test_tou_*.json')
    record = json.loads(path.read_text())
    assert record['status'] == 'failed' and 'cifar100' in record['error']
    table = results.load_runs(tmp_path)
    assert table.status.tolist() == ['failed']
    assert results.load_runs(tmp_path, status='ok').empty


def _write_cifar100(root: Path, n_train=40, n_test=4):
    folder = root / 'cifar-100-python'
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in (('train', n_train), ('test', n_test)):
        # the layout of the python version of CIFAR-100 (pickled by Python 2, read with encoding='latin1')
        entry = {'data': rng.integers(0, 256, (n, 3072), dtype=np.uint8), 'fine_labels': [i % 4 for i in range(n)],
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
    # the official test set stays the test set; validation is a stratified tenth of the training set
    assert (len(bundle.train), len(bundle.val), len(bundle.test), bundle.num_classes) == (36, 4, 4, 100)
    assert sorted(bundle.val[i][1] for i in range(4)) == [0, 1, 2, 3]
    image, label = bundle.test[3]
    assert image.shape == (3, 160, 160) and label == 3  # resized to the model's input size


def test_fashion_mnist_reads_idx_files(tmp_path, monkeypatch):
    import gzip
    folder = tmp_path / 'fm'
    folder.mkdir()
    images = np.arange(20 * 28 * 28, dtype=np.uint8).reshape(20, 28, 28)
    for stem, arr in (('train-images-idx3', images), ('t10k-images-idx3', images[:3]),
                      ('train-labels-idx1', np.arange(20, dtype=np.uint8) % 2),
                      ('t10k-labels-idx1', np.array([4, 5, 6], np.uint8))):
        header = bytes([0, 0, 8, arr.ndim]) + b''.join(int(d).to_bytes(4, 'big') for d in arr.shape)
        with gzip.open(folder / f'{stem}-ubyte.gz', 'wb') as f:
            f.write(header + arr.tobytes())
    monkeypatch.setattr(data.builtin, 'FASHION_MNIST_DIR', folder)
    import timm
    bundle = data.load_dataset('fashion_mnist', timm.create_model('test_vit', num_classes=10))
    image, label = bundle.test[1]
    assert image.shape == (3, 160, 160) and label == 5
    assert (len(bundle.train), len(bundle.val)) == (18, 2)


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
        toukit.TrainConfig(**{field: value})


def test_presets_resolve_and_overrides_win():
    config = toukit.resolve_config(toukit.TrainConfig(method='lora', preset='paper'))
    assert (config.model, config.dataset, config.epochs, config.batch_size, config.lr, config.rank) == (
        'vit_base_patch16_224', 'cifar100', 12, 64, 5e-5, 8)
    assert toukit.resolve_config(toukit.TrainConfig(method='tou', preset='paper')).rank == 288
    config = toukit.resolve_config(toukit.TrainConfig(method='tou', preset='demo', epochs=1, rank='0.5'))
    assert config.epochs == 1 and config.rank == 0.5 and config.noise_scale == toukit.DEFAULT_NOISE_SCALE


def test_presets_carry_a_grid_for_every_method():
    for preset in ('demo', 'paper', 'test'):
        grid = config.PRESETS[preset]['lr_grid']
        assert set(grid) == set(toukit.METHODS), preset
    demo = config.PRESETS['demo']['lr_grid']
    for method, rates in demo.items():
        assert len(rates) >= 4 and max(rates) / min(rates) >= 10, method


def test_load_runs_skips_unreadable(tmp_path):
    (tmp_path / 'broken.json').write_text('{not json')
    results.write_record(dict(run=dict(id='x', config=dict(method='ft')), status='ok'), tmp_path / 'x.json')
    with pytest.warns(UserWarning, match='skipped 1'):
        table = toukit.load_runs(tmp_path)
    assert table.run_id.tolist() == ['x'] and len(table.attrs['skipped']) == 1


def test_every_field_has_one_line_of_help_and_the_notebook_says_the_same():
    import dataclasses
    from pathlib import Path
    from toukit.config import FIELD_HELP, TrainConfig, notebook_parameters
    assert set(FIELD_HELP) == {f.name for f in dataclasses.fields(TrainConfig)}
    assert all(text and '\n' not in text for text in FIELD_HELP.values())
    notebook = (Path(__file__).resolve().parents[1] / 'notebooks' / 'train.py').read_text()
    block = notebook.split('# %% tags=["parameters"]')[1].split('# %%')[0].strip().splitlines()
    fields = [line for line in block if not line.startswith(('overwrite:', 'resume:'))]  # run()'s, not the config's
    assert fields == notebook_parameters()  # names, types, defaults and help, in the dataclass's order
    assert len(block) == len(fields) + 2


@pytest.mark.slow
def test_compiled_training_matches_eager_within_tolerance(tmp_path):
    """torch.compile (inductor, on the CPU) computes the same steps as eager up to its kernels' rounding."""
    kw = dict(method='tou', preset='test', epochs=1, max_steps_per_epoch=4, progress=False)
    eager = train.run(results_dir=str(tmp_path / 'eager'), **kw)
    compiled = train.run(results_dir=str(tmp_path / 'compiled'), compile=True, **kw)
    losses = [[s['loss'] for s in r['metrics']['steps']] for r in (eager, compiled)]
    assert losses[1] == pytest.approx(losses[0], rel=1e-3, abs=1e-4)
    assert compiled['metrics']['final']['merged_max_abs_logit_diff'] < 1e-3
