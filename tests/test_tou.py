import copy

import pytest
import timm
import torch
from torch import nn
from torch.testing import assert_close

import toukit
from toukit import FactorizedLinear, apply_tou, count_parameters, merge
from conftest import bert_inputs


def test_from_linear_full_rank_zero_noise_is_exact():
    torch.manual_seed(0)
    lin = nn.Linear(16, 12).double()
    layer = FactorizedLinear.from_linear(lin, rank=12, noise_scale=0.0)
    x = torch.randn(5, 16, dtype=torch.float64)
    assert_close(layer(x), lin(x), rtol=0, atol=1e-12)
    assert not layer.tou_A.requires_grad and layer.tou_B.requires_grad


def test_forward_equals_effective_weight_with_splits():
    torch.manual_seed(0)
    lin = nn.Linear(8, 24).double()
    layer = FactorizedLinear.from_linear(lin, rank=3, noise_scale=0.01, seed=1, splits=3)
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    assert_close(layer(x), nn.functional.linear(x, layer.effective_weight(), layer.bias), rtol=0, atol=1e-12)
    # each of q, k, v is its own rank-3 matrix: the merged weight's blocks have rank 3, the whole rank 9
    w = layer.effective_weight().detach()
    assert [torch.linalg.matrix_rank(b).item() for b in w.view(3, 8, 8)] == [3, 3, 3]


def test_noise_is_seeded_and_scaled():
    lin = nn.Linear(64, 64)
    a = FactorizedLinear.from_linear(lin, rank=8, noise_scale=0.1, seed=3)
    b = FactorizedLinear.from_linear(lin, rank=8, noise_scale=0.1, seed=3)
    c = FactorizedLinear.from_linear(lin, rank=8, noise_scale=0.0)
    assert torch.equal(a.tou_B, b.tou_B)
    noise = (a.tou_B - c.tou_B).flatten()
    assert noise.std().item() == pytest.approx(0.1, rel=0.1)


@pytest.mark.parametrize('fixture', ['mlp', 'test_vit', 'tiny_bert'])
def test_full_rank_zero_noise_tou_reproduces_model(fixture, request):
    model = request.getfixturevalue(fixture).double().eval()
    inputs = _inputs(fixture)
    with torch.no_grad():
        before = _call(model, inputs)
        apply_tou(model, rank=0.999999, noise_scale=0.0)  # rounds to min(out, in): full rank
        after = _call(model, inputs)
    assert any(isinstance(m, FactorizedLinear) for m in model.modules())
    assert_close(after, before, rtol=0, atol=1e-9)


@pytest.mark.parametrize('fixture', ['mlp', 'test_vit', 'tiny_bert'])
def test_merge_equals_factorized_and_loads_strictly(fixture, request):
    model = request.getfixturevalue(fixture).eval()
    untouched_state = {k: v.clone() for k, v in model.state_dict().items()}
    inputs = _inputs(fixture)
    apply_tou(model, rank=0.5, noise_scale=1e-3, seed=0)
    with torch.no_grad():
        for p in model.parameters():  # a training step's worth of change, so merging is not trivial
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
        factorized = _call(model, inputs)
        merge(model)
        merged = _call(model, inputs)
    assert not any(isinstance(m, FactorizedLinear) for m in model.modules())
    assert_close(merged, factorized, rtol=1e-4, atol=1e-5)
    fresh = request.getfixturevalue(fixture)
    fresh.load_state_dict(model.state_dict(), strict=True)
    assert set(fresh.state_dict()) == set(untouched_state)


def test_vit_qkv_is_factorized_as_three_matrices(test_vit):
    apply_tou(test_vit, rank=8, noise_scale=0.0)
    qkv = test_vit.blocks[0].attn.qkv
    assert isinstance(qkv, FactorizedLinear) and qkv.splits == 3
    assert qkv.tou_A.shape == (3, 64, 8) and qkv.tou_B.shape == (24, 64)
    merge(test_vit)
    assert type(test_vit.blocks[0].attn.qkv) is nn.Linear and test_vit.blocks[0].attn.qkv.out_features == 192


def test_paper_table1_parameter_counts():
    model = timm.create_model('vit_base_patch16_224', num_classes=100, pretrained=False)
    assert round(count_parameters(model)[1] / 1e6, 2) == 85.88  # the paper's FT row says 85.55
    apply_tou(model, rank=288, noise_scale=0.0)
    trainable, total = count_parameters(model)
    assert (round(trainable / 1e6, 2), round(total / 1e6, 2)) == (24.83, 48.72)
    model = timm.create_model('vit_base_patch16_224', num_classes=100, pretrained=False)
    apply_tou(model, rank=288, noise_scale=0.0, freeze_mlp=True)
    trainable, total = count_parameters(model)
    assert (round(trainable / 1e6, 2), round(total / 1e6, 2)) == (11.51, 48.72)


