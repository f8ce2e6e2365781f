"""Every notebook headless with tiny parameters, through the one command that regenerates the figures."""
import json
from pathlib import Path

import pandas as pd
import pytest

from toukit import cli, results

pytestmark = pytest.mark.notebook


@pytest.fixture(scope='module')
def reproduced(tmp_path_factory):
    root = tmp_path_factory.mktemp('reproduce')
    cli.reproduce(preset='test', methods=['lora', 'tou'], noise_scales=[0.0, 0.01], results_dir=str(root / 'results'),
                  figures_dir=str(root / 'figures'), extra=dict(max_steps_per_epoch=2), cwd=str(root),
                  analysis_parameters={'reconstruction.ipynb': dict(ranks=[0.25, 0.5], noise_scales=[0.0, 0.01, 0.1],
                                                                    batch_size=4)})
    return root


def test_reproduce_writes_records_for_every_run(reproduced):
    runs = results.load_runs(reproduced / 'results')
    assert sorted(runs.run_id) == ['test_lora_s0', 'test_tou_noise0.01_s0', 'test_tou_noise0_s0', 'test_tou_s0']
    assert (runs.status == 'ok').all()
    assert sorted(runs.noise_scale[runs.method == 'tou']) == [0.0, 0.001, 0.01]


def test_figures_and_tables_written(reproduced):
    out = reproduced / 'figures' / 'test'
    for stem in ['spectrum_singular_values', 'spectrum_energy_curves', 'spectrum_rank_heatmap',
                 'spectrum_stable_effective_rank', 'rank_policy_tradeoff', 'reconstruction_weight_error',
                 'reconstruction_output_error', 'noise_scale_errors', 'noise_scale_accuracy',
                 'figure2_training_curves', 'figure2_paper_methods', 'method_costs']:
        for ext in ('png', 'pdf'):
            assert (out / f'{stem}.{ext}').stat().st_size > 1000, f'{stem}.{ext}'
    for ext in ('csv', 'md', 'tex'):
        assert (out / f'table1.{ext}').exists() and (out / f'table1_vs_paper.{ext}').exists()
    table = pd.read_csv(out / 'table1.csv')
    assert table.Method.tolist() == ['LoRA', 'Full TOU']
    noise = pd.read_csv(out / 'noise_scale_errors.csv')
    assert (noise.weight_error.diff().dropna() >= -1e-9).all(), 'more noise, more weight error'
    policies = pd.read_csv(out / 'rank_policies.csv')
    assert {'fixed', 'fraction', 'energy'} == set(policies.kind)


def test_reproduce_skips_successful_runs(reproduced, capsys):
    before = {p: p.stat().st_mtime for p in (reproduced / 'results').glob('*.json')}
    cli.reproduce(preset='test', methods=['lora', 'tou'], noise_scales=[0.0, 0.01],
                  results_dir=str(reproduced / 'results'), figures_dir=str(reproduced / 'figures'), analysis=False,
                  cwd=str(reproduced))
    assert {p: p.stat().st_mtime for p in before} == before
    assert capsys.readouterr().out.count('skip ') == 4


def test_planned_runs_and_bad_methods():
    runs = cli.planned_runs('demo', ['ft', 'tou'], [0, 1], [0.0, 1e-3, 1e-2])
    names = [r['run_name'] for r in runs]
    assert names == ['demo_ft_s0', 'demo_tou_s0', 'demo_ft_s1', 'demo_tou_s1', 'demo_tou_noise0_s0',
                     'demo_tou_noise0.01_s0']  # the default alpha's point is the plain tou run
    with pytest.raises(ValueError, match="methods=\\['nope'\\]"):
        cli.reproduce(methods=['nope'])
