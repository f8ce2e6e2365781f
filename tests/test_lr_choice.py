"""Learning-rate choices within the validation noise: the runner-up, its runs, and the claims both ways."""
import math

import numpy as np
import pandas as pd
import pytest
from scipy.stats import norm

from toukit import lr_choice, results
from toukit.config import run_id

N_TEST = 600


def _record(val, val_size=1024, status='ok', predictions=None, preset='a', method='tou', lr=1e-5, seed=0, right=None):
    """A run record with a final validation accuracy (and per-example validation predictions, labels all 0, when
    given) and `right` of N_TEST test examples right (the first ones)."""
    config = dict(method=method, preset=preset, lr=lr, seed=seed)
    final = dict(val_accuracy=val, test_labels=[0] * N_TEST, test_accuracy=(right or 0) / N_TEST,
                 test_predictions=np.where(np.arange(N_TEST) < (right or 0), 0, 1).tolist())
    if predictions is not None:
        final.update(val_predictions=list(predictions), val_labels=[0] * len(predictions))
    return dict(run=dict(id=run_id(config), config=config), status=status, data=dict(val_size=val_size),
                metrics=dict(final=final), cost=dict(train_seconds=10.0 + seed, train_memory_mib=50.0 + seed))


def test_five_of_1024_is_within_the_binomial_noise_and_fifty_is_not():
    p1, p2 = 0.80, 0.80 - 5 / 1024
    grid = {1e-5: _record(p1), 5e-5: _record(p2), 2e-4: _record(0.5), 1e-3: _record(0.1, status='diverged')}
    margin = lr_choice.runner_up_margin(grid)
    threshold = 1.959964 * math.sqrt(p1 * (1 - p1) / 1024 + p2 * (1 - p2) / 1024) * 100
    se = threshold / 1.959964 / 100
    assert margin == dict(best=1e-5, runner_up=5e-5, margin=pytest.approx(500 / 1024), threshold=pytest.approx(
        threshold), test='binomial', p_value=pytest.approx(2 * norm.sf(5 / 1024 / se)), close=True)
    assert lr_choice.close_runner_up(grid) == 5e-5
    assert lr_choice.close_runner_up({**grid, 5e-5: _record(0.80 - 50 / 1024)}) is None  # 4.9 points: not noise
    assert lr_choice.close_runner_up({1e-5: _record(0.8), 5e-5: _record(0.8)}) == 5e-5  # a tie: the later rate
    assert lr_choice.close_runner_up({1e-5: _record(0.8), 5e-5: None}) is None  # the grid unfinished
    assert lr_choice.runner_up_margin({1e-5: _record(0.8), 1e-3: _record(0.9, status='diverged')}) is None
    assert lr_choice.runner_up_margin({1e-5: _record(1.0), 5e-5: _record(1.0)})['close']  # both perfect: a tie
    with pytest.raises(ValueError, match='no data.val_size'):
        lr_choice.runner_up_margin({1e-5: _record(0.8), 5e-5: {**_record(0.79), 'data': {}}})


@pytest.mark.parametrize('won, lost, close', [(4, 0, True), (5, 0, True), (9, 2, True), (10, 1, False),
                                              (53, 33, False), (52, 33, True)])
def test_a_lead_of_a_few_disagreements_is_tested_exactly(won, lost, close):
    """McNemar's exact test on the examples the two rates disagree on: 4 of 4 won is p = 0.125, 9 of 11 is
    p = 0.065, 52 of 85 p = 0.0503 (a normal approximation around the observed lead called all three decided)."""
    from scipy.stats import binomtest
    best = np.zeros(1024, int)
    second = best.copy()
    second[:won] = 1  # the best rate gets these right (label 0), the runner-up not
    best[won:won + lost] = 1  # and the runner-up these
    accuracy = lambda p: float((p == 0).mean())  # noqa: E731
    grid = {1e-5: _record(accuracy(best), 1024, predictions=best),
            5e-5: _record(accuracy(second), 1024, predictions=second)}
    margin = lr_choice.runner_up_margin(grid)
    assert margin['best'] == 1e-5 and margin['margin'] == pytest.approx((won - lost) / 1024 * 100)
    assert margin['p_value'] == pytest.approx(binomtest(won, won + lost, 0.5).pvalue)
    assert margin['close'] is close and (margin['p_value'] >= 0.05) is close
    assert (margin['margin'] < margin['threshold']) is close


