"""Write the notebooks under notebooks/ from the cell sources below (keeps them reviewable as code).

    python tools/make_notebooks.py
"""
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent.parent / 'notebooks'


def notebook(cells):
    nb = new_notebook()
    nb.metadata['kernelspec'] = dict(name='python3', display_name='Python 3', language='python')
    for kind, source in cells:
        if kind == 'md':
            nb.cells.append(new_markdown_cell(source.strip()))
        else:
            cell = new_code_cell(source.strip())
            if kind == 'parameters':
                cell.metadata['tags'] = ['parameters']
            nb.cells.append(cell)
    return nb


NOTEBOOKS = {}

NOTEBOOKS['train.ipynb'] = [
    ('md', """
# Fine-tune one model with one method

`papermill notebooks/train.ipynb out.ipynb -p method tou` runs the whole pipeline: create the model, prepare it
with the method, train with AdamW at a constant learning rate, evaluate on validation and test every epoch, merge
back into the original architecture, and write a run record under `results_dir` (named by the run's id: preset,
method, learning rate, seed and a hash of every other setting that changes the result). `papermill --help-notebook notebooks/train.ipynb` lists
the parameters. `None` means: take the value from the preset (`demo`: MiniLM on BBC News, offline on a CPU;
`paper`: ViT-B/16 on CIFAR-100, the TOU paper's setting, needs a GPU and internet; `test`: seconds).
"""),
    ('code', """
import json

import matplotlib.pyplot as plt
import pandas as pd

import toukit
from toukit import plots, results, train
"""),
    ('parameters', """
method: str = "tou"  # ft, lora, pissa, tou, tou_frozen_ffn, svfit, delora, adapter or bitfit
preset: str = "demo"  # demo (MiniLM on BBC News, CPU), paper (ViT-B/16 on CIFAR-100, GPU) or test
model: str = None  # None: the preset's; 'minilm', 'tiny-bert' or a timm model name
dataset: str = None  # None: the preset's; bbc, cifar100, fashion_mnist or synthetic
rank: str = None  # None: the preset's for this method; an int, a fraction of min(out, in) or 'energy:0.9'
noise_scale: float = None  # TOU's alpha; None: toukit.DEFAULT_NOISE_SCALE
targets: str = None  # None: the method's; 'all', 'attention', 'mlp' or a list of module-name patterns
epochs: int = None  # None: the preset's
batch_size: int = None  # None: the preset's
lr: float = None  # None: the preset's (the paper's constant 5e-5)
weight_decay: float = 0.01  # AdamW's
seed: int = 0  # seeds the model head, the shuffling, the noise and random factors (not the split)
split_seed: int = 0  # seeds the train/validation/test split; keep it fixed to compare runs
max_length: int = None  # tokens per text; None: the preset's
train_limit: int = None  # keep only this many training examples (quick runs)
val_limit: int = None  # keep only this many validation examples
test_limit: int = None  # keep only this many test examples
max_steps_per_epoch: int = None  # stop each epoch early (quick runs)
calibration_batches: int = None  # TOU: factorize activation-aware on this many training batches
pretrained: bool = None  # None: the preset's
checkpoint: str = None  # local weights file for the model
device: str = "auto"  # auto, cpu or cuda
precision: str = "fp32"  # fp32 or bf16 (autocast)
num_workers: int = None  # DataLoader worker processes; None: the preset's
results_dir: str = "results"  # where the run record goes
run_name: str = None  # None: the run's id, {preset}_{method}_lr{lr}_s{seed}_{hash of the other settings}
save_weights: bool = False  # also write the merged model's weights (safetensors)
overwrite: bool = False  # replace a successful record of the same run (otherwise the run refuses)
resume: bool = False  # continue the run from its checkpoint (after a kill or a failure)
checkpoint_every: int = None  # also checkpoint every N steps (always after every epoch)
log_with: str = None  # an accelerate tracker for the metrics, e.g. 'tensorboard' (under results_dir/trackers)
"""),
    ('code', """
# every parameter is checked here, before any work: a bad one raises a ValueError naming it
config = train.resolve_config(train.TrainConfig(
    method=method, preset=preset, model=model, dataset=dataset,
    rank=rank, noise_scale=noise_scale, targets=targets, epochs=epochs, batch_size=batch_size, lr=lr,
    weight_decay=weight_decay, seed=seed, split_seed=split_seed, max_length=max_length, train_limit=train_limit,
    val_limit=val_limit, test_limit=test_limit, max_steps_per_epoch=max_steps_per_epoch,
    calibration_batches=calibration_batches, pretrained=pretrained, checkpoint=checkpoint, device=device,
    precision=precision, num_workers=num_workers, results_dir=results_dir, run_name=run_name,
    save_weights=save_weights, checkpoint_every=checkpoint_every, log_with=log_with))
pd.Series({k: v for k, v in vars(config).items()}, dtype=object).to_frame('value')
"""),
    ('code', """
record = train.run(config, overwrite=overwrite, resume=resume)
print('record written to', config.record_path)
"""),
    ('code', """
summary = results.load_runs(config.record_path)
summary[['method', 'lr', 'val_accuracy', 'test_accuracy', 'merge', 'merged_test_accuracy', 'trainable_params',
         'total_params', 'train_seconds', 'factorize_seconds', 'train_memory_mib', 'peak_memory_mib', 'memory_kind']]
"""),
    ('code', """
results.history(record)
"""),
    ('code', """
fig = plots.training_curves({plots.method_label(method): record}, smooth=5)
plt.show()
"""),
]

