"""Twin decomposition against dense references (numpy-style loops over modules)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import Tensor

from mergeserve.adapters.lowrank import AdapterFactors, DenseDelta, relative_error
from mergeserve.adapters.merging import MergeOptions
from mergeserve.adapters.twin import TwinConfig, TwinDecomposition, decompose, decompose_dense
from mergeserve.errors import InvalidRequestError

PREFIX = "base_model.model.model"
SHAPES = {"self_attn.q_proj": (24, 20), "mlp.down_proj": (20, 32)}
NAMES = ("add", "rev", "caps", "json")


def expert(seed: int, r: int = 4) -> AdapterFactors:
    g = torch.Generator().manual_seed(seed)
    mods = {}
    for i in (0, 1, 2):
        for kind, (o, n) in SHAPES.items():
            mods[f"{PREFIX}.layers.{i}.{kind}"] = (
                torch.randn(r, n, generator=g, dtype=torch.float64),
                torch.randn(o, r, generator=g, dtype=torch.float64) * 0.3,
            )
    return AdapterFactors.from_modules(mods)


EXPERTS = {n: expert(i + 1) for i, n in enumerate(NAMES)}


def dense(a: AdapterFactors) -> dict[str, Tensor]:
    return {name: b @ a_ for name, (a_, b) in a.modules().items()}


def best_rank(m: Tensor, k: int) -> Tensor:
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    return u[:, :k] @ torch.diag(s[:k]) @ vh[:k]


def reference(
    experts: dict[str, dict[str, Tensor]], lam: float, k: int, w: dict[str, float]
) -> dict[str, Tensor]:
    """S + Σ w_t X_t, all dense: S = λ Σ Δ, X_t = best rank-k of Δ_t − S."""
    out = {}
    for mod in next(iter(experts.values())):
        s = lam * sum(e[mod] for e in experts.values())
        out[mod] = s + sum(wt * best_rank(experts[n][mod] - s, k) for n, wt in w.items())
    return out


W = {"add": 0.6, "rev": 0.3, "json": 0.1}


@pytest.mark.parametrize("k", [2, 4, 8])
def test_merged_equals_the_dense_twin_sum(k: int) -> None:
    twin = decompose(EXPERTS, TwinConfig(exclusive_rank=k))
    merged = twin.merged(W)
    ref = reference({n: dense(e) for n, e in EXPERTS.items()}, 0.3, k, W)
    assert relative_error(dense(merged), ref) < 1e-5
    # rank(S) = 4 experts × 4; one k per active expert.
    assert set(merged.ranks.values()) == {16 + 3 * k}


def test_report_matches_dense_errors() -> None:
    twin = decompose(EXPERTS, TwinConfig(exclusive_rank=3))
    d = {n: dense(e) for n, e in EXPERTS.items()}
    for rep in twin.report:
        num = den_own = den = 0.0
        for mod, delta in d[rep.name].items():
            s = 0.3 * sum(e[mod] for e in d.values())
            x = best_rank(delta - s, 3)
            num += float((x - (delta - s)).pow(2).sum())
            den_own += float((delta - s).pow(2).sum())
            den += float(delta.pow(2).sum())
        assert rep.exclusive_error == pytest.approx(math.sqrt(num / den_own), rel=1e-6)
        assert rep.reconstruction_error == pytest.approx(math.sqrt(num / den), rel=1e-6)
        assert rep.exclusive_rank == 3
        assert rep.rank == 4


def test_uncompressed_twin_with_weights_summing_to_one_is_the_exact_merge() -> None:
    # k = r + rank(S) keeps Δ_t − S whole; then S + Σ w(Δ − S) = Σ w Δ when Σ w = 1.
    twin = decompose(EXPERTS, TwinConfig(exclusive_rank=20))
    assert all(r.exclusive_error < 1e-7 for r in twin.report)
    exact = twin.merged_exact(W)
    ref = {m: sum(w * dense(EXPERTS[n])[m] for n, w in W.items()) for m in dense(EXPERTS["add"])}
    assert relative_error(dense(exact), ref) < 1e-12
    assert relative_error(dense(twin.merged(W)), ref) < 1e-7


def test_ties_shared_and_a_truncated_shared() -> None:
    opts = MergeOptions(density=0.5)
    twin = decompose(EXPERTS, TwinConfig(shared_method="ties", shared_options=opts, shared_rank=6))
    assert twin.shared is not None
    assert set(twin.shared.ranks.values()) == {6}
    assert set(twin.merged({"add": 1.0}).ranks.values()) == {6 + 8}


def test_bad_weights_are_refused() -> None:
    twin = decompose(EXPERTS)
    with pytest.raises(InvalidRequestError, match="unknown experts"):
        twin.merged({"nope": 1.0})
    with pytest.raises(InvalidRequestError, match="finite"):
        twin.merged({"add": math.inf})
    with pytest.raises(InvalidRequestError, match="density"):
        decompose(
            EXPERTS, TwinConfig(shared_method="ties", shared_options=MergeOptions(density=2.0))
        )


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    twin = decompose(EXPERTS, TwinConfig(exclusive_rank=3))
    out = twin.save(tmp_path / "twin", base_model_name_or_path="tiny")
    back = TwinDecomposition.load(out, experts=EXPERTS)
    assert back.names == twin.names
    assert back.report == twin.report
    assert back.config == twin.config
    assert relative_error(dense(back.merged(W)), dense(twin.merged(W))) < 1e-6  # fp32 on disk
    assert relative_error(dense(back.merged_exact(W)), dense(twin.merged_exact(W))) == 0.0


# ----------------------------------------------------------------------------- dense experts


def dense_expert(seed: int) -> DenseDelta:
    g = torch.Generator().manual_seed(seed)
    groups = {
        k: torch.randn(3, o, n, generator=g, dtype=torch.float64) for k, (o, n) in SHAPES.items()
    }
    return DenseDelta(groups, {k: (0, 1, 2) for k in SHAPES}, PREFIX)


def dense_dict(d: DenseDelta) -> dict[str, Tensor]:
    return {
        f"{PREFIX}.layers.{i}.{k}": t[j]
        for k, t in d.groups.items()
        for j, i in enumerate(d.layers[k])
    }


def test_dense_experts_fold_the_shared_part() -> None:
    taus = {n: dense_expert(10 + i) for i, n in enumerate(NAMES)}
    twin = decompose_dense(taus, TwinConfig(exclusive_rank=5))
    assert twin.shared is None
    assert twin.shared_dense is not None
    d = {n: dense_dict(t) for n, t in taus.items()}
    full = reference(d, 0.3, 5, W)  # S + Σ w X
    s = dense_dict(twin.shared_dense)
    for mod, ref in full.items():
        torch.testing.assert_close(s[mod], 0.3 * sum(e[mod] for e in d.values()))
        got = dense(twin.merged(W))[mod] + s[mod]  # the base carries S
        torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9)
    exact = twin.merged_exact(W)  # exact full-rank factors of Σ w τ
    ref_exact = {m: sum(w * d[n][m] for n, w in W.items()) for m in full}
    assert relative_error(dense(exact), ref_exact) < 1e-12


def test_dense_experts_with_a_compressed_shared() -> None:
    taus = {n: dense_expert(10 + i) for i, n in enumerate(NAMES)}
    twin = decompose_dense(taus, TwinConfig(exclusive_rank=5, shared_rank=7), fold_shared=False)
    assert twin.shared is not None
    assert set(twin.shared.ranks.values()) == {7}
    d = {n: dense_dict(t) for n, t in taus.items()}
    for mod, got in dense(twin.merged({"add": 1.0})).items():
        s = best_rank(0.3 * sum(e[mod] for e in d.values()), 7)
        ref = s + best_rank(d["add"][mod] - s, 5)
        torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9)


def test_merged_view_is_the_same_merge_without_copying_factors() -> None:
    twin = decompose(EXPERTS, TwinConfig(exclusive_rank=3))
    view = twin.merged_view(W)
    full = view.materialize(drop_zero=False)
    dropped = view.materialize()
    ref = dense(twin.merged(W))
    assert relative_error(dense(full), ref) < 1e-12
    assert relative_error(dense(dropped), ref) < 1e-12
    assert set(full.ranks.values()) == {16 + 4 * 3}  # "caps" kept at scale 0
    assert set(dropped.ranks.values()) == {16 + 3 * 3}
    kind = "self_attn.q_proj"
    # The view shares the basis' factors; a second merge reuses them.
    assert full.groups[kind].A.data_ptr() == twin.basis.groups[kind].A.data_ptr()
    assert twin.merged_view({"caps": 1.0}).basis is view.basis
    with pytest.raises(InvalidRequestError):
        twin.merged_view({"nope": 1.0})


def test_with_expert_adds_an_exclusive_against_the_current_shared() -> None:
    """A hot-added expert: S stays that of the others, X_new = best rank-k of Δ_new − S."""
    cfg = TwinConfig(shared_options=MergeOptions(scale=0.3), exclusive_rank=3)
    old = {n: EXPERTS[n] for n in ("add", "rev", "caps")}
    twin = decompose(old, cfg)
    grown = twin.with_expert("json", EXPERTS["json"])
    assert grown.names == ("add", "rev", "caps", "json")
    assert grown.shared is twin.shared
    assert twin.names == ("add", "rev", "caps")  # the old one is untouched
    d = {n: dense(e) for n, e in EXPERTS.items()}
    s = {mod: 0.3 * sum(d[n][mod] for n in old) for mod in d["json"]}
    got = dense(grown.exclusives["json"])
    for mod, delta in d["json"].items():
        assert torch.allclose(got[mod], best_rank(delta - s[mod], 3), atol=1e-8)
    w = {"json": 0.7, "add": 0.3}
    merged = dense(grown.merged(w))
    for mod in merged:
        want = s[mod] + sum(
            wt
            * (best_rank(d[n][mod] - s[mod], 3) if n == "json" else dense(twin.exclusives[n])[mod])
            for n, wt in w.items()
        )
        assert torch.allclose(merged[mod], want, atol=1e-8)
    assert torch.allclose(dense(grown.merged_exact({"json": 1.0}))[mod], d["json"][mod], atol=1e-10)
    with pytest.raises(Exception, match="already in the decomposition"):
        grown.with_expert("json", EXPERTS["json"])
