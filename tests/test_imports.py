"""No import cycle among sipo_plugin's modules, function-local imports included.

The graph is read from the source with ``ast`` (nothing is imported): an edge A -> B for every
``import`` / ``from ... import`` in A, at the top or inside a function, that names B or a name
defined in B. ``from pkg import sub`` points at the submodule ``pkg.sub`` when it is one, else at
``pkg/__init__.py``. The implicit import of a package's ``__init__`` when one of its submodules
loads is not an edge: every package would otherwise be a cycle with its lazy loader.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = "sipo_plugin"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE


def module_files(root: Path = ROOT) -> dict[str, Path]:
    """{dotted module name: file} for every .py file of the package (``pkg/__init__.py`` -> pkg)."""
    out = {}
    for file in sorted(root.rglob("*.py")):
        parts = list(file.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = file
    return out


def is_package(module: str, files: dict[str, Path]) -> bool:
    return files[module].name == "__init__.py"


def resolve(module: str, node: ast.ImportFrom, files: dict[str, Path]) -> str:
    """The absolute module a ``from`` import reads from (relative levels resolved)."""
    if not node.level:
        return node.module or ""
    base = module.split(".")
    if not is_package(module, files):
        base = base[:-1]  # a plain module's relative imports start at its package
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imported_modules(module: str, files: dict[str, Path]) -> set[str]:
    """The package modules ``module`` imports anywhere in its source."""
    tree = ast.parse(files[module].read_text(encoding="utf-8"), str(files[module]))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            source = resolve(module, node, files)
            targets = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in files else source
                       for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in files:  # `import a.b.c` where c is a name: a.b
                target = target.rpartition(".")[0]
            if target and target != module:
                found.add(target)
    return found


def import_graph(files: dict[str, Path]) -> dict[str, set[str]]:
    return {module: imported_modules(module, files) for module in files}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a path back to its start) per strongly connected component with more than one
    module (Tarjan's algorithm, iterative)."""
    index, low, on_stack, stack, components = {}, {}, set(), [], []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(set(component))
    return [cycle_in(graph, component) for component in components]


def cycle_in(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest cycle through the component's first module (breadth-first inside it)."""
    start = min(component)
    parents, frontier = {start: None}, [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(graph[node] & component):
                if child == start:
                    path = [node]  # node back to start through the parents, then reversed
                    while parents[path[-1]] is not None:
                        path.append(parents[path[-1]])
                    return [*reversed(path), start]
                if child not in parents:
                    parents[child] = node
                    following.append(child)
        frontier = following
    raise AssertionError(f"no cycle in component {sorted(component)}")


def test_graph_sees_top_level_and_function_local_imports(tmp_path):
    pkg = tmp_path / PACKAGE
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("def f():\n    from .b import x\n")
    (pkg / "sub" / "a.py").write_text("from . import b\nimport sipo_plugin.sub.c\n")
    (pkg / "sub" / "b.py").write_text("x = 1\ndef g():\n    from ..sub import a  # local\n")
    (pkg / "sub" / "c.py").write_text("from sipo_plugin.sub.b import x\n")
    files = module_files(pkg)
    graph = import_graph(files)
    assert graph == {"sipo_plugin": set(), "sipo_plugin.sub": {"sipo_plugin.sub.b"},
                     "sipo_plugin.sub.a": {"sipo_plugin.sub.b", "sipo_plugin.sub.c"},
                     "sipo_plugin.sub.b": {"sipo_plugin.sub.a"},
                     "sipo_plugin.sub.c": {"sipo_plugin.sub.b"}}
    assert find_cycles(graph) == [["sipo_plugin.sub.a", "sipo_plugin.sub.b", "sipo_plugin.sub.a"]]
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_no_import_cycle():
    cycles = find_cycles(import_graph(module_files()))
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_lazy_package_names_load_on_first_use_and_stay():
    from sipo_plugin.utils.lazy import lazy_getattr, module_of_names
    namespace: dict = {}
    getter = lazy_getattr("sipo_plugin.utils", module_of_names({"seeding": ["seeded_generator"]}),
                          namespace)
    from sipo_plugin.utils.seeding import seeded_generator
    assert getter("seeded_generator") is seeded_generator
    assert namespace == {"seeded_generator": seeded_generator}  # later reads skip the getter
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        getter("nope")
