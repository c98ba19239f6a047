"""`mergeserve` command line.

    mergeserve serve [--model DIR] [--experts-dir DIR] [--host H] [--port P]
    mergeserve prepare-model     convert the embedded GGUF base model once, print its dir
    mergeserve merge --method NAME [--weights w1,w2,…] [--density d] [--rank r] DIR… --out DIR
    mergeserve decompose DIR… --out DIR [--shared-method M] [--exclusive-rank k]
    mergeserve extract-lora --base DIR --finetuned DIR [--rank r] --out DIR
    mergeserve train-expert --task NAME --out DIR        (demo tasks, CPU)
    mergeserve eval --base-url URL --models base,expert:*  (exact-match table)
    mergeserve train-router [--experts-dir DIR]          (the MLP router, saved beside them)
    mergeserve route [--router NAME] < prompts.jsonl     ({"prompt": …} lines -> weights)
    mergeserve ab-report --experiment NAME --base-url URL  (A/B arms, bootstrap CIs)
    mergeserve add-expert NAME DIR [--by-path]             (hot-add to a running server)
    mergeserve remove-expert NAME | list-experts | rebuild (the server's /admin API)

With no arguments `serve` serves the embedded SmolLM2-135M-Instruct with the demo experts.

One module per command group (serve, merge, demo, router, admin), each registering its
subcommands through `Commands`; a subcommand's arguments, and what they import, load only
when it runs or shows its help.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from mergeserve.cli import admin, demo, merge, router, serve
from mergeserve.cli.common import CommandParser, Commands
from mergeserve.cli.serve import settings_from_args
from mergeserve.errors import MergeserveError

# Nothing is ever fetched from a model hub; set before transformers/vLLM are imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

__all__ = ["build_parser", "main", "settings_from_args"]

GROUPS = (serve, merge, demo, router, admin)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mergeserve", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True, parser_class=CommandParser)
    commands = Commands(sub)
    for group in GROUPS:
        group.register(commands)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # httpx logs every request at INFO: the remote engine's health checks would flood the
    # log (its own warnings say when a server goes or comes back).
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        args.func(args)
    except MergeserveError as e:
        print(f"mergeserve: error: {e.message}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
