"""Your data in one parameter: table files, image folders and torch Datasets train like the built-in sets."""
import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

import toukit
from toukit import cli, data, train

QUICK = dict(method='tou', preset='test', epochs=1, max_steps_per_epoch=2, batch_size=4, progress=False)
WORDS = {'sport': 'match goal team win league', 'tech': 'chip software phone code data',
         'food': 'bread soup cheese pasta salad'}


def _texts(n=30, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        label = list(WORDS)[i % 3]
        rows.append(dict(review=' '.join(rng.choice(WORDS[label].split(), 6)), topic=label,
                         part=['train', 'train', 'train', 'validation', 'test'][i % 5]))
    return pd.DataFrame(rows)


@pytest.fixture
def csv_file(tmp_path):
    path = tmp_path / 'reviews.csv'
    _texts().to_csv(path, index=False)
    return path


def _text_run(tmp_path, dataset, **kw):
    return train.run(dataset=str(dataset), text_column='review', label_column='topic', max_length=12,
                     results_dir=str(tmp_path / 'results'), **{**QUICK, 'model': 'tiny-bert', **kw})


def test_a_csv_trains_and_the_record_names_it(csv_file, tmp_path):
    record = _text_run(tmp_path, csv_file)
    assert record['status'] == 'ok'
    d = record['data']
    assert d['source'] == 'table' and d['path'] == str(csv_file) and d['classes'] == ['food', 'sport', 'tech']
    assert len(d['sha256']) == 64 and (d['train_size'], d['val_size'], d['test_size']) == (18, 6, 6)


def test_the_run_id_follows_the_file_content(csv_file, tmp_path):
    before = toukit.resolve_config(preset='test', dataset=str(csv_file), text_column='review', label_column='topic')
    _texts(seed=1).to_csv(csv_file, index=False)
    after = toukit.resolve_config(preset='test', dataset=str(csv_file), text_column='review', label_column='topic')
    assert before.dataset_sha256 != after.dataset_sha256 and before.name != after.name
    assert toukit.resolve_config(preset='test').dataset_sha256 is None  # a built-in set: ids as before


def test_a_split_column_is_kept(csv_file, tmp_path):
    record = _text_run(tmp_path, csv_file, split_column='part')
    assert (record['data']['train_size'], record['data']['val_size'], record['data']['test_size']) == (18, 6, 6)
    test_rows = _texts().query('part == "test"')
    assert record['metrics']['final']['test_labels'] == [['food', 'sport', 'tech'].index(t) for t in test_rows.topic]


@pytest.mark.parametrize('suffix', ['.jsonl', '.tsv', '.parquet'])
def test_other_table_formats(suffix, tmp_path):
    frame = _texts()
    path = tmp_path / f'reviews{suffix}'
    if suffix == '.jsonl':
        path.write_text('\n'.join(json.dumps(r) for r in frame.to_dict('records')) + '\n')
    elif suffix == '.tsv':
        frame.to_csv(path, sep='\t', index=False)
    else:
        pytest.importorskip('pyarrow', reason='parquet needs pyarrow (pip install pyarrow)')
        frame.to_parquet(path)
    assert _text_run(tmp_path, path)['status'] == 'ok'


def _image_folder(root, splits=('train', 'test'), per_class=6, bad=None):
    from PIL import Image
    rng = np.random.default_rng(0)
    for split in splits:
        for c, colour in (('red', (200, 30, 30)), ('blue', (30, 30, 200))):
            folder = root / split / c
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = np.clip(np.array(colour) + rng.integers(-20, 20, (24, 24, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f'{i}.png')
    if bad:
        (root / splits[0] / 'red' / 'broken.png').write_bytes(b'not a png')
    return root


def test_an_image_folder_with_train_and_test_trains(tmp_path):
    folder = _image_folder(tmp_path / 'images')
    record = train.run(dataset=str(folder), results_dir=str(tmp_path / 'results'), image_size=64, **QUICK)
    d = record['data']
    assert record['status'] == 'ok' and d['source'] == 'image_folder' and d['classes'] == ['blue', 'red']
    assert d['test_size'] == 12 and d['train_size'] + d['val_size'] == 12  # test kept, 10% of train to val


class Blobs(torch.utils.data.Dataset):
    """A torch Dataset of (image tensor, label) pairs, as a user writes one."""

    def __init__(self, n=40):
        g = torch.Generator().manual_seed(0)
        self.labels = torch.arange(n) % 2
        self.images = torch.randn(n, 3, 160, 160, generator=g) + self.labels.view(-1, 1, 1, 1)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], int(self.labels[i])


def test_a_torch_dataset_trains_from_python(tmp_path):
    record = train.run(data=Blobs(), results_dir=str(tmp_path), **QUICK)
    assert record['status'] == 'ok' and record['data']['source'] == 'python'
    assert record['run']['config']['dataset'].startswith('python:Blobs:')
    assert (record['data']['train_size'], record['data']['val_size'], record['data']['test_size']) == (24, 8, 8)


def test_the_command_and_the_notebook_take_a_file(csv_file, tmp_path):
    cli.main(['train', '--method', 'lora', '--preset', 'test', '--model', 'tiny-bert', '--dataset', str(csv_file),
              '--text-column', 'review', '--label-column', 'topic', '--epochs', '1', '--max-steps-per-epoch', '1',
              '--rank', '2', '--max-length', '12', '--results-dir', str(tmp_path / 'cli'), '--quiet'])
    [record] = [json.loads(p.read_text()) for p in (tmp_path / 'cli').glob('*.json')]
    assert record['status'] == 'ok' and record['data']['source'] == 'table'
    help_text = subprocess.run([sys.executable, '-m', 'toukit.cli', 'train', '--help'], capture_output=True,
                               text=True, check=True).stdout
    assert "a table file's text column" in help_text and 'seeds the train/validation/test split' in help_text


@pytest.mark.notebook
def test_the_training_notebook_takes_a_file(csv_file, tmp_path):
    from toukit.notebooks import run_notebook
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    run_notebook('train.ipynb', tmp_path / 'out.ipynb', dict(
        method='tou', preset='test', model='tiny-bert', dataset=str(csv_file), text_column='review',
        label_column='topic', epochs=1, max_steps_per_epoch=1, max_length=12, results_dir=str(tmp_path / 'nb')),
        root)
    [record] = [json.loads(p.read_text()) for p in (tmp_path / 'nb').glob('*.json')]
    assert record['status'] == 'ok' and record['data']['classes'] == ['food', 'sport', 'tech']


def test_bad_files_are_named_with_the_problem(tmp_path, csv_file):
    with pytest.raises(ValueError, match=r"reviews.csv: no text column 'text'; its columns are review, topic, part"):
        toukit.TrainConfig(preset='test', dataset=str(csv_file), label_column='topic')
    one = tmp_path / 'one.csv'
    _texts().assign(topic='sport').to_csv(one, index=False)
    with pytest.raises(ValueError, match='one.csv: one class only'):
        toukit.TrainConfig(preset='test', dataset=str(one), text_column='review', label_column='topic')
    empty = tmp_path / 'empty.csv'
    empty.write_text('')
    with pytest.raises(ValueError, match='empty.csv: the file is empty'):
        toukit.TrainConfig(preset='test', dataset=str(empty))
    holes = tmp_path / 'holes.csv'
    _texts().assign(topic=lambda f: f.topic.where(f.index != 3)).to_csv(holes, index=False)
    with pytest.raises(ValueError, match="holes.csv: the label column 'topic' has 1 missing values"):
        toukit.TrainConfig(preset='test', dataset=str(holes), text_column='review', label_column='topic')
    odd = tmp_path / 'odd.csv'
    _texts().assign(part='holdout').to_csv(odd, index=False)
    with pytest.raises(ValueError, match=r"odd.csv, column 'part': unknown split values \['holdout'\]"):
        toukit.TrainConfig(preset='test', dataset=str(odd), text_column='review', label_column='topic',
                          split_column='part')
    with pytest.raises(ValueError, match="dataset='nowhere.csv': no such file or folder"):
        toukit.TrainConfig(preset='test', dataset='nowhere.csv')


def test_an_unreadable_image_is_named(tmp_path):
    folder = _image_folder(tmp_path / 'images', bad=True)
    with pytest.raises(ValueError, match=r'broken.png: unreadable image'):
        data.load_dataset(str(folder), model=__import__('timm').create_model('test_vit', num_classes=2))


def _text_checkpoint(folder):
    """A tiny BERT encoder saved as a Hugging Face checkpoint with the bundled MiniLM's tokenizer: no head."""
    from transformers import AutoTokenizer, BertConfig, BertModel
    from toukit.models import minilm_path
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4)).save_pretrained(folder)
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(folder)
    return folder


