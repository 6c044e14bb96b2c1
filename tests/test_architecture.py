"The package's floors: data → model → hessian → optimizers → runs → experiments | landscape | original | dynamics → scale → cli"
import ast
from pathlib import Path
import pytest

PKG = Path(__file__).parents[1]/'secondorder_cnn'
FLOORS = {'data': 0, 'model': 1, 'hessian': 2, 'optimizers': 3, 'runs': 4,
          'experiments': 5, 'landscape': 5, 'original': 5, 'dynamics': 5, 'scale': 6, 'cli': 7}


def imports(module:str) -> list[tuple[str, list[str]]]:
    "(imported module, names) for every import of the package's own modules in `module`"
    out = []
    for node in ast.walk(ast.parse((PKG/f'{module}.py').read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module: out.append((node.module, [a.name for a in node.names]))
            else: out += [(a.name, []) for a in node.names if a.name in FLOORS]
    return out


def test_every_module_has_a_floor():
    assert sorted(p.stem for p in PKG.glob('*.py') if not p.stem.startswith('_')) == sorted(FLOORS)


@pytest.mark.parametrize('module', list(FLOORS))
def test_imports_go_down_and_only_public_names(module):
    for dep, names in imports(module):
        assert FLOORS[dep] < FLOORS[module], f'{module} imports {dep}, which is not below it'
        private = [n for n in names if n.startswith('_') and n != '__version__']
        assert not private, f'{module} imports private names of {dep}: {private}'


def test_one_parser():
    found = {p.stem: p.read_text().count('ArgumentParser') for p in PKG.glob('*.py')}
    assert {k: v for k, v in found.items() if v} == {'cli': 1}


def all_lines(p:Path) -> set[int]:
    "Line numbers of the `__all__` list nbdev writes"
    nodes = [n for n in ast.parse(p.read_text()).body if isinstance(n, ast.Assign)
             and any(getattr(t, 'id', None) == '__all__' for t in n.targets)]
    return {i for n in nodes for i in range(n.lineno, n.end_lineno + 1)}


def test_lines_fit_in_120_characters():
    long = [f'{p.name}:{i}' for p in PKG.glob('*.py') if p.name != '_modidx.py'
            for i, line in enumerate(p.read_text().splitlines(), 1) if len(line) > 120 and i not in all_lines(p)]
    assert not long, long


@pytest.mark.parametrize('module', list(FLOORS))
def test_docstrings_hold_no_control_characters(module):
    "A docstring with TeX in a plain string loses its backslashes: `\\top` becomes a tab, `\\approx` a bell"
    tree = ast.parse((PKG/f'{module}.py').read_text())
    docs = [(n.name, ast.get_docstring(n, clean=False)) for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    bad = [name for name, d in docs if d and any(c in d for c in '\t\a\b\f\v\r')]
    assert not bad, f"{module}: docstrings with control characters (write them as r-strings): {bad}"
