"""The demo tasks' commands: `split`, `train-expert`, `eval` and `ab-report`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from mergeserve.cli.common import Commands
from mergeserve.config import Settings
from mergeserve.errors import MergeserveError


def register(commands: Commands) -> None:
    commands.add("split", "write a demo task split as JSONL (e.g. --dev-file)", _split_args, _split)
    commands.add(
        "train-expert",
        "train a LoRA expert on one demo task (CPU, PEFT)",
        _train_expert_args,
        _train_expert,
    )
    commands.add("eval", "exact-match table of served models on the demo tasks", _eval_args, _eval)
    commands.add(
        "ab-report", "compare an A/B experiment's arms (bootstrap CIs)", _ab_args, _ab_report
    )


def _split_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--split", default="dev", choices=["train", "dev", "test"])
    p.add_argument("--n", type=int, default=8, help="examples per task (default 8)")
    p.add_argument("--tasks", default="all", help="comma-separated task names, or all")
    p.add_argument("--out", type=Path, help="output file (default: stdout)")


def _train_expert_args(p: argparse.ArgumentParser) -> None:
    from mergeserve.tasks import TASKS

    p.add_argument("--task", required=True, choices=sorted(TASKS))
    p.add_argument("--base", type=Path, help="base model dir (default: the embedded SmolLM2)")
    p.add_argument("--out", required=True, type=Path, help="output expert dir (must not exist)")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--targets", help="comma-separated modules (default: all 7 projections)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--dev-n", type=int, default=50, help="dev samples scored at the end")
    p.add_argument("--init", type=Path, help="continue training from this expert dir")
    p.add_argument(
        "--paraphrases",
        action="store_true",
        help="train on the task's train-only paraphrases too (never in dev or test)",
    )
    p.add_argument(
        "--composed",
        action="store_true",
        help="give a third of the training prompts to phrasings composed from parts "
        "(mergeserve.tasks.composed; train-only, sort_numbers)",
    )


def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server's URL")
    p.add_argument(
        "--models",
        default="base,expert:*",
        help="comma-separated model ids; 'prefix*' expands against /v1/models",
    )
    p.add_argument(
        "--suite",
        default="demo",
        choices=["demo", "phrasings", "two-skill", "general"],
        help="demo: the six tasks (exact match); phrasings: the six tasks asked in ten "
        "phrasings per task no expert trained on; two-skill: requests needing two skills "
        "(exact match); general: requests outside every skill (harm: same reply as base)",
    )
    p.add_argument("--tasks", default="all", help="comma-separated task names, or all")
    p.add_argument("--n", type=int, default=100, help="test samples per task (default 100)")
    p.add_argument("--split", default="test", choices=["dev", "test"])
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--api-key", default="unused")
    p.add_argument("--out", type=Path, default=Path("eval-results"), help="output dir")
    p.add_argument(
        "--resume",
        action="store_true",
        help="reuse the replies cached in <out>/replies.jsonl by an earlier (stopped) run",
    )


def _ab_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--experiment", required=True, help="the experiment's model name")
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server's URL")
    p.add_argument("--out", type=Path, default=Path("ab-report"), help="output dir")
    p.add_argument("--tasks", default="all", help="comma-separated demo tasks, or all")
    p.add_argument("--n", type=int, default=50, help="offline: test prompts per task")
    p.add_argument("--no-offline", action="store_true", help="feedback only, no eval")
    p.add_argument("--feedback", type=Path, help="the server's feedback log (JSONL)")
    p.add_argument(
        "--online",
        type=int,
        default=0,
        metavar="N",
        help="first send N labelled dev prompts per task through the experiment and post "
        "each reply's exact match as feedback",
    )
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--reply-cache", type=Path, help="default: <out>/replies.jsonl")
    p.add_argument("--fresh", action="store_true", help="ignore cached replies")
    p.add_argument("--boot", type=int, default=2000, help="bootstrap resamples")
    p.add_argument("--seed", type=int, default=0)


def _split(args: argparse.Namespace) -> None:
    from mergeserve.tasks.generators import TASKS, generate

    names = list(TASKS) if args.tasks == "all" else args.tasks.split(",")
    try:
        rows = [s for t in names for s in generate(t, args.split, args.n)]
    except (KeyError, ValueError) as e:
        raise MergeserveError(str(e)) from e
    lines = [json.dumps({"task": s.task, "prompt": s.prompt, "answer": s.answer}) for s in rows]
    text = "\n".join(lines) + "\n"
    if args.out is None:
        sys.stdout.write(text)
    else:
        args.out.write_text(text)
        print(f"{len(rows)} examples written to {args.out}")


def _train_expert(args: argparse.Namespace) -> None:
    from mergeserve.config import LLAMA_PROJECTIONS
    from mergeserve.runtime.base_model import resolve_base_model
    from mergeserve.tasks.training import TrainConfig, train_expert

    try:  # bad flags are refused before the base model is loaded
        config = TrainConfig(
            task=args.task,
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            rank=args.rank,
            alpha=args.alpha,
            targets=tuple(args.targets.split(",")) if args.targets else LLAMA_PROJECTIONS,
            seed=args.seed,
            threads=args.threads,
            dev_n=args.dev_n,
            init_from=str(args.init) if args.init else None,
            paraphrases=args.paraphrases,
            composed=args.composed,
        )
    except ValueError as e:
        raise MergeserveError(str(e)) from e
    base = resolve_base_model(args.base, Settings().cache)
    try:
        card = train_expert(base, args.out, config)
    except (ValueError, FileExistsError) as e:
        raise MergeserveError(str(e)) from e
    print(json.dumps(card, indent=2))


def _eval(args: argparse.Namespace) -> None:
    from mergeserve.tasks.evaluate import (
        REPLIES_FILE,
        evaluate,
        evaluate_general,
        harm_table,
        markdown_table,
        write_results,
    )
    from mergeserve.tasks.open_world import TWO_SKILL

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    tasks = None if args.tasks == "all" else args.tasks.split(",")
    if args.suite == "two-skill" and tasks is None:
        tasks = list(TWO_SKILL)
    common: dict[str, Any] = {
        "split": args.split,
        "concurrency": args.concurrency,
        "max_tokens": args.max_tokens,
        "api_key": args.api_key,
        "cache_file": args.out / REPLIES_FILE,
        "resume": args.resume,
    }
    try:
        if args.suite == "general":
            cells = evaluate_general(args.base_url, models, **common)
        else:
            result = evaluate(
                args.base_url,
                models,
                tasks,
                n=args.n,
                phrasings=args.suite == "phrasings",
                **common,
            )
    except ValueError as e:
        raise MergeserveError(str(e)) from e
    if args.suite == "general":
        args.out.mkdir(parents=True, exist_ok=True)
        payload = {"split": args.split, "max_tokens": args.max_tokens}
        payload["models"] = {m: dataclasses.asdict(c) for m, c in cells.items()}
        (args.out / "general.json").write_text(json.dumps(payload, indent=2) + "\n")
        (args.out / "general.md").write_text(harm_table(cells))
        print(harm_table(cells))
        return
    paths = write_results(result, args.out)
    print(markdown_table(result))
    print("written:", ", ".join(str(p) for p in paths.values()))


def _ab_report(args: argparse.Namespace) -> None:
    from mergeserve.tasks.ab_report import ab_report, online_feedback

    tasks = None if args.tasks == "all" else args.tasks.split(",")
    if args.online:
        if args.feedback is None:
            raise MergeserveError("--online needs --feedback (the server's feedback log)")
        from mergeserve.tasks import TASKS

        sent = online_feedback(
            args.base_url,
            args.experiment,
            tasks or list(TASKS),
            args.online,
            args.concurrency,
            args.max_tokens,
        )
        print(f"online: {sent} labelled requests through {args.experiment}, feedback posted")
    report = ab_report(
        args.base_url,
        args.experiment,
        args.out,
        tasks=tasks,
        n=args.n,
        offline=not args.no_offline,
        feedback_log=args.feedback,
        concurrency=args.concurrency,
        max_tokens=args.max_tokens,
        reply_cache=args.reply_cache,
        resume=not args.fresh,
        boot=args.boot,
        seed=args.seed,
    )
    for part in ("offline", "feedback"):
        if part in report:
            print(report[part]["verdict"])
    print(f"written: {args.out}/ab-report.{{md,json,png}}")
