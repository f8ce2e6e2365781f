"""The two ablations that split full TOU's gap to full fine-tuning: TOU with the truncation residual kept frozen
(no truncation, the update still in the top-r left subspace) and full-rank TOU (no truncation at all)."""
import copy

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import toukit
from toukit import FactorizedLinear, ResidualFactorizedLinear, apply_method, merge


def _linear(out_f=24, in_f=16, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f).to(dtype)


@pytest.mark.parametrize('shape', [(24, 16), (16, 24), (18, 18)])
def test_residual_layer_computes_w_exactly_at_the_start(shape):
    linear = _linear(*shape)
    layer = ResidualFactorizedLinear.from_linear(linear, rank=5, noise_scale=1e-2, seed=3)
    assert_close(layer.effective_weight(), linear.weight.detach(), rtol=0, atol=1e-12)
    x = torch.randn(7, shape[1], dtype=torch.float64)
    assert_close(layer(x), linear(x), rtol=0, atol=1e-12)
    # the truncated, noisy factors are TOU's own; R is what they miss, frozen
    plain = FactorizedLinear.from_linear(linear, rank=5, noise_scale=1e-2, seed=3)
    assert torch.equal(layer.tou_A, plain.tou_A) and torch.equal(layer.tou_B, plain.tou_B)
    assert layer.tou_B.requires_grad and not layer.tou_A.requires_grad and not layer.tou_R.requires_grad
    assert float(layer.tou_R.norm()) > 0.1 * float(linear.weight.detach().norm())  # rank 5 of 16: much is left out


def test_residual_layer_update_stays_in_the_span_of_a_and_merges_to_a_dense_layer():
    linear = _linear(24, 16)
    layer = ResidualFactorizedLinear.from_linear(linear, rank=4, noise_scale=0.0)
    opt = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.1)
    x = torch.randn(32, 16, dtype=torch.float64)
    for _ in range(3):
        opt.zero_grad()
        (layer(x) ** 2).mean().backward()
        opt.step()
    update = layer.effective_weight().detach() - linear.weight.detach()
    assert float(update.norm()) > 1e-3
    a = layer.tou_A[0]  # out x r: the update A (B - B0) has no part outside A's column space
    outside = update - a @ torch.linalg.lstsq(a, update).solution
    assert float(outside.norm()) < 1e-10 * float(update.norm()) + 1e-12
    with torch.no_grad():
        before = layer(x)
        dense = layer.merge()
    assert type(dense) is nn.Linear
    assert_close(dense(x), before, rtol=0, atol=1e-12)


def test_tou_residual_on_a_model_starts_exact_trains_and_merges(test_vit):
    reference = copy.deepcopy(test_vit).double()
    model = copy.deepcopy(test_vit).double()
    x = torch.randn(2, 3, 160, 160, dtype=torch.float64)
    apply_method(model, 'tou_residual', rank=0.25)
    layers = [m for m in model.modules() if isinstance(m, ResidualFactorizedLinear)]
    assert layers and all(m.rank < min(m.in_features, m.out_features // m.splits) for m in layers)
    with torch.no_grad():
        assert_close(model.eval()(x), reference.eval()(x), rtol=0, atol=1e-10)
    # the same trainable tensors as full TOU at that rank (R adds frozen storage, not parameters that train)
    tou = apply_method(copy.deepcopy(test_vit), 'tou', rank=0.25)
    assert toukit.count_parameters(model)[0] == toukit.count_parameters(tou)[0]
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    nn.functional.cross_entropy(model(x), torch.tensor([0, 1])).backward()
    opt.step()
    with torch.no_grad():
        before = model.eval()(x)
        merge(model)
        after = model(x)
    assert_close(after, before, rtol=0, atol=1e-10)
    reference.load_state_dict(model.state_dict(), strict=True)


def test_full_rank_tou_without_noise_reproduces_the_model(test_vit, tiny_bert):
    from conftest import bert_inputs
    for model, inputs in ((test_vit, torch.randn(2, 3, 160, 160)), (tiny_bert, bert_inputs())):
        call = (lambda m: m(**inputs)) if isinstance(inputs, dict) else (lambda m: m(inputs))
        with torch.no_grad():
            reference = call(model)
            prepared = apply_method(copy.deepcopy(model), 'tou_full_rank', noise_scale=0.0)
            out = call(prepared.eval())
        ranks = [m.rank for m in prepared.modules() if isinstance(m, FactorizedLinear)]
        assert ranks and all(r == min(m.in_features, m.out_features // m.splits)
                             for r, m in zip(ranks, [m for m in prepared.modules() if isinstance(m, FactorizedLinear)]))
        assert float((out - reference).norm() / reference.norm()) < 1e-5


def test_ablation_defaults_and_presets():
    assert toukit.METHODS['tou_full_rank'].defaults['rank'] == 1.0
    for preset in ('demo', 'rotten_tomatoes', 'dinov2_fashion', 'paper'):
        ranks = toukit.PRESETS[preset]['ranks']
        assert ranks['tou_residual'] == ranks['tou'] and ranks['tou_full_rank'] == 1.0
        config = toukit.resolve_config(toukit.TrainConfig(method='tou_full_rank', preset=preset))
        assert config.rank == 1.0 and config.noise_scale == toukit.DEFAULT_NOISE_SCALE


def test_full_rank_tou_refuses_another_rank_and_its_update_is_measured_from_its_noisy_start(tiny_bert):
    from toukit.updates import UpdateBaseline
    for rank in (0.5, 1, 'energy:0.9'):  # the int 1 is a fixed rank of one, not full rank
        with pytest.raises(ValueError, match=rf"tou_full_rank: rank={rank!r}; this ablation is full TOU at rank 1.0"):
            apply_method(copy.deepcopy(tiny_bert), 'tou_full_rank', rank=rank)
    config = toukit.resolve_config(toukit.TrainConfig(method='tou_full_rank', preset='test', rank='1'))
    with pytest.raises(ValueError, match='this ablation is full TOU at rank 1.0'):  # '1' from a command line: int 1
        apply_method(copy.deepcopy(tiny_bert), 'tou_full_rank', rank=config.rank)
    assert [m for m, spec in toukit.METHODS.items() if spec.moves_start] == [
        'tou', 'tou_frozen_ffn', 'tou_residual', 'tou_full_rank']
    model = copy.deepcopy(tiny_bert)
    baseline = UpdateBaseline.capture(model)
    apply_method(model, 'tou_full_rank')  # TOU's noise moves the start off W; nothing trains here
    baseline.capture_start(model, toukit.METHODS['tou_full_rank'].moves_start)
    layers = baseline.summary(model, 'tou_full_rank', getattr(model, 'toukit_ranks', None), 1.0)['layers']
    assert layers and all(row['relative_update'] > 1e-3 for row in layers)  # the noise, against W
    assert all(row['start_relative_update'] < 1e-6 for row in layers)  # no update yet, against the start
