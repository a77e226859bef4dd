"""The repo's layout rules, read from the source (no module is imported):

- no import circles among the top-level modules, imports inside functions included (a lazy import is still
  a circle: the two files cannot be read or changed apart);
- the shared files (data, run folders, helpers, ops, genotypes, the model files, the teacher) never import a
  method file, so a method can be added or removed without touching them;
- no method file imports the loop (train_search.py): the loop imports the methods, never the other way.
"""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.abspath(__file__))
# What only one method uses (darts.py also holds the method interface and the shared search step)
METHOD_FILES = {'darts', 'eoinas', 'agnas', 'gdas', 'model_adwp', 'search_adwp'}
SHARED_FILES = {'datasets', 'runs', 'utils', 'operations', 'genotypes', 'model', 'model_search',
                'model_search_fast', 'model_macro', 'teacher', 'nb201', 'model_nb201'}
LOOP = 'train_search'


def local_modules() -> dict[str, str]:
    """name -> path of every top-level module of the repo."""
    return {f[:-3]: os.path.join(ROOT, f) for f in os.listdir(ROOT) if f.endswith('.py')}


def imports_of(path: str, local: set[str]) -> set[str]:
    """The repo modules a file imports anywhere in it (module level or inside a function)."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name.split('.')[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split('.')[0])
    return out & local


def import_graph() -> dict[str, set[str]]:
    modules = local_modules()
    return {name: imports_of(path, set(modules)) - {name} for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None (depth-first search with the path on a stack)."""
    state = {}  # name -> 1 on the current path, 2 done

    def visit(node, path):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt, path)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node, [])
            if found:
                return found
    return None


def test_find_cycle_on_hand_made_graphs():
    assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': set()}) is None
    assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a', 'b', 'c', 'a']
    assert find_cycle({'x': {'y'}, 'y': {'y2'}, 'y2': {'y'}}) == ['y', 'y2', 'y']


def test_imports_of_sees_imports_inside_functions(tmp_path):
    f = tmp_path / 'm.py'
    f.write_text('import os\nimport genotypes\n\ndef g():\n    from train_search import main\n    import torch.nn\n')
    assert imports_of(str(f), {'genotypes', 'train_search', 'utils'}) == {'genotypes', 'train_search'}


def test_no_import_circles():
    cycle = find_cycle(import_graph())
    assert cycle is None, f'import circle: {" -> ".join(cycle)}'


@pytest.mark.parametrize('shared', sorted(SHARED_FILES))
def test_shared_files_import_no_method(shared):
    graph = import_graph()
    if shared not in graph:
        pytest.skip(f'{shared}.py does not exist')
    assert not graph[shared] & METHOD_FILES, f'{shared}.py imports {sorted(graph[shared] & METHOD_FILES)}'


def test_no_method_imports_the_loop():
    graph = import_graph()
    offenders = sorted(m for m in METHOD_FILES | SHARED_FILES if LOOP in graph.get(m, ()))
    assert not offenders, f'{", ".join(offenders)} import(s) {LOOP}.py'
