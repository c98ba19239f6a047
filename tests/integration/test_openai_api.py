"""The app against FakeEngine, driven by the official openai client where a user would."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import openai
import pytest

from mergeserve.config import Settings
from mergeserve.runtime.engine import EndpointState, FakeEngine
from mergeserve.server.app import create_app
from tests.integration.conftest import Served, metric_samples, serve, uvicorn_in_thread

USER = [{"role": "user", "content": "hello world"}]


async def test_models_lists_base_and_each_expert(served: Served) -> None:
    models = await served.client.models.list()
    assert [m.id for m in models.data] == [
        "base",
        "expert:alpha",
        "expert:beta",
        "static:dare_ties",
        "static:linear",
        "static:task_arithmetic",
        "static:ties",
        "dynamic:twin",
        "dynamic:exact",
        "dynamic",
        "route:top1",
    ]
    one = await served.client.models.retrieve("expert:beta")
    assert one.id == "expert:beta"


async def test_non_stream_answer_usage_and_arm_header(served: Served) -> None:
    raw = await served.client.chat.completions.with_raw_response.create(
        model="base", messages=USER, temperature=0
    )
    r = raw.parse()
    assert raw.headers["x-mergeserve-arm"] == "base"
    assert r.choices[0].message.content == "[base] dlrow olleh"
    assert r.choices[0].finish_reason == "stop"
    prompt_len = len("<user>: hello world\n<assistant>: ")
    assert r.usage is not None
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (prompt_len, 18)
    assert r.usage.total_tokens == prompt_len + 18


async def test_expert_model_reaches_the_engine_with_its_adapter(served: Served) -> None:
    r = await served.client.chat.completions.create(model="expert:alpha", messages=USER)
    assert r.choices[0].message.content == "[expert:alpha] dlrow olleh"
    assert served.engine.loras_seen == ["expert:alpha"]


async def test_stream_matches_non_stream_and_reports_usage(served: Served) -> None:
    stream = await served.client.chat.completions.create(
        model="expert:beta",
        messages=USER,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [c async for c in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "[expert:beta] dlrow olleh"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop"
    assert finishes.count("stop") == 1
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == len(text)


async def test_max_tokens_and_stop(served: Served) -> None:
    r = await served.client.chat.completions.create(model="base", messages=USER, max_tokens=4)
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == ("[bas", "length")
    assert r.usage is not None
    assert r.usage.completion_tokens == 4
    r = await served.client.chat.completions.create(model="base", messages=USER, stop=["row"])
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == ("[base] dl", "stop")


async def test_unknown_model_is_an_openai_404(served: Served) -> None:
    with pytest.raises(openai.NotFoundError) as e:
        await served.client.chat.completions.create(model="expert:nope", messages=USER)
    body = e.value.body
    assert isinstance(body, dict)
    assert (body["type"], body["code"], body["param"]) == (
        "not_found_error",
        "model_not_found",
        "model",
    )


@pytest.mark.parametrize(
    ("payload", "param"),
    [
        ({"model": "base", "messages": []}, "messages"),
        ({"model": "base"}, "messages"),
        ({"messages": USER}, "model"),
        ({"model": "base", "messages": USER, "temperature": 9}, "temperature"),
        ({"model": "base", "messages": USER, "max_tokens": 0}, "max_tokens"),
        ({"model": "base", "messages": USER, "n": 2}, "n"),
        ({"model": "base", "messages": USER, "tools": []}, "tools"),
        ({"model": "base", "messages": USER, "logprobs": True}, "logprobs"),
        ({"model": "base", "messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
        ({"model": "base", "messages": USER, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"model": 3, "messages": USER}, "model"),
        ({"model": "base", "messages": USER, "seed": 2**64}, "seed"),
        ({"model": "base", "messages": USER, "seed": -(2**63) - 1}, "seed"),
    ],
)
async def test_invalid_requests_are_400_naming_the_param(
    served: Served, payload: dict[str, object], param: str
) -> None:
    r = await served.http.post("/v1/chat/completions", json=payload)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param
    assert err["message"]


async def test_malformed_json_is_400(served: Served) -> None:
    r = await served.http.post(
        "/v1/chat/completions",
        content=b'{"model": "base", "messages": [',
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 400
    assert r.json()["error"]["message"] == "the request body is not valid JSON"


async def test_context_length(served: Served) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        await served.client.chat.completions.create(model="base", messages=USER, max_tokens=250)
    assert isinstance(e.value.body, dict)
    assert e.value.body["code"] == "context_length_exceeded"
    long = [{"role": "user", "content": "x" * 300}]
    with pytest.raises(openai.BadRequestError):
        await served.client.chat.completions.create(model="base", messages=long)
    # With no max_tokens the default is clamped to the room left, not refused.
    r = await served.client.chat.completions.create(
        model="base", messages=[{"role": "user", "content": "y" * 200}]
    )
    assert r.choices[0].finish_reason == "length"
    assert r.usage is not None
    assert r.usage.total_tokens == 256


async def test_metrics_count_requests_tokens_and_errors(served: Served) -> None:
    for _ in range(3):
        await served.client.chat.completions.create(model="base", messages=USER)
    await served.client.chat.completions.create(model="expert:alpha", messages=USER, max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        await served.client.chat.completions.create(model="zzz", messages=USER)
    with pytest.raises(openai.BadRequestError):
        await served.client.chat.completions.create(model="base", messages=USER, max_tokens=999)
    text = (await served.http.get("/metrics")).text
    req = metric_samples(text, "mergeserve_requests_total")
    assert req[(("arm", "base"), ("status", "ok"))] == 3
    assert req[(("arm", "expert:alpha"), ("status", "ok"))] == 1
    assert req[(("arm", "unknown"), ("status", "client_error"))] == 1
    assert req[(("arm", "base"), ("status", "client_error"))] == 1
    tok = metric_samples(text, "mergeserve_tokens_total")
    assert tok[(("arm", "base"), ("kind", "completion"))] == 3 * 18
    assert tok[(("arm", "expert:alpha"), ("kind", "completion"))] == 2
    lat = metric_samples(text, "mergeserve_request_latency_seconds_count")
    assert lat[(("arm", "base"),)] == 3
    assert (
        metric_samples(text, "mergeserve_time_to_first_token_seconds_count")[(("arm", "base"),)]
        == 3
    )
    assert metric_samples(text, "mergeserve_requests_in_flight") == {(): 0.0}


async def test_health(served: Served) -> None:
    assert (await served.http.get("/health")).json()["status"] == "ok"
    served.engine.healthy = False
    r = await served.http.get("/health")
    assert r.status_code == 503
    assert r.json()["error"]["type"] == "service_unavailable_error"


async def test_overload_is_503_and_frees_its_slot(settings: Settings) -> None:
    settings.server.max_pending_requests = 1
    async for s in serve(settings, FakeEngine(context_len=256, token_delay_s=0.02)):
        first = asyncio.create_task(s.client.chat.completions.create(model="base", messages=USER))
        while not s.engine.in_flight:
            await asyncio.sleep(0.005)
        with pytest.raises(openai.InternalServerError) as e:
            await s.client.chat.completions.create(model="base", messages=USER)
        assert e.value.status_code == 503
        assert isinstance(e.value.body, dict)
        assert e.value.body["type"] == "overloaded_error"
        assert (await first).choices[0].message.content == "[base] dlrow olleh"
        # The slot is free again.
        await s.client.chat.completions.create(model="base", messages=USER)


async def test_requests_over_the_concurrency_limit_are_shed_and_the_limit_follows_ttft(
    settings: Settings,
) -> None:
    # Every first token takes 0.2 s, twice the 0.1 s budget.
    settings.server.queue_budget_s = 0.1
    async for s in serve(settings, FakeEngine(context_len=256, token_delay_s=0.2)):
        text = (await s.http.get("/metrics")).text
        assert metric_samples(text, "mergeserve_concurrency_limit") == {(): 4.0}

        async def one(s: Served = s) -> str | None:
            r = await s.client.chat.completions.create(model="base", messages=USER, max_tokens=3)
            return r.choices[0].message.content

        # A cold server admits 4 at once, not the burst; the fifth queues and, with no slot
        # free within the budget, is refused.
        four = [asyncio.create_task(one()) for _ in range(4)]
        while len(s.engine.in_flight) < 4:
            await asyncio.sleep(0.005)
        raw = await s.http.post("/v1/chat/completions", json={"model": "base", "messages": USER})
        assert raw.status_code == 503
        assert raw.json()["error"]["type"] == "overloaded_error"
        assert "budget of 0.1 s" in raw.json()["error"]["message"]
        assert raw.headers["retry-after"] == "1"
        assert await asyncio.gather(*four) == ["[ba"] * 4
        # Their first tokens came after 0.2 s with 4 in flight: the limit is cut once
        # (x0.7), to 2.
        text = (await s.http.get("/metrics")).text
        assert metric_samples(text, "mergeserve_concurrency_limit") == {(): 2.0}
        two = [asyncio.create_task(one()) for _ in range(2)]
        while len(s.engine.in_flight) < 2:
            await asyncio.sleep(0.005)
        with pytest.raises(openai.InternalServerError) as e:
            await s.client.with_options(max_retries=0).chat.completions.create(
                model="base", messages=USER
            )
        assert e.value.status_code == 503
        assert await asyncio.gather(*two) == ["[ba"] * 2
        # Free again: admitted at once, and the books balance.
        assert await one() == "[ba"
        text = (await s.http.get("/metrics")).text
        assert metric_samples(text, "mergeserve_requests_shed_total") == {(): 2.0}
        assert metric_samples(text, "mergeserve_requests_in_flight") == {(): 0.0}
        req = metric_samples(text, "mergeserve_requests_total")
        assert req[(("arm", "base"), ("status", "ok"))] == 7
        assert req[(("arm", "base"), ("status", "server_error"))] == 2


def assert_aborted(engine: FakeEngine, base_url: str, within_s: float) -> None:
    """The engine stops generating within `within_s`, the slot is free again, and the
    request is counted as aborted."""
    deadline = time.monotonic() + within_s
    while engine.in_flight and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not engine.in_flight
    text = httpx.get(f"{base_url}/metrics").text
    assert metric_samples(text, "mergeserve_requests_in_flight") == {(): 0.0}
    req = metric_samples(text, "mergeserve_requests_total")
    assert req[(("arm", "base"), ("status", "aborted"))] == 1


def test_client_disconnect_mid_stream_aborts_the_engine_request(settings: Settings) -> None:
    # A real uvicorn on loopback: the in-process ASGI transport buffers whole responses,
    # so it cannot show what a disconnect does.
    engine = FakeEngine(context_len=256, token_delay_s=0.05)
    with uvicorn_in_thread(create_app(settings, engine)) as base_url:
        payload = {"model": "base", "messages": USER, "stream": True}
        with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=payload) as r:
            lines = (line for line in r.iter_lines() if line.startswith("data: "))
            first = json.loads(next(lines).removeprefix("data: "))
            assert first["choices"][0]["delta"]["role"] == "assistant"
            second = json.loads(next(lines).removeprefix("data: "))
            assert second["choices"][0]["delta"]["content"] == "["
            assert engine.in_flight  # generating, and the client goes away here
        assert_aborted(engine, base_url, within_s=5)


# ------------------------------------------------------------------ limits before work


async def test_ready_says_when_every_model_can_answer(served: Served) -> None:
    body = (await served.http.get("/ready")).json()
    assert body["status"] == "ready"
    assert body["models"] == len((await served.http.get("/v1/models")).json()["data"])
    served.engine.healthy = False
    r = await served.http.get("/ready")
    assert r.status_code == 503
    assert r.json()["error"]["type"] == "service_unavailable_error"


def test_bodies_over_the_limit_are_413_before_they_are_read(settings: Settings) -> None:
    settings.server.max_body_bytes = 4096
    engine = FakeEngine(context_len=256)
    big = json.dumps({"model": "base", "messages": [{"role": "user", "content": "x" * 8000}]})
    with uvicorn_in_thread(create_app(settings, engine)) as base_url:
        declared = httpx.post(
            f"{base_url}/v1/chat/completions",
            content=big,
            headers={"content-type": "application/json"},
        )
        assert declared.status_code == 413
        assert "larger than 4096 bytes" in declared.json()["error"]["message"]

        def chunks() -> object:  # no Content-Length: counted as it arrives
            for i in range(0, len(big), 1000):
                yield big[i : i + 1000].encode()

        chunked = httpx.post(
            f"{base_url}/v1/chat/completions",
            content=chunks(),  # type: ignore[arg-type]
            headers={"content-type": "application/json"},
        )
        assert chunked.status_code == 413, chunked.text
        assert chunked.json()["error"]["type"] == "invalid_request_error"
        assert engine.loras_seen == [] and not engine.in_flight  # noqa: PT018
        small = httpx.post(
            f"{base_url}/v1/chat/completions", json={"model": "base", "messages": USER}
        )
        assert small.status_code == 200
        text = httpx.get(f"{base_url}/metrics").text
        assert metric_samples(text, "mergeserve_requests_in_flight") == {(): 0.0}


async def test_an_overloaded_server_refuses_before_templating(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings.server.max_pending_requests = 1
    engine = FakeEngine(context_len=256, token_delay_s=0.02)
    rendered: list[str] = []
    real = engine.render_chat
    monkeypatch.setattr(engine, "render_chat", lambda msgs: rendered.append("x") or real(msgs))
    async for s in serve(settings, engine):
        first = asyncio.create_task(s.client.chat.completions.create(model="base", messages=USER))
        while not engine.in_flight:
            await asyncio.sleep(0.005)
        assert len(rendered) == 1
        with pytest.raises(openai.InternalServerError) as e:
            await s.client.chat.completions.create(model="base", messages=USER)
        assert e.value.status_code == 503
        assert len(rendered) == 1  # refused before its template and tokenizer ran
        await first
        # A request refused after its admission (too long) gives its slot back.
        with pytest.raises(openai.BadRequestError, match="context window"):
            await s.client.chat.completions.create(
                model="base", messages=[{"role": "user", "content": "y" * 400}]
            )
        text = (await s.http.get("/metrics")).text
        assert metric_samples(text, "mergeserve_requests_in_flight") == {(): 0.0}
        await s.client.chat.completions.create(model="base", messages=USER)


async def test_too_many_messages_are_refused(served: Served) -> None:
    with pytest.raises(openai.BadRequestError, match="messages"):
        await served.client.chat.completions.create(
            model="base", messages=[{"role": "user", "content": "a"}] * 1025
        )


def test_a_non_streamed_request_is_aborted_when_its_client_goes_away(
    settings: Settings,
) -> None:
    engine = FakeEngine(context_len=256, token_delay_s=0.2)  # ~3 s for the whole reply
    with uvicorn_in_thread(create_app(settings, engine)) as base_url:
        with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes
            httpx.post(
                f"{base_url}/v1/chat/completions",
                json={"model": "base", "messages": USER},
                timeout=httpx.Timeout(5.0, read=0.6),
            )
        assert_aborted(engine, base_url, within_s=3)  # before the reply would be done


@pytest.mark.parametrize(("mixture", "want"), [(True, 12), (False, 8)])
async def test_static_merges_are_served_at_their_built_rank_up_to_the_slot_rank(
    settings: Settings, mixture: bool, want: int
) -> None:
    # alpha (rank 8) + beta (rank 4): static:linear is exactly rank 12. With the mixture on
    # the slots are rank 64 whatever max_lora_rank says, so it is served whole; with the
    # mixture off the slots are max_lora_rank (8) and it is cut to fit.
    from mergeserve.adapters.peft_io import read_lora_dir

    settings.engine.max_lora_rank = 8
    settings.engine.mixture = mixture
    settings.merge.background_builds = False
    async for s in serve(settings, FakeEngine(context_len=256)):
        cards = {m["id"]: m for m in (await s.http.get("/v1/models")).json()["data"]}
        assert read_lora_dir(Path(cards["static:linear"]["root"])).rank == want


class FleetEngine(FakeEngine):
    """A FakeEngine that reports servers, as the remote engine does."""

    fleet: list[EndpointState] = []  # noqa: RUF012 (set per test on the instance)

    def endpoints(self) -> list[EndpointState]:
        return list(self.fleet)


async def test_ready_and_metrics_list_the_remote_servers(settings: Settings) -> None:
    engine = FleetEngine(context_len=256)
    engine.fleet = [
        EndpointState("http://vllm-0:8000", True, 2, 3),
        EndpointState("http://vllm-1:8000", False, 0, 0, "unreachable: ConnectError()"),
    ]
    async for s in serve(settings, engine):
        ready = (await s.http.get("/ready")).json()
        assert ready["endpoints"] == [
            {
                "url": "http://vllm-0:8000",
                "up": True,
                "outstanding": 2,
                "adapters": 3,
                "reason": None,
            },
            {
                "url": "http://vllm-1:8000",
                "up": False,
                "outstanding": 0,
                "adapters": 0,
                "reason": "unreachable: ConnectError()",
            },
        ]
        text = (await s.http.get("/metrics")).text
        up = metric_samples(text, "mergeserve_engine_endpoint_up")
        assert up == {
            (("endpoint", "http://vllm-0:8000"),): 1.0,
            (("endpoint", "http://vllm-1:8000"),): 0.0,
        }
        busy = metric_samples(text, "mergeserve_engine_endpoint_requests")
        assert busy[(("endpoint", "http://vllm-0:8000"),)] == 2.0
        engine.fleet = engine.fleet[:1]  # vllm-1 no longer discovered: its series go
        text = (await s.http.get("/metrics")).text
        assert list(metric_samples(text, "mergeserve_engine_endpoint_up")) == [
            (("endpoint", "http://vllm-0:8000"),)
        ]
    # An in-process engine has no servers: /ready says nothing of them.
    async for s in serve(settings, FakeEngine(context_len=256)):
        assert "endpoints" not in (await s.http.get("/ready")).json()
        assert "mergeserve_engine_endpoint_up{" not in (await s.http.get("/metrics")).text
