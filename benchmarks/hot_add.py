"""Hot-add under load, on the harness: seconds from the POST to the first token of a
request generated under the new expert, and how many requests failed, over ≥ 5 add/remove
cycles on one server (benchmarks/harness.py: a warm-up cycle recorded, not counted).

Starts `mergeserve serve` (real vLLM, the embedded SmolLM2-135M-Instruct, the engine
settings `make serve` uses) with five of the six demo experts and the admin API on, keeps
C streaming clients busy on `dynamic` with test-split prompts of all six tasks (the sixth
task's prompts are routed elsewhere while its expert is absent) for the whole run. Each
round: upload the sixth expert (`POST /admin/experts`), keep the load on for
`--after-s`, remove it (`DELETE /admin/experts/{name}`), keep the load on for
`--settle-s`. Per round:

* `post_s`: the POST's own latency (validation, copy, Twin exclusive, router update);
* `first_token_s`: from the POST's start to the first content token of a request routed
  to the new expert (client-observed: routing, merge, the engine's queue and prefill
  under the load). From the POST on, a probe of the new task is sent every 0.1 s, so this
  times the server, not when the mixed load happens to ask for the new task; a probe not
  routed to the new expert is closed at its `merge` chunk, before it generates (probes
  left to run added up to 10 prefills a second, more than the engine serves here, and
  the first routed probe's TTFT then timed the queue the earlier probes made: 1-1.9 s
  against the load's 0.5 s);
* `first_routed_s`: the same to that request's `merge` chunk (routed and adapter leased,
  sent before the request queues in the engine: the routing alone);
* `new_task_routed_after`: share of the new task's prompts sent after the POST returned
  that were routed to the new expert (routable at once, by its examples alone?);
* `remove_s`: the DELETE's latency; `failed`: requests sent in the round that did not
  end in a whole 200 stream (target 0: neither the add nor the removal of an expert
  breaks a request, including one routed to the expert being removed).

    python benchmarks/hot_add.py [--concurrency 8] [--expert to_json] [--rounds 5]
        [--before-s 20] [--after-s 10] [--settle-s 5] [--max-tokens 16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx
import openai
from harness import MIN_ROUNDS, command_line, run_arms
from hot_add_harness import (
    HotAddServer,
    hot_add_server,
    interleaved,
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
    """time.perf_counter() of the chunk carrying `merge` (routed, adapter leased)."""
    weights: dict[str, float] | None
    ok: bool
    error: str | None = None
    first_token: float | None = None
    """time.perf_counter() of the first content chunk (or of the end, if none had text)."""


async def one(
    client: openai.AsyncOpenAI,
    task: str,
    prompt: str,
    max_tokens: int,
    keep: Callable[[dict[str, float]], bool] | None = None,
) -> Done:
    """One streamed `dynamic` request. With `keep`, a request whose routing (the `merge`
    chunk) it rejects is closed there, before it generates: a probe that missed the new
    expert leaves the engine at once instead of queueing a prefill (ok, no token)."""
    t0 = time.perf_counter()
    first, weights, token = None, None, None
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
                if keep is not None and not keep(weights or {}):
                    await stream.close()  # the server aborts it in the engine
                    return Done(task, t0, first, weights, True)
            if "error" in extra:
                return Done(task, t0, first, weights, False, str(extra["error"]), token)
            if chunk.choices and token is None and chunk.choices[0].delta.content:
                token = time.perf_counter()
            if chunk.choices and chunk.choices[0].finish_reason is not None:
                finished = True
                token = token or time.perf_counter()
        return Done(task, t0, first, weights, finished, None if finished else "no finish", token)
    except Exception as e:  # counted, never fatal: the figure is how many
        return Done(task, t0, first, weights, False, f"{type(e).__name__}: {e}", token)


async def bench(server: HotAddServer, args: argparse.Namespace) -> dict[str, Any]:
    client = openai.AsyncOpenAI(
        base_url=f"{server.base_url}/v1", api_key="-", max_retries=0, timeout=600
    )
    http = httpx.AsyncClient(
        base_url=server.base_url,
        headers={"Authorization": f"Bearer {server.token}"},
        timeout=600,
    )
    prompts = task_test_prompts()
    mix = interleaved(prompts)
    done: list[Done] = []
    stop = asyncio.Event()
    probe_prompts = [s.prompt for s in generate(args.expert, "dev", 50)]

    async def worker() -> None:
        while not stop.is_set():
            task, prompt = next(mix)
            done.append(await one(client, task, prompt, args.max_tokens))

    def routed(d: Done) -> bool:
        return bool(d.weights and args.expert in d.weights)

    def served_new(d: Done) -> bool:
        """Routed to the new expert and generated a token under it."""
        return routed(d) and d.first_token is not None

    async def cycle(_round: int) -> Mapping[str, float]:
        t_round = time.perf_counter()
        probing = asyncio.Event()
        probe_task = asyncio.create_task(
            probe_until_routed(
                lambda p: one(client, args.expert, p, 1, keep=lambda w: args.expert in w),
                served_new,
                probe_prompts,
                probing,
            )
        )
        upload = await upload_expert(server)
        if upload.response.status_code != 201:
            probing.set()
            await probe_task
            raise RuntimeError(
                f"the add failed: HTTP {upload.response.status_code} {upload.response.text}"
            )
        t_post, post_s = upload.started, upload.seconds
        await asyncio.sleep(args.after_s)
        probing.set()
        probes = await probe_task
        t0 = time.perf_counter()
        r = await http.delete(f"/admin/experts/{args.expert}")
        remove_s = time.perf_counter() - t0
        if r.status_code != 200:
            raise RuntimeError(f"the removal failed: HTTP {r.status_code} {r.text}")
        await asyncio.sleep(args.settle_s)
        first = min(
            filter(served_new, probes),
            key=lambda d: d.first_token or 0.0,
            default=None,
        )
        if first is None or first.first_token is None or first.first_chunk is None:
            raise RuntimeError(f"no probe was routed to {args.expert} in {args.after_s} s")
        window = [d for d in [*done, *probes] if d.started >= t_round]
        new_after = [
            d for d in window if d.task == args.expert and t_post + post_s < d.started < t0
        ]
        failures.extend(d.error or "?" for d in window if not d.ok)
        return {
            "first_token_s": first.first_token - t_post,
            "first_routed_s": first.first_chunk - t_post,
            "post_s": post_s,
            "remove_s": remove_s,
            "new_task_routed_after": (
                sum(1 for d in new_after if routed(d)) / len(new_after) if new_after else 0.0
            ),
            "requests": float(len(window)),
            "failed": float(sum(1 for d in window if not d.ok)),
        }

    failures: list[str] = []
    # Warm every path once (MiniLM's first batch, the first merges) before the load.
    for t in TASKS:
        await one(client, t, prompts[t][0], 4)
    workers = [asyncio.create_task(worker()) for _ in range(args.concurrency)]
    await asyncio.sleep(args.before_s)
    try:
        res = await run_arms({"hot_add": cycle}, min_rounds=args.rounds, metric="first_token_s")
    finally:
        stop.set()
        await asyncio.gather(*workers)
        await http.aclose()
    out = res.summary("first_token_s")
    totals = {
        "requests": int(sum(res.values("hot_add", "requests"))),
        "failed": int(sum(res.values("hot_add", "failed"))),
        "failures": failures[:5],
        **{
            k: res.spread("hot_add", k).rounded()
            for k in ("first_routed_s", "post_s", "remove_s", "new_task_routed_after")
        },
    }
    return {
        "benchmark": "hot_add",
        **out,
        "model": "SmolLM2-135M-Instruct (fp32)",
        "served_before": [t for t in TASKS if t != args.expert],
        "added": args.expert,
        "concurrency": args.concurrency,
        "max_tokens": args.max_tokens,
        "totals": totals,
        "target": {"first_token_s": "< 2", "failed": 0},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--expert", default="to_json", choices=sorted(TASKS), help="the one added")
    p.add_argument("--rounds", type=int, default=MIN_ROUNDS, help="add/remove cycles, at least")
    p.add_argument("--before-s", type=float, default=20.0, help="load before the first add")
    p.add_argument("--after-s", type=float, default=10.0, help="load after each add")
    p.add_argument("--settle-s", type=float, default=5.0, help="load after each removal")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads of the engine (default: the engine's, as make serve runs)",
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
    result["command"] = command_line("hot_add.py", args)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
