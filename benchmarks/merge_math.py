"""Cost of merging LoRA experts: rank concatenation vs dense reconstruction, peft and dense SVD.

Scenario: 6 random rank-8 experts (fp32) on all 7 projections, softmax-like weights w
(positive, Σw = 1). A Twin-style merge is shared + Σ wᵢ exclusiveᵢ: 7 rank-8 terms.
Two shape sets: SmolLM2-135M (30 layers) and a 7B llama (32 layers, no GQA).

  (a) dense: per module kind, Σ of the 7 terms w·(B@A) with bmm/baddbmm over layers
      (what a naive runtime does), one chunk of layers at a time, freed after use;
  (b) concat, three ways, all exact (rank 56):
      - view: `ConcatBasis.merged([1, *w])` over the terms concatenated once per expert-set
        version: one [R] gather per module kind, no factor copied — the per-request merge;
      - materialized: the view's `.materialize()`, B·scale written (A shared) — what
        handing the merged adapter to an engine costs on top of any adapter load;
      - `merge_adapters([shared, *exclusives], [1, *w])`: concatenating from scratch,
        copying every factor (memory-bound: ≈ out·in/(out+in) × flops/bytes ≈ 35× dense);
  (c) peft: `add_weighted_adapter(combination_type="svd", svd_rank=8)` of the 6 experts
      on a SmolLM2-shaped LlamaForCausalLM, against `merge_adapters` of the same 6 experts;
  (d) truncation of the rank-56 stacks to rank 8: dense SVD of each out×in B@A vs
      `truncate` (thin QR + r×r SVD), and how far apart the two rank-8 results are.

Each ratio's two sides are timed interleaved (slow run, block of fast runs, slow run, ...)
so that both see the same load on a noisy machine; figures are medians in ms, with the
number of runs next to them. Prints one JSON object.

    python benchmarks/merge_math.py [--threads 2] [--quick] [--out FILE]
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mergeserve.adapters.lowrank import (
    AdapterFactors,
    ConcatBasis,
    LowRank,
    merge_adapters,
    split_module_name,
    truncate,
    truncate_adapter,
)

RANK = 8
EXPERTS = 6
TRUNC_RANK = 8
EQUAL_TOL = 1e-4

Timing = dict[str, Any]


@dataclass(frozen=True)
class ShapeSet:
    name: str
    layers: int
    kinds: dict[str, tuple[int, int]]  # kind -> (out, in)
    dense_chunk: int  # layers per dense chunk in (a)


def llama_kinds(hidden: int, inter: int, kv: int) -> dict[str, tuple[int, int]]:
    return {
        "self_attn.q_proj": (hidden, hidden),
        "self_attn.k_proj": (kv, hidden),
        "self_attn.v_proj": (kv, hidden),
        "self_attn.o_proj": (hidden, hidden),
        "mlp.gate_proj": (inter, hidden),
        "mlp.up_proj": (inter, hidden),
        "mlp.down_proj": (hidden, inter),
    }


SMOLLM2 = ShapeSet("smollm2_135m", 30, llama_kinds(576, 1536, 3 * 64), dense_chunk=30)
LLAMA_7B = ShapeSet("llama_7b", 32, llama_kinds(4096, 11008, 4096), dense_chunk=8)


def _ms(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def _summary(times: list[float], warmup: int, **extra: Any) -> Timing:
    return {
        "median_ms": round(statistics.median(times), 3),
        "min_ms": round(min(times), 3),
        "repeats": len(times),
        "warmup": warmup,
        **extra,
    }


def timed(fn: Callable[[], object], repeats: int, warmup: int) -> Timing:
    """Median (and min) wall time of fn over `repeats` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    gc.collect()
    return _summary([_ms(fn) for _ in range(repeats)], warmup)


