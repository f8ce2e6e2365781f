"""FactorizedLinear (frozen A, trainable B in one module) under FSDP2 on two CPU ranks (gloo)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

import toukit
from fsdp_worker import build, train


def test_tou_trains_under_fsdp_and_merges_from_gathered_weights(tmp_path):
    out = tmp_path / 'fsdp.pt'
    done = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2',
                           str(Path(__file__).with_name('fsdp_worker.py')), str(out)], capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS='1'), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = torch.load(out)
    reference = build()
    expected = train(reference)  # one process, the same batch: FSDP's averaged gradients are the same
    assert result['losses'] == pytest.approx(expected, abs=1e-5)
    toukit.merge(reference)
    original = timm.create_model('test_vit', num_classes=4)
    original.load_state_dict(result['merged'], strict=True)  # the original architecture
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(result['merged'][name], value, rtol=1e-4, atol=1e-5)
