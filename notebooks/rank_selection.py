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
# # Rank selection: policies side by side
#
# A uniform rank, a fraction of min(out, in), a per-layer energy threshold, Gavish and Donoho's optimal hard
# threshold ('ght') and per-layer ranks allocated under a parameter budget ('budget:B', a multiple of what the
# uniform rank 0.375 spends; `toukit.allocate_ranks`), compared on the same model: the parameters A and B
# keep and the reconstruction error left, per layer and in total. At equal parameters, the budget allocation leaves
# the least summed relative error by construction (it minimises exactly that); whether that buys accuracy after
# fine-tuning is a training question, answered by run records, not here.

# %%
from pathlib import Path

import matplotlib.pyplot as plt
import torch
import pandas as pd

import toukit
from toukit import calibration, claims, plots, results, spectrum, studies, train
from toukit.data import load_dataset

# %% tags=["parameters"]
preset: str = "demo"  # the model and data come from this preset (demo: MiniLM on BBC News)
model: str = None  # None: the preset's; 'minilm' or a timm model name (its pretrained weights must be reachable)
pretrained: bool = None  # None: the preset's; False: random weights (smoke tests)
targets: str = "all"  # 'all', 'attention', 'mlp' or a list of module-name patterns
results_dir: str = "results"  # run records (read only)
figures_dir: str = "figures"  # figures and tables are written under figures_dir/preset
fixed_ranks: list = [16, 32, 64, 128, 192, 256]  # uniform ranks (capped by no layer: too large raises)
fractions: list = [0.05, 0.1, 0.2, 0.375, 0.5, 0.75]  # fractions of min(out, in); 0.375 is the paper's 288/768
energy_thresholds: list = [0.5, 0.7, 0.8, 0.9, 0.95, 0.99]  # per-layer energy thresholds
budgets: list = [0.25, 0.5, 1.0, 1.5, 2.0]  # parameter budgets, multiples of the uniform rank 0.375's cost
shown: list = ["0.375", "budget:1.0", "energy:0.9", "ght"]  # policies whose per-layer ranks are tabulated
study_budgets: list = [0.5, 1.0, 1.5]  # budgets of the equal-budget study (multiples of uniform 0.375's cost)
batch_size: int = 16  # examples per batch of the study
calibration_batches: int = 4  # training batches the activation-aware policy sees
heldout_batches: int = 2  # validation batches the study measures on (never seen by the calibration)

# %%
config, net = train.preset_model(preset, model, pretrained)
out_dir = Path(figures_dir) / preset
out_dir.mkdir(parents=True, exist_ok=True)
table = toukit.spectrum_table(net, targets=targets)
print(f'{config.model}: {len(table)} weight matrices')

fixed_ranks = [r for r in fixed_ranks if r <= table.max_rank.min()]
policies = (list(fixed_ranks) + list(fractions) + [f'energy:{t}' for t in energy_thresholds]
            + [f'budget:{float(b)}' for b in budgets] + ['ght'])

# %%
comparison = studies.compare_policies(table, policies)
comparison.to_csv(out_dir / 'rank_policies.csv', index=False)
comparison.round(4)

# %%
fig = plots.plot_policy_tradeoff(comparison)
plots.save_figure(fig, out_dir / 'rank_policy_tradeoff')
plt.show()

# %% [markdown]
# Per-layer ranks, parameters kept and error of a few policies (mean over depth, by layer type).

# %%
per_layer = pd.concat([spectrum.rank_table(table, p) for p in shown])
by_type = per_layer.pivot_table(index='type', columns='policy', values=['rank', 'relative_error'], sort=False)
per_layer.to_csv(out_dir / 'rank_per_layer.csv', index=False)
by_type.round(3)

# %% [markdown]
# ## Adaptive against uniform ranks at equal budget, before training
#
# At each budget (trainable parameters of B, as a multiple of what uniform rank 0.375 spends): uniform rank, the
# energy threshold that fits the budget, the budget allocation on weights, and the budget allocation on the
# layers' inputs with activation-aware factors (calibrated on training batches). Errors are measured on held-out
# validation batches: the weights, each layer's outputs on the inputs it sees, and the model's logits. Whether
# smaller errors buy accuracy after fine-tuning is the study's part (b), answered by training runs.

# %%
bundle = load_dataset(config.dataset, net, max_length=config.max_length)
def batches(split, n):
    loader = torch.utils.data.DataLoader(getattr(bundle, split), batch_size=batch_size)
    return [inputs for inputs, _ in calibration.first_batches(loader, n)]
study = studies.budget_study(net, study_budgets, heldout=batches('val', heldout_batches),
                              calibration=batches('train', calibration_batches), targets=targets)
study.to_csv(out_dir / 'rank_budget_study.csv', index=False)
fig = plots.plot_budget_study(study)
plots.save_figure(fig, out_dir / 'rank_budget_study')
plt.show()
study.round(4)

# %% [markdown]
# ## Adaptive against uniform ranks at equal budget, after fine-tuning
#
# The runs of `toukit rank-study` (`toukit.sweep.rank_study`): full TOU under the same four policies at each
# budget, on every seed, at one learning rate (the one the sweep chose for full TOU on validation). Test accuracy
# is the mean and standard deviation over seeds; each adaptive policy is compared with uniform rank at the same
# budget by a paired bootstrap over seeds and test examples (95%); `beats_uniform` says whether the whole interval
# lies above zero ('holds'), below ('does not hold'), or neither ('undecided').

# %%
study_manifest = Path(results_dir) / f'{preset}.ranks.sweep.json'
if study_manifest.exists():
    trained = claims.rank_study_table(toukit.load_runs(results_dir), results.read_manifest(study_manifest))
    results.write_tables(trained.round(3), out_dir / 'rank_study')
    fig = plots.plot_rank_pareto(trained)
    plots.save_figure(fig, out_dir / 'rank_pareto')
    plt.show()
else:
    trained = None
    print(f'{study_manifest} does not exist: run `toukit rank-study --preset {preset}` first')
trained
