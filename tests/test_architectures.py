"""The test matrix: every supported family, as a tiny random config (no downloads)."""
import copy

import pytest
import torch
from torch import nn

import toukit
from toukit.targets import layer_kind, model_family
from architectures import ARCHITECTURES, build, logits

FAMILIES = list(ARCHITECTURES)


def _structure(model):
    return [(n, type(m)) for n, m in model.named_modules()]


@pytest.mark.parametrize('model_type', FAMILIES)
def test_full_rank_tou_reproduces_and_merges_back(model_type):
    model, inputs = build(model_type)
    reference = logits(model, inputs)
    prepared = toukit.apply_tou(copy.deepcopy(model), rank=1.0, noise_scale=0.0, svd_method='exact')
    factorized = [n for n, m in prepared.named_modules() if isinstance(m, toukit.FactorizedLinear)]
    family = model_family(model)
    assert len(factorized) == len(family.kinds) and factorized  # every attention and MLP projection of every block
    out = logits(prepared, inputs)
    assert float((out - reference).norm() / reference.norm()) < 1e-5
    toukit.merge(prepared)
    assert _structure(prepared) == _structure(model)
    fresh, _ = build(model_type, seed=1)
    fresh.load_state_dict(prepared.state_dict(), strict=True)
    assert float((logits(fresh, inputs) - reference).norm() / reference.norm()) < 1e-5


@pytest.mark.parametrize('model_type', FAMILIES)
def test_tou_with_residual_starts_at_the_model_at_any_rank(model_type):
    model, inputs = build(model_type)
    reference = logits(model, inputs)
    toukit.apply_method(model, 'tou_residual', rank=0.25)  # truncated, and noisy: the residual takes both back
    assert any(isinstance(m, toukit.ResidualFactorizedLinear) for m in model.modules())
    assert float((logits(model, inputs) - reference).norm() / reference.norm()) < 1e-5


NO_MLP_LINEAR = {'mixtral'}  # its experts are 3-d parameters and its router a bare parameter: no MLP nn.Linear


@pytest.mark.parametrize('model_type', FAMILIES)
def test_frozen_ffn_freezes_exactly_the_mlp_factors(model_type):
    model, inputs = build(model_type)
    if model_type in NO_MLP_LINEAR:
        with pytest.raises(ValueError, match='hold no MLP linear'):
            toukit.apply_method(model, 'tou_frozen_ffn', rank=4)
        return
    toukit.apply_method(model, 'tou_frozen_ffn', rank=4)
    family = model_family(model)
    kinds = set()
    for name, module in model.named_modules():
        if isinstance(module, toukit.FactorizedLinear):
            kind = layer_kind(family, name)
            kinds.add(kind)
            assert module.tou_B.requires_grad == (kind == 'attention'), name
            assert not module.tou_A.requires_grad
    assert kinds == {'attention', 'mlp'}
    logits(model, inputs)


@pytest.mark.parametrize('model_type', FAMILIES)
def test_lora_through_apply_method_prepares_and_merges(model_type):
    model, inputs = build(model_type)
    original = copy.deepcopy(model)
    toukit.apply_method(model, 'lora', rank=2)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all('lora_' in n or n.startswith(tuple(toukit.targets.head_names(original))) or
                             'classifier' in n or 'score' in n for n in trainable)
    before = logits(model, inputs)
    toukit.merge(model)
    assert _structure(model) == _structure(original)
    assert float((logits(model, inputs) - before).norm() / before.norm()) < 1e-5


@pytest.mark.parametrize('model_type', ['gpt2', 'llama', 't5', 'bart', 'opt'])
def test_no_lm_head_is_a_default_target(model_type):
    model, _ = build(model_type)
    head = model.get_output_embeddings()
    for targets in ('all', 'attention', 'mlp'):
        assert all(m is not head for m in toukit.find_targets(model, targets).values())
    with pytest.raises(ValueError, match='heads are never factorized'):
        toukit.find_targets(model, ['lm_head'])


