"""Blending on requests that need two skills: which per-request weights solve what no
single expert solves? Measured on the two-skill split (mergeserve.tasks.open_world) of a
running server, exact match, greedy, through the OpenAI API.

Strategies, per composition of skills (s₁, s₂):

- `expert:s1`, `expert:s2`: each skill's expert alone (docs/results/open_world.md has
  every expert on every composition);
- `route:top1`: the router's top expert alone (adapter switching);
- `dynamic:exact`: the served router and policy (softmax over prototype scores, top-2);
- `multilabel`: each expert's own in-domain membership (the open-world gate's score per
  expert, not a softmax across experts), the two most likely pinned at their membership
  (two skills present: both near 1), computed in process by the same router;
- `pair@λ`: the oracle pair {s₁: λ, s₂: λ} pinned (λ = 0.5: the average; λ = 1: task
  arithmetic with both skills at full strength), the best any router could give;
  `pair@λ₁/λ₂`: the same pair with one skill leading, {s₁: λ₁, s₂: λ₂}.

Besides exact match, every reply is split into the two halves of its request
(`mergeserve.tasks.open_world.two_skill_parts`): *content*, the first skill's work in
any shape (the right numbers, the right value), and *form*, the second skill's shape
with any content (numbers largest first, a JSON object with the one key asked for). The
rates of each half and of both say why a blend fails: whether it does one skill's job
and drops the other, or neither.

Pick on `--split dev`; report `--split test` once.

    python benchmarks/blend.py --base-url http://127.0.0.1:8000 [--split dev] [--n 50]
    python benchmarks/blend.py --rescore benchmarks/results/blend.dev.cpu-2core.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mergeserve.router.base import experts_examples
from mergeserve.router.embedders import SentenceEmbedder
from mergeserve.router.open_world import GateConfig, make_gate
from mergeserve.router.prototype import PrototypeRouter
from mergeserve.tasks.base import Sample
from mergeserve.tasks.generators import generate
from mergeserve.tasks.open_world import COMPOSED_OF, TWO_SKILL, two_skill_parts

ROOT = Path(__file__).resolve().parent.parent
LAMBDAS = (0.5, 0.75, 1.0, 1.5)
LEADING = ((1.0, 0.5), (0.5, 1.0))


def multilabel_weights(prompts: Sequence[str], threads: int) -> list[dict[str, float]]:
    """Each expert's own membership m_e = sigmoid((cos(x, c_e) - tau_e) / width); the two
    largest kept when at least one clears 1/2, at their membership (rounded to 0.05)."""
    torch.set_num_threads(threads)
    embedder = SentenceEmbedder(quantize=True)
    config = GateConfig()
    gate = make_gate(config, embedder)
    router = PrototypeRouter.from_examples(
        embedder, experts_examples(ROOT / "examples" / "experts"), gate=gate
    )
    emb = embedder.embed(list(prompts))
    tau = torch.tensor(list(router.thresholds.values()))
    member = config.mass(router.similarities(emb) - tau)  # [n, E]
    out = []
    for row in member.tolist():
        ranked = sorted(zip(router.experts, row, strict=True), key=lambda x: -x[1])[:2]
        kept = {e: round(round(m / 0.05) * 0.05, 2) for e, m in ranked if m >= 0.5}
        out.append({e: w for e, w in kept.items() if w > 0})
    return out


async def run(args: argparse.Namespace) -> dict[str, Any]:
    import openai

    client = openai.AsyncOpenAI(
        base_url=f"{args.base_url.rstrip('/')}/v1", api_key="unused", timeout=600, max_retries=2
    )
    sem = asyncio.Semaphore(args.concurrency)
    samples: dict[str, list[Sample]] = {c: generate(c, args.split, args.n) for c in TWO_SKILL}
    prompts = [s.prompt for ss in samples.values() for s in ss]
    ml = dict(zip(prompts, multilabel_weights(prompts, args.threads), strict=True))

    async def ask(model: str, prompt: str, weights: dict[str, float] | None) -> str:
        async with sem:
            extra = {"merge_weights": weights} if weights else None
            r = await client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": prompt}],
                temperature=0,
                max_tokens=args.max_tokens,
                extra_body=extra,
            )
            return r.choices[0].message.content or ""

    def strategies(comp: str) -> dict[str, tuple[str, Any]]:
        s1, s2 = COMPOSED_OF[comp]
        out: dict[str, tuple[str, Any]] = {
            "expert:s1": (f"expert:{s1}", None),
            "expert:s2": (f"expert:{s2}", None),
        }
        out["route:top1"] = ("route:top1", None)
        out["dynamic:exact"] = ("dynamic:exact", None)
        out["multilabel"] = ("dynamic:exact", "multilabel")
        for lam in LAMBDAS:
            out[f"pair@{lam:g}"] = ("dynamic:exact", {s1: lam, s2: lam})
        for l1, l2 in LEADING:
            out[f"pair@{l1:g}/{l2:g}"] = ("dynamic:exact", {s1: l1, s2: l2})
        return out

    results: dict[str, dict[str, float]] = {}
    halves: dict[str, dict[str, dict[str, float]]] = {}
    replies_of: dict[str, dict[str, list[str]]] = {}
    for comp, ss in samples.items():
        results[comp], halves[comp], replies_of[comp] = {}, {}, {}
        for name, (model, weights) in strategies(comp).items():

            def pinned(prompt: str, w: Any = weights) -> dict[str, float] | None:
                if w == "multilabel":
                    return ml[prompt] or None  # none of the experts: the routed model
                return w if isinstance(w, dict) else None

            replies = await asyncio.gather(*(ask(model, s.prompt, pinned(s.prompt)) for s in ss))
            results[comp][name], halves[comp][name] = score(comp, replies, ss)
            replies_of[comp][name] = replies
            print(f"{comp:16s} {name:26s} {100 * results[comp][name]:5.1f}", flush=True)
    await client.close()
    return {
        "split": args.split,
        "n_per_composition": args.n,
        "max_tokens": args.max_tokens,
        "composed_of": {c: list(p) for c, p in COMPOSED_OF.items()},
        "exact_match": results,
        "mean": mean_over(results),
        "halves": halves,
        "multilabel_blends": sum(len(w) == 2 for w in ml.values()) / len(ml),
        "replies": replies_of,
    }


def score(comp: str, replies: Sequence[str], samples: Sequence[Sample]) -> tuple[float, Any]:
    """Exact match of `replies` to `samples`, and the rates of their halves."""
    task = TWO_SKILL[comp]
    pairs = list(zip(replies, samples, strict=True))
    ok = [task.matches(r, s.answer) for r, s in pairs]
    parts = [two_skill_parts(comp, r, s.answer) for r, s in pairs]
    n = len(pairs)
    halves = {
        "content": round(sum(c for c, _ in parts) / n, 4),
        "form": round(sum(f for _, f in parts) / n, 4),
        "both": round(sum(c and f for c, f in parts) / n, 4),
    }
    return round(sum(ok) / n, 4), halves


def mean_over(results: dict[str, dict[str, float]]) -> dict[str, float]:
    return {
        name: round(sum(results[c][name] for c in results) / len(results), 4)
        for name in next(iter(results.values()))
    }


def rescore(path: Path) -> dict[str, Any]:
    """Score a run's stored replies again (after a change to the scoring): no server."""
    out: dict[str, Any] = json.loads(path.read_text())
    if "replies" not in out:
        raise SystemExit(f"{path} stores no replies (a run from before they were kept)")
    for comp, by_arm in out["replies"].items():
        ss = generate(comp, out["split"], out["n_per_composition"])
        for name, replies in by_arm.items():
            out["exact_match"][comp][name], out["halves"][comp][name] = score(comp, replies, ss)
    out["mean"] = mean_over(out["exact_match"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base-url", default="http://127.0.0.1:8000")
    ap.add_argument("--split", choices=["dev", "test"], default="dev")
    ap.add_argument("--n", type=int, default=25, help="prompts per composition")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path)
    ap.add_argument(
        "--rescore",
        type=Path,
        metavar="JSON",
        help="score the replies stored in this result file again and rewrite it (no server)",
    )
    args = ap.parse_args()
    if args.rescore is not None:
        if not args.rescore.is_file():
            ap.error(f"--rescore: no result file at {args.rescore}")
        args.out = args.rescore
        out = rescore(args.rescore)
    else:
        out = asyncio.run(run(args))
    text = json.dumps(out, indent=2)
    print(json.dumps(out["mean"], indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
