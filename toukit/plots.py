"""Figures from tables and run records; no computation beyond smoothing for display."""
from pathlib import Path
from typing import Dict, Optional, Sequence, Union

import ipywidgets as widgets
import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from IPython.display import display

from .methods import method_label, method_names
from .spectrum import rank_table, total_error

__all__ = ['training_curves', 'save_figure', 'plot_spectra', 'plot_energy_curves',
           'plot_rank_heatmap', 'plot_rank_by_depth', 'threshold_explorer', 'plot_policy_tradeoff',
           'plot_error_vs_rank', 'plot_noise_errors', 'plot_accuracy_vs_noise', 'plot_costs', 'plot_lr_sweep',
           'plot_budget_study', 'plot_rank_pareto', 'plot_update_by_depth', 'plot_update_similarity', 'plot_forest',
           'plot_gap']


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    if window <= 1 or len(values) < window:
        return values
    kernel = np.ones(window) / window
    return np.convolve(values, kernel, mode='valid')


def training_curves(runs: Dict[str, dict], smooth: int = 10, axes=None):
    """The paper's Figure 2: training loss over steps and validation accuracy per epoch, one line per run.

    Args:
        runs: label -> run record (several records under one label are drawn as mean and min-max band).
        smooth: moving-average window for the step losses.
    """
    if axes is None:
        _, axes = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss, ax_acc = axes
    for label, records in runs.items():
        records = records if isinstance(records, (list, tuple)) else [records]
        losses = [np.array([s['loss'] for s in r['metrics']['steps']]) for r in records]
        n = min(len(x) for x in losses)
        loss = np.stack([_smooth(x[:n], smooth) for x in losses])
        steps = np.arange(loss.shape[1]) + (min(smooth, n) if n >= smooth else 1)
        line, = ax_loss.plot(steps, loss.mean(0), label=label, lw=1.5)
        accs = [np.array([e['val_accuracy'] for e in r['metrics']['epochs']]) for r in records]
        m = min(len(a) for a in accs)
        acc = np.stack([a[:m] for a in accs]) * 100
        epochs = np.arange(1, m + 1)
        ax_acc.plot(epochs, acc.mean(0), marker='o', label=label, color=line.get_color())
        if len(records) > 1:
            ax_loss.fill_between(steps, loss.min(0), loss.max(0), alpha=0.2, color=line.get_color())
            ax_acc.fill_between(epochs, acc.min(0), acc.max(0), alpha=0.2, color=line.get_color())
    ax_loss.set(xlabel='step', ylabel=f'training loss (moving average of {smooth})', title='Training loss')
    ax_acc.set(xlabel='epoch', ylabel='validation accuracy (%)', title='Validation accuracy')
    ax_acc.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    for ax in axes:
        ax.grid(alpha=0.3)
    ax_acc.legend(fontsize=8)
    plt.tight_layout()
    return axes[0].figure


