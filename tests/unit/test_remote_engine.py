"""RemoteVllmEngine's bookkeeping: path mapping, adapter registration and eviction, and the
mapping of the server's refusals. The server here is a scripted httpx transport that keeps
vLLM's adapter table; tests/e2e/test_remote_engine.py runs against a real `vllm serve`."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

from mergeserve.config import RemoteSettings
from mergeserve.errors import (
    ConfigurationError,
    EngineOverloadedError,
    EngineUnavailableError,
    InvalidRequestError,
)
from mergeserve.runtime.engine import GenerationParams, LoRATarget
from mergeserve.runtime.engine.remote import RemoteVllmEngine, remote_error
from mergeserve.runtime.mixture import MixtureSpec


class Tokenizer:
    """The server's and ours alike: one id per character."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [ord(c) for c in text]

    def apply_chat_template(self, messages: list[dict[str, str]], **kw: object) -> str:
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"


class Server:
    """vLLM's adapter table and a completions stream of three tokens; `up` False refuses
    connections, `hang` holds every stream after its first chunk until released."""

    def __init__(self, readable: Path | None = None, plugin: bool = True) -> None:
        self.adapters: dict[str, str] = {}
        self.loads = 0
        self.readable = readable
        self.plugin = plugin
        self.model = "m"
        self.up = True
        self.hang: asyncio.Event | None = None
        self.completions: list[dict[str, object]] = []  # the bodies of /v1/completions
        self.streaming = 0
        self.stale = 0  # requests to drop as a server closing a kept-alive connection does

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if not self.up:
            raise httpx.ConnectError("connection refused", request=request)
        body = json.loads(request.content or b"{}")
        if request.url.path == "/health":
            return httpx.Response(200)
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": self.model, "max_model_len": 64}]})
        if request.url.path == "/tokenize":
            return httpx.Response(200, json={"tokens": Tokenizer().encode(body["prompt"])})
        if request.url.path == "/v1/load_lora_adapter":
            self.loads += 1
            path = body["lora_path"]
            if self.readable is not None and not Path(path).is_relative_to(self.readable):
                return httpx.Response(404, json={"error": {"message": f"{path} not found"}})
            if body["lora_name"] in self.adapters:
                return httpx.Response(400, json={"error": {"message": "already loaded"}})
            self.adapters[body["lora_name"]] = path
            return httpx.Response(200, text="Success")
        if request.url.path == "/v1/unload_lora_adapter":
            del self.adapters[body["lora_name"]]
            return httpx.Response(200, text="Success")
        if request.url.path == "/v1/completions":
            if self.stale:
                self.stale -= 1
                raise httpx.RemoteProtocolError(
                    "Server disconnected without sending a response.", request=request
                )
            self.completions.append(body)
            if self.plugin and "vllm_xargs" in body and body["model"] == "m":
                # vLLM 0.32's completions route: the plugin's refusal is a bare 500
                return httpx.Response(500, json={"error": {"message": ""}})
            if body["model"] not in {"m", *self.adapters}:
                return httpx.Response(404, json={"error": {"message": "no such model"}})
            # A weighting the plugin applies answers as its materialized merge (`ref`).
            adapter = self.adapters.get(str(body["model"]), "")
            mixed = (self.plugin and "vllm_xargs" in body) or adapter.endswith("/ref")
            texts = ("x", "yz") if mixed else ("a", "bc")
            chunks = [
                {"choices": [{"text": t, "finish_reason": f}], "usage": u}
                for t, f, u in [
                    (texts[0], None, {"prompt_tokens": 3, "completion_tokens": 1}),
                    (texts[1], None, {"prompt_tokens": 3, "completion_tokens": 3}),
                    ("", "length", {"prompt_tokens": 3, "completion_tokens": 3}),
                ]
            ]
            lines = [f"data: {json.dumps(c)}\n\n".encode() for c in chunks] + [b"data: [DONE]\n\n"]
            return httpx.Response(200, stream=Stream(self, lines))
        return httpx.Response(404)


class Stream(httpx.AsyncByteStream):
    def __init__(self, server: Server, lines: list[bytes]) -> None:
        self.server, self.lines = server, lines

    async def __aiter__(self) -> AsyncIterator[bytes]:
        self.server.streaming += 1
        try:
            for i, line in enumerate(self.lines):
                if i == 1 and self.server.hang is not None:
                    await self.server.hang.wait()
                yield line
        finally:
            self.server.streaming -= 1


