"""Verdicts on the TOU paper's claims, computed from run records, with 95% confidence intervals.

    table = claims_table(with_protocol(load_runs('results'), 'tuned'))

Accuracy claims use a paired bootstrap over seeds and test examples: each replicate draws the seeds with
replacement (a method's run and its rival's of the same seed stay paired) and the test examples with replacement
(the same draw for both, since every run of a preset sees the same fixed test split), and takes the mean accuracy
difference; the interval is the 2.5 and 97.5 percentiles. Time and memory claims use the paired differences by
seed and Student's t interval. A claim holds when the whole interval lies on its side of the threshold, does not
hold when the whole interval lies on the other side, and is undecided otherwise.
"""
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
from scipy import stats

from .methods import method_label
from .results import missing_runs, read_record, with_protocol
from .ranks import BUDGET_POLICIES

__all__ = ['claims_table', 'rank_study_table', 'pooled_claims', 'pooled_by_protocol', 'pooled_summary', 'by_task',
           'bootstrap_means', 'paired_bootstrap', 'paired_t_interval', 'verdict', 'CLAIMS', 'SVD_FAMILY', 'POOLING']

# (id, claim, the measured quantity, rival methods, kind, threshold, the side on which the claim holds)
CLAIMS = [
    ('a', 'Full TOU is at most 1 point below FT', ('ft', 'tou'), 'accuracy', 1.0, 'below'),
    ('b', 'TOU frozen FFN is more accurate than LoRA', ('tou_frozen_ffn', 'lora'), 'accuracy', 0.0, 'above'),
    ('c', 'Full TOU is more accurate than LoRA', ('tou', 'lora'), 'accuracy', 0.0, 'above'),
    ('d', 'Full TOU trains faster than LoRA', ('tou', 'lora'), 'train_seconds', 0.0, 'below'),
    ('d', 'Full TOU trains faster than FT', ('tou', 'ft'), 'train_seconds', 0.0, 'below'),
    ('e', 'Full TOU needs less training memory than FT', ('tou', 'ft'), 'train_memory_mib', 0.0, 'below'),
    ('e', 'Full TOU needs less training memory than LoRA', ('tou', 'lora'), 'train_memory_mib', 0.0, 'below'),
]
# PEFT's SVD-based methods and DoRA, each against LoRA, and MiCA against PiSSA, in `CLAIMS`' form
# (`pooled_claims(by_task, claims=SVD_FAMILY)`). MiCA - PiSSA sets W's minor singular directions against its top
# ones, but not alone: MiCA freezes B at the minor left singular vectors and trains A from zero on an unchanged W,
# PiSSA trains both factors from the top singular triplets with the residual frozen.
SVD_FAMILY = [('svd', f'{name} is more accurate than LoRA', (method, 'lora'), 'accuracy', 0.0, 'above')
              for method, name in (('pissa', 'PiSSA'), ('dora', 'DoRA'), ('mica', 'MiCA'), ('olora', 'OLoRA'),
                                   ('eva', 'EVA'), ('loraga', 'LoRA-GA'))] + [
    ('svd', 'MiCA (minor singular directions) is more accurate than PiSSA (top ones)', ('mica', 'pissa'),
     'accuracy', 0.0, 'above')]
_POOLED_COLUMNS = ['claim', 'statement', 'comparison', 'task', 'measured', 'ci_low', 'ci_high', 'unit', 'threshold',
                   'seeds', 'n_tasks', 'verdict']
UNITS = {'accuracy': 'points', 'train_seconds': 's', 'train_memory_mib': 'MiB'}


def verdict(low: float, high: float, threshold: float, side: str) -> str:
    """'holds', 'does not hold' or 'undecided' for an interval against a threshold ('below' or 'above')."""
    if side == 'below':
        return 'holds' if high < threshold else 'does not hold' if low > threshold else 'undecided'
    return 'holds' if low > threshold else 'does not hold' if high < threshold else 'undecided'


