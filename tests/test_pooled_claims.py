"""Claims pooled across tasks: a stratified bootstrap over each task's seeds and test examples."""
import json

import numpy as np
import pandas as pd
import pytest

from toukit import claims, plots, results


def _task(gaps: dict, n=600, prefix='', seconds=None):
    """One task's runs with known accuracies (correct counts per method) and train seconds (3 seeds)."""
    labels = np.zeros(n, int)
    seconds = seconds or {'ft': [30, 31, 33], 'tou': [10, 11, 12], 'tou_frozen_ffn': [9, 9, 9],
                          'lora': [20, 21, 22]}
    rows, records = [], {}
    for method, k in gaps.items():
        for seed in range(3):
            path = f'{prefix}{method}_{seed}'
            records[path] = {'metrics': {'final': {'test_predictions': np.where(np.arange(n) < k, 0, 1).tolist(),
                                                   'test_labels': labels.tolist()}}}
            rows.append(dict(method=method, seed=seed, status='ok', path=path, test_accuracy=k / n,
                             train_seconds=seconds[method][seed], train_memory_mib=50.0 + seed))
    return pd.DataFrame(rows), records


def test_pooled_difference_is_the_mean_of_the_tasks_and_verdicts_follow_the_interval():
    a, ra = _task({'ft': 570, 'tou': 569, 'tou_frozen_ffn': 500, 'lora': 480}, prefix='a/')  # FT - TOU: 1/6 point
    b, rb = _task({'ft': 570, 'tou': 540, 'tou_frozen_ffn': 500, 'lora': 480}, prefix='b/')  # FT - TOU: 5 points
    records = {**ra, **rb}
    table = claims.pooled_claims({'a': a, 'b': b}, n_boot=400, load=records.__getitem__)
    within = table[table.statement == 'Full TOU is at most 1 point below FT'].set_index('task')
    assert within.loc['a'].measured == pytest.approx(100 / 600) and within.loc['a'].verdict == 'holds'
    assert within.loc['b'].measured == pytest.approx(5.0) and within.loc['b'].verdict == 'does not hold'
    pooled = (100 / 600 + 5.0) / 2
    assert within.loc['pooled'].measured == pytest.approx(pooled)
    assert within.loc['pooled'].ci_low < pooled < within.loc['pooled'].ci_high
    assert within.loc['pooled'].verdict == 'does not hold'
    faster = table[table.statement == 'Full TOU trains faster than FT'].set_index('task')
    pooled = faster.loc['pooled']
    logs = np.log(np.array([10, 11, 12]) / np.array([30, 31, 33]))
    assert pooled.unit == 'ratio' and pooled.measured == pytest.approx(np.exp(logs.mean()))
    assert pooled.verdict == 'holds' and pooled.threshold == 1.0 and pooled.n_tasks == 2
    # each task's row is claims_table's paired t interval of the log ratios, over its 3 seeds
    mean, low, high = claims.paired_t_interval(logs, np.zeros(3))
    assert (faster.loc['a'].ci_low, faster.loc['a'].ci_high) == pytest.approx((np.exp(low), np.exp(high)))
    # pooling two identical tasks: the same mean, a narrower interval (more seeds, more degrees of freedom)
    assert pooled.ci_high - pooled.ci_low < faster.loc['a'].ci_high - faster.loc['a'].ci_low