def save_figure(fig, path: Union[str, Path], formats: Sequence[str] = ('png', 'pdf')) -> list:
    """Save `fig` as path.png and path.pdf (parents created); returns the files written. The PDF holds no creation
    date, so a figure whose content has not changed is rewritten byte for byte (no churn in git)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for fmt in formats:
        out = path.with_suffix(f'.{fmt}')
        fig.savefig(out, dpi=150, bbox_inches='tight', metadata={'CreationDate': None} if fmt == 'pdf' else None)
        written.append(out)
    return written


# ---------------------------------------------------------------------------------------------------------------
# spectrum figures (from toukit.spectrum tables)


def _by_type(table: pd.DataFrame):
    order = list(dict.fromkeys(table['type']))
    return [(t, table[table['type'] == t]) for t in order]


def _type_panels(count: int, sharey: bool):
    """(figure, axes) of `count` panels, three a row."""
    cols = min(3, count)
    rows = int(np.ceil(count / cols))
    return plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False, sharey=sharey)


def _label_panels(axes, count: int, ylabel: str) -> None:
    """The y label on the first column; the panels past `count` hidden."""
    for ax in axes[:, 0]:
        ax.set_ylabel(ylabel)
    for ax in axes.flat[count:]:
        ax.axis('off')


def plot_spectra(table: pd.DataFrame, normalize: bool = True):
    """Singular values (log scale) of every layer, one panel per layer type, colour by depth."""
    groups = _by_type(table)
    fig, axes = _type_panels(len(groups), sharey=normalize)
    depth = table.block.fillna(0)
    norm = matplotlib.colors.Normalize(depth.min(), max(depth.max(), 1))
    cmap = plt.get_cmap('viridis')
    for ax, (kind, group) in zip(axes.flat, groups):
        for row in group.itertuples():
            s = row.singular_values / (row.singular_values[0] if normalize else 1)
            ax.semilogy(np.arange(1, len(s) + 1), s, color=cmap(norm(row.block or 0)), lw=1)
        ax.set(title=kind, xlabel='index i')
        ax.grid(alpha=0.3)
    _label_panels(axes, len(groups), 'sigma_i / sigma_1' if normalize else 'sigma_i')
    fig.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap), ax=axes, label='block (depth)', shrink=0.8)
    return fig


def plot_energy_curves(table: pd.DataFrame, thresholds: Sequence[float] = (0.5, 0.9, 0.99)):
    """Cumulative energy vs rank fraction for every layer, one colour per layer type."""
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    colors = dict(zip(dict.fromkeys(table['type']), plt.get_cmap('tab10').colors))
    for row in table.itertuples():
        s = row.singular_values
        e = np.cumsum(s ** 2) / np.sum(s ** 2)
        ax.plot(np.arange(1, len(s) + 1) / len(s), e, color=colors[row.type], lw=0.8, alpha=0.7)
    for t in thresholds:
        ax.axhline(t, color='grey', ls=':', lw=1)
    handles = [matplotlib.lines.Line2D([], [], color=c, label=t) for t, c in colors.items()]
    ax.legend(handles=handles, fontsize=7, loc='lower right')
    ax.set(xlabel='rank / max rank', ylabel='cumulative energy', title='Energy curves (one line per layer)')
    ax.grid(alpha=0.3)
    return fig


def plot_rank_heatmap(grid: pd.DataFrame, threshold: float):
    """Rank (as a fraction of max rank) needed for an energy threshold, by layer type (rows) and depth (columns).

    Args:
        grid: `toukit.spectrum.energy_rank_grid(table, threshold)`.
        threshold: the energy threshold, for the title.
    """
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * grid.shape[1], 0.9 + 0.45 * grid.shape[0]))
    sns.heatmap(grid, annot=True, fmt='.2f', cmap='magma_r', vmin=0, vmax=1, ax=ax,
                cbar_kws=dict(label='rank / max rank'), annot_kws=dict(fontsize=7))
    ax.set(title=f'Rank needed for {threshold:g} of the energy', xlabel='block', ylabel='')
    return fig


def plot_rank_by_depth(table: pd.DataFrame):
    """Stable rank and effective rank (as fractions of max rank) by depth, one line per layer type."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, col, title in zip(axes, ('stable_rank', 'effective_rank'), ('Stable rank', 'Effective rank')):
        for kind, group in _by_type(table):
            ax.plot(group.block, group[col] / group.max_rank, marker='o', label=kind, lw=1)
        ax.set(xlabel='block', ylabel=f'{col.replace("_", " ")} / max rank', title=title)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    plt.tight_layout()
    return fig