def bootstrap_means(diff: np.ndarray, n_boot: int, rng: np.random.Generator,
                    seed_draws: Optional[np.ndarray] = None) -> np.ndarray:
    """The one bootstrap of toukit's accuracy claims: `n_boot` replicates of the mean of `diff` (seeds x test
    examples), each resampling the seeds (rows, kept paired) and the test examples (columns) with replacement.

    Args:
        diff: per seed and test example, A's correctness minus B's; or several such differences stacked on leading
            axes (... x seeds x test examples), every one resampled with the same draws in a replicate (so that
            differences which add up add up replicate by replicate: `toukit.gap`).
        n_boot: replicates.
        rng: draws, replicate by replicate, the seeds and then the examples.
        seed_draws: the seeds of every replicate drawn beforehand (n_boot x seeds), as `paired_bootstrap` does;
            then only the examples are drawn replicate by replicate.

    Returns:
        The replicates: n_boot, or n_boot x the leading axes of `diff`.
    """
    *lead, n_seeds, n_examples = diff.shape
    reps = np.empty((n_boot, *lead))
    for i in range(n_boot):
        seeds = seed_draws[i] if seed_draws is not None else rng.integers(0, n_seeds, n_seeds)
        drawn = diff[..., seeds, :][..., rng.integers(0, n_examples, n_examples)]
        reps[i] = drawn.mean() if not lead else drawn.reshape(*lead, -1).mean(-1)
    return reps


def paired_bootstrap(correct_a: np.ndarray, correct_b: np.ndarray, n_boot: int = 4000,
                     seed: int = 0) -> Tuple[float, float, float]:
    """(mean difference, low, high) of accuracy A - B in points, from (seeds x test examples) 0/1 arrays."""
    diff = correct_a.astype(float) - correct_b.astype(float)
    rng = np.random.default_rng(seed)
    reps = bootstrap_means(diff, n_boot, rng, seed_draws=rng.integers(0, diff.shape[0], (n_boot, diff.shape[0])))
    low, high = np.percentile(reps, [2.5, 97.5])
    return float(diff.mean() * 100), float(low * 100), float(high * 100)


def paired_t_interval(a: np.ndarray, b: np.ndarray) -> Tuple[float, float, float]:
    """(mean difference, low, high) of A - B paired by seed, Student's t at 95% (a point when one seed)."""
    d = np.asarray(a, float) - np.asarray(b, float)
    mean = float(d.mean())
    if len(d) < 2:
        return mean, float('nan'), float('nan')
    half = float(stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d)))
    return mean, mean - half, mean + half


def runs_by_seed(runs: pd.DataFrame, method: str) -> pd.DataFrame:
    """`method`'s successful runs of one protocol, indexed by seed (several runs of one seed are refused)."""
    chosen = runs[(runs.method == method) & (runs.status == 'ok')]
    if chosen.seed.duplicated().any():
        raise ValueError(f'claims_table: several {method} runs share a seed (learning rates '
                         f'{sorted(chosen.lr.unique())}): pass one protocol\'s runs (toukit.results.with_protocol)')
    return chosen.set_index('seed')


def correct_on_test(paths: List[str], load: Callable[[str], dict]) -> np.ndarray:
    """Per-example test correctness of each record (runs x examples, bool), for paired intervals; the records must
    hold one test set (`paired_correct_on_test`)."""
    [correct] = paired_correct_on_test([paths], load)
    return correct


def paired_correct_on_test(groups: Sequence[Sequence[str]], load: Callable[[str], dict]) -> List[np.ndarray]:
    """`correct_on_test` of each group of record paths (one group a method), checked as far as the records allow to
    be on one test set: every record's test labels must be the first record's, in the same order, or a paired
    difference would pair different examples (ValueError naming both runs)."""
    first, out = None, []
    for paths in groups:
        rows = []
        for path in paths:
            final = load(path)['metrics']['final']
            labels = np.asarray(final['test_labels'])
            if first is None:
                first = (path, labels)
            elif not np.array_equal(labels, first[1]):
                raise ValueError(f'{path}: its test labels differ from those of {first[0]} ({len(labels)} and '
                                 f'{len(first[1])} examples): paired differences need one test set (the same data '
                                 f'and split_seed)')
            rows.append(np.asarray(final['test_predictions']) == labels)
        out.append(np.stack(rows))
    return out


