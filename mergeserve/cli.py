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
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mergeserve.config import Settings
from mergeserve.errors import MergeserveError

# Nothing is ever fetched from a model hub; set before transformers/vLLM are imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Settings from the environment, with the command line's explicit options on top."""
    settings = Settings()
    if args.model is not None:
        settings.model = args.model
    if args.experts_dir is not None:
        settings.experts_dir = None if str(args.experts_dir) == "none" else args.experts_dir
    if args.host is not None:
        settings.server.host = args.host
    if args.port is not None:
        settings.server.port = args.port
    if args.engine is not None:
        settings.engine.kind = args.engine
    return settings


def _serve(args: argparse.Namespace) -> None:
    import uvicorn

    from mergeserve.server.app import create_app

    settings = settings_from_args(args)
    app = create_app(settings)
    uvicorn.run(
        app,
        host=settings.server.host,
        port=settings.server.port,
        log_level=settings.server.log_level,
        timeout_keep_alive=settings.server.keep_alive_s,
    )


def _prepare_model(args: argparse.Namespace) -> None:
    from mergeserve.runtime.base_model import ensure_embedded_model

    print(ensure_embedded_model(Settings().cache))


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None


def _bar(desc: str) -> Callable[[int], Any]:
    from tqdm import tqdm

    return lambda total: tqdm(total=total, desc=desc, unit="module", file=sys.stderr)


def _merge(args: argparse.Namespace) -> None:
    from mergeserve.adapters.calibration import read_examples
    from mergeserve.adapters.methods import METHODS, MergeContext, MergeOptions, merge_dirs
    from mergeserve.router.routers import EXAMPLES_FILE

    opts = MergeOptions(
        weights=args.weights,
        scale=args.scale,
        density=args.density,
        normalize=args.normalize,
        majority_sign=args.majority_sign,
        t=args.t,
        seed=args.seed,
        rank=args.rank,
        energy=args.energy,
        alpha=args.alpha,
        beta=args.beta,
        steps=args.steps,
        lr=args.lr,
        samples=args.samples,
        population=args.population,
    )
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
        progress=_bar(args.method),
        base=base,
        context=context,
    )
    print(out)


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


def _decompose(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from mergeserve.adapters.methods import MergeOptions
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


def _train_expert(args: argparse.Namespace) -> None:
    from mergeserve.config import LLAMA_PROJECTIONS
    from mergeserve.runtime.base_model import resolve_base_model
    from mergeserve.tasks.training import TrainConfig, train_expert

    base = resolve_base_model(args.base, Settings().cache)
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
    )
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


def _router_parts(args: argparse.Namespace) -> tuple[Path, Any, Path | None]:
    """(experts dir, embedder or None, base model dir or None) for the router commands."""
    from mergeserve.router.embedders import make_embedder, set_threads
    from mergeserve.runtime.base_model import resolve_base_model

    settings = Settings()
    experts_dir = args.experts_dir or settings.experts_dir
    if experts_dir is None:
        raise MergeserveError("no experts dir: pass --experts-dir")
    needs_base = args.embedder == "hidden" or getattr(args, "router", None) == "arrow"
    base_dir = resolve_base_model(args.base, settings.cache) if needs_base else None
    embedder = None
    if getattr(args, "router", None) != "arrow":
        embedder = make_embedder(
            args.embedder, base_dir=base_dir, layer=args.layer, threads=args.threads
        )
    else:
        set_threads(args.threads)
    return Path(experts_dir), embedder, base_dir


def _train_router(args: argparse.Namespace) -> None:
    from mergeserve.router.routers import (
        MLPTrainConfig,
        experts_examples,
        mlp_router_dir,
        train_mlp_router,
    )

    experts_dir, embedder, _ = _router_parts(args)
    examples = experts_examples(experts_dir)
    try:
        config = MLPTrainConfig(hidden=args.hidden, epochs=args.epochs, lr=args.lr, seed=args.seed)
        router = train_mlp_router(embedder, examples, config)
    except ValueError as e:
        raise MergeserveError(str(e)) from e
    out = args.out or mlp_router_dir(experts_dir)
    router.save(out)
    print(json.dumps({"out": str(out), "experts": list(examples), "embedder": embedder.name}))


