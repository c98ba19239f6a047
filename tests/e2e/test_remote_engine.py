"""mergeserve in front of a real `vllm serve` (RemoteVllmEngine), both on loopback.

vLLM's own OpenAI server runs the tiny llama with runtime LoRA loading on; mergeserve
serves the same model dir with `MERGESERVE_ENGINE__KIND=remote` and registers every adapter
it serves (experts, static merges, per-request merges) on it by path. That server does not
load mergeserve's plugin, so the dynamic arms materialize each merge; a second pair, whose
vLLM loads the plugin (MERGESERVE_MIXTURE_PLUGIN=1), serves them by the mixture over the
wire (one bundle adapter, each request's weights as `vllm_xargs`), and must answer as the
first pair's materialized merges.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from mergeserve.runtime.mixture import MixtureSpec
from mergeserve.testing import (
    ServerProcess,
    server_process,
    vllm_server_process,
)
from tests.e2e.conftest import ENGINE_ENV, tiny_llama_and_two_experts, vllm_lora_args

pytestmark = pytest.mark.vllm

VLLM_NAME = "tiny-remote"


@dataclass
class Stack:
    vllm: ServerProcess
    mergeserve: ServerProcess
    ours: openai.OpenAI
    theirs: openai.OpenAI
    experts: Path
    merged: Path
    base: Path
    vllm_args: list[str]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("remote")
    base, experts = tiny_llama_and_two_experts(tmp)
    # The server's window (512) is below mergeserve's own setting (1024): it must win.
    vllm_args = vllm_lora_args(VLLM_NAME, max_loras=2)
    merged = tmp / "shared" / "merged"
    # A plain vLLM server in this environment loads the mergeserve plugin too; eager, as
    # the other e2e servers (see ENGINE_ENV).
    eager = {"MERGESERVE_LORA_COMPILE": "0"}
    with vllm_server_process(base, tmp / "vllm.log", vllm_args, eager) as v:
        env = ENGINE_ENV | {
            "MERGESERVE_ENGINE__KIND": "remote",
            "MERGESERVE_ENGINE__REMOTE__URL": v.base_url,
            "MERGESERVE_MERGE__CACHE_DIR": str(merged),
            "MERGESERVE_CACHE": str(tmp / "cache"),
        }
        args = ["--model", str(base), "--experts-dir", str(experts)]
        with server_process(args, tmp / "mergeserve.log", env) as m:
            yield Stack(
                v,
                m,
                openai.OpenAI(base_url=f"{m.base_url}/v1", api_key="-", max_retries=0),
                openai.OpenAI(base_url=f"{v.base_url}/v1", api_key="-", max_retries=0),
                experts,
                merged,
                base,
                vllm_args,
            )


@pytest.fixture(scope="module")
def plugged(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The same model and experts behind a vLLM server that loads mergeserve's plugin."""
    tmp = tmp_path_factory.mktemp("remote-plugin")
    merged = tmp / "shared" / "merged"
    on = {"MERGESERVE_LORA_COMPILE": "0", "MERGESERVE_MIXTURE_PLUGIN": "1"}
    with vllm_server_process(stack.base, tmp / "vllm.log", stack.vllm_args, on) as v:
        env = ENGINE_ENV | {
            "MERGESERVE_ENGINE__KIND": "remote",
            "MERGESERVE_ENGINE__REMOTE__URL": v.base_url,
            "MERGESERVE_MERGE__CACHE_DIR": str(merged),
            "MERGESERVE_CACHE": str(tmp / "cache"),
        }
        args = ["--model", str(stack.base), "--experts-dir", str(stack.experts)]
        with server_process(args, tmp / "mergeserve.log", env) as m:
            yield Stack(
                v,
                m,
                openai.OpenAI(base_url=f"{m.base_url}/v1", api_key="-", max_retries=0),
                openai.OpenAI(base_url=f"{v.base_url}/v1", api_key="-", max_retries=0),
                stack.experts,
                merged,
                stack.base,
                stack.vllm_args,
            )


