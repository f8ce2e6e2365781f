"""The comparison machinery: learning-rate selection on validation only, protocols, claims with intervals."""
import json

import numpy as np
import pandas as pd
import pytest

import toukit
from toukit import claims, results, sweep


def _record(val, test):
    return {'metrics': {'final': {'val_accuracy': val, 'test_accuracy': test}}}


def test_select_lr_reads_validation_never_test():
    records = {1e-4: _record(0.80, 0.99), 1e-3: _record(0.90, 0.10), 1e-2: _record(0.85, 0.95)}
    assert sweep.select_lr(records) == 1e-3
    # a test accuracy that would change the choice changes nothing; a validation one does
    assert sweep.select_lr({**records, 1e-3: _record(0.90, 1.0)}) == 1e-3
    assert sweep.select_lr({**records, 1e-2: _record(0.95, 0.0)}) == 1e-2
    assert sweep.select_lr({1e-4: _record(0.9, 0), 1e-3: _record(0.9, 1)}) == 1e-4  # ties: the first rate
    assert sweep.select_lr({1e-4: _record(0.9, 0), 1e-3: None}) is None  # not before the whole grid is in


@pytest.mark.parametrize('grid, match', [
    ({}, 'non-empty'), ({'ft': []}, 'empty'), ({'ft': [0.0]}, 'lr=0.0'), ({'ft': [-1e-3]}, 'lr=-0.001'),
    ({'nope': [1e-3]}, "method='nope'"), ({'ft': ['1e-3']}, "lr='1e-3'"), ({'ft': [True]}, 'lr=True')])
def test_bad_grids_are_refused(grid, match):
    with pytest.raises(ValueError, match=match):
        sweep.check_grid(grid)


@pytest.mark.parametrize('seeds, match', [([], 'seeds'), ([0, 1.5], 'seeds'), (['0'], 'seeds'), ([1, 1], 'repeated')])
def test_bad_seeds_are_refused(seeds, match):
    with pytest.raises(ValueError, match=match):
        sweep.plan('test', ['ft'], seeds)


def test_plan_names_the_runs_of_each_protocol(tmp_path):
    manifest = sweep.plan('test', ['ft', 'lora'], [0, 1, 2], grid={'ft': [1e-3, 1e-4], 'lora': [1e-3]},
                          results_dir=str(tmp_path))
    assert manifest['grid'] == {'ft': [1e-4, 1e-3], 'lora': [1e-3]}
    assert [len(manifest['runs']['grid'][m]) for m in ('ft', 'lora')] == [2, 1]
    assert manifest['runs']['tuned'] == {} and manifest['selected_lr'] == {}  # no grid record yet
    paper = manifest['runs']['paper']['ft']
    assert len(paper) == 3 and all(f'_lr{manifest["paper_lr"]:g}_' in i for i in paper)
    assert paper[0] in manifest['runs']['grid']['ft']  # the test preset's shared rate is in this grid: one run
    with pytest.raises(ValueError, match="'lr' is set by the sweep"):
        sweep.plan('test', ['ft'], overrides={'lr': 1e-3})
    with pytest.raises(ValueError, match="'nope' is not a training parameter"):
        sweep.plan('test', ['ft'], overrides={'nope': 1})


@pytest.mark.notebook
def test_tiny_sweep_picks_best_validation_rate_and_resumes(tmp_path):
    grid = {'tou': [1e-5, 1e-3]}
    manifest = sweep.sweep('test', ['tou'], [0, 1], grid=grid, results_dir=str(tmp_path),
                           overrides=dict(epochs=1, max_steps_per_epoch=4), progress=False)
    runs = toukit.load_runs(tmp_path)
    grid_runs = results.with_protocol(runs, 'grid').set_index('lr')
    assert manifest['selected_lr']['tou'] == grid_runs.val_accuracy.idxmax()
    tuned = results.with_protocol(runs, 'tuned')
    assert sorted(tuned.seed) == [0, 1] and set(tuned.lr) == {manifest['selected_lr']['tou']}
    assert set(results.with_protocol(runs, 'paper').lr) == {1e-3}
    ids = {i for by_method in manifest['runs'].values() for ids in by_method.values() for i in ids}
    assert len(runs) == len(ids) < 2 + 2 + 2  # runs shared between protocols run once
    assert json.loads((tmp_path / 'test.sweep.json').read_text())['selected_lr'] == manifest['selected_lr']
    # an interrupted sweep picks up where it stopped: remove one record, only that run happens again
    victim = tuned[tuned.seed == 1].path.iloc[0]
    mtimes = {p: p.stat().st_mtime for p in tmp_path.glob('*_s?_*.json') if str(p) != victim}
    (tmp_path / victim).unlink()
    sweep.sweep('test', ['tou'], [0, 1], grid=grid, results_dir=str(tmp_path),
                overrides=dict(epochs=1, max_steps_per_epoch=4), progress=False)
    assert (tmp_path / victim).exists()
    assert {p: p.stat().st_mtime for p in mtimes} == mtimes


