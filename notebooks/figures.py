# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Every figure and table from run records
#
# Reads run records only (no training) and the sweep's manifest (`<preset>.sweep.json`, written by `toukit sweep`):
#
# - the learning-rate sweep (validation accuracy vs learning rate per method, the chosen rate ringed);
# - for each protocol, *tuned* (each method at its own best validation rate) and *paper* (every method at the
#   paper's shared constant rate): Table 1 (CSV, Markdown, LaTeX; test accuracy mean ± std over seeds) and
#   Figure 2 (training loss over steps and validation accuracy per epoch, mean and min-max band over seeds);
# - the verdicts on the paper's claims for both protocols, with 95% confidence intervals (`toukit.claims`);
# - the paper protocol's numbers next to the paper's as ratios to FT, and the cost bars;
# - the claims pooled across tasks (presets) with a forest plot, written to figures_dir itself;
# - across tasks too, in figures_dir itself: every method's accuracy (95% interval) and cost per task and pooled
#   (`methods_table.*`), the FT - full TOU gap split into its three parts (`gap_decomposition.*`), and what each
#   method did to each layer type, q, k, v, attention output, MLP in and MLP out (`update_by_layer_type.*`), and the
#   learning-rate choices within the validation noise with the claims and the gap split both ways
#   (`lr_margins.*`, `claims_both_ways.*`, `gap_decomposition_runner_up.*`). A method without records yet is a row
#   that says 'not measured'.

# %%
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
from IPython.display import display

from toukit import claims, gap, lr_choice, method_table, methods, plots, results, sweep, updates

# %% tags=["parameters"]
results_dir: str = "results"  # run records
figures_dir: str = "figures"  # outputs go under figures_dir/preset
preset: str = "demo"  # which preset's runs
smooth: int = 10  # moving-average window of the loss curves
n_boot: int = 4000  # bootstrap replicates of the accuracy claims
tasks: str = ""  # presets whose claims are pooled, comma-separated; "": every preset with runs

# %%
out_dir = Path(figures_dir) / preset
out_dir.mkdir(parents=True, exist_ok=True)
runs = results.load_runs(results_dir)
runs = runs[runs.preset == preset]
manifest_path = sweep.manifest_path(results_dir, preset)
manifest = results.read_manifest(manifest_path) if manifest_path.exists() else {}
protocols = {p: results.with_protocol(runs, p) for p in sweep.PROTOCOLS}
print(f'{len(runs)} records for preset {preset!r}; successful runs per protocol: '
      f'{ {p: len(r) for p, r in protocols.items()} }; chosen rates: {manifest.get("selected_lr", {})}; '
      f'skipped files: {runs.attrs.get("skipped", [])}')

# %% [markdown]
# ## The learning-rate sweep (seed 0; validation accuracy, which alone chooses)

# %%
grid = protocols['grid']
if len(grid):
    fig = plots.plot_lr_sweep(grid, manifest.get('selected_lr'))
    plots.save_figure(fig, out_dir / 'lr_sweep')
    plt.show()
    sweep_table = grid.pivot_table(index='method', columns='lr', values='val_accuracy', sort=False) * 100
    sweep_table = sweep_table.reindex(sorted(sweep_table.columns), axis=1)
    sweep_table.columns = [f'lr {lr:g}' for lr in sweep_table.columns]
    sweep_table.index = sweep_table.index.map(methods.method_label)
    results.write_tables(sweep_table.round(2).reset_index(names='Method'), out_dir / 'lr_sweep')
    display(sweep_table.round(2))

# %% [markdown]
# ## Table 1 and Figure 2 for each protocol
#
# *tuned*: each method at its own learning rate chosen on validation. *paper*: every method at the paper's shared
# constant rate. Accuracy is on the test split, mean ± std over seeds; time is training time (evaluation and data
# waiting excluded); training memory is what the training steps add above the model at rest (see the README).

# %%
tables = {}
for protocol in ('tuned', 'paper'):
    if protocols[protocol].empty:
        print(f'{protocol}: no successful runs yet')
        continue
    tables[protocol] = results.table1(protocols[protocol])
    formatted = results.format_table1(tables[protocol])
    results.write_tables(formatted, out_dir / f'table1_{protocol}')
    print(protocol)
    display(formatted)

