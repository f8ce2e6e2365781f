"""The FT - full TOU gap split into parameterization, restriction and truncation, on made-up records."""
import numpy as np
import pandas as pd
import pytest

from toukit import claims, gap, plots

N = 1000


def _task(correct: dict, prefix: str = ''):
    """One task's runs and records from method -> (seeds x test examples) 0/1 correctness (labels all 0)."""
    rows, records = [], {}
    for method, by_seed in correct.items():
        for seed, right in by_seed.items():
            path = f'{prefix}{method}_{seed}'
            records[path] = {'metrics': {'final': {'test_predictions': (1 - np.asarray(right)).tolist(),
                                                   'test_labels': [0] * len(right)}}}
            rows.append(dict(method=method, seed=seed, status='ok', path=path, test_accuracy=np.mean(right),
                             train_seconds=10.0 + seed, train_memory_mib=50.0))
    return pd.DataFrame(rows), records


def _first(counts: dict, seeds=(0, 1, 2)):
    """method -> seed -> the first k + seed examples right: nested, so each difference is known exactly."""
    return {m: {s: (np.arange(N) < k + s).astype(int) for s in seeds} for m, k in counts.items()}


def _random(rng, seeds=(0, 1, 2)):
    return {m: {s: (rng.random(N) < p).astype(int) for s in seeds}
            for m, p in zip(gap.GAP_METHODS, (0.9, 0.88, 0.85, 0.84))}


def test_known_parts_are_recovered_per_task_and_pooled():
    a, ra = _task(_first({'ft': 900, 'tou_full_rank': 880, 'tou_residual': 850, 'tou': 840}), 'a/')  # +2 +3 +1
    b, rb = _task(_first({'ft': 900, 'tou_full_rank': 860, 'tou_residual': 850, 'tou': 850}), 'b/')  # +4 +1 0
    table = gap.gap_decomposition({'a': a, 'b': b}, n_boot=300, load={**ra, **rb}.__getitem__)
    assert list(table.part.unique()) == ['total', 'parameterization', 'restriction', 'truncation']
    measured = table.set_index(['part', 'task']).measured
    expected = {'a': (6, 2, 3, 1), 'b': (5, 4, 1, 0), 'pooled': (5.5, 3, 2, 0.5)}
    for task, values in expected.items():
        assert [measured[p, task] for p in table.part.unique()] == pytest.approx(values, abs=1e-9)
    assert (table.ci_low <= table.measured + 1e-9).all() and (table.measured <= table.ci_high + 1e-9).all()
    assert (table[table.measured > 0].ci_low > 0).all()  # nested: every draw keeps the sign
    assert (table.seeds == 3).all() and table.set_index('task').n_tasks.to_dict() == {'a': 1, 'b': 1, 'pooled': 2}


def test_the_parts_add_up_to_the_total_replicate_by_replicate():
    rng = np.random.default_rng(1)
    tasks = {name: _task(_random(rng), f'{name}/') for name in ('a', 'b', 'c')}
    records = {p: r for _, rs in tasks.values() for p, r in rs.items()}
    runs = {name: frame for name, (frame, _) in tasks.items()}
    table = gap.gap_decomposition(runs, n_boot=400, seed=3, load=records.__getitem__)
    for task, rows in table.groupby('task'):
        rows = rows.set_index('part')
        assert rows.measured[['parameterization', 'restriction', 'truncation']].sum() == pytest.approx(
            rows.measured['total'], abs=1e-9)
        assert rows.ci_low.le(rows.measured).all() and rows.measured.le(rows.ci_high).all()
    draws = np.random.default_rng(0)
    estimates = [gap._task_replicates(frame, records.__getitem__, draws, 400) for frame in runs.values()]
    for points, replicates, seeds in estimates + [gap._pooled(estimates)]:
        assert seeds == 3 and points[1:].sum() == pytest.approx(points[0], abs=1e-9)
        np.testing.assert_allclose(replicates[:, 1:].sum(1), replicates[:, 0], rtol=0, atol=1e-9)
    # the total is claims' FT - Full TOU: the same estimate, and claims' bootstrap with the same draws
    within = claims.pooled_claims(runs, n_boot=50, load=records.__getitem__)
    within = within[within.comparison == 'FT - Full TOU'].set_index('task').measured
    total = table[table.part == 'total'].set_index('task').measured
    assert total.to_dict() == pytest.approx(within.to_dict(), abs=1e-9)
    a = {m: claims.correct_on_test(runs['a'][runs['a'].method == m].path, records.__getitem__) for m in ('ft', 'tou')}
    alone = claims.bootstrap_means(a['ft'] - a['tou'].astype(float), 400, np.random.default_rng(0)) * 100
    np.testing.assert_allclose(estimates[0][1][:, 0], alone, rtol=0, atol=1e-9)


