"""What the command modules share: their registration, and argument types."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

Configure = Callable[[argparse.ArgumentParser], None]
Run = Callable[[argparse.Namespace], None]


class CommandParser(argparse.ArgumentParser):
    """A subcommand's parser that adds its arguments the first time it parses or shows
    help: `mergeserve --help` (and a typo'd command) then imports nothing a command needs
    for its choices, such as the merge methods (torch)."""

    configure: Configure | None = None

    def _configured(self) -> None:
        configure, self.configure = self.configure, None
        if configure is not None:
            configure(self)

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        self._configured()
        return super().parse_known_args(args, namespace)

    def format_help(self) -> str:
        self._configured()
        return super().format_help()

    def format_usage(self) -> str:
        self._configured()
        return super().format_usage()


class Commands:
    """The `mergeserve` subcommands; each command module's `register` adds its own."""

    def __init__(self, sub: Any):
        self._sub = sub

    def add(self, name: str, help: str, configure: Configure, run: Run) -> None:
        """Subcommand `name`: `configure` adds its arguments (when needed), `run` runs it."""
        p: CommandParser = self._sub.add_parser(name, help=help)
        p.configure = configure
        p.set_defaults(func=run)


def no_args(p: argparse.ArgumentParser) -> None:
    """The `configure` of a command that takes no arguments."""


def floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None


def bar(desc: str) -> Callable[[int], Any]:
    from tqdm import tqdm

    return lambda total: tqdm(total=total, desc=desc, unit="module", file=sys.stderr)