@pytest.mark.notebook
def test_sweep_workers_share_a_results_folder(tmp_path):
    """A run another worker holds is skipped: one on another host is left to it, one of this host is waited for."""
    import subprocess
    import sys
    kw = dict(grid={'tou': [1e-4, 1e-3]}, results_dir=str(tmp_path), stages=('grid',), progress=False,
              overrides=dict(epochs=1, max_steps_per_epoch=2), poll_seconds=0.5)
    first, second = (c.record_path for c in sweep.plan('test', ['tou'], [0], kw['grid'], str(tmp_path),
                                                       kw['overrides'])['configs'].values())
    def hold(seconds, host=None):  # a worker process that holds the run's lock (as another host's, if given)
        rewrite = (f'open({str(first.with_suffix(".lock"))!r}, "w").write(json.dumps(dict(host={host!r}, pid=1)))'
                   if host else 'pass')
        code = (f'import json, time; from toukit.runstate import RunLock\n'
                f'with RunLock({str(first)!r}):\n    {rewrite}\n    print("locked", flush=True)\n'
                f'    time.sleep({seconds})')
        worker = subprocess.Popen([sys.executable, '-c', code], stdout=subprocess.PIPE, text=True)
        assert worker.stdout.readline().strip() == 'locked'
        return worker

    elsewhere = hold(60, host='elsewhere')
    try:
        sweep.sweep('test', ['tou'], [0], **kw)
        assert not first.exists() and second.exists()  # no failure raised, no record written for the held run
    finally:
        elsewhere.kill()
        elsewhere.wait()
    local = hold(3)  # a live local worker that dies without finishing its run
    sweep.sweep('test', ['tou'], [0], **kw)
    assert local.poll() is not None and json.loads(first.read_text())['status'] == 'ok'


def test_rank_study_plan_on_the_demo(tmp_path):
    specs = sweep.study_specs('demo', [0.5, 1.0])
    manifest = sweep.rank_plan('demo', [0.5, 1.0], [0, 1], lr=5e-5, results_dir=str(tmp_path), specs=specs)
    assert list(manifest['runs']['ranks']) == [f'{p} @ {b}' for b in ('0.5', '1') for p in toukit.ranks.BUDGET_POLICIES]
    assert len(manifest['configs']) == 16 and len(set(manifest['configs'])) == 16
    # budget 1.0's uniform runs are the plain TOU runs at that rate: run once, shared with the sweep's protocols
    plain = sweep.plan('demo', ['tou'], [0, 1], results_dir=str(tmp_path))['runs']['paper']['tou']
    assert manifest['runs']['ranks']['uniform @ 1'] == plain
    calibrated = [n for n, p in manifest['parameters'].items() if 'calibration_batches' in p]
    assert {manifest['policies'][n]['policy'] for n in calibrated} == {'budget (activations)'}
    energy = specs[0.5]['energy threshold'][0]
    assert energy.startswith('energy:') and len(energy) <= len('energy:0.1234')  # a short, stable run id
    assert sweep.study_specs('demo', [0.5]) == {0.5: specs[0.5]}
    # a study's manifest fixes its specs: every worker plans the same runs
    sweep._write_manifest(dict(manifest, specs=[dict(budget=0.5, policy='uniform', rank=0.2, calibrated=False)]),
                          str(tmp_path))
    reused = sweep.study_specs('demo', [0.5, 1.0], results_dir=str(tmp_path))
    assert reused[0.5] == {'uniform': (0.2, False)} and reused[1.0] == specs[1.0]
    other = sweep.study_specs('demo', [0.5], dict(targets='attention'), results_dir=str(tmp_path))
    assert other[0.5]['uniform'] != (0.2, False)  # another model or targets: the stored specs do not apply