def test_the_svd_family_is_compared_with_lora_and_mica_with_pissa_per_task_and_pooled():
    secs = {m: [10, 11, 12] for m in ('lora', 'pissa', 'mica', 'dora')}
    a, ra = _task({'lora': 480, 'pissa': 510, 'mica': 450, 'dora': 480}, prefix='a/', seconds=secs)
    b, rb = _task({'lora': 480, 'pissa': 540, 'mica': 480}, prefix='b/', seconds=secs)  # no DoRA on b
    table = claims.pooled_claims({'a': a, 'b': b}, n_boot=300, load={**ra, **rb}.__getitem__,
                                 claims=claims.SVD_FAMILY)
    assert set(table.claim) == {'svd'}  # no merge row (claim f) outside CLAIMS unless asked for
    assert set(claims.pooled_claims({'a': a}, n_boot=20, load=ra.__getitem__, claims=claims.SVD_FAMILY[:1],
                                    merge=True).claim) == {'svd', 'f'}
    assert claims.pooled_claims({'a': a}, n_boot=20, load=ra.__getitem__, claims=[]).empty
    rows = table.set_index(['statement', 'task'])
    pissa = 'PiSSA is more accurate than LoRA'
    assert rows.loc[(pissa, 'a'), 'measured'] == pytest.approx(5.0) and rows.loc[(pissa, 'a'), 'verdict'] == 'holds'
    assert rows.loc[(pissa, 'pooled'), 'measured'] == pytest.approx(7.5)  # (5 + 10) / 2
    minor = 'MiCA (minor singular directions) is more accurate than PiSSA (top ones)'
    assert rows.loc[(minor, 'pooled'), 'measured'] == pytest.approx((-10 - 10) / 2)
    assert rows.loc[(minor, 'pooled'), 'verdict'] == 'does not hold'
    dora = 'DoRA is more accurate than LoRA'
    assert rows.loc[(dora, 'b'), 'verdict'] == 'not measured' and rows.loc[(dora, 'pooled'), 'n_tasks'] == 1
    assert rows.loc[(dora, 'a'), 'verdict'] == 'undecided'  # the same test answers: a zero difference
    eva = 'EVA is more accurate than LoRA'
    assert rows.loc[(eva, 'pooled'), 'verdict'] == 'not measured'
    wide = claims.by_task(table).set_index('comparison')
    assert wide.columns.tolist() == ['a', 'b', 'pooled', 'verdict']
    assert wide.loc['PiSSA - LoRA', 'a'] == (f"+5.00 [{rows.loc[(pissa, 'a'), 'ci_low']:+.2f}, "
                                            f"{rows.loc[(pissa, 'a'), 'ci_high']:+.2f}]")
    assert wide.loc['DoRA - LoRA', 'b'] == 'not measured' and wide.loc['DoRA - LoRA', 'pooled'].endswith(
        '(1 of 2 tasks)')
    assert wide.loc['PiSSA - LoRA', 'verdict'] == f'{pissa}: holds'
    assert wide.loc['EVA - LoRA', 'pooled'] == 'not measured'
    assert wide.loc['MiCA - PiSSA', 'verdict'] == f'{minor}: does not hold'
    assert wide.loc['DoRA - LoRA', 'verdict'] == 'DoRA is more accurate than LoRA: undecided (on 1 of 2 tasks)'
    short = claims.pooled_claims({'a': a, 'b': b[~((b.method == 'pissa') & (b.seed == 2))]}, n_boot=50,
                                 load={**ra, **rb}.__getitem__, claims=claims.SVD_FAMILY[:1])
    wide = claims.by_task(short).set_index('comparison')  # b's PiSSA lacks a seed: its cells say so
    assert wide.loc['PiSSA - LoRA', 'b'].endswith('(2 seeds)') and not wide.loc['PiSSA - LoRA', 'a'].endswith(')')
    assert wide.loc['PiSSA - LoRA', 'pooled'].endswith('(2 seeds)')
    with pytest.raises(ValueError, match='accuracy differences only'):
        claims.by_task(claims.pooled_claims({'a': a}, n_boot=20, load=ra.__getitem__))


def test_a_cost_that_is_not_positive_is_named():
    a, ra = _task({'ft': 570, 'tou': 569, 'tou_frozen_ffn': 500, 'lora': 480},
                  seconds={'ft': [30, 0, 33], 'tou': [10, 11, 12], 'tou_frozen_ffn': [9, 9, 9], 'lora': [20, 21, 22]})
    with pytest.raises(ValueError, match='train_seconds must be positive .* ft_1'):
        claims.pooled_claims({'a': a}, n_boot=50, load=ra.__getitem__)