class Fleet(httpx.AsyncBaseTransport):
    """Servers by host name."""

    def __init__(self, **servers: Server) -> None:
        self.servers = servers

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(0)
        return self.servers[request.url.host](request)


def engine(server: Server, **kw: object) -> RemoteVllmEngine:
    return fleet_engine(Fleet(vllm=server), **kw)


def fleet_engine(fleet: Fleet, **kw: object) -> RemoteVllmEngine:
    url = ",".join(f"http://{host}:8000" for host in fleet.servers)
    settings = RemoteSettings(url=url, **kw)  # type: ignore[arg-type]
    return RemoteVllmEngine(settings, Tokenizer(), "m", 64, transport=fleet)


def target(i: int, path: str = "/shared/a") -> LoRATarget:
    return LoRATarget(f"expert:e{i}", i, Path(path))


async def generate(e: RemoteVllmEngine, lora: LoRATarget | None) -> tuple[str, int]:
    text, tokens = "", 0
    async for d in e.generate([1, 2, 3], GenerationParams(max_tokens=3), "r", lora):
        text += d.text
        tokens += d.num_tokens
    return text, tokens


def test_path_map_longest_prefix_wins() -> None:
    e = engine(Server(), path_map={"/data": "/mnt/a", "/data/merged": "/dev/shm/m"})
    assert e.remote_path(Path("/data/experts/x")) == "/mnt/a/experts/x"
    assert e.remote_path(Path("/data/merged/k")) == "/dev/shm/m/k"
    assert e.remote_path(Path("/database/x")) == "/database/x"  # a prefix of a name is not
    assert e.remote_path(Path("/other")) == "/other"


async def test_adapters_are_registered_once_each_and_token_counts_are_exact() -> None:
    server = Server()
    e = engine(server)
    results = await asyncio.gather(*(generate(e, target(1)) for _ in range(5)))
    assert results == [("abc", 3)] * 5
    assert server.loads == 1  # single-flight
    assert list(server.adapters) == [e.adapter_name(target(1))]
    assert await generate(e, None) == ("abc", 3)


async def test_least_recently_used_adapters_are_unloaded_beyond_the_bound() -> None:
    server = Server()
    e = engine(server, max_adapters=2)
    for i in (1, 2, 1, 3):  # 1 is used again after 2: 2 is the least recently used
        await generate(e, target(i))
    assert sorted(server.adapters) == [e.adapter_name(target(1)), e.adapter_name(target(3))]
    assert list(e.registered) == [1, 3]


async def test_an_unreadable_adapter_dir_says_to_share_the_volume() -> None:
    e = engine(Server(readable=Path("/shared")))
    with pytest.raises(EngineUnavailableError, match="same path"):
        await generate(e, target(1, "/elsewhere/a"))
    assert e.registered == {}
    assert await generate(e, target(2)) == ("abc", 3)  # a failed load leaves nothing behind


async def test_a_restarted_server_gets_the_adapter_registered_again() -> None:
    server = Server()
    e = engine(server)
    assert await generate(e, target(1)) == ("abc", 3)
    server.adapters.clear()  # vLLM restarted: it knows no adapter any more
    assert await generate(e, target(1)) == ("abc", 3)
    assert server.loads == 2
    assert list(server.adapters) == [e.adapter_name(target(1))]
    assert e._endpoints["http://vllm:8000"].in_use == {}  # nothing leaked by the retry


async def test_a_mixture_goes_with_its_bundle_as_vllm_xargs_and_salts_the_cache() -> None:
    server = Server()
    e = engine(server)
    assert e.supports_mixture  # sent; the start-up self-check proves the server applies it
    bundle = target(7, "/shared/bundle")
    spec = MixtureSpec((8, 8), (0.25, 0.75))
    text = ""
    async for d in e.generate([1, 2], GenerationParams(max_tokens=3), "r", bundle, spec):
        text += d.text
    assert text == "xyz"  # the server applied the weights
    sent = server.completions[-1]
    assert sent["model"] == e.adapter_name(target(7))
    assert sent["vllm_xargs"] == {
        "mergeserve_mix_ranks": [8, 8],
        "mergeserve_mix_weights": [0.25, 0.75],
    }
    assert sent["cache_salt"] == spec.salt()
    assert await generate(e, target(1)) == ("abc", 3)  # a plain request carries neither
    assert "vllm_xargs" not in server.completions[-1]
    assert "cache_salt" not in server.completions[-1]
    with pytest.raises(InvalidRequestError, match="bundle"):
        async for _ in e.generate([1], GenerationParams(max_tokens=1), "r", None, spec):
            pass


