"""End to end on real vLLM with prefix caching on (its default): the in-engine mixture
gives each weighting its own answer whatever other requests sharing the prompt prefix
asked before; the start-up self-check keeps a server whose plugin is not live from ever
serving the bundle unscaled; bundles are pinned and unpinned in a real engine across a
hot-add.

Two servers on one tiny llama and two random experts: `live`, the plugin loaded, with
enough LoRA slots that a bundle is pinned; `stock`, started with `VLLM_PLUGINS=none`
(vLLM loads no plugin, as when an operator allowlists others): its self-check fails and
it serves every dynamic request by materializing the merge — the reference `live` must
agree with, token for token."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from mergeserve.testing import ServerProcess, make_random_lora, make_tiny_llama, server_process
from tests.e2e.conftest import ADMIN_TOKEN, ENGINE_ENV, write_examples

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]

SYSTEM = " ".join(
    f"Rule {i}: answer briefly, politely and only with facts you are sure of." for i in range(18)
)
"""A long shared system message: several of vLLM's 128-token KV blocks."""
USER = "Add 345 and 278."
WEIGHTINGS: list[dict[str, float]] = [
    {"e1": 1.0},
    {"e2": 1.0},
    {"e1": 0.5, "e2": 0.5},
    {"e1": 1.0, "e2": 1.0},  # as given: both at full strength (task arithmetic, λ = 1)
    {"e1": 1.0},
    {"e2": 0.3},
]
MAX_TOKENS = 12


@dataclass
class Pair:
    live: ServerProcess
    stock: ServerProcess
    base: Path
    fresh: Path


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    tmp = tmp_path_factory.mktemp("mixture-kv")
    base = make_tiny_llama(tmp / "base")
    experts = tmp / "experts"
    for name, seed in (("e1", 1), ("e2", 2)):
        make_random_lora(base, experts / name, rank=8, seed=seed)
        write_examples(experts / name, [f"a question for {name}", f"another one for {name}"])
    fresh = make_random_lora(base, tmp / "allowed" / "e3", rank=8, seed=3)
    write_examples(fresh, ["a question for e3"])
    env = ENGINE_ENV | {
        "MERGESERVE_ENGINE__MAX_LORAS": "4",  # pins (4 - 1) // 2 = 1 bundle
        "MERGESERVE_ADMIN__TOKEN": ADMIN_TOKEN,
        "MERGESERVE_ADMIN__ALLOWED_ROOTS": json.dumps([str(tmp / "allowed")]),
        "MERGESERVE_MERGE__STATIC_METHODS": '["linear"]',
    }
    args = ["--model", str(base), "--experts-dir", str(experts)]
    with (
        server_process(
            args,
            tmp / "live.log",
            env | {"MERGESERVE_CACHE": str(tmp / "cache-live")},
        ) as live,
        server_process(
            args,
            tmp / "stock.log",
            env | {"MERGESERVE_CACHE": str(tmp / "cache-stock"), "VLLM_PLUGINS": "none"},
        ) as stock,
    ):
        yield Pair(live, stock, base, fresh)


def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="-", max_retries=0, timeout=120)


def ask(server: ServerProcess, model: str, **extra: Any) -> tuple[str, dict[str, Any]]:
    r = client(server).chat.completions.create(
        model=model,
        messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER}],
        temperature=0,
        max_tokens=MAX_TOKENS,
        extra_body=extra or None,
    )
    assert r.usage is not None
    assert r.usage.prompt_tokens > 3 * 128  # the shared prefix spans full KV blocks
    return r.choices[0].message.content or "", (r.model_extra or {}).get("merge") or {}


def prefix_hits(server: ServerProcess) -> float:
    text = httpx.get(f"{server.base_url}/metrics/engine", timeout=10).text
    m = re.search(r"^vllm:prefix_cache_hits_total(?:\{[^}]*\})? ([0-9.e+]+)$", text, re.M)
    assert m is not None, "vLLM exports its prefix-cache hits"
    return float(m.group(1))


def models(server: ServerProcess) -> dict[str, dict[str, Any]]:
    data = httpx.get(f"{server.base_url}/v1/models", timeout=10).json()["data"]
    return {m["id"]: m for m in data}


def test_the_self_check_keeps_a_server_without_the_plugin_correct(pair: Pair) -> None:
    live, stock = models(pair.live), models(pair.stock)
    assert live["dynamic:exact"]["serving"] == "mixture"
    assert live["dynamic:exact"]["serving_note"] is None
    assert stock["dynamic:exact"]["serving"] == "materialized"
    assert "not live" in stock["dynamic:exact"]["serving_note"]
    log = pair.stock.log.read_text(errors="replace")
    assert "mixture self-check failed" in log
    assert "mixture self-check passed" in pair.live.log.read_text(errors="replace")
    for server, active in ((pair.live, 1.0), (pair.stock, 0.0)):
        text = httpx.get(f"{server.base_url}/metrics", timeout=10).text
        assert f"mergeserve_mixture_active {active}" in text
    _, merge = ask(pair.stock, "dynamic:exact", merge_weights={"e1": 0.5, "e2": 0.5})
    assert merge["mixture"] is False