def test_runs_on_another_test_set_are_refused_not_paired():
    """A run whose test labels differ (another split) would pair different examples: the gap split and a method's
    own rows refuse it, naming the run (the claims pair through the same `paired_correct_on_test`)."""
    a, records = _task(_first({'ft': 900, 'tou_full_rank': 880, 'tou_residual': 850, 'tou': 840}), 'a/')
    final = records['a/tou_residual_1']['metrics']['final']
    final['test_labels'] = final['test_labels'][1:] + [1]  # as many examples, one label different
    with pytest.raises(ValueError, match="a/tou_residual_1: its test labels differ from those of a/ft_0"):
        gap.gap_decomposition({'a': a}, n_boot=50, load=records.__getitem__)
    with pytest.raises(ValueError, match='a/tou_residual_1: its test labels differ'):
        claims.correct_on_test(a[a.method == 'tou_residual'].path, records.__getitem__)
    assert claims.paired_correct_on_test([a[a.method == m].path for m in ('ft', 'tou')], records.__getitem__)[0].shape \
        == (3, N)


def test_a_task_missing_a_method_is_not_measured_and_pooling_uses_the_others():
    rng = np.random.default_rng(2)
    a, ra = _task(_random(rng), 'a/')
    b, rb = _task(_random(rng), 'b/')
    fewer = _random(rng)
    fewer['tou_full_rank'].pop(2)  # one seed short: c uses the seeds all four share
    c, rc = _task(fewer, 'c/')
    records = {**ra, **rb, **rc}
    table = gap.gap_decomposition({'a': a, 'b': b[b.method != 'tou_residual'], 'c': c}, n_boot=200,
                                  load=records.__getitem__)
    b_rows = table[table.task == 'b']
    assert len(b_rows) == 4 and b_rows.measured.isna().all() and (b_rows.seeds == 0).all()
    pooled = table[table.task == 'pooled'].set_index('part')
    alone = gap.gap_decomposition({'a': a, 'c': c}, n_boot=200, load=records.__getitem__)
    alone = alone[alone.task == 'pooled'].set_index('part')
    pd.testing.assert_series_equal(pooled.measured, alone.measured)
    assert (pooled.n_tasks == 2).all() and (pooled.seeds == 2).all()
    with_a, only_c = (gap.gap_decomposition(t, n_boot=200, load=records.__getitem__) for t in ({'a': a, 'c': c},
                                                                                               {'c': c}))
    pd.testing.assert_frame_equal(with_a[with_a.task == 'c'].reset_index(drop=True),  # a task's interval stays put
                                  only_c[only_c.task == 'c'].reset_index(drop=True))  # as other tasks arrive
    assert (table[table.task == 'c'].seeds == 2).all()
    nothing = gap.gap_decomposition({'b': b[b.method != 'tou_residual']}, n_boot=20, load=records.__getitem__)
    assert nothing.measured.isna().all() and (nothing[nothing.task == 'pooled'].n_tasks == 0).all()
    shown = gap.format_gap_table(table.assign(protocol='tuned')).set_index(['part', 'task'])
    assert shown.loc[('total', 'b'), 'difference, points (95% CI)'] == 'not measured'
    a_total = table.set_index(['part', 'task']).loc[('total', 'a')]
    assert shown.loc[('total', 'a'), 'difference, points (95% CI)'] == (
        f'{a_total.measured:+.2f} [{a_total.ci_low:+.2f}, {a_total.ci_high:+.2f}]')
    assert (shown.protocol == 'tuned').all()
    fig = plots.plot_gap(table, title='gap')
    assert len(fig.axes) == 4 and fig.axes[0].get_xlim() == fig.axes[3].get_xlim()  # one x axis for all parts
    labels = [t.get_text() for t in fig.axes[1].get_yticklabels()]
    assert labels == ['pooled (2 seeds)', 'c (2 seeds)', 'b (not measured)', 'a (3 seeds)']
