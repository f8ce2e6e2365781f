import copy

import pytest
import timm
import torch
from torch import nn
from torch.testing import assert_close

import toukit
from toukit import apply_method, count_parameters, merge
from conftest import bert_inputs, calibration_for

METHODS = toukit.method_names()
MERGEABLE = [m for m in METHODS if toukit.METHODS[m].mergeable]
# methods whose freshly prepared model computes the base model's function (TOU does only at full rank, no noise)
EXACT_AT_START = [m for m in METHODS if m not in ('tou', 'tou_frozen_ffn', 'tou_full_rank')]


def _vit():
    torch.manual_seed(0)
    return timm.create_model('test_vit', num_classes=5).eval()


@pytest.mark.parametrize('method', EXACT_AT_START)
def test_prepared_model_starts_at_base_outputs(method):
    model = _vit()
    x = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        before = model(x)
        small = method in ('lora', 'pissa', 'dora', 'mica', 'olora', 'eva', 'loraga', 'delora')
        apply_method(model, method, rank=4 if small else None, **calibration_for(method, x))
        if method == 'adapter':  # its up-projections start at zero: give them a value, the start must still hold
            for m in model.modules():
                if isinstance(m, toukit.AdapterLinear):
                    torch.nn.init.normal_(m.adapter_down.weight)
        after = model.eval()(x)
    assert_close(after, before, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('method', MERGEABLE)
def test_train_step_then_merge_restores_architecture(method):
    model = _vit()
    reference = _vit()
    x, y = torch.randn(4, 3, 160, 160), torch.tensor([0, 1, 2, 3])
    apply_method(model, method, **calibration_for(method, x, y))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.startswith('head.') for n in trainable), 'the head trains in every method'
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    model.eval()
    with torch.no_grad():
        before = model(x)
        merge(model)
        after = model(x)
    assert_close(after, before, rtol=1e-4, atol=1e-4)
    reference.load_state_dict(model.state_dict(), strict=True)
    assert toukit.is_prepared(model) is False


def test_adapter_width_count_and_no_merge(tiny_bert):
    minilm_like = toukit.create_model('tiny-bert', num_classes=3, seed=0)  # hidden 32, 2 layers
    apply_method(minilm_like, 'adapter', width=4)
    adapters = [m for m in minilm_like.modules() if isinstance(m, toukit.AdapterLinear)]
    assert len(adapters) == 2 * 2  # attention output and MLP output of each block
    trainable = {n for n, p in minilm_like.named_parameters() if p.requires_grad}
    assert all('adapter_' in n or n.startswith('head.') for n in trainable)
    assert sum(p.numel() for n, p in minilm_like.named_parameters() if 'adapter_' in n) == 4 * (2 * 4 * 32 + 4 + 32)
    minilm_like(**bert_inputs()).sum().backward()
    with pytest.raises(ValueError, match='cannot merge'):
        merge(minilm_like)
    assert len([m for m in minilm_like.modules() if isinstance(m, toukit.AdapterLinear)]) == 4  # left as it was


def test_adapter_on_vit_b16_is_comparable_to_lora():
    model = timm.create_model('vit_base_patch16_224', num_classes=100, pretrained=False)
    apply_method(model, 'adapter')
    adapters = sum(p.numel() for n, p in model.named_parameters() if 'adapter_' in n)
    assert adapters == 12 * 2 * (2 * 16 * 768 + 16 + 768)  # width 16 after attn.proj and mlp.fc2: 1.20M


def test_trainable_names_are_filterable():
    model = apply_method(_vit(), 'tou')
    names = [n for n, p in model.named_parameters() if p.requires_grad and 'tou_' in n]
    assert names and all(n.endswith('tou_B') for n in names)
    model = apply_method(_vit(), 'svfit')
    assert {n.rsplit('.', 1)[1] for n, p in model.named_parameters() if p.requires_grad} == {'svfit_s', 'weight',
                                                                                              'bias'}
    model = apply_method(_vit(), 'delora')
    core = [n for n, p in model.named_parameters() if p.requires_grad and 'delora' in n]
    assert core and all(n.endswith('delora_M') for n in core)


def test_lora_on_vit_b16_matches_paper_count():
    model = timm.create_model('vit_base_patch16_224', num_classes=100, pretrained=False)
    apply_method(model, 'lora', rank=8)
    adapters = sum(p.numel() for n, p in model.named_parameters() if 'lora_' in n)
    assert round(adapters / 1e6, 2) == 0.59  # rank 8 on q, k, v and proj as four 768x768 matrices
    assert round(count_parameters(model)[1] / 1e6, 2) == 86.47  # the paper's total


def test_delora_trains_r_squared_per_matrix(tiny_bert):
    apply_method(tiny_bert, 'delora', rank=3, targets='attention')
    cores = [p for n, p in tiny_bert.named_parameters() if n.endswith('delora_M')]
    assert len(cores) == 4 * 2 and all(p.numel() == 9 and p.requires_grad for p in cores)


