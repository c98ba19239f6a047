"""The method table: every merge method mergeserve has, by name, and `merge`.

The table is the declarations of exact.py, dense.py and learned.py, read once; nothing
registers itself at import time. To add a method: write its function in the module of
its family (or a new one listed here) and declare it there with `declared.method`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from types import MappingProxyType

from mergeserve.adapters.lowrank import AdapterFactors, ProgressBar
from mergeserve.adapters.merging.dense import declared as dense_methods
from mergeserve.adapters.merging.exact import declared as exact_methods
from mergeserve.adapters.merging.learned import declared as learned_methods
from mergeserve.adapters.merging.method import MergeContext, MergeMethod, check_options
from mergeserve.adapters.merging.options import COMMON, PARAMS, MergeOptions
from mergeserve.errors import InvalidRequestError


class MethodTable:
    """Name -> MergeMethod, fixed at construction; a name may appear once."""

    def __init__(self, methods: Sequence[MergeMethod]) -> None:
        table: dict[str, MergeMethod] = {}
        for m in methods:
            if m.name in table:
                raise ValueError(f"merge method {m.name!r} is declared twice")
            table[m.name] = m
        self._methods = MappingProxyType(table)
        self._order = tuple(table)

    def get(self, name: str) -> MergeMethod:
        try:
            return self._methods[name]
        except KeyError:
            raise InvalidRequestError(
                f"unknown merge method {name!r}; known: {', '.join(self.names())}", param="method"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._methods)

    def __contains__(self, name: object) -> bool:
        return name in self._methods

    def __iter__(self) -> Iterator[MergeMethod]:
        """In declaration order: exact, dense, then learned from data."""
        return iter(self._methods[n] for n in self._order)


METHODS = MethodTable([*exact_methods.methods, *dense_methods.methods, *learned_methods.methods])


def static_arms() -> dict[str, MergeOptions]:
    """Every static arm a server can serve (`merge.static_methods`), with its options."""
    return {m.name: m.arm for m in METHODS if m.arm is not None}


def merge(
    name: str,
    experts: Sequence[AdapterFactors],
    options: MergeOptions | None = None,
    progress: ProgressBar | None = None,
    context: MergeContext | None = None,
) -> AdapterFactors:
    """Run the method `name` after checking the options (and the context) against it,
    with the method's defaults for the options not given."""
    m = METHODS.get(name)
    opts = options or MergeOptions()
    check_options(m, experts, opts)
    if m.needs_data:
        if context is None:
            raise InvalidRequestError(
                f"{name} learns from data: it needs the base model and the experts' "
                "examples (a MergeContext; `mergeserve merge --base ...`)",
                param="method",
            )
        if len(context.examples) != len(experts):
            raise InvalidRequestError(
                f"{len(context.examples)} example sets for {len(experts)} experts",
                param="experts",
            )
        empty = [i for i, ex in enumerate(context.examples) if not ex]
        if empty:
            raise InvalidRequestError(
                f"{name} needs examples of every expert; expert #{empty[0]} has none "
                "(write its examples.jsonl)",
                param="experts",
            )
    return m.fn(experts, m.resolve(opts, len(experts)), progress, context)


def defaults_help(param: str) -> str:
    """The defaults of `param` across the methods that read it, for help texts."""
    if param in COMMON:
        return "every method; off unless given"
    seen: dict[str, list[str]] = {}
    for m in METHODS:
        if param in m.params:
            seen.setdefault(m.default_text(param) or "off", []).append(m.name)
    if len(seen) == 1:
        return f"default {next(iter(seen))}"
    return "; ".join(f"{', '.join(ms)}: {d}" for d, ms in seen.items())


def methods_markdown() -> str:
    """The table of every method, its parameters and their defaults (README, `mergeserve
    methods`)."""
    rows = [
        "| method | from | kind | parameters (default) | what it does |",
        "|---|---|---|---|---|",
    ]
    for m in METHODS:
        kind = m.kind + (", data" if m.needs_data else "")
        params = ", ".join(f"`{p}` ({m.default_text(p) or 'off'})" for p in PARAMS if p in m.params)
        rows.append(f"| `{m.name}` | {m.source} | {kind} | {params} | {m.summary} |")
    return "\n".join(rows) + "\n"