def interleaved(
    slow: Callable[[], object],
    fast: Callable[[], object],
    rounds: int,
    block: int,
    slow_warmup: int,
    fast_warmup: int,
) -> tuple[Timing, Timing]:
    """Time `slow` `rounds` times with a block of `block` `fast` runs before each and after
    the last, so the two medians come from the same stretch of (noisy) machine time."""
    for _ in range(slow_warmup):
        slow()
    for _ in range(fast_warmup):
        fast()
    s: list[float] = []
    f: list[float] = []
    for i in range(rounds + 1):
        gc.collect()
        f.extend(_ms(fast) for _ in range(block))
        if i < rounds:
            gc.collect()
            s.append(_ms(slow))
    note = "interleaved with the other side of its ratio"
    return _summary(s, slow_warmup, timing=note), _summary(f, fast_warmup, timing=note)


def random_adapter(shapes: ShapeSet, gen: torch.Generator) -> AdapterFactors:
    groups = {}
    for kind, (out, inp) in shapes.kinds.items():
        a = torch.randn(shapes.layers, RANK, inp, generator=gen) / math.sqrt(inp)
        b = torch.randn(shapes.layers, out, RANK, generator=gen) / math.sqrt(RANK)
        groups[kind] = LowRank(a, b)
    layers = {k: tuple(range(shapes.layers)) for k in shapes.kinds}
    return AdapterFactors(groups, layers)


# ----------------------------------------------------------------------------- (a), (b)


def dense_merge(terms: list[AdapterFactors], weights: list[float], chunk: int) -> None:
    """Σ w·(B@A) materialised per kind and chunk of layers, then freed (the naive way)."""
    for kind in terms[0].groups:
        first = terms[0].groups[kind]
        for lo in range(0, first.num_layers, chunk):
            hi = min(lo + chunk, first.num_layers)
            out = torch.empty(hi - lo, first.out_features, first.in_features)
            torch.bmm(first.B[lo:hi], first.A[lo:hi], out=out)
            if weights[0] != 1.0:
                out.mul_(weights[0])
            for t, w in zip(terms[1:], weights[1:], strict=True):
                lr = t.groups[kind]
                out.baddbmm_(lr.B[lo:hi], lr.A[lo:hi], alpha=w)
            del out


def merge_breakdown(terms: list[AdapterFactors], weights: list[float], repeats: int) -> Timing:
    """What `merge_adapters` does, piece by piece: cat of the A factors (along r, contiguous
    blocks), cat of the B factors (along their last dim: r-wide strided rows), the w·B
    scalings (fresh tensors), and a plain clone of the merged output (memcpy floor)."""
    kinds = list(terms[0].groups)

    def cat_a() -> None:
        for k in kinds:
            torch.cat([t.groups[k].A for t in terms], dim=1)

    def cat_b() -> None:
        for k in kinds:
            torch.cat([t.groups[k].B for t in terms], dim=2)

    def scale_b() -> None:
        for k in kinds:
            for t, w in zip(terms, weights, strict=True):
                if w != 1.0:
                    _ = t.groups[k].B * w

    merged = merge_adapters(terms, weights)

    def clone_output() -> None:
        for lr in merged.groups.values():
            lr.A.clone()
            lr.B.clone()

    out_bytes = sum(lr.A.nbytes + lr.B.nbytes for lr in merged.groups.values())
    return {
        "output_mb": round(out_bytes / 2**20, 1),
        "cat_A": timed(cat_a, repeats, 1),
        "cat_B": timed(cat_b, repeats, 1),
        "scale_B": timed(scale_b, repeats, 1),
        "clone_output": timed(clone_output, repeats, 1),
    }


# ----------------------------------------------------------------------------- (d)


def dense_svd_rank(m: Tensor, k: int) -> Tensor:
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    out: Tensor = (u[:, :k] * s[:k]) @ vh[:k]
    return out


def rel_diff(x: Tensor, ref: Tensor) -> float:
    return float(torch.linalg.norm(x - ref) / torch.linalg.norm(ref))


