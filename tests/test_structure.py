"""The package's import graph keeps the layering of ARCHITECTURE.md: `train -> model -> ops`,
`train -> data`, nothing back up, and no import cycle anywhere.

The graph is read from the sources with `ast`, function-level (lazy) imports included, so a
cycle or a layering breach hidden inside a function is found too. A failure names the files."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

import mmgpt_engine

ROOT = Path(mmgpt_engine.__file__).resolve().parent
PACKAGE = "mmgpt_engine"
# (importing part, imported part): never allowed
FORBIDDEN = [("ops", "model"), ("ops", "data"), ("ops", "train"), ("ops", "integrations"),
             ("data", "model"), ("data", "train"), ("model", "train"), ("model", "data")]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package modules `path` imports anywhere in its body."""
    is_package = path.name == "__init__.py"
    base = name.split(".") if is_package else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base[:len(base) - (node.level - 1)]
                module = ".".join(anchor + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # `from pkg import sub` imports the submodule when there is one, else pkg itself
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in known else module for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import a.b.c` where c is an attribute
                target = target.rpartition(".")[0]
            if target.startswith(PACKAGE) and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    known = _modules()
    return {name: _imports(name, path, known) for name, path in known.items()}


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _file(module: str) -> str:
    return str(_modules()[module].relative_to(ROOT.parent))


def find_cycle(graph: dict[str, set[str]]):
    """One import cycle as a list of modules (first == last), or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_graph_is_read_with_lazy_imports():
    graph = import_graph()
    assert "mmgpt_engine.ops._dispatch" in graph["mmgpt_engine.ops.attention"]
    # a function-level import counts: _dispatch reaches the cuda launchers lazily
    assert "mmgpt_engine.ops.cuda" in graph["mmgpt_engine.ops._dispatch"]
    assert "mmgpt_engine.ops" in graph["mmgpt_engine.train.cli"]


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(_file(m) for m in cycle)


@pytest.mark.parametrize("importer,imported", FORBIDDEN, ids=lambda x: x)
def test_layering(importer, imported):
    breaches = sorted((a, b) for a, targets in import_graph().items() for b in targets
                      if _part(a) == importer and _part(b) == imported)
    assert not breaches, f"{importer} must not import {imported}: " + ", ".join(
        f"{_file(a)} imports {_file(b)}" for a, b in breaches)


def test_the_checks_can_fail():
    """The cycle finder and the layering rule on a graph that breaks both."""
    graph = {"mmgpt_engine.ops.a": {"mmgpt_engine.model.b"}, "mmgpt_engine.model.b": {"mmgpt_engine.ops.a"}}
    assert find_cycle(graph) == ["mmgpt_engine.model.b", "mmgpt_engine.ops.a", "mmgpt_engine.model.b"]
    assert ("ops", "model") in FORBIDDEN and _part("mmgpt_engine.ops.a") == "ops"
