"""Every method on every task and pooled: accuracy with a bootstrap interval and cost, on made-up records."""
import numpy as np
import pandas as pd
import pytest

from toukit import method_table as mt
from toukit import plots, results

N = 400


def _task(correct: dict, prefix: str, seconds: float = 10.0):
    """One task's runs and records from method -> the number of the N test examples right, per seed (labels 0)."""
    rows, records = [], {}
    for method, counts in correct.items():
        for seed, k in enumerate(counts):
            path = f'{prefix}{method}_{seed}'
            records[path] = {'metrics': {'final': {'test_predictions': np.where(np.arange(N) < k, 0, 1).tolist(),
                                                   'test_labels': [0] * N}}}
            rows.append(dict(method=method, seed=seed, status='ok', path=path, lr=1e-3, test_accuracy=k / N,
                             trainable_params=1000, total_params=5000, train_seconds=seconds + seed,
                             train_memory_mib=50.0 + 2 * seed, preset=prefix.strip('/')))
    return pd.DataFrame(rows), records


def test_task_and_pooled_rows_in_registry_order_with_missing_methods_not_measured():
    a, ra = _task({'tou': [300, 310, 320], 'ft': [360, 360, 360]}, 'a/')
    b, rb = _task({'ft': [340, 340, 340]}, 'b/', seconds=20.0)
    table = mt.method_table({'a': a, 'b': b}, n_boot=300, load={**ra, **rb}.__getitem__)
    assert table.method.tolist()[:6] == ['ft'] * 3 + ['lora'] * 3  # every registered method, FT first
    assert table.task.tolist()[:3] == ['a', 'b', 'pooled']
    rows = table.set_index(['method', 'task'])
    assert rows.loc[('tou', 'a'), 'test_accuracy'] == pytest.approx(77.5)  # (300 + 310 + 320) / 3 / 400
    assert rows.loc[('ft', 'pooled'), 'test_accuracy'] == pytest.approx((90 + 85) / 2)  # the tasks' mean
    assert rows.loc[('ft', 'pooled'), 'n_tasks'] == 2 and rows.loc[('tou', 'pooled'), 'n_tasks'] == 1
    # a method with runs on some tasks only is not pooled: its mean would not compare with FT's over both
    assert pd.isna(rows.loc[('tou', 'pooled'), 'test_accuracy']) and rows.loc[('tou', 'pooled'), 'seeds'] == 0
    assert rows.loc[('tou', 'a'), 'train_seconds'] == 11.0 and rows.loc[('tou', 'a'), 'train_memory_mib'] == 52.0
    assert rows.loc[('tou', 'a'), 'trainable_params'] == 1000 and rows.loc[('tou', 'a'), 'seeds'] == 3
    assert pd.isna(rows.loc[('ft', 'pooled'), 'train_seconds'])  # one model and machine per task: not pooled
    measured = table[table.seeds > 0]
    assert (measured.ci_low <= measured.test_accuracy).all() and (measured.test_accuracy <= measured.ci_high).all()
    assert rows.loc[('tou', 'a'), 'ci_low'] < rows.loc[('tou', 'a'), 'ci_high']
    missing = rows.loc['dora']
    assert (missing.seeds == 0).all() and missing.test_accuracy.isna().all() and missing.n_tasks.tolist() == [0, 0, 0]
    shown = mt.format_method_table(table).set_index(['Method', 'Task'])
    assert shown.loc[('DoRA', 'a'), 'Test accuracy (%, 95% CI)'] == 'not measured'
    assert shown.loc[('FT', 'pooled (2 tasks)'), 'Test accuracy (%, 95% CI)'].startswith('87.50 [')
    assert shown.loc[('Full TOU', 'pooled (1 task)'), 'Test accuracy (%, 95% CI)'] == 'not pooled (runs on 1 of 2 tasks)'
    assert shown.loc[('Full TOU', 'a'), 'lr'] == '0.001' and shown.loc[('Full TOU', 'a'), 'Train time (s)'] == '11'


def test_pooling_two_identical_tasks_keeps_the_mean_and_narrows_the_interval():
    a, ra = _task({'ft': [300, 320, 310]}, 'a/')
    b, rb = _task({'ft': [300, 320, 310]}, 'b/')
    table = mt.method_table({'a': a, 'b': b}, n_boot=2000, load={**ra, **rb}.__getitem__, methods=['ft'])
    rows = table.set_index('task')
    assert rows.test_accuracy['pooled'] == pytest.approx(rows.test_accuracy['a'])
    width = rows.ci_high - rows.ci_low
    assert width['pooled'] < 0.85 * width['a']  # independent draws per task average out