async def test_a_pinned_bundle_stays_registered_past_the_lru_bound() -> None:
    server = Server()
    e = engine(server, max_adapters=1)
    bundle = target(9, "/shared/bundle")
    await e.pin_adapter(bundle)
    assert list(server.adapters) == [e.adapter_name(target(9))]
    for i in (1, 2, 3):  # other adapters come and go around it
        await generate(e, target(i))
    assert e.adapter_name(target(9)) in server.adapters
    assert sorted(server.adapters) == [e.adapter_name(target(3)), e.adapter_name(target(9))]
    await e.unpin_adapter(bundle)  # unpinned and idle: the LRU may take it now
    assert list(server.adapters) == [e.adapter_name(target(3))]
    await e.unpin_adapter(bundle)  # twice is harmless
    assert e._endpoints["http://vllm:8000"].in_use == {}


def test_refusals_map_to_openai_statuses() -> None:
    body = json.dumps({"error": {"message": "too long"}})
    assert isinstance(remote_error(400, body, "x"), InvalidRequestError)
    assert "too long" in remote_error(400, body, "x").message
    assert isinstance(remote_error(503, "busy", "x"), EngineOverloadedError)
    assert isinstance(remote_error(500, "boom", "x"), EngineUnavailableError)


def test_start_needs_a_url(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="REMOTE__URL"):
        RemoteVllmEngine.start(tmp_path, RemoteSettings())


# ------------------------------------------------------------------ several servers


def two(**kw: object) -> tuple[Server, Server, RemoteVllmEngine]:
    a, b = Server(), Server()
    return a, b, fleet_engine(Fleet(a=a, b=b), health_interval_s=0.1, max_backoff_s=0.2, **kw)


def state(e: RemoteVllmEngine) -> dict[str, tuple[bool, int]]:
    return {s.url.split("//")[1][0]: (s.up, s.outstanding) for s in e.endpoints()}


async def wait_for(cond: object, within_s: float = 3.0) -> None:
    deadline = time.monotonic() + within_s
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def test_requests_spread_by_load_over_the_servers() -> None:
    a, b, e = two()
    a.hang = b.hang = asyncio.Event()
    tasks = [asyncio.create_task(generate(e, None)) for _ in range(6)]
    await wait_for(lambda: a.streaming + b.streaming == 6)
    assert (a.streaming, b.streaming) == (3, 3)
    assert state(e) == {"a": (True, 3), "b": (True, 3)}
    a.hang.set()
    assert await asyncio.gather(*tasks) == [("abc", 3)] * 6
    assert state(e) == {"a": (True, 0), "b": (True, 0)}
    await e.shutdown()


async def test_one_adapter_or_weighting_prefers_one_server_until_it_is_loaded() -> None:
    a, b, e = two(affinity_slack=1)
    for _ in range(4):
        await generate(e, target(1))
    assert sorted((len(a.completions), len(b.completions))) == [0, 4]  # all on one server
    home, other = (a, b) if a.completions else (b, a)
    assert list(other.adapters) == []  # and registered there only
    # Weightings spread: each salt has its own preferred server.
    bundle = target(7, "/shared/bundle")
    for i in range(16):
        spec = MixtureSpec((8, 8), (i / 16, 1 - i / 16))
        async for _ in e.generate([1], GenerationParams(max_tokens=3), "r", bundle, spec):
            pass
    assert len(a.completions) > 4
    assert len(b.completions) > 4
    # The preferred server takes no more than `affinity_slack` beyond the least loaded.
    home.hang = asyncio.Event()
    first = [asyncio.create_task(generate(e, target(1))) for _ in range(2)]
    await wait_for(lambda: home.streaming == 2)
    elsewhere = len(other.completions)
    third = asyncio.create_task(generate(e, target(1)))
    await wait_for(lambda: len(other.completions) == elsewhere + 1)
    home.hang.set()
    assert await asyncio.gather(*first, third) == [("abc", 3)] * 3
    await e.shutdown()