def threshold_explorer(table: pd.DataFrame, start: float = 0.9):
    """An ipywidgets slider over the energy threshold that updates per-type ranks, parameters kept and error.

    The returned widget's `rank_pattern()` gives the ranks at the slider's current threshold, per layer, ready for
    `toukit.apply_tou(model, rank=explorer.rank_pattern())`.
    """
    def show(threshold):
        ranks = rank_table(table, f'energy:{threshold}')
        kept = ranks.params_factored.sum() / ranks.params_dense.sum()
        print(f'threshold {threshold:.3f}: A and B keep {kept:.1%} of the targets\' parameters; '
              f'total relative weight error {total_error(ranks):.3f}')
        display(ranks.groupby('type', sort=False).agg(mean_rank=('rank', 'mean'), kept=('kept', 'mean'),
                                                      error=('relative_error', 'mean')).round(3))

    slider = widgets.FloatSlider(value=start, min=0.5, max=0.999, step=0.005, description='energy',
                                 readout_format='.3f', continuous_update=False)
    box = widgets.VBox([slider, widgets.interactive_output(show, dict(threshold=slider))])

    def rank_pattern() -> Dict[str, int]:
        """The ranks shown now, as a rank pattern for `toukit.apply_tou(model, rank=...)` (q, k, v of a fused
        projection take the largest of their three, as apply_tou does)."""
        ranks = rank_table(table, f'energy:{slider.value}')
        return {name: int(r) for name, r in ranks.groupby('name', sort=False)['rank'].max().items()}
    box.rank_pattern = rank_pattern
    return box


# ---------------------------------------------------------------------------------------------------------------
# rank selection and reconstruction


def plot_policy_tradeoff(policies: pd.DataFrame):
    """Total relative weight error vs parameters kept, one line per policy kind (fixed, fraction, energy)."""
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for kind, group in policies.groupby('kind', sort=False):
        group = group.sort_values('kept')
        ax.plot(group.kept * 100, group.total_error, marker='o', label=kind)
        for row in group.itertuples():
            ax.annotate(row.policy, (row.kept * 100, row.total_error), fontsize=6, xytext=(3, 3),
                        textcoords='offset points')
    ax.set(xlabel='parameters kept by A and B (% of the dense targets)', ylabel='total relative weight error',
           title='Rank policies: error left vs parameters kept')
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def plot_error_vs_rank(curves: pd.DataFrame, value: str = 'relative_error', ylabel: str = 'relative weight error'):
    """Error vs rank fraction, one panel per layer type, one line per depth."""
    groups = _by_type(curves)
    fig, axes = _type_panels(len(groups), sharey=True)
    cmap = plt.get_cmap('viridis')
    top = max(curves.block.fillna(0).max(), 1)
    for ax, (kind, group) in zip(axes.flat, groups):
        for block, g in group.groupby('block'):
            ax.plot(g.fraction, g[value], color=cmap(block / top), lw=1)
        ax.set(title=kind, xlabel='rank / max rank')
        ax.grid(alpha=0.3)
    _label_panels(axes, len(groups), ylabel)
    plt.tight_layout()
    return fig