def test_a_task_without_a_method_is_not_measured_and_the_forest_plot_draws():
    a, ra = _task({'ft': 570, 'tou': 567, 'tou_frozen_ffn': 500, 'lora': 480}, prefix='a/')
    b, rb = _task({'ft': 570, 'tou': 540, 'tou_frozen_ffn': 500, 'lora': 480}, prefix='b/')
    records = {**ra, **rb}
    table = claims.pooled_claims({'a': a, 'b': b[b.method != 'lora']}, n_boot=100, load=records.__getitem__)
    lora = table[table.comparison.str.contains('LoRA') & (table.task == 'b')]
    assert set(lora.verdict) == {'not measured'}
    pooled = table[table.comparison.str.contains('LoRA') & (table.task == 'pooled')]
    assert pooled.measured.notna().all()  # from task a alone
    fig = plots.plot_forest(table)
    assert len(fig.axes) == table[table.claim != 'f'].statement.nunique()  # (f): no interval to draw
    wide, rw = _task({'ft': 570, 'tou': 567, 'tou_frozen_ffn': 500, 'lora': 480}, prefix='w/',
                     seconds={'ft': [300, 310, 330], 'tou': [10, 11, 12], 'tou_frozen_ffn': [9, 9, 9], 'lora': [20, 21, 22]})
    wide = plots.plot_forest(claims.pooled_claims({'w': wide}, n_boot=50, load=rw.__getitem__))
    for ax in fig.axes + wide.axes:  # a ratio's log axis reads, narrow (0.3-1) or wide (0.03-1): 3 labelled ticks
        ax.figure.canvas.draw()
        low, high = ax.get_xlim()
        shown = [t.get_text() for t in ax.get_xticklabels() if low <= t.get_position()[0] <= high and t.get_text()]
        assert len(shown) >= 3, (ax.get_title(), shown)


def test_a_figure_saved_again_later_is_the_same_bytes(tmp_path):
    """No build date in the PDF: rebuilding the figures leaves unchanged ones unchanged in git."""
    import time
    a, ra = _task({'ft': 570, 'tou': 540, 'tou_frozen_ffn': 500, 'lora': 480}, prefix='a/')
    fig = plots.plot_forest(claims.pooled_claims({'a': a}, n_boot=50, load=ra.__getitem__))
    first = plots.save_figure(fig, tmp_path / 'one' / 'forest')
    time.sleep(1.1)  # a PDF's creation date is written to the second
    second = plots.save_figure(fig, tmp_path / 'two' / 'forest')
    assert [p.suffix for p in first] == ['.png', '.pdf']
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in second]