def test_gpt2_conv1d_factorizes_and_keeps_its_embedding_tie():
    from transformers.pytorch_utils import Conv1D
    model, inputs = build('gpt2')
    assert model.lm_head.weight is model.transformer.wte.weight
    conv = {n for n, m in model.named_modules() if isinstance(m, Conv1D)}
    toukit.apply_tou(model, rank=0.5)
    factorized = {n for n, m in model.named_modules() if isinstance(m, toukit.FactorizedLinear)}
    assert factorized == conv  # c_attn (as q, k, v), c_proj, c_fc and mlp.c_proj of every block
    assert model.transformer.h[0].attn.c_attn.splits == 3
    toukit.merge(model)
    assert {n for n, m in model.named_modules() if isinstance(m, Conv1D)} == conv
    assert model.lm_head.weight is model.transformer.wte.weight


def test_conv1d_with_a_non_finite_weight_is_refused():
    model, _ = build('gpt2')
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[0, 0] = float('nan')
    with pytest.raises(ValueError, match='transformer.h.0.mlp.c_fc.weight has 1 non-finite'):
        toukit.apply_tou(model, rank=4)
    assert not toukit.is_prepared(model)


def test_unknown_family_with_mlp_targets_lists_the_linears(mlp):
    with pytest.raises(ValueError, match=r"targets='mlp' needs .* its linears are: fc1, fc2, head"):
        toukit.find_targets(mlp, 'mlp')


def test_adapters_go_after_every_attention_and_mlp_output():
    model, inputs = build('bart')
    toukit.apply_method(model, 'adapter', width=4)
    wrapped = [n for n, m in model.named_modules() if isinstance(m, toukit.AdapterLinear)]
    # encoder: self-attention and MLP; decoder: self-attention, cross-attention and MLP; 2 blocks each
    assert len(wrapped) == 2 * 2 + 2 * 3
    assert all(n.endswith(('out_proj', 'fc2')) for n in wrapped)
    logits(model, inputs)


def test_swin_patch_merging_is_no_block_linear():
    model, _ = build('swin')
    names = list(toukit.find_targets(model))
    assert not any('downsample' in n for n in names) and not any(isinstance(m, nn.Linear) and 'downsample' in n
                                                                  for n, m in toukit.find_targets(model).items())


def _perturb(model, seed=0):
    """Move every trainable tensor a little, as training would, so that merge has something to merge."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.02)


@pytest.mark.parametrize('method', ['tou', 'tou_residual', 'svfit', 'delora'])
@pytest.mark.parametrize('model_type', FAMILIES)
def test_the_merged_model_computes_what_the_unmerged_one_did(model_type, method):
    model, inputs = build(model_type)
    original = copy.deepcopy(model)
    options = dict(tou=dict(rank=0.5, noise_scale=1e-2), tou_residual=dict(rank=0.5, noise_scale=1e-2),
                   svfit=dict(rank=2), delora=dict(rank=2))[method]
    toukit.apply_method(model, method, **options)
    _perturb(model)
    before = logits(model, inputs)
    toukit.merge(model)
    after = logits(model, inputs)
    assert float((after - before).norm() / before.norm()) < 1e-5
    assert _structure(model) == _structure(original)
    for (name, merged), (_, untouched) in zip(model.named_modules(), original.named_modules()):
        if isinstance(untouched, nn.Linear) or toukit.targets.is_dense(untouched):
            assert (getattr(merged, 'bias', None) is None) == (getattr(untouched, 'bias', None) is None), name
    original.load_state_dict(model.state_dict(), strict=True)
    assert torch.equal(logits(original, inputs), after)


class _WeightProducts(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts matrix products both of whose operands are parameters' storage: a layer's weight formed from factors."""
    OPERANDS = {'mm': (0, 1), 'bmm': (0, 1), 'addmm': (1, 2), 'baddbmm': (1, 2), 'matmul': (0, 1)}

    def __init__(self, model):
        super().__init__()
        self.storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.products = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in self.OPERANDS:
            operands = [args[i] for i in self.OPERANDS[name]]
            if all(isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() in self.storages for t in operands):
                self.products.append((name, tuple(operands[0].shape), tuple(operands[1].shape)))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize('model_type', FAMILIES)
def test_no_weight_sized_product_in_any_forward(model_type):
    """TOU's saving is its forward never forming A B, also where a model's code reads `.weight.dtype` (T5)."""
    model, inputs = build(model_type)
    toukit.apply_tou(model, rank=0.5)
    with _WeightProducts(model) as counter, torch.no_grad():
        model(**inputs)
    assert counter.products == []