def claims_table(runs: pd.DataFrame, n_boot: int = 4000, load: Optional[Callable[[str], dict]] = None) -> pd.DataFrame:
    """One row per claim of the paper, from one protocol's runs (`toukit.results.with_protocol`).

    Args:
        runs: a `load_runs` table of one protocol: one learning rate per method, one run per method and seed.
        n_boot: bootstrap replicates of the accuracy claims.
        load: reads a record from its path (default `toukit.results.read_record`; tests pass their own).

    Returns:
        Columns: claim, statement, comparison, measured (mean difference, A - B), ci_low, ci_high, unit,
        ci_method, seeds, verdict. A claim whose methods have no common seed is 'not measured'.
    """
    load = load or read_record
    for column in ('preset', 'model', 'dataset'):
        if column in runs and runs[column].nunique() > 1:
            raise ValueError(f'claims_table: runs of several {column}s ({sorted(runs[column].unique())}): pass one '
                             f'preset\'s runs (e.g. runs[runs.preset == "demo"])')
    rows = []
    for claim, statement, (a, b), kind, threshold, side in CLAIMS:
        ra, rb = runs_by_seed(runs, a), runs_by_seed(runs, b)
        seeds = sorted(set(ra.index) & set(rb.index))
        row = dict(claim=claim, statement=statement, comparison=f'{method_label(a)} - {method_label(b)}',
                   unit=UNITS[kind], seeds=len(seeds))
        if not seeds:
            rows.append(dict(row, measured=np.nan, ci_low=np.nan, ci_high=np.nan, ci_method='',
                             verdict='not measured'))
            continue
        if kind == 'accuracy':
            mean, low, high = paired_bootstrap(*paired_correct_on_test([ra.loc[seeds, 'path'], rb.loc[seeds, 'path']],
                                                                       load), n_boot=n_boot)
            method = 'paired bootstrap over seeds and test examples'
        else:
            mean, low, high = paired_t_interval(ra.loc[seeds, kind].to_numpy(), rb.loc[seeds, kind].to_numpy())
            method = 'paired t over seeds'
        decided = verdict(low, high, threshold, side) if np.isfinite(low) else 'undecided (one seed)'
        rows.append(dict(row, measured=mean, ci_low=low, ci_high=high, ci_method=method, verdict=decided))
    rows.append(_merge_claim(runs))
    columns = ['claim', 'statement', 'comparison', 'measured', 'ci_low', 'ci_high', 'unit', 'ci_method', 'seeds',
               'verdict']
    return pd.DataFrame(rows)[columns]


def _merge_claim(runs: pd.DataFrame) -> Dict[str, object]:
    """(f) merging loses nothing: the largest test-accuracy change any merged run showed, and the verdict."""
    merged = (runs[(runs.status == 'ok') & (runs['merge'] == 'merged') & runs.merged_test_accuracy.notna()] if {
        'merge', 'merged_test_accuracy'} <= set(runs.columns) else runs.iloc[:0])  # unevaluated: not measured
    row = dict(claim='f', statement='Merging loses nothing', comparison='merged - unmerged (every merged run)',
               unit='points', ci_method='exact: every merged run evaluated before and after', seeds=int(
                   merged.seed.nunique()) if len(merged) else 0)
    if merged.empty:
        return dict(row, measured=np.nan, ci_low=np.nan, ci_high=np.nan, verdict='not measured')
    change = (merged.merged_test_accuracy - merged.test_accuracy) * 100
    worst = float(change.abs().max())
    return dict(row, measured=worst, ci_low=float(change.min()), ci_high=float(change.max()),
                verdict='holds' if worst == 0 else 'does not hold')


