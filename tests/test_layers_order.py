"""Every import in toukit points down: a module never imports one above it, directly or lazily in a function."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

# bottom to top: each module may import only those before it
ORDER = ['linalg', 'targets', 'convert', 'models', 'calibration', 'ranks', 'layers', 'surgery', 'tou', 'peft_methods',
         'methods', 'spectrum', 'updates',
         'studies', 'data', 'meter', 'step', 'config', 'runstate', 'results', 'train', 'notebooks', 'claims',
         'lr_choice', 'sweep', 'gap', 'method_table', 'plots', 'cli']
PACKAGE = Path(__file__).resolve().parents[1] / 'toukit'


def _files(module: str):
    """A module's file, or every file of a subpackage (toukit/data/)."""
    return sorted((PACKAGE / module).glob('*.py')) if (PACKAGE / module).is_dir() else [PACKAGE / f'{module}.py']


def _imports(path: Path):
    """(file:line, toukit module) for every import of another toukit module in the file, at any depth (in a
    subpackage, its own modules' imports of each other are inside it and left out)."""
    depth = 1 if path.parent == PACKAGE else 2
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == depth:
            names = [node.module] if node.module else [a.name for a in node.names]
            for name in names:
                yield f'{path.name}:{node.lineno}', name.split('.')[0]


def test_the_order_names_every_module():
    packages = {p.name for p in PACKAGE.iterdir() if (p / '__init__.py').exists()}
    modules = {p.stem for p in PACKAGE.glob('*.py')} | packages
    assert set(ORDER) == modules - {'__init__'}


@pytest.mark.parametrize('module', ORDER)
def test_imports_point_down(module):
    upward = [(line, name) for path in _files(module) for line, name in _imports(path)
              if ORDER.index(name) >= ORDER.index(module)]
    assert not upward, f'toukit/{module}.py imports modules above it: {upward}'


@pytest.mark.parametrize('first,second', [('methods', 'spectrum'), ('spectrum', 'methods'), ('ranks', 'methods')])
def test_modules_import_in_either_order(first, second):
    code = f'import toukit.{first}, toukit.{second}'
    subprocess.run([sys.executable, '-c', code], check=True)