@pytest.mark.parametrize('kwargs, match', [
    (dict(budgets=[0.0]), 'budget=0.0'), (dict(budgets=[]), 'budgets'), (dict(budgets=['1']), "budget='1'"),
    (dict(calibration_batches=0), 'calibration_batches=0'), (dict(overrides={'rank': 8}), "'rank' is set"),
    (dict(lr=None), 'lr=None'), (dict(budgets=[3.0]), 'budget=3.0'), (dict(budgets=[1.0, 1.0]), 'repeated'),
    (dict(overrides={'run_name': 'x'}), "'run_name' is set"), (dict(overrides={'nope': 1}), "'nope' is not")])
def test_rank_study_refuses_bad_input(tmp_path, kwargs, match):
    kwargs = dict(dict(budgets=[1.0], lr=1e-3, specs={1.0: {}}), **kwargs)
    with pytest.raises(ValueError, match=match):
        sweep.rank_plan('test', results_dir=str(tmp_path), **kwargs)


def test_rank_study_table_compares_each_policy_with_uniform():
    n = 400
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, n)
    records, rows, policies = {}, [], {}
    for policy, acc in (('uniform', 0.80), ('budget (weights)', 0.80), ('budget (activations)', 0.90)):
        for seed in (0, 1, 2):
            wrong = rng.random(n) > acc
            predictions = np.where(wrong, (labels + 1) % 4, labels)
            path = f'{policy}-{seed}'
            records[path] = {'metrics': {'final': {'test_predictions': predictions.tolist(),
                                                   'test_labels': labels.tolist()}}}
            policies[path] = dict(policy=policy, budget=1.0)
            rows.append(dict(run_id=path, status='ok', seed=seed, path=path, trainable_params=1000,
                             test_accuracy=float((predictions == labels).mean())))
    table = claims.rank_study_table(pd.DataFrame(rows), {'policies': policies}, n_boot=500, load=records.__getitem__)
    assert table.policy.tolist() == ['uniform', 'budget (weights)', 'budget (activations)']
    verdicts = dict(zip(table.policy, table.beats_uniform))
    assert verdicts == {'uniform': '', 'budget (weights)': 'undecided', 'budget (activations)': 'holds'}
    better = table.set_index('policy').loc['budget (activations)']
    assert 5 < better.vs_uniform < 15 and better.ci_low > 0 and (table.seeds == 3).all()


def _claims_runs(n=1000):
    """Runs with known outcomes on a test set of n examples: FT 95.0%, TOU 94.8%, TOU frozen FFN 80%, LoRA 70%."""
    labels = np.zeros(n, int)
    correct = {'ft': 950, 'tou': 948, 'tou_frozen_ffn': 800, 'lora': 700}
    seconds = {'ft': [30, 31, 33], 'tou': [10, 11, 12], 'tou_frozen_ffn': [9, 9, 9], 'lora': [20, 21, 22]}
    memory = {'ft': [50, 51, 52], 'tou': [100, 101, 102], 'tou_frozen_ffn': [1, 1, 1], 'lora': [100, 110, 90]}
    rows, records = [], {}
    for method, k in correct.items():
        for seed in range(3):
            predictions = np.where(np.arange(n) < k, 0, 1)  # the first k right: the methods agree where they can
            path = f'{method}_{seed}'
            records[path] = {'metrics': {'final': {'test_predictions': predictions.tolist(),
                                                   'test_labels': labels.tolist()}}}
            merged = method != 'ft'
            rows.append(dict(method=method, seed=seed, status='ok', path=path, test_accuracy=k / n,
                             merged_test_accuracy=k / n if merged else None, merge='merged' if merged else 'nothing',
                             train_seconds=seconds[method][seed], train_memory_mib=memory[method][seed]))
    return pd.DataFrame(rows), records