def rank_study_table(runs: pd.DataFrame, manifest: dict, n_boot: int = 4000,
                     load: Optional[Callable[[str], dict]] = None) -> pd.DataFrame:
    """The adaptive-rank study after fine-tuning: one row per (budget, policy) of `manifest` (`toukit.sweep.rank_plan`).

    Args:
        runs: a `load_runs` table holding the study's runs (others are ignored).
        manifest: the study's manifest (`<preset>.ranks.sweep.json`): run id -> policy and budget.
        n_boot: bootstrap replicates.
        load: reads a record from its path (default `toukit.results.read_record`).

    Returns:
        Columns: budget, policy, seeds, trainable_params (mean), test_accuracy and test_accuracy_std (over seeds),
        vs_uniform (points, A - uniform at the same budget, paired by seed), ci_low, ci_high (paired bootstrap over
        seeds and test examples, as the claims) and beats_uniform ('holds', 'does not hold', 'undecided').
    """
    load = load or read_record
    study = runs[runs.run_id.isin(manifest['policies']) & (runs.status == 'ok')].copy()
    study['policy'] = study.run_id.map(lambda i: manifest['policies'][i]['policy'])
    study['budget'] = study.run_id.map(lambda i: manifest['policies'][i]['budget'])
    rows = []
    for (budget, policy), group in study.groupby(['budget', 'policy'], sort=False):
        group = group.set_index('seed').sort_index()
        row = dict(budget=budget, policy=policy, seeds=len(group), trainable_params=group.trainable_params.mean(),
                   test_accuracy=group.test_accuracy.mean() * 100,
                   test_accuracy_std=group.test_accuracy.std(ddof=1) * 100 if len(group) > 1 else np.nan)
        uniform = study[(study.budget == budget) & (study.policy == 'uniform')].set_index('seed')
        seeds = sorted(set(group.index) & set(uniform.index))
        if policy == 'uniform' or not seeds:
            rows.append(dict(row, vs_uniform=np.nan, ci_low=np.nan, ci_high=np.nan, beats_uniform=''))
            continue
        mean, low, high = paired_bootstrap(*paired_correct_on_test([group.loc[seeds, 'path'],
                                                                    uniform.loc[seeds, 'path']], load), n_boot=n_boot)
        rows.append(dict(row, vs_uniform=mean, ci_low=low, ci_high=high,
                         beats_uniform=verdict(low, high, 0.0, 'above')))
    table = pd.DataFrame(rows, columns=['budget', 'policy', 'seeds', 'trainable_params', 'test_accuracy',
                                        'test_accuracy_std', 'vs_uniform', 'ci_low', 'ci_high', 'beats_uniform'])
    order = {p: i for i, p in enumerate(BUDGET_POLICIES)}  # then any other policy, in the manifest's order
    return table.sort_values(['budget', 'policy'], kind='stable', key=lambda c: c.map(
        lambda p: order.get(p, len(order))) if c.name == 'policy' else c).reset_index(drop=True)


# ---------------------------------------------------------------------------------------------------------------
# claims pooled across tasks

POOLING = ('accuracy: a stratified bootstrap, every replicate resampling within each task the seeds (paired) and the '
           'test examples and averaging the tasks\' differences with equal weight; time and memory: the log ratio '
           'A / B per seed, a t interval per task, and the tasks\' mean with its combined standard error '
           '(Welch-Satterthwaite degrees of freedom)')


def _accuracy_replicates(ra: pd.DataFrame, rb: pd.DataFrame, seeds: list, load, rng, n_boot: int):
    """(point estimate, n_boot bootstrap replicates) of one task's accuracy difference A - B, in points."""
    a, b = paired_correct_on_test([ra.loc[seeds, 'path'], rb.loc[seeds, 'path']], load)
    diff = a.astype(float) - b
    return diff.mean() * 100, bootstrap_means(diff, n_boot, rng) * 100


def _log_ratios(kind: str, ra: pd.DataFrame, rb: pd.DataFrame, seeds: list) -> np.ndarray:
    """log(A / B) per seed of a cost (time, memory); a value that is not positive is refused, naming its run."""
    a, b = ra.loc[seeds, kind].to_numpy(float), rb.loc[seeds, kind].to_numpy(float)
    for values, runs in ((a, ra), (b, rb)):
        bad = [str(p) for p, v in zip(runs.loc[seeds, 'path'], values) if not v > 0]
        if bad:
            raise ValueError(f'{kind} must be positive to pool it as a ratio; not so in {", ".join(bad[:3])}')
    return np.log(a / b)


