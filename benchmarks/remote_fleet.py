"""The mixture over the wire: dynamic requests on remote vLLM servers (RemoteVllmEngine)
against the same requests materialized on a remote server and against the local mixture,
side by side in one run (benchmarks/harness.py: balanced order, warm-up shown, ≥ 5
rounds, paired ratios). Issue 27's figures.

Starts, all at once, on the embedded SmolLM2-135M-Instruct with the six demo experts:

* V1: vLLM's own OpenAI server with mergeserve's plugin (MERGESERVE_MIXTURE_PLUGIN=1),
  runtime LoRA loading, rank-64 slots (one per request in flight), the same thread
  binding as mergeserve's engine (every core);
* H1, H2: two more such servers, each bound to its own half of the cores: two replicas
  splitting the machine, as two machines would not have to (two servers both bound to
  every core served half of what one does in a first run: their spinning OpenMP threads
  fight over the same cores);
* L:  `mergeserve serve` with its in-process engine, mixture on (the single-node path);
* R1: `mergeserve serve` remote, in front of V1, mixture on;
* RP: `mergeserve serve` remote, in front of V1, mixture off (every merge materialized,
      written to the shared dir and registered on V1: what remote serving did before);
* R2: `mergeserve serve` remote, in front of H1 and H2, mixture on;
* RH: `mergeserve serve` remote, in front of H1 alone, mixture on.

Every arm serves the same requests: C concurrent streaming clients, mixed test-split
prompts, `dynamic:exact` with a different weighting of all six experts for every request
(rank-48 bundle; no two requests share a merge), `ignore_eos`, exactly max_tokens each.
Prints one JSON object: tokens/s per arm (median, min, max) and the paired ratios

* `remote_mixture_over_remote_materialized`  ≥ 3 wanted;
* `remote_mixture_over_local_mixture`        ≥ 0.8 wanted (the HTTP hop is the price);
* `two_endpoints_over_one`                   ≥ 1 wanted: two half-machine replicas
  against one whole-machine server (on separate machines or GPUs each brings its own);
* `two_halves_over_one_half`                 what adding the second half-machine replica
  to the first gives (2 if the spreading cost nothing and the halves did not compete).

    python benchmarks/remote_fleet.py [--concurrency 16] [--requests 32] [--max-tokens 32]
        [--rounds 5] [--profile make-serve|deployed]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from harness import add_workload_args, command_line, run_arms
from profiles import PLUGIN_PROFILES, PROFILES, mergeserve_env
from serve_throughput import RoundWeights
from stream_clients import bench_client, mixed_prompts, run_round

from mergeserve.config import LLAMA_PROJECTIONS, Settings, default_experts_dir
from mergeserve.runtime.base_model import ensure_embedded_model
from mergeserve.runtime.engine import CPU_BIND_ENV, cpu_binding
from mergeserve.testing import server_process, vllm_server_process

ARMS = {"local:mixture": "L", "remote:mixture": "R1", "remote:materialized": "RP"}
ARMS |= {"remote2:mixture": "R2", "remote-half:mixture": "RH"}
RATIOS = {
    "remote_mixture_over_remote_materialized": ("remote:mixture", "remote:materialized"),
    "remote_mixture_over_local_mixture": ("remote:mixture", "local:mixture"),
    "two_endpoints_over_one": ("remote2:mixture", "remote:mixture"),
    "two_halves_over_one_half": ("remote2:mixture", "remote-half:mixture"),
    "local_mixture_over_remote_materialized": ("local:mixture", "remote:materialized"),
}


async def distinct_weightings(
    urls: dict[str, str],
    arms: dict[str, str],
    args: argparse.Namespace,
    ratios: dict[str, tuple[str, str]],
) -> dict[str, Any]:
    """Each arm (name: the key of its server in `urls`) on the harness, all serving the same
    requests: `dynamic:exact` with a distinct weighting of the six experts per request.
    The workload's description and the summary, for the result JSON."""
    clients = {k: bench_client(u) for k, u in urls.items()}
    prompts = mixed_prompts(args.requests)
    weights = RoundWeights(len(prompts), random.Random(0))

    def arm(server: str) -> Any:
        async def run(r: int) -> dict[str, float]:
            bodies = [{"merge_weights": w} for w in weights(r)]
            return await run_round(
                clients[server], "dynamic:exact", prompts, args.concurrency, args.max_tokens, bodies
            )

        return run

    res = await run_arms(
        {a: arm(s) for a, s in arms.items()}, min_rounds=args.rounds, metric="tokens_per_s"
    )
    return {
        "model": "SmolLM2-135M-Instruct (fp32)",
        "experts": "examples/experts (six rank-8 demo experts; bundle rank 48)",
        "workload": "dynamic:exact, a distinct weighting of the six experts per request",
        "concurrency": args.concurrency,
        "requests_per_round": args.requests,
        "max_tokens": args.max_tokens,
        **res.summary("tokens_per_s", ratios),
    }


