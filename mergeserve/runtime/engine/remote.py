"""`RemoteVllmEngine`: generation on vLLM OpenAI servers, over HTTP.

This is how mergeserve scales past one machine: vLLM runs where the accelerators are, with
its own tensor/pipeline parallelism, and mergeserve routes and merges in front of it. One
engine talks to one vLLM server or to several replicas of it (`RemoteSettings.url`, comma-
separated, or every address of a headless Service with `discover`). The contract with each
server:

* runtime LoRA loading is on (``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``), with LoRA limits
  at least mergeserve's (``--max-lora-rank``, ``--max-loras``, ``--lora-target-modules``);
* every adapter mergeserve serves (experts, registry, static and merged adapters) lies on a
  volume the server reads too; mergeserve registers each one once by path
  (``POST /v1/load_lora_adapter``) under a name that embeds its engine id and a token of
  this mergeserve process (`adapter_name`), so a name never means two contents, even for
  several mergeserve replicas (or a restarted one) in front of one server, and unregisters
  the least recently used beyond `max_adapters`;
* prompts go as token ids to ``/v1/completions`` (mergeserve renders the chat template with
  the base model's own tokenizer, checked against each server's ``/tokenize``), streamed
  with per-chunk usage so token counts are exact;
* a dynamic request served by the in-engine mixture goes to its bundle adapter with its
  weights as ``vllm_xargs`` (``MixtureSpec.extra_args``) and its prefix-cache salt as
  ``cache_salt``. Only a server whose vLLM loads mergeserve's plugin
  (``MERGESERVE_MIXTURE_PLUGIN=1`` in its environment, mergeserve installed beside vLLM)
  applies them; one without it ignores ``vllm_xargs``. Which one this is, the start-up
  self-check finds out over HTTP as it does for the local engine
  (``Engine.verify_mixture``, run on every server: the bundle with a weighting must
  answer as that merge materialized, and not as the bundle unscaled); if it fails on one,
  every dynamic request is materialized instead and ``/v1/models`` says why. A server
  taken in later (back from an outage, or discovered) must show the plugin (its front end
  refuses a mixture without an adapter, which a vLLM without it serves) or is kept out.
  Bundles are registered on every server and stay registered while pinned.

Several servers (`_Endpoint` each, with its own adapter table and connections):

* a request goes to the server with the fewest requests in flight, except that requests
  of one adapter or weighting prefer one server (rendezvous hashing of the adapter id or
  mixture salt), for its prefix cache, while that server has at most `affinity_slack` more
  in flight than the least loaded;
* a server that refuses the connection is taken out at once; one that breaks a
  connection is asked its ``/health`` at once and taken out if that fails (a kept-alive
  connection the server was closing as we sent is not a dead server), and every server's
  ``/health`` is asked every `health_interval_s`; the requests streaming from a server
  taken out fail with EngineUnavailableError at once (never left waiting on a dead
  socket), and one that had not produced a token yet is sent again (to another server,
  or once more to the same one if it answers its health check). A server
  out is asked again with backoff (0.5 s doubling to `max_backoff_s`) and taken back once
  it is healthy, serves the base model and tokenizes alike, with the pinned bundles
  registered on it again;
* the engine is healthy while one server is.

Closing a generation early closes its HTTP stream; vLLM aborts the request on disconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import hashlib
import json
import logging
import socket
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncGenerator, Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

from mergeserve.config import RemoteSettings
from mergeserve.errors import (
    ConfigurationError,
    EngineOverloadedError,
    EngineUnavailableError,
    InvalidRequestError,
    MergeserveError,
)
from mergeserve.runtime.engine.base import (
    EndpointState,
    Engine,
    FinishReason,
    GenerationDelta,
    GenerationParams,
    LoRATarget,
    TemplateMessage,
    load_chat_tokenizer,
    render_chat,
)
from mergeserve.runtime.mixture import MixtureSpec

log = logging.getLogger(__name__)

_PROBE = "mergeserve checks that both ends tokenize alike: 12 + 30 = 42, naïve café."


def remote_error(status: int, body: str, what: str) -> MergeserveError:
    """The MergeserveError for an HTTP error answer of the vLLM server."""
    try:
        err = json.loads(body)
        message = err.get("error", {}).get("message") or err.get("message") or body
    except (ValueError, AttributeError):
        message = body
    message = f"{what}: {str(message)[:2000]}"
    if status in (408, 429, 503):
        return EngineOverloadedError(message)
    if 400 <= status < 500:
        return InvalidRequestError(message)
    return EngineUnavailableError(message)


class _Down(Exception):
    """The endpoint a generation was on was taken out of service meanwhile."""


class _Endpoint:
    """One vLLM server: its connections, the adapters registered on it, its health."""

    def __init__(
        self,
        url: str,
        settings: RemoteSettings,
        transport: httpx.AsyncBaseTransport | None,
        prefix: str,
    ) -> None:
        self.url = url
        self.prefix = prefix
        self._settings = settings
        self._transport = transport
        # Idle connections are dropped before the server's keep-alive ends (uvicorn's, in
        # vLLM, is 5 s), so a request is seldom sent on one the server is closing.
        self.http = self._client(
            timeout=httpx.Timeout(settings.request_timeout_s, connect=10.0),
            limits=httpx.Limits(
                max_connections=None, max_keepalive_connections=64, keepalive_expiry=2.0
            ),
        )
        self.probe = self._client(
            limits=httpx.Limits(max_keepalive_connections=1, keepalive_expiry=4.0)
        )
        """Health and admission checks; a failed one is asked again on a new connection
        (`confirm`), so that a stale kept-alive one never passes for a dead server."""
        self.loaded: OrderedDict[int, str] = OrderedDict()
        """Engine id -> the name it is registered under on the server, LRU first."""
        self.loading: dict[int, asyncio.Future[str]] = {}
        self.in_use: dict[int, int] = {}
        self.pinned: set[int] = set()
        self.outstanding = 0
        self.up = True
        self.reason: str | None = None
        self.failures = 0
        self.next_check = time.monotonic() + settings.health_interval_s
        self.gone = False
        """No longer among the discovered addresses: closed once idle."""
        self._guards: set[asyncio.Timeout] = set()

    def _client(self, **kw: Any) -> httpx.AsyncClient:
        """A client of this server (timeout 10 s unless `kw` says otherwise)."""
        kw.setdefault("timeout", 10.0)
        kw.setdefault("transport", self._transport)
        return httpx.AsyncClient(base_url=self.url, headers=_auth(self._settings), **kw)

    async def close(self) -> None:
        await self.http.aclose()
        await self.probe.aclose()

    async def confirm(self, method: str, route: str, **kw: Any) -> httpx.Response:
        """`route` asked on `probe`, and once more on a new connection if that fails at
        the transport."""
        try:
            return await self.probe.request(method, route, **kw)
        except httpx.TransportError:
            async with self._client() as fresh:
                return await fresh.request(method, route, **kw)

    def state(self) -> EndpointState:
        return EndpointState(self.url, self.up, self.outstanding, len(self.loaded), self.reason)

    @contextlib.asynccontextmanager
    async def guard(self) -> AsyncGenerator[None, None]:
        """Await the server inside: if the endpoint is taken out meanwhile, the await is
        interrupted and `_Down` raised (a dead server may never close its socket)."""
        if not self.up:
            raise _Down(self.reason)
        scope = asyncio.timeout(None)
        self._guards.add(scope)
        try:
            async with scope:
                yield
        except TimeoutError as e:
            if scope.expired() and not self.up:
                raise _Down(self.reason) from e
            raise
        finally:
            self._guards.discard(scope)

    def take_out(self, reason: str) -> None:
        """Out of service from now on: what it had registered is forgotten (a server
        that comes back may have restarted), the awaits on it are interrupted."""
        if not self.up:
            return
        log.warning("vLLM endpoint %s is out of service: %s", self.url, reason)
        self.up = False
        self.reason = reason
        self.loaded.clear()
        self.pinned.clear()
        self.failures = 0
        self.next_check = time.monotonic() + _FIRST_BACKOFF_S
        now = asyncio.get_running_loop().time()
        for scope in list(self._guards):
            with contextlib.suppress(RuntimeError):  # one already expiring
                scope.reschedule(now)

    def backoff(self, reason: str) -> None:
        """A check of the server (out of service) failed: ask again later."""
        self.reason = reason
        self.failures += 1
        delay = min(self._settings.max_backoff_s, _FIRST_BACKOFF_S * 2**self.failures)
        self.next_check = time.monotonic() + delay

    def bring_back(self) -> None:
        log.info("vLLM endpoint %s is back in service", self.url)
        self.up, self.reason, self.failures = True, None, 0
        self.next_check = time.monotonic() + self._settings.health_interval_s

    async def acquire(self, lora: LoRATarget) -> str:
        """The server's name of `lora`, registered first if needed (single-flight), and
        marked in use (never unloaded) until `release`."""
        loaded_now = False
        while True:
            name = self.loaded.get(lora.int_id)
            if name is not None:
                self.loaded.move_to_end(lora.int_id)
                self.in_use[lora.int_id] = self.in_use.get(lora.int_id, 0) + 1
                if loaded_now:
                    await self.evict()
                return name
            pending = self.loading.get(lora.int_id)
            if pending is not None:  # another request is registering it: wait, look again
                await asyncio.shield(pending)
                continue
            fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
            self.loading[lora.int_id] = fut
            try:
                name = _adapter_name(self.prefix, lora)
                path = _remote_path(self._settings, lora.path)
                await self.post_adapter(
                    "/v1/load_lora_adapter",
                    {"lora_name": name, "lora_path": path},
                    f"{self.url} could not load adapter {lora.name} ({lora.path})",
                )
                self.loaded[lora.int_id] = name
                fut.set_result(name)
                loaded_now = True
            except BaseException as e:
                fut.set_exception(e)
                fut.exception()  # retrieved: waiters get it, no "never retrieved" warning
                raise
            finally:
                del self.loading[lora.int_id]

    async def pin(self, lora: LoRATarget) -> None:
        """Register `lora` and keep it registered (never evicted) until unpinned."""
        await self.acquire(lora)
        self.release(lora)
        self.pinned.add(lora.int_id)

    def release(self, lora: LoRATarget) -> None:
        self.in_use[lora.int_id] -= 1
        if not self.in_use[lora.int_id]:
            del self.in_use[lora.int_id]

    async def evict(self) -> None:
        """Unregister the least recently used adapters beyond `max_adapters` (neither in
        use nor pinned)."""
        idle = [i for i in self.loaded if i not in self.in_use and i not in self.pinned]
        for int_id in idle[: max(0, len(self.loaded) - self._settings.max_adapters)]:
            name = self.loaded.pop(int_id)
            with contextlib.suppress(MergeserveError, httpx.HTTPError, _Down):
                await self.post_adapter(
                    "/v1/unload_lora_adapter", {"lora_name": name}, f"unloading {name}"
                )

    async def post_adapter(self, route: str, body: dict[str, str], what: str) -> None:
        try:
            async with self.guard():
                r = await self.http.post(route, json=body, timeout=120)
        except httpx.TransportError:
            raise  # the caller takes the server out
        except httpx.HTTPError as e:
            raise EngineUnavailableError(f"{what}: {e!r}") from e
        if r.status_code == 404 and route.endswith("/load_lora_adapter"):
            if "not found" not in r.text.lower():
                raise ConfigurationError(
                    f"{what}: the server has no {route}; start it with "
                    "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True"
                )
            raise EngineUnavailableError(
                f"{what}: the server cannot read the adapter dir; mount mergeserve's "
                "adapter volumes on it at the same path (or set "
                "MERGESERVE_ENGINE__REMOTE__PATH_MAP)"
            )
        if r.status_code == 400 and "already" in r.text and route.endswith("/load_lora_adapter"):
            # Registered by us before a blip we took for a restart: our names are ours.
            return
        if r.status_code != 200:
            err = remote_error(r.status_code, r.text, what)
            raise EngineUnavailableError(err.message) if r.status_code >= 500 else err


_FIRST_BACKOFF_S = 0.25  # doubled before the first check: 0.5 s
_forced: contextvars.ContextVar[_Endpoint | None] = contextvars.ContextVar(
    "mergeserve_remote_endpoint", default=None
)


class RemoteVllmEngine(Engine):
    """An `Engine` backed by one or more vLLM OpenAI servers (module doc)."""

    def __init__(
        self,
        settings: RemoteSettings,
        tokenizer: Any,
        model: str,
        max_model_len: int,
        transport: httpx.AsyncBaseTransport | None = None,
        urls: Sequence[str] | None = None,
        down: dict[str, str] | None = None,
    ) -> None:
        """`urls`: the servers (default `settings.urls()`); `down`: those of them that did
        not answer at start-up, url -> why (taken in once they do)."""
        self._settings = settings
        self._tokenizer = tokenizer
        self._model = model
        self._max_model_len = max_model_len
        self._transport = transport
        self._prefix = f"mergeserve-{uuid.uuid4().hex[:8]}"
        urls = list(urls if urls is not None else settings.urls())
        if not urls:
            raise ConfigurationError(
                "the remote engine needs the server's URL: MERGESERVE_ENGINE__REMOTE__URL"
            )
        self._endpoints: dict[str, _Endpoint] = {}
        for url in urls:
            ep = self._add(url)
            if down and url in down:
                ep.up, ep.reason, ep.next_check = False, down[url], 0.0
        self._pins: dict[int, LoRATarget] = {}
        self._mixtures = False
        """The self-check passed: servers taken in later must have the plugin too."""
        self._turn = 0
        self._closed = False
        self._monitor: asyncio.Task[None] | None = None
        self._next_discovery = time.monotonic() + settings.discover_interval_s

    @classmethod
    def start(cls, model_dir: Path, settings: RemoteSettings) -> RemoteVllmEngine:
        """Wait for the servers, find their base model, check that each tokenizes like the
        local `model_dir` (blocking). Servers that do not answer within
        `connect_timeout_s` are left out until they do; none answering is an error."""
        urls = settings.urls()
        if not urls:
            raise ConfigurationError(
                "the remote engine needs the server's URL: MERGESERVE_ENGINE__REMOTE__URL"
            )
        tokenizer = load_chat_tokenizer(model_dir)
        deadline = time.monotonic() + settings.connect_timeout_s
        if settings.discover:
            urls = _wait_for_addresses(urls, deadline)
        pending = {u: "it has not answered yet" for u in urls}
        cards: dict[str, tuple[str, int]] = {}
        while pending:
            for url in list(pending):
                with httpx.Client(base_url=url, headers=_auth(settings), timeout=10) as http:
                    try:
                        cards[url] = _check_server(http, url, settings, model_dir, tokenizer)
                        del pending[url]
                    except _NotYet as e:
                        pending[url] = str(e)
            if not pending or time.monotonic() > deadline:
                break
            time.sleep(1.0)
        if not cards:
            raise ConfigurationError(
                f"no vLLM server answered within {settings.connect_timeout_s:.0f} s: "
                + "; ".join(f"{u} ({why})" for u, why in pending.items())
            )
        names = {name for name, _ in cards.values()}
        if len(names) > 1:
            raise ConfigurationError(f"the vLLM servers serve different models: {cards}")
        name = names.pop()
        max_len = min(n for _, n in cards.values())
        for url, why in pending.items():
            log.warning("vLLM endpoint %s left out until it answers: %s", url, why)
        log.info("remote vLLM at %s: model %s, max_model_len %d", ", ".join(cards), name, max_len)
        return cls(settings, tokenizer, name, max_len, urls=urls, down=pending)

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    def render_chat(self, messages: Sequence[TemplateMessage]) -> list[int]:
        return render_chat(self._tokenizer, messages)

    def endpoints(self) -> list[EndpointState]:
        return [ep.state() for ep in self._endpoints.values()]

    # --------------------------------------------------------------- generation

    async def generate(
        self,
        prompt_token_ids: list[int],
        params: GenerationParams,
        request_id: str,
        lora: LoRATarget | None = None,
        mixture: MixtureSpec | None = None,
    ) -> AsyncGenerator[GenerationDelta, None]:
        if self._closed:
            raise EngineUnavailableError("the engine is shut down")
        self._check_mixture(lora, mixture)
        self._watch()
        body: dict[str, Any] = {
            "model": self._model,
            "prompt": prompt_token_ids,
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "presence_penalty": params.presence_penalty,
            "frequency_penalty": params.frequency_penalty,
            "ignore_eos": params.ignore_eos,
            "request_id": request_id,
            "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
        }
        if params.stop:
            body["stop"] = list(params.stop)
        if params.seed is not None:
            body["seed"] = params.seed
        key = f"adapter-{lora.int_id}" if lora is not None else None  # affinity
        if mixture is not None:
            body["vllm_xargs"] = mixture.extra_args()
            # The plugin salts the prefix cache itself; sent too, so that no vLLM ever
            # hands KV computed under one weighting to another (equal salts share).
            body["cache_salt"] = key = mixture.salt()
        tried: set[str] = set()
        again: set[str] = set()  # servers that passed a health check after an error
        while True:
            ep = self._pick(key, tried)
            tried.add(ep.url)
            started = False
            ep.outstanding += 1
            try:
                on = self._generate_on(ep, dict(body), request_id, lora)
                async with contextlib.aclosing(on):  # closed now if our caller stops early
                    async for delta in on:
                        started = True
                        yield delta
                return
            except (_Down, httpx.TransportError) as e:
                if isinstance(e, httpx.TransportError):
                    await self._failed(ep, e)
                if started or isinstance(e, httpx.TimeoutException):
                    raise EngineUnavailableError(
                        f"the vLLM server {ep.url} failed during the request "
                        f"({ep.reason or repr(e)})"
                    ) from e
                if ep.up and ep.url not in again:
                    # It answers its health check: the connection was stale (closed by
                    # the server as we sent). Once more, on any server, this one included.
                    again.add(ep.url)
                    tried.discard(ep.url)
                log.info("request %s moves off %s (%s)", request_id, ep.url, ep.reason or e)
            finally:
                ep.outstanding -= 1

    async def _generate_on(
        self, ep: _Endpoint, body: dict[str, Any], request_id: str, lora: LoRATarget | None
    ) -> AsyncGenerator[GenerationDelta, None]:
        """`generate` on one endpoint: `_Down` or httpx.TransportError if it fails."""
        if lora is not None:
            body["model"] = await ep.acquire(lora)
        try:
            async with contextlib.AsyncExitStack() as stack:
                async with ep.guard():
                    r = await self._open(ep, body, request_id, stack)
                if r.status_code == 404 and lora is not None:
                    # The server lost our registration (it restarted): register again.
                    async with ep.guard():
                        await r.aread()
                    await stack.aclose()
                    ep.loaded.pop(lora.int_id, None)
                    body["model"] = await ep.acquire(lora)
                    ep.release(lora)  # acquired twice now: once is this request's
                    async with ep.guard():
                        r = await self._open(ep, body, request_id, stack)
                if r.status_code != 200:
                    async with ep.guard():
                        text = (await r.aread()).decode(errors="replace")
                    raise remote_error(r.status_code, text, "the vLLM server refused the request")
                done = 0
                lines = r.aiter_lines()
                while True:
                    async with ep.guard():
                        line = await anext(lines, None)
                    if line is None:
                        break
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        err = chunk["error"]
                        raise remote_error(
                            int(err.get("code") or 500), json.dumps(chunk), "generation failed"
                        )
                    usage = chunk.get("usage") or {}
                    choices = chunk.get("choices") or []
                    if not choices:
                        continue  # the closing usage-only chunk
                    choice = choices[0]
                    total = int(usage.get("completion_tokens", done))
                    finish = choice.get("finish_reason")
                    yield GenerationDelta(
                        text=choice.get("text") or "",
                        num_tokens=total - done,
                        prompt_tokens=int(usage.get("prompt_tokens", len(body["prompt"]))),
                        finish_reason=_finish(finish),
                    )
                    done = total
        finally:
            if lora is not None:
                ep.release(lora)

    async def _open(
        self,
        ep: _Endpoint,
        body: dict[str, Any],
        request_id: str,
        stack: contextlib.AsyncExitStack,
    ) -> httpx.Response:
        """POST /v1/completions, streamed; the response is closed with `stack`."""
        request = ep.http.build_request(
            "POST", "/v1/completions", json=body, headers={"x-request-id": request_id}
        )
        response = await ep.http.send(request, stream=True)
        stack.push_async_callback(response.aclose)
        return response

    def _pick(self, key: str | None, tried: set[str]) -> _Endpoint:
        """The endpoint for a request (module doc); EngineUnavailableError if none is up."""
        forced = _forced.get()
        if forced is not None:
            if forced.url in tried or not forced.up:
                raise EngineUnavailableError(f"the vLLM server {forced.url} is {forced.reason}")
            return forced
        live = [e for e in self._endpoints.values() if e.up and not e.gone and e.url not in tried]
        if not live:
            if any(e.up and not e.gone for e in self._endpoints.values()):
                raise EngineUnavailableError(
                    f"the vLLM servers failed this request: {', '.join(sorted(tried))} "
                    "broke the connection, and answer their health checks"
                )
            raise self._none_up()
        least = min(e.outstanding for e in live)
        if key is not None:
            best = max(live, key=lambda e: _score(key, e.url))
            if best.outstanding <= least + self._settings.affinity_slack:
                return best
        idle = [e for e in live if e.outstanding == least]
        self._turn += 1
        return idle[self._turn % len(idle)]

    @contextlib.contextmanager
    def on_endpoint(self, url: str) -> Iterator[None]:
        """Generations started inside go to the server `url` only (the self-check)."""
        token = _forced.set(self._endpoints[url])
        try:
            yield
        finally:
            _forced.reset(token)

    async def verify_mixture(
        self, bundle: LoRATarget, spec: MixtureSpec, reference: LoRATarget
    ) -> str | None:
        """The self-check on every server up (a fleet with one server without the plugin
        would serve some dynamic requests unscaled); the first failure is the answer."""
        for url, ep in list(self._endpoints.items()):
            if not ep.up:
                continue
            with self.on_endpoint(url):
                reason = await super().verify_mixture(bundle, spec, reference)
            if reason is not None:
                return f"{url}: {reason}"
        self._mixtures = True
        return None

    async def _has_plugin(self, ep: _Endpoint) -> bool:
        """Whether `ep`'s vLLM loads mergeserve's plugin, for a server taken in after the
        self-check: its front end refuses a mixture that names no adapter, where a vLLM
        without the plugin ignores `vllm_xargs` and answers as it answers the same request
        without them (asked first: it must answer). The plugin's refusal is a 400 naming
        it; a plugin before that change gave a bare 500, so any other refusal but a 400
        counts too (a 400 for another reason does not)."""
        body: dict[str, Any] = {"model": self._model, "prompt": [0], "max_tokens": 1}
        control = await ep.confirm("POST", "/v1/completions", json=body, timeout=30)
        if control.status_code != 200:
            raise _NotYet(f"/v1/completions answered {control.status_code}")
        body["vllm_xargs"] = MixtureSpec((1,), (1.0,)).extra_args()
        r = await ep.confirm("POST", "/v1/completions", json=body, timeout=30)
        if r.status_code == 400:
            return "mergeserve mixture refused" in r.text
        return r.status_code != 200

    # ------------------------------------------------------------------- health

    async def check_health(self) -> None:
        """Healthy while one server is (the monitor keeps the states current)."""
        if self._closed:
            raise EngineUnavailableError("the engine is shut down")
        self._watch()
        if not any(e.up for e in self._endpoints.values()):
            await self._check_all()  # none up: ask now rather than wait for the monitor
        if not any(e.up and not e.gone for e in self._endpoints.values()):
            raise self._none_up()

    def _none_up(self) -> EngineUnavailableError:
        return EngineUnavailableError(
            "no vLLM server is up: "
            + "; ".join(f"{e.url} {e.reason or 'failed'}" for e in self._endpoints.values())
        )

    def _watch(self) -> None:
        """Start the health monitor (first call inside the event loop)."""
        if self._monitor is None and not self._closed:
            self._monitor = asyncio.get_running_loop().create_task(self._run_monitor())

    async def _run_monitor(self) -> None:
        while not self._closed:
            try:
                await self._check_all()
                if self._settings.discover and time.monotonic() >= self._next_discovery:
                    self._next_discovery = time.monotonic() + self._settings.discover_interval_s
                    await self._rediscover()
            except Exception:  # the monitor must outlive any one failure
                log.exception("the endpoint monitor failed a round")
            await asyncio.sleep(0.25)

    async def _check_all(self) -> None:
        now = time.monotonic()
        due = [e for e in self._endpoints.values() if now >= e.next_check and not e.gone]
        await asyncio.gather(*(self._check(e) for e in due))
        for url in [u for u, e in self._endpoints.items() if e.gone and not e.outstanding]:
            await self._endpoints.pop(url).close()

    async def _failed(self, ep: _Endpoint, e: httpx.TransportError) -> None:
        """A request on `ep` failed at the transport: a refused connection takes it out;
        anything else (a broken or stale connection, a timeout) is checked at once."""
        if isinstance(e, httpx.ConnectError | httpx.ConnectTimeout):
            ep.take_out(f"unreachable: {e!r}")
        elif ep.up:
            await self._check(ep)

    async def _check(self, ep: _Endpoint) -> None:
        """One health check of `ep`; one out of service is taken back if it passes the
        start-up checks again and its pinned bundles are registered on it."""
        try:
            r = await ep.confirm("GET", "/health", timeout=5)
            if r.status_code != 200:
                raise _NotYet(f"/health answered {r.status_code}")
            if ep.up:
                ep.next_check = time.monotonic() + self._settings.health_interval_s
                return
            await self._admit(ep)
        except (httpx.HTTPError, _NotYet, MergeserveError) as e:
            why = str(e) if isinstance(e, _NotYet | MergeserveError) else f"unreachable: {e!r}"
            if ep.up:
                ep.take_out(why)
            else:
                ep.backoff(why)

    async def _admit(self, ep: _Endpoint) -> None:
        r = await ep.confirm("GET", "/v1/models", timeout=10)
        if r.status_code != 200:
            raise _NotYet(f"/v1/models answered {r.status_code}")
        models = {m["id"]: m for m in r.json().get("data", [])}
        card = models.get(self._model)
        if card is None:
            raise _NotYet(f"it serves {sorted(models)}, not {self._model!r}")
        if int(card.get("max_model_len") or 0) < self._max_model_len:
            raise _NotYet(f"its max_model_len is below {self._max_model_len}")
        body = {"model": self._model, "prompt": _PROBE, "add_special_tokens": False}
        r = await ep.confirm("POST", "/tokenize", json=body, timeout=10)
        if r.status_code != 200 or r.json().get("tokens") != self._probe_tokens():
            raise _NotYet("it does not tokenize like mergeserve's base model")
        if self._mixtures and not await self._has_plugin(ep):
            # Dynamic requests would be served by the bundle unscaled: wrong answers.
            raise _NotYet(
                "it does not load mergeserve's plugin (MERGESERVE_MIXTURE_PLUGIN=1 with "
                "mergeserve installed beside vLLM), and the mixture is served"
            )
        ep.up = True  # for the registrations below (guarded), undone if one fails
        try:
            for lora in list(self._pins.values()):
                await ep.pin(lora)
        except BaseException:
            ep.up = False
            ep.loaded.clear()
            ep.pinned.clear()
            raise
        ep.bring_back()

    def _probe_tokens(self) -> list[int]:
        return list(self._tokenizer.encode(_PROBE, add_special_tokens=False))

    async def _rediscover(self) -> None:
        urls = await asyncio.to_thread(_resolve_all, self._settings.urls())
        if not urls:
            return  # DNS answered nothing: keep what we have rather than serve nowhere
        for url in urls:
            if url not in self._endpoints:
                ep = self._add(url)
                ep.up, ep.reason, ep.next_check = False, "discovered", 0.0
            self._endpoints[url].gone = False
        for url, ep in self._endpoints.items():
            if url not in urls and not ep.gone:
                log.info("vLLM endpoint %s is no longer discovered", url)
                ep.gone = True

    def adapter_name(self, lora: LoRATarget) -> str:
        """The name `lora` is registered under on the servers."""
        return _adapter_name(self._prefix, lora)

    def _add(self, url: str) -> _Endpoint:
        ep = _Endpoint(url, self._settings, self._transport, self._prefix)
        self._endpoints[url] = ep
        return ep

    async def shutdown(self) -> None:
        """Close the connections; the servers keep running (they are not ours to stop)."""
        if not self._closed:
            self._closed = True
            if self._monitor is not None:
                self._monitor.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._monitor
            for ep in self._endpoints.values():
                await ep.close()

    # ------------------------------------------------------------------ adapters

    @property
    def supports_mixture(self) -> bool:
        """Mixtures are sent; whether the servers apply them is the start-up self-check's
        to prove (module doc): a server without the plugin fails it, and the dynamic arms
        materialize instead."""
        return True

    async def pin_adapter(self, lora: LoRATarget) -> None:
        """Register `lora` (a bundle) on every server up now, and on every server that
        comes back, until `unpin_adapter`."""
        if self._closed:
            raise EngineUnavailableError("the engine is shut down")
        self._watch()
        self._pins[lora.int_id] = lora
        for ep in [e for e in self._endpoints.values() if e.up]:
            try:
                await ep.pin(lora)
            except httpx.TransportError as e:
                await self._failed(ep, e)
        if not any(lora.int_id in e.pinned for e in self._endpoints.values()):
            del self._pins[lora.int_id]
            raise EngineUnavailableError(f"no vLLM server could register {lora.name}")

    async def unpin_adapter(self, lora: LoRATarget) -> None:
        self._pins.pop(lora.int_id, None)
        for ep in self._endpoints.values():
            if lora.int_id in ep.pinned:
                ep.pinned.discard(lora.int_id)
                await ep.evict()

    @property
    def registered(self) -> dict[int, str]:
        """Engine id -> name, of the adapters registered on the first server (LRU first)."""
        return dict(next(iter(self._endpoints.values())).loaded)

    def remote_path(self, path: Path) -> str:
        """`path` as the servers see it (`path_map`, longest prefix first)."""
        return _remote_path(self._settings, path)


class _NotYet(Exception):
    """A server that cannot be used (yet): why."""


def _adapter_name(prefix: str, lora: LoRATarget) -> str:
    return f"{prefix}-{lora.int_id}-{lora.name}"


def _remote_path(settings: RemoteSettings, path: Path) -> str:
    text = str(path)
    for local in sorted(settings.path_map, key=len, reverse=True):
        if text == local or text.startswith(local.rstrip("/") + "/"):
            return settings.path_map[local] + text[len(local.rstrip("/")) :]
    return text


def _auth(settings: RemoteSettings) -> dict[str, str]:
    if settings.api_key is None:
        return {}
    return {"authorization": f"Bearer {settings.api_key.get_secret_value()}"}


def _score(key: str, url: str) -> int:
    """Rendezvous hashing: each key prefers the url with the highest score."""
    return int.from_bytes(hashlib.blake2b(f"{key}|{url}".encode(), digest_size=8).digest())


def _resolve_all(urls: Sequence[str]) -> list[str]:
    """Each URL once per address its host name resolves to (sorted; [] if none does)."""
    out: set[str] = set()
    for url in urls:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port
        if host is None:
            continue
        try:
            infos = socket.getaddrinfo(host, port or 80, type=socket.SOCK_STREAM)
        except OSError:
            continue
        for info in infos:
            addr = str(info[4][0])
            netloc = f"[{addr}]" if ":" in addr else addr
            if port is not None:
                netloc += f":{port}"
            out.add(urlunsplit((parts.scheme, netloc, parts.path, "", "")))
    return sorted(out)


def _wait_for_addresses(urls: list[str], deadline: float) -> list[str]:
    while True:
        found = _resolve_all(urls)
        if found:
            return found
        if time.monotonic() > deadline:
            raise ConfigurationError(f"{', '.join(urls)} resolved to no address")
        time.sleep(1.0)


def _check_server(
    http: httpx.Client, url: str, settings: RemoteSettings, model_dir: Path, tokenizer: Any
) -> tuple[str, int]:
    """The base model `url` serves and its max_model_len, once it answers (`_NotYet` until
    then); ConfigurationError if it cannot serve for mergeserve."""
    try:
        r = http.get("/v1/models")
    except httpx.HTTPError as e:
        raise _NotYet(repr(e)) from e
    if r.status_code in (401, 403):
        raise ConfigurationError(
            f"the vLLM server at {url} refused the API key "
            f"({r.status_code}): MERGESERVE_ENGINE__REMOTE__API_KEY"
        )
    if r.status_code != 200:
        raise _NotYet(f"/v1/models answered {r.status_code}")
    models: list[dict[str, Any]] = r.json()["data"]
    if not models:
        raise _NotYet("it lists no model")
    cards = {m["id"]: m for m in models}
    name = settings.model or next((m["id"] for m in models if not m.get("parent")), models[0]["id"])
    if name not in cards:
        raise ConfigurationError(f"the vLLM server at {url} serves {sorted(cards)}, not {name!r}")
    max_len = int(cards[name].get("max_model_len") or 0)
    if max_len <= 0:
        raise ConfigurationError(f"{url} does not say {name!r}'s max_model_len")
    r = http.post("/tokenize", json={"model": name, "prompt": _PROBE, "add_special_tokens": False})
    if r.status_code != 200:
        raise ConfigurationError(f"{url}/tokenize answered {r.status_code}")
    if r.json()["tokens"] != tokenizer.encode(_PROBE, add_special_tokens=False):
        raise ConfigurationError(
            f"the vLLM server's model {name!r} at {url} does not tokenize like {model_dir}: "
            "serve the same base model on both ends"
        )
    return name, max_len


def _finish(reason: str | None) -> FinishReason | None:
    if reason is None:
        return None
    if reason == "length":
        return "length"
    if reason in ("stop", "eos"):
        return "stop"
    raise EngineUnavailableError(f"the vLLM server ended the request: {reason}")
