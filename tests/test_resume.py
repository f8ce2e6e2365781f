"""Runs that survive being killed: checkpoints, bitwise resume, locks, stale and corrupt files, trackers."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

import toukit
from toukit import results, runstate, train
from toukit.runstate import RunLockedError

KW = dict(method='tou', preset='test', epochs=2, checkpoint_every=1, save_weights=True)


def _weights(path):
    from safetensors.torch import load_file
    return load_file(str(path.with_suffix('.safetensors')))


def _same_outcome(a: dict, b: dict):
    assert [s['loss'] for s in a['metrics']['steps']] == [s['loss'] for s in b['metrics']['steps']]
    for ea, eb in zip(a['metrics']['epochs'], b['metrics']['epochs'], strict=True):
        assert (ea['val_accuracy'], ea['val_loss'], ea['test_loss']) == (eb['val_accuracy'], eb['val_loss'],
                                                                          eb['test_loss'])
    fa, fb = a['metrics']['final'], b['metrics']['final']
    assert fa['test_predictions'] == fb['test_predictions'] and fa['test_loss'] == fb['test_loss']


def _same_costs(resumed: dict, reference: dict):
    """Every cost field the uninterrupted run records, with the same definitions, and measured (not 0 or None)."""
    a, b = resumed['cost'], reference['cost']
    assert a.keys() == b.keys()
    for key in ('memory_kind', 'memory_definitions', 'trainable_params', 'total_params', 'num_workers'):
        assert a[key] == b[key], key
    for key in ('train_seconds', 'data_seconds', 'factorize_seconds', 'peak_memory_mib'):
        assert a[key] > 0, key
    assert a['train_memory_mib'] >= 0 and a['train_memory_mib'] is not None
    # the training time of each epoch adds up to the run's, resumed or not
    assert a['train_seconds'] == pytest.approx(sum(e['train_seconds'] for e in resumed['metrics']['epochs']))


def _kill_at(folder, kw: dict, kill_after: int):
    """Start the run in a subprocess and SIGKILL it once a checkpoint at step >= kill_after is on disk."""
    code = f'from toukit import train; train.run(results_dir={str(folder)!r}, progress=False, **{kw!r})'
    proc = subprocess.Popen([sys.executable, '-c', code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    path = folder / f'{toukit.resolve_config(results_dir=str(folder), **kw).name}.json'
    state = runstate.checkpoint_dir(path) / 'state.pt'
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if state.exists():
            try:
                if torch.load(state, weights_only=False)['state']['step'] >= kill_after:
                    break
            except Exception:  # noqa: BLE001 - caught mid-replace: look again
                pass
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return path


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
    folder = tmp_path_factory.mktemp('reference')
    record = train.run(results_dir=str(folder), progress=False, **KW)
    return record, folder / f'{record["run"]["id"]}.json'


def test_kill_at_a_random_step_then_resume_is_bitwise_identical(uninterrupted, tmp_path):
    reference, reference_path = uninterrupted
    total = len(reference['metrics']['steps'])
    kill_after = random.Random(os.getpid()).randint(2, total - 2)  # any step: mid-epoch or at an epoch's end
    path = _kill_at(tmp_path, KW, kill_after)
    runs = results.load_runs(tmp_path)
    if len(runs):  # killed after the first epoch's partial record: it reads as interrupted, not running
        assert runs.status.tolist() == ['interrupted']
    resumed = train.run(results_dir=str(tmp_path), progress=False, resume=True, **KW)
    assert resumed['resumed'][0]['at_step'] >= kill_after
    _same_outcome(resumed, reference)
    _same_costs(resumed, reference)
    mine, theirs = _weights(path), _weights(reference_path)
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert not runstate.checkpoint_dir(path).exists()  # a finished run leaves no checkpoint
    assert not path.with_suffix('.lock').exists()


# a timm model with BatchNorm (its running statistics are buffers training changes) and the real MiniLM
RESUMED_MODELS = {
    'batchnorm': dict(method='ft', preset='test', model='test_efficientnet', epochs=2, checkpoint_every=1,
                      max_steps_per_epoch=4, train_limit=64, save_weights=True),
    'minilm': dict(method='tou', preset='demo', epochs=2, checkpoint_every=1, max_steps_per_epoch=3, train_limit=100,
                   val_limit=20, test_limit=20, max_length=16, batch_size=8, save_weights=True),
}


@pytest.mark.parametrize('model', list(RESUMED_MODELS))
def test_every_model_resumes_from_a_kill_bitwise_with_every_cost_field(model, tmp_path):
    kw = RESUMED_MODELS[model]
    reference = train.run(results_dir=str(tmp_path / 'reference'), progress=False, **kw)
    kill_after = random.Random(os.getpid()).randint(1, len(reference['metrics']['steps']) - 1)
    path = _kill_at(tmp_path, kw, kill_after)
    resumed = train.run(results_dir=str(tmp_path), progress=False, resume=True, **kw)
    assert resumed['resumed'][0]['at_step'] >= kill_after
    _same_outcome(resumed, reference)
    _same_costs(resumed, reference)
    mine, theirs = _weights(path), _weights(tmp_path / 'reference' / path.name)
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    if model == 'batchnorm':
        assert any('running_mean' in k for k in mine)


def test_a_run_killed_after_its_last_checkpoint_resumes_with_every_cost_field(uninterrupted, tmp_path):
    reference, _ = uninterrupted
    real = train.merge

    def die_in_merge(model):
        raise KeyboardInterrupt  # dies in merge, after the last epoch's checkpoint
    train.merge = die_in_merge
    try:
        with pytest.raises(KeyboardInterrupt):
            train.run(results_dir=str(tmp_path), progress=False, **KW)
    finally:
        train.merge = real
    path = toukit.resolve_config(results_dir=str(tmp_path), **KW).record_path
    saved = torch.load(runstate.checkpoint_dir(path) / 'state.pt', weights_only=False)['state']
    resumed = train.run(results_dir=str(tmp_path), progress=False, resume=True, **KW)
    assert resumed['status'] == 'ok' and resumed['resumed'][0]['at_step'] == len(reference['metrics']['steps'])
    _same_outcome(resumed, reference)
    _same_costs(resumed, reference)
    # nothing trained after the resume: the costs are the checkpointed run's, never a fresh window's 0
    assert resumed['cost']['train_seconds'] == saved['train_seconds'] > 0
    assert resumed['cost']['train_memory_mib'] >= saved['train_memory_mib'] > 0


def test_resume_without_checkpoint_or_from_another_config_is_refused(tmp_path):
    with pytest.raises(ValueError, match='has no checkpoint'):
        train.run(results_dir=str(tmp_path), progress=False, resume=True, **KW)
    with pytest.raises(KeyboardInterrupt):  # leave a checkpoint behind: stop after the first epoch
        _interrupt_after_first_epoch(tmp_path, run_name='mine', rank=4)
    with pytest.raises(ValueError, match='different configuration .*rank'):
        train.run(results_dir=str(tmp_path), progress=False, resume=True, **dict(KW, run_name='mine', rank=6))
    record = train.run(results_dir=str(tmp_path), progress=False, resume=True, **dict(KW, run_name='mine', rank=4))
    assert record['status'] == 'ok' and record['resumed'][0]['at_step'] >= 1


def _interrupt_after_first_epoch(folder, **kw):
    real = runstate.save_checkpoint

    def save_then_stop(path, model, optimizer, state, identity):
        real(path, model, optimizer, state, identity)
        if state.step_in_epoch == 0:  # the end-of-epoch checkpoint
            raise KeyboardInterrupt
    train.save_checkpoint, saved = save_then_stop, train.save_checkpoint
    try:
        train.run(results_dir=str(folder), progress=False, **dict(KW, **kw))
    finally:
        train.save_checkpoint = saved


def test_a_second_process_on_the_same_run_refuses(tmp_path):
    config = toukit.resolve_config(results_dir=str(tmp_path), **KW)
    with runstate.RunLock(config.record_path):
        with pytest.raises(RunLockedError, match='already running'):
            train.run(config, progress=False)
    # a lock left by a dead process is taken over
    dead = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'], capture_output=True, text=True)
    import socket
    config.record_path.with_suffix('.lock').write_text(json.dumps(dict(host=socket.gethostname(),
                                                                        pid=int(dead.stdout))))
    assert train.run(config, progress=False)['status'] == 'ok'


def test_a_killed_owner_never_holds_the_lock(tmp_path):
    import socket
    path = tmp_path / 'run.json'
    code = (f'import sys, time; from toukit.runstate import RunLock\n'
            f'with RunLock({str(path)!r}): print("locked", flush=True); time.sleep(60)')
    owner = subprocess.Popen([sys.executable, '-c', code], stdout=subprocess.PIPE, text=True)
    assert owner.stdout.readline().strip() == 'locked'
    assert runstate.lock_owner(path)['pid'] == owner.pid
    with pytest.raises(RunLockedError, match=f'pid {owner.pid}'):
        runstate.RunLock(path).__enter__()
    owner.send_signal(signal.SIGKILL)  # no cleanup: the lock file stays, its flock goes with the process
    owner.wait()
    assert path.with_suffix('.lock').exists() and runstate.lock_owner(path) is None
    path.with_suffix('.lock').write_text('')  # killed between creating the lock file and writing it
    assert runstate.lock_owner(path) is None
    with runstate.RunLock(path):
        assert runstate.lock_owner(path)['pid'] == os.getpid()
    assert not path.with_suffix('.lock').exists()
    # only the flock holds: a lock file naming a live process that holds no flock on it is free
    sleeper = subprocess.Popen(['sleep', '30'])
    path.with_suffix('.lock').write_text(json.dumps(dict(host=socket.gethostname(), pid=sleeper.pid)))
    try:
        assert runstate.lock_owner(path) is None
        with runstate.RunLock(path):
            assert runstate.lock_owner(path)['pid'] == os.getpid()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_check_of_the_lock_never_makes_its_taker_fail(tmp_path):
    """lock_owner holds a shared flock for an instant; a RunLock entering meanwhile waits it out."""
    import fcntl
    import threading
    path = tmp_path / 'run.json'
    path.with_suffix('.lock').write_text('')
    fd = os.open(path.with_suffix('.lock'), os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_SH)  # a check under way, as lock_owner makes it
    threading.Timer(0.2, lambda: os.close(fd)).start()
    with runstate.RunLock(path):
        assert runstate.lock_owner(path)['pid'] == os.getpid()  # and a check does not disturb the holder
        with pytest.raises(RunLockedError, match='wait for it'):
            runstate.RunLock(path).__enter__()


def test_corrupt_files_are_reported_by_name_and_skipped_or_redone(tmp_path, capsys):
    config = toukit.resolve_config(results_dir=str(tmp_path), **KW)
    config.record_path.write_text('{"run": {"id": "trunc')  # a truncated record
    folder = runstate.checkpoint_dir(config.record_path)
    folder.mkdir()
    (folder / 'state.pt').write_bytes(b'not a checkpoint')
    with pytest.warns(UserWarning, match=config.record_path.name):
        runs = toukit.load_runs(tmp_path)
    assert runs.empty and config.record_path.name in runs.attrs['skipped'][0]
    with pytest.warns(UserWarning, match=f'{config.record_path.name}: unreadable run record'):
        assert results.finished_record(config.record_path) is None  # the sweep and reproduce make the run again
    with pytest.raises(ValueError, match='unreadable'):
        train.run(config, progress=False, resume=True)
    assert runstate.can_resume(config.record_path) is False  # reported and removed: the sweep starts over
    assert 'unreadable' in capsys.readouterr().out and not folder.exists()
    assert train.run(config, progress=False)['status'] == 'ok'


def test_tensorboard_gets_the_logged_scalars(tmp_path):
    pytest.importorskip('tensorboard')
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    record = train.run(method='ft', preset='test', epochs=1, max_steps_per_epoch=3, log_with='tensorboard',
                       results_dir=str(tmp_path), progress=False)
    scalars = {}
    for events in (tmp_path / 'trackers').rglob('events.out.tfevents.*'):  # accelerate writes hparams apart
        acc = EventAccumulator(str(events))
        acc.Reload()
        scalars.update({tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()['scalars']})
    assert {'train_loss', 'epoch_val_accuracy', 'epoch_test_accuracy', 'epoch_train_loss'} <= set(scalars)
    losses = scalars['train_loss']
    assert losses == pytest.approx([s['loss'] for s in record['metrics']['steps']])


def test_train_command_takes_the_notebook_parameters(tmp_path):
    from toukit import cli
    cli.main(['train', '--method', 'lora', '--preset', 'test', '--epochs', '1', '--max-steps-per-epoch', '2',
              '--rank', '2', '--targets', 'attention', '--results-dir', str(tmp_path), '--quiet'])
    [record] = [json.loads(p.read_text()) for p in tmp_path.glob('*.json')]
    assert record['status'] == 'ok' and record['run']['config']['rank'] == 2
    with pytest.raises(ValueError, match='has no checkpoint'):
        cli.main(['train', '--method', 'ft', '--preset', 'test', '--results-dir', str(tmp_path), '--resume'])
