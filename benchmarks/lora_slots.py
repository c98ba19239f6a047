"""How many LoRA slots a server needs: the mixture and materializing with 8 slots (what
the deploy files give a vLLM server) and with a slot per request in flight, side by side
in one run (benchmarks/harness.py: balanced order, warm-up shown, ≥ 5 rounds, paired
ratios). Why remote_fleet.py and serve_throughput.py give their servers the latter.

Starts, all at once, on the embedded SmolLM2-135M-Instruct with the six demo experts:

* V8, VN: vLLM's own OpenAI server with mergeserve's plugin, 8 and N = max(8,
  concurrency) rank-64 slots, bound as mergeserve's engine binds (every core);
* in front of each, two `mergeserve serve` with the remote engine: the mixture on, and
  off (every weighting materialized: built, written, registered, one slot while it runs).

Every arm serves the same requests: C concurrent streaming clients, mixed test-split
prompts, `dynamic:exact` with a distinct weighting of all six experts per request,
`ignore_eos`, exactly max_tokens each. vLLM's scheduler runs at most as many adapters
at once as there are slots, so with fewer slots than requests in flight materializing
serves the rest later; the mixture puts every weighting in one slot.

Ratios: `materialized_n_over_8` (what the extra slots give materializing) and
`mixture_n_over_8` (what they cost the mixture: its stacked factors take more memory).

    python benchmarks/lora_slots.py [--concurrency 16] [--requests 32] [--max-tokens 32]
        [--rounds 5] [--profile deployed|make-serve]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from harness import add_workload_args, command_line
from profiles import PROFILES, mergeserve_env
from remote_fleet import demo_paths, distinct_weightings, plugin_env, serve_in, vllm_args

from mergeserve.testing import vllm_server_process

RATIOS = {
    "materialized_n_over_8": ("materialized:n-slots", "materialized:8-slots"),
    "mixture_n_over_8": ("mixture:n-slots", "mixture:8-slots"),
    "mixture_over_materialized_8": ("mixture:8-slots", "materialized:8-slots"),
    "mixture_over_materialized_n": ("mixture:n-slots", "materialized:n-slots"),
}


async def bench(urls: dict[str, str], args: argparse.Namespace) -> dict[str, Any]:
    return {
        "benchmark": "lora_slots",
        "slots": {"8-slots": 8, "n-slots": max(8, args.concurrency)},
        **await distinct_weightings(urls, {a: a for a in urls}, args, RATIOS),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_workload_args(p)
    p.add_argument("--profile", choices=sorted(PROFILES), default="deployed")
    args = p.parse_args()

    model, experts = demo_paths()
    many = max(8, args.concurrency)
    remote = {"MERGESERVE_ENGINE__KIND": "remote"}
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        t = Path(tmp)
        urls: dict[str, str] = {}
        for label, slots in (("8-slots", 8), ("n-slots", many)):
            v = stack.enter_context(
                vllm_server_process(
                    model,
                    t / f"vllm-{label}.log",
                    vllm_args(args.concurrency, slots),
                    plugin_env(args.profile),
                    timeout_s=900,
                )
            )
            env = {
                **mergeserve_env(args.profile, args.concurrency, slots),
                **remote,
                "MERGESERVE_ENGINE__REMOTE__URL": v.base_url,
            }
            urls[f"mixture:{label}"] = serve_in(stack, t, f"mix-{label}", env, model, experts)
            off = {**env, "MERGESERVE_ENGINE__MIXTURE": "false"}
            urls[f"materialized:{label}"] = serve_in(stack, t, f"mat-{label}", off, model, experts)
        result = asyncio.run(bench(urls, args))
    result["profile"] = args.profile
    result["command"] = command_line("lora_slots.py", args)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