def test_each_protocol_is_pooled_over_the_tasks_with_its_runs():
    gaps = {'ft': 570, 'tou': 560, 'tou_frozen_ffn': 500, 'lora': 480}
    tasks = {name: _task(dict(gaps, tou=tou), prefix=f'{name}/') for name, tou in [('a', 569), ('b', 540), ('c', 520)]}
    records = {path: r for _, rs in tasks.values() for path, r in rs.items()}
    protocols = {'a': 'grid+tuned+paper', 'b': 'tuned+paper', 'c': 'tuned'}  # c has no paper runs
    runs = pd.concat([t.assign(preset=name, protocol=protocols[name]) for name, (t, _) in tasks.items()],
                     ignore_index=True)
    runs.attrs['manifests'] = []  # as load_runs of records whose manifests plan nothing more: none left to wait for
    failed = runs.iloc[:1].assign(status='failed', test_accuracy=0.0, preset='b')  # a failed run counts nowhere
    table = claims.pooled_by_protocol(pd.concat([runs, failed], ignore_index=True), n_boot=200,
                                      load=records.__getitem__)
    assert list(table.protocol.unique()) == ['tuned', 'paper'] and table.columns[0] == 'protocol'
    tuned = table[table.protocol == 'tuned'].drop(columns='protocol').reset_index(drop=True)
    expected = claims.pooled_claims({name: t for name, (t, _) in tasks.items()}, n_boot=200, load=records.__getitem__)
    pd.testing.assert_frame_equal(tuned, expected)
    paper = table[table.protocol == 'paper']
    assert set(paper.task) == {'a', 'b', 'pooled'}
    assert (paper[(paper.task == 'pooled') & (paper.claim != 'f')].n_tasks == 2).all()
    merge = paper[(paper.task == 'pooled') & (paper.claim == 'f')].iloc[0]  # no merge column anywhere
    assert merge.n_tasks == 0 and merge.verdict == 'not measured' and np.isnan(merge.measured)
    within = paper[(paper.statement == 'Full TOU is at most 1 point below FT') & (paper.task == 'pooled')]
    assert within.measured.iloc[0] == pytest.approx((100 / 600 + 5.0) / 2)
    only_a = claims.pooled_by_protocol(runs, tasks=['a'], n_boot=50, load=records.__getitem__)
    assert only_a.empty and 'verdict' in only_a.columns  # one task: nothing pooled
    with pytest.raises(ValueError, match=r"no runs of \['nope'\].*\['a', 'b', 'c'\]"):
        claims.pooled_by_protocol(runs, tasks=['a', 'nope'])


def test_one_task_or_protocol_name_is_not_read_as_letters():
    gaps = {'ft': 570, 'tou': 560, 'tou_frozen_ffn': 500, 'lora': 480}
    tasks = {name: _task(gaps, prefix=f'{name}/') for name in ('ab', 'cd')}
    records = {path: r for _, rs in tasks.values() for path, r in rs.items()}
    runs = pd.concat([t.assign(preset=name, protocol='tuned') for name, (t, _) in tasks.items()], ignore_index=True)
    runs.attrs['manifests'] = []
    assert claims.pooled_by_protocol(runs, tasks='ab', n_boot=20, load=records.__getitem__).empty  # one task
    with pytest.raises(ValueError, match=r"no runs of \['a'\]"):
        claims.pooled_by_protocol(runs, tasks=['a'], n_boot=20, load=records.__getitem__)
    tuned = claims.pooled_by_protocol(runs, protocols='tuned', n_boot=20, load=records.__getitem__)
    assert set(tuned.protocol) == {'tuned'} and set(tuned.task) == {'ab', 'cd', 'pooled'}


def test_merging_is_pooled_as_the_worst_change_of_any_task():
    a, ra = _task({'ft': 570, 'tou': 569, 'tou_frozen_ffn': 500, 'lora': 480}, prefix='a/')
    b, rb = _task({'ft': 570, 'tou': 540, 'tou_frozen_ffn': 500, 'lora': 480}, prefix='b/')
    records = {**ra, **rb}
    merged = a.method.str.startswith('tou')
    a = a.assign(merge=merged.map({True: 'merged', False: ''}), merged_test_accuracy=a.test_accuracy)
    b = b.assign(merge=merged.map({True: 'merged', False: ''}), merged_test_accuracy=b.test_accuracy)
    b.loc[(b.method == 'tou') & (b.seed == 1), 'merged_test_accuracy'] -= 1 / 600  # one example flips
    a = a[a.seed < 2]  # two seeds here, three in b
    unevaluated = a.assign(merged_test_accuracy=float('nan'))  # merged, never evaluated after: not measured
    for tasks in ({'b': b, 'a': a, 'c': a.drop(columns=['merge']), 'd': unevaluated},
                  {'c': a.drop(columns=['merge']), 'a': a, 'd': unevaluated, 'b': b}):  # the change first, then last
        table = claims.pooled_claims(tasks, n_boot=50, load=records.__getitem__).set_index('task')
        f = table[table.claim == 'f']
        assert f.loc['a'].verdict == 'holds' and f.loc['a'].measured == 0 and f.loc['a'].seeds == 2
        assert f.loc['b'].verdict == 'does not hold' and f.loc['b'].measured == pytest.approx(100 / 600)
        assert f.loc['c'].verdict == f.loc['d'].verdict == 'not measured'  # no merge column; no merged accuracy
        pooled = f.loc['pooled']
        assert pooled.verdict == 'does not hold' and pooled.measured == pytest.approx(100 / 600)
        assert pooled.n_tasks == 2 and pooled.seeds == 2  # the tasks measured, the fewest seeds of one
        assert (pooled.ci_low, pooled.ci_high) == pytest.approx((-100 / 600, 0))
    fig = plots.plot_forest(table.reset_index())
    assert len(fig.axes) == table.statement.nunique() - 1  # (f) has a range, not an interval: table only


