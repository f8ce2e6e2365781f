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
def test_frozen_ffn_freezes_exactly_the_mlp_factors(model_type):
    model, inputs = build(model_type)
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