def chat(client: openai.OpenAI, model: str, content: str, **kw: Any) -> Any:
    return client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": content}],
        temperature=0,
        max_tokens=12,
        **kw,
    )


def registered(stack: Stack) -> dict[str, str]:
    """The adapters registered on the vLLM server: name -> path."""
    models = httpx.get(f"{stack.vllm.base_url}/v1/models", timeout=10).json()["data"]
    return {m["id"]: m["root"] for m in models if m["id"] != VLLM_NAME}


def test_base_answers_as_vllm_itself(stack: Stack) -> None:
    """Same greedy text and token counts as asking vLLM directly: the chat template is
    rendered and tokenized alike on both ends."""
    prompt = "Tell me a story about a dragon."
    ours = chat(stack.ours, "base", prompt)
    theirs = chat(stack.theirs, VLLM_NAME, prompt)
    assert ours.choices[0].message.content == theirs.choices[0].message.content
    assert ours.usage.prompt_tokens == theirs.usage.prompt_tokens
    assert ours.usage.completion_tokens == theirs.usage.completion_tokens
    assert ours.choices[0].finish_reason == theirs.choices[0].finish_reason


def test_expert_is_registered_by_path_and_applied(stack: Stack) -> None:
    prompt = "Write a short poem about the sea."
    base = chat(stack.ours, "base", prompt).choices[0].message.content
    ours = chat(stack.ours, "expert:rand", prompt).choices[0].message.content
    assert ours != base
    names = [n for n, root in registered(stack).items() if root == str(stack.experts / "rand")]
    assert len(names) == 1, registered(stack)
    theirs = chat(stack.theirs, names[0], prompt).choices[0].message.content
    assert ours == theirs


def test_dynamic_merge_is_written_to_the_shared_dir_and_served(stack: Stack) -> None:
    prompt = "Add 30 and 45."
    r = chat(stack.ours, "dynamic:exact", prompt, extra_body={"merge_weights": {"rand2": 1}})
    merge = r.model_extra["merge"]
    assert merge["weights"] == {"rand2": 1.0}
    roots = registered(stack).values()
    merged = [p for p in roots if Path(p).is_relative_to(stack.merged)]
    assert merged, roots
    # rand2 alone at weight 1 is rand2: the same greedy text as expert:rand2.
    alone = chat(stack.ours, "expert:rand2", prompt).choices[0].message.content
    assert r.choices[0].message.content == alone
    routed = chat(stack.ours, "dynamic", "Add 12 and 7.")
    assert routed.model_extra["merge"]["routed"] is True


def serving(s: Stack) -> tuple[bool, dict[str, Any]]:
    """/ready's mixture flag and the `dynamic:exact` card of /v1/models."""
    health = httpx.get(f"{s.mergeserve.base_url}/ready", timeout=10).json()
    cards = httpx.get(f"{s.mergeserve.base_url}/v1/models", timeout=10).json()["data"]
    return health["mixture"], next(c for c in cards if c["id"] == "dynamic:exact")


def test_without_the_plugin_the_server_fails_the_self_check_and_merges_materialize(
    stack: Stack,
) -> None:
    mixture, card = serving(stack)
    assert mixture is False
    assert card["serving"] == "materialized"
    assert "unscaled bundle" in card["serving_note"] or "not live" in card["serving_note"]


WEIGHTINGS = [{"rand": 0.6, "rand2": 0.9}, {"rand": 1.0, "rand2": 0.3}, {"rand2": 1.0}]


