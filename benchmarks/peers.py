"""mergeserve beside the systems a user would otherwise reach for, in one run
(benchmarks/harness.py: balanced order, warm-up shown, ≥ 5 rounds, paired ratios).

Per-request weighted mixing of the six demo experts, a distinct weighting of all six for
every request, at concurrency C:

* `mergeserve:mixture`  `mergeserve serve`, `dynamic:exact` with the weights pinned
                        (`merge_weights`): the in-engine mixture;
* `llama.cpp:f32`       llama.cpp (llama-cpp-python 0.3.36's vendored library) on the f32
                        GGUF of the very weights mergeserve serves, the six experts as
                        GGUF LoRAs, each request's weights as its LoRA scales;
* `llama.cpp:q4_1`      the same on the shipped Q4_1 GGUF (llama.cpp's fastest path here).

llama.cpp's server never batches requests whose LoRA scales differ, so it serves such
traffic one request at a time; llamacpp_peer.py drives the library that way, in this
process, without HTTP (in its favour).

Adapter switching, the routed workload (each request's top-1 expert):

* `mergeserve:dynamic`  `dynamic`, routed and merged by mergeserve (the default model);
* `mergeserve:top1`     `route:top1`: mergeserve's router in front of plain adapter
                        switching, on the same engine;
* `vllm:switching`      stock vLLM's OpenAI server (plugin off, slot rank 8: its fairest
                        setting for rank-8 experts; LoRA forces it eager) serving the six
                        experts by name, the expert chosen by a client-side router (the
                        top-1 that mergeserve's router gives each prompt, computed before
                        the rounds: the peer pays no routing time).

Before the rounds, greedy replies (no `ignore_eos`) of mergeserve and llama.cpp to the
same prompts and weightings are compared: token-identical text, per llama.cpp model.

    python benchmarks/peers.py [--concurrency 16] [--requests 32] [--max-tokens 32]
        [--rounds 5] [--agreement 24] [--profile deployed|make-serve]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import openai
from harness import add_workload_args, command_line, run_arms
from llamacpp_peer import LlamaCppPeer, available, chat_ids, prepare_assets, serial_round
from profiles import PROFILES
from serve_throughput import EXPERTS, RoundWeights, distinct_weights
from stream_clients import bench_client, mixed_prompts, run_round

from mergeserve.config import LLAMA_PROJECTIONS, Settings, default_experts_dir
from mergeserve.runtime.base_model import ensure_embedded_model, find_embedded_gguf
from mergeserve.runtime.engine import CPU_BIND_ENV, cpu_binding
from mergeserve.testing import server_process, vllm_server_process


async def top1_experts(client: openai.AsyncOpenAI, prompts: list[str]) -> list[str]:
    """The expert mergeserve's router gives each prompt (`base` where it routes to none)."""
    out = []
    for p in prompts:
        r = await client.chat.completions.create(
            model="route:top1", messages=[{"role": "user", "content": p}], max_tokens=1
        )
        weights = (r.model_extra or {}).get("merge", {}).get("weights", {})
        out.append(max(weights, key=weights.get) if weights else "base")
    return out