def test_one_methods_interval_stays_put_when_another_methods_records_arrive():
    early, records = _task({'ft': [300, 320, 310]}, 'a/')
    later, more = _task({'ft': [300, 320, 310], 'lora': [200, 250, 300]}, 'a/')
    before = mt.method_table({'a': early}, n_boot=200, load=records.__getitem__).set_index(['method', 'task'])
    after = mt.method_table({'a': later}, n_boot=200, load=more.__getitem__).set_index(['method', 'task'])
    assert before.loc['ft'][['ci_low', 'ci_high']].equals(after.loc['ft'][['ci_low', 'ci_high']])
    assert after.loc[('lora', 'a'), 'seeds'] == 3 and before.loc[('lora', 'a'), 'seeds'] == 0


def test_runs_of_several_learning_rates_are_refused():
    a, ra = _task({'ft': [300, 320]}, 'a/')
    twice = pd.concat([a, a.assign(lr=1e-4)], ignore_index=True)
    with pytest.raises(ValueError, match='several ft runs share a seed'):
        mt.method_table({'a': twice}, n_boot=10, load=ra.__getitem__)


def test_runs_by_task_keeps_the_given_order_and_an_absent_task_is_empty():
    a, _ = _task({'ft': [300]}, 'a/')
    b, _ = _task({'ft': [300]}, 'b/')
    runs = pd.concat([b, a], ignore_index=True).assign(protocol='grid+tuned')
    assert list(results.runs_by_task(runs, 'tuned')) == ['a', 'b']
    by_task = results.runs_by_task(runs, 'tuned', ['b', 'c', 'a'])
    assert list(by_task) == ['b', 'c', 'a'] and by_task['c'].empty and len(by_task['a']) == 1
    assert results.runs_by_task(runs, 'paper', 'a')['a'].empty


def test_accuracy_by_task_is_one_row_per_method_and_the_plot_draws_every_task(tmp_path):
    a, ra = _task({'tou': [300, 310, 320], 'ft': [360, 360, 360]}, 'a/')
    b, rb = _task({'ft': [340, 340, 340], 'pissa': [300, 320]}, 'b/')  # PiSSA: 2 seeds
    table = mt.method_table({'a': a, 'b': b}, n_boot=200, load={**ra, **rb}.__getitem__,
                            methods=['ft', 'tou', 'lora', 'pissa'])
    wide = mt.accuracy_by_task(table).set_index('Method')
    assert wide.index.tolist() == ['FT', 'Full TOU', 'LoRA', 'PiSSA']
    assert wide.columns.tolist() == ['a', 'b', 'pooled']
    assert wide.loc['PiSSA', 'b'].startswith('77.50 [') and wide.loc['PiSSA', 'b'].endswith('] (2 seeds)')
    rows = table.set_index(['method', 'task'])
    assert wide.loc['FT', 'pooled'] == f"{rows.loc[('ft', 'pooled'), 'test_accuracy']:.2f} [" \
        f"{rows.loc[('ft', 'pooled'), 'ci_low']:.2f}, {rows.loc[('ft', 'pooled'), 'ci_high']:.2f}]"
    assert wide.loc['Full TOU', 'a'].startswith('77.50 [') and wide.loc['Full TOU', 'b'] == ''
    assert wide.loc['Full TOU', 'pooled'] == 'not pooled (runs on 1 of 2 tasks)'
    assert (wide.loc['LoRA'] == '').all()  # never run: empty cells, not a number
    shifted = table.set_axis(table.index + 100)
    assert mt.accuracy_by_task(shifted).equals(mt.accuracy_by_task(table))  # cells matched by position, not label
    with pytest.raises(ValueError, match='protocols'):
        mt.accuracy_by_task(pd.concat([table.assign(protocol='tuned'), table.assign(protocol='paper')]))
    fig = plots.plot_method_accuracy(table, title='tuned')
    assert [ax.get_title() for ax in fig.axes] == ['a', 'b', 'pooled (2 tasks)']
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert labels == ['PiSSA', 'LoRA', 'Full TOU', 'FT']  # top: registry first
    drawn = {ax.get_title(): len([l for l in ax.get_lines() if l.get_marker() in ('o', 'D')]) for ax in fig.axes}
    assert drawn == {'a': 2, 'b': 2, 'pooled (2 tasks)': 1}  # a point per measured method; FT alone is pooled
    colours = {plots._method_color(m) for m in plots.method_names()}
    assert len(colours) == len(plots.method_names())  # one colour per registered method
    assert plots.save_figure(fig, tmp_path / 'acc') and (tmp_path / 'acc.png').stat().st_size > 1000