def pooled_claims(runs_by_task: Dict[str, pd.DataFrame], n_boot: int = 4000, seed: int = 0,
                  load: Optional[Callable[[str], dict]] = None, claims: Sequence[tuple] = CLAIMS,
                  merge: Optional[bool] = None) -> pd.DataFrame:
    """Each claim per task and pooled across tasks, with 95% intervals and the same holds / does not hold / undecided
    rule as `claims_table`.

    The tasks are a fixed set and each weighs the same (`POOLING`). Accuracy: a stratified bootstrap over every
    task's seeds and test examples, as `claims_table` does within one task. Time and memory: the mean log ratio
    A / B over tasks, reported as a ratio (a 'below' claim holds when the whole interval is below 1), with a t
    interval from the tasks' combined standard error, so that each task's row agrees with `claims_table`'s paired t
    interval on the same runs. A random-effects meta-analysis would instead estimate a between-task variance, which
    three tasks cannot (DerSimonian-Laird's estimate is then mostly noise and its intervals too narrow), and would
    answer a question about tasks not run; the pooled verdict here is about these tasks. A task missing a method
    leaves that claim's pooled row to the others (`n_tasks` says how many). Claim (f), merging loses nothing, is
    exact rather than estimated: each task's row and the pooled one give the largest test-accuracy change of any
    merged run (`measured`, in points) and the smallest and largest change (`ci_low`, `ci_high`: a range, not an
    interval); it holds only where no merged run changed.

    Args:
        runs_by_task: task name (e.g. its preset) -> one protocol's runs of that task (`with_protocol`).
        n_boot: bootstrap replicates of the accuracy claims.
        load: reads a record from its path (default `toukit.results.read_record`).
        claims: the comparisons, in `CLAIMS`' form (e.g. `SVD_FAMILY`).
        merge: add claim (f), merging loses nothing (default: when `claims` is `CLAIMS`).

    Returns:
        One row per (claim, task) and (claim, 'pooled'): claim, statement, comparison, task, measured, ci_low,
        ci_high, unit, threshold, seeds, n_tasks, verdict.

    Raises:
        ValueError: a time or memory that is not positive (named by its run).
    """
    load = load or read_record
    rng = np.random.default_rng(seed)
    rows = []
    for claim in claims:
        rows += _claim_rows(claim, runs_by_task, load, rng, n_boot)
    if claims is CLAIMS if merge is None else merge:
        rows += _merge_rows(runs_by_task)
    return pd.DataFrame(rows, columns=_POOLED_COLUMNS)


def _claim_rows(claim: tuple, runs_by_task: Dict[str, pd.DataFrame], load: Callable[[str], dict],
                rng: np.random.Generator, n_boot: int) -> List[dict]:
    """One claim of `CLAIMS`: a row per task and the pooled row (see `pooled_claims`)."""
    claim, statement, (a, b), kind, threshold, side = claim
    accuracy = kind == 'accuracy'
    base = dict(claim=claim, statement=statement, comparison=f'{method_label(a)} - {method_label(b)}' if
                accuracy else f'{method_label(a)} / {method_label(b)}',
                unit=UNITS[kind] if accuracy else 'ratio', threshold=threshold if accuracy else 1.0)
    rows, points, replicates, logs, counts = [], [], [], [], []
    for task, runs in runs_by_task.items():
        ra, rb = runs_by_seed(runs, a), runs_by_seed(runs, b)
        seeds = sorted(set(ra.index) & set(rb.index))
        if not seeds:
            rows.append(dict(base, task=task, measured=np.nan, ci_low=np.nan, ci_high=np.nan, seeds=0, n_tasks=1,
                             verdict='not measured'))
            continue
        if accuracy:
            point, reps = _accuracy_replicates(ra, rb, seeds, load, rng, n_boot)
            points.append(point)
            replicates.append(reps)
            low, high = np.percentile(reps, [2.5, 97.5])
        else:
            values = _log_ratios(kind, ra, rb, seeds)
            logs.append(values)
            point, low, high = paired_t_interval(values, np.zeros_like(values))
        counts.append(len(seeds))
        rows.append(dict(base, task=task, seeds=len(seeds), n_tasks=1,
                         **_decide(point, low, high, accuracy, threshold, side)))
    measured = points if accuracy else logs
    if not measured:
        return rows + [dict(base, task='pooled', measured=np.nan, ci_low=np.nan, ci_high=np.nan, seeds=0, n_tasks=0,
                            verdict='not measured')]
    if accuracy:
        point = float(np.mean(points))
        low, high = np.percentile(np.mean(replicates, 0), [2.5, 97.5])
    else:
        point, low, high = _pooled_log_ratio(logs)
    return rows + [dict(base, task='pooled', seeds=min(counts), n_tasks=len(measured),
                        **_decide(point, low, high, accuracy, threshold, side))]