def truncation(
    shapes: ShapeSet, merged: AdapterFactors, svd_layers: int, trunc_block: int, fp64: str
) -> dict[str, Any]:
    """(d): dense SVD on the first `svd_layers` layers of each kind (extrapolated linearly
    to all layers when fewer), interleaved with `truncate` of the kind's whole stack; the
    rank-8 results are compared on the SVD'd layers."""
    dense_ms: dict[str, float] = {}
    trunc_t: dict[str, Timing] = {}
    diff32: dict[str, float] = {}
    diff64: dict[str, float] = {}
    subset = list(range(min(svd_layers, shapes.layers)))
    for kind, lr in merged.groups.items():
        result: list[LowRank] = []
        approx: dict[int, Tensor] = {}

        def dense(lr: LowRank = lr, approx: dict[int, Tensor] = approx) -> None:
            for i in subset:
                approx[i] = dense_svd_rank(lr.B[i] @ lr.A[i], TRUNC_RANK)

        def qr(lr: LowRank = lr, result: list[LowRank] = result) -> None:
            result[:] = [truncate(lr, rank=TRUNC_RANK)]

        d, trunc_t[kind] = interleaved(dense, qr, 1, trunc_block, 0, 1)
        dense_ms[kind] = d["median_ms"] / len(subset) * shapes.layers
        t = result[0]
        diff32[kind] = max(rel_diff(t.B[i] @ t.A[i], approx[i]) for i in subset)
        del approx
        if fp64 == "always" or (fp64 == "if-needed" and diff32[kind] > EQUAL_TOL):
            lr64 = LowRank(lr.A[subset].double(), lr.B[subset].double())
            t64 = truncate(lr64, rank=TRUNC_RANK)
            diff64[kind] = max(
                rel_diff(t64.B[j] @ t64.A[j], dense_svd_rank(lr64.B[j] @ lr64.A[j], TRUNC_RANK))
                for j in range(len(subset))
            )
    max32 = max(diff32.values())
    max64 = max(diff64.values()) if diff64 else None
    dense_total = sum(dense_ms.values())
    trunc_total = sum(t["median_ms"] for t in trunc_t.values())
    extrapolated = len(subset) < shapes.layers
    return {
        "input_rank": next(iter(merged.groups.values())).rank,
        "target_rank": TRUNC_RANK,
        "dense_svd": {
            "what": "B@A, torch.linalg.svd(full_matrices=False), rank-8 product; fp32",
            "layers_timed_per_kind": len(subset),
            "runs_per_layer": 1,
            "extrapolated": extrapolated,
            "note": (
                f"time of the first {len(subset)} layer(s) of each kind x {shapes.layers}"
                f"/{len(subset)} (linear extrapolation to all layers)"
                if extrapolated
                else "all layers timed"
            ),
            "per_kind_ms": {k: round(v, 1) for k, v in dense_ms.items()},
            "total_ms": round(dense_total, 1),
        },
        "qr_svd_truncate": {
            "what": "mergeserve truncate(lr, rank=8) on each kind's whole [L, ., 56] stack",
            "per_kind": trunc_t,
            "total_ms": round(trunc_total, 3),
        },
        "rank8_rel_diff": {
            "what": (
                "max over kinds and SVD'd layers of |dense_svd8 - qr_svd8|_F / |dense_svd8|_F; "
                f"fp64 recomputes both sides in float64 ({fp64})"
            ),
            "fp32": max32,
            "fp32_per_kind": diff32,
            "fp64": max64,
            "fp64_per_kind": diff64 or None,
        },
        "_ratio": dense_total / trunc_total,
        "_equal": min(max32, max32 if max64 is None else max64) <= EQUAL_TOL,
    }


# ----------------------------------------------------------------------------- (c)


