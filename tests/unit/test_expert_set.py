"""ExpertSet identity, the cached Twin decomposition and static merges, DynamicMerger."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from torch import Tensor

from mergeserve.adapters.lowrank import AdapterFactors
from mergeserve.adapters.merging import MergeOptions
from mergeserve.adapters.peft_io import load_lora_factors
from mergeserve.adapters.twin import TwinConfig
from mergeserve.errors import InvalidRequestError
from mergeserve.router.policy import MergeKey, RoutingPolicy
from mergeserve.runtime.dynamic import DynamicMerger
from mergeserve.runtime.expert_set import (
    STATIC_DEFAULTS,
    ExpertSet,
    static_merge,
    twin_decomposition,
)
from mergeserve.runtime.materialize import AdapterCache, IdAllocator
from tests.conftest import write_fake_lora_dir

NAMES = ("add", "capital", "sort")


@pytest.fixture
def experts_root(tmp_path: Path) -> Path:
    root = tmp_path / "experts"
    for i, n in enumerate(NAMES):
        write_fake_lora_dir(root / n, rank=4, seed=i)
    return root


def dense(a: AdapterFactors) -> dict[str, Tensor]:
    return {name: b @ a_ for name, (a_, b) in a.modules().items()}


def test_digest_names_the_content(experts_root: Path, tmp_path: Path) -> None:
    one, two = ExpertSet.from_dir(experts_root), ExpertSet.from_dir(experts_root)
    assert one.names == NAMES
    assert one.digest == two.digest
    write_fake_lora_dir(experts_root / "sort", rank=4, seed=99)  # new weights, same name
    changed = ExpertSet.from_dir(experts_root)
    assert changed.digest != one.digest
    assert changed.digests["add"] == one.digests["add"]
    assert changed.digests["sort"] != one.digests["sort"]


def test_twin_decomposition_is_built_once_per_set_and_config(
    experts_root: Path, tmp_path: Path
) -> None:
    experts = ExpertSet.from_dir(experts_root)
    cache = tmp_path / "cache"
    cfg = TwinConfig(exclusive_rank=2)
    first = twin_decomposition(experts, cfg, cache)
    (saved,) = (cache / "derived").iterdir()
    again = twin_decomposition(experts, cfg, cache)  # loaded from disk
    for n in NAMES:
        for k, v in dense(first.exclusives[n]).items():
            torch.testing.assert_close(dense(again.exclusives[n])[k], v)
    assert again.experts is not None  # loaded with the experts: merged_exact works
    twin_decomposition(experts, TwinConfig(exclusive_rank=3), cache)
    assert len(list((cache / "derived").iterdir())) == 2
    assert saved.is_dir()


def test_static_merge_fits_the_slot_rank_and_is_cached(experts_root: Path, tmp_path: Path) -> None:
    experts = ExpertSet.from_dir(experts_root)
    cache = tmp_path / "cache"
    exact = static_merge(experts, "linear", STATIC_DEFAULTS["linear"], 64, cache)
    assert exact.rank == 12  # three rank-4 experts, exact
    want = {
        k: sum(v[k] for v in map(dense, experts.factors.values())) / 3
        for k in dense(experts.factors["add"])
    }
    got = dense(load_lora_factors(exact.path))
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, atol=1e-5, rtol=1e-4)
    small = static_merge(experts, "linear", STATIC_DEFAULTS["linear"], 8, cache)
    assert small.rank == 8
    assert small.path != exact.path
    ties = static_merge(experts, "ties", STATIC_DEFAULTS["ties"], 8, cache)
    assert ties.rank == 8
    mtime = ties.path.stat().st_mtime_ns
    assert static_merge(experts, "ties", STATIC_DEFAULTS["ties"], 8, cache).path == ties.path
    assert ties.path.stat().st_mtime_ns == mtime


class KeywordRouter:
    """A router test double: logit 5 for the expert whose name is in the text."""

    name = "keyword"

    def __init__(self, experts: Sequence[str]) -> None:
        self.experts = tuple(experts)
        self.calls: list[list[str]] = []

    def logits(self, texts: Sequence[str]) -> Tensor:
        self.calls.append(list(texts))
        return torch.tensor([[5.0 if e in t else 0.0 for e in self.experts] for t in texts])


def merger(experts: ExpertSet, tmp_path: Path, max_rank: int = 64) -> DynamicMerger:
    twin = twin_decomposition(
        experts, TwinConfig(shared_options=MergeOptions(scale=0.3), exclusive_rank=2), None
    )
    cache = AdapterCache(IdAllocator(1000), root=tmp_path / "shm")
    policy = RoutingPolicy(top_k=2, floor=0.1, grid=0.05)
    return DynamicMerger(experts, twin, KeywordRouter(experts.names), policy, cache, max_rank)


async def test_routing_merging_and_keys(experts_root: Path, tmp_path: Path) -> None:
    experts = ExpertSet.from_dir(experts_root)
    m = merger(experts, tmp_path)
    routed = await asyncio.gather(m.route("please add these"), m.route("the capital of Peru"))
    assert [r.routing.key.top for r in routed] == ["add", "capital"]
    key = MergeKey.from_weights({"add": 0.75, "sort": 0.25})
    assert m.content_key("exact", key) != m.content_key("twin", key)
    assert m.content_key("exact", key) == m.content_key("exact", MergeKey(key.weights))
    exact = await m.acquire("exact", key)
    twin = await m.acquire("twin", key)
    assert (exact.rank, exact.truncated, twin.truncated) == (8, False, False)
    assert exact.lease.target.int_id != twin.lease.target.int_id
    got = dense(load_lora_factors(exact.lease.target.path))
    f = experts.factors
    for k, v in got.items():
        want = 0.75 * dense(f["add"])[k] + 0.25 * dense(f["sort"])[k]
        torch.testing.assert_close(v, want, atol=1e-5, rtol=1e-4)
    got_twin = dense(load_lora_factors(twin.lease.target.path))
    ref = dense(m.twin.merged({"add": 0.75, "sort": 0.25}))
    for k, v in got_twin.items():
        torch.testing.assert_close(v, ref[k], atol=1e-5, rtol=1e-4)
    exact.lease.release()
    twin.lease.release()
    await m.close()


async def test_merges_over_the_slot_rank_are_truncated_and_say_so(
    experts_root: Path, tmp_path: Path
) -> None:
    m = merger(ExpertSet.from_dir(experts_root), tmp_path, max_rank=4)
    key = MergeKey.from_weights({"add": 0.5, "capital": 0.5})
    got = await m.acquire("exact", key)
    assert (got.rank, got.truncated) == (4, True)
    assert max(load_lora_factors(got.lease.target.path).ranks.values()) == 4
    got.lease.release()
    with pytest.raises(InvalidRequestError, match="unknown experts"):
        m.pinned_key({"nope": 1.0})
    assert m.pinned_key({"add": 1, "sort": 3}).as_dict() == {"add": 1.0, "sort": 3.0}  # as given
    await m.close()


def test_another_mergeserve_version_builds_its_own_derived_artifacts(
    experts_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mergeserve.runtime.expert_set as es

    experts = ExpertSet.from_dir(experts_root)
    cache = tmp_path / "cache"
    now = static_merge(experts, "ties", STATIC_DEFAULTS["ties"], 8, cache)
    assert static_merge(experts, "ties", STATIC_DEFAULTS["ties"], 8, cache).path == now.path
    monkeypatch.setattr(es, "__version__", "99.0.0")  # a release that may compute it anew
    later = static_merge(experts, "ties", STATIC_DEFAULTS["ties"], 8, cache)
    assert later.path != now.path
    assert len(list((cache / "derived").iterdir())) == 2