def _pooled_log_ratio(logs: List[np.ndarray]) -> Tuple[float, float, float]:
    """(point, low, high) of the tasks' mean of per-task mean log ratios, its variance the sum of theirs / T^2, with
    a t interval on Welch-Satterthwaite degrees of freedom."""
    point = float(np.mean([v.mean() for v in logs]))
    parts = [v.var(ddof=1) / len(v) / len(logs) ** 2 if len(v) > 1 else np.nan for v in logs]
    se = float(np.sqrt(np.sum(parts)))
    df = np.sum(parts) ** 2 / np.sum([p ** 2 / (len(v) - 1) for p, v in zip(parts, logs)]) if np.isfinite(
        se) and se > 0 else np.nan
    half = float(stats.t.ppf(0.975, df) * se) if np.isfinite(df) else (0.0 if se == 0 else np.nan)
    return point, point - half, point + half


def _merge_rows(runs_by_task: Dict[str, pd.DataFrame]) -> List[dict]:
    """Claim (f), exact: a row per task and the pooled row over every merged run (see `pooled_claims`)."""
    merges = {task: _merge_claim(runs) for task, runs in runs_by_task.items()}
    measured_tasks = [task for task, row in merges.items() if row['verdict'] != 'not measured']
    every = pd.concat([runs_by_task[t] for t in measured_tasks]) if measured_tasks else pd.DataFrame(
        columns=['status', 'seed'])
    pooled_merge = dict(_merge_claim(every), seeds=min((merges[t]['seeds'] for t in measured_tasks), default=0))
    rows = []
    for task, row in list(merges.items()) + [('pooled', pooled_merge)]:  # seeds: the fewest of a task, as above
        rows.append(dict({k: row[k] for k in ('claim', 'statement', 'comparison', 'measured', 'ci_low', 'ci_high',
                                              'unit', 'seeds', 'verdict')}, task=task, threshold=0.0,
                         n_tasks=len(measured_tasks) if task == 'pooled' else 1))
    return rows