def test_freeze_mlp_freezes_only_mlp(test_vit):
    apply_tou(test_vit, rank=8, freeze_mlp=True)
    assert not any(p.requires_grad for p in test_vit.blocks[0].mlp.parameters())
    assert test_vit.blocks[0].attn.qkv.tou_B.requires_grad and not test_vit.blocks[0].attn.qkv.tou_A.requires_grad


def test_targets_attention_and_patterns(test_vit, mlp):
    apply_tou(test_vit, rank=4, targets='attention')
    kinds = {n.split('.')[-1] for n, m in test_vit.named_modules() if isinstance(m, FactorizedLinear)}
    assert kinds == {'qkv', 'proj'}
    apply_tou(mlp, rank=4, targets=['fc2'])
    assert isinstance(mlp.fc2, FactorizedLinear) and type(mlp.fc1) is nn.Linear and type(mlp.head) is nn.Linear


def test_default_targets_skip_embeddings_and_head(test_vit, mlp):
    apply_tou(test_vit, rank=4)
    assert type(test_vit.head) is nn.Linear
    assert sum(isinstance(m, FactorizedLinear) for m in test_vit.modules()) == 4 * len(test_vit.blocks)
    apply_tou(mlp, rank=4)  # no known family: every linear but the head
    assert isinstance(mlp.fc1, FactorizedLinear) and isinstance(mlp.fc2, FactorizedLinear)
    assert type(mlp.head) is nn.Linear


def test_energy_rank_policy_gives_per_layer_ranks(test_vit):
    apply_tou(test_vit, rank='energy:0.5', noise_scale=0.0)
    ranks = {m.rank for m in test_vit.modules() if isinstance(m, FactorizedLinear)}
    assert len(ranks) > 1


def test_randomized_svd_factorization_close_to_exact(test_vit):
    import copy
    other = copy.deepcopy(test_vit)
    w = test_vit.blocks[1].mlp.fc1.weight.detach().clone()
    apply_tou(test_vit, rank=16, noise_scale=0.0)
    apply_tou(other, rank=16, noise_scale=0.0, svd_method='randomized')
    with torch.no_grad():
        exact = float(torch.linalg.norm(w - test_vit.blocks[1].mlp.fc1.effective_weight()) / torch.linalg.norm(w))
        randomized = float(torch.linalg.norm(w - other.blocks[1].mlp.fc1.effective_weight()) / torch.linalg.norm(w))
    assert exact <= randomized < 1.05 * exact  # near the optimum even on a flat (random-init) spectrum


# -- bad input -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize('rank', [0, -3, 65])
def test_bad_rank_names_layer_and_value(test_vit, rank):
    with pytest.raises(ValueError, match=rf'rank={rank}.*blocks\.0\.attn\.qkv'):
        apply_tou(test_vit, rank=rank)


@pytest.mark.parametrize('rank, match', [('energy:1.5', 'threshold=1.5'), ('energy:0', 'threshold=0.0'),
                                         (1.2, 'fraction=1.2'), (-0.5, 'fraction=-0.5')])
def test_bad_threshold_or_fraction(test_vit, rank, match):
    with pytest.raises(ValueError, match=match):
        apply_tou(test_vit, rank=rank)


def test_targets_matching_nothing_list_the_linears(test_vit):
    with pytest.raises(ValueError, match=r"targets=\['nope'\].*blocks\.0\.attn\.qkv"):
        apply_tou(test_vit, targets=['nope'])


def test_non_finite_weight_refused_at_factorization(test_vit):
    with torch.no_grad():
        test_vit.blocks[1].mlp.fc2.weight[0, 0] = float('nan')
    with pytest.raises(ValueError, match=r'blocks\.1\.mlp\.fc2\.weight has 1 non-finite'):
        apply_tou(test_vit, rank=8)


def test_non_finite_weight_refused_at_merge(test_vit):
    apply_tou(test_vit, rank=8)
    with torch.no_grad():
        test_vit.blocks[0].mlp.fc1.tou_B[0, 0] = float('inf')
    with pytest.raises(ValueError, match='non-finite'):
        merge(test_vit)


def test_applying_twice_raises(test_vit):
    apply_tou(test_vit, rank=8)
    with pytest.raises(ValueError, match='already prepared.*FactorizedLinear'):
        apply_tou(test_vit, rank=8)


@pytest.mark.parametrize('noise', [-1.0, float('nan')])
def test_bad_noise_scale(noise):
    with pytest.raises(ValueError, match='noise_scale='):
        FactorizedLinear.from_linear(nn.Linear(4, 4), rank=2, noise_scale=noise)


# -- helpers ---------------------------------------------------------------------------------------------------


def _inputs(fixture):
    torch.manual_seed(1)
    if fixture == 'mlp':
        return torch.randn(4, 24)
    if fixture == 'test_vit':
        return torch.randn(2, 3, 160, 160)
    return bert_inputs()


def _call(model, inputs):
    if isinstance(inputs, dict):
        return model(**inputs)
    dtype = next(model.parameters()).dtype
    return model(inputs.to(dtype))


