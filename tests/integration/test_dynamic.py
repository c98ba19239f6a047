"""Dynamic and static arms through the real app and the official openai client (FakeEngine,
real MiniLM prototype router, real merges on disk)."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Any

import openai
import pytest

from mergeserve.config import Settings
from mergeserve.errors import ConfigurationError
from mergeserve.runtime.engine import FakeEngine
from mergeserve.server.state import AppState
from tests.conftest import write_fake_lora_dir
from tests.integration.conftest import Served, metric_samples, serve

SUM = [{"role": "user", "content": "What is 25 plus 17?"}]
CAPITAL = [{"role": "user", "content": "What is the capital of Chile?"}]


def state(s: Served) -> AppState:
    st: AppState = s.app.state.mergeserve
    return st


def merge_of(obj: Any) -> dict[str, Any]:
    """The `merge` extension object of an openai response or chunk."""
    m = (obj.model_extra or {}).get("merge")
    assert isinstance(m, dict), f"no merge object in {obj}"
    return m


async def test_dynamic_routes_merges_and_reports_it(served: Served) -> None:
    raw = await served.client.chat.completions.with_raw_response.create(
        model="dynamic", messages=SUM
    )
    assert raw.headers["x-mergeserve-arm"] == "dynamic:exact"
    r = raw.parse()
    m = merge_of(r)
    assert m["arm"] == "dynamic:exact"
    assert m["routed"] is True
    assert max(m["weights"], key=m["weights"].get) == "alpha"
    assert abs(sum(m["weights"].values()) - 1) < 1e-9
    assert m["cache"] == "miss"
    assert m["truncated"] is False
    assert r.model == "dynamic"
    # The engine got the merged adapter, by its id.
    assert served.engine.loras_seen == [f"dynamic-{m['adapter_id']}"]
    assert r.choices[0].message.content.startswith(f"[dynamic-{m['adapter_id']}]")
    again = merge_of(await served.client.chat.completions.create(model="dynamic", messages=SUM))
    assert (again["cache"], again["adapter_id"]) == ("hit", m["adapter_id"])
    cap = merge_of(
        await served.client.chat.completions.create(model="dynamic:twin", messages=CAPITAL)
    )
    assert cap["arm"] == "dynamic:twin"
    assert max(cap["weights"], key=cap["weights"].get) == "beta"
    assert cap["adapter_id"] != m["adapter_id"]


GENERAL = [{"role": "user", "content": "Write a haiku about autumn leaves."}]


@pytest.mark.parametrize("model", ["dynamic:exact", "dynamic:twin", "route:top1"])
async def test_a_request_of_no_expert_is_served_by_the_base_model(
    served: Served, model: str
) -> None:
    """Open-world routing: a request far from every expert's examples is routed to none
    and generated with no adapter at all (twin: S scaled by the in-domain mass, 0)."""
    r = await served.client.chat.completions.create(model=model, messages=GENERAL)
    m = merge_of(r)
    assert (m["route"], m["weights"], m["adapter_id"]) == ("none", {}, None)
    assert m["routed"] is True
    assert m["in_domain"] < 0.5
    assert served.engine.loras_seen == []  # no adapter reached the engine
    assert r.choices[0].message.content.startswith("[base]")
    base = await served.client.chat.completions.create(model="base", messages=GENERAL)
    assert r.choices[0].message.content == base.choices[0].message.content
    assert state(served).dynamic.cache.stats().entries == 0  # type: ignore[union-attr]
    text = (await served.http.get("/metrics")).text
    outcomes = metric_samples(text, "mergeserve_routing_outcomes_total")
    assert outcomes[(("arm", model), ("outcome", "none"))] == 1


async def test_twin_keeps_the_shared_adapter_outside_the_experts_when_asked(
    settings: Settings,
) -> None:
    settings.merge.twin_none = "shared"
    async for s in serve(settings, FakeEngine()):
        m = merge_of(await s.client.chat.completions.create(model="dynamic:twin", messages=GENERAL))
        # Routed to none, but S stays at full weight: a merge of S alone.
        assert (m["route"], m["weights"]) == ("none", {})
        assert m["adapter_id"] is not None
        assert s.engine.loras_seen != []
        exact = merge_of(
            await s.client.chat.completions.create(model="dynamic:exact", messages=GENERAL)
        )
        assert exact["adapter_id"] is None  # exact has no S: the base model


async def test_route_top1_switches_to_the_top_experts_own_adapter(served: Served) -> None:
    r = await served.client.chat.completions.create(model="route:top1", messages=CAPITAL)
    m = merge_of(r)
    assert (m["arm"], m["route"], m["weights"], m["routed"]) == (
        "route:top1",
        "expert",
        {"beta": 1.0},
        True,
    )
    expert = await served.client.chat.completions.create(model="expert:beta", messages=CAPITAL)
    assert merge_of(expert)["adapter_id"] == m["adapter_id"]
    assert r.choices[0].message.content == expert.choices[0].message.content
    assert served.engine.loras_seen == ["expert:beta", "expert:beta"]
    assert state(served).dynamic.cache.stats().entries == 0  # type: ignore[union-attr]
    with pytest.raises(openai.BadRequestError, match="dynamic models only"):
        await served.client.chat.completions.create(
            model="route:top1", messages=CAPITAL, extra_body={"merge_weights": {"beta": 1}}
        )
    text = (await served.http.get("/metrics")).text
    outcomes = metric_samples(text, "mergeserve_routing_outcomes_total")
    assert outcomes[(("arm", "route:top1"), ("outcome", "expert"))] == 1


async def test_streaming_sends_the_merge_object_first(served: Served) -> None:
    stream = await served.client.chat.completions.create(
        model="dynamic:twin", messages=CAPITAL, stream=True
    )
    chunks = [c async for c in stream]
    first = merge_of(chunks[0])
    assert first["arm"] == "dynamic:twin"
    assert first["cache"] in ("hit", "miss")
    assert "beta" in first["weights"]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.startswith(f"[dynamic-{first['adapter_id']}]")
    async with served.http.stream(
        "POST",
        "/v1/chat/completions",
        json={"model": "dynamic", "messages": SUM, "stream": True},
    ) as resp:
        assert resp.headers["x-mergeserve-arm"] == "dynamic:exact"


async def test_pinned_weights(served: Served) -> None:
    r = await served.client.chat.completions.create(
        model="dynamic:exact",
        messages=SUM,
        extra_body={"merge_weights": {"alpha": 1, "beta": 3}},
    )
    m = merge_of(r)
    assert m["weights"] == {"alpha": 1.0, "beta": 3.0}  # as given: not normalized
    assert m["routed"] is False
    assert m["rank"] == 8 + 4
    r = await served.client.chat.completions.create(
        model="dynamic:exact",
        messages=SUM,
        extra_body={"merge_weights": {"alpha": 0.33, "beta": 0.0}},
    )
    assert merge_of(r)["weights"] == {"alpha": pytest.approx(0.35)}  # the routing grid


@pytest.mark.parametrize(
    ("model", "weights", "match"),
    [
        ("expert:alpha", {"alpha": 1}, "dynamic models only"),
        ("dynamic", {"gamma": 1}, "unknown experts"),
        ("dynamic", {"alpha": -1, "beta": 2}, r"in \[0, 10\]"),
        ("dynamic", {"alpha": 1e308, "beta": 1e308}, r"in \[0, 10\]"),
        ("dynamic", {"alpha": 10.5}, r"in \[0, 10\]"),
        ("dynamic", {"alpha": 0}, "positive"),
        ("dynamic", {"alpha": 0.01}, "after rounding to the grid"),
        ("dynamic", {}, "empty"),
    ],
)
async def test_bad_pinned_weights_are_400_and_change_nothing(
    served: Served, model: str, weights: dict[str, float], match: str
) -> None:
    cache = state(served).dynamic.cache  # type: ignore[union-attr]
    before = cache.stats()
    with pytest.raises(openai.BadRequestError, match=match) as e:
        await served.client.chat.completions.create(
            model=model, messages=SUM, extra_body={"merge_weights": weights}
        )
    assert e.value.body["param"] == "merge_weights"  # type: ignore[index]
    assert cache.stats() == before
    assert served.engine.loras_seen == []
    text = (await served.http.get("/metrics")).text
    assert metric_samples(text, "mergeserve_requests_in_flight") == {(): 0.0}


async def test_static_and_expert_arms_carry_a_merge_object(served: Served) -> None:
    for model, weights in (("static:ties", {}), ("expert:beta", {"beta": 1.0})):
        raw = await served.client.chat.completions.with_raw_response.create(
            model=model, messages=SUM
        )
        assert raw.headers["x-mergeserve-arm"] == model
        m = merge_of(raw.parse())
        assert (m["arm"], m["weights"], m["cache"]) == (model, weights, None)
        assert served.engine.loras_seen[-1] == model
    m = merge_of(await served.client.chat.completions.create(model="base", messages=SUM))
    assert (m["arm"], m["adapter_id"]) == ("base", None)


async def test_concurrent_requests_batch_routing_and_build_each_adapter_once(
    served: Served,
) -> None:
    served.engine.token_delay_s = 0.001
    prompts = [SUM, CAPITAL] * 8
    replies = await asyncio.gather(
        *(served.client.chat.completions.create(model="dynamic", messages=p) for p in prompts)
    )
    ids = {merge_of(r)["adapter_id"] for r in replies}
    assert len(ids) == 2  # one merged adapter per key
    stats = state(served).dynamic.cache.stats()  # type: ignore[union-attr]
    assert (stats.builds, stats.misses + stats.hits, stats.pinned) == (2, 16, 0)
    text = (await served.http.get("/metrics")).text
    batches = metric_samples(text, "mergeserve_router_batch_size_count")[()]
    routed = metric_samples(text, "mergeserve_router_batch_size_sum")[()]
    assert routed == 16
    assert batches < 16
    # the router's worker time, at most the waits it caused (each batch is waited on)
    compute = metric_samples(text, "mergeserve_router_compute_seconds_total")[()]
    waited = metric_samples(text, "mergeserve_router_latency_seconds_sum")[()]
    assert 0 < compute <= waited
    assert metric_samples(text, "mergeserve_router_latency_seconds_count")[()] == 16
    merge = metric_samples(text, "mergeserve_merge_latency_seconds_count")
    assert merge[(("cache", "hit"),)] + merge[(("cache", "miss"),)] == 16
    assert metric_samples(text, "mergeserve_materialized_adapters") == {(): 2.0}
    weights = metric_samples(text, "mergeserve_expert_weight_count")
    assert weights[(("expert", "alpha"),)] >= 8
    assert weights[(("expert", "beta"),)] >= 8
    req = metric_samples(text, "mergeserve_requests_total")
    assert req[(("arm", "dynamic:exact"), ("status", "ok"))] == 16
    assert (("arm", "dynamic"), ("status", "ok")) not in req  # the alias counts as its arm
    assert metric_samples(text, "mergeserve_registry_version") == {(): 1.0}
    assert metric_samples(text, "mergeserve_experts") == {(): 2.0}


async def test_a_disconnected_stream_releases_its_adapter(served: Served) -> None:
    served.engine.token_delay_s = 0.05
    async with served.http.stream(
        "POST",
        "/v1/chat/completions",
        json={"model": "dynamic", "messages": SUM, "stream": True},
    ) as resp:
        async for _ in resp.aiter_lines():
            break
    cache = state(served).dynamic.cache  # type: ignore[union-attr]
    for _ in range(200):
        if cache.stats().pinned == 0:
            break
        await asyncio.sleep(0.01)
    assert cache.stats().pinned == 0


async def test_shutdown_removes_the_merged_adapters(served: Served) -> None:
    await served.client.chat.completions.create(model="dynamic", messages=SUM)
    root = state(served).dynamic.cache.root  # type: ignore[union-attr]
    assert any(root.iterdir())
    await state(served).dynamic.close()  # type: ignore[union-attr]
    assert not root.exists()


def require(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"{tool} is missing: `make test` installs Debian's prometheus package")
    return path


async def test_promtool_accepts_the_metrics(served: Served) -> None:
    promtool = require("promtool")
    await served.client.chat.completions.create(model="dynamic", messages=SUM)
    await served.client.chat.completions.create(model="static:linear", messages=SUM)
    text = (await served.http.get("/metrics")).text
    proc = await asyncio.create_subprocess_exec(
        promtool,
        "check",
        "metrics",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate(text.encode())
    assert proc.returncode == 0, out.decode()


async def test_experts_without_examples_fail_start_up_saying_what_to_do(
    tmp_path: Path,
) -> None:
    experts = tmp_path / "experts"
    (write_fake_lora_dir(experts / "plain") / "examples.jsonl").unlink()
    settings = Settings(model=None, experts_dir=experts, cache=tmp_path / "cache")
    with pytest.raises(ConfigurationError, match=r"examples\.jsonl.*KIND=arrow.*DYNAMIC=false"):
        async for _ in serve(settings, FakeEngine()):
            pass
    settings.merge.dynamic = False
    async for s in serve(settings, FakeEngine()):
        ids = [m.id for m in (await s.client.models.list()).data]
        assert "dynamic" not in ids
        assert "static:ties" in ids
