"""Where the mixture's generation time goes: torch's profiler over one in-process vLLM
engine (as benchmarks/lora_engine.py builds it: LoRA on, slot rank 64, the plugin, the
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
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from harness import command_line
from stream_clients import mixed_prompts

from mergeserve.adapters.peft_io import load_lora_factors, save_lora_factors
from mergeserve.config import LLAMA_PROJECTIONS, EngineSettings, Settings, default_experts_dir
from mergeserve.runtime.base_model import ensure_embedded_model
from mergeserve.runtime.engine import render_chat, set_engine_environment
from mergeserve.runtime.mixture import MixtureBundle

EXPERTS = ("add", "capital", "reverse_words", "sentiment", "sort_numbers", "to_json")
ORDER = ("base", "mixture", "mixture", "base", "base", "mixture", "mixture", "base")
LORA_OP = "mergeserve::lora_linear"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=16, help="prompts generated at once")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--compile", action="store_true", help="compile the model (as deployed)")
    p.add_argument("--rows", type=int, default=15, help="operators shown per arm")
    args = p.parse_args()

    set_engine_environment(EngineSettings(compile=args.compile, kv_cache_gib=2))
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine in this process
    os.environ["VLLM_LOGGING_STREAM"] = "ext://sys.stderr"
    import torch
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    from mergeserve import vllm_plugin

    vllm_plugin.register()
    experts = default_experts_dir()
    if experts is None:
        raise SystemExit("run from a checkout: the demo experts are in examples/experts")
    model = ensure_embedded_model(Settings().cache)
    tmp = Path(tempfile.mkdtemp(prefix="profile-mixture-"))
    bundle = MixtureBundle.build({n: load_lora_factors(experts / n) for n in EXPERTS})
    save_lora_factors(bundle.factors, tmp / "bundle", str(model))
    llm = LLM(
        model=str(model),
        dtype="float32",
        enable_lora=True,
        max_lora_rank=64,
        max_loras=2,
        max_model_len=2048,
        max_num_seqs=64,
        lora_target_modules=list(LLAMA_PROJECTIONS),
        enforce_eager=not args.compile,
        seed=0,
    )
    tok = llm.get_tokenizer()
    prompts: list[Any] = [
        {"prompt_token_ids": render_chat(tok, [{"role": "user", "content": q}])}
        for q in mixed_prompts(args.requests)
    ]
    lora = LoRARequest("bundle", 1, str(tmp / "bundle"))
    rng = random.Random(0)

    def generate(kind: str) -> float:
        params = []
        for _ in prompts:
            extra = None
            if kind == "mixture":
                w = [round(rng.uniform(0.05, 1.0), 4) for _ in bundle.names]
                extra = bundle.spec(dict(zip(bundle.names, w, strict=True))).extra_args()
            params.append(
                SamplingParams(
                    max_tokens=args.max_tokens, ignore_eos=True, temperature=0, extra_args=extra
                )
            )
        t0 = time.perf_counter()
        outs = llm.generate(
            prompts,
            params,
            lora_request=[lora] * len(prompts) if kind == "mixture" else None,
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
