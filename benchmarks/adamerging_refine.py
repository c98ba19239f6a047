"""Does AdaMerging pay at serving time? Router weights vs the same weights refined per
request by entropy minimisation, side by side on the same prompts.

For each prompt of the demo tasks' dev split (never the test split): the router's
weights (MiniLM prototypes, the served policy: top-2, floor 0.1, grid 0.05) give
Σ wᵢ Δᵢ, and the greedy reply of the base model with that merge patched in; then
`--steps` Adam steps (lr `--lr`) move the per-expert coefficients, from the router's,
to lower the entropy of the first answer token (AdaMerging's objective on one
unlabelled prompt), and the greedy reply of the refined merge. Prints JSON: exact match
of both arms, the per-request refinement time next to the generation time, and how
often refinement changed the answer for better or worse.

    python benchmarks/adamerging_refine.py [--n 8] [--steps 5] [--threads 2] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch

from mergeserve.adapters.calibration import (
    DeltaPatch,
    Example,
    encode,
    load_base,
    module_terms,
)
from mergeserve.adapters.merging.learned import prediction_entropy
from mergeserve.adapters.peft_io import discover_lora_dirs, load_lora_factors
from mergeserve.config import Settings
from mergeserve.router.base import route
from mergeserve.router.embedders import SentenceEmbedder
from mergeserve.router.policy import RoutingPolicy
from mergeserve.router.prototype import PrototypeRouter
from mergeserve.runtime.base_model import ensure_embedded_model
from mergeserve.tasks.generators import TASKS, generate
from mergeserve.tasks.training import greedy_replies

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=8, help="dev prompts per task")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--experts", type=Path, default=ROOT / "examples" / "experts")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    base = ensure_embedded_model(Settings().cache)
    model, tok = load_base(str(base))
    infos = discover_lora_dirs(args.experts)
    names = [i.name for i in infos]
    mods = module_terms([load_lora_factors(i.path) for i in infos])
    router = PrototypeRouter.from_experts_dir(SentenceEmbedder(quantize=True), args.experts)
    policy = RoutingPolicy(top_k=2, floor=0.1, grid=0.05)
    samples = [s for t in TASKS for s in generate(t, "dev", args.n)]

    def reply(patch: DeltaPatch, coef: torch.Tensor, prompt: str) -> str:
        patch.set_terms({m.path: (m.a, m.b, m.coef(coef)) for m in mods})
        (text,) = greedy_replies(model, tok, [prompt], max_new_tokens=args.max_tokens)
        return text

    def refine(patch: DeltaPatch, start: torch.Tensor, prompt: str) -> torch.Tensor:
        lam = start.clone().requires_grad_(True)
        opt = torch.optim.Adam([lam], lr=args.lr)
        batch = encode(tok, [Example(prompt)], answers=False)
        for _ in range(args.steps):
            c = lam.clamp(0.0, 1.0)
            patch.set_terms({m.path: (m.a, m.b, m.coef(c)) for m in mods})
            loss = prediction_entropy(model, patch.forward(batch).last_hidden_state, batch)
            opt.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
        return lam.detach().clamp(0.0, 1.0)

    rows: list[dict[str, Any]] = []
    with DeltaPatch(model, [m.path for m in mods]) as patch:
        for s in samples:
            (routing,) = route(router, policy, [s.prompt])
            w = dict(routing.key.weights)
            start = torch.tensor([w.get(n, 0.0) for n in names])
            t0 = time.perf_counter()
            plain = reply(patch, start, s.prompt)
            t_gen = time.perf_counter() - t0
            t0 = time.perf_counter()
            lam = refine(patch, start, s.prompt)
            t_refine = time.perf_counter() - t0
            refined = reply(patch, lam, s.prompt)
            task = TASKS[s.task]
            rows.append(
                {
                    "task": s.task,
                    "router_ok": task.matches(plain, s.answer),
                    "refined_ok": task.matches(refined, s.answer),
                    "generate_s": t_gen,
                    "refine_s": t_refine,
                    "weights": {n: round(float(x), 3) for n, x in zip(names, start, strict=True)},
                    "refined": {n: round(float(x), 3) for n, x in zip(names, lam, strict=True)},
                }
            )
    n = len(rows)
    result = {
        "benchmark": "adamerging_refine",
        "split": "dev",
        "n": n,
        "steps": args.steps,
        "lr": args.lr,
        "threads": args.threads,
        "machine": platform.machine(),
        "router_exact_match": sum(r["router_ok"] for r in rows) / n,
        "refined_exact_match": sum(r["refined_ok"] for r in rows) / n,
        "fixed": sum(r["refined_ok"] and not r["router_ok"] for r in rows),
        "broken": sum(r["router_ok"] and not r["refined_ok"] for r in rows),
        "generate_s_mean": sum(r["generate_s"] for r in rows) / n,
        "refine_s_mean": sum(r["refine_s"] for r in rows) / n,
        "refine_over_generate": sum(r["refine_s"] for r in rows)
        / sum(r["generate_s"] for r in rows),
        "rows": rows,
    }
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=1))


if __name__ == "__main__":
    main()
