"""Adaptive ranks: budget allocation (against brute force), the optimal hard threshold, rank patterns and
activation-aware factorization."""
import itertools

import pytest
import timm
import torch
from torch.testing import assert_close

import toukit
from toukit import calibration, data, studies
from toukit.layers import FactorizedLinear
from toukit.linalg import balance_factors, factorize, whitening_factor
from toukit.ranks import allocate_budget, optimal_hard_threshold_rank, parse_rank


def _spectra(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.linalg.svdvals(torch.randn(*s, generator=g, dtype=torch.float64) * torch.rand(
        s[1], generator=g, dtype=torch.float64)) for s in shapes]


def _error(gains, ranks):
    return sum(float(g[r:].sum()) for g, r in zip(gains, ranks))


SHAPES = [(6, 5), (4, 6), (7, 3), (5, 4)]


def test_greedy_allocation_matches_brute_force():
    spectra = _spectra(SHAPES)
    gains = [s.square() / s.square().sum() for s in spectra]
    costs = [shape[1] for shape in SHAPES]  # TOU's trainable cost per rank: in
    combos = list(itertools.product(*[range(1, len(g) + 1) for g in gains]))
    floor = sum(costs)
    previous = float('inf')
    for budget in range(floor, floor + 60):
        ranks = allocate_budget(gains, costs, budget)
        spent = sum(r * c for r, c in zip(ranks, costs))
        assert spent <= budget
        if any(r < len(g) for r, g in zip(ranks, gains)):
            assert budget - spent < max(costs)  # within one rank step of the budget
        best = min(_error(gains, c) for c in combos if sum(r * k for r, k in zip(c, costs)) <= spent)
        assert _error(gains, ranks) == pytest.approx(best, abs=1e-12), budget  # optimal for what it spends
        assert _error(gains, ranks) <= previous + 1e-12  # a larger budget never gives a larger error
        previous = _error(gains, ranks)


@pytest.mark.parametrize('budget', [0, -5, 3])
def test_budget_below_the_smallest_allocation_is_refused(budget):
    gains = [s.square() for s in _spectra(SHAPES)]
    with pytest.raises(ValueError, match=f'budget={budget}'):
        allocate_budget(gains, [5, 6, 3, 4], budget)


def test_allocate_ranks_spends_the_budget(tiny_bert):
    targets = toukit.find_targets(tiny_bert)
    for cost, per in (('trainable', lambda m: m.in_features), ('total', lambda m: m.in_features + m.out_features)):
        uniform = sum(per(m) * round(0.375 * min(m.weight.shape)) for m in targets.values())
        for budget in (0.5, 1.0, 1.5, 3000):
            ranks = toukit.allocate_ranks(tiny_bert, budget, cost=cost)
            spend = budget * uniform if isinstance(budget, float) else budget
            spent = sum(per(targets[n]) * r for n, r in ranks.items())
            assert spend - max(per(m) for m in targets.values()) < spent <= spend, (cost, budget)
    errors = []
    table = toukit.spectrum_table(tiny_bert)
    for budget in (0.5, 1.0, 1.5):
        ranks = toukit.allocate_ranks(tiny_bert, budget)
        errors.append(sum(toukit.relative_error(torch.as_tensor(row.singular_values), ranks[row.name]) ** 2
                          for row in table.itertuples()))
        uniform = sum(toukit.relative_error(torch.as_tensor(row.singular_values), round(0.375 * row.max_rank)) ** 2
                      for row in table.itertuples())
        if budget == 1.0:
            assert errors[-1] <= uniform + 1e-12  # the allocation never does worse than uniform at its cost
    assert errors == sorted(errors, reverse=True)


@pytest.mark.parametrize('budget, match', [(0, 'budget=0'), (-1.0, 'budget=-1.0'), (10, 'below the smallest'),
                                           ('1', "budget='1'")])
def test_allocate_ranks_bad_budgets(tiny_bert, budget, match):
    with pytest.raises(ValueError, match=match):
        toukit.allocate_ranks(tiny_bert, budget)


def test_fused_qkv_is_one_layer_of_three_matrices(test_vit):
    ranks = toukit.allocate_ranks(test_vit, 1.0)
    assert 'blocks.0.attn.qkv' in ranks
    toukit.apply_tou(test_vit, rank='budget:1.0', noise_scale=0.0)
    assert test_vit.toukit_ranks == ranks


def test_optimal_hard_threshold_finds_a_planted_rank():
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(200, 5, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(120, 5, generator=g, dtype=torch.float64))
    signal = u @ torch.diag(torch.tensor([40.0, 35, 30, 25, 20], dtype=torch.float64)) @ v.T
    noisy = signal + torch.randn(200, 120, generator=g, dtype=torch.float64) * 0.1
    assert optimal_hard_threshold_rank(torch.linalg.svdvals(noisy), (200, 120)) == 5
    assert parse_rank('ght').resolve((200, 120), torch.linalg.svdvals(noisy)) == 5
    assert str(parse_rank('ght')) == 'ght' and str(parse_rank('budget:1.0')) == 'budget:1.0'