def test_claims_table_from_known_numbers():
    runs, records = _claims_runs()
    table = claims.claims_table(runs, n_boot=500, load=records.__getitem__).set_index('statement')
    a = table.loc['Full TOU is at most 1 point below FT']
    assert a.measured == pytest.approx(0.2) and a.ci_low >= 0 and a.ci_high < 1 and a.verdict == 'holds'
    assert table.loc['TOU frozen FFN is more accurate than LoRA'].verdict == 'holds'
    assert table.loc['Full TOU is more accurate than LoRA'].measured == pytest.approx(24.8)
    assert table.loc['Full TOU trains faster than LoRA'].verdict == 'holds'
    assert table.loc['Full TOU trains faster than FT'].measured == pytest.approx(-61 / 3)
    assert table.loc['Full TOU needs less training memory than FT'].verdict == 'does not hold'
    assert table.loc['Full TOU needs less training memory than LoRA'].verdict == 'undecided'
    assert table.loc['Merging loses nothing'].verdict == 'holds'
    # a method missing from the records leaves its claims unmeasured instead of inventing them
    table = claims.claims_table(runs[runs.method != 'lora'], n_boot=100, load=records.__getitem__)
    assert set(table[table.comparison.str.contains('LoRA')].verdict) == {'not measured'}


def test_within_one_point_fails_when_the_gap_is_large():
    runs, records = _claims_runs()
    worse = np.where(np.arange(1000) < 900, 0, 1).tolist()
    for seed in range(3):
        records[f'tou_{seed}']['metrics']['final']['test_predictions'] = worse
    table = claims.claims_table(runs, n_boot=500, load=records.__getitem__).set_index('statement')
    assert table.loc['Full TOU is at most 1 point below FT'].verdict == 'does not hold'


def test_verdict_sides():
    assert claims.verdict(0.1, 0.5, 0.0, 'above') == 'holds'
    assert claims.verdict(-0.5, -0.1, 0.0, 'above') == 'does not hold'
    assert claims.verdict(-0.1, 0.5, 0.0, 'above') == 'undecided'
    assert claims.verdict(0.2, 0.8, 1.0, 'below') == 'holds'


def test_a_diverged_rate_is_a_finished_result_never_chosen(tmp_path):
    from toukit import train
    with pytest.raises(FloatingPointError):
        train.run(method='ft', preset='test', lr=1e9, epochs=1, max_steps_per_epoch=4, results_dir=str(tmp_path),
                  progress=False)
    [path] = tmp_path.glob('*.json')
    record = results.finished_record(path)
    assert record['status'] == 'diverged'  # finished: a sweep does not run it again, and it blocks nothing
    assert sweep.select_lr({1e9: record, 1e-3: _record(0.5, 0.5)}) == 1e-3
    assert not list(tmp_path.glob('*.ckpt'))


def test_sweep_refuses_a_shared_run_name():
    with pytest.raises(ValueError, match="'run_name' is set by the sweep"):
        sweep.plan('test', ['ft'], overrides={'run_name': 'x'})


def test_claims_refuse_runs_of_several_presets():
    runs, records = _claims_runs()
    runs['preset'] = ['demo'] * (len(runs) - 1) + ['paper']
    with pytest.raises(ValueError, match='several presets'):
        claims.claims_table(runs, n_boot=10, load=records.__getitem__)


def test_claims_refuse_several_runs_of_one_method_and_seed():
    runs, records = _claims_runs()
    runs['lr'] = 1e-3
    extra = runs[runs.method == 'tou'].head(1).assign(lr=1e-4)
    with pytest.raises(ValueError, match='several tou runs share a seed'):
        claims.claims_table(pd.concat([runs, extra]), n_boot=10, load=records.__getitem__)


