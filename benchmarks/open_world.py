"""Open-world gates compared: which requests the router gives to no expert (the base model).

For each gate candidate (router/open_world.py) on the served embedder (MiniLM int8), the
router sees only what it sees in production: each demo expert's 20 `examples.jsonl`
prompts and, for the knn gate, the general split's *calibration* part. Scored on a split
of in-domain prompts (the six demo tasks) against general prompts (mergeserve.tasks.
open_world, the same split name):

- AUROC of the raw in-domain score, six skills against general (threshold-free);
- at the operating point (the served margin and width): the fraction of general prompts
  routed to none (in-domain mass < ½), of in-domain prompts kept in domain (≥ ½), of
  two-skill prompts kept in domain, and of general prompts whose served key is exactly
  base (every weight rounds to 0 on the 0.05 grid);
- the fraction of the tasks' unseen phrasings (mergeserve.tasks.phrasings, the same
  split's part: ways of asking that are in no router example, no template and no
  paraphrase; 25 prompts per task) kept in domain and routed to their task: how the
  gate treats a way of asking it has not seen;
- the energy score logsumexp(scale · cos) of the closed-world prototypes, as the
  score-only baseline a max-probability/energy detector would use.

Pick on `--split dev`; `--split test` once, for the record.

    python benchmarks/open_world.py [--split dev] [--threads 2] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mergeserve.router.base import experts_examples
from mergeserve.router.embedders import SentenceEmbedder
from mergeserve.router.open_world import GateConfig, OpenWorldGate, auroc, make_gate
from mergeserve.router.policy import RoutingPolicy
from mergeserve.router.prototype import PrototypeRouter
from mergeserve.tasks.generators import TASKS, generate
from mergeserve.tasks.open_world import TWO_SKILL, general_prompts
from mergeserve.tasks.phrasings import generate_phrasings

ROOT = Path(__file__).resolve().parent.parent

CANDIDATES: dict[str, GateConfig] = {
    "centroid q=0.05 w=0.001 margin 0.005 (default)": GateConfig("centroid"),
    "centroid q=0.05 w=0.001 margin 0": GateConfig("centroid", margin=0.0),
    "centroid q=0.05 w=0.001 margin 0.01": GateConfig("centroid", margin=0.01),
    "centroid q=0.05 w=0.001 margin 0.02": GateConfig("centroid", margin=0.02),
    "centroid q=0.05 w=0.005 margin 0.005": GateConfig("centroid", width=0.005),
    "centroid q=0.05 w=0.02 margin 0.005": GateConfig("centroid", width=0.02),
    "centroid q=0.10 w=0.001 margin 0.005": GateConfig("centroid", quantile=0.10),
    "centroid q=0 w=0.001 margin 0.005": GateConfig("centroid", quantile=0.0),
    "threshold q=0.05 w=0.001": GateConfig("threshold", margin=0.0),
    "threshold q=0.10 w=0.001": GateConfig("threshold", margin=0.0, quantile=0.10),
    "knn w=0.001": GateConfig("knn", margin=0.0),
    "knn w=0.02": GateConfig("knn", margin=0.0, width=0.02),
}


def evaluate(
    embedder: SentenceEmbedder,
    examples: dict[str, list[str]],
    gate: OpenWorldGate,
    inside: Sequence[str],
    labels: Sequence[str],
    general: Sequence[str],
    two_skill: Sequence[str],
    phrasings: Sequence[tuple[str, str]],
) -> dict[str, Any]:
    router = PrototypeRouter.from_examples(embedder, examples, gate=gate)
    policy = RoutingPolicy(top_k=2, floor=0.1, grid=0.05)  # the served defaults

    def run(texts: Sequence[str]) -> tuple[list[float], list[float], list[Any]]:
        emb = embedder.embed(list(texts))
        score = router.in_domain_score(emb).tolist()
        mass = router.in_domain_for(emb)
        assert mass is not None
        routings = policy.apply(router.experts, router.logits_for(emb), mass)
        return score, mass.tolist(), routings

    s_in, m_in, r_in = run(inside)
    s_gen, m_gen, r_gen = run(general)
    _, m_two, r_two = run(two_skill)
    _, _, r_phr = run([p for _, p in phrasings])
    phr_ok = [
        r.key.none == 0 and r.key.top == t for r, (t, _) in zip(r_phr, phrasings, strict=True)
    ]
    top_ok = [r.key.top == lab for r, lab in zip(r_in, labels, strict=True)]
    return {
        "auroc": round(auroc(s_in, s_gen), 4),
        "general_to_none": round(sum(m < 0.5 for m in m_gen) / len(m_gen), 4),
        "general_exactly_base": round(sum(r.key.is_base for r in r_gen) / len(r_gen), 4),
        "in_domain_kept": round(sum(m >= 0.5 for m in m_in) / len(m_in), 4),
        "in_domain_top1": round(sum(top_ok) / len(top_ok), 4),
        "in_domain_full_mass": round(sum(r.key.none == 0 for r in r_in) / len(r_in), 4),
        "two_skill_kept": round(sum(m >= 0.5 for m in m_two) / len(m_two), 4),
        "phrasings_kept_and_routed": round(sum(phr_ok) / len(phr_ok), 4),
        "two_skill_blend": round(sum(r.outcome == "blend" for r in r_two) / len(r_two), 4),
        "thresholds": {e: round(t, 4) for e, t in router.thresholds.items()},
        "general_kept_examples": [g for g, m in zip(general, m_gen, strict=True) if m >= 0.5][:10],
        "in_domain_dropped_examples": [t for t, m in zip(inside, m_in, strict=True) if m < 0.5][
            :10
        ],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--split", choices=["dev", "test"], default="dev")
    ap.add_argument("--n", type=int, default=50, help="in-domain prompts per task")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    embedder = SentenceEmbedder(quantize=True)
    examples = experts_examples(ROOT / "examples" / "experts")
    samples = [s for t in TASKS for s in generate(t, args.split, args.n)]
    inside = [s.prompt for s in samples]
    labels = [s.task for s in samples]
    general = [g.prompt for g in general_prompts(args.split)]
    two = [s.prompt for t in TWO_SKILL for s in generate(t, args.split, 50)]
    phrasings = [(t, s.prompt) for t in TASKS for s in generate_phrasings(t, args.split, 25)]

    out: dict[str, Any] = {
        "split": args.split,
        "n_in_domain": len(inside),
        "n_general": len(general),
        "n_two_skill": len(two),
        "n_phrasings": len(phrasings),
        "embedder": embedder.name,
        "gates": {},
    }
    for name, config in CANDIDATES.items():
        gate = make_gate(config, embedder)
        assert gate is not None
        out["gates"][name] = evaluate(
            embedder, examples, gate, inside, labels, general, two, phrasings
        )
    closed = PrototypeRouter.from_examples(embedder, examples)
    energy = {
        key: torch.logsumexp(closed.logits(texts), dim=1).tolist()
        for key, texts in (("in", inside), ("gen", general))
    }
    out["energy_auroc"] = round(auroc(energy["in"], energy["gen"]), 4)
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
