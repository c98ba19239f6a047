"""Where the mixture's generation time goes: torch's profiler over one in-process vLLM
engine (benchmarks/lora_engine.py's BundleEngine: LoRA on, slot rank 64, the plugin, the
worker bound as `mergeserve serve` binds it) generating the same 16 prompts with no
adapter (`base`) and with the six demo experts' rank-48 bundle under a distinct
weighting per request (`mixture`).

A diagnostic, not a side-by-side benchmark: it says how much of a step the plugin's LoRA
op takes (`lora_share`: `mergeserve::lora_linear`'s CPU time, its GEMMs included, over
all CPU time of the profiled generation), which bounds what any speed-up of the LoRA
path can give: with it free, the mixture would run at most at `base`'s speed. Prints the
profiler's top operators per arm, then one JSON object (tokens/s of a few unprofiled
runs in an ABBA order, and the shares).

    python benchmarks/profile_mixture.py [--compile] [--requests 16] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from harness import command_line
from lora_engine import BundleEngine

ORDER = ("base", "mixture", "mixture", "base", "base", "mixture", "mixture", "base")
LORA_OP = "mergeserve::lora_linear"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=16, help="prompts generated at once")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--compile", action="store_true", help="compile the model (as deployed)")
    p.add_argument("--rows", type=int, default=15, help="operators shown per arm")
    args = p.parse_args()

    eng = BundleEngine.start(compile=args.compile, requests=args.requests)
    import torch
    from vllm.lora.request import LoRARequest

    lora = LoRARequest("bundle", 1, str(eng.bundle_dir))

    def generate(kind: str) -> float:
        params = eng.params(args.max_tokens, eng.random_weightings() if kind == "mixture" else None)
        t0 = time.perf_counter()
        outs = eng.llm.generate(
            eng.prompts,
            params,
            lora_request=[lora] * len(eng.prompts) if kind == "mixture" else None,
            use_tqdm=False,
        )
        return sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - t0)

    for kind in ORDER[:4]:  # warm-up
        generate(kind)
    timed: dict[str, list[float]] = {"base": [], "mixture": []}
    for kind in ORDER:
        timed[kind].append(generate(kind))
    shares: dict[str, float] = {}
    for kind in ("base", "mixture"):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            generate(kind)
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events)
        lora_total = sum(e.cpu_time_total for e in events if e.key == LORA_OP)
        shares[kind] = round(lora_total / total, 3) if total else 0.0
        print(f"=== {kind}", file=sys.stderr)
        print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows), file=sys.stderr)
    med = {k: statistics.median(v) for k, v in timed.items()}
    result = {
        "benchmark": "profile_mixture",
        "compiled": args.compile,
        "tokens_per_s": {k: [round(x, 1) for x in v] for k, v in timed.items()},
        "base_over_mixture": round(med["base"] / med["mixture"], 3),
        "lora_share": shares,
        "command": command_line("profile_mixture.py", args),
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