def test_a_sweep_of_some_methods_keeps_the_others_in_the_manifest(tmp_path):
    path = tmp_path / 'test.sweep.json'
    earlier = sweep.plan('test', ['ft', 'lora', 'tou'], [0, 1], results_dir=str(tmp_path))
    earlier['selected_lr'] = {'lora': 1e-3}  # as a finished grid would have chosen
    earlier['runs']['tuned'] = {'lora': ['lora-tuned-0', 'lora-tuned-1']}
    sweep._write_manifest(earlier, str(tmp_path))
    now = sweep.plan('test', ['tou', 'mica'], [0, 1], results_dir=str(tmp_path))
    merged = json.loads(sweep._write_manifest(now, str(tmp_path), keep_others=True).read_text())
    assert merged['methods'] == ['ft', 'lora', 'mica', 'tou']  # the registry's order
    assert merged['runs']['grid']['tou'] == now['runs']['grid']['tou']  # this sweep's own entries win
    assert merged['runs']['grid']['ft'] == earlier['runs']['grid']['ft']
    assert merged['runs']['tuned'] == {'lora': ['lora-tuned-0', 'lora-tuned-1']}
    assert merged['selected_lr'] == {'lora': 1e-3} and set(merged['grid']) == {'ft', 'lora', 'mica', 'tou'}
    # a method this sweep lists keeps none of its old entries, even where this sweep has none yet (its old tuned
    # runs and chosen rate would be stale)
    again = sweep.plan('test', ['lora'], [0, 1], results_dir=str(tmp_path))
    merged = json.loads(sweep._write_manifest(again, str(tmp_path), keep_others=True).read_text())
    assert 'lora' not in merged['selected_lr'] and 'lora' not in merged['runs']['tuned']
    assert merged['runs']['grid']['lora'] == again['runs']['grid']['lora'] and 'ft' in merged['runs']['grid']
    # another protocol (other seeds) replaces the manifest as before, and says which methods it no longer lists
    other = sweep.plan('test', ['tou'], [0], results_dir=str(tmp_path))
    with pytest.warns(UserWarning, match=r'listed ft, lora, mica under another protocol \(seeds differ\)'):
        written = sweep._write_manifest(other, str(tmp_path), keep_others=True)
    assert json.loads(written.read_text())['methods'] == ['tou']
    assert path.exists()


def test_redo_since_a_time_redoes_only_what_finished_before_it(tmp_path):
    config = sweep.plan('test', ['ft'], [0], results_dir=str(tmp_path))['configs']
    path = next(iter(config.values())).record_path
    results.write_record(dict(status='ok', finished='2026-12-05T10:00:00+00:00'), path)
    assert sweep._finished(path, '2026-12-05T09:00:00+00:00') and not sweep._finished(path, '2026-12-05T11:00:00+00:00')
    # instants, not strings: 10:00 UTC is 11:30 in India and 05:00 in New York
    assert sweep._finished(path, '2026-12-05T11:30:00+05:30') and not sweep._finished(path, '2026-12-05T05:01:00-05:00')
    # Z (or z) for UTC, which Python 3.10's fromisoformat (and 3.11's, for z) does not read
    assert sweep._finished(path, '2026-12-05T09:59:59Z') and not sweep._finished(path, '2026-12-05T10:00:01z')
    with pytest.raises(ValueError, match="redo='yesterday': expected True, False or an ISO 8601 time"):
        sweep.sweep('test', ['ft'], [0], results_dir=str(tmp_path), redo='yesterday', progress=False)
    with pytest.raises(ValueError, match=r"redo='2026-12-05T09:00:00': the time needs its offset"):
        sweep.sweep('test', ['ft'], [0], results_dir=str(tmp_path), redo='2026-12-05T09:00:00', progress=False)