def pooled_by_protocol(runs: pd.DataFrame, tasks: Sequence[str] = (), protocols: Sequence[str] = ('tuned', 'paper'),
                       n_boot: int = 4000, seed: int = 0, load: Optional[Callable[[str], dict]] = None,
                       partial: bool = False) -> pd.DataFrame:
    """`pooled_claims` under each protocol, over the tasks (presets) of a `load_runs` table.

    A task without successful runs of a protocol sits out that protocol's pooling, and so, with a warning, does a
    task whose sweep has not finished the protocol (`toukit.results.missing_runs`: its manifest lists runs without a
    finished record), unless `partial`; any method's runs count, since claim (f) reads every merged run. A protocol
    with fewer than two such tasks is left out (one task's verdicts are its `claims_table`).

    Args:
        runs: a `load_runs` table of every task (its `preset` column names the task).
        tasks: the presets to pool (one name or several); empty: every preset in `runs`.
        protocols: 'tuned', 'paper' (one name or several).
        partial: pool a task's protocol even while its sweep has runs left (each claim then uses the seeds both
            methods have: the `seeds` column).

    Returns:
        `pooled_claims`' rows with a `protocol` column first; empty when no protocol has two tasks.
        `attrs['left_out']`: protocol -> {task: its missing runs} for the unfinished tasks that sat out.

    Raises:
        ValueError: a task in `tasks` that no run in `runs` belongs to.
    """
    tasks, protocols = ([x] if isinstance(x, str) else list(x) for x in (tasks, protocols))
    present = sorted(set(runs.preset)) if len(runs) else []
    unknown = [t for t in tasks if t not in present]
    if unknown:
        raise ValueError(f'tasks={list(tasks)!r}: no runs of {unknown!r}; the runs have presets {present!r}')
    if 'manifests' not in runs.attrs and 'protocol' in runs and (runs.protocol != '').any():
        warnings.warn('runs: protocols read from sweep manifests, but not the manifests (attrs lost, e.g. by pd.concat)'
                      ': an unfinished sweep cannot be told and its task is pooled as it is', stacklevel=2)
    frames, left_out = [], {}
    for protocol in protocols:
        by_task = {t: with_protocol(runs[runs.preset == t], protocol) for t in (list(tasks) or present)}
        by_task = {t: r for t, r in by_task.items() if len(r)}
        unfinished = {t: missing for t in by_task if (missing := missing_runs(runs, t, protocol))}
        if unfinished and not partial:
            left_out[protocol] = unfinished
            warnings.warn(f'{protocol} protocol: ' + '; '.join(f'{t} sits out, its sweep has {_left(m)}'
                                                               for t, m in unfinished.items())
                          + '; pass partial=True to pool it anyway', stacklevel=2)
            by_task = {t: r for t, r in by_task.items() if t not in unfinished}
        if len(by_task) >= 2:
            table = pooled_claims(by_task, n_boot=n_boot, seed=seed, load=load)
            frames.append(table.assign(protocol=protocol)[['protocol'] + _POOLED_COLUMNS])
    out = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=['protocol'] + _POOLED_COLUMNS)
    out.attrs['left_out'] = left_out
    return out


def _left(missing: List[str]) -> str:
    """`missing_runs`' list in words: '2 runs left (a, b) and no tuned runs yet for lora (its grid unfinished)'."""
    ids = [m for m in missing if not m.endswith(': not planned yet')]
    methods = [m.split(':')[0] for m in missing if m.endswith(': not planned yet')]
    shown = ', '.join(ids[:3]) + ', ...' * (len(ids) > 3)
    parts = [f'{len(ids)} run{"s" * (len(ids) != 1)} left ({shown})'] if ids else []
    if methods:
        parts.append(f'no tuned runs yet for {", ".join(methods)} (its grid unfinished)')
    return ' and '.join(parts)


def pooled_summary(pooled: pd.DataFrame) -> pd.DataFrame:
    """The pooled rows of `pooled_by_protocol` (or `pooled_claims`) as a short table for reading.

    Estimates read '+5.71 [+3.86, +7.68] points' or '0.62x [0.57, 0.67]', with more decimals where two would put a
    bound on the threshold it is not on, 'no interval' where there is none (one seed), and for claim (f) the largest
    change of a merged run and the range of changes.

    Args:
        pooled: `pooled_by_protocol`'s or `pooled_claims`' table.

    Returns:
        One row per pooled claim: protocol (when `pooled` has one), claim, statement, comparison,
        'pooled (95% CI)', tasks, verdict.
    """
    rows = pooled[pooled.task == 'pooled']

    def number(value: float, threshold: float, sign: str = '+') -> str:
        digits = 2
        while round(value, digits) == threshold != value:
            if digits == 6:  # still on it: as many significant digits as it takes
                return f'{value:{sign}.12g}'
            digits += 1
        return f'{value:{sign}.{digits}f}'

    def estimate(row) -> str:
        if not np.isfinite(row.measured):
            return 'not measured'
        if row.claim == 'f':
            return ('no merged run changed' if row.measured == 0 else
                    f'{row.measured:.2f} points at most (from {row.ci_low:+.2f} to {row.ci_high:+.2f})')
        ratio = row.unit == 'ratio'
        point = f'{row.measured:.2f}x' if ratio else f'{row.measured:+.2f}'
        if not (np.isfinite(row.ci_low) and np.isfinite(row.ci_high)):
            return f'{point} (no interval){"" if ratio else " " + row.unit}'
        threshold, sign = (1.0, '') if ratio else (row.threshold, '+')
        low, high = (number(v, threshold, sign) for v in (row.ci_low, row.ci_high))
        return f'{point} [{low}, {high}]{"" if ratio else " " + row.unit}'

    table = pd.DataFrame({'claim': rows.claim, 'statement': rows.statement, 'comparison': rows.comparison,
                          'pooled (95% CI)': [estimate(r) for r in rows.itertuples()], 'tasks': rows.n_tasks,
                          'verdict': rows.verdict})
    if 'protocol' in rows:
        table.insert(0, 'protocol', rows.protocol)
    return table.reset_index(drop=True)