def _route(args: argparse.Namespace) -> None:
    from mergeserve.router.policy import RoutingPolicy
    from mergeserve.router.routers import load_router, prompt_of, route

    try:
        policy = RoutingPolicy(
            temperature=args.temperature,
            top_k=args.top_k,
            floor=args.floor,
            grid=args.grid or None,
        )
    except ValueError as e:
        raise MergeserveError(str(e)) from e
    from mergeserve.router.open_world import GateConfig, make_gate

    experts_dir, embedder, base_dir = _router_parts(args)
    gate = None
    if embedder is not None:
        gate = make_gate(GateConfig(args.open_world), embedder)
    router = load_router(args.router, experts_dir, embedder=embedder, base_dir=base_dir, gate=gate)
    failed = 0
    for lineno, line in enumerate(sys.stdin, start=1):
        if not line.strip():
            continue
        try:
            prompt = prompt_of(line)
        except ValueError as e:
            failed += 1
            out: dict[str, Any] = {"line": lineno, "error": str(e)}
        else:
            (r,) = route(router, policy, [prompt])
            out = {
                "weights": r.key.as_dict(),
                "top": r.key.top,
                "route": r.outcome,
                "in_domain": round(r.in_domain, 4),
                "entropy": round(r.entropy, 4),
            }
        print(json.dumps(out), flush=True)
    if failed:
        raise MergeserveError(f"{failed} input line(s) were not routed (see their error lines)")


