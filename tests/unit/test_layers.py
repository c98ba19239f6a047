"""The package's layering, read from the source: which module may import which.

    cli -> server -> service -> runtime -> router -> adapters

Each layer imports only the layers below it (and the root modules: config, errors,
failpoints). Imports inside functions count: a lazy import hides a dependency from the
reader, not from the graph. Only the in-process vLLM engine and the vLLM plugin import
vLLM, so the rest of mergeserve (and its fast tests) never loads it.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import mergeserve

ROOT = Path(mergeserve.__file__).parent

LAYERS = ["adapters", "router", "runtime", "service", "server", "cli"]
"""Bottom to top; a module of one may import those before it."""

VLLM_IMPORTERS = {"mergeserve.runtime.engine.local", "mergeserve.vllm_plugin"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path) -> Iterator[tuple[int, str]]:
    """(line, imported module) of every import in `path`, nested ones included."""
    return imports_in(path.read_text(), module_name(path), path.name == "__init__.py")


def imports_in(source: str, module: str, is_package: bool) -> Iterator[tuple[int, str]]:
    pkg = module.split(".") if is_package else module.split(".")[:-1]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(pkg[: len(pkg) - node.level + 1] + ([base] if base else []))
            yield node.lineno, base
            for alias in node.names:  # `from mergeserve.x import module`
                yield node.lineno, f"{base}.{alias.name}"


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def layer_of(module: str) -> int | None:
    parts = module.split(".")
    if len(parts) > 1 and parts[0] == "mergeserve" and parts[1] in LAYERS:
        return LAYERS.index(parts[1])
    return None


def test_each_layer_imports_only_the_layers_below_it() -> None:
    known = modules()
    wrong = []
    for name, path in known.items():
        mine = layer_of(name)
        if mine is None:
            continue
        for line, target in imports(path):
            theirs = layer_of(target)
            if target in known and theirs is not None and theirs > mine:
                wrong.append(f"{path.relative_to(ROOT.parent)}:{line} imports {target}")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles() -> None:
    # A cycle hidden by a lazy import still makes two modules one unit to read and test.
    known = modules()
    graph = {n: {t for _, t in imports(p) if t in known and t != n} for n, p in known.items()}
    cycles = strongly_connected(graph)
    assert not cycles, cycles


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """The components of more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert strongly_connected(graph) == [["a", "b", "c"]]
    assert strongly_connected({"a": {"b"}, "b": set()}) == []


def test_only_the_vllm_engine_and_the_plugin_import_vllm() -> None:
    found = {
        name
        for name, path in modules().items()
        for _, target in imports(path)
        if target == "vllm" or target.startswith("vllm.")
    }
    assert found == VLLM_IMPORTERS


def test_the_checker_sees_lazy_and_relative_imports() -> None:
    # The rules above are only as good as `imports`: it must see an import inside a
    # function and resolve relative ones.
    src = "def f():\n    from .base import Engine\n    from ..mixture import MixtureSpec\n"
    got = {t for _, t in imports_in(src, "mergeserve.runtime.engine.x", is_package=False)}
    assert got == {
        "mergeserve.runtime.engine.base",
        "mergeserve.runtime.engine.base.Engine",
        "mergeserve.runtime.mixture",
        "mergeserve.runtime.mixture.MixtureSpec",
    }
    assert "vllm.lora.request" in {t for _, t in imports(ROOT / "runtime/engine/local.py")}
    assert layer_of("mergeserve.server.app") == LAYERS.index("server")