def _image_checkpoint(folder):
    from transformers import ViTConfig, ViTImageProcessor, ViTModel
    torch.manual_seed(0)
    ViTModel(ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       image_size=32, patch_size=8)).save_pretrained(folder)
    ViTImageProcessor(size={'height': 32, 'width': 32}).save_pretrained(folder)
    return folder


def test_a_local_text_checkpoint_gets_a_new_head_that_trains(csv_file, tmp_path):
    import toukit
    folder = _text_checkpoint(tmp_path / 'bert')
    net = toukit.create_model(str(folder), num_classes=3)
    assert toukit.new_modules(net) == ['model.classifier']
    record = _text_run(tmp_path, csv_file, model=str(folder), method='lora', rank=2)
    assert record['status'] == 'ok' and record['new_modules'] == ['model.classifier']


def test_a_local_image_checkpoint_trains_on_an_image_folder(tmp_path):
    folder = _image_checkpoint(tmp_path / 'vit')
    images = _image_folder(tmp_path / 'images')
    record = train.run(model=str(folder), dataset=str(images), results_dir=str(tmp_path / 'results'), image_size=48,
                       **QUICK)  # not the checkpoint's 32: its position embeddings are interpolated
    assert record['status'] == 'ok' and record['new_modules'] == ['model.classifier']
    assert record['metrics']['final']['merge'] == 'merged'


