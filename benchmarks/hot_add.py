"""Hot-add under load: seconds from the POST to the first request routed to the new
expert, and how many requests failed.

Starts `mergeserve serve` (real vLLM, the embedded SmolLM2-135M-Instruct) with five of
the six demo experts and the admin API on, keeps C streaming clients busy on `dynamic`
with test-split prompts of all six tasks (the sixth task's prompts are routed elsewhere
until its expert exists), then uploads the sixth expert through `POST /admin/experts`
and keeps the load on. Prints one JSON object:

* `post_s`: the POST's own latency (validation, copy, Twin exclusive, router update);
* `first_routed_s`: from the POST's start to the first response chunk whose `merge`
  names the new expert (client-observed; includes that request's routing and merge).
  From the POST on, a probe request of the new task is sent every 0.1 s, so this
  measures the server, not when the mixed load happens to ask for the new task (that
  figure is `first_routed_in_steady_load_s`);
* `failed`: requests that did not end in a whole 200 stream (target 0), before, during
  and after the add;
* `new_task_routed_after`: share of the new task's prompts sent after the add that were
  routed to the new expert (is it routable at once, by its examples alone?).

    python benchmarks/hot_add.py [--concurrency 8] [--expert to_json] [--before-s 20]
        [--after-s 30] [--max-tokens 16] [--threads 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from dataclasses import dataclass

import openai
from hot_add_harness import (
    HotAddServer,
    hot_add_server,
    interleaved,
    machine,
    probe_until_routed,
    task_test_prompts,
    upload_expert,
)

from mergeserve.tasks import TASKS, generate

TOKEN = "hot-add-benchmark"


@dataclass
class Done:
    task: str
    started: float
    first_chunk: float | None
    weights: dict[str, float] | None
    ok: bool
    error: str | None = None


async def one(client: openai.AsyncOpenAI, task: str, prompt: str, max_tokens: int) -> Done:
    t0 = time.perf_counter()
    first, weights = None, None
    try:
        stream = await client.chat.completions.create(
            model="dynamic",
            messages=[{"role": "user", "content": prompt}],
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
        )
        finished = False
        async for chunk in stream:
            extra = chunk.model_extra or {}
            if first is None and "merge" in extra:
                first, weights = time.perf_counter(), extra["merge"]["weights"]
            if "error" in extra:
                return Done(task, t0, first, weights, False, str(extra["error"]))
            if chunk.choices and chunk.choices[0].finish_reason is not None:
                finished = True
        return Done(task, t0, first, weights, finished, None if finished else "no finish")
    except Exception as e:  # counted, never fatal: the figure is how many
        return Done(task, t0, first, weights, False, f"{type(e).__name__}: {e}")


async def bench(server: HotAddServer, args: argparse.Namespace) -> dict[str, object]:
    client = openai.AsyncOpenAI(
        base_url=f"{server.base_url}/v1", api_key="-", max_retries=0, timeout=600
    )
    prompts = task_test_prompts()
    mix = interleaved(prompts)
    done: list[Done] = []
    stop = asyncio.Event()

    async def worker() -> None:
        while not stop.is_set():
            task, prompt = next(mix)
            done.append(await one(client, task, prompt, args.max_tokens))

    # Warm every path once (MiniLM's first batch, the first merges) before measuring.
    for t in TASKS:
        await one(client, t, prompts[t][0], 4)
    workers = [asyncio.create_task(worker()) for _ in range(args.concurrency)]
    await asyncio.sleep(args.before_s)

    # From the POST on, a probe of the new task every 0.1 s: when is the first one routed
    # to the new expert?
    probing = asyncio.Event()
    probe_task = asyncio.create_task(
        probe_until_routed(
            lambda p: one(client, args.expert, p, 1),
            lambda d: bool(d.weights and args.expert in d.weights),
            [s.prompt for s in generate(args.expert, "dev", 50)],
            probing,
        )
    )
    upload = await upload_expert(server)
    r, t_post, post_s = upload.response, upload.started, upload.seconds
    if r.status_code != 201:
        stop.set()
        await asyncio.gather(*workers)
        raise SystemExit(f"the add failed: HTTP {r.status_code} {r.text}")
    await asyncio.sleep(args.after_s)
    probing.set()
    probes = await probe_task
    stop.set()
    await asyncio.gather(*workers)

    def first_routed(ds: list[Done]) -> Done | None:
        routed = [d for d in ds if d.weights and args.expert in d.weights and d.first_chunk]
        return min(routed, key=lambda d: d.first_chunk or 0.0, default=None)

    probe = first_routed(probes)
    in_load = first_routed(done)
    first = probe.first_chunk if probe is not None else None
    done += probes
    new_after = [d for d in done if d.task == args.expert and d.started > t_post + post_s]
    failed = [d for d in done if not d.ok]
    return {
        "benchmark": "hot_add",
        "model": "SmolLM2-135M-Instruct (fp32)",
        "served_before": [t for t in TASKS if t != args.expert],
        "added": args.expert,
        "concurrency": args.concurrency,
        "max_tokens": args.max_tokens,
        "requests": len(done),
        "requests_started_during_post": sum(
            1 for d in done if t_post <= d.started < t_post + post_s
        ),
        "post_s": round(post_s, 3),
        "server_add_s": r.json()["seconds"],
        "first_routed_s": round(first - t_post, 3) if first is not None else None,
        "first_routed_probe_sent_s": round(probe.started - t_post, 3) if probe else None,
        "first_routed_in_steady_load_s": round((in_load.first_chunk or 0.0) - t_post, 3)
        if in_load
        else None,
        "probes": len(probes),
        "failed": len(failed),
        "failures": [d.error for d in failed[:5]],
        "new_task_routed_after": round(
            sum(1 for d in new_after if d.weights and args.expert in d.weights) / len(new_after),
            3,
        )
        if new_after
        else None,
        "new_task_requests_after": len(new_after),
        "target": {"first_routed_s": "< 2", "failed": 0},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--expert", default="to_json", choices=sorted(TASKS), help="the one added")
    p.add_argument("--before-s", type=float, default=20.0, help="load before the add")
    p.add_argument("--after-s", type=float, default=30.0, help="load after the add")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help="CPU threads of the engine (set explicitly: runs are compared)",
    )
    args = p.parse_args()
    env = {
        "MERGESERVE_ENGINE__MAX_NUM_SEQS": str(max(16, args.concurrency)),
        # The add under a steady load, not admission control (load.py measures that).
        "MERGESERVE_SERVER__QUEUE_BUDGET_S": "0",
    }
    with hot_add_server(args.expert, threads=args.threads, token=TOKEN, env=env) as s:
        result = asyncio.run(bench(s, args))
        result["server_startup_s"] = round(s.server.startup_s, 1)
    result["machine"] = machine(args.threads)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