def plot_noise_errors(totals: pd.DataFrame):
    """Weight and logit error of the initial TOU factorization vs noise scale alpha, one line per rank."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for rank, group in totals.groupby('rank', sort=False):
        group = group.sort_values('noise_scale')
        x = group.noise_scale.replace(0, np.nan)
        for ax, col in zip(axes, ('weight_error', 'logit_error')):
            line, = ax.semilogx(x, group[col], marker='o', label=f'rank {rank}')
            ax.axhline(group[group.noise_scale == 0][col].mean(), color=line.get_color(), ls=':', lw=1)
    axes[0].set(xlabel='noise scale alpha', ylabel='relative weight error (all targets)',
                title='Weight error (dotted: truncation alone)')
    axes[1].set(xlabel='noise scale alpha', ylabel='relative logit error', title='Logit error on a real batch')
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    plt.tight_layout()
    return fig


def plot_lr_sweep(grid_runs: pd.DataFrame, selected: Optional[Dict[str, float]] = None):
    """Final validation accuracy vs learning rate, one line per method (the sweep's grid on its first seed).

    Args:
        grid_runs: the grid protocol's runs (`toukit.results.with_protocol(runs, 'grid')`).
        selected: method -> the rate chosen on validation, marked with a ring.
    """
    fig, ax = plt.subplots(figsize=(7, 4.2))
    order = {m: i for i, m in enumerate(method_names())}
    for method in sorted(grid_runs.method.unique(), key=lambda m: order.get(m, len(order))):
        group = grid_runs[grid_runs.method == method].sort_values('lr')
        line, = ax.semilogx(group.lr, group.val_accuracy * 100, marker='o', label=method_label(method))
        if selected and method in selected:
            best = group[group.lr == selected[method]]
            ax.scatter(best.lr, best.val_accuracy * 100, s=160, facecolors='none', edgecolors=line.get_color(), lw=2)
    ax.set(xlabel='learning rate (AdamW, constant)', ylabel='validation accuracy (%)',
           title='Learning-rate sweep (seed 0; ring: chosen on validation)')
    ax.grid(alpha=0.3, which='both')
    ax.legend(fontsize=8, ncol=2)
    return fig


def plot_budget_study(study: pd.DataFrame):
    """Weight, layer-output and logit error vs trainable parameters, one line per rank policy
    (`toukit.studies.budget_study`)."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    for ax, col, title in zip(axes, ('weight_error', 'output_error', 'logit_error'),
                              ('weights', 'layer outputs (held-out inputs)', 'logits (held-out inputs)')):
        for policy, group in study.groupby('policy', sort=False):
            group = group.sort_values('trainable')
            ax.plot(group.trainable / 1e6, group[col], marker='o', label=policy)
        ax.set(xlabel='trainable parameters of B (M)', ylabel='relative error', title=title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    plt.tight_layout()
    return fig


def plot_rank_pareto(table: pd.DataFrame):
    """Test accuracy (mean and std over seeds) vs trainable parameters, one line per rank policy: the adaptive-rank
    study after fine-tuning (`toukit.claims.rank_study_table`)."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for policy, group in table.groupby('policy', sort=False):
        group = group.sort_values('trainable_params')
        ax.errorbar(group.trainable_params / 1e6, group.test_accuracy, yerr=group.test_accuracy_std.fillna(0),
                    marker='o', capsize=3, label=policy)
    ax.set(xlabel='trainable parameters (M)', ylabel='test accuracy (%)',
           title='Full TOU at equal budgets: rank policies after fine-tuning')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    plt.tight_layout()
    return fig


def plot_accuracy_vs_noise(runs: pd.DataFrame):
    """Validation accuracy after fine-tuning vs noise scale, from TOU run records (alpha = 0 drawn at the left)."""
    fig, ax = plt.subplots(figsize=(6, 3.8))
    data = runs.groupby('noise_scale').val_accuracy.agg(['mean', 'min', 'max', 'count']).reset_index()
    positive = data[data.noise_scale > 0]
    floor = positive.noise_scale.min() / 10 if len(positive) else 1e-5
    x = data.noise_scale.where(data.noise_scale > 0, floor)
    ax.errorbar(x, data['mean'] * 100, yerr=[(data['mean'] - data['min']) * 100, (data['max'] - data['mean']) * 100],
                marker='o', capsize=3)
    ax.set_xscale('log')
    ticks = list(x)
    ax.set_xticks(ticks, [('0' if a == 0 else f'{a:g}') for a in data.noise_scale])
    ax.set(xlabel='noise scale alpha', ylabel='validation accuracy (%)', title='Full TOU after fine-tuning')
    ax.grid(alpha=0.3)
    return fig


def plot_costs(table: pd.DataFrame):
    """Bars of test accuracy, trainable parameters, train time and training memory per method (Table 1 as a figure)."""
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.6))
    labels = [method_label(m) for m in table.method]
    cols = [('test_accuracy', 'test accuracy (%)', 100), ('trainable_params', 'trainable parameters (M)', 1e-6),
            ('train_seconds', 'train time (s)', 1), ('train_memory_mib', 'training memory (MiB)', 1)]
    for ax, (col, title, scale) in zip(axes, cols):
        ax.barh(labels, table[col] * scale, color=plt.get_cmap('tab10').colors[:len(labels)])
        ax.set(title=title)
        ax.invert_yaxis()
        ax.grid(alpha=0.3, axis='x')
    for ax in axes[1:]:
        ax.set_yticklabels([])
    plt.tight_layout()
    return fig


def _method_color(method: str):
    """One colour per registered method, the same in every panel and figure."""
    names = method_names()
    return plt.cm.tab20(names.index(method) % 20) if method in names else 'black'


def plot_update_by_depth(updates: pd.DataFrame, value: str, ylabel: str, baseline: Optional[str] = None,
                         logy: bool = False):
    """One panel per layer kind (attention, MLP): `value` of each method's update by depth (mean over the block's
    matrices and the seeds), from `toukit.updates.records_updates`; `baseline` (a column, e.g. what a random
    subspace holds) dashed in grey."""
    kinds = [k for k in ('attention', 'mlp', 'other') if k in set(updates.kind)]
    fig, axes = plt.subplots(1, len(kinds), figsize=(5.5 * len(kinds), 3.8), squeeze=False, sharey=True)
    for ax, kind in zip(axes[0], kinds):
        part = updates[updates.kind == kind]
        for method, group in part.groupby('method', sort=False):
            mean = group.groupby('block')[value].mean()
            ax.plot(mean.index, mean.values, marker='o', label=method_label(method), color=_method_color(method))
        if baseline is not None:
            base = part.groupby('block')[baseline].mean()
            ax.plot(base.index, base.values, color='grey', linestyle='--', label='random subspace')
        ax.set(xlabel='block (depth)', ylabel=ylabel, title=kind)
        if logy:
            ax.set_yscale('log')
        ax.grid(alpha=0.3)
    handles = {h.get_label(): h for ax in axes[0] for h in ax.get_lines()}
    axes[0][-1].legend(handles.values(), handles.keys(), fontsize=7, loc='best')
    plt.tight_layout()
    return fig


def plot_update_similarity(updates: pd.DataFrame, ks: Sequence[str] = ('1', '8', '32', 'r')):
    """Median subspace similarity of the top-k left and right singular vectors of W_0 and W_1, per method."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
    methods = list(dict.fromkeys(updates.method))
    width = 0.8 / len(ks)
    for ax, side in zip(axes, ('left', 'right')):
        for i, k in enumerate(ks):
            column = f'{side}_similarity_{k}'
            medians = updates.groupby('method', sort=False)[column].median().reindex(methods)
            ax.bar(np.arange(len(methods)) + i * width, medians.values, width, label=f'k = {k}')
        ax.set_xticks(np.arange(len(methods)) + width * (len(ks) - 1) / 2)
        ax.set_xticklabels([method_label(m) for m in methods], rotation=30, ha='right', fontsize=8)
        ax.set(ylabel='subspace similarity (1: unrotated)', title=f'{side} singular vectors of W_0 vs W_1')
        ax.grid(alpha=0.3, axis='y')
    axes[1].legend(fontsize=8)
    plt.tight_layout()
    return fig


