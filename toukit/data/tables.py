"""A table file's rows as a `Source`: labels as the user wrote them, and rows without a text, or repeated, dropped
and counted.

Rows are named by their data row, counted from 1 without the header (a CSV's data row n is its line n + 1 when
no text spans lines; a JSON Lines file's is its line n).
"""
import hashlib
import re
from collections import Counter
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

from .base import CONFLICTING, EXACT, Source, class_labels

DROP_REASONS = ('missing text', 'empty text', EXACT, CONFLICTING)  # in the order they are applied
SPLIT_NAMES = {'train': 'train', 'val': 'val', 'valid': 'val', 'validation': 'val', 'dev': 'val', 'test': 'test'}
NUMBER = re.compile(r'[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?')  # a label written as a number
SHOWN = 5  # spellings named in a normalisation's note


def read_frame(path: Path) -> pd.DataFrame:
    """The rows of a table file, by its suffix; an unreadable or empty one is refused, naming it."""
    if path.stat().st_size == 0:
        raise ValueError(f'{path}: the file is empty')
    suffix = path.suffix.lower()
    try:
        if suffix == '.parquet':
            frame = pd.read_parquet(path)
        elif suffix in ('.jsonl', '.json'):
            frame = pd.read_json(path, lines=True, dtype=False, convert_dates=False)  # values as JSON typed them
        else:
            # as written: '1.0' stays '1.0', and 'NA', 'null' or 'None' are texts; only an empty cell is missing
            frame = pd.read_csv(path, sep='\t' if suffix == '.tsv' else ',', dtype=str, keep_default_na=False,
                                na_values=[''])
    except Exception as e:  # noqa: BLE001 - any parser's failure is reported with the file's name
        raise ValueError(f'{path}: not a readable {suffix[1:]} table ({type(e).__name__}: {e})') from None
    if frame.empty:
        raise ValueError(f'{path}: the table has no rows')
    return frame


def read_table(path: Path, text_column: str, label_column: str, split_column: Optional[str]) -> Source:
    """A table file's texts and labels (see the module's docstring), with what was dropped and normalised.

    Raises:
        ValueError: naming the file, the column, the data row and the value: a missing column, a missing label, a
            dict or list as a text or a label, labels mixing numbers and words or differing only in case, an unknown
            split value, one class only.
    """
    frame = read_frame(path)
    for role, column in (('text', text_column), ('label', label_column), ('split', split_column)):
        if column is not None and column not in frame:
            raise ValueError(f'{path}: no {role} column {column!r}; its columns are {", ".join(map(str, frame))}')
    texts, raw = frame[text_column].tolist(), frame[label_column].tolist()
    for role, column, values in (('a text', text_column, texts), ('a label', label_column, raw)):
        _refuse_containers(values, f'{path}, column {column!r}', role)
    missing = [i for i, v in enumerate(raw) if pd.isna(v)]
    if missing:
        raise ValueError(f'{path}: the label column {label_column!r} has {len(missing)} missing values (first at '
                         f'data row {missing[0] + 1})')
    values, notes = label_values(raw, f'{path}, column {label_column!r}')
    splits = _splits_of(frame[split_column].tolist(), f'{path}, column {split_column!r}') if split_column else None
    keep, dropped = kept_rows(texts, values)
    labels, classes = class_labels([values[i] for i in keep], str(path))
    return Source('table', str(path), [str(texts[i]) for i in keep], labels, classes,
                  None if splits is None else splits[keep], hashlib.sha256(path.read_bytes()).hexdigest(),
                  read=len(frame), dropped=dropped, notes=notes,
                  given_split=None if split_column is None else f'column {split_column!r}')


def _refuse_containers(values: Sequence, where: str, role: str) -> None:
    """Raise a ValueError naming the first dict or list (a JSON object or array, a Parquet list) among `values`."""
    for i, v in enumerate(values):
        if isinstance(v, (dict, list, tuple, np.ndarray)):
            kind = 'dict' if isinstance(v, dict) else 'list'
            raise ValueError(f'{where}: data row {i + 1} holds a {kind} ({_short(v)}) where {role} is expected')