# %%
for protocol in tables:
    records = results.records_by_method(protocols[protocol])
    fig = plots.training_curves({methods.method_label(m): r for m, r in records.items()}, smooth=smooth)
    fig.suptitle(f'{protocol} protocol', y=1.02)
    plots.save_figure(fig, out_dir / f'figure2_{protocol}')
    plt.show()

# %% [markdown]
# ## The paper's claims, for both protocols

# %%
verdicts = pd.concat([claims.claims_table(protocols[p], n_boot=n_boot).assign(protocol=p) for p in tables],
                     ignore_index=True) if tables else pd.DataFrame()
if len(verdicts):
    verdicts = verdicts[['protocol'] + [c for c in verdicts.columns if c != 'protocol']]
    verdicts.round(3).to_csv(out_dir / 'claims.csv', index=False)
    shown = verdicts.assign(**{'difference (95% CI)': [
        f'{m:+.2f} [{lo:+.2f}, {hi:+.2f}] {u}' if pd.notna(m) and pd.notna(lo) else
        (f'{m:+.2f} {u}' if pd.notna(m) else '') for m, lo, hi, u in zip(
            verdicts.measured, verdicts.ci_low, verdicts.ci_high, verdicts.unit)]})
    shown = shown[['protocol', 'claim', 'statement', 'comparison', 'difference (95% CI)', 'seeds', 'verdict']]
    (out_dir / 'claims.md').write_text(shown.to_markdown(index=False) + '\n')
    display(shown)

# %% [markdown]
# The paper protocol next to the paper (different model and data: compare ratios to FT, not absolutes).

# %%
if 'paper' in tables:
    paper = results.PAPER_TABLE1.set_index('method')
    ours = tables['paper'].set_index('method')
    side = pd.DataFrame({
        'trainable / total (ours)': (ours.trainable_params / ours.total_params).round(3),
        'trainable / total (paper)': (paper.trainable_m / paper.total_m).round(3),
        'accuracy - FT, points (ours)': ((ours.test_accuracy - ours.test_accuracy.get('ft', float('nan'))) * 100
                                         ).round(2),
        'accuracy - FT, points (paper)': (paper.accuracy - paper.accuracy['ft']).round(2),
        'time / FT (ours)': ours.get('time_vs_ft', pd.Series(dtype=float)).round(2),
        'time / FT (paper)': (paper.train_seconds / paper.train_seconds['ft']).round(2),
        'memory / FT (ours: training memory)': ours.get('memory_vs_ft', pd.Series(dtype=float)).round(2),
        'memory / FT (paper: CUDA peak)': (paper.memory_mib / paper.memory_mib['ft']).round(2),
    }).reindex(ours.index)
    side.index = side.index.map(methods.method_label)
    results.write_tables(side.reset_index(names='Method'), out_dir / 'table1_vs_paper')
    display(side)

# %%
if 'tuned' in tables:
    fig = plots.plot_costs(tables['tuned'])
    plots.save_figure(fig, out_dir / 'method_costs')
    plt.show()

# %% [markdown]
# ## The claims pooled across tasks, per protocol
#
# Each claim's paired difference per task (preset) and pooled over the tasks with equal weight, by a stratified
# bootstrap over each task's seeds and test examples (`toukit.claims.pooled_claims`: why not a random-effects
# meta-analysis is in its docstring). A task without runs of a protocol sits out that protocol's pooling, and so
# does one whose sweep has runs of the protocol left (its manifest lists them): the cell says which.
# Written to `figures_dir` itself (`pooled_claims.*`, the pooled rows alone in `pooled_summary.md`, the table the
# README shows, and `claims_forest_<protocol>.*`): it belongs to no one preset.

# %%
every = results.load_runs(results_dir)
pooled = claims.pooled_by_protocol(every, [t for t in tasks.split(',') if t], n_boot=n_boot)
for protocol, unfinished in pooled.attrs['left_out'].items():
    print(f'{protocol}: {", ".join(unfinished)} left out, their sweeps unfinished (the warning says what is left)')
if pooled.empty:
    print(f'pooling needs two tasks or more with finished runs of a protocol; the runs have presets '
          f'{sorted(set(every.preset)) if len(every) else []}; the pooled files here, if any, are not rewritten')
