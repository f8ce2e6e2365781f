"""Your data checked in full and said back: labels as written, rows dropped and counted, images decoded, a torch
Dataset's items checked; each input error a ValueError naming the file, the column or item, the row and the value."""
import json
import re

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from toukit import data

WORDS = {'sport': 'match goal team win league', 'tech': 'chip software phone code data',
         'food': 'bread soup cheese pasta salad'}


def _frame(n=30, labels=('sport', 'tech', 'food'), seed=0):
    """n distinct texts, labels in turn, splits train, train, train, val, test in turn."""
    rng = np.random.default_rng(seed)
    return pd.DataFrame([dict(text=f'{i} ' + ' '.join(rng.choice(list(WORDS.values())[i % 3].split(), 5)),
                              label=labels[i % len(labels)], part=['train', 'train', 'train', 'val', 'test'][i % 5])
                         for i in range(n)])


def _jsonl(path, rows):
    path.write_text(''.join(json.dumps(r) + '\n' for r in rows))
    return str(path)


def _csv(path, frame):
    frame.to_csv(path, index=False)
    return str(path)


def test_integer_labels_keep_numeric_order_and_their_index(tmp_path):
    source = data.read_source(_csv(tmp_path / 'twelve.csv', _frame(60, labels=list(range(12)))))
    assert source.classes == [str(k) for k in range(12)]  # not '0', '1', '10', '11', '2', ...
    assert source.labels.tolist() == [i % 12 for i in range(60)] and source.notes == []


def test_one_and_one_point_zero_are_one_class_and_it_is_said(tmp_path):
    rows = _frame(30, labels=(1, 2, 3)).to_dict('records')
    rows[0]['label'], rows[3]['label'], rows[6]['label'] = '1.0', ' 1', 1.0  # the same class, written three ways
    source = data.read_source(_jsonl(tmp_path / 'ones.jsonl', rows))
    assert source.classes == ['1', '2', '3'] and np.bincount(source.labels).tolist() == [10, 10, 10]
    [note] = source.notes
    assert "label '1'" in note and "'1.0'" in note and "' 1'" in note and 'read as a number' in note


def test_labels_that_differ_in_surrounding_white_space_are_merged_and_said(tmp_path):
    frame = _frame().assign(label=lambda f: f.label.where(f.index % 6 != 0, 'sport '))
    source = data.read_source(_csv(tmp_path / 'spaces.csv', frame))
    assert source.classes == ['food', 'sport', 'tech'] and np.bincount(source.labels).tolist() == [10, 10, 10]
    [note] = source.notes
    assert "label 'sport'" in note and "'sport '" in note and '5 rows otherwise' in note and 'white space' in note
    assert note in data.format_summary(data.source_summary(source, 0))


def test_labels_that_differ_in_case_are_an_error_naming_both(tmp_path):
    frame = _frame().assign(label=lambda f: f.label.where(f.index != 9, 'Sport'))
    with pytest.raises(ValueError, match=r"case.csv, column 'label': labels 'sport' \(data row 1\) and 'Sport' "
                                         r"\(data row 10\) differ only in case"):
        data.read_source(_csv(tmp_path / 'case.csv', frame))


def test_numbers_and_words_mixed_in_a_label_column_are_an_error_naming_the_row(tmp_path):
    frame = _frame(labels=(0, 1, 2)).astype({'label': object})
    frame.loc[7, 'label'] = 'sport'
    with pytest.raises(ValueError, match=r"mixed.csv, column 'label': data row 8 holds the word 'sport' where the "
                                         r"other labels are numbers"):
        data.read_source(_csv(tmp_path / 'mixed.csv', frame))


@pytest.mark.parametrize('column,value,kind', [('text', {'body': 'a dict'}, 'dict'), ('label', ['a', 'list'], 'list')])
def test_a_dict_or_list_as_text_or_label_is_an_error_naming_the_row(tmp_path, column, value, kind):
    rows = _frame().to_dict('records')
    rows[4][column] = value
    with pytest.raises(ValueError, match=rf"nested.jsonl, column '{column}': data row 5 holds a {kind} \("):
        data.read_source(_jsonl(tmp_path / 'nested.jsonl', rows))


