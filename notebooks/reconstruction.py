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
# # Reconstruction error and the noise-scale study
#
# 1. Relative weight error vs rank for every layer (it equals the square root of the tail energy).
# 2. Functional error vs rank: each layer's outputs on the inputs it really sees, and the model's logits, on a real
#    batch of the default data.
# 3. Noise scale alpha (the paper gives none): the error N(0, alpha^2) on both factors adds next to the truncation
#    error, and validation accuracy after fine-tuning vs alpha from the run records of `toukit reproduce`.

# %%
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
from IPython.display import display

import toukit
from toukit import plots, results, studies, train
from toukit.data import load_dataset, sample_batch

# %% tags=["parameters"]
preset: str = "demo"  # the model and data come from this preset (demo: MiniLM on BBC News)
model: str = None  # None: the preset's; 'minilm' or a timm model name (its pretrained weights must be reachable)
pretrained: bool = None  # None: the preset's; False: random weights (smoke tests)
targets: str = "all"  # 'all', 'attention', 'mlp' or a list of module-name patterns
results_dir: str = "results"  # run records (read only)
figures_dir: str = "figures"  # figures and tables are written under figures_dir/preset
dataset: str = None  # None: the preset's
batch_size: int = 32  # examples in the real batch
ranks: list = [0.1, 0.25, 0.375, 0.5, 0.75]  # TOU ranks (fractions of min(out, in)) of the logit study
noise_scales: list = [0.0, 1e-4, 1e-3, 1e-2, 3e-2, 1e-1]  # alphas of the noise study
noise_rank: float = 0.375  # the rank the noise study factorizes at
seed: int = 0  # seeds the noise

# %%
config, net = train.preset_model(preset, model, pretrained)
out_dir = Path(figures_dir) / preset
out_dir.mkdir(parents=True, exist_ok=True)
table = toukit.spectrum_table(net, targets=targets)
print(f'{config.model}: {len(table)} weight matrices')

bundle = load_dataset(dataset or config.dataset, net, max_length=config.max_length)
inputs, _ = sample_batch(bundle, batch_size, split='val')

# %%
curves = studies.error_curves(table)
fig = plots.plot_error_vs_rank(curves)
plots.save_figure(fig, out_dir / 'reconstruction_weight_error')
plt.show()

# %%
outputs = studies.layer_output_errors(net, inputs, fractions=sorted(set(curves.fraction.round(3)))[::2],
                                      targets=targets)
fig = plots.plot_error_vs_rank(outputs, value='output_error', ylabel='relative output error')
plots.save_figure(fig, out_dir / 'reconstruction_output_error')
plt.show()
outputs.groupby('fraction')[['weight_error', 'output_error']].mean().iloc[::4].round(3)

# %%
layers, totals = studies.tou_errors(net, inputs, ranks=ranks, noise_scales=[0.0], targets=targets, seed=seed)
logits_vs_rank = totals[['rank', 'weight_error', 'logit_error']]
logits_vs_rank.to_csv(out_dir / 'reconstruction_logit_error.csv', index=False)
logits_vs_rank.round(4)

# %% [markdown]
# ## Noise scale: the error alpha adds to the truncation error

# %%
noise_layers, noise_totals = studies.tou_errors(net, inputs, ranks=[noise_rank], noise_scales=noise_scales,
                                                 targets=targets, seed=seed)
truncation = noise_totals[noise_totals.noise_scale == 0].iloc[0]
noise_totals['added_weight_error'] = noise_totals.weight_error - truncation.weight_error
noise_totals['added_logit_error'] = noise_totals.logit_error - truncation.logit_error
noise_totals.to_csv(out_dir / 'noise_scale_errors.csv', index=False)
fig = plots.plot_noise_errors(noise_totals)
plots.save_figure(fig, out_dir / 'noise_scale_errors')
plt.show()
noise_totals.round(5)

# %% [markdown]
# ## Noise scale: validation accuracy after fine-tuning (run records)

# %%
runs = results.load_runs(results_dir, status='ok') if Path(results_dir).exists() else pd.DataFrame()
# the study's runs: full TOU at the preset's shared rate on the first seed, one run per noise scale
tou_runs = runs[(runs.method == 'tou') & (runs.preset == preset) & (runs.lr == config.lr) & (runs.seed == seed)
                & (runs['rank'] == str(config.rank))] if len(runs) else runs
if len(tou_runs) and tou_runs.noise_scale.nunique() > 1:
    fig = plots.plot_accuracy_vs_noise(tou_runs)
    plots.save_figure(fig, out_dir / 'noise_scale_accuracy')
    plt.show()
    noise_accuracy = tou_runs.groupby('noise_scale').agg(val_accuracy=('val_accuracy', 'mean'),
                                                         runs=('run_id', 'count')).reset_index()
    noise_accuracy.to_csv(out_dir / 'noise_scale_accuracy.csv', index=False)
    display(noise_accuracy)
else:
    print(f'no TOU runs at several noise scales under {results_dir}: run `toukit reproduce` first')

# %% [markdown]
# ## The default alpha
#
# `toukit.DEFAULT_NOISE_SCALE` is the value this study supports; the reasoning, with the measured numbers,
# is in the README's "Noise scale" section.
