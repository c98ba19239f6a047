"""Start-up: seconds from `mergeserve serve` to the first answered chat, cold and warm.

Each round starts the server on the demo experts (the default settings: the embedded
SmolLM2-135M-Instruct, the four default static arms built in the background, dynamic
arms, MiniLM router) twice with the same cache dirs:

* `first`: empty `MERGESERVE_CACHE` and `VLLM_CACHE_ROOT` (a new machine after `make
  venv`: the GGUF is converted, every cache is cold);
* `second`: the same dirs again (a restart: what a pod restart or a config change costs).

Two arms: `compiled` (`MERGESERVE_ENGINE__COMPILE=true`, what the deploy files set) and
`eager` (the default, `engine.compile` false), alternated in order from round to round. For each
start: seconds from spawning the process to /health 200, to the first answered chat on
`base`, on `dynamic` (greedy, 8 tokens), and to every static arm built (/ready
`building` 0). Prints one JSON object (also written to `--out`) with each start, the
median and spread per arm and phase, and the targets (second start ≤ 45 s, first
≤ 120 s, to the first answered chat).

    python benchmarks/startup.py [--rounds 5] [--threads 2] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from harness import machine_facts

from mergeserve.testing import free_port

ARMS = {
    "compiled": {"MERGESERVE_ENGINE__COMPILE": "true"},
    "eager": {"MERGESERVE_ENGINE__COMPILE": "false"},
}
TARGETS = {"second_first_chat_s": 45.0, "first_first_chat_s": 120.0}
PROMPT = [{"role": "user", "content": "What is the capital of Peru?"}]


def _chat(url: str, model: str) -> bool:
    try:
        r = httpx.post(
            f"{url}/v1/chat/completions",
            json={"model": model, "messages": PROMPT, "max_tokens": 8, "temperature": 0},
            timeout=60,
        )
    except httpx.HTTPError:
        return False
    return r.status_code == 200


def one_start(env: dict[str, str], log: Path, timeout_s: float) -> dict[str, Any]:
    """Spawn the server, time its milestones, stop it."""
    port = free_port()
    cmd = [sys.executable, "-m", "mergeserve", "serve", "--port", str(port)]
    url = f"http://127.0.0.1:{port}"
    out: dict[str, Any] = {}
    t0 = time.monotonic()
    with log.open("wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    try:
        while time.monotonic() - t0 < timeout_s:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited ({proc.returncode}); see {log}")
            now = round(time.monotonic() - t0, 1)
            if "health_s" not in out:
                try:
                    if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                        out["health_s"] = now
                except httpx.HTTPError:
                    pass
            if "health_s" in out:
                for model in ("base", "dynamic"):
                    key = f"first_chat_{model}_s"
                    if key not in out and _chat(url, model):
                        out[key] = round(time.monotonic() - t0, 1)
                if "all_built_s" not in out:
                    ready = httpx.get(f"{url}/ready", timeout=5).json()
                    if ready.get("building") == 0:
                        out["all_built_s"] = round(time.monotonic() - t0, 1)
                        out["failed_builds"] = ready.get("failed")
            if {"first_chat_base_s", "first_chat_dynamic_s", "all_built_s"} <= set(out):
                return out
            time.sleep(0.25)
        raise RuntimeError(f"not every milestone within {timeout_s} s: {out}; see {log}")
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def summary(xs: list[float]) -> dict[str, float]:
    return {
        "median": round(statistics.median(xs), 1),
        "min": round(min(xs), 1),
        "max": round(max(xs), 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2, help="CPU threads of the engine")
    p.add_argument("--timeout", type=float, default=900, help="seconds per start at most")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    out_path = args.out or Path(__file__).parent / "results" / "startup.cpu-2core.json"
    load_avg = [round(x, 2) for x in os.getloadavg()]
    starts: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            order = list(ARMS) if r % 2 == 0 else list(reversed(ARMS))
            for arm in order:
                caches = Path(tmp) / f"{arm}-{r}"
                env = {
                    **os.environ,
                    **ARMS[arm],
                    "MERGESERVE_CACHE": str(caches / "mergeserve"),
                    "VLLM_CACHE_ROOT": str(caches / "vllm"),
                    "MERGESERVE_ENGINE__CPU_THREADS": str(args.threads),
                }
                for phase in ("first", "second"):
                    log = Path(tmp) / f"{arm}-{r}-{phase}.log"
                    got = one_start(env, log, args.timeout)
                    starts.append({"round": r, "arm": arm, "phase": phase, **got})
                    print(json.dumps(starts[-1]), file=sys.stderr, flush=True)
    figures: dict[str, Any] = {}
    for arm in ARMS:
        for phase in ("first", "second"):
            rows = [s for s in starts if s["arm"] == arm and s["phase"] == phase]
            figures[f"{arm}.{phase}"] = {
                k: summary([s[k] for s in rows])
                for k in ("health_s", "first_chat_base_s", "first_chat_dynamic_s", "all_built_s")
            }
    result = {
        "benchmark": "startup",
        "model": "SmolLM2-135M-Instruct (fp32), the six demo experts, default settings",
        "rounds": args.rounds,
        "figures": figures,
        "targets": TARGETS,
        "meets": {
            arm: {
                "second": figures[f"{arm}.second"]["first_chat_dynamic_s"]["median"]
                <= TARGETS["second_first_chat_s"],
                "first": figures[f"{arm}.first"]["first_chat_dynamic_s"]["median"]
                <= TARGETS["first_first_chat_s"],
            }
            for arm in ARMS
        },
        "starts": starts,
        "machine": machine_facts(engine_threads=args.threads, load_avg_at_start=load_avg),
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