def test_rank_patterns(tiny_bert):
    model = toukit.apply_tou(tiny_bert, rank={'query': 3, 'intermediate.dense': 'energy:0.9', '*': 0.25},
                             noise_scale=0.0)
    ranks = model.toukit_ranks
    assert ranks['encoder.encoder.layer.0.attention.self.query'] == 3
    assert ranks['encoder.encoder.layer.1.attention.self.key'] == round(0.25 * 32)
    replay = toukit.apply_tou(toukit.create_model('tiny-bert', num_classes=3, seed=0), rank=ranks, noise_scale=0)
    assert replay.toukit_ranks == ranks


@pytest.mark.parametrize('rank, match', [
    ({'query': 3, 'nope': 2, '*': 4}, r"\['nope'\] name no targeted module"),
    ({'query': 3}, 'gives no rank to encoder.encoder.layer.0.attention.self.key'),
    ({'*': 10_000}, 'rank=10000'), ({}, 'empty rank pattern'), ({'*': 'budget:1.0'}, 'pass it alone')])
def test_bad_rank_patterns(tiny_bert, rank, match):
    with pytest.raises(ValueError, match=match):
        toukit.apply_tou(tiny_bert, rank=rank)
    assert not toukit.is_prepared(tiny_bert)


def test_whitened_truncation_never_loses_to_plain_svd():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(30, 20, generator=g, dtype=torch.float64)
    x = torch.randn(200, 20, generator=g, dtype=torch.float64) * torch.linspace(0.01, 3, 20, dtype=torch.float64)
    factor = whitening_factor(x)
    for r in (1, 5, 10, 19):
        a, b = factorize([w], r, whitening=[factor])[0]
        plain_a, plain_b = toukit.truncated_svd(w, r)
        aware = torch.linalg.norm(x @ (w - a @ b).T)
        plain = torch.linalg.norm(x @ (w - plain_a @ plain_b).T)
        assert aware <= plain * (1 + 1e-9), r
    with pytest.raises(ValueError, match='input width 20'):
        factorize([w], 3, whitening=[whitening_factor(x[:, :5])])


@pytest.fixture(scope='module')
def minilm_batches():
    model = toukit.create_model('minilm', num_classes=5, seed=0).eval()
    bundle = data.load_dataset('bbc', model, max_length=64, train_limit=32, val_limit=16, test_limit=16)
    loader = torch.utils.data.DataLoader(bundle.train, batch_size=16)
    return model, [inputs for inputs, _ in loader]


def test_activation_aware_factors_beat_plain_svd_on_minilm(minilm_batches):
    import copy
    model, batches = minilm_batches
    inputs = calibration.capture_layer_inputs(model, batches)
    aware = toukit.apply_tou(copy.deepcopy(model), rank=0.25, noise_scale=0.0, calibration=batches)
    plain = toukit.apply_tou(copy.deepcopy(model), rank=0.25, noise_scale=0.0)
    aware_modules, plain_modules = dict(aware.named_modules()), dict(plain.named_modules())
    originals = dict(model.named_modules())
    wins = 0
    for name, x in inputs.items():
        reference = x.double() @ originals[name].weight.detach().double().T
        err = {k: float(torch.linalg.norm(x.double() @ m[name].effective_weight().detach().double().T - reference))
               for k, m in (('aware', aware_modules), ('plain', plain_modules))}
        assert err['aware'] <= err['plain'] * (1 + 1e-4), name  # float32 factors: a hair of rounding
        wins += err['aware'] < 0.95 * err['plain']
    assert wins > len(inputs) // 2  # and usually by a margin


def test_balanced_factors_keep_the_product_and_give_unit_rows():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2, 7, 3, generator=g, dtype=torch.float64)
    b = torch.randn(2, 3, 5, generator=g, dtype=torch.float64) * torch.tensor([1e-3, 1.0, 40.0]).view(1, 3, 1)
    a2, b2 = balance_factors(a, b)
    assert_close(a2 @ b2, a @ b)
    assert_close(torch.linalg.vector_norm(b2, dim=-1), torch.ones(2, 3, dtype=torch.float64))