def test_the_summary_keeps_a_digit_that_decides():
    rows = pd.DataFrame([
        dict(claim='b', statement='s', comparison='x', task='pooled', measured=-1.46, ci_low=-2.914, ci_high=0.003,
             unit='points', threshold=0.0, seeds=3, n_tasks=2, verdict='undecided'),
        dict(claim='d', statement='t', comparison='y', task='pooled', measured=0.9, ci_low=0.8, ci_high=0.9996,
             unit='ratio', threshold=1.0, seeds=3, n_tasks=2, verdict='holds'),
        dict(claim='d', statement='t', comparison='y', task='a', measured=0.9, ci_low=0.8, ci_high=0.99,
             unit='ratio', threshold=1.0, seeds=3, n_tasks=1, verdict='holds'),
        dict(claim='f', statement='m', comparison='z', task='pooled', measured=0.5, ci_low=-0.5, ci_high=0.25,
             unit='points', threshold=0.0, seeds=3, n_tasks=2, verdict='does not hold'),
        dict(claim='a', statement='u', comparison='v', task='pooled', measured=2.0, ci_low=0.999, ci_high=3.0,
             unit='points', threshold=1.0, seeds=3, n_tasks=2, verdict='undecided'),
        dict(claim='a', statement='u', comparison='v', task='pooled', measured=1.5, ci_low=1 + 1e-9, ci_high=2.0,
             unit='points', threshold=1.0, seeds=3, n_tasks=2, verdict='does not hold'),
        dict(claim='d', statement='t', comparison='y', task='pooled', measured=0.8, ci_low=np.nan, ci_high=np.nan,
             unit='ratio', threshold=1.0, seeds=1, n_tasks=2, verdict='undecided (one seed)'),
        dict(claim='c', statement='w', comparison='x', task='pooled', measured=np.nan, ci_low=np.nan,
             ci_high=np.nan, unit='points', threshold=0.0, seeds=0, n_tasks=0, verdict='not measured')])
    summary = claims.pooled_summary(rows.assign(protocol='tuned'))
    assert summary['pooled (95% CI)'].tolist() == [
        '-1.46 [-2.91, +0.003] points', '0.90x [0.80, 0.9996]', '0.50 points at most (from -0.50 to +0.25)',
        '+2.00 [+0.999, +3.00] points', '+1.50 [+1.000000001, +2.00] points', '0.80x (no interval)', 'not measured']
    assert summary.columns[0] == 'protocol' and summary.tasks.tolist() == [2, 2, 2, 2, 2, 2, 0]
    unchanged = claims.pooled_summary(rows.iloc[3:4].assign(measured=0.0, ci_low=0.0, ci_high=0.0))
    assert unchanged['pooled (95% CI)'].tolist() == ['no merged run changed'] and 'protocol' not in unchanged