def test_a_stopped_workers_notebook_of_a_finished_run_is_put_in_place(tmp_path):
    """A worker killed after its run's record, while the notebook's last cells ran, leaves its scratch copy; the
    next sweep skips the finished run and puts that copy in place, never a live worker's or one older than the
    record; a stopped worker's copy older than the record (an attempt that a later one finished) is removed."""
    import os
    import socket
    import subprocess
    import sys
    grid = {'ft': [1e-3]}
    [config] = sweep.plan('test', ['ft'], [0], grid, str(tmp_path))['configs'].values()
    results.write_record(dict(status='ok', finished=results.now(), metrics=dict(final=dict(val_accuracy=0.5))),
                         config.record_path)
    gone = [int(subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'], capture_output=True,
                               text=True).stdout) for _ in range(3)]  # processes that ran and ended
    folder, host = tmp_path / 'notebooks', socket.gethostname()
    folder.mkdir()
    executed = folder / f'{config.name}.ipynb'
    executed.write_text('an earlier run of this id')
    old = folder / f'.{config.name}.{host}.{gone[1]}.ipynb'  # dead too, but older than the record
    dead, live = (folder / f'.{config.name}.{host}.{pid}.ipynb' for pid in (gone[0], os.getpid()))
    for path, text, age in ((old, 'before', -60), (dead, 'the run', 1), (live, 'a live worker', 2)):
        path.write_text(text)
        when = config.record_path.stat().st_mtime + age
        os.utime(path, (when, when))
    os.utime(executed, (config.record_path.stat().st_mtime - 120,) * 2)
    sweep.sweep('test', ['ft'], [0], grid=grid, results_dir=str(tmp_path), stages=('grid',), progress=False)
    assert executed.read_text() == 'the run' and not dead.exists() and live.exists() and not old.exists()
    leftover = folder / f'.{config.name}.{host}.{gone[2]}.ipynb'  # a stopped worker's, newest of all
    leftover.write_text('a later attempt')
    sweep.sweep('test', ['ft'], [0], grid=grid, results_dir=str(tmp_path), stages=('grid',), progress=False)
    # in place now, newer than the record: left alone; the stopped copy goes, the live worker's stays
    assert executed.read_text() == 'the run' and not leftover.exists() and live.exists()


def test_the_status_counts_planned_finished_running_and_left_runs_without_running_any(tmp_path, capsys):
    from toukit import cli
    from toukit.runstate import RunLock
    grid = {'ft': [1e-3, 1e-4]}
    configs = {(c.lr, c.seed): c for c in sweep.plan('test', ['ft'], [0, 1], grid, str(tmp_path))['configs'].values()}

    def finish(lr, seed, val, when='2026-12-05T10:00:00+00:00'):
        results.write_record(dict(status='ok', finished=when, metrics=dict(final=dict(val_accuracy=val))),
                             configs[lr, seed].record_path)

    def counts(**kw):
        table = sweep.progress('test', ['ft'], [0, 1], grid, str(tmp_path), **kw).set_index('stage')
        return {stage: tuple(row) for stage, row in table[['planned', 'finished', 'running', 'left']].iterrows()}

    finish(1e-3, 0, 0.6)
    # tuned: not planned before the grid ends; the test preset's paper rate is 1e-3, so seed 0's paper run is done
    assert counts() == {'grid': (2, 1, 0, 1), 'paper': (2, 1, 0, 1)}
    finish(1e-4, 0, 0.4)  # records without predictions or val_size: the runner-up rule cannot compare them, warns
    with pytest.warns(UserWarning, match='no runner-up runs'):
        table = counts()
    assert table['grid'] == (2, 2, 0, 0) and table['tuned'] == (2, 1, 0, 1)  # seed 0's tuned run is the grid's
    with RunLock(configs[1e-3, 1].record_path), pytest.warns(UserWarning):
        assert counts()['tuned'] == (2, 1, 1, 1)
    with pytest.warns(UserWarning):
        assert counts(redo_before='2026-12-05T11:00:00+00:00')['grid'] == (2, 0, 0, 2)  # finished before: redone
    with pytest.warns(UserWarning):
        assert cli.command(['sweep', '--preset', 'test', '--methods', 'ft', '--seeds', '0', '1', '--results-dir',
                            str(tmp_path), '--status']) == 0
    out = capsys.readouterr().out
    assert 'planned' in out and 'left' in out and 'test: 4 of 6 planned runs finished, 0 running, 2 left' in out
    assert not (tmp_path / 'test.sweep.json').exists() and not (tmp_path / 'notebooks').exists()  # nothing ran


def test_the_sweep_command_takes_a_redo_time_or_redo_not_both(tmp_path, capsys):
    from toukit import cli
    assert cli.command(['sweep', '--preset', 'test', '--redo', '--redo-before', '2026-12-05T14:10:00+00:00',
                        '--results-dir', str(tmp_path)]) == 2
    assert '--redo and --redo-before: give one' in capsys.readouterr().err
    assert cli.command(['sweep', '--preset', 'test', '--redo-before', 'soon', '--results-dir', str(tmp_path)]) == 2
    assert "redo='soon': expected True, False or an ISO 8601 time" in capsys.readouterr().err