def _forest_rows(ax, rows: pd.DataFrame, labels: Sequence[str]) -> None:
    """A forest plot's rows, the first at the top: each task's estimate with its 95% interval, the pooled one a
    black diamond."""
    for y, row in enumerate(rows.iloc[::-1].itertuples()):
        color = 'black' if row.task == 'pooled' else 'tab:blue'
        if pd.notna(row.ci_low):
            ax.plot([row.ci_low, row.ci_high], [y, y], color=color)
        ax.plot(row.measured, y, marker='D' if row.task == 'pooled' else 'o',
                markersize=8 if row.task == 'pooled' else 5, color=color)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(list(labels)[::-1], fontsize=7)


def plot_forest(pooled: pd.DataFrame, title: str = ''):
    """A forest plot of `toukit.claims.pooled_claims`: one panel per claim, each task's difference with its 95%
    interval and the pooled one (a diamond), the claim's threshold dashed; `title` above the panels. Claim (f)
    (merging loses nothing) is exact, with a range rather than an interval, and is left to the table."""
    pooled = pooled[pooled.claim != 'f']
    statements = list(dict.fromkeys(pooled.statement))
    fig, axes = plt.subplots(len(statements), 1, figsize=(7, 1.1 + 0.45 * pooled.task.nunique() * len(statements)),
                             squeeze=False)
    for ax, statement in zip(axes[:, 0], statements):
        rows = pooled[pooled.statement == statement].reset_index(drop=True)
        ratio = rows.unit.iloc[0] == 'ratio'
        _forest_rows(ax, rows, [f'{t} ({v})' for t, v in zip(rows.task, rows.verdict)])
        ax.axvline(rows.threshold.iloc[0], color='grey', linestyle='--')
        ax.set_title(f'({rows.claim.iloc[0]}) {statement}: {rows.comparison.iloc[0]}', fontsize=8, loc='left')
        ax.set_xlabel('ratio' if ratio else 'points', fontsize=7)
        if ratio:  # plain numbers on the log axis: evenly spaced over a narrow range (a log axis's own ticks leave
            ax.set_xscale('log')  # one or two there), at 1, 2 and 5 times powers of ten over a wide one
            low, high = ax.get_xlim()
            ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(nbins=6) if high / low < 5 else
                                       matplotlib.ticker.LogLocator(subs=(1, 2, 5)))
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f'{v:.3g}'))
            ax.tick_params(axis='x', labelsize=7)
        ax.grid(alpha=0.3, axis='x')
    if title:
        fig.suptitle(title, fontsize=9)
    plt.tight_layout()
    return fig