def test_no_disagreement_is_a_tie_and_the_test_is_symmetric():
    same = np.zeros(1024, int)
    same[:100] = 1
    tie = lr_choice.runner_up_margin({1e-5: _record(0.9, predictions=same), 5e-5: _record(0.9, predictions=same)})
    assert tie['margin'] == 0 and tie['p_value'] == 1 and tie['threshold'] == math.inf and tie['close']
    a, b = same.copy(), same.copy()
    a[100:103], b[:2] = 1, 0  # b gets 5 more examples right, though a's recorded accuracy is the higher
    flipped = lr_choice.runner_up_margin({1e-5: _record(0.9, predictions=a), 5e-5: _record(0.89, predictions=b)})
    assert flipped['best'] == 1e-5 and flipped['margin'] == pytest.approx(-5 / 1024 * 100)
    assert flipped['p_value'] == pytest.approx(2 / 2 ** 5) and flipped['close']  # 5 of 5: p = 0.0625 either way


def test_per_example_validation_predictions_are_compared_paired():
    best = np.zeros(1000, int)
    best[800:] = 1  # 800 of 1000 right
    second = best.copy()
    second[:6] = 1  # the same mistakes and 6 more: 0.6 points, every difference the same way
    grid = {1e-5: _record(0.8, 1000, predictions=best), 5e-5: _record(0.794, 1000, predictions=second)}
    margin = lr_choice.runner_up_margin(grid)
    assert margin['test'] == 'paired' and margin['margin'] == pytest.approx(0.6)
    assert margin['p_value'] == pytest.approx(2 / 2 ** 6)  # McNemar's exact test: 6 of 6 disagreements won
    assert margin['threshold'] == pytest.approx(0.6)  # 6 disagreements decide only when all 6 go one way
    assert not margin['close']  # paired: not noise
    unpaired = {lr: {**r, 'metrics': {'final': {'val_accuracy': r['metrics']['final']['val_accuracy']}}}
                for lr, r in grid.items()}
    assert lr_choice.runner_up_margin(unpaired)['test'] == 'binomial' and lr_choice.close_runner_up(unpaired) == 5e-5
    other = {**grid[5e-5], 'metrics': {'final': {**grid[5e-5]['metrics']['final'],
                                                 'val_labels': [0] * 999 + [1]}}}  # another validation set
    with pytest.raises(ValueError, match='hold different validation labels'):
        lr_choice.runner_up_margin({1e-5: grid[1e-5], 5e-5: other})


def _sweep(tmp_path, preset: str, grid: dict, test_right: dict, skip=()):
    """A finished sweep on disk: method -> {lr: validation accuracy} on seed 0, each method's best rate on seeds
    0-2, and the runner-up rate's seeds 1-2 where `test_right` has that rate (method -> lr -> test examples right),
    except the runs in `skip` (method, lr, seed)."""
    runs = {'grid': {}, 'tuned': {}, 'paper': {}}
    for method, by_lr in grid.items():
        best = max(by_lr, key=by_lr.get)
        for lr, val in by_lr.items():
            seeds = (0, 1, 2) if lr in test_right[method] else (0,)
            for seed in seeds:
                record = _record(val, preset=preset, method=method, lr=lr, seed=seed,
                                 right=test_right[method].get(lr, 300))
                if (method, lr, seed) not in skip:
                    results.write_record(record, tmp_path / f'{record["run"]["id"]}.json')
                if seed == 0:
                    runs['grid'].setdefault(method, []).append(record['run']['id'])
                if lr == best:
                    runs['tuned'].setdefault(method, []).append(record['run']['id'])
    results.write_record(dict(name=preset, preset=preset, methods=list(grid), seeds=[0, 1, 2],
                              grid={m: list(g) for m, g in grid.items()}, overrides={}, runs=runs),
                         tmp_path / f'{preset}.sweep.json')


