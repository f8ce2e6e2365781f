# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # What fine-tuning did to each layer: the spectrum of the update
#
# Reads run records only (no training): every run records, per attention and MLP matrix, what its method did to
# the pretrained weight W_0 (`toukit.updates`; the columns are defined in `toukit.updates.COLUMNS`). For each
# method at its validation-chosen learning rate (the *tuned* protocol):
#
# - the update's effective rank by depth;
# - the share of the update's energy inside W_0's top-r left and right singular subspaces (r: TOU's rank, 0.375 of
#   min(out, in) on the demo), against what a random subspace of that size holds (r / out, r / in), by depth and
#   by layer kind;
# - the subspace similarity of the top-k singular vectors of W_0 and W_1 (the LoRA paper's section 7 measure);
# - a table of per-method medians.
#
# TOU's premise: with A = U_r S_r frozen, TOU's own update A (B_1 - B_0) lies in span(U_r) by construction. How much
# of full fine-tuning's update lies there says how much of FT's change TOU can express at all.

# %%
from pathlib import Path

import matplotlib.pyplot as plt
from IPython.display import display

from toukit import methods, plots, results, updates

# %% tags=["parameters"]
results_dir: str = "results"  # run records
figures_dir: str = "figures"  # outputs go under figures_dir/preset
preset: str = "demo"  # which preset's runs
protocol: str = "tuned"  # 'tuned' (each method at its chosen rate) or 'paper' (the paper's shared rate)

# %%
out_dir = Path(figures_dir) / preset
out_dir.mkdir(parents=True, exist_ok=True)
runs = results.load_runs(results_dir)
runs = results.with_protocol(runs[runs.preset == preset], protocol) if len(runs) else runs
table = updates.records_updates(results.records_by_method(runs)) if len(runs) else None
if table is None or table.empty:
    print(f'no {protocol} records of preset {preset!r} with an update summary in {results_dir}')
else:
    print(f'{table.method.nunique()} methods, {len(table)} matrix rows; records with a summary per method: '
          f'{table.groupby("method", sort=False).seed.nunique().to_dict()}')

# %% [markdown]
# ## Per-method medians (over matrices and seeds), by layer kind

# %%
if table is not None and not table.empty:
    medians = updates.median_table(table)
    medians.index = medians.index.set_levels(medians.index.levels[0].map(methods.method_label), level=0)
    results.write_tables(medians.round(4).reset_index(), out_dir / f'updates_{protocol}')
    display(medians.round(3))

# %% [markdown]
# ## Each method's own update: per-method medians (over matrices and seeds), by layer kind
#
# The medians above measure dW = W_1 - W_0. For TOU and TOU frozen FFN that includes the truncation, W_0 minus its
# rank-r part, which is discarded before training: it dominates their size and lies outside W_0's top-r subspaces
# by construction (TOU frozen FFN's MLP, never trained, shows it alone). Here each method's own update
# (`toukit.updates.own_updates`): the layers it changed, and for the TOU family the update from its own starting
# weight A_0 B_0 (noise included); the statistics of dW that have no `start_*` twin (spectral ratio, rank_e90,
# amplification) are left blank for them, and the subspace similarities compare W_0 and W_1 for every method.

# %%
if table is not None and not table.empty:
    own = updates.own_updates(table)
    own_medians = updates.median_table(own)
    own_medians.index = own_medians.index.set_levels(own_medians.index.levels[0].map(methods.method_label), level=0)
    results.write_tables(own_medians.round(4).reset_index(), out_dir / f'updates_own_{protocol}')
    display(own_medians.round(3))

# %% [markdown]
# ## How much of each update lies in W_0's top-r subspaces, by depth (dashed: a random subspace of that size)
#
# Each method's own update, as in the table above.

# %%
if table is not None and not table.empty:
    fig = plots.plot_update_by_depth(own, 'left_energy_r', "share of ||dW||² in W_0's top-r left subspace",
                                     baseline='random_left_r')
    plots.save_figure(fig, out_dir / f'update_left_energy_{protocol}')
    plt.show()
    fig = plots.plot_update_by_depth(own, 'right_energy_r', "share of ||dW||² in W_0's top-r right subspace",
                                     baseline='random_right_r')
    plots.save_figure(fig, out_dir / f'update_right_energy_{protocol}')
    plt.show()

# %% [markdown]
# ## The update's effective rank and relative size, by depth (each method's own update)

# %%
if table is not None and not table.empty:
    fig = plots.plot_update_by_depth(own, 'effective_rank', 'effective rank of dW')
    plots.save_figure(fig, out_dir / f'update_effective_rank_{protocol}')
    plt.show()
    fig = plots.plot_update_by_depth(own, 'relative_update', '||dW||_F / ||W_0||_F', logy=True)
    plots.save_figure(fig, out_dir / f'update_size_{protocol}')
    plt.show()

# %% [markdown]
# ## Subspace similarity of W_0 and W_1

# %%
if table is not None and not table.empty:
    fig = plots.plot_update_similarity(updates.own_updates(table))
    plots.save_figure(fig, out_dir / f'update_similarity_{protocol}')
    plt.show()