COMMON_MODEL = """
preset: str = "demo"  # the model and data come from this preset (demo: MiniLM on BBC News)
model: str = None  # None: the preset's; 'minilm' or a timm model name (its pretrained weights must be reachable)
pretrained: bool = None  # None: the preset's; False: random weights (smoke tests)
targets: str = "all"  # 'all', 'attention', 'mlp' or a list of module-name patterns
results_dir: str = "results"  # run records (read only)
figures_dir: str = "figures"  # figures and tables are written under figures_dir/preset
"""

SETUP_MODEL = """
config = train.resolve_config(train.TrainConfig(method='tou', preset=preset, model=model, pretrained=pretrained))
out_dir = Path(figures_dir) / preset
out_dir.mkdir(parents=True, exist_ok=True)
net = toukit.create_model(config.model, num_classes=num_classes_of(config.dataset), pretrained=config.pretrained)
table = toukit.spectrum_table(net, targets=targets)
print(f'{config.model}: {len(table)} weight matrices, {table.out_features.mul(table.in_features).sum() / 1e6:.2f}M '
      f'parameters in the targets')
"""

IMPORTS = """
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

import toukit
from toukit import plots, results, spectrum, train
from toukit.data import load_dataset, num_classes_of, sample_batch
"""

NOTEBOOKS['spectrum.ipynb'] = [
    ('md', """
# Spectrum exploration

Singular values of every targeted weight matrix (q, k and v of a fused projection count as three), energy
curves, the rank an energy threshold needs by layer type and depth, and stable / effective rank by depth.
In JupyterLab the threshold slider at the end updates ranks, parameters kept and reconstruction error live;
under papermill the notebook runs headless and writes the same figures under `figures_dir/preset`.
"""),
    ('code', IMPORTS),
    ('parameters', COMMON_MODEL + """threshold: float = 0.9  # energy threshold of the heatmap and the slider's start
"""),
    ('code', SETUP_MODEL),
    ('code', """
table.drop(columns=['singular_values']).round(3)
"""),
    ('code', """
summary = table.groupby('type', sort=False)[['max_rank', 'stable_rank', 'effective_rank', 'rank_e50', 'rank_e90',
                                            'rank_e99']].mean().round(1)
summary.to_csv(out_dir / 'spectrum_summary.csv')
summary
"""),
    ('code', """
fig = plots.plot_spectra(table)
plots.save_figure(fig, out_dir / 'spectrum_singular_values')
plt.show()
"""),
    ('code', """
fig = plots.plot_energy_curves(table)
plots.save_figure(fig, out_dir / 'spectrum_energy_curves')
plt.show()
"""),
    ('code', """
fig = plots.plot_rank_heatmap(table, threshold)
plots.save_figure(fig, out_dir / 'spectrum_rank_heatmap')
plt.show()
"""),
    ('code', """
fig = plots.plot_rank_by_depth(table)
plots.save_figure(fig, out_dir / 'spectrum_stable_effective_rank')
plt.show()
"""),
    ('md', "Move the slider (JupyterLab): ranks, parameters kept and error for each layer type at that threshold."),
    ('code', """
plots.threshold_explorer(table, start=threshold)
"""),
]

