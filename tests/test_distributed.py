"""The training loop on several processes (torchrun, gloo on the CPU) through accelerate."""
import json
import os
import subprocess
import sys

import pytest

ARGS = ['--method', 'tou', '--preset', 'test', '--epochs', '1', '--max-steps-per-epoch', '6', '--quiet']


def _torchrun(results, *extra, n=2):
    env = dict(os.environ, OMP_NUM_THREADS='1')
    return subprocess.run([sys.executable, '-m', 'torch.distributed.run', f'--nproc_per_node={n}', '-m', 'toukit.cli',
                           'train', *ARGS, '--results-dir', str(results), *extra], capture_output=True, text=True,
                          env=env, timeout=600)


def test_two_processes_match_one_at_the_same_global_batch(tmp_path):
    from toukit import cli
    cli.main(['train', *ARGS, '--results-dir', str(tmp_path / 'one')])
    done = _torchrun(tmp_path / 'two')
    assert done.returncode == 0, done.stderr[-3000:]
    [one] = [json.loads(p.read_text()) for p in (tmp_path / 'one').glob('*.json')]
    two_files = list((tmp_path / 'two').glob('*.json'))
    assert len(two_files) == 1  # only rank 0 writes
    two = json.loads(two_files[0].read_text())
    assert two['run']['id'] == one['run']['id']
    # the same global batches, gradients averaged over the two halves: equal up to float summation order
    assert [s['loss'] for s in two['metrics']['steps']] == pytest.approx([s['loss'] for s in one['metrics']['steps']],
                                                                         abs=1e-5)
    assert two['metrics']['epochs'][0]['val_loss'] == pytest.approx(one['metrics']['epochs'][0]['val_loss'], abs=1e-5)
    assert two['metrics']['final']['test_predictions'] == one['metrics']['final']['test_predictions']
    assert two['metrics']['final']['merged_test_accuracy'] == one['metrics']['final']['merged_test_accuracy']


def test_a_world_size_that_does_not_divide_the_batch_is_refused(tmp_path):
    done = _torchrun(tmp_path, '--batch-size', '15')
    assert done.returncode != 0
    assert 'batch_size=15 does not split over 2 processes' in done.stdout + done.stderr
