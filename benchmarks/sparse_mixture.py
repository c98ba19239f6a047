"""What leaving a step's zero-weighted bundle columns out of the LoRA GEMMs saves, inside
one vLLM engine, in one run (benchmarks/harness.py: balanced order, warm-up shown, ≥ 5
rounds, paired ratios).

The six demo experts' bundle has rank 48 (six blocks of 8). A routed request weights one
or two of them, so most of its rank columns are scaled by zero; the plugin's CPU path
leaves the columns that no token of a step weights out of the shrink and expand GEMMs
(`mergeserve.vllm_plugin.plan_groups`): a step whose requests all weight one expert
computes rank 8, one whose requests weight all six computes all 48. `:all-columns` arms
run with that off (`vllm_plugin.SKIP_ZERO_SCALES = False`, between rounds, on the same
engine), as the plugin ran before.

One in-process engine as lora_engine.py starts it (`BundleEngine`: LoRA on, slot rank 64,
the plugin, eager unless `--compile`); each round generates `--requests` mixed
test-split prompts at once (the six tasks interleaved), `--max-tokens` each (greedy,
`ignore_eos`):

* `expert`     `expert:add`, one rank-8 expert for every request;
* `routed`     the bundle, each request weighting its own task's expert alone (weight 1,
               the others 0): what the router gives in-domain requests;
* `one-task`   the bundle, every request weighting `add` alone: the merge is one expert;
* `mixture`    the bundle, a distinct weighting of all six per request (nothing to leave
               out: what the planning costs);

the last three also as `…:all-columns`. Ratios: each arm over `expert` and over its
`:all-columns` self.

    python benchmarks/sparse_mixture.py [--requests 16] [--max-tokens 32] [--rounds 5]
        [--compile]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time
from collections.abc import Iterator
from typing import Any

from harness import command_line, run_arms
from lora_engine import BundleEngine, add_engine_args

from mergeserve.tasks import TASKS

KINDS = ("routed", "one-task", "mixture")
RATIOS = {
    **{f"{k}_over_expert": (k, "expert") for k in KINDS},
    **{f"{k}_over_all_columns": (k, f"{k}:all-columns") for k in KINDS},
    "routed_all_columns_over_expert": ("routed:all-columns", "expert"),
}


@contextlib.contextmanager
def all_columns() -> Iterator[None]:
    """The plugin computing every rank column of the bundle, as before `plan_groups`."""
    from mergeserve import vllm_plugin

    vllm_plugin.SKIP_ZERO_SCALES = False
    try:
        yield
    finally:
        vllm_plugin.SKIP_ZERO_SCALES = True


def one_hot(names: tuple[str, ...], task: str) -> dict[str, float]:
    return {n: 1.0 if n == task else 0.0 for n in names}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_engine_args(p)
    args = p.parse_args()

    eng = BundleEngine.start(compile=args.compile, requests=args.requests)
    from vllm.lora.request import LoRARequest

    names = eng.bundle.names
    expert = LoRARequest("expert", 1, str(eng.experts / "add"))
    bundle = LoRARequest("bundle", 2, str(eng.bundle_dir))
    # mixed_prompts interleaves the tasks in TASKS order: prompt i is of TASKS[i % 6]
    order = list(TASKS)
    tasks = [order[i % len(order)] for i in range(len(eng.prompts))]

    def weights_of(kind: str) -> list[dict[str, float]]:
        if kind == "routed":
            return [one_hot(names, t) for t in tasks]
        if kind == "one-task":
            return [one_hot(names, "add")] * len(tasks)
        return eng.random_weightings()

    def generate(kind: str, every_column: bool) -> tuple[list[list[int]], float]:
        if kind == "expert":
            sp, lora = eng.params(args.max_tokens), expert
        else:
            sp, lora = eng.params(args.max_tokens, weights_of(kind)), bundle
        ctx = all_columns() if every_column else contextlib.nullcontext()
        with ctx:
            t0 = time.perf_counter()
            outs = eng.llm.generate(eng.prompts, sp, lora_request=[lora] * len(sp), use_tqdm=False)
            wall = time.perf_counter() - t0
        return [list(o.outputs[0].token_ids) for o in outs], wall

    def arm(kind: str, every_column: bool) -> Any:
        async def run(_r: int) -> dict[str, float]:
            replies, wall = generate(kind, every_column)
            tokens = sum(len(t) for t in replies)
            return {"tokens_per_s": tokens / wall, "wall_s": wall, "completion_tokens": tokens}

        return run

    def same(a: list[list[int]], b: list[list[int]]) -> int:
        return sum(x == y for x, y in zip(a, b, strict=True))

    # Greedy replies (full length: ignore_eos) with the columns left out and without, and
    # `add` alone in the bundle against the expert itself: the same weights, the same
    # tokens, but for float rounding over fewer GEMM terms.
    agreement = {
        "routed_vs_all_columns": same(generate("routed", False)[0], generate("routed", True)[0]),
        "one_task_vs_all_columns": same(
            generate("one-task", False)[0], generate("one-task", True)[0]
        ),
        "one_task_vs_expert": same(generate("one-task", False)[0], generate("expert", False)[0]),
        "of": len(tasks),
    }

    arms = {"expert": arm("expert", False)}
    for k in KINDS:
        arms[k] = arm(k, False)
        arms[f"{k}:all-columns"] = arm(k, True)
    res = asyncio.run(run_arms(arms, min_rounds=args.rounds, metric="tokens_per_s"))
    print(
        json.dumps(
            {
                "benchmark": "sparse_mixture",
                "model": "SmolLM2-135M-Instruct (fp32), one in-process vLLM engine",
                "experts": "examples/experts (expert: add, rank 8; bundle: all six, rank 48)",
                "requests_per_round": args.requests,
                "max_tokens": args.max_tokens,
                "compiled": args.compile,
                "identical_replies": agreement,
                **res.summary("tokens_per_s", RATIOS),
                "command": command_line("sparse_mixture.py", args),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
