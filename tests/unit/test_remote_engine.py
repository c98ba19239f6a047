"""RemoteVllmEngine's bookkeeping: path mapping, adapter registration and eviction, and the
mapping of the server's refusals. The server here is a scripted httpx transport that keeps
vLLM's adapter table; tests/e2e/test_remote_engine.py runs against a real `vllm serve`."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest

from mergeserve.config import RemoteSettings
from mergeserve.errors import (
    ConfigurationError,
    EngineOverloadedError,
    EngineUnavailableError,
    InvalidRequestError,
)
from mergeserve.runtime.engine import GenerationParams, LoRATarget
from mergeserve.runtime.mixture import MixtureSpec
from mergeserve.runtime.remote import RemoteVllmEngine, remote_error


class Server:
    """vLLM's adapter table and a completions stream of three tokens."""

    def __init__(self, readable: Path | None = None) -> None:
        self.adapters: dict[str, str] = {}
        self.loads = 0
        self.readable = readable
        self.completions: list[dict[str, object]] = []  # the bodies of /v1/completions

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content or b"{}")
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
            self.completions.append(body)
            if body["model"] not in {"m", *self.adapters}:
                return httpx.Response(404, json={"error": {"message": "no such model"}})
            chunks = [
                {"choices": [{"text": t, "finish_reason": f}], "usage": u}
                for t, f, u in [
                    ("a", None, {"prompt_tokens": 3, "completion_tokens": 1}),
                    ("bc", None, {"prompt_tokens": 3, "completion_tokens": 3}),
                    ("", "length", {"prompt_tokens": 3, "completion_tokens": 3}),
                ]
            ]
            lines = [f"data: {json.dumps(c)}\n\n" for c in chunks] + ["data: [DONE]\n\n"]
            return httpx.Response(200, text="".join(lines))
        return httpx.Response(404)


def engine(server: Server, **kw: object) -> RemoteVllmEngine:
    settings = RemoteSettings(url="http://vllm:8000", **kw)  # type: ignore[arg-type]
    return RemoteVllmEngine(settings, None, "m", 64, transport=httpx.MockTransport(server))


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
    assert list(server.adapters) == ["mergeserve-1-expert:e1"]
    assert await generate(e, None) == ("abc", 3)


async def test_least_recently_used_adapters_are_unloaded_beyond_the_bound() -> None:
    server = Server()
    e = engine(server, max_adapters=2)
    for i in (1, 2, 1, 3):  # 1 is used again after 2: 2 is the least recently used
        await generate(e, target(i))
    assert sorted(server.adapters) == ["mergeserve-1-expert:e1", "mergeserve-3-expert:e3"]
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
    assert list(server.adapters) == ["mergeserve-1-expert:e1"]
    assert e._in_use == {}  # nothing leaked by the retry


async def test_a_mixture_goes_with_its_bundle_as_vllm_xargs_and_salts_the_cache() -> None:
    server = Server()
    e = engine(server)
    assert e.supports_mixture  # sent; the start-up self-check proves the server applies it
    bundle = target(7, "/shared/bundle")
    spec = MixtureSpec((8, 8), (0.25, 0.75))
    text = ""
    async for d in e.generate([1, 2], GenerationParams(max_tokens=3), "r", bundle, spec):
        text += d.text
    assert text == "abc"
    sent = server.completions[-1]
    assert sent["model"] == "mergeserve-7-expert:e7"
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
    assert list(server.adapters) == ["mergeserve-9-expert:e9"]
    for i in (1, 2, 3):  # other adapters come and go around it
        await generate(e, target(i))
    assert "mergeserve-9-expert:e9" in server.adapters
    assert sorted(server.adapters) == ["mergeserve-3-expert:e3", "mergeserve-9-expert:e9"]
    await e.unpin_adapter(bundle)  # unpinned and idle: the LRU may take it now
    assert list(server.adapters) == ["mergeserve-3-expert:e3"]
    await e.unpin_adapter(bundle)  # twice is harmless
    assert e._in_use == {}


def test_refusals_map_to_openai_statuses() -> None:
    body = json.dumps({"error": {"message": "too long"}})
    assert isinstance(remote_error(400, body, "x"), InvalidRequestError)
    assert "too long" in remote_error(400, body, "x").message
    assert isinstance(remote_error(503, "busy", "x"), EngineOverloadedError)
    assert isinstance(remote_error(500, "boom", "x"), EngineUnavailableError)


def test_start_needs_a_url(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="REMOTE__URL"):
        RemoteVllmEngine.start(tmp_path, RemoteSettings())
