"""`mergeserve merge`, `decompose` and `extract-lora`: adapters from adapters, offline."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mergeserve.cli.common import Commands, bar, floats, no_args
from mergeserve.errors import MergeserveError


def register(commands: Commands) -> None:
    commands.add(
        "merge", "statically merge LoRA experts into one PEFT LoRA dir", _merge_args, _merge
    )
    commands.add(
        "decompose", "Twin decomposition: shared + rank-k exclusives", _decompose_args, _decompose
    )
    commands.add(
        "extract-lora", "a LoRA from a full fine-tune (truncated SVD)", _extract_args, _extract
    )
    commands.add(
        "methods", "the merge methods, their parameters and defaults (markdown)", no_args, _methods
    )


def _methods(args: argparse.Namespace) -> None:
    from mergeserve.adapters.merging import methods_markdown

    sys.stdout.write(methods_markdown())


def _merge_args(p: argparse.ArgumentParser) -> None:
    from mergeserve.adapters.merging import METHODS

    p.add_argument("dirs", nargs="+", type=Path, metavar="DIR", help="PEFT LoRA dirs")
    p.add_argument("--method", required=True, choices=METHODS.names())
    p.add_argument("--out", required=True, type=Path, help="output dir (must not exist)")
    _param_args(p)
    p.add_argument(
        "--base",
        type=Path,
        help="the base model dir: every DIR is checked to fit it; data-aware methods run it",
    )
    p.add_argument(
        "--dev-file",
        type=Path,
        help='evolutionary: labelled JSONL {"prompt", "answer"} to score on (default: '
        "the DIRs' examples.jsonl)",
    )
    p.add_argument("--threads", type=int, help="torch threads of data-aware methods")


def _param_args(p: argparse.ArgumentParser) -> None:
    """One flag per merge parameter, with its meaning and each method's default, from the
    declarations (adapters/merging/)."""
    from mergeserve.adapters.merging import PARAMS
    from mergeserve.adapters.merging.table import defaults_help

    for param in PARAMS.values():
        flag = "--" + param.name.replace("_", "-")
        text = f"{param.help} ({defaults_help(param.name)})"
        if param.type is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif param.type is tuple:
            p.add_argument(flag, type=floats, help=f"{text}; comma-separated")
        else:
            p.add_argument(flag, type=param.type, choices=param.choices, help=text)


def _decompose_args(p: argparse.ArgumentParser) -> None:
    from mergeserve.adapters.merging import METHODS
    from mergeserve.adapters.twin import DEFAULT_LAMBDA, TwinConfig

    twin = TwinConfig()
    p.add_argument("dirs", nargs="+", type=Path, metavar="DIR", help="PEFT LoRA expert dirs")
    p.add_argument("--out", required=True, type=Path, help="output dir (must not exist)")
    p.add_argument(
        "--shared-method",
        default=twin.shared_method,
        choices=METHODS.names(),
        help=f"how the shared adapter is merged (default {twin.shared_method})",
    )
    p.add_argument(
        "--scale",
        "--lambda",
        type=float,
        default=DEFAULT_LAMBDA,
        help=f"λ of the shared merge (default {DEFAULT_LAMBDA})",
    )
    p.add_argument("--density", type=float, help="ties/dare shared: fraction kept")
    p.add_argument("--seed", type=int, help="dare shared: seed")
    p.add_argument(
        "--exclusive-rank",
        type=int,
        default=twin.exclusive_rank,
        help=f"k (default {twin.exclusive_rank})",
    )
    p.add_argument("--exclusive-energy", type=float, help="or keep this fraction of Σσ²")
    p.add_argument("--shared-rank", type=int, help="truncate the shared adapter to this rank")


def _extract_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", required=True, type=Path, help="base model dir (safetensors)")
    p.add_argument("--finetuned", required=True, type=Path, help="fine-tuned model dir")
    p.add_argument("--out", required=True, type=Path, help="output PEFT dir (must not exist)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16)")
    p.add_argument("--energy", type=float, help="smallest rank keeping this fraction of Σσ²")
    p.add_argument("--targets", help="comma-separated module names (default: all linear)")


def _merge(args: argparse.Namespace) -> None:
    from mergeserve.adapters.calibration import read_examples
    from mergeserve.adapters.merging import (
        METHODS,
        PARAMS,
        MergeContext,
        MergeOptions,
        merge_dirs,
    )
    from mergeserve.adapters.peft_io import EXAMPLES_FILE

    opts = MergeOptions(**{name: getattr(args, name) for name in PARAMS})
    base = context = None
    if args.base is not None:
        from mergeserve.adapters.peft_io import BaseModelSpec

        base = BaseModelSpec.from_checkpoint(args.base)
    if METHODS.get(args.method).needs_data:
        if args.base is None:
            raise MergeserveError(
                f"{args.method} runs the base model on each DIR's examples.jsonl: give --base"
            )
        context = MergeContext(
            args.base,
            tuple(read_examples(d / EXAMPLES_FILE) for d in args.dirs),
            read_examples(args.dev_file, labelled=True) if args.dev_file else (),
            args.threads,
        )
    out = merge_dirs(
        args.method,
        args.dirs,
        args.out,
        opts,
        progress=bar(args.method),
        base=base,
        context=context,
    )
    print(out)


def _decompose(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from mergeserve.adapters.merging import MergeOptions
    from mergeserve.adapters.peft_io import load_lora_factors, read_lora_dir
    from mergeserve.adapters.twin import TwinConfig, decompose

    if args.out.exists():
        raise MergeserveError(f"{args.out} already exists")
    infos = [read_lora_dir(d) for d in args.dirs]
    experts = {i.name: load_lora_factors(i.path) for i in infos}
    if len(experts) != len(infos):
        raise MergeserveError("expert dir names must be distinct (they name the experts)")
    shared = MergeOptions(scale=args.scale, density=args.density, seed=args.seed)
    config = TwinConfig(
        shared_method=args.shared_method,
        shared_options=shared,
        exclusive_rank=args.exclusive_rank,
        exclusive_energy=args.exclusive_energy,
        shared_rank=args.shared_rank,
    )
    total = len(experts) * len({k for e in experts.values() for k in e.groups})
    with tqdm(total=total, desc="decompose", unit="module", file=sys.stderr) as bar:
        twin = decompose(experts, config, progress=bar)
    base = next((i.base_model_name_or_path for i in infos if i.base_model_name_or_path), None)
    twin.save(args.out, base_model_name_or_path=base)
    print(f"{'expert':<20} {'rank':>5} {'k':>4} {'exclusive err':>14} {'recon err':>10}")
    for r in twin.report:
        print(
            f"{r.name:<20} {r.rank:>5} {r.exclusive_rank:>4} "
            f"{r.exclusive_error:>14.4f} {r.reconstruction_error:>10.4f}"
        )
    print(args.out)


def _extract(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from mergeserve.adapters.extract import dense_deltas, dense_to_lora
    from mergeserve.adapters.peft_io import save_lora_factors

    if args.out.exists():
        raise MergeserveError(f"{args.out} already exists")
    targets = args.targets.split(",") if args.targets else None
    delta, skipped = dense_deltas(args.base, args.finetuned, targets)
    total = sum(len(v) for v in delta.layers.values())
    with tqdm(total=total, desc="extract", unit="module", file=sys.stderr) as bar:
        factors, err = dense_to_lora(delta, args.rank, args.energy, progress=bar)
    save_lora_factors(factors, args.out, base_model_name_or_path=str(args.base))
    if skipped:
        print(f"not representable as LoRA (changed, left out): {', '.join(skipped)}")
    print(f"relative error {err:.4g}, ranks {factors.ranks}")
    print(args.out)