def test_duplicates_are_dropped_before_the_split_and_counted(tmp_path):
    frame = _texts()
    path = tmp_path / 'dup.csv'
    pd.concat([frame, frame.iloc[:4].assign(review=lambda f: f.review + '  ')]).to_csv(path, index=False)
    source = data.read_source(str(path), 'review', 'topic')
    assert source.duplicates == 4 and len(source.labels) == 30  # whitespace-normalised copies: first kept


def test_too_few_examples_of_a_class_are_named(tmp_path):
    path = tmp_path / 'few.csv'
    _texts().assign(topic=lambda f: np.where(f.index == 0, 'rare', f.topic)).to_csv(path, index=False)
    with pytest.raises(ValueError, match=r'few.csv: too few examples to split by class: rare \(1\)'):
        data.load_dataset(str(path), model=train.create_model('tiny-bert', 4), text_column='review',
                          label_column='topic')


def test_python_inputs_are_hashed_by_content():
    class Arrays(torch.utils.data.Dataset):
        def __init__(self, big):
            self.x = [np.full(2000, v, dtype=np.float32) for v in (0.0, big)]

        def __len__(self):
            return 2

        def __getitem__(self, i):
            return self.x[i], i

    assert data.dataset_source(Arrays(1.0)).name != data.dataset_source(Arrays(2.0)).name  # repr would summarise both

    class Opaque(torch.utils.data.Dataset):
        def __len__(self):
            return 1

        def __getitem__(self, i):
            return object(), 0
    with pytest.raises(ValueError, match='item 0: an input of type object cannot be hashed'):
        data.dataset_source(Opaque())
