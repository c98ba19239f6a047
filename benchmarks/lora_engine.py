"""The plugin's LoRA cost inside one vLLM engine, now and as it was, in one run
(benchmarks/harness.py: balanced order, warm-up shown, ≥ 5 rounds, paired ratios).

One in-process vLLM engine (`vllm.LLM`, LoRA on, slot rank 64, the plugin on, eager unless
`--compile`, the worker bound to every core as `mergeserve serve` binds it, LoRA layers on
the seven projections as mergeserve's engine has them, or with `--vllm-default-targets`
wherever vLLM puts them by default, lm_head included) on the embedded
SmolLM2-135M-Instruct; each round generates `--requests` test-split prompts at once,
`--max-tokens` each (`ignore_eos`, greedy):

* `base`     no adapter (what a request routed to none costs on a LoRA engine);
* `expert`   `expert:add`, one rank-8 demo expert for every request;
* `bundle`   the six demo experts concatenated (rank 48) as one static adapter;
* `mixture`  the same bundle with a distinct weighting of its six blocks per request.

Each also as `…:before`, the plugin as it was before it (1) kept its per-slot factors
while an adapter stays in its slot (it rebuilt them every step) and (2) skipped vLLM's
lm_head LoRA for slots without one (where lm_head has a LoRA layer, vLLM's CPU path
gathers a [vocab, rank] B per sampled token every step, whatever the slots hold): both put
back in this process between rounds, so the two versions run side by side on one engine.

    python benchmarks/lora_engine.py [--requests 16] [--max-tokens 32] [--rounds 5]
        [--compile] [--vllm-default-targets]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import command_line, run_arms
from stream_clients import mixed_prompts

from mergeserve.adapters.peft_io import load_lora_factors, save_lora_factors
from mergeserve.config import LLAMA_PROJECTIONS, EngineSettings, Settings, default_experts_dir
from mergeserve.runtime.base_model import ensure_embedded_model
from mergeserve.runtime.engine import render_chat, set_engine_environment
from mergeserve.runtime.mixture import MixtureBundle

EXPERTS = ("add", "capital", "reverse_words", "sentiment", "sort_numbers", "to_json")
RATIOS = {
    "expert_over_base": ("expert", "base"),
    "mixture_over_base": ("mixture", "base"),
    "mixture_over_expert": ("mixture", "expert"),
    "mixture_over_bundle": ("mixture", "bundle"),
    **{f"{a}_now_over_before": (a, f"{a}:before") for a in ("base", "expert", "bundle", "mixture")},
}


@contextlib.contextmanager
def plugin_as_before() -> Iterator[None]:
    """The two costs the plugin since removed, put back for the duration."""
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    from mergeserve import vllm_plugin

    cls: Any = vllm_plugin.MixturePunicaCPU
    own, note = cls.__dict__["add_lora_logits"], vllm_plugin.note_activation
    cls.add_lora_logits = PunicaWrapperCPU.add_lora_logits

    def every_step(manager: Any, lora_id: int, *, written: bool) -> None:
        note(manager, lora_id, written=True)  # as if each step wrote the slot anew

    vllm_plugin.note_activation = every_step
    try:
        yield
    finally:
        cls.add_lora_logits = own
        vllm_plugin.note_activation = note


@dataclass
class BundleEngine:
    """One in-process vLLM engine as `mergeserve serve` sets it up (plugin on, worker
    bound to every core), LoRA on at slot rank 64, with the six demo experts' rank-48
    bundle written out, and `requests` mixed test-split prompts rendered for it."""

    llm: Any
    bundle: MixtureBundle
    bundle_dir: Path
    experts: Path
    prompts: list[Any]
    rng: random.Random = field(default_factory=lambda: random.Random(0))

    @classmethod
    def start(cls, *, compile: bool, requests: int, default_targets: bool = False) -> BundleEngine:
        set_engine_environment(EngineSettings(compile=compile, kv_cache_gib=2))
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine in this process
        os.environ["VLLM_LOGGING_STREAM"] = "ext://sys.stderr"  # stdout is the JSON alone
        from vllm import LLM

        from mergeserve import vllm_plugin

        vllm_plugin.register()  # as vLLM's entry point would (idempotent)
        experts = default_experts_dir()
        if experts is None:
            raise SystemExit("run from a checkout: the demo experts are in examples/experts")
        model = ensure_embedded_model(Settings().cache)
        bundle_dir = Path(tempfile.mkdtemp(prefix="lora-engine-")) / "bundle"
        bundle = MixtureBundle.build({n: load_lora_factors(experts / n) for n in EXPERTS})
        save_lora_factors(bundle.factors, bundle_dir, str(model))
        llm = LLM(
            model=str(model),
            dtype="float32",
            enable_lora=True,
            max_lora_rank=64,
            max_loras=2,
            max_model_len=2048,
            max_num_seqs=64,
            lora_target_modules=None if default_targets else list(LLAMA_PROJECTIONS),
            enforce_eager=not compile,
            seed=0,
        )
        tok = llm.get_tokenizer()
        prompts: list[Any] = [
            {"prompt_token_ids": render_chat(tok, [{"role": "user", "content": q}])}
            for q in mixed_prompts(requests)
        ]
        return cls(llm, bundle, bundle_dir, experts, prompts)

    def random_weightings(self) -> list[dict[str, float]]:
        """A distinct weighting of the bundle's blocks per prompt (this engine's seeded
        rng: the same sequence run after run)."""
        names = self.bundle.names
        return [
            dict(zip(names, [round(self.rng.uniform(0.05, 1.0), 4) for _ in names], strict=True))
            for _ in self.prompts
        ]

    def params(
        self, max_tokens: int, weightings: list[dict[str, float]] | None = None
    ) -> list[Any]:
        """Greedy, `ignore_eos` sampling params, one per prompt; with `weightings` (one per
        prompt), each carries its weighting of the bundle's blocks as the mixture."""
        from vllm import SamplingParams

        per_prompt: list[dict[str, float] | None] = (
            [None] * len(self.prompts) if weightings is None else list(weightings)
        )
        if len(per_prompt) != len(self.prompts):
            raise ValueError(f"{len(per_prompt)} weightings for {len(self.prompts)} prompts")
        return [
            SamplingParams(
                max_tokens=max_tokens,
                ignore_eos=True,
                temperature=0,
                extra_args=None if w is None else self.bundle.spec(w).extra_args(),
            )
            for w in per_prompt
        ]


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """The workload of the in-process engine benchmarks (this one, sparse_mixture.py)."""
    p.add_argument("--requests", type=int, default=16, help="prompts per round and arm")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--compile", action="store_true", help="compile the model (as deployed)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_engine_args(p)
    p.add_argument(
        "--vllm-default-targets",
        action="store_true",
        help="LoRA layers where vLLM puts them by default (lm_head too), not the projections",
    )
    args = p.parse_args()

    eng = BundleEngine.start(
        compile=args.compile, requests=args.requests, default_targets=args.vllm_default_targets
    )
    from vllm.lora.request import LoRARequest

    llm, prompts = eng.llm, eng.prompts
    loras = {
        "base": None,
        "expert": LoRARequest("expert", 1, str(eng.experts / "add")),
        "bundle": LoRARequest("bundle", 2, str(eng.bundle_dir)),
    }
    loras["mixture"] = loras["bundle"]

    def arm(kind: str, before: bool) -> Any:
        async def run(_r: int) -> dict[str, float]:
            sp = eng.params(args.max_tokens, eng.random_weightings() if kind == "mixture" else None)
            lr = loras[kind]
            ctx = plugin_as_before() if before else contextlib.nullcontext()
            with ctx:
                t0 = time.perf_counter()
                outs = llm.generate(
                    prompts, sp, lora_request=[lr] * len(prompts) if lr else None, use_tqdm=False
                )
                wall = time.perf_counter() - t0
            tokens = sum(len(o.outputs[0].token_ids) for o in outs)
            return {"tokens_per_s": tokens / wall, "wall_s": wall, "completion_tokens": tokens}

        return run

    arms = {
        f"{k}{':before' if b else ''}": arm(k, b)
        for k in ("base", "expert", "bundle", "mixture")
        for b in (False, True)
    }
    res = asyncio.run(run_arms(arms, min_rounds=args.rounds, metric="tokens_per_s"))
    print(
        json.dumps(
            {
                "benchmark": "lora_engine",
                "model": "SmolLM2-135M-Instruct (fp32), one in-process vLLM engine",
                "experts": "examples/experts (expert: add, rank 8; bundle: all six, rank 48)",
                "requests_per_round": args.requests,
                "max_tokens": args.max_tokens,
                "compiled": args.compile,
                "lora_targets": "vLLM's default" if args.vllm_default_targets else "projections",
                **res.summary("tokens_per_s", RATIOS),
                "command": command_line("lora_engine.py", args),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
