"""PEFT's SVD family through peft: DoRA, MiCA, OLoRA, EVA and LoRA-GA prepare, train a step and merge, on a text model
and an image model, or refuse with an error that names the problem."""
import copy

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import toukit
from toukit import apply_method, merge
from conftest import bert_inputs, calibration_for

FAMILY = ['dora', 'mica', 'olora', 'eva', 'loraga']


@pytest.mark.parametrize('method', FAMILY)
def test_on_a_text_model_it_starts_at_the_model_trains_and_merges(method, tiny_bert):
    inputs, labels = bert_inputs(batch=4), torch.tensor([0, 1, 2, 0])
    model = copy.deepcopy(tiny_bert)
    with torch.no_grad():
        reference = tiny_bert(**inputs)
    apply_method(model, method, rank=4, **calibration_for(method, inputs, labels))
    with torch.no_grad():
        assert_close(model.eval()(**inputs), reference, rtol=1e-4, atol=1e-5)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    heads = tuple(model.toukit_new_modules)
    assert any('lora_A' in n for n in trainable) and any(n.startswith(heads) for n in trainable)
    assert all('lora_' in n or n.startswith(heads) for n in trainable), trainable
    if method == 'mica':  # B is frozen at the minor singular directions; only A trains
        assert not any('lora_B' in n for n in trainable)
    if method == 'dora':  # a magnitude per output trains beside A and B
        assert any('lora_magnitude_vector' in n for n in trainable)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    nn.functional.cross_entropy(model(**inputs), labels).backward()
    opt.step()
    with torch.no_grad():
        before = model.eval()(**inputs)
        assert not torch.allclose(before, reference, atol=1e-4), 'one step moved nothing'
        merge(model)
        after = model(**inputs)
    assert_close(after, before, rtol=1e-4, atol=1e-5)
    assert not hasattr(model, 'peft_config'), 'no peft layer is left: its config goes too'
    fresh = toukit.create_model('tiny-bert', num_classes=3, seed=0)
    fresh.load_state_dict(model.state_dict(), strict=True)  # the original architecture again
    with torch.no_grad():
        assert_close(fresh.eval()(**inputs), after)


def test_mica_takes_the_minor_left_singular_directions(tiny_bert):
    mica = apply_method(copy.deepcopy(tiny_bert), 'mica', rank=4)
    name = next(n for n, m in mica.named_modules() if hasattr(m, 'lora_B') and hasattr(m, 'get_base_layer'))
    layer = mica.get_submodule(name)
    u = torch.linalg.svd(layer.get_base_layer().weight.detach(), full_matrices=False)[0]
    b = layer.lora_B['default'].weight.detach()
    assert_close(b.abs(), u[:, -4:].abs(), rtol=1e-4, atol=1e-5)  # the last r left singular vectors (up to sign)
    assert float(layer.lora_A['default'].weight.detach().abs().max()) == 0.0


def test_eva_reads_the_inputs_and_redistributes_ranks(tiny_bert):
    inputs = bert_inputs(batch=8, length=16)
    model = apply_method(copy.deepcopy(tiny_bert), 'eva', rank=4, calibration=[inputs])
    ranks = [m.r['default'] for m in model.modules() if hasattr(m, 'lora_A') and hasattr(m, 'r')]
    assert ranks and all(1 <= r <= 8 for r in ranks)  # up to rho * r with rho = 2
    assert len(set(ranks)) > 1, f'EVA gave every layer the same rank: {ranks}'  # redistributed, not uniform
    assert sum(ranks) <= 4 * len(ranks)  # the budget stays r per layer


@pytest.mark.parametrize('method,calibration,match', [
    ('eva', None, 'eva starts from the training data'),
    ('loraga', None, 'loraga starts from the training data'),
    ('loraga', 'inputs only', r'loraga needs \(inputs, labels\)'),
    ('dora', None, 'rank=400'),
])
def test_refusals_name_the_problem_and_leave_the_model_as_it_was(method, calibration, match, tiny_bert):
    model = copy.deepcopy(tiny_bert)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    options = dict(rank=400) if method == 'dora' else {}
    if calibration == 'inputs only':
        options['calibration'] = [bert_inputs()]
    with pytest.raises(ValueError, match=match):
        apply_method(model, method, calibration=options.pop('calibration', None), **options)
    assert not toukit.is_prepared(model)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_a_run_hands_the_data_driven_methods_their_training_batches(tmp_path):
    for method in ('eva', 'loraga'):
        record = toukit.run(toukit.TrainConfig(method=method, preset='test', results_dir=str(tmp_path), epochs=1,
                                               max_steps_per_epoch=2, train_limit=64, val_limit=32, test_limit=32))
        assert record['status'] == 'ok'
        assert record['run']['config']['calibration_batches'] == 4
        assert record['updates'], 'the update summary is in every record'
