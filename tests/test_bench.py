"""The benchmark script's measurements run and report what BENCHMARKS.md reads from them (tiny shapes: this
checks the tooling, not the numbers)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / 'benchmarks' / 'bench.py'


def _bench(tmp_path, *argv):
    out = tmp_path / 'out.json'
    done = subprocess.run([sys.executable, str(BENCH), *argv, '--json', str(out)], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout, json.loads(out.read_text())['results']


def test_profile_counts_fewer_matmul_flops_for_tou_than_ft(tmp_path):
    stdout, res = _bench(tmp_path, 'profile', '--model', 'test_vit', '--batch-size', '4', '--warmup', '1',
                         '--steps', '1', '--precision', 'bf16', '--rank', '4')
    rows = res['rows']
    assert set(rows) == {'ft', 'tou'}
    for m in rows.values():
        assert m['gemms']['calls'] > 0 and m['gemms']['flops'] > 0 and m['gemms']['roofline_s'] > 0
        assert any(op.startswith('aten::') for op in m['ops'])
    # rank 4 of test_vit's width 64: TOU's products are a fraction of FT's (the head and the attention are shared)
    assert rows['tou']['gemms']['flops'] < rows['ft']['gemms']['flops']
    assert 'roofline' in stdout and 'top operators of tou' in stdout


@pytest.mark.parametrize('chunk', [None, 2])
def test_factorize_llm_reports_peak_over_weights(tmp_path, chunk):
    argv = ['factorize-llm', '--shape', 'llama-1.1b', '--layers', '2', '--width-div', '16', '--svd-methods', 'gram']
    stdout, res = _bench(tmp_path, *argv, *(['--chunk', str(chunk)] if chunk else []))
    row = res['gram']
    assert row['config']['hidden_size'] == 2048 // 16 and row['config']['num_key_value_heads'] == 4
    assert 0 < row['weights_mib'] < row['peak_mib']  # the peak counts the weights themselves
    assert all(e['error'] / e['optimal_error'] < 1.1 for e in row['layer0'])
    assert 'peak/weights' in stdout


def test_svfit_floor_times_old_new_and_ft_on_the_same_outputs(tmp_path):
    out = tmp_path / 'svfit.json'
    script = BENCH.parent / 'svfit_floor.py'
    done = subprocess.run([sys.executable, str(script), '--model', 'tiny-bert', '--batch-size', '4', '--seq-len', '16',
                           '--warmup', '0', '--rounds', '1', '--json', str(out)], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    res = json.loads(out.read_text())
    assert set(res['ms_per_step']) == {'old', 'new', 'ft'} and res['formed'] == res['layers'] > 0
    assert res['max_logit_diff'] < 1e-5 and res['max_grad_diff'] < 1e-6
    assert 'new / old' in done.stdout and 'max |logits difference|' in done.stdout
