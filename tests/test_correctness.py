"""Pins for the confirmed bugs of issue 8 (each test failed on the main before the fix) and the guarantees added
with them: atomic preparation, run identity, config validation, learnable test data."""
import copy
import json

import pytest
import torch

import toukit
from toukit import apply_method, data, models, results, train
from toukit.linalg import truncated_svd
from toukit.ranks import parse_rank


def _snapshot(model):
    return ([(n, type(m)) for n, m in model.named_modules()],
            {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()})


def _assert_same(model, snapshot):
    modules, params = snapshot
    assert [(n, type(m)) for n, m in model.named_modules()] == modules
    now = dict(model.named_parameters())
    assert now.keys() == params.keys()
    for n, (value, requires_grad) in params.items():
        assert torch.equal(now[n].detach(), value), n
        assert now[n].requires_grad == requires_grad, n


# bug 1: the synthetic set drew new class patterns per split, so validation could not be learned


def test_synthetic_splits_share_one_draw_of_classes():
    bundle = data.load_dataset('synthetic', modality='image')
    x = {s: torch.stack([getattr(bundle, s)[i][0] for i in range(len(getattr(bundle, s)))]) for s in data.SPLITS}
    y = {s: torch.tensor([getattr(bundle, s)[i][1] for i in range(len(getattr(bundle, s)))]) for s in data.SPLITS}
    # a nearest-class-mean classifier fitted on train must classify validation and test: same classes everywhere
    means = torch.stack([x['train'][y['train'] == c].mean(0) for c in range(4)])
    for split in ('val', 'test'):
        predicted = torch.cdist(x[split].flatten(1), means.flatten(1)).argmin(1)
        assert (predicted == y[split]).float().mean() > 0.9, split


@pytest.mark.parametrize('method', ['ft', 'tou'])
def test_test_preset_learns_well_above_chance(method, tmp_path):
    record = train.run(method=method, preset='test', results_dir=str(tmp_path), progress=False)
    final = record['metrics']['final']
    assert final['val_accuracy'] >= 0.75 and final['test_accuracy'] >= 0.75  # chance is 0.25


# bug 2: records of runs that differ in rank, noise, lr, ... overwrote each other


def test_runs_differing_in_one_setting_write_two_records(tmp_path):
    base = dict(method='tou', preset='test', results_dir=str(tmp_path), epochs=1, max_steps_per_epoch=1)
    names = {toukit.resolve_config(**dict(base, **change)).name
             for change in ({}, {'rank': 4}, {'noise_scale': 0.0}, {'lr': 1e-4}, {'targets': 'attention'},
                            {'split_seed': 1})}
    assert len(names) == 6
    for change in ({}, {'rank': 4}):
        train.run(progress=False, **dict(base, **change))
    assert len(list(tmp_path.glob('*.json'))) == 2
    # the id ignores settings that do not change the result, and the preset's defaults spelled out change nothing
    assert toukit.resolve_config(**base).name == toukit.resolve_config(**dict(base, results_dir='x', lr=1e-3)).name


def test_ok_record_is_never_replaced_without_overwrite(tmp_path):
    kwargs = dict(method='ft', preset='test', results_dir=str(tmp_path), epochs=1, max_steps_per_epoch=1,
                  progress=False)
    record = train.run(**kwargs)
    path = tmp_path / f'{record["run"]["id"]}.json'
    before = path.read_text()
    with pytest.raises(train.RecordExistsError, match='overwrite=True'):
        train.run(**kwargs)
    assert path.read_text() == before
    again = train.run(overwrite=True, **kwargs)
    assert again['status'] == 'ok' and json.loads(path.read_text())['run']['created'] == again['run']['created']


def test_one_function_names_runs_everywhere(tmp_path):
    config = toukit.resolve_config(method='lora', preset='test', results_dir=str(tmp_path))
    assert config.name == toukit.config.run_id(config.__dict__) == toukit.run_id(config.__dict__)
    assert config.name.startswith('test_lora_lr0.001_s0_')
    assert toukit.resolve_config(method='lora', preset='test', run_name='mine').name == 'mine'


# bug 3: tou_frozen_ffn froze nothing on a model of unknown family, silently


def test_frozen_ffn_refuses_unknown_family_and_lists_linears(mlp):
    with pytest.raises(ValueError, match=r'fc1, fc2, head'):
        apply_method(mlp, 'tou_frozen_ffn', rank=4)
    assert not toukit.is_prepared(mlp)


def test_frozen_ffn_freezes_exactly_the_mlp(tiny_bert):
    apply_method(tiny_bert, 'tou_frozen_ffn', rank=4)
    family = toukit.targets.model_family(tiny_bert)
    for name, module in tiny_bert.named_modules():
        if isinstance(module, toukit.FactorizedLinear):
            mlp = toukit.targets.layer_kind(family, name) == 'mlp'
            assert all(p.requires_grad != mlp for n, p in module.named_parameters() if n != 'tou_A'), name


# bug 4: a failing apply_method left the model half prepared, so the corrected retry failed


@pytest.mark.parametrize('method, options', [
    ('delora', dict(targets=['nope'])), ('lora', dict(targets=['nope'])), ('tou', dict(rank=10_000)),
    ('svfit', dict(rank=10_000)), ('tou_frozen_ffn', dict(targets=['head'])), ('pissa', dict(rank=10_000))])
def test_failing_apply_method_leaves_model_untouched(method, options, test_vit):
    test_vit.head.requires_grad_(False)  # a non-default flag, to see it kept
    snapshot = _snapshot(test_vit)
    with pytest.raises(ValueError):
        apply_method(test_vit, method, **options)
    _assert_same(test_vit, snapshot)
    assert not toukit.is_prepared(test_vit)
    apply_method(test_vit, method)  # the corrected retry works
    assert toukit.is_prepared(test_vit)