NOTEBOOKS['rank_selection.ipynb'] = [
    ('md', """
# Rank selection: policies side by side

A uniform rank, a fraction of min(out, in), a per-layer energy threshold, Gavish and Donoho's optimal hard
threshold ('ght') and per-layer ranks allocated under a parameter budget ('budget:B', a multiple of what the
uniform rank 0.375 spends; `toukit.spectrum.allocate_ranks`), compared on the same model: the parameters A and B
keep and the reconstruction error left, per layer and in total. At equal parameters, the budget allocation leaves
the least summed relative error by construction (it minimises exactly that); whether that buys accuracy after
fine-tuning is a training question, answered by run records, not here.
"""),
    ('code', IMPORTS),
    ('parameters', COMMON_MODEL + """fixed_ranks: list = [16, 32, 64, 128, 192, 256]  # uniform ranks (capped by no layer: too large raises)
fractions: list = [0.05, 0.1, 0.2, 0.375, 0.5, 0.75]  # fractions of min(out, in); 0.375 is the paper's 288/768
energy_thresholds: list = [0.5, 0.7, 0.8, 0.9, 0.95, 0.99]  # per-layer energy thresholds
budgets: list = [0.25, 0.5, 1.0, 1.5, 2.0]  # parameter budgets, multiples of the uniform rank 0.375's cost
shown: list = ["0.375", "budget:1.0", "energy:0.9", "ght"]  # policies whose per-layer ranks are tabulated
"""),
    ('code', SETUP_MODEL + """
fixed_ranks = [r for r in fixed_ranks if r <= table.max_rank.min()]
policies = (list(fixed_ranks) + list(fractions) + [f'energy:{t}' for t in energy_thresholds]
            + [f'budget:{float(b)}' for b in budgets] + ['ght'])
"""),
    ('code', """
comparison = spectrum.compare_policies(table, policies)
comparison.to_csv(out_dir / 'rank_policies.csv', index=False)
comparison.round(4)
"""),
    ('code', """
fig = plots.plot_policy_tradeoff(comparison)
plots.save_figure(fig, out_dir / 'rank_policy_tradeoff')
plt.show()
"""),
    ('md', "Per-layer ranks, parameters kept and error of a few policies (mean over depth, by layer type)."),
    ('code', """
per_layer = pd.concat([spectrum.rank_table(table, p) for p in shown])
by_type = per_layer.pivot_table(index='type', columns='policy', values=['rank', 'relative_error'], sort=False)
per_layer.to_csv(out_dir / 'rank_per_layer.csv', index=False)
by_type.round(3)
"""),
]

NOTEBOOKS['reconstruction.ipynb'] = [
    ('md', """
# Reconstruction error and the noise-scale study

1. Relative weight error vs rank for every layer (it equals the square root of the tail energy).
2. Functional error vs rank: each layer's outputs on the inputs it really sees, and the model's logits, on a real
   batch of the default data.
3. Noise scale alpha (the paper gives none): the error N(0, alpha^2) on both factors adds next to the truncation
   error, and validation accuracy after fine-tuning vs alpha from the run records of `toukit reproduce`.
"""),
    ('code', IMPORTS),
    ('parameters', COMMON_MODEL + """dataset: str = None  # None: the preset's
batch_size: int = 32  # examples in the real batch
ranks: list = [0.1, 0.25, 0.375, 0.5, 0.75]  # TOU ranks (fractions of min(out, in)) of the logit study
noise_scales: list = [0.0, 1e-4, 1e-3, 1e-2, 3e-2, 1e-1]  # alphas of the noise study
noise_rank: float = 0.375  # the rank the noise study factorizes at
seed: int = 0  # seeds the noise
"""),
    ('code', SETUP_MODEL + """
bundle = load_dataset(dataset or config.dataset, net, max_length=config.max_length)
inputs, _ = sample_batch(bundle, batch_size, split='val')
"""),
    ('code', """
curves = spectrum.error_curves(table)
fig = plots.plot_error_vs_rank(curves)
plots.save_figure(fig, out_dir / 'reconstruction_weight_error')
plt.show()
"""),
    ('code', """
outputs = spectrum.layer_output_errors(net, inputs, fractions=sorted(set(curves.fraction.round(3)))[::2],
                                       targets=targets)
fig = plots.plot_error_vs_rank(outputs, value='output_error', ylabel='relative output error')
plots.save_figure(fig, out_dir / 'reconstruction_output_error')
plt.show()
outputs.groupby('fraction')[['weight_error', 'output_error']].mean().iloc[::4].round(3)
"""),
    ('code', """
layers, totals = spectrum.tou_errors(net, inputs, ranks=ranks, noise_scales=[0.0], targets=targets, seed=seed)
logits_vs_rank = totals[['rank', 'weight_error', 'logit_error']]
logits_vs_rank.to_csv(out_dir / 'reconstruction_logit_error.csv', index=False)
logits_vs_rank.round(4)
"""),
    ('md', "## Noise scale: the error alpha adds to the truncation error"),
    ('code', """
noise_layers, noise_totals = spectrum.tou_errors(net, inputs, ranks=[noise_rank], noise_scales=noise_scales,
                                                 targets=targets, seed=seed)
truncation = noise_totals[noise_totals.noise_scale == 0].iloc[0]
noise_totals['added_weight_error'] = noise_totals.weight_error - truncation.weight_error
noise_totals['added_logit_error'] = noise_totals.logit_error - truncation.logit_error
noise_totals.to_csv(out_dir / 'noise_scale_errors.csv', index=False)
fig = plots.plot_noise_errors(noise_totals)
plots.save_figure(fig, out_dir / 'noise_scale_errors')
plt.show()
noise_totals.round(5)
"""),
    ('md', "## Noise scale: validation accuracy after fine-tuning (run records)"),
    ('code', """
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
"""),
    ('md', """
## The default alpha

`toukit.DEFAULT_NOISE_SCALE` is the value this study supports; the reasoning, with the measured numbers,
is in the README's "Noise scale" section.
"""),
]