def test_activation_aware_factors_train_at_plain_tou_scale(minilm_batches):
    """B = V_r^T L^{-1} alone has rows many times shorter than plain TOU's on MiniLM, so alpha's noise and AdamW's
    steps were that much larger relative to B and training collapsed to the majority class; balanced factors
    match plain TOU's scale, and the noise stays a small perturbation of the logits."""
    import copy
    model, batches = minilm_batches

    def prepared(alpha, calibration):
        return toukit.apply_tou(copy.deepcopy(model), rank=0.25, noise_scale=alpha, seed=0, calibration=calibration)

    aware, plain = prepared(0.0, batches), prepared(0.0, None)
    b_scale = {}
    for key, m in (('aware', aware), ('plain', plain)):
        layers = [x for x in m.modules() if isinstance(x, FactorizedLinear)]
        rows = torch.cat([torch.linalg.vector_norm(x.tou_B.detach(), dim=-1) for x in layers])
        assert_close(rows, torch.ones_like(rows), rtol=0, atol=1e-4)
        b_scale[key] = float(torch.cat([x.tou_B.detach().abs().flatten() for x in layers]).mean())
    assert 0.5 < b_scale['aware'] / b_scale['plain'] < 2, b_scale
    with torch.no_grad():
        clean, noisy = aware(**batches[1]), prepared(1e-3, batches)(**batches[1])
    assert float(torch.linalg.norm(noisy - clean) / torch.linalg.norm(clean)) < 0.1


def test_activation_aware_tou_merges_exactly(minilm_batches):
    import copy
    model, batches = minilm_batches
    prepared = toukit.apply_tou(copy.deepcopy(model), rank=0.25, calibration=batches[:1])
    with torch.no_grad():
        before = prepared(**batches[1])
        toukit.merge(prepared)
        after = prepared(**batches[1])
    assert_close(after, before, rtol=1e-4, atol=1e-5)
    copy.deepcopy(model).load_state_dict(prepared.state_dict(), strict=True)


def test_calibration_that_does_not_fit_is_refused(test_vit, tiny_bert):
    with pytest.raises(ValueError, match='calibration batch 0'):
        toukit.apply_tou(test_vit, rank=4, calibration=[torch.randn(2, 5, 7, 7)])
    name = 'encoder.encoder.layer.0.attention.self.query'
    bad = {n: torch.randn(10, 32) for n in toukit.find_targets(tiny_bert)}
    bad[name] = torch.randn(10, 31)
    with pytest.raises(ValueError, match=f'calibration inputs of {name} are 31 wide'):
        toukit.apply_tou(tiny_bert, rank=4, calibration=bad)
    assert not toukit.is_prepared(test_vit) and not toukit.is_prepared(tiny_bert)


def test_budget_rank_in_a_run_record_replays(tmp_path):
    from toukit import train
    record = train.run(method='tou', preset='test', rank='budget:0.5', epochs=1, max_steps_per_epoch=1,
                              calibration_batches=2, results_dir=str(tmp_path), progress=False)
    assert record['run']['config']['rank'] == 'budget:0.5' and record['ranks']
    model = timm.create_model('test_vit', num_classes=4)
    toukit.apply_tou(model, rank=record['ranks'])
    assert model.toukit_ranks == record['ranks']


def test_explorer_exports_a_rank_pattern(tiny_bert):
    table = toukit.spectrum_table(tiny_bert)
    from toukit import plots
    explorer = plots.threshold_explorer(table, start=0.9)
    pattern = explorer.rank_pattern()
    assert pattern == {row.name: row.rank_e90 for row in table.itertuples()}
    toukit.apply_tou(tiny_bert, rank=pattern, noise_scale=0.0)
    assert tiny_bert.toukit_ranks == pattern


def test_budget_study_compares_policies_at_equal_budget(tiny_bert):
    from conftest import bert_inputs
    calibration = [bert_inputs(batch=4, length=12, seed=s) for s in (1, 2)]
    study = studies.budget_study(tiny_bert, [0.5, 1.0], heldout=[bert_inputs(seed=3)], calibration=calibration)
    assert len(study) == 8 and set(study.policy) == {'uniform', 'energy threshold', 'budget (weights)',
                                                     'budget (activations)'}
    targets = toukit.find_targets(tiny_bert)
    uniform = sum(m.in_features * round(0.375 * min(m.weight.shape)) for m in targets.values())
    for row in study.itertuples():
        if row.policy != 'uniform':
            assert row.trainable <= row.budget * uniform, row
    weights = study[study.policy == 'budget (weights)'].sort_values('budget')
    assert weights.weight_error.is_monotonic_decreasing
    assert (study[['weight_error', 'output_error', 'logit_error']] >= 0).all().all()


def test_budget_as_text_keeps_a_parameter_count(tiny_bert):
    assert parse_rank('budget:3000').value == 3000 and isinstance(parse_rank('budget:3000').value, int)
    assert parse_rank('budget:1.0').value == 1.0 and isinstance(parse_rank('budget:1.0').value, float)
    assert toukit.TrainConfig(rank='budget:3000').rank == 'budget:3000'
    expected = toukit.allocate_ranks(tiny_bert, 3000)
    toukit.apply_tou(tiny_bert, rank='budget:3000', noise_scale=0.0)
    assert tiny_bert.toukit_ranks == expected
