"""Your data said back as read: what was read, dropped, skipped and normalised, and the classes per split, as a
JSON-serialisable dict (for the run record) and as a few lines of text (printed before training)."""
from typing import List

import numpy as np

from .base import HELD_OUT_VAL_FRACTION, SPLIT_FRACTIONS, SPLITS, Source
from .sources import source_parts

FIRST = 5  # rows or files named for each reason
UNITS = {'table': 'rows', 'image_folder': 'image files', 'python': 'items'}
CLASSES_SHOWN = 12  # classes the text lists before '... and N more'


def source_summary(source: Source, split_seed: int) -> dict:
    """What was read of your data and how it splits: rows (image files, items) read and kept; dropped, by reason,
    with their count and the first few data rows (from 1) or files; the normalisations applied; the files skipped;
    the split rule; and each class's count in train, val and test (after the split rule, before train / val / test
    limits).

    Raises:
        ValueError: the split cannot be made, or a class occurs in val or test but not in train (naming the class
            and the split).
    """
    parts = source_parts(source, split_seed)
    classes = {name: {s: int(np.sum(source.labels[idx] == k)) for s, idx in zip(SPLITS, parts)}
               for k, name in enumerate(source.classes)}
    return dict(
        source=source.origin, path=source.name, sha256=source.sha256, unit=UNITS[source.origin], read=source.read,
        kept=len(source.labels),
        dropped={reason: dict(count=len(where), first=list(where[:FIRST])) for reason, where in source.dropped.items()},
        normalised=list(source.notes),
        skipped=dict(count=len(source.skipped), first=list(source.skipped[:FIRST])),
        split=_split_rule(source, split_seed), sizes={s: len(idx) for s, idx in zip(SPLITS, parts)}, classes=classes)


def _split_rule(source: Source, split_seed: int) -> str:
    shares = '/'.join(str(round(100 * f)) for f in SPLIT_FRACTIONS)
    if source.given_split is None:
        return f'stratified {shares} (split_seed {split_seed})'
    rule = f'given by {source.given_split}'
    if not np.any(source.splits == 'val'):
        rule += f'; val: {round(100 * HELD_OUT_VAL_FRACTION)}% of train, stratified (split_seed {split_seed})'
    return rule


def format_summary(summary: dict) -> str:
    """A few lines of text that say a `source_summary` back: read and kept, dropped, normalised, skipped, the split
    and the classes per split."""
    unit = summary['unit']
    lines = [f"data: {summary['path']} ({summary['source']}, sha256 {summary['sha256'][:12]}): {summary['read']} "
             f"{unit} read, {summary['kept']} kept"]
    dropped = [_counted(reason, d) for reason, d in summary['dropped'].items() if d['count']]
    if dropped:
        lines.append(f"  dropped: {'; '.join(dropped)}")
    for note in summary['normalised'][:FIRST]:
        lines.append(f'  normalised: {note}')
    if len(summary['normalised']) > FIRST:
        lines.append(f"  normalised: ... and {len(summary['normalised']) - FIRST} more labels")
    if summary['skipped']['count']:
        lines.append(f"  skipped (not images): {_counted('', summary['skipped'])}")
    sizes = ', '.join(f'{s} {n}' for s, n in summary['sizes'].items())
    lines.append(f"  split: {summary['split']}: {sizes}")
    lines.append(f"  classes ({len(summary['classes'])}; train/val/test): {_classes(summary['classes'])}")
    return '\n'.join(lines)


def _counted(reason: str, dropped: dict) -> str:
    """'3 exact duplicates (rows 4, 9, 12)', or with files: '2 exact duplicates (a/1.png, b/2.png)'."""
    first = dropped['first']
    numbers = all(isinstance(x, int) for x in first)
    named = ', '.join(map(str, first)) + (', ...' if dropped['count'] > len(first) else '')
    rows = ('data rows ' if len(first) > 1 else 'data row ') if numbers else ''
    return ' '.join(filter(None, [str(dropped['count']), reason, f'({rows}{named})']))


def _classes(classes: dict) -> str:
    shown: List[str] = [f"{name} {'/'.join(str(n) for n in counts.values())}"
                        for name, counts in list(classes.items())[:CLASSES_SHOWN]]
    more = len(classes) - CLASSES_SHOWN
    return ', '.join(shown) + (f', ... and {more} more' if more > 0 else '')
