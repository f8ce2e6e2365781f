"""The configuration said once: run ids of every committed record, the metadata that --help, the notebook and the
run identity derive from."""
import dataclasses
import json
from pathlib import Path

import pytest

import toukit
from toukit import cli, config, results

RESULTS = Path(__file__).resolve().parents[1] / 'results'


def _records():
    return sorted(p for p in RESULTS.glob('*.json') if not p.name.endswith(results.MANIFEST_SUFFIX))


def test_every_committed_record_keeps_its_run_id():
    """A record's stored config gives its file name, read as it was stored and rebuilt as today's TrainConfig
    (whose renamed fields, weights and method_options, hash under their old names)."""
    records = _records()
    assert len(records) > 200
    for path in records:
        stored = json.loads(path.read_text())['run']['config']
        assert config.run_id(stored) == path.stem, path.name
        rebuilt = config.TrainConfig.from_record(stored)
        assert rebuilt.name == path.stem, path.name
        assert config.identity(dataclasses.asdict(rebuilt)) == config.identity(stored), path.name


def test_a_renamed_field_changes_the_id_as_it_did_under_its_old_name():
    base = dict(dataclasses.asdict(toukit.resolve_config(toukit.TrainConfig(method='tou', preset='test'))))
    new = dict(base, method_options={'svd_method': 'exact'})
    old = {('extra' if k == 'method_options' else k): v for k, v in new.items()}
    assert config.run_id(new) == config.run_id(old) != config.run_id(base)
    assert config.run_id(dict(base, weights='w.safetensors')) != config.run_id(base)


def test_the_metadata_says_each_field_once():
    fields = dataclasses.fields(config.TrainConfig)
    assert config.IDENTITY_EXCLUDED == ('download', 'data_root', 'device', 'results_dir', 'run_name', 'save_weights',
                                        'num_workers', 'checkpoint_every', 'log_with')
    parser = cli.argparse.ArgumentParser()
    cli._train_parser(parser.add_subparsers())
    train_parser = parser._subparsers._group_actions[0].choices['train']
    helps = {a.dest: a.help for a in train_parser._actions if a.dest in config.FIELD_HELP}
    assert helps == {f.name: f.metadata['help'] for f in fields}


@pytest.mark.parametrize('field, value, match', [
    ('weights', 3, 'weights=3'), ('method_options', [], r'method_options=\[\]'),
    ('method_options', {'width': 4}, 'takes no option width'), ('run_name', 'a/b', 'not a path'),
    ('checkpoint_every', 0, 'checkpoint_every=0'), ('device', 'tpu', "device='tpu'")])
def test_each_fields_check_names_it(field, value, match):
    with pytest.raises(ValueError, match=match):
        config.TrainConfig(**{field: value})


def test_the_notebook_builds_its_config_from_its_parameters_by_name():
    namespace = dict(method='lora', preset='test', epochs=1, overwrite=True, plt=object())  # others ignored
    assert config.TrainConfig.from_parameters(namespace) == config.TrainConfig(method='lora', preset='test', epochs=1)