async def test_a_refused_connection_moves_the_request_and_takes_the_server_out() -> None:
    a, b, e = two()
    a.up = False
    results = [await generate(e, None) for _ in range(4)]
    assert results == [("abc", 3)] * 4  # none failed: each went to b
    assert len(b.completions) == 4
    assert state(e)["a"] == (False, 0)
    down = next(s for s in e.endpoints() if not s.up)
    assert down.reason is not None
    assert "unreachable" in down.reason
    await e.check_health()  # one server up: healthy
    await e.shutdown()


async def test_a_server_that_dies_mid_stream_fails_its_requests_at_once_and_comes_back() -> None:
    a, b, e = two()
    bundle = target(9, "/shared/bundle")
    await e.pin_adapter(bundle)
    assert e.adapter_name(target(9)) in a.adapters
    assert e.adapter_name(target(9)) in b.adapters
    a.hang = asyncio.Event()  # a's streams stop after one token...
    tasks = [asyncio.create_task(generate(e, None)) for _ in range(4)]
    await wait_for(lambda: a.streaming == 2)
    a.up = False  # ...and then it is gone (its sockets never close: only /health tells)
    a.adapters.clear()
    t0 = time.monotonic()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert time.monotonic() - t0 < 2  # failed by the monitor, not by a 600 s read timeout
    failed = [r for r in results if isinstance(r, EngineUnavailableError)]
    assert len(failed) == 2
    assert all("http://a:8000" in f.message for f in failed)
    assert results.count(("abc", 3)) == 2  # b's requests were not touched
    assert state(e)["a"] == (False, 0)
    for _ in range(3):
        assert await generate(e, None) == ("abc", 3)  # served by b meanwhile
    # a comes back: taken in again within the backoff, the pinned bundle registered again.
    a.hang, a.up = None, True
    t0 = time.monotonic()
    await wait_for(lambda: state(e)["a"][0])
    assert time.monotonic() - t0 < 1.5
    assert e.adapter_name(target(9)) in a.adapters
    before = len(a.completions)
    await asyncio.gather(*(generate(e, None) for _ in range(4)))
    assert len(a.completions) > before  # used again
    await e.shutdown()


async def test_a_server_that_comes_back_with_another_model_stays_out() -> None:
    a, _, e = two()
    a.up = False
    await e.check_health()  # starts the monitor, which finds a out
    await wait_for(lambda: not state(e)["a"][0])
    a.up, a.model = True, "other"
    await asyncio.sleep(0.8)
    assert state(e)["a"][0] is False
    assert "not 'm'" in str(next(s.reason for s in e.endpoints() if not s.up))
    a.model = "m"
    await wait_for(lambda: state(e)["a"][0])
    await e.shutdown()


async def test_no_server_up_is_unavailable_with_each_ones_reason() -> None:
    a, b, e = two()
    a.up = b.up = False
    with pytest.raises(EngineUnavailableError, match="no vLLM server is up"):
        await generate(e, None)
    with pytest.raises(EngineUnavailableError, match=r"http://a:8000 unreachable.*http://b"):
        await e.check_health()
    b.up = True
    await wait_for(lambda: state(e)["b"][0])
    await e.check_health()
    assert await generate(e, None) == ("abc", 3)
    await e.shutdown()


async def test_the_self_check_runs_on_every_server() -> None:
    a, b, e = two()
    bundle, ref = target(7, "/shared/bundle"), target(8, "/shared/ref")
    spec = MixtureSpec((8, 8), (0.5, 0.0))
    assert await e.verify_mixture(bundle, spec, ref) is None
    assert len(a.completions) == len(b.completions) == 3  # three generations on each
    b.plugin = False  # one replica without the plugin: the fleet fails the check
    reason = await e.verify_mixture(bundle, spec, ref)
    assert reason is not None
    assert reason.startswith("http://b:8000")
    await e.shutdown()


@pytest.mark.parametrize("bad", ["vllm:8000", "http://", "ftp://vllm", "http://a:8000,b:8000"])
def test_a_url_that_is_not_http_is_refused_at_once(bad: str) -> None:
    with pytest.raises(ValidationError, match="not an http"):
        RemoteSettings(url=bad)