def _decide(point: float, low: float, high: float, accuracy: bool, threshold: float, side: str) -> dict:
    if not accuracy:  # log ratios back to ratios; the threshold 0 (A = B) is the ratio 1
        point, low, high, threshold = float(np.exp(point)), float(np.exp(low)), float(np.exp(high)), 1.0
    decided = (verdict(low, high, threshold, side) if np.isfinite(low) and np.isfinite(high) else
               'undecided (one seed)')
    return dict(measured=float(point), ci_low=float(low), ci_high=float(high), verdict=decided)


def by_task(pooled: pd.DataFrame) -> pd.DataFrame:
    """One protocol's `pooled_claims` accuracy rows as one row per comparison and one column per task, then 'pooled'
    ('+1.23 [-0.45, +2.91]' points, 'not measured' where a task lacks a method, '(2 seeds)' after a cell with fewer
    seeds than the most any cell has, the pooled cell and verdict saying over how many tasks when fewer than all):
    the README's view of a family of comparisons (`SVD_FAMILY`).

    Raises:
        ValueError: rows of several protocols, or rows that are not accuracy differences.
    """
    if 'protocol' in pooled and pooled.protocol.nunique() > 1:
        raise ValueError(f'by_task: rows of protocols {sorted(set(pooled.protocol))}; pass one protocol\'s')
    if (pooled.unit != 'points').any():
        raise ValueError(f'by_task: accuracy differences only, not {sorted(set(pooled.unit) - {"points"})}')
    tasks = [t for t in dict.fromkeys(pooled.task) if t != 'pooled']
    most = pooled.seeds.max() if len(pooled) else 0
    rows = []
    for statement, group in pooled.groupby('statement', sort=False):
        cells = group.set_index('task')
        row = {'comparison': cells.comparison.iloc[0]}
        for task in tasks + ['pooled']:
            r = cells.loc[task]
            cell = (f'{r.measured:+.2f} [{r.ci_low:+.2f}, {r.ci_high:+.2f}]' if np.isfinite(r.ci_low) else
                    f'{r.measured:+.2f} (no interval)' if np.isfinite(r.measured) else 'not measured')
            row[task] = cell + (f' ({r.n_tasks} of {len(tasks)} tasks)' if task == 'pooled' and
                                np.isfinite(r.measured) and r.n_tasks < len(tasks) else '') + (
                f' ({int(r.seeds)} seed{"" if r.seeds == 1 else "s"})' if np.isfinite(r.measured) and r.seeds < most
                else '')
        pooled_over = cells.loc['pooled', 'n_tasks']
        partial = f' (on {pooled_over} of {len(tasks)} tasks)' if 0 < pooled_over < len(tasks) else ''
        rows.append(dict(row, verdict=f'{statement}: {cells.loc["pooled", "verdict"]}{partial}'))
    return pd.DataFrame(rows, columns=['comparison'] + tasks + ['pooled', 'verdict'])
