"""No record is lost to a killed `--redo`, and SIGTERM ends a run as Ctrl-C does (issue 30, item 1): real
subprocesses, killed mid-run."""
import json
import signal
import subprocess
import sys
import time

import pytest
import torch

import toukit
from toukit import results, runstate, train

KW = dict(method='tou', preset='test', epochs=2, checkpoint_every=1)


def _start(folder, overwrite: bool = False) -> subprocess.Popen:
    code = (f'from toukit import train; train.run(results_dir={str(folder)!r}, progress=False, '
            f'overwrite={overwrite!r}, **{KW!r})')
    return subprocess.Popen([sys.executable, '-c', code], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)


def _wait(proc: subprocess.Popen, ready, timeout: float = 240) -> None:
    """Wait until `ready()` holds (the run still alive), or fail."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            if ready():
                return
        except Exception:  # noqa: BLE001 - a file caught mid-replace: look again
            pass
        time.sleep(0.02)
    proc.kill()
    pytest.fail(f'the run ended (rc {proc.returncode}) before the point to stop it: {proc.stderr.read()[-2000:]}')


def _step(path) -> int:
    return torch.load(runstate.checkpoint_dir(path) / 'state.pt', weights_only=False)['state']['step']


def test_a_redo_killed_mid_run_leaves_the_finished_record_byte_for_byte(tmp_path):
    first = train.run(results_dir=str(tmp_path), progress=False, **KW)
    path = toukit.resolve_config(results_dir=str(tmp_path), **KW).record_path
    before = path.read_bytes()
    side = results.redo_path(path)
    proc = _start(tmp_path, overwrite=True)
    _wait(proc, lambda: side.exists() and _step(path) > first['metrics']['epochs'][0]['step'])  # in its epoch 2
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert path.read_bytes() == before  # the old record, untouched
    assert json.loads(side.read_text())['status'] == 'running'  # the redo's partial record, beside it
    assert toukit.load_runs(tmp_path).run_id.tolist() == [first['run']['id']]  # one run, the finished one
    # the killed redo resumes as the warning says (--redo --resume) and, once it ends ok, replaces the record
    again = train.run(results_dir=str(tmp_path), progress=False, overwrite=True, resume=True, **KW)
    stored = json.loads(path.read_text())
    assert stored['status'] == 'ok' and stored['run']['created'] == again['run']['created'] != first['run']['created']
    assert stored['resumed'][0]['at_step'] > first['metrics']['epochs'][0]['step']
    assert stored['metrics']['final']['test_predictions'] == first['metrics']['final']['test_predictions']
    assert not side.exists() and not runstate.has_checkpoint(path)


def test_a_checkpoint_found_is_said_with_how_to_resume_it(tmp_path):
    path = tmp_path / 'run.json'
    runstate.checkpoint_dir(path).mkdir()
    (runstate.checkpoint_dir(path) / 'state.pt').write_bytes(b'')
    with pytest.warns(UserWarning, match=r'checkpoint of this run.*starts over.*toukit train \.\.\. --resume'):
        runstate.say_checkpoint('run', path, finished=False)
    with pytest.warns(UserWarning, match=r'--redo --resume.*overwrite=True'):  # only a redo replaces a finished one
        runstate.say_checkpoint('run', path, finished=True)


@pytest.mark.parametrize('how', ['fails', 'diverges'])
def test_a_redo_that_does_not_end_ok_keeps_the_old_record(how, tmp_path, monkeypatch):
    train.run(results_dir=str(tmp_path), progress=False, **KW)
    path = toukit.resolve_config(results_dir=str(tmp_path), **KW).record_path
    before = path.read_bytes()
    handler = signal.getsignal(signal.SIGTERM)

    def broken(*args, **kwargs):
        if how == 'fails':
            raise RuntimeError('the merge broke')
        return torch.tensor(float('nan'))

    monkeypatch.setattr(train, 'merge' if how == 'fails' else 'train_step', broken)
    with pytest.raises(RuntimeError if how == 'fails' else FloatingPointError):
        train.run(results_dir=str(tmp_path), progress=False, overwrite=True, **KW)
    assert path.read_bytes() == before
    assert json.loads(results.redo_path(path).read_text())['status'] == ('failed' if how == 'fails' else 'diverged')
    assert signal.getsignal(signal.SIGTERM) is handler  # the run's SIGTERM handler is gone with it


def test_sigterm_ends_a_run_as_interrupted_with_its_checkpoint_kept_and_its_lock_released(tmp_path):
    path = toukit.resolve_config(results_dir=str(tmp_path), **KW).record_path
    proc = _start(tmp_path)
    _wait(proc, lambda: _step(path) >= 2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) != 0
    record = json.loads(path.read_text())
    assert record['status'] == 'interrupted' and 'SIGTERM' in record['error']
    assert runstate.has_checkpoint(path) and runstate.lock_owner(path) is None
    assert not path.with_suffix('.lock').exists()
    resumed = train.run(results_dir=str(tmp_path), progress=False, resume=True, **KW)
    assert resumed['status'] == 'ok' and resumed['resumed'][0]['at_step'] >= 2