# bug 5: create_model('minilm', weights=dir) took the tokenizer from the bundled package, not from dir


def test_minilm_checkpoint_brings_its_own_tokenizer(tmp_path, monkeypatch):
    from transformers import AutoTokenizer, BertConfig, BertModel
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
              ).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(models.minilm_path()).save_pretrained(tmp_path)

    def no_bundle():
        raise AssertionError('the bundled package must not be needed with a checkpoint')
    monkeypatch.setattr(models, 'minilm_path', no_bundle)
    model = toukit.create_model('minilm', num_classes=3, weights=str(tmp_path))
    assert model.tokenizer_path == str(tmp_path)
    bundle = data.load_dataset('bbc', model, max_length=8, train_limit=4, val_limit=2, test_limit=2)
    assert bundle.train.input_ids.shape == (4, 8)


# bug 6: energy thresholds were rounded to 6 digits when a policy became text again


def test_energy_threshold_survives_the_round_trip():
    policy = parse_rank('energy:0.9999999')
    assert parse_rank(str(policy)) == policy
    assert toukit.TrainConfig(rank='energy:0.9999999').rank == 'energy:0.9999999'
    assert str(parse_rank(0.123456789)) == '0.123456789'


# bug 7: the randomized SVD reseeded the global torch RNG


def test_randomized_svd_leaves_the_global_rng_alone(mlp):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    truncated_svd(torch.randn(20, 16, generator=torch.Generator().manual_seed(0)), 4, method='randomized', seed=7)
    toukit.apply_tou(mlp, rank=4, svd_method='randomized', seed=5)
    assert torch.equal(torch.rand(3), expected)
    a1, b1 = truncated_svd(torch.eye(12)[:, :10] + 0.1, 3, method='randomized', seed=7)
    a2, b2 = truncated_svd(torch.eye(12)[:, :10] + 0.1, 3, method='randomized', seed=7)
    assert torch.equal(a1, a2) and torch.equal(b1, b2)  # still seeded


# every config field is checked before any work


@pytest.mark.parametrize('field, value, match', [
    ('device', 'tpu9', "device='tpu9'"), ('device', 'cuda:7', "device='cuda:7'"), ('seed', 1.5, 'seed=1.5'),
    ('split_seed', '0', "split_seed='0'"), ('weight_decay', -1, 'weight_decay=-1'),
    ('num_workers', -1, 'num_workers=-1'),
    ('test_limit', 0, 'test_limit=0'), ('targets', [], 'targets=\\[\\]'), ('targets', 3, 'targets=3'),
    ('model', '', "model=''"), ('results_dir', '', "results_dir=''"), ('run_name', 'a/b', "run_name='a/b'"),
    ('pretrained', 'yes', "pretrained='yes'"), ('save_weights', 1, 'save_weights=1'),
    ('method_options', [], 'method_options=\\[\\]'), ('method_options', {'width': 4}, "takes no option width"),
    ('weights', 3, 'weights=3'), ('lr', True, 'lr=True')])
def test_every_config_field_is_validated(field, value, match):
    with pytest.raises(ValueError, match=match):
        toukit.TrainConfig(**{field: value})


def test_bad_model_fails_before_any_record(tmp_path):
    with pytest.raises(ValueError, match="device='tpu9'"):
        train.run(method='ft', preset='test', device='tpu9', results_dir=str(tmp_path))
    assert not list(tmp_path.iterdir())


# smaller guarantees


def test_is_prepared_and_has_method_layers_are_booleans(test_vit):
    assert toukit.is_prepared(test_vit) is False and toukit.methods.has_method_layers(test_vit) is False
    apply_method(test_vit, 'ft')
    assert toukit.is_prepared(test_vit) is True and toukit.methods.has_method_layers(test_vit) is False
    assert toukit.methods.describe_preparation(test_vit) == "method 'ft'"


def test_svfit_uses_the_batched_svd(tiny_bert, monkeypatch):
    calls = []
    real = torch.linalg.svd
    monkeypatch.setattr(torch.linalg, 'svd', lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    model = apply_method(copy.deepcopy(tiny_bert), 'svfit')
    shapes = {tuple(m.weight.shape) for m in model.modules() if isinstance(m, toukit.SVFitLinear)}
    assert len(calls) == len(shapes)  # one batched call per distinct shape, not one per layer


def test_layer_knowledge_lives_in_targets_only():
    import pathlib
    import re
    root = pathlib.Path(toukit.__file__).parent
    for path in root.glob('*.py'):
        if path.name in ('targets.py', 'convert.py'):  # convert.py reads one ONNX file's own names, by design
            continue
        text = path.read_text()
        patterns = (r'blocks\\\.', r'layer\\\.', r"'att'", r'attention\.self', r'mlp\.fc', r"['.]qkv'", r"== 'vit'")
        for pattern in patterns:
            assert not re.search(pattern, text), f'{path.name} matches layer names ({pattern}): use targets.py'


def test_method_order_comes_from_the_registry():
    import inspect
    from toukit import plots
    assert 'METHOD_ORDER' not in inspect.getsource(plots) and 'from .plots' not in inspect.getsource(results)
    table = results.table1(__import__('pandas').DataFrame([
        dict(method=m, status='ok', lr=1e-3, seed=0, trainable_params=1, total_params=2, test_accuracy=0.5,
             val_accuracy=0.5, train_seconds=1.0, train_memory_mib=1.0, peak_memory_mib=1.0)
        for m in reversed(toukit.method_names())]))
    assert table.method.tolist() == toukit.method_names()
