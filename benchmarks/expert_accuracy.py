"""Exact match of expert adapters on their task, in process (HF + PEFT, greedy), side by
side on the same prompts: decides between two versions of an expert without a server.

Splits scored per adapter: the task's dev split (its own templates, `--n` prompts, per
template) and the dev part of the unseen phrasings (`mergeserve.tasks.phrasings`,
`--n-phrasings`). Decide on dev. `--held-out N` also measures N prompts of the task's
held-out template (it is in the test split only): a figure to report, never to choose by.

    python benchmarks/expert_accuracy.py --task add \
        --adapter new=examples/experts/add --adapter old=/tmp/add-8af3f85 [--n 300]

(`git show REV:examples/experts/add/<file>` writes an older version to a directory.)
Prints one JSON object: per adapter and split, accuracy, per-template accuracy, n, and a
95% Wilson interval.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from mergeserve.tasks.base import Sample
from mergeserve.tasks.generators import TASKS, generate
from mergeserve.tasks.phrasings import generate_phrasings
from mergeserve.tasks.training import greedy_replies


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of k successes in n."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    mid = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (round(mid - half, 4), round(mid + half, 4))


def scored(task: str, replies: list[str], samples: list[Sample]) -> dict[str, Any]:
    hits = [TASKS[task].matches(r, s.answer) for r, s in zip(replies, samples, strict=True)]
    per: dict[int, list[bool]] = {}
    for s, h in zip(samples, hits, strict=True):
        per.setdefault(s.template, []).append(h)
    return {
        "accuracy": round(sum(hits) / len(hits), 4),
        "ci95": wilson(sum(hits), len(hits)),
        "n": len(hits),
        "per_template": {str(t): round(sum(v) / len(v), 3) for t, v in sorted(per.items())},
    }


def main() -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergeserve.config import Settings
    from mergeserve.runtime.base_model import ensure_embedded_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", required=True, choices=sorted(TASKS))
    ap.add_argument("--adapter", action="append", required=True, help="NAME=DIR (repeat)")
    ap.add_argument("--n", type=int, default=300, help="dev prompts on the task's templates")
    ap.add_argument("--n-phrasings", type=int, default=100)
    ap.add_argument("--held-out", type=int, default=0, help="held-out-template prompts (test)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base = ensure_embedded_model(Settings().cache)
    tokenizer = AutoTokenizer.from_pretrained(base)
    sets = {
        "dev": generate(args.task, "dev", args.n),
        "phrasings_dev": generate_phrasings(args.task, "dev", args.n_phrasings),
    }
    if args.held_out:
        test = generate(args.task, "test", args.held_out * len(TASKS[args.task].templates) * 2)
        sets["held_out_test"] = [s for s in test if s.held_out][: args.held_out]
    out: dict[str, Any] = {"task": args.task, "adapters": {}}
    for spec in args.adapter:
        name, _, path = spec.partition("=")
        if not path or not Path(path, "adapter_config.json").is_file():
            ap.error(f"--adapter {spec!r}: want NAME=DIR with an adapter_config.json")
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        peft_model = PeftModel.from_pretrained(model, path).eval()
        row: dict[str, Any] = {"dir": path}
        for split, samples in sets.items():
            t0 = time.perf_counter()
            replies = greedy_replies(peft_model, tokenizer, [s.prompt for s in samples])
            row[split] = scored(args.task, replies, samples) | {
                "wall_s": round(time.perf_counter() - t0, 1)
            }
        out["adapters"][name] = row
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
