"""End to end: the real server on real vLLM, through the official openai client."""

from __future__ import annotations

import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import RealServer

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]

PROMPT = [{"role": "user", "content": "What is the capital of France?"}]


def metric_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus exposition: (name, sorted labels) -> value."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def _greedy(server: RealServer, model: str, max_tokens: int = 12) -> str:
    r = server.client.chat.completions.create(
        model=model, messages=PROMPT, temperature=0, max_tokens=max_tokens
    )
    return r.choices[0].message.content or ""


def test_models_list(real_server: RealServer) -> None:
    ids = [m.id for m in real_server.client.models.list().data]
    assert ids == [
        "base",
        "expert:pair",
        "expert:rand",
        "expert:rand2",
        "expert:refolded",
        "static:linear",
        "static:task_arithmetic",
        "dynamic:twin",
        "dynamic:exact",
        "dynamic",
        "route:top1",
    ]


def test_non_stream(real_server: RealServer) -> None:
    r = real_server.client.chat.completions.create(
        model="base", messages=PROMPT, temperature=0, max_tokens=12
    )
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert r.usage is not None
    assert r.usage.prompt_tokens > 5
    assert 1 <= r.usage.completion_tokens <= 12


def test_stream_equals_non_stream_under_greedy(real_server: RealServer) -> None:
    stream = real_server.client.chat.completions.create(
        model="base",
        messages=PROMPT,
        temperature=0,
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len([c for c in chunks if c.choices]) > 2  # really streamed, not one blob
    assert text == _greedy(real_server, "base")
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens >= 1


def test_expert_lora_changes_greedy_output(real_server: RealServer) -> None:
    base = _greedy(real_server, "base", 16)
    expert = _greedy(real_server, "expert:rand", 16)
    assert expert != base
    # Deterministic under greedy decoding, and base is unaffected by the adapter's use.
    assert _greedy(real_server, "expert:rand", 16) == expert
    assert _greedy(real_server, "base", 16) == base


def test_adapters_written_by_mergeserve_merge_load_in_vllm(real_server: RealServer) -> None:
    # `refolded` is `rand` re-saved with its scaling folded into B: the same delta, so the
    # same greedy text. `pair` is a merge of two experts truncated to rank 8: it must load
    # and change the output.
    assert _greedy(real_server, "expert:refolded", 16) == _greedy(real_server, "expert:rand", 16)
    pair = _greedy(real_server, "expert:pair", 16)
    assert pair != _greedy(real_server, "base", 16)
    assert _greedy(real_server, "expert:pair", 16) == pair


def test_unknown_model_is_404(real_server: RealServer) -> None:
    with pytest.raises(openai.NotFoundError) as e:
        real_server.client.chat.completions.create(model="expert:nope", messages=PROMPT)
    assert isinstance(e.value.body, dict)
    assert e.value.body["code"] == "model_not_found"


def test_metrics_include_ours_and_vllms(real_server: RealServer) -> None:
    _greedy(real_server, "base", 2)
    text = httpx.get(f"{real_server.base_url}/metrics").text
    assert 'mergeserve_requests_total{arm="base",status="ok"}' in text
    assert "vllm:" not in text  # apart, so that /metrics passes promtool's lint
    engine = httpx.get(f"{real_server.base_url}/metrics/engine").text
    assert "vllm:generation_tokens_total" in engine
    assert "mergeserve_" not in engine


def test_embedded_model_is_smollm2(real_server: RealServer) -> None:
    if real_server.name != "smollm2":
        pytest.skip("only the embedded model knows capitals")
    assert "Paris" in _greedy(real_server, "base", 20)
    print(f"\nsmollm2 server start-up: {real_server.process.startup_s:.1f} s")


def _gauges(server: RealServer) -> tuple[float, float]:
    """(vLLM's running requests, mergeserve's in-flight requests), summed over labels."""
    engine = metric_samples(httpx.get(f"{server.base_url}/metrics/engine").text)
    ours = metric_samples(httpx.get(f"{server.base_url}/metrics").text)
    running = sum(v for (n, _), v in engine.items() if n == "vllm:num_requests_running")
    return running, sum(v for (n, _), v in ours.items() if n == "mergeserve_requests_in_flight")


def test_client_disconnect_mid_stream_frees_the_engine_request(real_server: RealServer) -> None:
    if real_server.name != "smollm2":
        pytest.skip("the tiny llama writes 900 tokens before a client can hang up")
    payload = {
        "model": "expert:rand",
        "messages": PROMPT,
        "stream": True,
        "max_tokens": 900,
        "ignore_eos": True,  # would run ~900 tokens if the disconnect did not abort it
        "temperature": 0,
    }
    url = f"{real_server.base_url}/v1/chat/completions"
    with httpx.stream("POST", url, json=payload, timeout=60) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        for _ in range(4):  # the role chunk and three tokens
            assert next(lines).startswith("data: ")
            assert next(lines) == ""
        assert _gauges(real_server) == (1, 1)  # generating while the client goes away
    # Leaving the block closes the connection (closing the line iterator would too).
    deadline = time.monotonic() + 30
    while _gauges(real_server) != (0, 0) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _gauges(real_server) == (0, 0)
    ours = metric_samples(httpx.get(f"{real_server.base_url}/metrics").text)
    assert ours[("mergeserve_requests_total", (("arm", "expert:rand"), ("status", "aborted")))] >= 1
    # The engine is free: a request after the abort runs at once.
    assert _greedy(real_server, "base", 2)
