"""Every notebook headless with tiny parameters, through the one command that regenerates the figures."""
import json
import shutil

import pandas as pd
import pytest

from toukit import cli, lr_choice, results
from toukit.notebooks import run_notebook

pytestmark = pytest.mark.notebook
GRID = {'lora': [1e-3], 'tou': [1e-4, 1e-3]}


@pytest.fixture(scope='module')
def reproduced(tmp_path_factory):
    root = tmp_path_factory.mktemp('reproduce')
    cli.reproduce(preset='test', methods=['lora', 'tou'], seeds=[0, 1], grid=GRID, noise_scales=[0.0, 0.01],
                  results_dir=str(root / 'results'), figures_dir=str(root / 'figures'),
                  overrides=dict(max_steps_per_epoch=2, epochs=1), cwd=str(root), rank_budgets=[1.0],
                  analysis_parameters={'reconstruction.ipynb': dict(ranks=[0.25, 0.5], noise_scales=[0.0, 0.01, 0.1],
                                                                    batch_size=4)})
    return root


def test_reproduce_writes_records_for_every_run(reproduced):
    runs = results.load_runs(reproduced / 'results')
    assert (runs.status == 'ok').all()
    for protocol in ('tuned', 'paper'):
        chosen = results.with_protocol(runs, protocol)
        assert sorted(chosen.method) == ['lora', 'lora', 'tou', 'tou'], protocol
        assert sorted(chosen.seed) == [0, 0, 1, 1]
    assert len(results.with_protocol(runs, 'grid')) == 3
    noise = runs[runs.protocol == '']
    assert sorted(noise.noise_scale) == [0.0, 0.01] and set(noise.method) == {'tou'}
    manifest = results.read_manifest(reproduced / 'results' / 'test.sweep.json')  # the runner_up stage ran where
    margins = lr_choice.lr_margins(manifest, runs)  # the choice is close, and only there
    assert margins.method.tolist() == ['tou']  # LoRA's grid has one rate: no runner-up
    assert set(manifest['runs']['runner_up']) == set(margins.method[margins.close])
    for method, ids in manifest['runs']['runner_up'].items():
        assert set(runs.set_index('run_id').status[ids]) == {'ok'} and len(ids) == 2
    study = runs[runs.protocol.str.contains('ranks')]
    assert len(study) == 4 * 2 and set(study.lr) == {results.with_protocol(runs, 'tuned').query('method == "tou"').lr.iloc[0]}


def test_figures_and_tables_written(reproduced):
    out = reproduced / 'figures' / 'test'
    for stem in ['spectrum_singular_values', 'spectrum_energy_curves', 'spectrum_rank_heatmap',
                 'spectrum_stable_effective_rank', 'rank_policy_tradeoff', 'reconstruction_weight_error',
                 'reconstruction_output_error', 'noise_scale_errors', 'noise_scale_accuracy',
                 'lr_sweep', 'figure2_tuned', 'figure2_paper', 'method_costs', 'update_left_energy_tuned',
                 'update_right_energy_tuned', 'update_effective_rank_tuned', 'update_size_tuned',
                 'update_similarity_tuned']:
        for ext in ('png', 'pdf'):
            assert (out / f'{stem}.{ext}').stat().st_size > 1000, f'{stem}.{ext}'
    assert (out / 'rank_pareto.png').stat().st_size > 1000
    trained = pd.read_csv(out / 'rank_study.csv')
    assert len(trained) == 4 and (trained.seeds == 2).all() and trained.beats_uniform.isna().sum() == 1
    for ext in ('csv', 'md', 'tex'):
        for stem in ('table1_tuned', 'table1_paper', 'table1_vs_paper', 'lr_sweep'):
            assert (out / f'{stem}.{ext}').exists(), f'{stem}.{ext}'
    medians = pd.read_csv(out / 'updates_tuned.csv').set_index(['method', 'kind'])
    assert set(medians.index.get_level_values(0)) == {'LoRA', 'Full TOU'}
    assert (medians.loc['Full TOU'].relative_update > 0).all() and medians.loc[('LoRA', 'mlp'), 'relative_update'] == 0
    assert medians.loc[('LoRA', 'attention'), 'relative_update'] > 0  # LoRA changes attention only
    own = pd.read_csv(out / 'updates_own_tuned.csv').set_index(['method', 'kind'])
    assert ('LoRA', 'mlp') not in own.index  # the layers a method changed only
    lora = ('LoRA', 'attention')  # its dW from W_0 is its own, the unchanged matrices left out: no smaller median
    assert own.loc[lora, 'relative_update'] >= medians.loc[lora, 'relative_update'] > 0
    for kind in ('attention', 'mlp'):  # TOU's own update leaves out the truncation that dW from W_0 includes
        assert 0 < own.loc[('Full TOU', kind), 'relative_update'] < medians.loc[('Full TOU', kind), 'relative_update']
        assert pd.isna(own.loc[('Full TOU', kind), 'amplification'])  # no start_* twin: not shown
    for protocol in ('tuned', 'paper'):
        table = pd.read_csv(out / f'table1_{protocol}.csv')
        assert table.Method.tolist() == ['LoRA', 'Full TOU'] and (table.Seeds == 2).all()
    verdicts = pd.read_csv(out / 'claims.csv')
    assert set(verdicts.protocol) == {'tuned', 'paper'} and set(verdicts.claim) == set('abcdef')
    assert 'holds' in (out / 'claims.md').read_text() or 'undecided' in (out / 'claims.md').read_text()
    noise = pd.read_csv(out / 'noise_scale_errors.csv')
    assert (noise.weight_error.diff().dropna() >= -1e-9).all(), 'more noise, more weight error'
    policies = pd.read_csv(out / 'rank_policies.csv')
    assert {'fixed', 'fraction', 'energy', 'budget', 'ght'} == set(policies.kind)