def peft_svd(
    shapes: ShapeSet,
    experts: list[AdapterFactors],
    weights: list[float],
    rounds: int,
    block: int,
) -> tuple[Timing, Timing]:
    """(c): peft add_weighted_adapter(svd) of the 6 experts on a SmolLM2-shaped llama,
    interleaved with merge_adapters of the same 6 experts."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, inter = shapes.kinds["self_attn.q_proj"][1], shapes.kinds["mlp.gate_proj"][0]
    cfg = LlamaConfig(
        vocab_size=256,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=shapes.layers,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        tie_word_embeddings=True,
    )
    targets = sorted({k.split(".")[-1] for k in shapes.kinds})
    # lora_alpha = r: scaling 1, so peft's Δ = B A is the same Δ as mergeserve's.
    lcfg = LoraConfig(r=RANK, lora_alpha=RANK, target_modules=targets, lora_dropout=0.0)
    names = [f"e{i}" for i in range(len(experts))]
    model = get_peft_model(LlamaForCausalLM(cfg), lcfg, adapter_name=names[0])
    for n in names[1:]:
        model.add_adapter(n, lcfg)

    def lora_modules() -> list[tuple[str, int, Any]]:
        found = []
        for mname, mod in model.named_modules():
            if hasattr(mod, "lora_A") and ".layers." in mname:
                _, kind, idx = split_module_name(mname)
                found.append((kind, idx, mod))
        return found

    mods = lora_modules()
    assert len(mods) == shapes.layers * len(shapes.kinds), len(mods)
    with torch.no_grad():
        for kind, idx, mod in mods:
            for n, ex in zip(names, experts, strict=True):
                mod.lora_A[n].weight.copy_(ex.groups[kind].A[idx])
                mod.lora_B[n].weight.copy_(ex.groups[kind].B[idx])

    def add() -> None:
        model.add_weighted_adapter(
            names, weights, adapter_name="merged", combination_type="svd", svd_rank=TRUNC_RANK
        )

    def run() -> None:
        add()
        model.delete_adapter("merged")

    p, c = interleaved(run, lambda: merge_adapters(experts, weights), rounds, block, 0, 5)
    # Sanity: peft's rank-8 result against truncate(merge_adapters(experts)): same Δ.
    add()
    ours = truncate_adapter(merge_adapters(experts, weights), rank=TRUNC_RANK)
    num = den = 0.0
    with torch.no_grad():
        for kind, idx, mod in lora_modules():
            got = (mod.lora_B["merged"].weight @ mod.lora_A["merged"].weight).double()
            ref = ours.groups[kind].to_dense()[idx].double()
            num += float((got - ref).pow(2).sum())
            den += float(ref.pow(2).sum())
    model.delete_adapter("merged")
    p.update(
        what=(
            'add_weighted_adapter(6 experts, w, combination_type="svd", svd_rank=8), peft '
            "defaults otherwise (svd_full_matrices=True); merged adapter deleted after each run"
        ),
        peft_version=version("peft"),
        rank8_rel_diff_vs_mergeserve_truncate=math.sqrt(num / den),
    )
    c["what"] = "merge_adapters(6 experts, w) -> rank 48, exact (same Δ as peft, untruncated)"
    return p, c


# ----------------------------------------------------------------------------- driver


def bench_shapes(
    shapes: ShapeSet, reps: dict[str, int], gen: torch.Generator, with_peft: bool, fp64: str
) -> dict[str, Any]:
    t_start = time.perf_counter()
    shared = random_adapter(shapes, gen)
    experts = [random_adapter(shapes, gen) for _ in range(EXPERTS)]
    weights = torch.softmax(torch.randn(EXPERTS, generator=gen), dim=0).tolist()
    terms, tw = [shared, *experts], [1.0, *weights]
    merged = merge_adapters(terms, tw)

    dense, concat = interleaved(
        lambda: dense_merge(terms, tw, shapes.dense_chunk),
        lambda: merge_adapters(terms, tw),
        reps["dense"],
        reps["merge_block"],
        reps["dense_warmup"],
        reps["merge_warmup"],
    )
    # The serving layout: all terms concatenated once per expert-set version (ConcatBasis),
    # after which a request's merge is one gather per module kind, and handing it to an
    # engine costs one B·scale (A is shared by every merge).
    basis = ConcatBasis.build({f"t{i}": t for i, t in enumerate(terms)})
    view = timed(lambda: basis.merged(tw), reps["merge_block"] * 20, reps["merge_warmup"])
    materialized = timed(
        lambda: basis.merged(tw).materialize(drop_zero=False),
        reps["merge_block"] * 2,
        reps["merge_warmup"],
    )
    res: dict[str, Any] = {
        "layers": shapes.layers,
        "kinds": {k: list(v) for k, v in shapes.kinds.items()},
        "weights": [round(w, 4) for w in weights],
        "dense_output_gb": round(
            4 * shapes.layers * sum(o * i for o, i in shapes.kinds.values()) / 1e9, 2
        ),
        "concat_merge_7_terms": {
            "what": "merge_adapters([shared, *6 exclusives], [1, *w]) -> rank 56, exact",
            **concat,
        },
        "concat_view_7_terms": {
            "what": "ConcatBasis.merged([1, *w]): exact Δ(w) = B·diag(w[owner])·A, no copy",
            **view,
        },
        "concat_materialized_7_terms": {
            "what": "ConcatBasis.merged([1, *w]).materialize(): B·scale written, A shared",
            **materialized,
        },
        "dense_merge_7_terms": {
            "what": (
                f"per kind, chunks of {shapes.dense_chunk} layers: bmm + 6 baddbmm into a fresh "
                "[chunk, out, in] fp32 tensor, freed after each chunk"
            ),
            **dense,
        },
        "merge_breakdown": merge_breakdown(terms, tw, reps["breakdown"]),
    }
    if with_peft:
        p, c = peft_svd(shapes, experts, weights, reps["peft"], reps["merge_block"])
        res["peft_svd_6_experts"] = p
        res["concat_merge_6_experts"] = c
        res["concat_merge_6_experts_then_truncate_8"] = {
            "what": "truncate_adapter(merge_adapters(6 experts, w), rank=8): what peft svd yields",
            **timed(
                lambda: truncate_adapter(merge_adapters(experts, weights), rank=TRUNC_RANK),
                reps["trunc_block"] * 2,
                1,
            ),
        }
    res["truncation"] = truncation(shapes, merged, reps["svd_layers"], reps["trunc_block"], fp64)
    res["wall_s"] = round(time.perf_counter() - t_start, 1)
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--threads", type=int, default=2, help="torch CPU threads (set explicitly: runs compared)"
    )
    p.add_argument("--quick", action="store_true", help="SmolLM2 shapes only, fewer repeats")
    p.add_argument(
        "--svd-layers-7b",
        type=int,
        default=1,
        help="layers per kind whose dense SVD is timed on 7B shapes (extrapolated to 32)",
    )
    p.add_argument(
        "--fp64-7b",
        choices=["if-needed", "always", "never"],
        default="if-needed",
        help="also compare the 7B rank-8 results in float64 (if-needed: fp32 differs > 1e-4)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="also write the JSON to this file")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(args.seed)
    # LAPACK/BLAS lazy set-up (≈1 s on the first SVD) must not land in a timed figure.
    torch.linalg.svd(torch.randn(600, 600), full_matrices=False)
    torch.linalg.qr(torch.randn(4, 600, 56, dtype=torch.float64))

    small = {
        "dense": 3 if args.quick else 8,
        "dense_warmup": 1,
        "merge_block": 10 if args.quick else 25,
        "merge_warmup": 5,
        "breakdown": 10 if args.quick else 30,
        "peft": 1 if args.quick else 2,
        "trunc_block": 3 if args.quick else 5,
        "svd_layers": 3 if args.quick else SMOLLM2.layers,
    }
    big = {
        "dense": 2,
        "dense_warmup": 0,
        "merge_block": 5,
        "merge_warmup": 2,
        "breakdown": 5,
        "peft": 0,
        "trunc_block": 2,
        "svd_layers": args.svd_layers_7b,
    }
    t0 = time.perf_counter()
    result: dict[str, Any] = {
        "benchmark": "merge_math",
        "config": {
            "threads": args.threads,
            "torch": torch.__version__,
            "dtype": "float32",
            "experts": EXPERTS,
            "rank": RANK,
            "quick": args.quick,
            "seed": args.seed,
            "repeats": {"smollm2_135m": small, **({} if args.quick else {"llama_7b": big})},
            "repeats_note": (
                "dense/peft: slow runs; merge_block: fast runs before each slow run and after "
                "the last; trunc_block: truncate runs before and after each kind's dense SVDs; "
                "svd_layers: layers per kind whose dense SVD is timed (1 run each)"
            ),
            "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
        },
    }
    s = bench_shapes(SMOLLM2, small, gen, with_peft=True, fp64="always")
    result["smollm2_135m"] = s
    b = None
    if not args.quick:
        b = bench_shapes(LLAMA_7B, big, gen, with_peft=False, fp64=args.fp64_7b)
        result["llama_7b"] = b

    def med(d: dict[str, Any], key: str) -> float:
        return float(d[key]["median_ms"])

    ratios: dict[str, float | None] = {
        "concat_vs_dense_smollm2": med(s, "dense_merge_7_terms") / med(s, "concat_merge_7_terms"),
        "concat_vs_dense_7b": (
            med(b, "dense_merge_7_terms") / med(b, "concat_merge_7_terms") if b else None
        ),
        "view_vs_dense_smollm2": med(s, "dense_merge_7_terms") / med(s, "concat_view_7_terms"),
        "view_vs_dense_7b": (
            med(b, "dense_merge_7_terms") / med(b, "concat_view_7_terms") if b else None
        ),
        "materialized_vs_dense_smollm2": (
            med(s, "dense_merge_7_terms") / med(s, "concat_materialized_7_terms")
        ),
        "materialized_vs_dense_7b": (
            med(b, "dense_merge_7_terms") / med(b, "concat_materialized_7_terms") if b else None
        ),
        "view_vs_peft_svd_smollm2": med(s, "peft_svd_6_experts") / med(s, "concat_view_7_terms"),
        "concat_vs_peft_svd_smollm2": (
            med(s, "peft_svd_6_experts") / med(s, "concat_merge_6_experts")
        ),
        "concat_then_truncate_vs_peft_svd_smollm2": (
            med(s, "peft_svd_6_experts") / med(s, "concat_merge_6_experts_then_truncate_8")
        ),
        "qrsvd_vs_dense_svd_7b": b["truncation"].pop("_ratio") if b else None,
        "qrsvd_vs_dense_svd_smollm2": s["truncation"].pop("_ratio"),
    }
    eq_s = bool(s["truncation"].pop("_equal"))
    eq_b = bool(b["truncation"].pop("_equal")) if b else None

    def at_least(x: float | None, y: float) -> bool | None:
        return None if x is None else x >= y

    result["ratios"] = {k: None if v is None else round(v, 1) for k, v in ratios.items()}
    result["targets"] = {
        "merge_ge_1000x_dense_7b": at_least(ratios["view_vs_dense_7b"], 1000),
        "merge_ge_100x_dense_smollm2": at_least(ratios["view_vs_dense_smollm2"], 100),
        "merge_ge_1000x_peft_svd_smollm2": at_least(ratios["view_vs_peft_svd_smollm2"], 1000),
        "materialized_ge_100x_dense_smollm2": at_least(
            ratios["materialized_vs_dense_smollm2"], 100
        ),
        "qrsvd_ge_50x_dense_svd_7b": at_least(ratios["qrsvd_vs_dense_svd_7b"], 50),
        "rank8_equal_within_1e-4": eq_s and (eq_b is not False),
    }
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