def _router_args(p: argparse.ArgumentParser) -> None:
    from mergeserve.router.embedders import EMBEDDERS

    p.add_argument("--experts-dir", type=Path, help="dir of expert dirs (default: the demo set)")
    p.add_argument(
        "--embedder", default="minilm-int8", choices=EMBEDDERS, help="default minilm-int8"
    )
    p.add_argument("--layer", type=int, default=8, help="hidden embedder: base-model layer")
    p.add_argument("--base", type=Path, help="base model dir (default: the embedded SmolLM2)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mergeserve", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser(
        "serve", help="serve the OpenAI API (default: embedded model + demo experts)"
    )
    s.add_argument("--model", type=Path, help="local Hugging Face model dir (default: embedded)")
    s.add_argument(
        "--experts-dir",
        type=Path,
        help="dir of PEFT LoRA dirs, one per expert ('none': no experts)",
    )
    s.add_argument("--host", help="bind address (default 127.0.0.1)")
    s.add_argument("--port", type=int, help="port (default 8000)")
    s.add_argument(
        "--engine",
        choices=["vllm", "remote", "fake"],
        help="engine (default vllm; remote: MERGESERVE_ENGINE__REMOTE__URL)",
    )
    s.set_defaults(func=_serve)

    m = sub.add_parser("prepare-model", help="convert the embedded base model once; print its dir")
    m.set_defaults(func=_prepare_model)

    from mergeserve.adapters.methods import METHODS

    g = sub.add_parser("merge", help="statically merge LoRA experts into one PEFT LoRA dir")
    g.add_argument("dirs", nargs="+", type=Path, metavar="DIR", help="PEFT LoRA dirs")
    g.add_argument("--method", required=True, choices=METHODS.names())
    g.add_argument("--out", required=True, type=Path, help="output dir (must not exist)")
    g.add_argument("--weights", type=_floats, help="one per DIR, comma-separated (default 1)")
    g.add_argument("--scale", type=float, help="λ, multiplies the merged delta (default 1)")
    g.add_argument("--density", type=float, help="ties/dare: fraction kept (default 0.5)")
    g.add_argument("--rank", type=int, help="output rank (default: exact, or Σ ranks)")
    g.add_argument("--energy", type=float, help="truncate to keep this fraction of Σσ²")
    g.add_argument("--t", type=float, help="slerp: interpolation point (default 0.5)")
    g.add_argument("--seed", type=int, help="dare: seed of the drop masks (default 0)")
    g.add_argument(
        "--normalize",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="ties/dare: divide by the (agreeing) weights",
    )
    g.add_argument("--majority-sign", choices=["total", "frequency"], help="ties sign election")
    g.add_argument("--alpha", type=float, help="regmean: off-diagonal kept; lines: shallow scale")
    g.add_argument("--beta", type=float, help="lines: deepest layer's scale minus alpha")
    g.add_argument("--steps", type=int, help="adamerging: Adam steps; evolutionary: generations")
    g.add_argument("--lr", type=float, help="adamerging: learning rate (default 0.01)")
    g.add_argument("--samples", type=int, help="data-aware methods: examples per DIR used")
    g.add_argument("--population", type=int, help="evolutionary: candidates per generation")
    g.add_argument(
        "--base",
        type=Path,
        help="the base model dir: every DIR is checked to fit it; data-aware methods run it",
    )
    g.add_argument(
        "--dev-file",
        type=Path,
        help='evolutionary: labelled JSONL {"prompt", "answer"} to score on (default: '
        "the DIRs' examples.jsonl)",
    )
    g.add_argument("--threads", type=int, help="torch threads of data-aware methods")
    g.set_defaults(func=_merge)

    sp = sub.add_parser("split", help="write a demo task split as JSONL (e.g. --dev-file)")
    sp.add_argument("--split", default="dev", choices=["train", "dev", "test"])
    sp.add_argument("--n", type=int, default=8, help="examples per task (default 8)")
    sp.add_argument("--tasks", default="all", help="comma-separated task names, or all")
    sp.add_argument("--out", type=Path, help="output file (default: stdout)")
    sp.set_defaults(func=_split)

    d = sub.add_parser("decompose", help="Twin decomposition: shared + rank-k exclusives")
    d.add_argument("dirs", nargs="+", type=Path, metavar="DIR", help="PEFT LoRA expert dirs")
    d.add_argument("--out", required=True, type=Path, help="output dir (must not exist)")
    d.add_argument(
        "--shared-method",
        default="task_arithmetic",
        choices=METHODS.names(),
        help="how the shared adapter is merged (default task_arithmetic)",
    )
    d.add_argument("--scale", "--lambda", type=float, default=0.3, help="λ of the shared merge")
    d.add_argument("--density", type=float, help="ties/dare shared: fraction kept")
    d.add_argument("--seed", type=int, help="dare shared: seed")
    d.add_argument("--exclusive-rank", type=int, default=8, help="k (default 8)")
    d.add_argument("--exclusive-energy", type=float, help="or keep this fraction of Σσ²")
    d.add_argument("--shared-rank", type=int, help="truncate the shared adapter to this rank")
    d.set_defaults(func=_decompose)

    x = sub.add_parser("extract-lora", help="a LoRA from a full fine-tune (truncated SVD)")
    x.add_argument("--base", required=True, type=Path, help="base model dir (safetensors)")
    x.add_argument("--finetuned", required=True, type=Path, help="fine-tuned model dir")
    x.add_argument("--out", required=True, type=Path, help="output PEFT dir (must not exist)")
    x.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16)")
    x.add_argument("--energy", type=float, help="smallest rank keeping this fraction of Σσ²")
    x.add_argument("--targets", help="comma-separated module names (default: all linear)")
    x.set_defaults(func=_extract)

    from mergeserve.tasks import TASKS

    t = sub.add_parser("train-expert", help="train a LoRA expert on one demo task (CPU, PEFT)")
    t.add_argument("--task", required=True, choices=sorted(TASKS))
    t.add_argument("--base", type=Path, help="base model dir (default: the embedded SmolLM2)")
    t.add_argument("--out", required=True, type=Path, help="output expert dir (must not exist)")
    t.add_argument("--steps", type=int, default=150)
    t.add_argument("--batch-size", type=int, default=16)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--rank", type=int, default=8)
    t.add_argument("--alpha", type=float, default=16.0)
    t.add_argument("--targets", help="comma-separated modules (default: all 7 projections)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    t.add_argument("--dev-n", type=int, default=50, help="dev samples scored at the end")
    t.add_argument("--init", type=Path, help="continue training from this expert dir")
    t.add_argument(
        "--paraphrases",
        action="store_true",
        help="train on the task's train-only paraphrases too (never in dev or test)",
    )
    t.set_defaults(func=_train_expert)

    e = sub.add_parser("eval", help="exact-match table of served models on the demo tasks")
    e.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server's URL")
    e.add_argument(
        "--models",
        default="base,expert:*",
        help="comma-separated model ids; 'prefix*' expands against /v1/models",
    )
    e.add_argument(
        "--suite",
        default="demo",
        choices=["demo", "phrasings", "two-skill", "general"],
        help="demo: the six tasks (exact match); phrasings: the six tasks asked in ten "
        "phrasings per task no expert trained on; two-skill: requests needing two skills "
        "(exact match); general: requests outside every skill (harm: same reply as base)",
    )
    e.add_argument("--tasks", default="all", help="comma-separated task names, or all")
    e.add_argument("--n", type=int, default=100, help="test samples per task (default 100)")
    e.add_argument("--split", default="test", choices=["dev", "test"])
    e.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    e.add_argument("--max-tokens", type=int, default=48)
    e.add_argument("--api-key", default="unused")
    e.add_argument("--out", type=Path, default=Path("eval-results"), help="output dir")
    e.add_argument(
        "--resume",
        action="store_true",
        help="reuse the replies cached in <out>/replies.jsonl by an earlier (stopped) run",
    )
    e.set_defaults(func=_eval)

    from mergeserve.router.routers import ROUTERS

    tr = sub.add_parser("train-router", help="train the MLP router on the experts' examples")
    _router_args(tr)
    tr.add_argument("--epochs", type=int, default=100)
    tr.add_argument("--hidden", type=int, default=256)
    tr.add_argument("--lr", type=float, default=1e-3)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--out", type=Path, help="output dir (default: <experts-dir>/_router)")
    tr.set_defaults(func=_train_router)

    r = sub.add_parser("route", help='route JSON lines {"prompt": ...} from stdin to weights')
    _router_args(r)
    r.add_argument("--router", default="prototype", choices=ROUTERS)
    r.add_argument("--temperature", type=float, default=1.0)
    r.add_argument("--top-k", type=int, help="keep the k most likely experts (default all)")
    r.add_argument("--floor", type=float, default=0.0, help="drop weights below this")
    r.add_argument("--grid", type=float, default=0.05, help="round weights to this (0: no)")
    r.add_argument(
        "--open-world",
        default="centroid",
        choices=["off", "centroid", "threshold", "knn"],
        help="the gate that routes requests of no expert to none (base); off: closed world",
    )
    r.set_defaults(func=_route)
    ab = sub.add_parser("ab-report", help="compare an A/B experiment's arms (bootstrap CIs)")
    ab.add_argument("--experiment", required=True, help="the experiment's model name")
    ab.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server's URL")
    ab.add_argument("--out", type=Path, default=Path("ab-report"), help="output dir")
    ab.add_argument("--tasks", default="all", help="comma-separated demo tasks, or all")
    ab.add_argument("--n", type=int, default=50, help="offline: test prompts per task")
    ab.add_argument("--no-offline", action="store_true", help="feedback only, no eval")
    ab.add_argument("--feedback", type=Path, help="the server's feedback log (JSONL)")
    ab.add_argument(
        "--online",
        type=int,
        default=0,
        metavar="N",
        help="first send N labelled dev prompts per task through the experiment and post "
        "each reply's exact match as feedback",
    )
    ab.add_argument("--concurrency", type=int, default=8)
    ab.add_argument("--max-tokens", type=int, default=32)
    ab.add_argument("--reply-cache", type=Path, help="default: <out>/replies.jsonl")
    ab.add_argument("--fresh", action="store_true", help="ignore cached replies")
    ab.add_argument("--boot", type=int, default=2000, help="bootstrap resamples")
    ab.add_argument("--seed", type=int, default=0)
    ab.set_defaults(func=_ab_report)
    _admin_parsers(sub)
    return p


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


# ------------------------------------------------------------------ admin client


def _admin_request(args: argparse.Namespace, method: str, path: str, **kw: Any) -> Any:
    """Call the server's /admin API; its error message becomes ours."""
    import httpx

    token = args.token or os.environ.get("MERGESERVE_ADMIN__TOKEN")
    if not token:
        raise MergeserveError("give --token or set MERGESERVE_ADMIN__TOKEN")
    url = args.url.rstrip("/") + path
    try:
        r = httpx.request(
            method, url, headers={"Authorization": f"Bearer {token}"}, timeout=args.timeout, **kw
        )
    except httpx.HTTPError as e:
        raise MergeserveError(f"{url}: {e}") from None
    try:
        body = r.json()
    except ValueError:
        body = {"error": {"message": r.text[:500]}}
    if r.status_code >= 400:
        err = body.get("error", {}) if isinstance(body, dict) else {}
        msg = err.get("message") if isinstance(err, dict) else None
        if r.status_code == 404 and path.startswith("/admin/experts") and method != "DELETE":
            msg = msg or "the admin API is off: start the server with MERGESERVE_ADMIN__TOKEN"
        raise MergeserveError(f"HTTP {r.status_code}: {msg or body}")
    return body


def _print_experts(body: dict[str, Any]) -> None:
    for e in body["experts"]:
        mark = "" if e["in_shared"] else "  (not in S/static yet: rebuild)"
        print(f"{e['name']:<24} {e['source']:<8} r={e['rank']:<3} {e['digest'][:12]}{mark}")
    print(f"generation {body['generation']}")


def _add_expert(args: argparse.Namespace) -> None:
    from mergeserve.server.admin import UPLOAD_FILES

    src: Path = args.dir
    if args.by_path:
        body = _admin_request(
            args, "POST", "/admin/experts", json={"name": args.name, "path": str(src.resolve())}
        )
    else:
        if not src.is_dir():
            raise MergeserveError(f"{src} is not a directory")
        present = [src / f for f in UPLOAD_FILES if (src / f).is_file()]
        handles = [p.open("rb") for p in present]
        try:
            files = [("files", (p.name, h)) for p, h in zip(present, handles, strict=True)]
            body = _admin_request(
                args, "POST", "/admin/experts", data={"name": args.name}, files=files
            )
        finally:
            for h in handles:
                h.close()
    _print_experts(body)
    print(f"added {body['added']} in {body['seconds']} s")


def _remove_expert(args: argparse.Namespace) -> None:
    body = _admin_request(args, "DELETE", f"/admin/experts/{args.name}")
    _print_experts(body)
    print(f"removed {body['removed']} in {body['seconds']} s")


def _list_experts(args: argparse.Namespace) -> None:
    _print_experts(_admin_request(args, "GET", "/admin/experts"))


def _rebuild(args: argparse.Namespace) -> None:
    body = _admin_request(args, "POST", "/admin/rebuild")
    _print_experts(body)
    print(f"rebuilt in {body['seconds']} s")


def _admin_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server's URL")
    p.add_argument("--token", help="admin token (default: $MERGESERVE_ADMIN__TOKEN)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds (default 300)")


def _admin_parsers(sub: Any) -> None:
    a = sub.add_parser("add-expert", help="hot-add an expert to a running server")
    a.add_argument("name", help="the expert's name (served as expert:NAME)")
    a.add_argument("dir", type=Path, help="PEFT LoRA dir with examples.jsonl")
    a.add_argument(
        "--by-path",
        action="store_true",
        help="send the dir's path (under the server's allowed roots) instead of its files",
    )
    _admin_args(a)
    a.set_defaults(func=_add_expert)
    r = sub.add_parser("remove-expert", help="stop serving a hot-added expert")
    r.add_argument("name")
    _admin_args(r)
    r.set_defaults(func=_remove_expert)
    ls = sub.add_parser("list-experts", help="the experts a running server serves")
    _admin_args(ls)
    ls.set_defaults(func=_list_experts)
    rb = sub.add_parser("rebuild", help="recompute S, exclusives and static merges on a server")
    _admin_args(rb)
    rb.set_defaults(func=_rebuild)


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