NOTEBOOKS['figures.ipynb'] = [
    ('md', """
# Every figure and table from run records

Reads run records only (no training) and the sweep's manifest (`<preset>.sweep.json`, written by `toukit sweep`):

- the learning-rate sweep (validation accuracy vs learning rate per method, the chosen rate ringed);
- for each protocol, *tuned* (each method at its own best validation rate) and *paper* (every method at the
  paper's shared constant rate): Table 1 (CSV, Markdown, LaTeX; test accuracy mean ± std over seeds) and
  Figure 2 (training loss over steps and validation accuracy per epoch, mean and min-max band over seeds);
- the verdicts on the paper's claims for both protocols, with 95% confidence intervals (`toukit.claims`);
- the paper protocol's numbers next to the paper's as ratios to FT, and the cost bars.
"""),
    ('code', IMPORTS + """from toukit import claims, sweep
"""),
    ('parameters', """
results_dir: str = "results"  # run records
figures_dir: str = "figures"  # outputs go under figures_dir/preset
preset: str = "demo"  # which preset's runs
smooth: int = 10  # moving-average window of the loss curves
n_boot: int = 4000  # bootstrap replicates of the accuracy claims
"""),
    ('code', """
out_dir = Path(figures_dir) / preset
out_dir.mkdir(parents=True, exist_ok=True)
runs = results.load_runs(results_dir)
runs = runs[runs.preset == preset]
manifest_path = sweep.manifest_path(results_dir, preset)
manifest = results.read_record(manifest_path) if manifest_path.exists() else {}
protocols = {p: results.with_protocol(runs, p) for p in sweep.PROTOCOLS}
print(f'{len(runs)} records for preset {preset!r}; successful runs per protocol: '
      f'{ {p: len(r) for p, r in protocols.items()} }; chosen rates: {manifest.get("selected_lr", {})}; '
      f'skipped files: {runs.attrs.get("skipped", [])}')
"""),
    ('md', "## The learning-rate sweep (seed 0; validation accuracy, which alone chooses)"),
    ('code', """
grid = protocols['grid']
if len(grid):
    fig = plots.plot_lr_sweep(grid, manifest.get('selected_lr'))
    plots.save_figure(fig, out_dir / 'lr_sweep')
    plt.show()
    sweep_table = grid.pivot_table(index='method', columns='lr', values='val_accuracy', sort=False) * 100
    sweep_table.index = sweep_table.index.map(plots.method_label)
    results.write_tables(sweep_table.round(2).reset_index(names='Method'), out_dir / 'lr_sweep')
    display(sweep_table.round(2))
"""),
    ('md', """
## Table 1 and Figure 2 for each protocol

*tuned*: each method at its own learning rate chosen on validation. *paper*: every method at the paper's shared
constant rate. Accuracy is on the test split, mean ± std over seeds; time is training time (evaluation and data
waiting excluded); training memory is what the training steps add above the model at rest (see the README).
"""),
    ('code', """
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
"""),
    ('code', """
for protocol in tables:
    records = results.records_by_method(protocols[protocol])
    fig = plots.training_curves({plots.method_label(m): r for m, r in records.items()}, smooth=smooth)
    fig.suptitle(f'{protocol} protocol', y=1.02)
    plots.save_figure(fig, out_dir / f'figure2_{protocol}')
    plt.show()
"""),
    ('md', "## The paper's claims, for both protocols"),
    ('code', """
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
    (out_dir / 'claims.md').write_text(shown.to_markdown(index=False) + '\\n')
    display(shown)
"""),
    ('md', "The paper protocol next to the paper (different model and data: compare ratios to FT, not absolutes)."),
    ('code', """
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
    side.index = side.index.map(plots.method_label)
    results.write_tables(side.reset_index(names='Method'), out_dir / 'table1_vs_paper')
    display(side)
"""),
    ('code', """
if 'tuned' in tables:
    fig = plots.plot_costs(tables['tuned'])
    plots.save_figure(fig, out_dir / 'method_costs')
    plt.show()
"""),
]


if __name__ == '__main__':
    import sys
    names = sys.argv[1:] or list(NOTEBOOKS)
    for name in names:
        nbformat.write(notebook(NOTEBOOKS[name]), HERE / name)
        print('wrote', HERE / name)
