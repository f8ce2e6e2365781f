"""Figures from tables and run records; no computation beyond smoothing for display."""
from pathlib import Path
from typing import Dict, Iterable, Optional, Sequence, Union

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

__all__ = ['training_curves', 'save_figure', 'METHOD_ORDER', 'method_label']

METHOD_ORDER = ['ft', 'lora', 'pissa', 'tou', 'tou_frozen_ffn', 'svfit', 'delora', 'bitfit']
METHOD_LABELS = {'ft': 'FT', 'lora': 'LoRA', 'pissa': 'PiSSA', 'tou': 'Full TOU', 'tou_frozen_ffn': 'TOU frozen FFN',
                 'svfit': 'SVFit', 'delora': 'DeLoRA', 'bitfit': 'BitFit'}


def method_label(method: str) -> str:
    return METHOD_LABELS.get(method, method)


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
    """Save `fig` as path.png and path.pdf (parents created); returns the files written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for fmt in formats:
        out = path.with_suffix(f'.{fmt}')
        fig.savefig(out, dpi=150, bbox_inches='tight')
        written.append(out)
    return written
