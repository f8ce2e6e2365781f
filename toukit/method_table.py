"""Every method on every task and pooled across tasks: cost, and test accuracy with a 95% interval.

    table = method_table(runs_by_task(load_runs('results'), 'tuned'))
    format_method_table(table)   # ready to print: 'not measured' where a method has no run yet

Accuracy intervals come from `toukit.claims`' bootstrap over seeds and test examples, on one method's correctness
rather than on a difference; the pooled row is the mean of the tasks' means, replicate by replicate, as
`toukit.claims.pooled_claims` pools a difference.
"""
import zlib
from typing import Callable, Dict, Optional, Sequence

import numpy as np
import pandas as pd

from .claims import bootstrap_means, correct_on_test, runs_by_seed
from .methods import method_label, method_names
from .results import read_record

__all__ = ['method_table', 'format_method_table', 'accuracy_by_task', 'METHOD_TABLE_COLUMNS']

METHOD_TABLE_COLUMNS = ['method', 'task', 'lr', 'trainable_params', 'total_params', 'test_accuracy', 'ci_low',
                        'ci_high', 'train_seconds', 'train_memory_mib', 'seeds', 'n_tasks']


def method_table(runs_by_task: Dict[str, pd.DataFrame], n_boot: int = 4000, seed: int = 0,
                 load: Optional[Callable[[str], dict]] = None, methods: Sequence[str] = ()) -> pd.DataFrame:
    """One row per (method, task) and (method, 'pooled'): parameters, test accuracy with its 95% interval, cost.

    A task's accuracy is the mean over its seeds of the test accuracy, its interval the 2.5 and 97.5 percentiles of a
    bootstrap that resamples the seeds and the test examples (`toukit.claims.bootstrap_means`); with one seed it
    reflects the test examples only. The pooled row weighs each task the same: the mean of their means and of their
    replicates, for a method with runs on every task of `runs_by_task` (a mean over fewer tasks would not compare
    with the other methods' pooled rows: the row is then empty, `n_tasks` saying how many tasks have runs;
    parameters, time and memory are left out there, since they belong to one model and one machine each). Each (method, task) draws from its own generator, seeded by
    `seed` and the two names, so that a method's interval stays put as other methods' records arrive.

    Args:
        runs_by_task: task name (e.g. its preset) -> one protocol's runs of that task (`toukit.results.runs_by_task`).
        n_boot: bootstrap replicates.
        seed: seeds the bootstrap's draws.
        load: reads a record from its path (default `toukit.results.read_record`).
        methods: the rows' methods, in order; empty: every registered method (`toukit.method_names`) and then any
            other method the runs have. A method without runs is a row too: not measured (NaN, seeds 0).

    Returns:
        Columns `METHOD_TABLE_COLUMNS`: method, task, lr, trainable_params, total_params, test_accuracy, ci_low,
        ci_high (points), train_seconds, train_memory_mib (means over seeds), seeds (the pooled row: the fewest of
        a task), n_tasks.

    Raises:
        ValueError: a method with several runs of one seed in a task (runs of several learning rates: pass one
            protocol's runs).
    """
    load = load or read_record
    if not methods:
        seen = {m for runs in runs_by_task.values() if len(runs) for m in runs.method}
        methods = method_names() + sorted(seen - set(method_names()))
    rows = []
    for method in methods:
        estimates = {}
        for task, runs in runs_by_task.items():
            row, estimates[task] = _task_row(runs, method, task, load, n_boot, seed)
            rows.append(row)
        measured = [e for e in estimates.values() if e is not None]
        # a pooled mean over another set of tasks than the other rows' would not compare with them: none then
        rows.append(_pooled_row(method, measured if len(measured) == len(runs_by_task) else [], len(measured)))
    return pd.DataFrame(rows, columns=METHOD_TABLE_COLUMNS)


def _task_row(runs: pd.DataFrame, method: str, task: str, load: Callable[[str], dict], n_boot: int, seed: int):
    """(row, (point, replicates, seeds) or None) of one method on one task."""
    chosen = runs_by_seed(runs, method) if len(runs) else None
    if chosen is None or chosen.empty:
        return dict(method=method, task=task, seeds=0, n_tasks=0), None
    correct = correct_on_test(chosen.sort_index().path, load).astype(float)  # seeds x test examples
    rng = np.random.default_rng([seed, zlib.crc32(f'{method}/{task}'.encode())])
    point, replicates = correct.mean() * 100, bootstrap_means(correct, n_boot, rng) * 100
    low, high = np.percentile(replicates, [2.5, 97.5])
    row = dict(method=method, task=task, lr=chosen.lr.iloc[0] if chosen.lr.nunique() == 1 else np.nan,
               trainable_params=chosen.trainable_params.iloc[0], total_params=chosen.total_params.iloc[0],
               test_accuracy=point, ci_low=low, ci_high=high, train_seconds=chosen.train_seconds.mean(),
               train_memory_mib=chosen.train_memory_mib.mean(), seeds=len(chosen), n_tasks=1)
    return row, (point, replicates, len(chosen))


