"""The mixture's math (runtime/mixture.py) and the plugin's punica wrappers at torch level
(mergeserve/vllm_plugin.py): CPU here, the GPU wrapper where CUDA is present."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from mergeserve.adapters.lowrank import AdapterFactors, LowRank, merge_adapters
from mergeserve.runtime.mixture import MixtureBundle, MixtureSpec, scale_rows


def factors(ranks: dict[str, int], layers: dict[str, tuple[int, ...]], seed: int) -> AdapterFactors:
    g = torch.Generator().manual_seed(seed)
    shapes = {"self_attn.q_proj": (12, 12), "mlp.down_proj": (12, 20)}  # (out, in)
    groups = {}
    for kind, r in ranks.items():
        out, inn = shapes[kind]
        n = len(layers[kind])
        groups[kind] = LowRank(
            torch.randn(n, r, inn, generator=g, dtype=torch.float64),
            torch.randn(n, out, r, generator=g, dtype=torch.float64),
        )
    return AdapterFactors(groups, {k: layers[k] for k in ranks})


def test_bundle_with_a_scale_is_the_weighted_merge() -> None:
    # Terms with different ranks per kind, a kind one term lacks, different layer sets.
    terms = {
        "a": factors(
            {"self_attn.q_proj": 4, "mlp.down_proj": 2},
            {"self_attn.q_proj": (0, 1), "mlp.down_proj": (0, 1)},
            1,
        ),
        "b": factors({"self_attn.q_proj": 3}, {"self_attn.q_proj": (1, 2)}, 2),
        "c": factors(
            {"mlp.down_proj": 5, "self_attn.q_proj": 5},
            {"mlp.down_proj": (2,), "self_attn.q_proj": (0,)},
            3,
        ),
    }
    bundle = MixtureBundle.build(terms)
    assert bundle.names == ("a", "b", "c")
    assert bundle.ranks == (4, 3, 5)
    assert bundle.rank == 12
    assert set(bundle.factors.ranks.values()) == {12}  # every kind: one layout of blocks
    for weights in ({"a": 0.7, "b": 0.3}, {"b": -0.5, "c": 2.0}, {"a": 0.2, "b": 0.3, "c": 0.5}):
        spec = bundle.spec(weights)
        s = spec.scale().double()
        want = merge_adapters([terms[n] for n in weights], list(weights.values()))
        for kind, lr in bundle.factors.groups.items():
            got = torch.einsum("lor,r,lri->loi", lr.B, s, lr.A)
            lay = bundle.factors.layers[kind]
            ref = torch.zeros_like(got)
            wl = want.layers[kind]
            dense = want.groups[kind].to_dense()
            for j, idx in enumerate(lay):
                if idx in wl:
                    ref[j] = dense[wl.index(idx)]
            torch.testing.assert_close(got, ref)


def test_spec_fixed_weights_and_unknown_terms() -> None:
    bundle = MixtureBundle.build(
        {
            "S": factors({"self_attn.q_proj": 2}, {"self_attn.q_proj": (0,)}, 4),
            "x": factors({"self_attn.q_proj": 3}, {"self_attn.q_proj": (0,)}, 5),
        }
    )
    assert bundle.spec({"x": 0.5}, fixed={"S": 1.0}).weights == (1.0, 0.5)
    with pytest.raises(ValueError, match="not in the bundle"):
        bundle.spec({"y": 1.0})


def test_spec_round_trips_through_extra_args_and_rejects_malformed() -> None:
    spec = MixtureSpec((8, 8, 4), (0.25, 0.0, 1.5))
    assert MixtureSpec.from_extra_args(spec.extra_args()) == spec
    assert MixtureSpec.from_extra_args(None) is None
    assert MixtureSpec.from_extra_args({"other": 1}) is None
    for bad in (
        {"mergeserve_mix_ranks": [8], "mergeserve_mix_weights": [1.0, 2.0]},
        {"mergeserve_mix_ranks": [8]},
        {"mergeserve_mix_ranks": [0], "mergeserve_mix_weights": [1.0]},
        {"mergeserve_mix_ranks": ["x"], "mergeserve_mix_weights": [1.0]},
        {"mergeserve_mix_ranks": [2], "mergeserve_mix_weights": [float("nan")]},
        {"mergeserve_mix_ranks": [2], "mergeserve_mix_weights": [1e39]},  # inf in float32
        {"mergeserve_mix_ranks": [2], "mergeserve_mix_weights": [1001.0]},
        {"mergeserve_mix_ranks": [2], "mergeserve_mix_weights": [True]},
        {"mergeserve_mix_ranks": [2.5], "mergeserve_mix_weights": [1.0]},
        {"mergeserve_mix_ranks": 2, "mergeserve_mix_weights": 1.0},
        {"mergeserve_mix_ranks": [], "mergeserve_mix_weights": []},
        {"mergeserve_mix_ranks": [1 << 17], "mergeserve_mix_weights": [1.0]},
        {"mergeserve_mix_ranks": [1] * 1025, "mergeserve_mix_weights": [1.0] * 1025},
        {"mergeserve_mix_ranks": [1] * 10**6, "mergeserve_mix_weights": [1.0]},
    ):
        with pytest.raises(ValueError, match=r"mixture|ranks|weights|blocks"):
            MixtureSpec.from_extra_args(bad)
    assert spec.scale().tolist() == [0.25] * 8 + [0.0] * 8 + [1.5] * 4
    # Stored as the float32 values the engine multiplies by.
    assert MixtureSpec((1,), (0.1,)).weights == (float(torch.tensor(0.1).item()),)
    assert MixtureSpec((1,), (-1000.0,)).weights == (-1000.0,)


def test_the_salt_separates_mixtures_and_joins_equal_ones() -> None:
    a, b = MixtureSpec((8, 8), (1.0, 0.0)), MixtureSpec((8, 8), (0.0, 1.0))
    assert a.salt() == MixtureSpec((8, 8), (1.0, 0.0)).salt()
    assert a.salt() != b.salt()
    assert a.salt() != MixtureSpec((4, 12), (1.0, 0.0)).salt()  # same weights, other blocks
    assert a.salt("tenant-1") not in (a.salt(), a.salt("tenant-2"))
    assert a.salt(a.salt()) == a.salt()  # salting twice (mergeserve, then the plugin): once


def test_scale_rows_per_token() -> None:
    a, b = MixtureSpec((2, 1), (0.5, 2.0)), MixtureSpec((1,), (3.0,))
    rows = scale_rows([a, None, b], [2, 1, 3], 4)
    assert rows is not None
    assert rows.tolist() == [
        [0.5, 0.5, 2.0, 0.0],
        [0.5, 0.5, 2.0, 0.0],
        [1.0, 1.0, 1.0, 1.0],
        [3.0, 0.0, 0.0, 0.0],
        [3.0, 0.0, 0.0, 0.0],
        [3.0, 0.0, 0.0, 0.0],
    ]
    assert scale_rows([None, None], [3, 1], 4) is None
    with pytest.raises(ValueError, match="exceeds the slot rank"):
        scale_rows([MixtureSpec((8,), (1.0,))], [1], 4)
    # A decode step (one token per request), a request with no token this step.
    decode = scale_rows([b, a, None], [1, 1, 1], 4)
    assert decode is not None
    assert decode.tolist() == [rows[3].tolist(), rows[0].tolist(), [1.0] * 4]
    skipped = scale_rows([a, b], [0, 2], 4)
    assert skipped is not None
    assert skipped.tolist() == [rows[3].tolist()] * 2


def test_spec_row_is_made_once_per_width_and_never_shared_with_the_rows() -> None:
    a = MixtureSpec((2, 1), (0.5, 2.0))
    assert a.row(4).tolist() == [0.5, 0.5, 2.0, 0.0]
    assert a.row(4) is a.row(4)
    assert a.row(3).tolist() == [0.5, 0.5, 2.0]
    rows = scale_rows([a], [1], 4)
    assert rows is not None
    rows.mul_(0)  # the step's rows are the runner's to overwrite
    assert a.row(4).tolist() == [0.5, 0.5, 2.0, 0.0]
    assert a == MixtureSpec((2, 1), (0.5, 2.0))  # the cache is not part of the value
    assert hash(a) == hash(MixtureSpec((2, 1), (0.5, 2.0)))


# ---------------------------------------------------------------------- the wrappers

MAX_LORAS, MAX_RANK, IN = 3, 16, 32
SLICES = (24, 8, 8)  # a packed qkv: three output slices
SLOT_RANKS = {0: 4, 1: 16, 2: 8}
IDS = [10, 20, 30]  # slot -> adapter id


def stacked(device: str) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(0)
    a_st, b_st = [], []
    for out in SLICES:
        A = torch.zeros(MAX_LORAS, 1, MAX_RANK, IN)
        B = torch.zeros(MAX_LORAS, 1, out, MAX_RANK)
        for slot, r in SLOT_RANKS.items():  # vLLM's set_lora: the first r rows, zeros after
            A[slot, 0, :r] = torch.randn(r, IN, generator=g)
            B[slot, 0, :, :r] = torch.randn(out, r, generator=g)
        a_st.append(A.to(device))
        b_st.append(B.to(device))
    return tuple(a_st), tuple(b_st)


def reference(
    y: torch.Tensor,
    x: torch.Tensor,
    a_st: tuple[torch.Tensor, ...],
    b_st: tuple[torch.Tensor, ...],
    slots: list[int],
    rows: torch.Tensor | None,
) -> torch.Tensor:
    out = y.clone()
    for t, s in enumerate(slots):
        if s < 0:
            continue
        off = 0
        for A, B, size in zip(a_st, b_st, SLICES, strict=True):
            h = A[s, 0] @ x[t]
            if rows is not None:
                h = h * rows[t]
            out[t, off : off + size] += B[s, 0] @ h
            off += size
    return out


def make_wrapper(cls_name: str, device: str) -> object:
    from types import SimpleNamespace

    from mergeserve import vllm_plugin

    cls = getattr(vllm_plugin, cls_name)
    cfg = SimpleNamespace(max_lora_rank=MAX_RANK, max_loras=MAX_LORAS, specialize_active_lora=False)
    w = cls(64, 8, device, lora_config=cfg)
    for slot, r in SLOT_RANKS.items():
        w.set_slot_rank(slot, r)
    return w


def apply(
    w: object, slots: list[int], x: torch.Tensor, y: torch.Tensor, rows: torch.Tensor | None
) -> torch.Tensor:
    from vllm.lora.layers import LoRAMapping

    ids = tuple(IDS[s] if s >= 0 else 0 for s in slots)
    w.update_metadata(LoRAMapping(ids, ids, is_prefill=True), list(IDS), MAX_LORAS, 512)  # type: ignore[attr-defined]
    w.set_mixture_rows(rows)  # type: ignore[attr-defined]
    a_st, b_st = stacked(str(x.device))
    out = y.clone()
    w.add_lora_linear(out, x, a_st, b_st, 1.0, SLICES)  # type: ignore[attr-defined]
    return out


BATCHES = {
    "mixed": [0, 0, -1, 1, 1, 1, 0, 2, -1],  # slot 0 in two runs, base tokens between
    "one slot": [1, 1, 1, 1],
    "no lora": [-1, -1, -1],
}


@pytest.mark.parametrize("batch", list(BATCHES))
@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("fused", [True, False], ids=["block-diagonal", "per-slice"])
def test_cpu_wrapper_matches_the_dense_reference(
    batch: str, scaled: bool, fused: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mergeserve import vllm_plugin

    if not fused:
        monkeypatch.setattr(vllm_plugin, "BLOCK_DIAGONAL_MAX", 0)
    slots = BATCHES[batch]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(len(slots), IN, generator=g)
    y = torch.randn(len(slots), sum(SLICES), generator=g)
    rows = torch.rand(len(slots), MAX_RANK, generator=g) * 2 - 0.5 if scaled else None
    w = make_wrapper("MixturePunicaCPU", "cpu")
    got = apply(w, slots, x, y, rows)
    a_st, b_st = stacked("cpu")
    torch.testing.assert_close(got, reference(y, x, a_st, b_st, slots, rows))
    for t, s in enumerate(slots):  # base tokens are untouched, exactly
        if s < 0:
            assert torch.equal(got[t], y[t])
    # Back to no rows: the scale is ones again (warm-up, requests without a mixture).
    again = apply(w, slots, x, y, None)
    torch.testing.assert_close(again, reference(y, x, a_st, b_st, slots, None))


def test_cpu_wrapper_agrees_with_stock_vllm_without_base_tokens() -> None:
    from vllm.lora.layers import LoRAMapping
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    slots = [2, 2, 0, 1, 1, 0]
    g = torch.Generator().manual_seed(2)
    x = torch.randn(len(slots), IN, generator=g)
    y = torch.randn(len(slots), sum(SLICES), generator=g)
    ours = apply(make_wrapper("MixturePunicaCPU", "cpu"), slots, x, y, None)
    stock = PunicaWrapperCPU(64, 8, "cpu")
    ids = tuple(IDS[s] for s in slots)
    stock.update_metadata(LoRAMapping(ids, ids, is_prefill=True), list(IDS), MAX_LORAS, 512)
    a_st, b_st = stacked("cpu")
    theirs = y.clone()
    stock.add_lora_linear(theirs, x, a_st, b_st, 1.0, SLICES)
    torch.testing.assert_close(ours, theirs)


def block_rows(patterns: list[list[float] | None], width: int = MAX_RANK) -> torch.Tensor:
    """Scale rows of one token each: a weight per 4-column block (slot 1 has rank 16: four
    blocks), or None for a token without a mixture (ones)."""
    out = torch.ones(len(patterns), width)
    for t, w in enumerate(patterns):
        if w is not None:
            out[t] = torch.tensor(w).repeat_interleave(4)[:width]
    return out


def test_plan_groups_computes_only_the_columns_a_step_weights() -> None:
    from mergeserve.vllm_plugin import Group, plan_groups

    scale = block_rows(
        [
            [0.0, 0.7, 0.0, 0.0],  # slot 1 (rank 16): tokens 0-2 weight blocks 1 and 3
            [0.0, 0.2, 0.0, 0.5],
            [0.0, 0.0, 0.0, 1.0],
            [0.0, 0.0, 0.0, 0.0],  # slot 2 (rank 8): every weight zero
            [0.0, 0.0, 0.0, 0.0],
            [1.0, 1.0, 1.0, 1.0],  # slot 0 (rank 4): all of its columns
        ]
    )
    groups = [Group(1, slice(0, 3)), Group(2, torch.tensor([3, 4])), Group(0, slice(5, 6))]
    plan = plan_groups(groups, scale, SLOT_RANKS, MAX_RANK)
    assert [g.slot for g in plan] == [1, 0]  # slot 2 adds exactly nothing: dropped
    kept = plan[0].kept
    assert kept is not None
    assert plan[0].rows == slice(0, 3)
    assert kept.cols.tolist() == [4, 5, 6, 7, 12, 13, 14, 15]
    assert kept.scale is not None
    assert torch.equal(kept.scale, scale[0:3, kept.cols])
    assert plan[1] == Group(0, slice(5, 6))  # nothing to leave out
    # Tokens weighting one block by exactly 1 (an expert alone): nothing to multiply.
    one = block_rows([[0.0, 0.0, 1.0, 0.0]] * 2)
    (g,) = plan_groups([Group(1, slice(0, 2))], one, SLOT_RANKS, MAX_RANK)
    assert g.kept is not None
    assert g.kept.scale is None
    assert g.kept.cols.tolist() == [8, 9, 10, 11]
    # A token without a mixture (ones) in the group uses every column.
    scale[1] = 1.0
    assert plan_groups(groups[:1], scale, SLOT_RANKS, MAX_RANK) == [groups[0]]


BLOCK_BATCHES = {
    # slots as in BATCHES["mixed"], each token weighting some of its slot's blocks
    "sparse": (
        [0, 0, -1, 1, 1, 1, 0, 2, -1],
        [
            [1.0, 0, 0, 0],
            [0.5, 0, 0, 0],
            None,
            [0, 0.3, 0, 0],
            [0, 0.3, 0.0, 0.2],
            [0, 0.0, 0.0, 0.6],
            [2.0, 0, 0, 0],
            [0, 0, 0, 0],
            None,
        ],
    ),
    # one slot: two requests (prefills) on different blocks and one at zero weights
    "long": ([1] * 13, [[0.8, 0, 0, 0]] * 5 + [[0, 0, 1.5, 0]] * 5 + [[0, 0, 0, 0]] * 3),
    # every request weighting one block by exactly 1 (routed to one expert): no multiply
    "one-expert": ([1] * 4 + [2] * 3, [[0, 1.0, 0, 0]] * 4 + [[1.0, 0, 0, 0]] * 3),
}


@pytest.mark.parametrize("batch", list(BLOCK_BATCHES))
@pytest.mark.parametrize("fused", [True, False], ids=["block-diagonal", "per-slice"])
def test_cpu_wrapper_leaves_zero_weighted_columns_out_and_computes_the_same(
    batch: str, fused: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mergeserve import vllm_plugin

    if not fused:
        monkeypatch.setattr(vllm_plugin, "BLOCK_DIAGONAL_MAX", 0)
    slots, patterns = BLOCK_BATCHES[batch]
    rows = block_rows(patterns)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(len(slots), IN, generator=g)
    y = torch.randn(len(slots), sum(SLICES), generator=g)
    w = make_wrapper("MixturePunicaCPU", "cpu")
    got = apply(w, slots, x, y, rows)
    plan = w._plan  # type: ignore[attr-defined]
    assert plan is not None
    assert any(p.kept is not None for p in plan)
    if batch == "long":  # blocks 0 and 2 of slot 1's four
        assert [p.kept.cols.tolist() for p in plan] == [[0, 1, 2, 3, 8, 9, 10, 11]]  # type: ignore[union-attr]
    if batch == "one-expert":
        assert all(p.kept is not None and p.kept.scale is None for p in plan)
    a_st, b_st = stacked("cpu")
    torch.testing.assert_close(got, reference(y, x, a_st, b_st, slots, rows))
    monkeypatch.setattr(vllm_plugin, "SKIP_ZERO_SCALES", False)
    every = apply(make_wrapper("MixturePunicaCPU", "cpu"), slots, x, y, rows)
    torch.testing.assert_close(got, every)
    for t, s in enumerate(slots):  # base tokens are untouched, exactly
        if s < 0:
            assert torch.equal(got[t], y[t])


def test_cpu_wrapper_keeps_few_column_selections(monkeypatch: pytest.MonkeyPatch) -> None:
    from mergeserve import vllm_plugin

    monkeypatch.setattr(vllm_plugin, "MAX_KEPT_SETS", 2)
    w = make_wrapper("MixturePunicaCPU", "cpu")
    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(2, IN, generator=g), torch.randn(2, sum(SLICES), generator=g)
    a_st, b_st = stacked("cpu")
    for block in range(4):  # four steps, each on another block of slot 1
        weights = [0.0] * 4
        weights[block] = 1.0
        rows = block_rows([weights, weights])
        got = apply(w, [1, 1], x, y, rows)
        torch.testing.assert_close(got, reference(y, x, a_st, b_st, [1, 1], rows))
    kept = {key[3] for key in w._stacked_a}  # type: ignore[attr-defined]
    assert len(kept) == 2  # the last two blocks' factors, the first two dropped
    assert [k[0] for k in w._kept_sets] == [1, 1]  # type: ignore[attr-defined]


def test_scale_rows_larger_than_the_buffer_are_refused() -> None:
    w = make_wrapper("MixturePunicaCPU", "cpu")
    with pytest.raises(ValueError, match="exceed"):
        w.set_mixture_rows(torch.ones(65, 4))  # type: ignore[attr-defined]


VOCAB, LOGITS_RANK = 40, 8


def logits_stacked(slots_with_lora: set[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's LogitsProcessorWithLoRA buffers: zeros in a slot whose adapter has no
    lm_head LoRA (reset_lora), its factors in one that has."""
    g = torch.Generator().manual_seed(3)
    A = torch.zeros(MAX_LORAS, 1, LOGITS_RANK, IN)
    B = torch.zeros(MAX_LORAS, 1, VOCAB, LOGITS_RANK)
    for s in slots_with_lora:
        A[s, 0] = torch.randn(LOGITS_RANK, IN, generator=g)
        B[s, 0] = torch.randn(VOCAB, LOGITS_RANK, generator=g)
    return A, B