def test_with_the_plugin_dynamic_requests_are_the_mixture_over_the_wire(
    stack: Stack, plugged: Stack
) -> None:
    mixture, card = serving(plugged)
    assert mixture is True, card
    assert card["serving"] == "mixture"

    def merged_registered(s: Stack) -> int:
        return sum(Path(p).is_relative_to(s.merged) for p in registered(s).values())

    before = merged_registered(plugged)
    prompt = "Add 30 and 45."
    texts = []
    for w in WEIGHTINGS:
        kw: dict[str, Any] = {"extra_body": {"merge_weights": w}}
        mix = chat(plugged.ours, "dynamic:exact", prompt, **kw)
        ref = chat(stack.ours, "dynamic:exact", prompt, **kw)  # each merge materialized
        assert mix.model_extra["merge"]["weights"] == ref.model_extra["merge"]["weights"]
        assert mix.choices[0].message.content == ref.choices[0].message.content, w
        assert mix.usage.completion_tokens == ref.usage.completion_tokens
        texts.append(mix.choices[0].message.content)
    assert len(set(texts)) > 1  # the weightings reached the server: not one answer for all
    # One bundle served all three weightings: no adapter was registered per merge.
    assert merged_registered(plugged) == before


def test_stream_equals_non_stream_with_usage(stack: Stack) -> None:
    prompt = "Put 8, 1, 4 in ascending order."
    whole = chat(stack.ours, "expert:rand", prompt)
    parts, usage = [], None
    for chunk in chat(
        stack.ours, "expert:rand", prompt, stream=True, stream_options={"include_usage": True}
    ):
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
        if chunk.usage is not None:
            usage = chunk.usage
    assert "".join(parts) == whole.choices[0].message.content
    assert usage is not None
    assert usage.completion_tokens == whole.usage.completion_tokens


def test_the_servers_context_window_bounds_requests(stack: Stack) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        stack.ours.chat.completions.create(
            model="base", messages=[{"role": "user", "content": "hi"}], max_tokens=600
        )
    assert "512" in e.value.message
    ok = stack.ours.chat.completions.create(
        model="base", messages=[{"role": "user", "content": "hi"}], max_tokens=4
    )
    assert ok.usage.completion_tokens == 4


async def test_the_plugin_probe_tells_the_two_servers_apart(stack: Stack, plugged: Stack) -> None:
    """What a server taken in after the self-check must pass (RemoteVllmEngine._has_plugin):
    vLLM's front end with the plugin refuses a mixture without an adapter; without it, the
    `vllm_xargs` are ignored and the request answered."""
    from mergeserve.config import RemoteSettings
    from mergeserve.runtime.engine.remote import RemoteVllmEngine

    found = {}
    for name, s in (("plain", stack), ("plugged", plugged)):
        settings = RemoteSettings(url=s.vllm.base_url)
        e = RemoteVllmEngine.start(s.base, settings)
        (ep,) = e._endpoints.values()
        found[name] = await e._has_plugin(ep)
        await e.shutdown()
    assert found == {"plain": False, "plugged": True}
    # The refusal is vLLM's client error, with the plugin's reason (not a bare 500).
    body = {
        "model": VLLM_NAME,
        "prompt": [0],
        "max_tokens": 1,
        "vllm_xargs": MixtureSpec((1,), (1.0,)).extra_args(),
    }
    async with httpx.AsyncClient(timeout=60) as client:
        r = await client.post(f"{plugged.vllm.base_url}/v1/completions", json=body)
    assert r.status_code == 400, r.text
    assert "names none" in r.json()["error"]["message"]


def test_a_stopped_server_is_503_not_a_hang(stack: Stack) -> None:
    """Last in the module: stops vLLM, then mergeserve must say it is unavailable."""
    os.kill(stack.vllm.pid, signal.SIGINT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if httpx.get(f"{stack.mergeserve.base_url}/health", timeout=10).status_code == 503:
            break
        time.sleep(0.5)
    health = httpx.get(f"{stack.mergeserve.base_url}/health", timeout=10)
    assert health.status_code == 503
    assert "unreachable" in health.json()["error"]["message"]
    with pytest.raises(openai.InternalServerError) as e:
        chat(stack.ours, "base", "hi")
    assert e.value.status_code == 503
