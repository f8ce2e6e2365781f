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
# # Spectrum exploration
#
# Singular values of every targeted weight matrix (q, k and v of a fused projection count as three), energy
# curves, the rank an energy threshold needs by layer type and depth, and stable / effective rank by depth.
# In JupyterLab the threshold slider at the end updates ranks, parameters kept and reconstruction error live;
# under papermill the notebook runs headless and writes the same figures under `figures_dir/preset`.

# %%
from pathlib import Path

import matplotlib.pyplot as plt

import toukit
from toukit import plots, spectrum, train

# %% tags=["parameters"]
preset: str = "demo"  # the model and data come from this preset (demo: MiniLM on BBC News)
model: str = None  # None: the preset's; 'minilm' or a timm model name (its pretrained weights must be reachable)
pretrained: bool = None  # None: the preset's; False: random weights (smoke tests)
targets: str = "all"  # 'all', 'attention', 'mlp' or a list of module-name patterns
results_dir: str = "results"  # run records (read only)
figures_dir: str = "figures"  # figures and tables are written under figures_dir/preset
threshold: float = 0.9  # energy threshold of the heatmap and the slider's start

# %%
config, net = train.preset_model(preset, model, pretrained)
out_dir = Path(figures_dir) / preset
out_dir.mkdir(parents=True, exist_ok=True)
table = toukit.spectrum_table(net, targets=targets)
print(f'{config.model}: {len(table)} weight matrices')

# %%
table.drop(columns=['singular_values']).round(3)

# %%
summary = table.groupby('type', sort=False)[['max_rank', 'stable_rank', 'effective_rank', 'rank_e50', 'rank_e90',
                                            'rank_e99']].mean().round(1)
summary.to_csv(out_dir / 'spectrum_summary.csv')
summary

# %%
fig = plots.plot_spectra(table)
plots.save_figure(fig, out_dir / 'spectrum_singular_values')
plt.show()

# %%
fig = plots.plot_energy_curves(table)
plots.save_figure(fig, out_dir / 'spectrum_energy_curves')
plt.show()

# %%
fig = plots.plot_rank_heatmap(spectrum.energy_rank_grid(table, threshold), threshold)
plots.save_figure(fig, out_dir / 'spectrum_rank_heatmap')
plt.show()

# %%
fig = plots.plot_rank_by_depth(table)
plots.save_figure(fig, out_dir / 'spectrum_stable_effective_rank')
plt.show()

# %% [markdown]
# Move the slider (JupyterLab): ranks, parameters kept and error for each layer type at that threshold.

# %%
plots.threshold_explorer(table, start=threshold)
