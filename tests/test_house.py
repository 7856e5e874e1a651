"""House rules that a reader relies on, checked on the source of ``metric_ds``.

* The import graph has no cycle: the arrows go from the entry points down to the library. Every ``import``
  statement counts, at module level, inside functions and under ``TYPE_CHECKING`` alike: a cycle hidden in a
  function is still two modules that each need the other.
* No function is longer than 80 lines and no class longer than 250 (docstrings included), so each unit can be
  read in one sitting.
"""
from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "metric_ds"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The ``metric_ds`` modules that ``name`` imports anywhere in its file."""
    is_package = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # `from pkg import sub` imports the submodule when there is one, else a name of pkg itself
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in known else module for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import metric_ds.x.y as z` -> the deepest known module
                target = target.rpartition(".")[0]
            if target.startswith("metric_ds") and target != name:
                out.add(target)
    return out


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_walker_sees_imports_inside_functions(tmp_path):
    code = "def f():\n    from metric_ds.model import x\n    import metric_ds.config as c\n"
    (tmp_path / "m.py").write_text(code)
    known = {"metric_ds.model": Path(), "metric_ds.config": Path(), "metric_ds.m": tmp_path / "m.py"}
    assert _imports("metric_ds.m", tmp_path / "m.py", known) == {"metric_ds.model", "metric_ds.config"}


def test_cycle_finder_finds_a_two_module_cycle():
    assert _find_cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_in_metric_ds():
    known = _modules()
    graph = {name: _imports(name, path, known) for name, path in known.items()}
    # a package's __init__ runs before its submodules, so a submodule that imports its own package (or a parent)
    # by name is not an edge of the graph unless the package imports it back; count it like any other import
    cycle = _find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


MAX_FUNCTION_LINES = 80
MAX_CLASS_LINES = 250


def _too_long(path: Path, root: Path = REPO) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        limit = {ast.FunctionDef: MAX_FUNCTION_LINES, ast.AsyncFunctionDef: MAX_FUNCTION_LINES,
                 ast.ClassDef: MAX_CLASS_LINES}.get(type(node))
        if limit is not None and node.end_lineno - node.lineno + 1 > limit:
            out.append(f"{path.relative_to(root)}:{node.lineno} {node.name}: "
                       f"{node.end_lineno - node.lineno + 1} lines (at most {limit})")
    return out


def test_size_check_sees_a_long_function_and_a_long_method(tmp_path):
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_FUNCTION_LINES))
    (tmp_path / "m.py").write_text("def f():\n" + body + "class C:\n    def g(self):\n    " + body.replace("\n    ", "\n        "))
    found = _too_long(tmp_path / "m.py", tmp_path)
    assert [line.split()[1] for line in found] == ["f:", "g:"]


def test_no_function_or_class_too_long():
    problems = [p for path in sorted(PACKAGE.rglob("*.py")) for p in _too_long(path)]
    assert not problems, "\n".join(problems)
