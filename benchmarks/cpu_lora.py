"""vLLM's CPU LoRA path with and without the mergeserve plugin, against LoRA off, in one run.

Starts vLLM's own OpenAI server on the embedded SmolLM2-135M-Instruct three times, all up
at once: LoRA off; LoRA on with the mergeserve plugin (mergeserve/vllm_plugin.py); LoRA on
stock (MERGESERVE_MIXTURE_PLUGIN=0). Then runs rounds of C concurrent streaming clients
(mixed test-split prompts, `ignore_eos`, exactly max_tokens each), arms in rotating order:

* `off:base`                 the LoRA-off engine;
* `plugin:rank8`, `stock:rank8`   one rank-8 demo expert (`add`);
* `plugin:mix64`             a rank-64 bundle (eight rank-8 blocks: the six demo experts,
                             then `add` and `capital` again) with distinct per-request
                             weights (vllm_xargs), i.e. a different mixture for every request;
* `stock:rank64`             the same bundle as a plain rank-64 adapter (stock vLLM has no
                             mixture; this is what a rank-64 adapter costs it);
* `plugin:base`              base requests on the LoRA engine (the no-LoRA batch shortcut).

Prints one JSON object with tokens/s per arm (median over rounds) and the ratios to
`off:base`. Every server runs with the same thread count (--threads).

    python benchmarks/cpu_lora.py [--concurrency 32] [--max-tokens 64] [--rounds 2]
        [--threads 2] [--no-stock]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import openai
from stream_clients import mixed_prompts, run_round

from mergeserve.adapters.peft_io import load_lora_factors, save_lora_factors
from mergeserve.config import LLAMA_PROJECTIONS, Settings, default_experts_dir
from mergeserve.runtime.base_model import ensure_embedded_model
from mergeserve.runtime.mixture import MixtureBundle, MixtureSpec
from mergeserve.testing import vllm_server_process

BUNDLE_BLOCKS = ("add", "capital", "reverse_words", "sentiment", "sort_numbers", "to_json")
EXTRA_BLOCKS = ("add", "capital")


def write_bundle(experts: Path, base: Path, out: Path) -> MixtureBundle:
    names = [*BUNDLE_BLOCKS, *EXTRA_BLOCKS]
    terms = {f"{n}#{i}": load_lora_factors(experts / n) for i, n in enumerate(names)}
    bundle = MixtureBundle.build(terms)
    save_lora_factors(bundle.factors, out, str(base))
    return bundle


async def bench(
    urls: dict[str, str], bundle: MixtureBundle, args: argparse.Namespace
) -> dict[str, object]:
    clients = {
        k: openai.AsyncOpenAI(base_url=f"{u}/v1", api_key="-", max_retries=0, timeout=1800)
        for k, u in urls.items()
    }
    prompts = mixed_prompts(args.requests)
    rng = random.Random(0)

    def distinct_mixtures() -> list[dict[str, Any]]:
        out = []
        for _ in prompts:
            w = [round(rng.uniform(0.05, 1.0), 4) for _ in bundle.names]
            out.append({"vllm_xargs": MixtureSpec(bundle.ranks, tuple(w)).extra_args()})
        return out

    arms: dict[str, tuple[str, str, bool]] = {
        "off:base": ("off", "base", False),
        "plugin:base": ("plugin", "base", False),
        "plugin:rank8": ("plugin", "add", False),
        "plugin:mix64": ("plugin", "bundle", True),
    }
    if "stock" in clients:
        arms["stock:rank8"] = ("stock", "add", False)
        arms["stock:rank64"] = ("stock", "bundle", False)
    for server, model, mix in arms.values():  # warm up: first LoRA use loads it into a slot
        xa = distinct_mixtures()[:2] if mix else None
        await run_round(clients[server], model, prompts[:2], 2, 4, xa)
    names = list(arms)
    rounds: dict[str, list[dict[str, float]]] = {a: [] for a in names}
    for r in range(args.rounds):
        k = r % len(names)
        for arm in names[k:] + names[:k]:
            server, model, mix = arms[arm]
            xa = distinct_mixtures() if mix else None
            res = await run_round(
                clients[server], model, prompts, args.concurrency, args.max_tokens, xa
            )
            rounds[arm].append(res)
            print(f"round {r} {arm}: {res['tokens_per_s']:.1f} tok/s", flush=True)
    tps = {a: statistics.median(x["tokens_per_s"] for x in v) for a, v in rounds.items()}
    off = tps["off:base"]
    return {
        "benchmark": "cpu_lora",
        "model": "SmolLM2-135M-Instruct (fp32), vLLM OpenAI server",
        "concurrency": args.concurrency,
        "requests_per_round": args.requests,
        "max_tokens": args.max_tokens,
        "rounds": args.rounds,
        "bundle": {"blocks": list(bundle.names), "rank": bundle.rank},
        "tokens_per_s": {a: round(v, 2) for a, v in tps.items()},
        "over_lora_off": {a: round(v / off, 3) for a, v in tps.items() if a != "off:base"},
        "per_round": rounds,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--requests", type=int, default=32, help="requests per round and arm")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--no-stock", action="store_true", help="skip the stock LoRA server")
    args = p.parse_args()

    experts = default_experts_dir()
    if experts is None:
        raise SystemExit("run from a checkout: the demo experts are in examples/experts")
    model = ensure_embedded_model(Settings().cache)
    common = ["--dtype", "float32", "--max-model-len", "1024", "--served-model-name", "base"]
    common += ["--max-num-seqs", str(max(32, args.concurrency))]
    lora = ["--enable-lora", "--max-lora-rank", "64", "--max-loras", "4"]
    lora += ["--lora-target-modules", *LLAMA_PROJECTIONS]
    env = {"OMP_NUM_THREADS": str(args.threads)}
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        bundle = write_bundle(experts, model, Path(tmp) / "bundle")
        lora += ["--lora-modules", f"add={experts / 'add'}", f"bundle={Path(tmp) / 'bundle'}"]
        servers = {
            "off": (common, {**env, "MERGESERVE_MIXTURE_PLUGIN": "0"}),
            "plugin": ([*common, *lora], {**env, "MERGESERVE_MIXTURE_PLUGIN": "1"}),
        }
        if not args.no_stock:
            servers["stock"] = ([*common, *lora], {**env, "MERGESERVE_MIXTURE_PLUGIN": "0"})
        urls = {}
        for name, (argv, e) in servers.items():
            s = stack.enter_context(
                vllm_server_process(model, Path(tmp) / f"{name}.log", argv, e, timeout_s=900)
            )
            urls[name] = s.base_url
        result = asyncio.run(bench(urls, bundle, args))
    result["machine"] = {
        "cpus": os.cpu_count(),
        "threads_per_server": args.threads,
        "processor": platform.processor() or platform.machine(),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