def _short(value, width: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= width else text[:width - 3] + '...'


def _kind(value) -> str:
    """'number' for a number or a string that reads as one, else 'word'."""
    if isinstance(value, (bool, np.bool_)):
        return 'word'
    if isinstance(value, (int, float, np.integer, np.floating)):
        return 'number'
    return 'number' if NUMBER.fullmatch(str(value).strip()) else 'word'


def _number(value):
    """A label as a number: an int when it is integral (1 and 1.0 are one class), else a float."""
    number = float(str(value).strip()) if isinstance(value, str) else float(value)
    return int(number) if number.is_integer() else number


def label_values(raw: Sequence, where: str) -> Tuple[list, List[str]]:
    """The labels as read: numbers when every one is a number (or a string that reads as one), else strings with
    surrounding white space stripped; and a note for each normalisation applied.

    Raises:
        ValueError: numbers and words mixed (naming the first row of the rarer kind and its value), or labels that
            differ only in case (naming both and a row of each).
    """
    kinds = [_kind(v) for v in raw]
    counts = Counter(kinds)
    main = kinds[0] if counts['number'] == counts['word'] else counts.most_common(1)[0][0]
    odd = next((i for i, k in enumerate(kinds) if k != main), None)
    if odd is not None:
        first = kinds.index(main)
        raise ValueError(f'{where}: data row {odd + 1} holds the {kinds[odd]} {raw[odd]!r} where the other labels '
                         f'are {main}s (data row {first + 1}: {raw[first]!r}); a label column holds numbers only or '
                         f'words only')
    if main == 'number':
        values = [_number(v) for v in raw]
        return values, _notes(raw, values, 'read as a number')
    values = [str(v).strip() for v in raw]
    by_case: Dict[str, Dict[str, int]] = {}
    for i, v in enumerate(values):
        by_case.setdefault(v.casefold(), {}).setdefault(v, i)
    for spellings in by_case.values():
        if len(spellings) > 1:
            (a, i), (b, j) = list(spellings.items())[:2]
            raise ValueError(f'{where}: labels {a!r} (data row {i + 1}) and {b!r} (data row {j + 1}) differ only in '
                             f'case; write each class one way (or name different classes differently)')
    return values, _notes(raw, values, 'surrounding white space stripped')


def _notes(raw: Sequence, values: Sequence, says: str) -> List[str]:
    """A note per label value written in more than one way, or in a way other than its class name."""
    spellings: Dict[object, Counter] = {}
    for r, v in zip(raw, values):
        spellings.setdefault(v, Counter())[r if isinstance(r, str) else str(r)] += 1
    notes = []
    for v, written in spellings.items():
        if set(written) != {str(v)}:
            changed = sum(n for w, n in written.items() if w != str(v))
            shown = ', '.join(repr(w) for w in list(written)[:SHOWN]) + (' ...' if len(written) > SHOWN else '')
            notes.append(f'label {str(v)!r}: written {shown} ({changed} rows otherwise); {says}')
    return notes


def kept_rows(texts: Sequence, values: Sequence) -> Tuple[np.ndarray, Dict[str, List[int]]]:
    """The rows kept (indices) and the data rows (from 1) dropped, by reason: a missing text, an empty or white
    space only text, an exact duplicate (the same text, white space normalised, and label: the first is kept), or a
    conflicting duplicate (the same text under different labels: every copy is dropped)."""
    dropped: Dict[str, List[int]] = {r: [] for r in DROP_REASONS}
    rows: Dict[str, List[int]] = {}  # normalised text -> its rows, in order
    for i, t in enumerate(texts):
        if pd.isna(t):
            dropped['missing text'].append(i + 1)
            continue
        key = ' '.join(str(t).split())
        if not key:
            dropped['empty text'].append(i + 1)
            continue
        rows.setdefault(key, []).append(i)
    keep = []
    for same in rows.values():
        if len({values[i] for i in same}) > 1:
            dropped[CONFLICTING].extend(i + 1 for i in same)
            continue
        keep.append(same[0])
        dropped[EXACT].extend(i + 1 for i in same[1:])
    dropped = {reason: sorted(numbers) for reason, numbers in dropped.items()}
    return np.asarray(sorted(keep), dtype=np.int64), dropped


def _splits_of(values: Sequence, where: str) -> np.ndarray:
    """Each row's split, from a split column's values (train, val / valid / validation / dev, test)."""
    names = [str(v).strip().lower() for v in values]
    unknown = sorted({str(v) for v, n in zip(values, names) if n not in SPLIT_NAMES})
    if unknown:
        first = next(i for i, n in enumerate(names) if n not in SPLIT_NAMES)
        raise ValueError(f'{where}: unknown split values {unknown[:5]} (first at data row {first + 1}); use train, '
                         f'val (or validation) and test')
    return np.asarray([SPLIT_NAMES[n] for n in names])