def test_merged_model_is_structurally_identical(test_vit):
    """Same module classes, parameter names, shapes, dtypes and strides as an untouched model: the merged model
    runs the very same kernels, so its inference costs what the original's does (BENCHMARKS.md measures it)."""
    fresh = timm.create_model('test_vit', num_classes=7)
    apply_tou(test_vit, rank=8)
    merge(test_vit)
    assert [type(m) for m in test_vit.modules()] == [type(m) for m in fresh.modules()]
    layout = lambda m: [(n, p.shape, p.dtype, p.stride()) for n, p in m.named_parameters()]  # noqa: E731
    assert layout(test_vit) == layout(fresh)


@pytest.mark.parametrize('rank', [8, 'energy:0.6', 'ght', 'budget:0.3', 'calibrated'])
def test_chunked_apply_tou_equals_unchunked(test_vit, rank):
    """chunk= changes how the work is cut (and, for spectrum ranks, adds a first pass of spectra), not the model:
    the same ranks, the same factors (noise included) and the same outputs, on every rank policy and whitening."""
    calibration = None
    if rank == 'calibrated':
        calibration, rank = [torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))], 'energy:0.6'
    whole = apply_tou(copy.deepcopy(test_vit), rank=rank, noise_scale=1e-3, seed=2, calibration=calibration)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for chunk in (1, 2):
        chunked = apply_tou(copy.deepcopy(test_vit), rank=rank, noise_scale=1e-3, seed=2, calibration=calibration,
                            chunk=chunk)
        assert chunked.toukit_ranks == whole.toukit_ranks
        assert list(chunked.toukit_ranks) == list(whole.toukit_ranks)  # in the model's order
        for (name, p), (_, q) in zip(whole.named_parameters(), chunked.named_parameters()):
            torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=name)
        with torch.no_grad():
            torch.testing.assert_close(chunked(x), whole(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('entry', ['apply_tou', 'apply_method'])
def test_chunked_apply_tou_frees_each_weight_as_its_layer_is_built(test_vit, monkeypatch, entry):
    """With chunk=1 only the model's not-yet-factorized layers hold an original weight: a replaced layer's weight
    is freed at once, not at the end (also through apply_method, which then keeps no rollback copy)."""
    import weakref
    targets = toukit.targets.find_targets(test_vit, 'all')
    refs = {name: weakref.ref(toukit.targets.dense_weight(m)) for name, m in targets.items()}
    del targets
    built, alive = [], []
    original = FactorizedLinear.from_linear.__func__

    def spy(cls, linear, *args, **kwargs):
        alive.append(sum(r() is not None for r in refs.values()))
        built.append(kwargs['name'])
        return original(cls, linear, *args, **kwargs)
    monkeypatch.setattr(FactorizedLinear, 'from_linear', classmethod(spy))
    if entry == 'apply_tou':
        apply_tou(test_vit, rank=4, noise_scale=0.0, chunk=1)
    else:
        toukit.apply_method(test_vit, 'tou', rank=4, noise_scale=0.0, chunk=1)
    assert alive == [len(refs) - k for k in range(len(refs))]  # one fewer weight alive at each build
    assert all(r() is None for r in refs.values())


@pytest.mark.parametrize('splits,bias', [(1, True), (1, False), (3, True), (3, False)])
def test_forward_equals_the_two_products_it_stands_for(splits, bias):
    """The 2-D folded forward computes x B^T, then each split's A plus bias: checked against F.linear on inputs
    of every rank (a token, a batch of sequences, a 4-D stack, a non-contiguous view), outputs and gradients."""
    import torch.nn.functional as F
    torch.manual_seed(0)
    layer = FactorizedLinear.from_linear(nn.Linear(12, 18, bias=bias), rank=3, noise_scale=0.01, seed=0,
                                         splits=splits)

    def reference(x):
        h = F.linear(x, layer.tou_B)
        parts = h.split(layer.rank, dim=-1)
        o = layer.out_features // splits
        return torch.cat([F.linear(p, layer.tou_A[k], None if layer.bias is None else layer.bias[k * o:(k + 1) * o])
                          for k, p in enumerate(parts)], dim=-1)
    for x in (torch.randn(12), torch.randn(2, 5, 12), torch.randn(2, 3, 4, 12), torch.randn(12, 6).t()):
        x = x.clone().requires_grad_(True) if x.is_contiguous() else x.requires_grad_(True)
        got, want = layer(x), reference(x)
        assert got.shape == want.shape == (*x.shape[:-1], 18)
        assert_close(got, want, rtol=1e-6, atol=1e-6)
        g_got = torch.autograd.grad(got.sum(), [x, layer.tou_B])
        g_want = torch.autograd.grad(want.sum(), [x, layer.tou_B])
        for a, b in zip(g_got, g_want):
            assert_close(a, b, rtol=1e-5, atol=1e-6)