def test_figures_notebook_pools_the_claims_of_two_tasks(reproduced, tmp_path):
    """The reproduced runs again as a second preset (run ids and preset renamed, its own manifest): the figures
    notebook pools each claim over both, writes the tables and a forest plot per protocol, and the pooled
    difference of two identical tasks is each task's."""
    shutil.copytree(reproduced / 'results', tmp_path / 'results', ignore=shutil.ignore_patterns('notebooks'))
    for path in (reproduced / 'results').glob('*.json'):
        record = json.loads(path.read_text())
        if path.name.endswith('.ranks.sweep.json'):
            continue
        if path.name.endswith('.sweep.json'):
            record['preset'] = 'twin'
            record['runs'] = {p: {m: [f'{i}-twin' for i in ids] for m, ids in by_method.items()}
                              for p, by_method in record['runs'].items()}
            (tmp_path / 'results' / 'twin.sweep.json').write_text(json.dumps(record))
        else:
            record['run']['id'] += '-twin'
            record['run']['config']['preset'] = 'twin'
            (tmp_path / 'results' / f'twin_{path.name}').write_text(json.dumps(record))
    run_notebook('figures.ipynb', tmp_path / 'figures.ipynb', dict(results_dir=str(tmp_path / 'results'),
                 figures_dir=str(tmp_path / 'figures'), preset='test', n_boot=200), cwd=tmp_path, progress=False)
    pooled = pd.read_csv(tmp_path / 'figures' / 'pooled_claims.csv')
    assert set(pooled.protocol) == {'tuned', 'paper'} and set(pooled.task) == {'test', 'twin', 'pooled'}
    c = pooled[(pooled.claim == 'c')].set_index(['protocol', 'task'])  # Full TOU - LoRA: both methods ran
    for protocol in ('tuned', 'paper'):
        assert c.loc[(protocol, 'pooled'), 'n_tasks'] == 2
        assert c.loc[(protocol, 'pooled'), 'measured'] == pytest.approx(c.loc[(protocol, 'test'), 'measured'],
                                                                         abs=1e-4)
        assert c.loc[(protocol, 'test'), 'verdict'] == c.loc[(protocol, 'twin'), 'verdict']
        assert (tmp_path / 'figures' / f'claims_forest_{protocol}.png').stat().st_size > 1000
    merge = pooled[(pooled.claim == 'f') & (pooled.task == 'pooled')]
    assert len(merge) == 2 and (merge.n_tasks == 2).all()
    summary = (tmp_path / 'figures' / 'pooled_summary.md').read_text()
    assert summary.count('| tuned ') == summary.count('| paper ') == pooled.statement.nunique()
    table = pd.read_csv(tmp_path / 'figures' / 'methods_table.csv')
    table = table.set_index(['protocol', 'method', 'task']).sort_index()
    assert table.loc[('tuned', 'tou', 'pooled'), 'n_tasks'] == 2 and table.loc[('tuned', 'tou', 'test'), 'seeds'] == 2
    assert table.loc[('tuned', 'tou', 'pooled'), 'test_accuracy'] == pytest.approx(
        table.loc[('tuned', 'tou', 'test'), 'test_accuracy'], abs=1e-4)
    assert (table.loc[('tuned', 'dora')].seeds == 0).all()  # registered, never run: a row that says so
    assert 'not measured' in (tmp_path / 'figures' / 'methods_table.md').read_text()
    gaps = pd.read_csv(tmp_path / 'figures' / 'gap_decomposition.csv')  # no ablation runs: nothing measured
    assert set(gaps.protocol) == {'tuned', 'paper'} and (gaps.seeds == 0).all()
    assert 'not measured' in (tmp_path / 'figures' / 'gap_decomposition.md').read_text()
    assert not (tmp_path / 'figures' / 'gap_decomposition.png').exists()
    assert (tmp_path / 'figures' / 'diverged_runs.md').read_text() == 'no run diverged\n'
    for protocol in ('tuned', 'paper'):
        wide = (tmp_path / 'figures' / f'methods_accuracy_{protocol}.md').read_text()
        assert '| Method ' in wide and '| test ' in wide and '| twin ' in wide and '| pooled ' in wide
        assert (tmp_path / 'figures' / f'methods_accuracy_{protocol}.png').stat().st_size > 1000
        family = (tmp_path / 'figures' / f'svd_family_{protocol}.md').read_text()  # no SVD-family runs here
        assert '| PiSSA - LoRA ' in family and 'MiCA - PiSSA' in family and family.count('not measured') == 28
    margins = pd.read_csv(tmp_path / 'figures' / 'lr_margins.csv')  # one grid with two rates: TOU's, on each task
    assert margins.method.tolist() == ['tou', 'tou'] and set(margins.preset) == {'test', 'twin'}
    both = pd.read_csv(tmp_path / 'figures' / 'claims_both_ways.csv')
    assert set(both.choice) == {'chosen', 'runner-up'} and set(both.task) == {'test', 'twin', 'pooled'}
    runner_up = both[(both.choice == 'runner-up') & (both.claim == 'c') & (both.task == 'test')]
    assert len(runner_up) == 1
    assert runner_up.rates.str.contains('(runner-up)', regex=False).all() == bool(margins.close.iloc[0])
    assert (tmp_path / 'figures' / 'gap_decomposition_runner_up.md').exists()
    layers = pd.read_csv(tmp_path / 'figures' / 'update_by_layer_type.csv')
    measured = layers[layers.status == 'measured']
    assert set(measured.method) == {'lora', 'tou'} and set(measured.task) == {'test', 'twin'}
    assert {'q', 'k', 'v', 'attention output', 'mlp in', 'mlp out'} <= set(layers.role)
    assert (layers[(layers.method == 'lora') & layers.role.str.startswith('mlp')].status == 'not changed').all()


def test_reproduce_skips_successful_runs(reproduced, capsys):
    """The same reproduce call again (rank study included) makes no run: no record is new or rewritten."""
    def records():
        return {p: p.stat().st_mtime for p in (reproduced / 'results').glob('*.json')
                if not p.name.endswith('.sweep.json')}  # the manifests say when they were last read
    before = records()
    cli.reproduce(preset='test', methods=['lora', 'tou'], seeds=[0, 1], grid=GRID, noise_scales=[0.0, 0.01],
                  results_dir=str(reproduced / 'results'), figures_dir=str(reproduced / 'figures'), analysis=False,
                  overrides=dict(max_steps_per_epoch=2, epochs=1), cwd=str(reproduced), rank_budgets=[1.0])
    assert records() == before
    assert capsys.readouterr().out.count('skip ') == 2  # the noise runs; the sweep skips silently


def test_noise_runs_and_bad_methods():
    runs = cli.noise_runs('demo', 0, [0.0, 1e-3, 1e-2])
    assert [r['noise_scale'] for r in runs] == [0.0, 1e-2]  # the default alpha's point is the paper protocol's run
    with pytest.raises(ValueError, match="methods=\\['nope'\\]"):
        cli.reproduce(methods=['nope'])