def test_a_task_whose_sweep_has_runs_left_sits_out_unless_partial(tmp_path):
    """On disk, as the figures notebook reads them: task b's manifest plans a paper run that has no record (it
    died), and a tuned method whose grid is unfinished, so b sits out both protocols with a warning that names
    what is left; `partial=True` pools it over the seeds there are. A manifest's runs all there: nothing left."""
    gaps = {'ft': 570, 'tou': 560, 'tou_frozen_ffn': 500, 'lora': 480}
    for name, tou in (('a', 569), ('b', 540)):
        frame, records = _task(dict(gaps, tou=tou), prefix=f'{name}_')
        planned = {'tuned': {}, 'paper': {}}
        for row in frame.itertuples():
            record = dict(records[row.path], status='ok', cost=dict(train_seconds=row.train_seconds,
                                                                    train_memory_mib=row.train_memory_mib),
                          run=dict(id=row.path, config=dict(method=row.method, preset=name, seed=row.seed)))
            if not (name == 'b' and row.path == 'b_lora_2'):  # b's last LoRA paper run died
                results.write_record(record, tmp_path / f'{row.path}.json')
            for protocol in planned:
                planned[protocol].setdefault(row.method, []).append(row.path)
        if name == 'b':
            planned['tuned'].pop('tou_frozen_ffn')  # its grid has not finished: no tuned runs planned yet
        results.write_record(dict(name=name, preset=name, methods=list(gaps), runs=planned),
                             tmp_path / f'{name}.sweep.json')
    runs = results.load_runs(tmp_path)
    assert results.missing_runs(runs, 'a', 'paper') == []
    assert results.missing_runs(runs, 'b', 'paper') == ['b_lora_2']
    assert results.missing_runs(runs, 'b', 'tuned') == ['tou_frozen_ffn: not planned yet', 'b_lora_2']
    with pytest.warns(UserWarning) as caught:
        table = claims.pooled_by_protocol(runs, n_boot=50)
    assert [str(w.message).split(';')[0] for w in caught if 'sits out' in str(w.message)] == [
        'tuned protocol: b sits out, its sweep has 1 run left (b_lora_2) and no tuned runs yet for tou_frozen_ffn '
        '(its grid unfinished)',
        'paper protocol: b sits out, its sweep has 1 run left (b_lora_2)']
    assert table.empty and table.attrs['left_out'] == {p: {'b': results.missing_runs(runs, 'b', p)}
                                                       for p in ('tuned', 'paper')}
    table = claims.pooled_by_protocol(runs, protocols='paper', n_boot=50, partial=True)
    lora = table[(table.claim == 'c') & (table.task == 'b')].iloc[0]  # Full TOU - LoRA over the 2 seeds LoRA has
    assert lora.seeds == 2 and lora.measured == pytest.approx(100 * 60 / 600)
    with pytest.warns(UserWarning, match='not the manifests'):  # a copy without them: said, not silently pooled
        claims.pooled_by_protocol(pd.DataFrame(runs.to_dict('list')), protocols='paper', n_boot=20)
    diverged = json.loads((tmp_path / 'b_tou_1.json').read_text())
    results.write_record(dict(diverged, status='diverged', error='non-finite loss at step 3'),
                         tmp_path / 'b_tou_1.json')  # final: nothing left
    results.write_record(dict(diverged, status='ok', run=dict(diverged['run'], id='b_lora_2',
                         config=dict(diverged['run']['config'], method='lora', seed=2))), tmp_path / 'b_lora_2.json')
    runs = results.load_runs(tmp_path)
    assert results.missing_runs(runs, 'b', 'paper') == []
    assert len(results.with_protocol(runs[runs.preset == 'b'], 'tuned').query('method == "tou"')) == 2
    listed = results.diverged_runs(runs)  # the seed the tables are short of, named
    assert listed[['run_id', 'method', 'seed', 'protocol', 'error']].values.tolist() == [
        ['b_tou_1', 'tou', 1, 'tuned+paper', 'non-finite loss at step 3']]
    assert results.diverged_runs(runs[runs.status == 'ok']).empty
