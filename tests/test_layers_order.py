"""Every import in toukit points down: a module never imports one above it, directly or lazily in a function."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

# bottom to top: each module may import only those before it
ORDER = ['linalg', 'targets', 'convert', 'models', 'calibration', 'ranks', 'layers', 'methods', 'spectrum', 'updates',
         'studies', 'data', 'checkpoint', 'results', 'train', 'notebooks', 'sweep', 'claims', 'plots', 'cli']
PACKAGE = Path(__file__).resolve().parents[1] / 'toukit'


def _imports(path: Path):
    """(line, toukit module) for every relative import in the file, at any depth."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            names = [node.module] if node.module else [a.name for a in node.names]
            for name in names:
                yield node.lineno, name.split('.')[0]


def test_the_order_names_every_module():
    assert set(ORDER) == {p.stem for p in PACKAGE.glob('*.py')} - {'__init__'}


@pytest.mark.parametrize('module', ORDER)
def test_imports_point_down(module):
    upward = [(line, name) for line, name in _imports(PACKAGE / f'{module}.py')
              if ORDER.index(name) >= ORDER.index(module)]
    assert not upward, f'toukit/{module}.py imports modules above it: {upward}'


@pytest.mark.parametrize('first,second', [('methods', 'spectrum'), ('spectrum', 'methods'), ('ranks', 'methods')])
def test_modules_import_in_either_order(first, second):
    code = f'import toukit.{first}, toukit.{second}'
    subprocess.run([sys.executable, '-c', code], check=True)