def test_the_plan_lists_the_runner_up_runs_and_the_claims_are_reported_both_ways(tmp_path):
    far = {'ft': {1e-5: 0.5, 5e-5: 0.9}, 'tou_frozen_ffn': {1e-5: 0.4, 5e-5: 0.8}, 'lora': {1e-4: 0.3, 1e-3: 0.8}}
    tests = {'ft': {5e-5: 570}, 'tou_frozen_ffn': {5e-5: 500}, 'lora': {1e-3: 480}}
    _sweep(tmp_path, 'a', dict(far, tou={1e-5: 0.800, 5e-5: 0.795}), dict(tests, tou={1e-5: 569, 5e-5: 510}),
           skip=[('tou', 5e-5, 2)])  # TOU's runner-up: seed 1 run, seed 2 not yet
    _sweep(tmp_path, 'b', dict(far, tou={1e-5: 0.2, 5e-5: 0.795}), dict(tests, tou={5e-5: 540}))
    runs = results.load_runs(tmp_path)
    manifest = results.read_manifest(tmp_path / 'a.sweep.json')
    margins = lr_choice.lr_margins(manifest, runs)
    assert margins.set_index('method').close.to_dict() == dict(ft=False, tou_frozen_ffn=False, lora=False, tou=True)
    plan = lr_choice.runner_up_plan(manifest, runs)
    assert plan.method.tolist() == ['tou'] and plan.runner_up.tolist() == [5e-5] and plan.seeds[0] == [0, 1, 2]
    ids = [_record(0, preset='a', lr=5e-5, seed=s)['run']['id'] for s in (0, 1, 2)]
    assert plan.run_ids[0] == ids and plan.missing[0] == ids[2:]
    assert lr_choice.runner_up_plan(results.read_manifest(tmp_path / 'b.sweep.json'), runs).empty

    chosen, swapped, substituted = lr_choice.tuned_both_ways(runs)
    assert substituted == {'a': {'tou'}, 'b': set()}
    tou = {way: by_task['a'][by_task['a'].method == 'tou']
           for way, by_task in (('chosen', chosen), ('swapped', swapped))}
    assert set(tou['chosen'].lr) == {1e-5} and sorted(tou['chosen'].seed) == [0, 1, 2]
    assert set(tou['swapped'].lr) == {5e-5} and sorted(tou['swapped'].seed) == [0, 1]  # seed 2's run not made yet
    assert swapped['b'].run_id.tolist() == chosen['b'].run_id.tolist()  # nothing close in b
    others = {way: set(by_task['a'].run_id[by_task['a'].method != 'tou']) for way, by_task in (('c', chosen),
                                                                                               ('s', swapped))}
    assert others['c'] == others['s']

    table = lr_choice.claims_both_ways(runs, n_boot=200)
    assert table.choice.unique().tolist() == ['chosen', 'runner-up']
    gap = table[table.claim == 'a'].set_index(['choice', 'task'])
    assert gap.measured['chosen', 'a'] == pytest.approx(100 / 600) and gap.seeds['chosen', 'a'] == 3
    assert gap.measured['runner-up', 'a'] == pytest.approx(60 / 600 * 100) and gap.seeds['runner-up', 'a'] == 2
    assert gap.measured['chosen', 'b'] == gap.measured['runner-up', 'b'] == pytest.approx(5.0)  # nothing close
    assert gap.rates['chosen', 'a'] == 'ft 5e-05, tou 1e-05'
    assert gap.rates['runner-up', 'a'] == 'ft 5e-05, tou 5e-05 (runner-up)'
    assert gap.rates['runner-up', 'pooled'] == 'a: ft 5e-05, tou 5e-05 (runner-up); b: ft 5e-05, tou 5e-05'
    assert gap.measured['runner-up', 'pooled'] == pytest.approx((10 + 5) / 2)
    assert (table[table.claim == 'f'].rates == '').all()
    with pytest.raises(ValueError, match="task 'a': no sweep manifest"):
        lr_choice.claims_both_ways(pd.DataFrame(runs.to_dict('list')), tasks=['a'], n_boot=10)  # no manifests