else:
    pooled.round(4).to_csv(Path(figures_dir) / 'pooled_claims.csv', index=False)
    (Path(figures_dir) / 'pooled_claims.md').write_text(pooled.round(3).to_markdown(index=False) + '\n')
    summary = claims.pooled_summary(pooled)
    (Path(figures_dir) / 'pooled_summary.md').write_text(summary.to_markdown(index=False) + '\n')
    for protocol, table in pooled.groupby('protocol', sort=False):
        print(f'{protocol}: pooled over {sorted(set(table.task) - {"pooled"})}')
        display(summary[summary.protocol == protocol])
        fig = plots.plot_forest(table, title=f'{protocol} protocol')
        plots.save_figure(fig, Path(figures_dir) / f'claims_forest_{protocol}')
        plt.show()


# %% [markdown]
# ## Every method on every task, and pooled
#
# Per protocol, task and method (the registry's order): trainable parameters, test accuracy with its 95% interval (a
# bootstrap over seeds and test examples; pooled: the tasks' mean, each task that has the method weighing the
# same), mean train time and training memory, and the seeds (`toukit.method_table`). Unlike the pooled claims, a
# task whose sweep is unfinished is shown with the seeds it has. Written to `figures_dir` itself
# (`methods_table.csv`, `.md`), and per protocol the accuracies alone, a column per task
# (`methods_accuracy_<protocol>.md`), and as a plot, a panel per task (`methods_accuracy_<protocol>.png`, `.pdf`).

# %%
runs_by_protocol = {p: results.runs_by_task(every, p, [t for t in tasks.split(',') if t]) for p in ('tuned', 'paper')}
method_rows = pd.concat([method_table.method_table(by_task, n_boot=n_boot).assign(protocol=p)
                         for p, by_task in runs_by_protocol.items()], ignore_index=True)
method_rows.round(4).to_csv(Path(figures_dir) / 'methods_table.csv', index=False)
shown = method_table.format_method_table(method_rows)
shown.insert(0, 'protocol', method_rows.protocol)
(Path(figures_dir) / 'methods_table.md').write_text(shown.to_markdown(index=False) + '\n')
display(shown[method_rows.seeds > 0])
for protocol, rows in method_rows.groupby('protocol', sort=False):  # the README's view: accuracy by task, a plot
    rows = rows.drop(columns='protocol').reset_index(drop=True)
    wide = method_table.accuracy_by_task(rows)
    (Path(figures_dir) / f'methods_accuracy_{protocol}.md').write_text(wide.to_markdown(index=False) + '\n')
    if (rows.seeds > 0).any():
        fig = plots.plot_method_accuracy(rows, title=f'test accuracy, 95% interval ({protocol} protocol)')
        plots.save_figure(fig, Path(figures_dir) / f'methods_accuracy_{protocol}')
        plt.show()
    else:  # nothing measured: an earlier state's plot is removed
        for suffix in ('.png', '.pdf'):
            (Path(figures_dir) / f'methods_accuracy_{protocol}').with_suffix(suffix).unlink(missing_ok=True)

# %% [markdown]
# ## PEFT's SVD-based methods and DoRA against LoRA, and MiCA against PiSSA
#
# Paired test-accuracy differences per task and pooled, as the claims are measured (`toukit.claims.pooled_claims`
# with `claims.SVD_FAMILY`): PiSSA, DoRA, MiCA, OLoRA, EVA and LoRA-GA each minus LoRA, and MiCA minus PiSSA (W's
# minor singular directions against its top ones, though not alone: MiCA freezes B at the minor left singular
# vectors and trains A from zero on an unchanged W, PiSSA trains both factors from the top singular triplets with
# the residual frozen). A task with runs of both methods counts with the seeds it has (a cell with fewer says so).
# Per protocol: `svd_family_<protocol>.md` (a column per task) and `.csv` (every row).

# %%
for protocol, by_task in runs_by_protocol.items():
    family = claims.pooled_claims(by_task, n_boot=n_boot, claims=claims.SVD_FAMILY)
    family.round(4).to_csv(Path(figures_dir) / f'svd_family_{protocol}.csv', index=False)
    shown = claims.by_task(family)
    (Path(figures_dir) / f'svd_family_{protocol}.md').write_text(shown.to_markdown(index=False) + '\n')
    print(protocol)
    display(shown)

# %% [markdown]
# ## The FT - full TOU gap, split into its three parts
#
# FT - TOU = (FT - TOU full rank: the factorized parameterization) + (TOU full rank - TOU + residual: the restriction
# to the top-r subspace) + (TOU + residual - TOU: the truncation), per task and pooled, with paired 95% intervals
# (`toukit.gap.gap_decomposition`). A task sits out while its sweep has runs of the four methods left (as in the
# pooled claims); a task without them has rows that say 'not measured', and without any task no figure is drawn.
# The tuned protocol's figure is `gap_decomposition.png`, the paper protocol's
# `gap_decomposition_paper.png`; the table (`gap_decomposition.md`, `.csv`) has both.

