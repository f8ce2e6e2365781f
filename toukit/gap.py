"""The accuracy gap between full fine-tuning and full TOU, split into its three causes, with 95% intervals."""
import zlib
from typing import Callable, Dict, Optional, Tuple

import numpy as np
import pandas as pd

from .claims import bootstrap_means, paired_correct_on_test, runs_by_seed
from .methods import method_label
from .results import read_record

__all__ = ['gap_decomposition', 'format_gap_table', 'GAP_PARTS', 'GAP_METHODS']

# (part, what it measures, A, B): the whole gap A - B first, then its three parts, which add up to it exactly
GAP_PARTS = [
    ('total', 'the whole gap', 'ft', 'tou'),
    ('parameterization', 'the factorized parameterization itself', 'ft', 'tou_full_rank'),
    ('restriction', 'the restriction to the top-r subspace', 'tou_full_rank', 'tou_residual'),
    ('truncation', 'the truncation', 'tou_residual', 'tou'),
]
GAP_METHODS = ('ft', 'tou_full_rank', 'tou_residual', 'tou')
_COLUMNS = ['part', 'label', 'comparison', 'task', 'measured', 'ci_low', 'ci_high', 'seeds', 'n_tasks']
Estimate = Tuple[np.ndarray, np.ndarray, int]  # points (parts), replicates (n_boot x parts), seeds


def gap_decomposition(runs_by_task: Dict[str, pd.DataFrame], n_boot: int = 4000, seed: int = 0,
                      load: Optional[Callable[[str], dict]] = None) -> pd.DataFrame:
    """FT - full TOU test accuracy, per task and pooled, and the three paired differences it is the sum of:

        FT - TOU = (FT - TOU full rank)             the factorized parameterization itself
                 + (TOU full rank - TOU residual)   the restriction to the top-r subspace
                 + (TOU residual - TOU)             the truncation

    ('tou_full_rank': TOU at rank 1.0, nothing truncated; 'tou_residual': TOU with the truncation residual kept
    frozen, so nothing is lost but the update stays in the top-r subspace. TOU's noise moves the start of
    'tou_full_rank' and 'tou' off W, while 'ft' and 'tou_residual' start at W, so the noise's effect on the start
    enters the parameterization (+), restriction (-) and truncation (+) parts; they still sum to the total.)
    Intervals come from `toukit.claims`' paired bootstrap over seeds and test examples, with one draw of seeds and
    examples per replicate for all four comparisons of a task, so that the parts' replicates add up to the total's,
    replicate by replicate; a task uses the seeds all four methods share, and draws from its own generator (seeded
    by `seed` and its name), so that its interval stays put as other tasks' records arrive. Pooled rows weigh each
    task the same (`toukit.claims.POOLING`): the mean of the tasks' estimates and of their replicates, over the
    tasks that have all four methods. A task missing one of them is not measured (NaN, seeds 0) in every row, its
    total included, so that each task's parts add up to its total (`toukit.claims.pooled_claims` measures
    FT - full TOU on its own).

    Args:
        runs_by_task: task name (e.g. its preset) -> one protocol's runs of that task (`with_protocol`).
        n_boot: bootstrap replicates.
        seed: seeds the bootstrap's draws.
        load: reads a record from its path (default `toukit.results.read_record`).

    Returns:
        One row per (part, task) and (part, 'pooled'), the parts in `GAP_PARTS`' order: part, label (what it
        measures), comparison (A - B), task, measured (points, A - B), ci_low, ci_high (95%), seeds (the task's,
        or the fewest of a pooled task), n_tasks.
    """
    load = load or read_record
    estimates = {task: _task_replicates(runs, load, np.random.default_rng([seed, zlib.crc32(task.encode())]), n_boot)
                 for task, runs in runs_by_task.items()}
    measured = [e for e in estimates.values() if e is not None]
    estimates['pooled'] = _pooled(measured)
    rows = []
    for k, (part, label, a, b) in enumerate(GAP_PARTS):
        base = dict(part=part, label=label, comparison=f'{method_label(a)} - {method_label(b)}')
        for task, estimate in estimates.items():
            n_tasks = len(measured) if task == 'pooled' else 1
            rows.append(dict(base, task=task, n_tasks=n_tasks, **_interval(estimate, k)))
    return pd.DataFrame(rows, columns=_COLUMNS)


def _task_replicates(runs: pd.DataFrame, load: Callable[[str], dict], rng: np.random.Generator,
                     n_boot: int) -> Optional[Estimate]:
    """One task's (points, replicates, seeds) of every part of `GAP_PARTS`, in points; None without all four
    methods on a common seed."""
    by_method = {m: runs_by_seed(runs, m) for m in GAP_METHODS}
    seeds = sorted(set.intersection(*(set(r.index) for r in by_method.values())))
    if not seeds:
        return None
    correct = dict(zip(by_method, paired_correct_on_test([r.loc[seeds, 'path'] for r in by_method.values()], load)))
    correct = {m: c.astype(float) for m, c in correct.items()}
    diff = np.stack([correct[a] - correct[b] for _, _, a, b in GAP_PARTS])  # parts x seeds x test examples
    return diff.mean(axis=(1, 2)) * 100, bootstrap_means(diff, n_boot, rng) * 100, len(seeds)


def _pooled(measured: list) -> Optional[Estimate]:
    """The tasks' mean estimate and mean replicates (each task weighs the same), and the fewest seeds of a task."""
    if not measured:
        return None
    points, replicates, seeds = zip(*measured)
    return np.mean(points, axis=0), np.mean(replicates, axis=0), min(seeds)


def _interval(estimate: Optional[Estimate], k: int) -> dict:
    """Part k's measured, ci_low, ci_high (the 2.5 and 97.5 percentiles of its replicates) and seeds."""
    if estimate is None:
        return dict(measured=np.nan, ci_low=np.nan, ci_high=np.nan, seeds=0)
    points, replicates, seeds = estimate
    low, high = np.percentile(replicates[:, k], [2.5, 97.5])
    return dict(measured=float(points[k]), ci_low=float(low), ci_high=float(high), seeds=seeds)


def format_gap_table(table: pd.DataFrame) -> pd.DataFrame:
    """`gap_decomposition`'s table ready to print: the difference as '+1.23 [+0.45, +2.01]' points, or 'not measured'
    for a task without all four methods (or a pooled row without such a task); a `protocol` column stays first."""
    estimate = [f'{m:+.2f} [{lo:+.2f}, {hi:+.2f}]' if seeds else 'not measured'
                for m, lo, hi, seeds in zip(table.measured, table.ci_low, table.ci_high, table.seeds)]
    out = pd.DataFrame({'part': table.part, 'what it measures': table.label, 'comparison': table.comparison,
                        'task': table.task, 'difference, points (95% CI)': estimate, 'seeds': table.seeds,
                        'tasks': table.n_tasks})
    if 'protocol' in table:
        out.insert(0, 'protocol', table.protocol)
    return out.reset_index(drop=True)