async def bench(urls: dict[str, str], args: argparse.Namespace) -> dict[str, Any]:
    return {
        "benchmark": "remote_fleet",
        "two_endpoints": "two servers, each bound to its own half of the cores",
        **await distinct_weightings(urls, ARMS, args, RATIOS),
    }


def vllm_args(concurrency: int, slots: int) -> list[str]:
    """vLLM's own server with the same limits, runtime LoRA on the projections."""
    out = ["--dtype", "float32", "--max-model-len", "2048"]
    out += ["--max-num-seqs", str(max(16, concurrency))]
    out += ["--enable-lora", "--max-lora-rank", "64", "--max-loras", str(slots)]
    return [*out, "--lora-target-modules", *LLAMA_PROJECTIONS]


def plugin_env(profile: str, cores: list[int] | None = None) -> dict[str, str]:
    """A vLLM server's environment: mergeserve's plugin on, bound to `cores` (None: the
    binding mergeserve's engine uses, every core)."""
    plugin = {**PLUGIN_PROFILES[profile], "MERGESERVE_MIXTURE_PLUGIN": "1"}
    b = cpu_binding(None if cores is None else len(cores), cores)  # exactly these cores
    return {**plugin, CPU_BIND_ENV: b} if b else plugin


def demo_paths() -> tuple[Path, Path]:
    """The embedded model and the demo experts (from a checkout)."""
    experts = default_experts_dir()
    if experts is None:
        raise SystemExit("run from a checkout: the demo experts are in examples/experts")
    return ensure_embedded_model(Settings().cache), experts


def serve_in(
    stack: ExitStack, tmp: Path, name: str, env: dict[str, str], model: Path, experts: Path
) -> str:
    """`mergeserve serve` with its own caches under tmp/name, for the life of `stack`."""
    e = {**env, "MERGESERVE_MERGE__CACHE_DIR": str(tmp / name / "merged")}
    e["MERGESERVE_CACHE"] = str(tmp / name / "cache")
    cmd = ["--model", str(model), "--experts-dir", str(experts)]
    return stack.enter_context(server_process(cmd, tmp / f"{name}.log", e, timeout_s=900)).base_url


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_workload_args(p)
    p.add_argument("--profile", choices=sorted(PROFILES), default="make-serve")
    args = p.parse_args()

    model, experts = demo_paths()
    # A slot for every request in flight: materializing gives each its own adapter, and
    # vLLM batches only as many adapters as it has slots (benchmarks/lora_slots.py; the
    # mixture takes one slot either way).
    slots = max(8, args.concurrency)
    env = mergeserve_env(args.profile, args.concurrency, slots)
    v_args = vllm_args(args.concurrency, slots)
    cores = sorted(os.sched_getaffinity(0))
    halves = [cores[: max(1, len(cores) // 2)], cores[max(1, len(cores) // 2) :] or cores]

    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        t = Path(tmp)
        v1, h1, h2 = (
            stack.enter_context(
                vllm_server_process(
                    model, t / f"{n}.log", v_args, plugin_env(args.profile, c), timeout_s=900
                )
            )
            for n, c in (("v1", None), ("h1", halves[0]), ("h2", halves[1]))
        )

        def serve(name: str, extra: dict[str, str]) -> str:
            return serve_in(stack, t, name, {**env, **extra}, model, experts)

        remote = {"MERGESERVE_ENGINE__KIND": "remote"}
        urls = {
            "L": serve("local", {}),
            "R1": serve("r1", {**remote, "MERGESERVE_ENGINE__REMOTE__URL": v1.base_url}),
            "RP": serve(
                "rp",
                {
                    **remote,
                    "MERGESERVE_ENGINE__REMOTE__URL": v1.base_url,
                    "MERGESERVE_ENGINE__MIXTURE": "false",
                },
            ),
            "R2": serve(
                "r2", {**remote, "MERGESERVE_ENGINE__REMOTE__URL": f"{h1.base_url},{h2.base_url}"}
            ),
            "RH": serve("rh", {**remote, "MERGESERVE_ENGINE__REMOTE__URL": h1.base_url}),
        }
        result = asyncio.run(bench(urls, args))
    result["profile"] = args.profile
    result["command"] = command_line("remote_fleet.py", args)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