def test_a_missing_label_is_named_with_its_row(tmp_path):
    frame = _frame().assign(label=lambda f: f.label.where(f.index != 3))
    with pytest.raises(ValueError, match=r"holes.csv: the label column 'label' has 1 missing values \(first at data "
                                         r"row 4\)"):
        data.read_source(_csv(tmp_path / 'holes.csv', frame))


def test_rows_are_dropped_by_reason_counted_and_named(tmp_path):
    rows = _frame(30).to_dict('records')
    rows[2]['text'] = None  # data row 3: missing
    rows[5]['text'] = '   '  # data row 6: empty
    rows += [dict(rows[0], text=rows[0]['text'] + '  '),  # data row 31: an exact copy of row 1 (white space aside)
             dict(rows[1], label='food' if rows[1]['label'] != 'food' else 'tech')]  # data row 32: conflicts with 2
    source = data.read_source(_jsonl(tmp_path / 'rows.jsonl', rows))
    summary = data.source_summary(source, 0)
    assert summary['read'] == 32 and summary['kept'] == 27 == len(source.inputs)
    assert summary['dropped'] == {'missing text': dict(count=1, first=[3]), 'empty text': dict(count=1, first=[6]),
                                  'exact duplicates': dict(count=1, first=[31]),
                                  'conflicting duplicates': dict(count=2, first=[2, 32])}
    assert '' not in source.inputs and rows[1]['text'] not in source.inputs
    text = data.format_summary(summary)
    assert '32 rows read, 27 kept' in text and '1 missing text (data row 3)' in text
    assert '2 conflicting duplicates (data rows 2, 32)' in text


def test_the_summary_gives_classes_per_split_and_is_json(tmp_path):
    source = data.read_source(_csv(tmp_path / 'split.csv', _frame()), split_column='part')
    summary = json.loads(json.dumps(data.source_summary(source, 0)))
    assert summary['sizes'] == dict(train=18, val=6, test=6) and summary['split'] == "given by column 'part'"
    assert summary['classes'] == {c: dict(train=6, val=2, test=2) for c in ('food', 'sport', 'tech')}
    text = data.format_summary(summary)
    assert len(text.splitlines()) <= 6 and 'food 6/2/2' in text and 'train 18, val 6, test 6' in text
    assert data.source_summary(data.read_source(_csv(tmp_path / 'plain.csv', _frame())), 0)['split'].startswith(
        'stratified 60/20/20')


def test_a_class_in_test_but_not_in_train_is_an_error_naming_both(tmp_path):
    frame = pd.concat([_frame(), pd.DataFrame(dict(text=[f'new {i}' for i in range(5)], label='art', part='test'))])
    source = data.read_source(_csv(tmp_path / 'open.csv', frame), split_column='part')
    with pytest.raises(ValueError, match=r"open.csv: class 'art' is in test \(5 examples\) but not in train"):
        data.source_summary(source, 0)