def plot_gap(table: pd.DataFrame, title: str = ''):
    """A forest plot of `toukit.gap.gap_decomposition`: one panel per part (the whole gap, then the three parts that
    add up to it, on one x axis), each task's difference with its 95% interval and the pooled one (a diamond), zero
    dashed; `title` above the panels."""
    parts = list(dict.fromkeys(table.part))
    fig, axes = plt.subplots(len(parts), 1, figsize=(7, 1.1 + 0.45 * table.task.nunique() * len(parts)),
                             sharex=True, squeeze=False)
    for ax, part in zip(axes[:, 0], parts):
        rows = table[table.part == part]
        _forest_rows(ax, rows, [f'{t} ({s} seeds)' if s else f'{t} (not measured)'
                                for t, s in zip(rows.task, rows.seeds)])
        ax.axvline(0, color='grey', linestyle='--')
        ax.set_title(f'{rows.label.iloc[0]}: {rows.comparison.iloc[0]}', fontsize=8, loc='left')
        ax.grid(alpha=0.3, axis='x')
    axes[-1, 0].set_xlabel('test accuracy difference (points)', fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    plt.tight_layout()
    return fig


def plot_method_accuracy(table: pd.DataFrame, title: str = ''):
    """One protocol's `toukit.method_table.method_table` as a panel per task and one pooled: each method's test
    accuracy with its 95% interval (the registry's order, top to bottom), FT's accuracy dashed; a method without runs
    on a task is a labelled empty row. `title` above the panels."""
    tasks = list(dict.fromkeys(table.task))
    names = list(dict.fromkeys(table.method))
    fig, axes = plt.subplots(1, len(tasks), figsize=(2.9 * len(tasks) + 1.2, 0.9 + 0.27 * len(names)), sharey=True,
                             squeeze=False)
    for ax, task in zip(axes[0], tasks):
        rows = table[table.task == task].set_index('method').reindex(names)
        for y, (method, row) in enumerate(rows.iloc[::-1].iterrows()):
            if pd.notna(row.test_accuracy):
                color = _method_color(method)
                ax.plot([row.ci_low, row.ci_high], [y, y], color=color)
                ax.plot(row.test_accuracy, y, marker='D' if task == 'pooled' else 'o', color=color, markersize=5)
        if 'ft' in rows.index and pd.notna(rows.test_accuracy.get('ft')):
            ax.axvline(rows.test_accuracy['ft'], color='grey', linestyle='--', linewidth=0.8)
        n = len(tasks) - 1  # a method is pooled over every task or not at all
        ax.set_title(f'pooled ({n} task{"s" * (n != 1)})' if task == 'pooled' else task, fontsize=8)
        ax.set_xlabel('test accuracy (%)', fontsize=7)
        ax.tick_params(axis='x', labelsize=7)
        ax.grid(alpha=0.3, axis='x')
    axes[0, 0].set_yticks(range(len(names)))
    axes[0, 0].set_yticklabels([method_label(m) for m in names[::-1]], fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    plt.tight_layout()
    return fig