def test_svfit_rank_from_energy(tiny_bert):
    table = toukit.spectrum_table(tiny_bert)
    apply_method(tiny_bert, 'svfit', rank='energy:0.99')
    layers = [m for m in tiny_bert.modules() if isinstance(m, toukit.SVFitLinear)]
    assert sorted(m.rank for m in layers) == sorted(table.rank_e99)


def _svfit_factored(layer, x):
    """SVFitLinear's forward as it was before it formed its weight: the reference both of its paths must match."""
    low = nn.functional.linear(nn.functional.linear(x, layer.svfit_Vh) * layer.svfit_s, layer.svfit_U)
    return nn.functional.linear(x, layer.base_weight, layer.bias) + low


def _moved_singular_values(model, seed=0):
    """Every svfit_s scaled by a random factor in [0.5, 1.5], so the checks are not at the starting point."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, toukit.SVFitLinear):
                m.svfit_s.mul_(0.5 + torch.rand(m.rank, generator=g, dtype=torch.float64).to(m.svfit_s.dtype))


# (dtype, tolerance): float64 shows the two computations are the same function, float32 that rounding stays small
SVFIT_PRECISIONS = [(torch.float64, dict(rtol=1e-10, atol=1e-12)), (torch.float32, dict(rtol=1e-4, atol=1e-5))]


@pytest.mark.parametrize('dtype, tol', SVFIT_PRECISIONS)
@pytest.mark.parametrize('tokens, formed', [(64, True), (4, False)])
def test_svfit_forward_equals_the_factored_formula(dtype, tol, tokens, formed):
    torch.manual_seed(0)
    linear = nn.Linear(24, 40, dtype=dtype)
    layer = toukit.SVFitLinear.from_linear(linear, rank=24)  # full rank, as 99% energy nearly is
    _moved_singular_values(layer)
    x = torch.randn(tokens // 2, 2, 24, dtype=dtype, requires_grad=True)
    assert layer._forms_weight(tokens) is formed  # many tokens form W, few keep the factored path
    upstream = torch.randn(tokens // 2, 2, 40, dtype=dtype)
    grads = []
    for forward in (layer, lambda v: _svfit_factored(layer, v)):
        layer.svfit_s.grad = x.grad = None
        y = forward(x)
        (y * upstream).sum().backward()
        grads.append((y.detach(), layer.svfit_s.grad.clone(), x.grad.clone()))
    for new, old in zip(*grads):
        assert_close(new, old, **tol)
    with torch.no_grad():
        assert_close(layer.merge()(x), grads[0][0], **tol)


@pytest.mark.parametrize('dtype, tol', SVFIT_PRECISIONS)
def test_svfit_model_forward_and_gradient_match_the_factored_formula(dtype, tol, monkeypatch):
    model = apply_method(_vit().to(dtype), 'svfit')
    _moved_singular_values(model)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, toukit.SVFitLinear)}
    x = torch.randn(2, 3, 160, 160, dtype=dtype)
    tokens = 2 * (model.patch_embed.num_patches + 1)
    assert any(m._forms_weight(tokens) for m in layers.values())  # the formed path is the one under test

    def outputs_and_grads():
        model.zero_grad(set_to_none=True)
        y = model(x)
        (y * torch.linspace(-1, 1, y.numel(), dtype=dtype).view_as(y)).sum().backward()
        return y.detach(), {n: m.svfit_s.grad.clone() for n, m in layers.items()}

    y, grads = outputs_and_grads()
    with monkeypatch.context() as m:
        m.setattr(toukit.SVFitLinear, 'forward', _svfit_factored)
        y_ref, grads_ref = outputs_and_grads()
    assert_close(y, y_ref, **tol)
    assert_close(grads, grads_ref, **tol)
    with torch.no_grad():
        assert_close(merge(model)(x), y, **tol)


def test_bitfit_trains_biases_and_head():
    model = apply_method(_vit(), 'bitfit')
    for n, p in model.named_parameters():
        assert p.requires_grad == (n.endswith('bias') or n.startswith('head.')), n


def test_bert_like_methods_run(tiny_bert):
    inputs = bert_inputs()
    for method in METHODS:
        model = copy.deepcopy(tiny_bert)
        apply_method(model, method, **calibration_for(method, inputs))
        assert model(**inputs).shape == (2, 3)


def test_apply_method_errors():
    model = _vit()
    with pytest.raises(ValueError, match="method='nope'"):
        apply_method(model, 'nope')
    with pytest.raises(ValueError, match='takes no option noise_scale'):
        apply_method(model, 'lora', noise_scale=0.1)
    apply_method(model, 'lora')
    with pytest.raises(ValueError, match='already prepared'):
        apply_method(model, 'tou')
    with pytest.raises(ValueError, match='already prepared'):
        apply_method(apply_method(_vit(), 'ft'), 'ft')
