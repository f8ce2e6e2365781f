"""Every notebook is paired with a percent-format script holding the same cells (jupytext), and both lint clean."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / 'notebooks').glob('*.ipynb'))
SYNC = 'jupytext --sync notebooks/*.ipynb'


def _cells(path: Path):
    import jupytext
    return [(c.cell_type, c.source.strip(), tuple(c.metadata.get('tags', ()))) for c in jupytext.read(path).cells]


def paired_differences(notebook: Path) -> list:
    """Why `notebook` and its script differ (empty when they hold the same cells)."""
    script = notebook.with_suffix('.py')
    if not script.exists():
        return [f'{notebook.name} has no paired script {script.name}: run `{SYNC}`']
    a, b = _cells(notebook), _cells(script)
    problems = [f'{notebook.name} and {script.name} differ at cell {i}: run `{SYNC}` after editing one of them'
                for i, (x, y) in enumerate(zip(a, b)) if x != y]
    if len(a) != len(b):
        problems.append(f'{notebook.name} has {len(a)} cells and {script.name} {len(b)}: run `{SYNC}`')
    return problems


def test_there_are_notebooks_and_no_generator():
    assert {p.stem for p in NOTEBOOKS} == {'train', 'spectrum', 'rank_selection', 'reconstruction', 'updates',
                                           'figures'}
    assert not (ROOT / 'tools' / 'make_notebooks.py').exists()


@pytest.mark.parametrize('notebook', NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_and_script_hold_the_same_cells(notebook):
    assert paired_differences(notebook) == []


def test_a_one_sided_edit_is_caught(tmp_path):
    for suffix in ('.ipynb', '.py'):
        shutil.copy(ROOT / 'notebooks' / f'train{suffix}', tmp_path / f'train{suffix}')
    assert paired_differences(tmp_path / 'train.ipynb') == []
    script = tmp_path / 'train.py'
    script.write_text(script.read_text().replace('seed: int = 0', 'seed: int = 1'))
    [problem] = paired_differences(tmp_path / 'train.ipynb')
    assert 'train.ipynb and train.py differ' in problem and SYNC in problem


def test_notebooks_keep_no_outputs_and_the_parameters_tag():
    import nbformat
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        assert not any(c.get('outputs') for c in nb.cells), f'{path.name} has outputs: clear them before committing'
        assert [c for c in nb.cells if 'parameters' in c.metadata.get('tags', [])], path.name


def test_library_notebooks_and_tests_lint_clean():
    pytest.importorskip('pyflakes')
    done = subprocess.run([sys.executable, '-m', 'pyflakes', 'toukit', 'tests', 'benchmarks',
                           *map(str, sorted((ROOT / 'notebooks').glob('*.py')))], cwd=ROOT, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stdout + done.stderr
