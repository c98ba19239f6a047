"""Dynamic arms served by the in-engine mixture (an engine that supports it): one bundle
adapter per expert-set version, pinned, each request carrying its own weights; hot-add
makes a new bundle while requests on the old one finish on it; the materializing path
remains when the engine cannot mix or the setting is off."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from mergeserve.config import Settings
from mergeserve.runtime.engine import FakeEngine
from mergeserve.runtime.mixture import MixtureSpec
from tests.conftest import write_fake_lora_dir
from tests.integration.conftest import Served, metric_samples, serve
from tests.integration.test_admin import AUTH, GAMMA_PROMPTS, admin_settings

SUM = [{"role": "user", "content": "What is 25 plus 17?"}]
__all__ = ["admin_settings"]  # the admin API fixture, shared with test_admin


def merge_of(obj: Any) -> dict[str, Any]:
    m = (obj.model_extra or {}).get("merge")
    assert isinstance(m, dict), f"no merge object in {obj}"
    return m


@pytest.fixture
async def mixed(admin_settings: Settings) -> AsyncIterator[Served]:
    async for s in serve(admin_settings, FakeEngine(context_len=256, mixture=True)):
        yield s


async def pinned(s: Served) -> list[str]:
    """The adapters the engine holds pinned, once the pins caught up with every change
    (they are made in the background: runtime/pinning.py)."""
    dyn = s.app.state.mergeserve.live.dynamic
    if dyn is not None:
        await dyn.pins.settled()
    return s.engine.pinned


async def add_gamma_and_ask_it(s: Served, settings: Settings) -> dict[str, Any]:
    """Hot-add the expert `gamma`, then ask `dynamic` with it weighted alone: that reply's
    merge object."""
    root = settings.admin.allowed_roots[0]
    write_fake_lora_dir(root / "gamma", examples=GAMMA_PROMPTS)
    r = await s.http.post(
        "/admin/experts", headers=AUTH, json={"name": "gamma", "path": str(root / "gamma")}
    )
    assert r.status_code == 201, r.text
    return merge_of(
        await s.client.chat.completions.create(
            model="dynamic", messages=SUM, extra_body={"merge_weights": {"gamma": 1.0}}
        )
    )


def expected_spec(weights: dict[str, float], names: list[str], ranks: list[int]) -> MixtureSpec:
    return MixtureSpec(tuple(ranks), tuple(weights.get(n, 0.0) for n in names))


async def test_every_weighting_shares_one_pinned_bundle(mixed: Served) -> None:
    engine = mixed.engine
    pins = [{"alpha": 0.7, "beta": 0.3}, {"alpha": 0.25, "beta": 0.75}, {"beta": 1.0}]
    merges = []
    for w in pins:
        r = await mixed.client.chat.completions.create(
            model="dynamic:exact", messages=SUM, extra_body={"merge_weights": w}
        )
        merges.append(merge_of(r))
    assert all(m["mixture"] is True for m in merges)
    assert len({m["adapter_id"] for m in merges}) == 1  # one bundle for all three
    bundle = f"dynamic-{merges[0]['adapter_id']}"
    assert engine.loras_seen == [bundle] * 3
    assert await pinned(mixed) == [bundle]
    # The bundle's blocks are the experts in name order (alpha rank 8, beta rank 4); each
    # request's spec carries its own weights over them.
    assert engine.mixtures_seen == [expected_spec(w, ["alpha", "beta"], [8, 4]) for w in pins]
    assert [m["rank"] for m in merges] == [12, 12, 4]  # the rank of the equivalent merge
    # Routed requests ride on the same bundle.
    routed = merge_of(await mixed.client.chat.completions.create(model="dynamic", messages=SUM))
    assert routed["routed"] is True
    assert routed["adapter_id"] == merges[0]["adapter_id"]
    assert engine.mixtures_seen[-1].weights[0] == pytest.approx(routed["weights"]["alpha"])


async def test_twin_bundle_starts_with_the_shared_block_at_weight_one(mixed: Served) -> None:
    r = await mixed.client.chat.completions.create(
        model="dynamic:twin",
        messages=SUM,
        extra_body={"merge_weights": {"alpha": 0.4, "beta": 0.6}},
    )
    m = merge_of(r)
    assert m["mixture"] is True
    spec = mixed.engine.mixtures_seen[-1]
    assert m["weights"] == {"alpha": 0.4, "beta": 0.6}
    assert spec.weights == pytest.approx((1.0, 0.4, 0.6))  # S, alpha, beta (float32)
    # Pinned beside the exact bundle, which the start-up self-check pinned.
    assert await pinned(mixed) == [
        mixed.engine.mixtures_checked[0][0],
        f"dynamic-{m['adapter_id']}",
    ]


async def test_hot_add_makes_a_new_bundle_and_unpins_the_old_when_drained(
    mixed: Served, admin_settings: Settings
) -> None:
    engine = mixed.engine
    first = merge_of(await mixed.client.chat.completions.create(model="dynamic", messages=SUM))
    old = f"dynamic-{first['adapter_id']}"
    assert await pinned(mixed) == [old]
    # A request on the old bundle stays in flight across the hot-add (a long reply).
    engine.token_delay_s = 0.02
    engine.reply_fn = lambda lora, msg: "x" * 200 if msg.startswith("SLOW") else "ok"
    slow = asyncio.create_task(
        mixed.client.chat.completions.create(
            model="dynamic",
            messages=[{"role": "user", "content": "SLOW: what is 25 plus 17?"}],
            max_tokens=200,
        )
    )
    await asyncio.sleep(0.3)
    new = await add_gamma_and_ask_it(mixed, admin_settings)
    assert new["adapter_id"] != first["adapter_id"]
    assert engine.mixtures_seen[-1].weights == (0.0, 0.0, 1.0)  # alpha, beta, gamma
    # The old bundle is still held by the slow request: pinned beside the new one.
    assert f"dynamic-{new['adapter_id']}" in await pinned(mixed)
    assert old in await pinned(mixed)
    assert not slow.done()
    done = merge_of(await slow)
    assert done["adapter_id"] == first["adapter_id"]  # it finished on the old bundle
    await mixed.client.chat.completions.create(model="dynamic", messages=SUM)
    assert await pinned(mixed) == [f"dynamic-{new['adapter_id']}"]


async def test_a_new_bundles_first_request_does_not_wait_for_its_pin(
    mixed: Served, admin_settings: Settings
) -> None:
    # Under load a pin waits for the engine's current step (1.2-1.8 s on 2 cores, with
    # vLLM): the first request of a hot-added expert goes to its bundle unpinned (the
    # engine loads it on demand) and the pin follows in the background.
    await mixed.client.chat.completions.create(model="dynamic", messages=SUM)
    mixed.engine.pin_delay_s = 2.0
    new = await add_gamma_and_ask_it(mixed, admin_settings)
    bundle = f"dynamic-{new['adapter_id']}"
    assert mixed.engine.loras_seen[-1] == bundle  # served by the new bundle
    assert bundle not in mixed.engine.pinned  # answered while its pin was still running
    assert bundle in await pinned(mixed)


async def test_an_engine_without_mixtures_materializes(settings: Settings) -> None:
    async for s in serve(settings, FakeEngine(context_len=256, mixture=False)):
        r = await s.client.chat.completions.create(
            model="dynamic:exact", messages=SUM, extra_body={"merge_weights": {"alpha": 0.6}}
        )
        assert merge_of(r)["mixture"] is False
        assert s.engine.mixtures_seen == []
        assert await pinned(s) == []


async def test_the_setting_turns_the_mixture_off(settings: Settings) -> None:
    off = settings.model_copy(
        update={"engine": settings.engine.model_copy(update={"mixture": False})}
    )
    async for s in serve(off, FakeEngine(context_len=256, mixture=True)):
        r = await s.client.chat.completions.create(model="dynamic", messages=SUM)
        assert merge_of(r)["mixture"] is False
        assert s.engine.mixtures_seen == []


async def test_a_bundle_above_the_mixture_rank_falls_back(settings: Settings) -> None:
    small = settings.model_copy(
        update={
            "engine": settings.engine.model_copy(update={"max_lora_rank": 8, "mixture_max_rank": 8})
        }
    )
    async for s in serve(small, FakeEngine(context_len=256, mixture=True)):
        # exact: alpha (8) + beta (4) = 12 > 8: materialized (and truncated to 8).
        r = await s.client.chat.completions.create(
            model="dynamic:exact",
            messages=SUM,
            extra_body={"merge_weights": {"alpha": 0.5, "beta": 0.5}},
        )
        m = merge_of(r)
        assert (m["mixture"], m["truncated"], m["rank"]) == (False, True, 8)


async def test_few_slots_are_not_pinned_away(settings: Settings) -> None:
    # Two slots: pinning a bundle per mode would leave experts and static merges none.
    two = settings.model_copy(
        update={"engine": settings.engine.model_copy(update={"max_loras": 2})}
    )
    async for s in serve(two, FakeEngine(context_len=256, mixture=True)):
        for model in ("dynamic:exact", "dynamic:twin"):
            r = await s.client.chat.completions.create(model=model, messages=SUM)
            assert merge_of(r)["mixture"] is True
        assert await pinned(s) == []


# ------------------------------------------------------------------ start-up self-check


async def test_the_mixture_is_served_only_after_its_self_check(mixed: Served) -> None:
    engine = mixed.engine
    [(bundle, spec, reference)] = engine.mixtures_checked  # once, at start-up
    assert spec.weights == (0.5, 0.0)  # the first expert at 0.5: not the unscaled bundle
    assert reference != bundle  # the materialized merge of the same weights
    cards = {m["id"]: m for m in (await mixed.http.get("/v1/models")).json()["data"]}
    assert cards["dynamic:exact"]["serving"] == "mixture"
    assert cards["dynamic:twin"]["serving"] == "mixture"
    assert cards["dynamic:exact"]["serving_note"] is None
    assert "serving" not in cards["base"] or cards["base"]["serving"] is None
    text = (await mixed.http.get("/metrics")).text
    assert metric_samples(text, "mergeserve_mixture_active") == {(): 1.0}
    r = await mixed.client.chat.completions.create(
        model="dynamic:exact",
        messages=SUM,
        extra_body={"merge_weights": {"alpha": 1, "beta": 1}},  # both skills, full strength
    )
    assert merge_of(r)["weights"] == {"alpha": 1.0, "beta": 1.0}
    assert engine.mixtures_seen[-1].weights == (1.0, 1.0)


async def test_a_failed_self_check_serves_by_materializing_and_says_so(
    admin_settings: Settings,
) -> None:
    engine = FakeEngine(context_len=256, mixture=True, mixture_live=False)
    async for s in serve(admin_settings, engine):
        assert len(engine.mixtures_checked) == 1
        cards = {m["id"]: m for m in (await s.http.get("/v1/models")).json()["data"]}
        for mode in ("exact", "twin"):
            assert cards[f"dynamic:{mode}"]["serving"] == "materialized"
            assert "not live" in cards[f"dynamic:{mode}"]["serving_note"]
        text = (await s.http.get("/metrics")).text
        assert metric_samples(text, "mergeserve_mixture_active") == {(): 0.0}
        seen = len(engine.mixtures_seen)
        r = await s.client.chat.completions.create(
            model="dynamic:exact",
            messages=SUM,
            extra_body={"merge_weights": {"alpha": 0.4, "beta": 0.6}},
        )
        m = merge_of(r)
        assert m["mixture"] is False  # never the bundle unscaled: its own merged adapter
        assert len(engine.mixtures_seen) == seen
        assert engine.loras_seen[-1] == f"dynamic-{m['adapter_id']}"
        assert await pinned(s) == []  # the probe's bundle was released, nothing kept pinned