def test_weightings_sharing_a_prompt_prefix_each_get_their_own_answer(pair: Pair) -> None:
    """Every weighting, asked right after others with the same long system message, is
    token-equal to its own materialized merge (the stock server's), and a weight of 1 on
    one expert to that expert; equal weightings still share the prefix's KV blocks."""
    hits0 = prefix_hits(pair.live)
    answers = []
    for w in WEIGHTINGS:
        got, merge = ask(pair.live, "dynamic:exact", merge_weights=w)
        assert merge["mixture"] is True
        assert merge["weights"] == w
        want, ref = ask(pair.stock, "dynamic:exact", merge_weights=w)
        assert ref["mixture"] is False
        assert got == want, (w, got, want)
        answers.append(got)
    assert len(set(answers)) > 2, "the weightings should matter on this prompt"
    for name in ("e1", "e2"):
        assert (
            ask(pair.live, f"expert:{name}")[0]
            == ask(pair.live, "dynamic:exact", merge_weights={name: 1.0})[0]
        )
    # The repeated weighting (e1 at 1) found its own earlier prefix blocks in the cache.
    assert prefix_hits(pair.live) > hits0


def test_bundles_are_pinned_and_unpinned_in_vllm_across_a_hot_add(pair: Pair) -> None:
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    log = pair.live.log
    before = log.read_text(errors="replace")
    assert re.search(r"pinned the exact bundle (dynamic-\d+)", before)
    r = httpx.post(
        f"{pair.live.base_url}/admin/experts",
        headers=auth,
        json={"name": "e3", "path": str(pair.fresh)},
        timeout=120,
    )
    assert r.status_code == 201, r.text
    got, merge = ask(pair.live, "dynamic:exact", merge_weights={"e3": 1.0})
    assert merge["mixture"] is True
    assert got == ask(pair.live, "expert:e3")[0]  # the new bundle computes e3 exactly
    got2, _ = ask(pair.live, "dynamic:exact", merge_weights={"e1": 0.5, "e3": 0.5})
    assert got2 not in (got, ask(pair.live, "expert:e1")[0])
    after = log.read_text(errors="replace")[len(before) :]
    new = re.findall(r"pinned the exact bundle (dynamic-\d+)", after)
    gone = re.findall(r"unpinned the bundle (dynamic-\d+)", after)
    assert new, after[-3000:]
    assert gone, after[-3000:]  # the old bundle left its slot once nothing held it
    assert new[0] not in gone
    assert "could not pin" not in after
    assert "could not unpin" not in after


def test_more_distinct_adapters_than_free_slots_next_to_a_pinned_bundle(pair: Pair) -> None:
    """vLLM's scheduler does not count a pinned bundle's slot: with 4 slots, 1 pinned,
    four distinct unpinned adapters in one batch made the worker evict one the batch
    used and the engine died (KeyError in convert_mapping). The engine client now keeps
    distinct unpinned adapters in flight within the free slots: every request answers."""
    import asyncio

    async def flood() -> list[str]:
        c = openai.AsyncOpenAI(
            base_url=f"{pair.live.base_url}/v1", api_key="-", max_retries=0, timeout=300
        )
        jobs: list[tuple[str, dict[str, Any] | None]] = [
            ("expert:e1", None),
            ("expert:e2", None),
            ("static:linear", None),
            ("dynamic:exact", {"merge_weights": {"e1": 0.7, "e2": 0.2}}),
            ("dynamic:twin", {"merge_weights": {"e1": 0.4, "e2": 0.9}}),
        ] * 4

        async def one(model: str, extra: dict[str, Any] | None) -> str:
            r = await c.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": USER}],
                temperature=0,
                max_tokens=MAX_TOKENS,
                extra_body=extra,
            )
            return r.choices[0].message.content or ""

        try:
            return await asyncio.gather(*(one(m, e) for m, e in jobs))
        finally:
            await c.close()

    pinned_before = "pinned the" in pair.live.log.read_text(errors="replace")
    replies = asyncio.run(flood())
    assert len(replies) == 20
    assert pinned_before or "pinned the" in pair.live.log.read_text(errors="replace")
    assert httpx.get(f"{pair.live.base_url}/health", timeout=10).status_code == 200
    assert "KeyError" not in pair.live.log.read_text(errors="replace")