def test_the_weight_product_counter_sees_a_formed_weight():
    model, inputs = build('t5')
    toukit.apply_tou(model, rank=0.5)
    layer = model.encoder.block[0].layer[1].DenseReluDense.wo
    with _WeightProducts(model) as counter:
        layer.effective_weight()
    assert len(counter.products) == 1


def test_a_factorized_weight_gives_dtype_and_device_and_refuses_writes():
    model, _ = build('t5')
    toukit.apply_tou(model, rank=0.5)
    layer = model.encoder.block[0].layer[1].DenseReluDense.wo
    assert layer.weight.dtype == torch.float32 and layer.weight.device.type == 'cpu'
    assert tuple(layer.weight.shape) == (layer.out_features, layer.in_features)
    with pytest.raises(ValueError, match='FactorizedLinear.weight is formed from the layer'):
        layer.weight = nn.Parameter(torch.zeros(layer.out_features, layer.in_features))
    with pytest.raises(AttributeError, match='call effective_weight'):
        layer.weight.add_(1.0)


class _Subclassed(nn.Linear):
    """An nn.Linear subclass that is not nn.Linear itself (as NonDynamicallyQuantizableLinear, FalconLinear)."""


class _SubclassNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([_SubclassBlock() for _ in range(2)])
        self.head = nn.Linear(24, 3)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(1))


class _SubclassBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(24, 4, batch_first=True)
        self.up = _Subclassed(24, 40, bias=False)  # non-square and bias-less: the old merge added a bias, transposed
        self.down = _Subclassed(40, 24)

    def forward(self, x):
        x = x + self.attn(x, x, x, need_weights=False)[0]
        return x + self.down(torch.relu(self.up(x)))


@pytest.mark.parametrize('method', ['tou', 'svfit', 'delora'])
def test_linear_subclasses_and_multihead_attention_merge_back_exactly(method):
    torch.manual_seed(0)
    model = _SubclassNet().eval()
    x = torch.randn(2, 6, 24)
    original = copy.deepcopy(model)
    reference = model(x)
    if method == 'tou':
        exact = toukit.apply_tou(copy.deepcopy(model), rank=1.0, noise_scale=0.0, svd_method='exact')
        assert isinstance(exact.blocks[0].attn.out_proj, toukit.FactorizedLinear)
        torch.testing.assert_close(exact(x), reference, rtol=1e-5, atol=1e-5)
    toukit.apply_method(model, method, **dict(tou=dict(rank=4, noise_scale=1e-2), svfit=dict(rank=2),
                                              delora=dict(rank=2))[method], targets='all')
    _perturb(model)
    before = model(x)
    toukit.merge(model)
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-6)
    assert _structure(model) == _structure(original)
    assert model.blocks[0].up.bias is None and type(model.blocks[0].attn.out_proj) is type(
        original.blocks[0].attn.out_proj)
    original.load_state_dict(model.state_dict(), strict=True)


@pytest.mark.parametrize('method', ['lora', 'adapter'])
def test_methods_multihead_attention_would_bypass_are_refused(method):
    model = _SubclassNet()
    with pytest.raises(ValueError, match='nn.MultiheadAttention reads'):
        toukit.apply_method(model, method)
    assert not toukit.is_prepared(model)


def test_a_linear_subclass_that_cannot_be_restored_is_refused():
    class Transposed(nn.Linear):  # stores its weight (in x out): toukit cannot know its layout
        def __init__(self):
            super().__init__(4, 6)
            self.weight = nn.Parameter(self.weight.detach().T.contiguous())

    with pytest.raises(ValueError, match=r'Transposed: weight of shape \(4, 6\) is not \(out_features, in_features\)'):
        toukit.FactorizedLinear.from_linear(Transposed(), rank=2)


def test_a_linear_subclass_with_its_own_forward_is_never_a_target():
    model, _ = build('llama4_text')
    routers = [n for n, m in model.named_modules() if type(m).__name__ == 'Llama4Router']
    assert routers and not set(routers) & set(toukit.find_targets(model))
    with pytest.raises(ValueError, match='with a forward of its own'):
        toukit.FactorizedLinear.from_linear(model.get_submodule(routers[0]), rank=2)


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16, torch.float16])
def test_falcon_linear_is_a_target_in_every_dtype(dtype):
    model, _ = build('falcon')
    model.to(dtype)
    targets = toukit.find_targets(model)
    assert targets and all(type(m).__name__ == 'FalconLinear' for m in targets.values())