def test_urls_are_comma_separated_and_discovery_resolves_every_address(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = RemoteSettings(url=" http://vllm-0:8000/, http://vllm-1:8000 ")
    assert settings.urls() == ["http://vllm-0:8000", "http://vllm-1:8000"]

    def addresses(host: str, port: int, **kw: object) -> list[tuple[object, ...]]:
        assert (host, port) == ("vllm", 8000)
        return [(0, 0, 0, "", (ip, port)) for ip in ("10.0.0.2", "10.0.0.1", "10.0.0.2")]

    monkeypatch.setattr("socket.getaddrinfo", addresses)
    from mergeserve.runtime.engine.remote import _resolve_all

    assert _resolve_all(["http://vllm:8000"]) == ["http://10.0.0.1:8000", "http://10.0.0.2:8000"]


async def test_discovery_adds_new_addresses_and_drains_vanished_ones(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    a, b = Server(), Server()
    fleet = Fleet(a=a, b=b)
    found = ["http://a:8000"]
    monkeypatch.setattr("mergeserve.runtime.engine.remote._resolve_all", lambda urls: list(found))
    settings = RemoteSettings(
        url="http://svc:8000", discover=True, discover_interval_s=0.1, health_interval_s=0.1
    )
    e = RemoteVllmEngine(settings, Tokenizer(), "m", 64, transport=fleet, urls=list(found))
    await e.check_health()
    found[:] = ["http://a:8000", "http://b:8000"]
    await wait_for(lambda: [s.url for s in e.endpoints() if s.up] == found)
    found[:] = ["http://b:8000"]
    await wait_for(lambda: [s.url for s in e.endpoints()] == found)
    assert all(await asyncio.gather(*(generate(e, None) for _ in range(3))))
    assert len(b.completions) == 3
    await e.shutdown()


async def test_names_are_per_mergeserve_process_and_survive_a_blip() -> None:
    server = Server()
    e1, e2 = engine(server), engine(server)  # two replicas (or a restart) on one server
    await generate(e1, target(1, "/shared/one"))
    await generate(e2, target(1, "/shared/other"))  # the same engine id, another content
    assert server.adapters == {
        e1.adapter_name(target(1)): "/shared/one",
        e2.adapter_name(target(1)): "/shared/other",
    }
    # A blip: e1 takes the server out and back, forgets its table, registers again; the
    # server still has the name ("already loaded"), which is ours: served, not failed.
    ep = e1._endpoints["http://vllm:8000"]
    ep.take_out("a blip")
    ep.bring_back()
    assert await generate(e1, target(1, "/shared/one")) == ("abc", 3)
    assert server.completions[-1]["model"] == e1.adapter_name(target(1))
    for e in (e1, e2):
        await e.shutdown()


async def test_after_the_self_check_a_server_without_the_plugin_is_kept_out() -> None:
    a, _, e = two()
    bundle, ref = target(7, "/shared/bundle"), target(8, "/shared/ref")
    assert await e.verify_mixture(bundle, MixtureSpec((8, 8), (0.5, 0.0)), ref) is None
    a.up = False
    await e.check_health()
    await wait_for(lambda: not state(e)["a"][0])
    a.up, a.plugin = True, False  # back, from an image without mergeserve's plugin
    await asyncio.sleep(0.8)
    assert state(e)["a"][0] is False
    assert "plugin" in str(next(s.reason for s in e.endpoints() if not s.up))
    a.plugin = True
    await wait_for(lambda: state(e)["a"][0])
    await e.shutdown()


async def test_a_stale_connection_is_not_a_dead_server() -> None:
    """The server closed a kept-alive connection as we sent on it: the request is sent
    again (the server answers its health check) and the server stays in service."""
    server = Server()
    e = engine(server)  # one server: "another one" is not there to take the request
    server.stale = 1
    assert await generate(e, target(1)) == ("abc", 3)
    assert [s.up for s in e.endpoints()] == [True]
    server.stale = 2  # twice in a row on the only server: the request fails, cleanly
    with pytest.raises(EngineUnavailableError, match="failed this request"):
        await generate(e, None)
    assert [s.up for s in e.endpoints()] == [True]  # /health still answers: still in
    assert await generate(e, None) == ("abc", 3)
    a, b, e2 = two()
    a.stale = b.stale = 1
    assert await asyncio.gather(*(generate(e2, None) for _ in range(4))) == [("abc", 3)] * 4
    assert state(e2) == {"a": (True, 0), "b": (True, 0)}
    for x in (e, e2):
        await x.shutdown()