def _pooled_row(method: str, measured: list, n_tasks: int = 0) -> dict:
    """The pooled row of one method from its tasks' (point, replicates, seeds); none (NaN, seeds 0) when `measured`
    is empty, `n_tasks` then saying on how many tasks the method has runs."""
    if not measured:
        return dict(method=method, task='pooled', seeds=0, n_tasks=n_tasks)
    points, replicates, seeds = zip(*measured)
    low, high = np.percentile(np.mean(replicates, axis=0), [2.5, 97.5])
    return dict(method=method, task='pooled', test_accuracy=float(np.mean(points)), ci_low=low, ci_high=high,
                seeds=min(seeds), n_tasks=len(measured))


def format_method_table(table: pd.DataFrame) -> pd.DataFrame:
    """`method_table` ready to print: labels, the learning rate, millions of parameters, 'mean [low, high]' accuracy,
    whole seconds and MiB, and 'not measured' across a row without runs; a pooled row names its tasks' count in the
    task column."""
    measured = table.seeds > 0

    def cell(values: pd.Series, fmt: str) -> pd.Series:
        return values.map(lambda v: fmt.format(v) if pd.notna(v) else '')

    accuracy = [f'{m:.2f} [{lo:.2f}, {hi:.2f}]' if ok else
                f'not pooled (runs on {n} of {len(set(table.task)) - 1} tasks)' if t == 'pooled' and n else
                'not measured'
                for m, lo, hi, ok, t, n in zip(table.test_accuracy, table.ci_low, table.ci_high, measured, table.task,
                                               table.n_tasks)]
    task = [f'pooled ({n} task{"s" * (n != 1)})' if t == 'pooled' and n else t
            for t, n in zip(table.task, table.n_tasks)]
    return pd.DataFrame({'Method': table.method.map(method_label), 'Task': task, 'lr': cell(table.lr, '{:g}'),
                         'Trainable params (M)': cell(table.trainable_params / 1e6, '{:.3f}'),
                         'Test accuracy (%, 95% CI)': accuracy,
                         'Train time (s)': cell(table.train_seconds, '{:.0f}'),
                         'Training memory (MiB)': cell(table.train_memory_mib, '{:.0f}'),
                         'Seeds': table.seeds.astype(int)})


def accuracy_by_task(table: pd.DataFrame) -> pd.DataFrame:
    """One protocol's `method_table` as one row per method and one column per task, then 'pooled': 'mean [low, high]'
    test accuracy (the README's view; cost is in `format_method_table`). A cell without runs is empty, a cell with
    fewer seeds than the most any cell has says how many ('(2 seeds)'), and a pooled cell of a method without runs
    on every task says on how many it ran instead of a value.

    Raises:
        ValueError: rows of several protocols (a `protocol` column with more than one value).
    """
    if 'protocol' in table and table.protocol.nunique() > 1:
        raise ValueError(f'accuracy_by_task: rows of protocols {sorted(set(table.protocol))}; pass one protocol\'s')
    shown = format_method_table(table)
    seeds, most = table.seeds.to_numpy(), table.seeds.max()
    fewer = pd.Series([f' ({int(n)} seed{"" if n == 1 else "s"})' if 0 < n < most else '' for n in seeds],
                      index=shown.index)
    cells = (shown['Test accuracy (%, 95% CI)'] + fewer).where(seeds > 0, '')
    cells = cells.where(table.task.to_numpy() != 'pooled', shown['Test accuracy (%, 95% CI)'].str.replace(
        'not measured', ''))
    wide = pd.DataFrame({'Method': shown.Method, 'task': table.task.to_numpy(), 'cell': cells}).pivot(
        index='Method', columns='task', values='cell')
    tasks = list(dict.fromkeys(table.task))
    return wide.reindex(index=list(dict.fromkeys(shown.Method)), columns=[t for t in tasks if t != 'pooled'] +
                        ['pooled']).rename_axis(columns=None).reset_index()