@pytest.mark.parametrize('name', ['photos/', 'data/x.csv', 'x.tsv'])
def test_a_path_that_does_not_exist_says_so(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert data.is_source(name) and not data.is_source('bbc')
    with pytest.raises(ValueError, match=rf"dataset='{name}': no such file or folder"):
        data.num_classes_of(name)


def _images(root, per_class=5):
    for c, colour in (('red', (200, 30, 30)), ('blue', (30, 30, 200))):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(np.full((16, 16, 3), colour, np.uint8) + i).save(root / c / f'{i}.jpg')
    return root


def test_a_truncated_jpeg_is_caught_at_read_naming_the_file(tmp_path):
    root = _images(tmp_path / 'images')
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(root / 'red' / 'cut.jpg')
    whole = (root / 'red' / 'cut.jpg').read_bytes()
    (root / 'red' / 'cut.jpg').write_bytes(whole[:len(whole) * 3 // 4])  # the header whole: verify() passes it
    with Image.open(root / 'red' / 'cut.jpg') as image:
        image.verify()
    with pytest.raises(ValueError, match=r'red/cut.jpg: unreadable image \(OSError: image file is truncated'):
        data.read_source(str(root))


def test_files_that_are_not_images_are_skipped_and_listed(tmp_path):
    root = _images(tmp_path / 'images')
    (root / 'red' / 'notes.txt').write_text('not an image')
    (root / 'README.md').write_text('about')
    (root / 'blue' / '0 copy.jpg').write_bytes((root / 'blue' / '0.jpg').read_bytes())
    summary = data.source_summary(data.read_source(str(root)), 0)
    assert summary['unit'] == 'image files' and (summary['read'], summary['kept']) == (11, 10)
    assert summary['skipped'] == dict(count=2, first=['README.md', 'red/notes.txt'])
    assert summary['dropped'] == {'exact duplicates': dict(count=1, first=['blue/0.jpg'])}  # sorted: the copy first
    text = data.format_summary(summary)
    assert 'skipped (not images): 2 (README.md, red/notes.txt)' in text and '1 exact duplicates (blue/0.jpg)' in text


def test_a_folder_inside_a_class_folder_is_an_error_naming_it(tmp_path):
    root = _images(tmp_path / 'images')
    _images(root / 'red' / 'more')
    with pytest.raises(ValueError, match=r"red/more: a folder inside the class folder 'red'"):
        data.read_source(str(root))


class Items(torch.utils.data.Dataset):
    """A torch Dataset of the given items."""

    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def _good(n=10):
    return [(torch.full((3,), float(i)), i % 2) for i in range(n)]


@pytest.mark.parametrize('bad,says', [
    ((torch.zeros(3), 1, 'x'), 'item 4 is a tuple of 3 values, not an (input, label) pair'),
    (torch.zeros(3), 'item 4 is a Tensor, not an (input, label) pair'),
    ((torch.zeros(3), -1), 'item 4 has the label -1 (negative)'),
    ((torch.zeros(3), 1.0), 'item 4 has the label 1.0 (a float)'),
    ((torch.zeros(3), torch.tensor([0., 1.])), 'item 4 has the label tensor([0., 1.]) (a Tensor of shape (2,): a '
                                               'one-hot'),
    ((torch.zeros(3), None), 'item 4 has the label None (a NoneType)'),
    ((torch.zeros(3), 'cat'), "item 4 has the label 'cat' where item 0 has 0"),
    ((torch.zeros(4), 1), 'item 4 has an input of shape (4,) where item 0 has (3,)'),
])
def test_a_bad_dataset_item_is_named_by_index_and_value(bad, says):
    items = _good()
    items[4] = bad
    with pytest.raises(ValueError, match=r'Items.*: ' + re.escape(says)):
        data.dataset_source(Items(items))


def test_dict_inputs_need_the_same_keys_and_shapes():
    items = [(dict(ids=torch.zeros(4, dtype=torch.long)), i % 2) for i in range(6)]
    items[2] = (dict(ids=torch.zeros(4, dtype=torch.long), mask=torch.ones(4)), 0)
    with pytest.raises(ValueError, match=r"item 2 has an input of shape \{'ids': \(4,\), 'mask': \(4,\)\} where item 0 "
                                         r"has \{'ids': \(4,\)\}"):
        data.dataset_source(Items(items))


def test_an_empty_dataset_is_called_empty():
    with pytest.raises(ValueError, match='dataset Items: empty'):
        data.dataset_source(Items([]))


def test_string_labels_are_mapped_in_sorted_order_and_said():
    items = [(torch.full((3,), float(i)), ['dog', 'cat', 'emu'][i % 3]) for i in range(15)]
    source = data.dataset_source(Items(items))
    assert source.classes == ['cat', 'dog', 'emu'] and source.labels.tolist()[:3] == [1, 0, 2]
    assert source.dataset[0][1] == 1 and source.dataset[1][1] == 0  # the training loop gets class indices
    summary = data.source_summary(source, 0)
    assert summary['unit'] == 'items' and summary['read'] == 15
    assert summary['normalised'] == ["string labels mapped to classes in sorted order: 'cat' -> 0, 'dog' -> 1, "
                                     "'emu' -> 2"]
    assert summary['classes'] == {c: dict(train=3, val=1, test=1) for c in ('cat', 'dog', 'emu')}


def test_integer_labels_of_any_kind_are_class_indices():
    items = [(np.zeros(2, np.float32), [np.int64(i % 2), torch.tensor(i % 2)][i % 2]) for i in range(10)]
    source = data.dataset_source(Items(items))
    assert source.classes == ['class0', 'class1'] and source.notes == [] and source.dataset.items is items


# ---------------------------------------------------------------------------------------------------------------
# through a run: an input error writes nothing; the summary is printed and recorded


@pytest.mark.parametrize('case', ['case labels', 'open-set test class', 'bad item', 'python name alone',
                                  'images for a text model', 'texts for an image model', 'a built-in set of texts'])
def test_an_input_error_raises_before_anything_is_written(case, tmp_path):
    from toukit import train
    results = tmp_path / 'results'
    kw = dict(preset='test', model='tiny-bert', epochs=1, results_dir=str(results), progress=False)
    if case == 'case labels':
        frame = _frame()
        frame.loc[4, 'label'] = 'Sport'
        kw['dataset'] = _csv(tmp_path / 'case.csv', frame)
    elif case == 'open-set test class':
        frame = pd.concat([_frame(), pd.DataFrame(dict(text=[f'n {i}' for i in range(5)], label='art', part='test'))])
        kw.update(dataset=_csv(tmp_path / 'open.csv', frame), split_column='part')
    elif case == 'bad item':
        items = _good(20)
        items[7] = (torch.zeros(3), -1)
        kw.update(data=Items(items), model='test_vit')
    elif case == 'python name alone':
        kw['dataset'] = 'python:Items:0123456789ab'
    elif case == 'images for a text model':
        kw['dataset'] = str(_images(tmp_path / 'photos'))
    elif case == 'texts for an image model':
        kw.update(dataset=_csv(tmp_path / 'reviews.csv', _frame()), model='test_vit')
    else:
        kw.update(dataset='bbc', model='test_vit')
    with pytest.raises(ValueError):
        train.run(**kw)
    assert not results.exists()  # no record, no lock, no checkpoint: the record of a failed run is for training


def test_a_run_says_its_data_back_and_records_it(tmp_path, capsys):
    from toukit import train
    frame = pd.concat([_frame(), _frame(3)])  # the first three rows again: exact duplicates
    frame.loc[7, 'text'] = ' '
    path = _csv(tmp_path / 'reviews.csv', frame)
    record = train.run(dataset=path, preset='test', model='tiny-bert', epochs=1, max_steps_per_epoch=1,
                       results_dir=str(tmp_path / 'results'), progress=True)
    said = capsys.readouterr().out
    summary = record['data']['summary']
    assert f'data: {path}' in said and '1 empty text' in said and '3 exact duplicates' in said
    assert summary['read'] == 33 and summary['kept'] == 29 and summary == data.source_summary(data.read_source(path), 0)
    assert sum(sum(c.values()) for c in summary['classes'].values()) == 29


def test_na_like_texts_and_labels_in_a_csv_are_read_as_written(tmp_path):
    frame = _frame()
    frame.loc[0, 'text'], frame.loc[1, 'text'], frame.loc[2, 'text'] = 'NA', 'null', 'None'
    source = data.read_source(_csv(tmp_path / 'na.csv', frame))
    assert {'NA', 'null', 'None'} <= set(source.inputs)
    assert not any(d['count'] for d in data.source_summary(source, 0)['dropped'].values())