# %%
def complete(by_task: dict, protocol: str, methods) -> dict:
    """The tasks of `by_task` whose sweep has every run of `methods` under `protocol` (the rest sit out, as in the
    pooled claims)."""
    left = {t: missing for t in by_task if (missing := results.missing_runs(every, t, protocol, methods))}
    for t, missing in left.items():
        print(f'{protocol}: {t} sits out, {len(missing)} run(s) of {", ".join(methods)} left: {", ".join(missing[:3])}'
              + ' ...' * (len(missing) > 3))
    return {t: r for t, r in by_task.items() if t not in left}


gaps = pd.concat([gap.gap_decomposition(complete(by_task, p, gap.GAP_METHODS), n_boot=n_boot).assign(protocol=p)
                  for p, by_task in runs_by_protocol.items()], ignore_index=True)
gaps.round(4).to_csv(Path(figures_dir) / 'gap_decomposition.csv', index=False)
(Path(figures_dir) / 'gap_decomposition.md').write_text(gap.format_gap_table(gaps).to_markdown(index=False) + '\n')
display(gap.format_gap_table(gaps))
for protocol, table in gaps.groupby('protocol', sort=False):
    if not (table.seeds > 0).any():
        print(f'{protocol}: no task has runs of all of {", ".join(gap.GAP_METHODS)} yet: no figure')
        continue
    fig = plots.plot_gap(table, title=f'{protocol} protocol')
    plots.save_figure(fig, Path(figures_dir) / ('gap_decomposition' + ('' if protocol == 'tuned' else f'_{protocol}')))
    plt.show()

# %% [markdown]
# ## Learning-rate choices within the validation noise, and the results both ways
#
# Per task and method, how far the chosen rate's validation accuracy is ahead of the runner-up's, tested at the 95%
# level (McNemar's exact test on the validation examples the two rates disagree on, or the binomial one for records
# without per-example predictions; `toukit.lr_choice.runner_up_margin` states the rule): `lr_margins.md`, with the
# smallest margin the test could call decided (`threshold`) and the p-value. Where the choice is close, the sweep's
# runner_up stage runs the runner-up rate on every seed, and every claim is reported under the chosen rates and with
# the runner-ups substituted (`toukit.lr_choice.claims_both_ways`; `claims_both_ways.csv`, and in
# `claims_both_ways.md` the claims a substitution touches), as is the gap split (`gap_decomposition_runner_up.md`).
# For the claims, tasks whose tuned protocol is unfinished sit out, as in the pooled claims; for the gap split, tasks
# whose four methods' tuned runs are unfinished.

# %%
task_names = [t for t in tasks.split(',') if t] or sorted(set(every.preset))
manifests = {t: lr_choice.sweep_manifest(every, t) for t in task_names if t in set(every.preset)}
manifests = {t: m for t, m in manifests.items() if m is not None}
both_ways = {name: Path(figures_dir) / name for name in ('lr_margins', 'claims_both_ways',
                                                           'gap_decomposition_runner_up')}
margins = [lr_choice.lr_margins(m, every[every.preset == t]) for t, m in manifests.items()]
margins = pd.concat(margins, ignore_index=True) if margins else pd.DataFrame()


def runner_ups_left(task_names, methods=None) -> str:
    """A line naming the runner-up runs still to make, per task (from the grids: older manifests lack the stage)."""
    left = {}
    for t in task_names:
        plan = lr_choice.runner_up_plan(manifests[t], every[every.preset == t])
        plan = plan[plan.method.isin(methods)] if methods else plan
        if n := sum(map(len, plan.missing)):
            left[t] = n
    return ('runner-up runs still to make (their rows use the seeds they have, the `seeds` column): ' +
            ', '.join(f'{t} {n}' for t, n in left.items()) + '\n\n') if left else ''


stale = []  # what nothing is left to report: an earlier state's files are removed
if len(margins):
    figures_of = lambda digits: margins.round(dict.fromkeys(('margin', 'threshold', 'p_value'), digits))  # noqa: E731
    figures_of(4).to_csv(both_ways['lr_margins'].with_suffix('.csv'), index=False)
    both_ways['lr_margins'].with_suffix('.md').write_text(figures_of(3).to_markdown(index=False) + '\n')
    display(margins)
