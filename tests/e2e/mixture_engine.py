"""The mixture's exactness on real vLLM, engine level (run as a script by
test_mixture_exactness.py: vLLM's offline engine wants a __main__ guard).

For experts E and distinct weight sets w_1..w_n it generates greedily, with the plugin on:
* reference: each w_j's merge materialized as its own adapter (the materializing path:
  rank concatenation, `twin.merged_exact` / `twin.merged`), all n in one batch;
* mixture: the bundle adapter with each request's MixtureSpec, all n in one batch, and
  again in one batch together with a single-expert request and a base request;
* the single-expert and base requests alone.
Writes OUT_DIR/result.json: the token ids of each, for the test to compare.

    python -m tests.e2e.mixture_engine BASE EXPERTS_DIR OUT_DIR --mode exact|twin
"""

from __future__ import annotations

import argparse
import json
import os
import random
from pathlib import Path

from mergeserve.adapters.peft_io import save_lora_factors
from mergeserve.config import LLAMA_PROJECTIONS, Settings
from mergeserve.runtime.expert_set import ExpertSet, twin_decomposition
from mergeserve.runtime.mixture import MixtureBundle
from mergeserve.service.served_set import twin_config

PROMPTS = [
    "What is the capital of France?",
    "Write one sentence about the moon.",
    "List three colours.",
    "What is 12 plus 30?",
    "Sort these numbers: 9, 2, 5.",
    "Reverse the words: red green blue.",
]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("base", type=Path)
    p.add_argument("experts", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--mode", choices=["exact", "twin"], default="exact")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--max-lora-rank", type=int, default=64)
    args = p.parse_args()

    experts = ExpertSet.from_dir(args.experts)
    twin = twin_decomposition(experts, twin_config(Settings()), None)
    names = list(experts.names)
    rng = random.Random(7)
    weights = []
    for _ in PROMPTS:  # every request its own weights, over two or more experts
        k = rng.randint(2, len(names))
        chosen = rng.sample(names, k)
        raw = [rng.uniform(0.1, 1.0) for _ in chosen]
        weights.append({n: round(w / sum(raw), 4) for n, w in zip(chosen, raw, strict=True)})

    if args.mode == "exact":
        terms = dict(experts.factors)
        fixed: dict[str, float] = {}
    else:
        assert twin.shared is not None
        terms = {"shared": twin.shared, **twin.exclusives}
        fixed = {"shared": 1.0}
    bundle = MixtureBundle.build(terms)
    save_lora_factors(bundle.factors, args.out / "bundle", str(args.base))
    merged_dirs = []
    for j, w in enumerate(weights):
        merged = twin.merged_exact(w) if args.mode == "exact" else twin.merged(w)
        assert max(merged.ranks.values()) <= args.max_lora_rank
        save_lora_factors(merged, args.out / f"merged-{j}", str(args.base))
        merged_dirs.append(args.out / f"merged-{j}")

    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    n = len(PROMPTS)
    llm = LLM(
        str(args.base),
        enable_lora=True,
        max_lora_rank=args.max_lora_rank,
        max_loras=n + 2,
        dtype="float32",
        max_model_len=512,
        max_num_seqs=16,
        lora_target_modules=list(LLAMA_PROJECTIONS),
        seed=0,
    )
    tok = llm.get_tokenizer()
    prompts = [
        tok.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False
        )
        for q in PROMPTS
    ]

    def sp(extra: dict[str, object] | None = None) -> SamplingParams:
        return SamplingParams(max_tokens=args.max_tokens, temperature=0.0, extra_args=extra)

    def ids(outs: list[object]) -> list[list[int]]:
        return [list(o.outputs[0].token_ids) for o in outs]  # type: ignore[attr-defined]

    merged_req = [LoRARequest(f"merged-{j}", 100 + j, str(d)) for j, d in enumerate(merged_dirs)]
    bundle_req = LoRARequest("bundle", 99, str(args.out / "bundle"))
    single_name = names[0]
    single_req = LoRARequest(single_name, 98, str(experts.infos[single_name].path))
    specs = [bundle.spec(w, fixed=fixed).extra_args() for w in weights]

    reference = ids(llm.generate(prompts, [sp() for _ in prompts], lora_request=merged_req))
    mixture = ids(llm.generate(prompts, [sp(s) for s in specs], lora_request=[bundle_req] * n))
    mixed = ids(
        llm.generate(
            [*prompts, prompts[0], prompts[1]],
            [*(sp(s) for s in specs), sp(), sp()],
            lora_request=[*([bundle_req] * n), single_req, None],
        )
    )
    single = ids(llm.generate([prompts[0]], [sp()], lora_request=[single_req]))
    # Every request of the step weighting one block alone: the plugin computes that block's
    # columns only, which in `exact` mode is the expert itself.
    one_hot = bundle.spec({single_name: 1.0}, fixed=fixed).extra_args()
    one_block = ids(
        llm.generate(prompts, [sp(one_hot) for _ in prompts], lora_request=[bundle_req] * n)
    )
    single_all = ids(llm.generate(prompts, [sp() for _ in prompts], lora_request=[single_req] * n))
    base = ids(llm.generate([prompts[1]], [sp()]))
    # A file, not stdout: vLLM logs to stdout, also after this point (shutdown).
    (args.out / "result.json").write_text(
        json.dumps(
            {
                "plugin": os.environ.get("MERGESERVE_MIXTURE_PLUGIN", "1"),
                "mode": args.mode,
                "weights": weights,
                "bundle_rank": bundle.rank,
                "reference": reference,
                "mixture": mixture,
                "mixed": mixed,
                "single": single,
                "base": base,
                "one_block": one_block,
                "single_all": single_all,
            }
        )
    )


if __name__ == "__main__":
    main()