def test_the_plan_runs_a_close_runner_up_rate_on_every_seed(tmp_path):
    """The runner_up stage lists the second-best rate on every seed where it is within the validation noise (TOU:
    5 of 1,024 examples) and nothing where the choice is clear (FT: 100 of 1,024)."""
    grid = {'tou': [1e-5, 5e-5, 1e-3], 'ft': [1e-5, 5e-5]}
    val = {'tou': {1e-5: 0.80, 5e-5: 0.80 - 5 / 1024, 1e-3: 0.5}, 'ft': {1e-5: 0.90, 5e-5: 0.90 - 100 / 1024}}
    first = sweep.plan('test', ['tou', 'ft'], [0, 1, 2], grid=grid, results_dir=str(tmp_path))
    assert first['runs']['runner_up'] == {}  # nothing before the grid is in
    for method, names in first['runs']['grid'].items():
        for lr, name in zip(first['grid'][method], names):
            config = first['configs'][name]
            results.write_record(dict(run=dict(id=name, config=dict(method=method, lr=lr, seed=0)), status='ok',
                                      data=dict(val_size=1024), metrics={'final': dict(val_accuracy=val[method][lr])}),
                                 config.record_path)
    manifest = sweep.plan('test', ['tou', 'ft'], [0, 1, 2], grid=grid, results_dir=str(tmp_path))
    assert manifest['selected_lr'] == {'tou': 1e-5, 'ft': 1e-5}
    runner_up = manifest['runs']['runner_up']
    assert list(runner_up) == ['tou']
    assert [manifest['configs'][n].lr for n in runner_up['tou']] == [5e-5] * 3
    assert [manifest['configs'][n].seed for n in runner_up['tou']] == [0, 1, 2]
    assert runner_up['tou'][0] == manifest['runs']['grid']['tou'][1]  # seed 0's is the grid's run: made once
    assert not set(runner_up['tou']) & set(manifest['runs']['tuned']['tou'])
    written = sweep._write_manifest(manifest, str(tmp_path), keep_others=True)
    runs = toukit.load_runs(tmp_path)
    assert runs.set_index('run_id').protocol[runner_up['tou'][0]] == 'grid+runner_up'
    # what is left: TOU's runner-up on seeds 1 and 2; FT, whose choice was clear, has none to make
    assert results.missing_runs(runs, 'test', 'runner_up') == runner_up['tou'][1:]
    assert results.missing_runs(runs, 'test', 'tuned', methods=['ft']) == manifest['runs']['tuned']['ft'][1:]
    with pytest.raises(ValueError, match="stages=\\['nope'\\]: choose from grid, tuned, runner_up, paper"):
        sweep.sweep('test', ['tou'], stages=['nope'], results_dir=str(tmp_path))
    assert written.exists()


def test_a_grid_the_rule_cannot_compare_plans_no_runner_up_and_says_why(tmp_path):
    """Grid records with different validation labels: the paired test refuses them; the sweep warns and goes on."""
    grid = {'tou': [1e-5, 5e-5]}
    first = sweep.plan('test', ['tou'], [0, 1], grid=grid, results_dir=str(tmp_path))
    for lr, name, labels in zip(first['grid']['tou'], first['runs']['grid']['tou'], ([0] * 10, [1] * 10)):
        final = dict(val_accuracy=0.8 if lr == 1e-5 else 0.7, val_predictions=[0] * 10, val_labels=labels)
        results.write_record(dict(run=dict(id=name, config=dict(method='tou', lr=lr, seed=0)), status='ok',
                                  data=dict(val_size=10), metrics={'final': final}), first['configs'][name].record_path)
    with pytest.warns(UserWarning, match='test tou: no runner-up runs.*different validation labels'):
        manifest = sweep.plan('test', ['tou'], [0, 1], grid=grid, results_dir=str(tmp_path))
    assert manifest['runs']['runner_up'] == {} and manifest['selected_lr'] == {'tou': 1e-5}
    assert len(manifest['runs']['tuned']['tou']) == 2