async def agreement(
    client: openai.AsyncOpenAI,
    peers: dict[str, LlamaCppPeer],
    tokenizer: Any,
    prompts: list[str],
    weights: list[dict[str, float]],
) -> dict[str, Any]:
    """Greedy replies (32 tokens, stopping at EOS) of mergeserve's mixture and of each
    llama.cpp model to the same prompts and weightings: the share token-identical."""
    ours = []
    for p, w in zip(prompts, weights, strict=True):
        r = await client.chat.completions.create(
            model="dynamic:exact",
            messages=[{"role": "user", "content": p}],
            max_tokens=32,
            temperature=0,
            extra_body={"merge_weights": w},
        )
        ours.append(r.choices[0].message.content or "")
    out: dict[str, Any] = {"n": len(prompts)}
    for name, peer in peers.items():
        theirs = [
            tokenizer.decode(
                peer.generate(chat_ids(tokenizer, p), w, 32, ignore_eos=False).tokens,
                skip_special_tokens=True,
            )
            for p, w in zip(prompts, weights, strict=True)
        ]
        same = [a.strip() == b.strip() for a, b in zip(ours, theirs, strict=True)]
        out[name] = {
            "identical": round(sum(same) / len(same), 3),
            "examples_differing": [
                {"prompt": p, "mergeserve": a, name: b}
                for p, a, b, s in zip(prompts, ours, theirs, same, strict=True)
                if not s
            ][:3],
        }
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_workload_args(p)
    p.add_argument("--agreement", type=int, default=24, help="prompts compared greedily")
    p.add_argument("--profile", choices=sorted(PROFILES), default="deployed")
    p.add_argument("--llama-threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache/mergeserve/bench")
    args = p.parse_args()
    if not available():
        raise SystemExit("llama-cpp-python is not installed: run scripts/bench_deps.sh")
    experts = default_experts_dir()
    if experts is None:
        raise SystemExit("run from a checkout: the demo experts are in examples/experts")
    from transformers import AutoTokenizer

    model = ensure_embedded_model(Settings().cache)
    tokenizer = AutoTokenizer.from_pretrained(model)
    assets = prepare_assets(args.cache, model, find_embedded_gguf(), experts)
    loras = {n: assets[f"expert:{n}"] for n in EXPERTS}
    peers = {
        f"llama.cpp:{q}": LlamaCppPeer(assets[f"base:{q}"], loras, args.llama_threads)
        for q in ("f32", "q4_1")
    }
    rng = random.Random(0)
    prompts = mixed_prompts(args.requests)
    ids = [chat_ids(tokenizer, q) for q in prompts]
    env = {
        "MERGESERVE_SERVER__QUEUE_BUDGET_S": "0",  # a fixed concurrency: nothing refused
        "MERGESERVE_ROUTER__GRID": "0.001",
        **PROFILES[args.profile],
    }
    stock = ["--dtype", "float32", "--max-model-len", "2048", "--served-model-name", "base"]
    stock += ["--max-num-seqs", str(max(16, args.concurrency)), "--enable-lora"]
    stock += ["--max-lora-rank", "8", "--max-loras", str(len(EXPERTS))]
    stock += ["--lora-target-modules", *LLAMA_PROJECTIONS, "--lora-modules"]
    stock += [f"{n}={experts / n}" for n in EXPERTS]
    # vLLM's own server gets the thread binding mergeserve's engine uses by default
    # (every core of this machine; benchmarks/threads.py): the same threads for both.
    bind = {CPU_BIND_ENV: b} if (b := cpu_binding(None)) else {}
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        t = Path(tmp)
        m = stack.enter_context(
            server_process(["--experts-dir", str(experts)], t / "mergeserve.log", env, 900)
        )
        s = stack.enter_context(
            vllm_server_process(
                model, t / "vllm.log", stock, {**bind, "MERGESERVE_MIXTURE_PLUGIN": "0"}, 900
            )
        )

        cm, cs = bench_client(m.base_url), bench_client(s.base_url)

        async def bench() -> dict[str, Any]:
            sample = mixed_prompts(args.agreement)
            agree = await agreement(
                cm, peers, tokenizer, sample, distinct_weights(len(sample), rng)
            )
            print(f"agreement: {json.dumps(agree)}", file=sys.stderr, flush=True)
            routed = await top1_experts(cm, prompts)
            weights = RoundWeights(len(prompts), rng)

            async def mixture(r: int) -> dict[str, float]:
                bodies = [{"merge_weights": w} for w in weights(r)]
                return await run_round(
                    cm, "dynamic:exact", prompts, args.concurrency, args.max_tokens, bodies
                )

            def llama(name: str) -> Any:
                async def run(r: int) -> dict[str, float]:
                    return await asyncio.to_thread(
                        serial_round,
                        peers[name],
                        ids,
                        weights(r),
                        args.concurrency,
                        args.max_tokens,
                    )

                return run

            def served(c: openai.AsyncOpenAI, model: str) -> Any:
                async def run(_r: int) -> dict[str, float]:
                    return await run_round(c, model, prompts, args.concurrency, args.max_tokens)

                return run

            async def switching(_r: int) -> dict[str, float]:
                # each request to its routed expert's name
                return await run_round(cs, routed, prompts, args.concurrency, args.max_tokens)

            arms = {
                "mergeserve:mixture": mixture,
                "llama.cpp:f32": llama("llama.cpp:f32"),
                "llama.cpp:q4_1": llama("llama.cpp:q4_1"),
                "mergeserve:dynamic": served(cm, "dynamic"),
                "mergeserve:top1": served(cm, "route:top1"),
                "vllm:switching": switching,
            }
            res = await run_arms(arms, min_rounds=args.rounds, metric="tokens_per_s")
            ratios = {
                "mixture_over_llama_cpp_f32": ("mergeserve:mixture", "llama.cpp:f32"),
                "mixture_over_llama_cpp_q4_1": ("mergeserve:mixture", "llama.cpp:q4_1"),
                "dynamic_over_vllm_switching": ("mergeserve:dynamic", "vllm:switching"),
                "dynamic_over_top1": ("mergeserve:dynamic", "mergeserve:top1"),
                "top1_over_vllm_switching": ("mergeserve:top1", "vllm:switching"),
            }
            return {
                "agreement": agree,
                "routed_experts": {e: routed.count(e) for e in sorted(set(routed))},
                **res.summary("tokens_per_s", ratios),
            }

        result = asyncio.run(bench())
    out = {
        "benchmark": "peers",
        "profile": args.profile,
        "profile_env": PROFILES[args.profile],
        "model": "SmolLM2-135M-Instruct; fp32 on vLLM, f32 and Q4_1 GGUF on llama.cpp",
        "concurrency": args.concurrency,
        "requests_per_round": args.requests,
        "max_tokens": args.max_tokens,
        "llama_threads": args.llama_threads,
        **result,
        "command": command_line("peers.py", args, skip=("cache",)),
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