def logits_batch(w: object, slots: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    from vllm.lora.layers import LoRAMapping

    ids = tuple(IDS[s] if s >= 0 else 0 for s in slots)
    w.update_metadata(LoRAMapping(ids, ids, is_prefill=True), list(IDS), MAX_LORAS, VOCAB)  # type: ignore[attr-defined]
    g = torch.Generator().manual_seed(4)
    return torch.randn(len(slots), IN, generator=g), torch.randn(len(slots), VOCAB, generator=g)


@pytest.mark.parametrize("with_lora", [set(), {1}], ids=["no lm_head LoRA", "slot 1 has one"])
def test_cpu_wrapper_runs_the_lm_head_lora_only_where_a_slot_has_one(
    with_lora: set[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    from vllm.lora.punica_wrapper import punica_cpu
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    expands: list[int] = []  # vLLM's per-token [vocab, r] gather: the cost being skipped
    stock_expand = punica_cpu.bgmv_expand

    def counted(*args: object, **kwargs: object) -> None:
        expands.append(1)
        stock_expand(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(punica_cpu, "bgmv_expand", counted)
    slots = [0, 0, 1, -1, 2]
    A, B = logits_stacked(with_lora)
    ours = make_wrapper("MixturePunicaCPU", "cpu")
    x, y = logits_batch(ours, slots)
    stock = PunicaWrapperCPU(64, 8, "cpu")
    logits_batch(stock, slots)
    got, want = y.clone(), y.clone()
    ours.add_lora_logits(got, x, A, B, 1.0)  # type: ignore[attr-defined]
    assert len(expands) == (1 if with_lora else 0)
    stock.add_lora_logits(want, x, A, B, 1.0)
    torch.testing.assert_close(got, want)
    assert torch.equal(got, y) == (not with_lora)


def test_a_slot_written_again_is_looked_at_again_for_an_lm_head_lora() -> None:
    w = make_wrapper("MixturePunicaCPU", "cpu")
    x, y = logits_batch(w, [1, 1])
    A, B = logits_stacked(set())
    got = y.clone()
    w.add_lora_logits(got, x, A, B, 1.0)  # type: ignore[attr-defined]
    assert torch.equal(got, y)  # slot 1 holds no lm_head LoRA: nothing added
    A2, B2 = logits_stacked({1})
    A.copy_(A2)  # another adapter written into slot 1 (vLLM's set_lora) ...
    B.copy_(B2)
    w.set_slot_rank(1, SLOT_RANKS[1])  # type: ignore[attr-defined]  # ... and activated
    w.add_lora_logits(got, x, A, B, 1.0)  # type: ignore[attr-defined]
    torch.testing.assert_close(got - y, x @ A2[1, 0].t() @ B2[1, 0].t())


def test_wrappers_keep_their_caches_while_an_adapter_stays_in_its_slot() -> None:
    from types import SimpleNamespace

    from mergeserve.vllm_plugin import note_activation

    w = make_wrapper("MixturePunicaCPU", "cpu")
    g = torch.Generator().manual_seed(5)
    apply(w, [1, 1, 2], torch.randn(3, IN, generator=g), torch.randn(3, sum(SLICES)), None)
    cached = dict(w._stacked_a)  # type: ignore[attr-defined]
    assert {key[1] for key in cached} == {1, 2}
    adapter = SimpleNamespace(loras={"q_proj": SimpleNamespace(lora_a=torch.zeros(12, IN))})
    manager = SimpleNamespace(
        lora_index_to_id=IDS, punica_wrapper_mapping={"": w}, _registered_adapters={20: adapter}
    )
    for _ in range(3):  # every step activates the adapters it uses; they stay put
        note_activation(manager, 20, written=False)
    assert w._stacked_a == cached  # type: ignore[attr-defined]
    assert w._slot_ranks[1] == SLOT_RANKS[1]  # type: ignore[attr-defined]
    note_activation(manager, 20, written=True)  # written into slot 1 again (rank 12 now)
    assert w._slot_ranks[1] == 12  # type: ignore[attr-defined]
    assert not w._stacked_a  # type: ignore[attr-defined]
    fresh = make_wrapper("MixturePunicaCPU", "cpu")
    fresh._slot_ranks.clear()  # type: ignore[attr-defined]  # a wrapper that never heard of slot 1
    manager.punica_wrapper_mapping = {"": fresh}
    note_activation(manager, 20, written=False)
    assert fresh._slot_ranks == {1: 12}  # type: ignore[attr-defined]
    note_activation(manager, 99, written=True)  # not in any slot: nothing to tell
    assert fresh._slot_ranks == {1: 12}  # type: ignore[attr-defined]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("batch", ["mixed", "one slot"])
def test_gpu_scale_and_grouped_path_match_the_dense_reference(batch: str) -> None:
    """What the GPU wrapper adds to vLLM's Triton path (the persistent scale buffer, the
    in-place scale of the shrunk [slices, T, r] activations) and the grouped GEMMs, on
    CUDA tensors: torch only, as the device machines have no vLLM."""
    from mergeserve.vllm_plugin import MixtureScaleMixin, grouped_lora_linear

    slots = BATCHES[batch]
    g = torch.Generator().manual_seed(3)
    x = torch.randn(len(slots), IN, generator=g)
    y = torch.randn(len(slots), sum(SLICES), generator=g)
    rows = torch.rand(len(slots), MAX_RANK, generator=g)
    a_st, b_st = stacked("cpu")
    want = reference(y, x, a_st, b_st, slots, rows)

    scale = object.__new__(MixtureScaleMixin)  # the buffer alone, without a vLLM wrapper
    scale._init_mixture(64, MAX_RANK, "cuda")
    scale.set_mixture_rows(rows.cuda())
    runs: dict[int, list[int]] = {}
    for t, s in enumerate(slots):
        if s >= 0:
            runs.setdefault(s, []).append(t)
    groups = [(s, torch.tensor(ts, device="cuda")) for s, ts in runs.items()]
    got = y.cuda()
    a_cu, b_cu = stacked("cuda")
    grouped_lora_linear(got, x.cuda(), a_cu, b_cu, SLICES, groups, SLOT_RANKS, scale._mix_scale)
    torch.testing.assert_close(got.cpu(), want, rtol=2e-3, atol=2e-3)

    # The Triton path's order: shrink into [slices, T, r], scale in place, expand.
    shrunk = torch.stack([torch.zeros(len(slots), MAX_RANK)] * len(SLICES)).cuda()
    for t, s in enumerate(slots):
        for i, A in enumerate(a_cu):
            if s >= 0:
                shrunk[i, t] = A[s, 0] @ x[t].cuda()
    scale._scale_shrunk(shrunk)
    out = y.cuda()
    for t, s in enumerate(slots):
        off = 0
        for i, (B, size) in enumerate(zip(b_cu, SLICES, strict=True)):
            if s >= 0:
                out[t, off : off + size] += B[s, 0] @ shrunk[i, t]
            off += size
    torch.testing.assert_close(out.cpu(), want, rtol=2e-3, atol=2e-3)
    scale.set_mixture_rows(None)  # ones again everywhere it wrote
    assert bool((scale._mix_scale == 1).all())


def run_python(code: str, **env: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **env},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip()


REGISTER = """
from mergeserve import vllm_plugin as p
from vllm.platforms import current_platform
from vllm.lora.model_manager import LoRAModelManager as M
from vllm.v1.worker.lora_model_runner_mixin import LoRAModelRunnerMixin as R
p.register()
first = (M.activate_adapter, R.set_active_loras, R._set_active_loras)
p._state["registered"] = False  # as if the module were loaded a second time
p.register()
again = (M.activate_adapter, R.set_active_loras, R._set_active_loras)
print(current_platform.get_punica_wrapper(), p.is_registered(), first == again)
"""


def test_register_is_idempotent_and_opt_in() -> None:
    on = run_python(REGISTER, MERGESERVE_MIXTURE_PLUGIN="1")
    assert on == "mergeserve.vllm_plugin.MixturePunicaCPU True True"
    stock = ["vllm.lora.punica_wrapper.punica_cpu.PunicaWrapperCPU", "False"]
    off = run_python(REGISTER, MERGESERVE_MIXTURE_PLUGIN="0")
    assert off.split()[:2] == stock
    env = {k: v for k, v in os.environ.items() if k != "MERGESERVE_MIXTURE_PLUGIN"}
    proc = subprocess.run(  # a plain vLLM process that never asked for it: untouched
        [sys.executable, "-c", REGISTER], capture_output=True, text=True, timeout=300, env=env
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[:2] == stock


def test_the_front_end_refuses_bad_mixtures_and_salts_good_ones() -> None:
    from mergeserve.vllm_plugin import MixtureRequestError, check_request_mixture

    good = MixtureSpec((8, 8), (0.5, 0.25)).extra_args()
    assert check_request_mixture(good, True, 64) == MixtureSpec((8, 8), (0.5, 0.25))
    assert check_request_mixture({"other": 1}, False, 64) is None
    assert check_request_mixture(None, False, None) is None
    for extra, has_lora, max_rank, match in (
        ({"mergeserve_mix_ranks": [8]}, True, 64, "both"),
        ({**good, "mergeserve_mix_weights": [1e39, 0.0]}, True, 64, "finite"),
        ({**good, "mergeserve_mix_weights": [float("nan"), 0.0]}, True, 64, "finite"),
        ({**good, "mergeserve_mix_weights": ["1", 0.0]}, True, 64, "numbers"),
        (good, False, 64, "names none"),
        (good, True, 8, "above the engine's max_lora_rank 8"),
    ):
        with pytest.raises(MixtureRequestError, match=match) as e:
            check_request_mixture(extra, has_lora, max_rank)
        assert isinstance(e.value, ValueError)


PROCESS_INPUTS = """
import json
from mergeserve import vllm_plugin as p
from mergeserve.runtime.mixture import MixtureSpec
from vllm import SamplingParams
from vllm.v1.engine.input_processor import InputProcessor

class Req:  # what the stock process_inputs returns (an EngineCoreRequest's fields used)
    def __init__(self, params, lora, salt):
        self.sampling_params, self.lora_request, self.cache_salt = params, lora, salt

def stock(self, request_id, prompt, params, *a, lora_request=None, **kw):
    return Req(params, lora_request, prompt.get("cache_salt"))

InputProcessor.process_inputs = stock
p.register()

class Cfg:
    class lora_config:
        max_lora_rank = 16

proc = InputProcessor.__new__(InputProcessor)
proc.vllm_config = Cfg
out = {}
for name, weights, salt in (("a", [0.5, 0.1], None), ("b", [0.1, 0.5], None),
                            ("a2", [0.5, 0.1], None), ("t", [0.5, 0.1], "tenant")):
    sp = SamplingParams(max_tokens=1, extra_args=MixtureSpec((8, 8), tuple(weights)).extra_args())
    out[name] = proc.process_inputs("r", {"cache_salt": salt}, sp, lora_request=object()).cache_salt
plain = proc.process_inputs("r", {}, SamplingParams(max_tokens=1), lora_request=None)
out["plain"] = plain.cache_salt
try:
    bad = SamplingParams(max_tokens=1, extra_args={"mergeserve_mix_ranks": [8],
                                                    "mergeserve_mix_weights": [1e39]})
    proc.process_inputs("r", {}, bad, lora_request=object())
except Exception as e:
    out["bad"] = str(e)
    out["bad_type"] = type(e).__name__
    out["bad_param"] = getattr(e, "parameter", None)
print(json.dumps(out))
"""


def test_the_plugin_keys_each_mixture_into_the_prefix_cache_salt() -> None:
    out = json.loads(run_python(PROCESS_INPUTS, MERGESERVE_MIXTURE_PLUGIN="1"))
    assert out["a"] == out["a2"]  # equal weightings share prefix blocks
    assert out["a"] != out["b"]  # different weightings never do
    assert out["t"].startswith("tenant|")  # a client's own salt is kept
    assert out["t"] != out["a"]
    assert out["plain"] is None  # requests without a mixture are untouched
    assert "refused" in out["bad"]
    assert "finite" in out["bad"]
    # vLLM's own client-error type: its OpenAI server answers 400 with the message (a
    # plain ValueError inside generate() became a bare 500)
    assert out["bad_type"] == "VLLMValidationError"
    assert out["bad_param"] == "vllm_xargs"


def test_vllm_finds_the_plugin_by_its_entry_point() -> None:
    from importlib.metadata import entry_points

    eps = {e.name: e.value for e in entry_points(group="vllm.general_plugins")}
    assert eps.get("mergeserve_mixture") == "mergeserve.vllm_plugin:register"
