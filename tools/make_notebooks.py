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
with the method, train with AdamW at a constant learning rate, validate every epoch, merge back into the original
architecture, and write a run record under `results_dir`. `papermill --help-notebook notebooks/train.ipynb` lists
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
method: str = "tou"  # ft, lora, pissa, tou, tou_frozen_ffn, svfit, delora or bitfit
preset: str = "demo"  # demo (MiniLM on BBC News, CPU), paper (ViT-B/16 on CIFAR-100, GPU) or test
model: str = None  # None: the preset's; 'minilm', 'tiny-bert' or a timm model name
dataset: str = None  # None: the preset's; bbc, cifar100, fashion_mnist or synthetic
rank: str = None  # None: the preset's for this method; an int, a fraction of min(out, in) or 'energy:0.9'
noise_scale: float = None  # TOU's alpha; None: toukit.DEFAULT_NOISE_SCALE
targets: str = None  # None: the method's; 'all', 'attention', 'mlp' or a list of module-name patterns
epochs: int = None  # None: the preset's
batch_size: int = None  # None: the preset's
lr: float = None  # None: the preset's (the paper's constant 5e-5)
seed: int = 0  # seeds the model head, the split, the shuffling and the noise
max_length: int = None  # tokens per text; None: the preset's
train_limit: int = None  # keep only this many training examples (quick runs)
val_limit: int = None  # keep only this many validation examples
max_steps_per_epoch: int = None  # stop each epoch early (quick runs)
pretrained: bool = None  # None: the preset's
checkpoint: str = None  # local weights file for the model
device: str = "auto"  # auto, cpu or cuda
precision: str = "fp32"  # fp32 or bf16 (autocast)
results_dir: str = "results"  # where the run record goes
run_name: str = None  # None: {preset}_{method}_s{seed}
save_weights: bool = False  # also write the merged model's weights (safetensors)
"""),
    ('code', """
config = train.resolve_config(train.TrainConfig(
    method=method, preset=preset, model=model, dataset=dataset,
    rank=rank, noise_scale=noise_scale, targets=targets, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
    max_length=max_length, train_limit=train_limit, val_limit=val_limit, max_steps_per_epoch=max_steps_per_epoch,
    pretrained=pretrained, checkpoint=checkpoint, device=device, precision=precision, results_dir=results_dir,
    run_name=run_name, save_weights=save_weights))
pd.Series({k: v for k, v in vars(config).items()}, dtype=object).to_frame('value')
"""),
    ('code', """
record = train.run(config)
print('record written to', config.record_path)
"""),
    ('code', """
summary = results.load_runs(config.record_path)
summary[['method', 'val_accuracy', 'merged_val_accuracy', 'trainable_params', 'total_params', 'train_seconds',
         'factorize_seconds', 'peak_memory_mib', 'memory_kind']]
"""),
    ('code', """
results.history(record)
"""),
    ('code', """
fig = plots.training_curves({plots.method_label(method): record}, smooth=5)
plt.show()
"""),
]

if __name__ == '__main__':
    import sys
    names = sys.argv[1:] or list(NOTEBOOKS)
    for name in names:
        nbformat.write(notebook(NOTEBOOKS[name]), HERE / name)
        print('wrote', HERE / name)