else:
    stale.append(both_ways['lr_margins'])
ready = [t for t in manifests if not results.missing_runs(every, t, 'tuned')]  # every method's tuned runs made
print(f'claims both ways: {ready or "no task"} (a task whose tuned runs are unfinished sits out)')
if ready:
    note = runner_ups_left(ready)
    both = lr_choice.claims_both_ways(every, ready, n_boot=n_boot)
    both.round(4).to_csv(both_ways['claims_both_ways'].with_suffix('.csv'), index=False)
    key = ['claim', 'statement', 'task']
    touched = both[(both.choice == 'runner-up') & both.rates.str.contains('runner-up')][key]
    shown = both.merge(touched, on=key)  # both rows of every claim a substitution touches
    shown = shown.sort_values(['claim', 'statement', 'task', 'choice'], kind='stable')
    both_ways['claims_both_ways'].with_suffix('.md').write_text(
        note + (shown.round(3).to_markdown(index=False) if len(shown) else 'no claim uses a close rate') + '\n')
    display(shown)
else:
    stale.append(both_ways['claims_both_ways'])
chosen, swapped, _ = lr_choice.tuned_both_ways(every, list(manifests)) if manifests else ({}, {}, {})
chosen = complete(chosen, 'tuned', gap.GAP_METHODS)  # the four methods' tuned runs made
if chosen:
    note = runner_ups_left(chosen, gap.GAP_METHODS)
    gaps_both = pd.concat([gap.gap_decomposition(by_task, n_boot=n_boot).assign(protocol=f'tuned, {way} rates')
                           for way, by_task in (('chosen', chosen), ('runner-up', {t: swapped[t] for t in chosen}))],
                          ignore_index=True)
    gaps_both.round(4).to_csv(both_ways['gap_decomposition_runner_up'].with_suffix('.csv'), index=False)
    shown = gap.format_gap_table(gaps_both)
    both_ways['gap_decomposition_runner_up'].with_suffix('.md').write_text(note + shown.to_markdown(index=False) + '\n')
    display(shown)
else:
    stale.append(both_ways['gap_decomposition_runner_up'])
for path in stale:
    for suffix in ('.csv', '.md'):
        path.with_suffix(suffix).unlink(missing_ok=True)

# %% [markdown]
# ## Runs that diverged
#
# A run whose loss became non-finite ends 'diverged': final (the sweep does not make it again), and in none of the
# tables above: a diverged tuned, runner-up or paper run leaves its method's `seeds` there one short.
# `diverged_runs.md` names each, every task's (`toukit.results.diverged_runs`).

# %%
diverged = results.diverged_runs(every)
(Path(figures_dir) / 'diverged_runs.md').write_text(
    (diverged.to_markdown(index=False) if len(diverged) else 'no run diverged') + '\n')
print(f'{len(diverged)} diverged run(s)')
display(diverged)

# %% [markdown]
# ## What each method did to each layer type (tuned protocol)
#
# Medians over matrices and seeds of each method's own update (`toukit.updates.layer_type_table`: TOU's from its
# start A_0 B_0), per task and layer type, next to what a random subspace of the layer's rank holds (r / out on the
# left, r / in on the right). By layer type rather than by kind, MLP in and MLP out keep their own baselines (r / out
# is 0.094 for MiniLM's MLP in and 0.375 for its MLP out; a median over the MLP mixes them). 'not changed': the method
# changed no matrix of that type (LoRA's MLP, the adapter, BitFit); 'not measured': no record of it with an update
# summary. Written to `update_by_layer_type.md` and `.csv`.

# %%
layer_updates = [updates.records_updates(results.records_by_method(r)).assign(task=t)
                 for t, r in runs_by_protocol['tuned'].items() if len(r)]
by_layer_type = updates.layer_type_table(pd.concat(layer_updates, ignore_index=True) if layer_updates else
                                         pd.DataFrame())
if len(by_layer_type):
    by_layer_type.round(4).to_csv(Path(figures_dir) / 'update_by_layer_type.csv', index=False)
    shown = updates.format_layer_type_table(by_layer_type)
    (Path(figures_dir) / 'update_by_layer_type.md').write_text(shown.to_markdown(index=False) + '\n')
    display(shown[shown.status == 'measured'])
else:
    print('no tuned record with an update summary yet')
