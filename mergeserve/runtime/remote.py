"""`RemoteVllmEngine`: generation on an existing vLLM OpenAI server, over HTTP.

This is how mergeserve scales past one machine: vLLM runs where the accelerators are, with
its own tensor/pipeline parallelism, and mergeserve routes and merges in front of it. One
engine talks to one vLLM endpoint (adapters are registered with that server); for several
vLLM replicas, pair each with a mergeserve and share the registry between the pairs.
The contract with the server:

* runtime LoRA loading is on (``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``), with LoRA limits
  at least mergeserve's (``--max-lora-rank``, ``--max-loras``, ``--lora-target-modules``);
* every adapter mergeserve serves (experts, registry, static and merged adapters) lies on a
  volume the server reads too; mergeserve registers each one once by path
  (``POST /v1/load_lora_adapter``) under a name that embeds its engine id, so a name never
  means two contents, and unregisters the least recently used beyond `max_adapters`;
* prompts go as token ids to ``/v1/completions`` (mergeserve renders the chat template with
  the base model's own tokenizer, checked at start-up against the server's ``/tokenize``),
  streamed with per-chunk usage so token counts are exact;
* a dynamic request served by the in-engine mixture goes to its bundle adapter with its
  weights as ``vllm_xargs`` (``MixtureSpec.extra_args``) and its prefix-cache salt as
  ``cache_salt``. Only a server whose vLLM loads mergeserve's plugin
  (``MERGESERVE_MIXTURE_PLUGIN=1`` in its environment, mergeserve installed beside vLLM)
  applies them; one without it ignores ``vllm_xargs``. Which one this is, the start-up
  self-check finds out over HTTP as it does for the local engine
  (``EngineClient.verify_mixture``: the bundle with a weighting must answer as that merge
  materialized, and not as the bundle unscaled); if it fails, every dynamic request is
  materialized instead and ``/v1/models`` says why. The bundle stays registered on the
  server while pinned (never unloaded by the LRU below).

Closing a generation early closes its HTTP stream; vLLM aborts the request on disconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, Sequence
from pathlib import Path
from typing import Any

import httpx

from mergeserve.config import RemoteSettings
from mergeserve.errors import (
    ConfigurationError,
    EngineOverloadedError,
    EngineUnavailableError,
    InvalidRequestError,
    MergeserveError,
)
from mergeserve.runtime.engine import (
    ChatMessage,
    EngineClient,
    FinishReason,
    GenerationDelta,
    GenerationParams,
    LoRATarget,
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


class RemoteVllmEngine(EngineClient):
    """An `EngineClient` backed by a vLLM OpenAI server (module doc)."""

    def __init__(
        self,
        settings: RemoteSettings,
        tokenizer: Any,
        model: str,
        max_model_len: int,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        assert settings.url is not None
        self._settings = settings
        self._tokenizer = tokenizer
        self._model = model
        self._max_model_len = max_model_len
        headers = {}
        if settings.api_key is not None:
            headers["authorization"] = f"Bearer {settings.api_key.get_secret_value()}"
        self._http = httpx.AsyncClient(
            base_url=settings.url.rstrip("/"),
            headers=headers,
            timeout=httpx.Timeout(settings.request_timeout_s, connect=10.0),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
            transport=transport,
        )
        self._loaded: OrderedDict[int, str] = OrderedDict()
        """Engine id -> the name it is registered under on the server, LRU first."""
        self._loading: dict[int, asyncio.Future[str]] = {}
        self._in_use: dict[int, int] = {}
        self._closed = False

    @classmethod
    def start(cls, model_dir: Path, settings: RemoteSettings) -> RemoteVllmEngine:
        """Wait for the server, find its base model, check that it tokenizes like the local
        `model_dir` (blocking)."""
        if not settings.url:
            raise ConfigurationError(
                "the remote engine needs the server's URL: MERGESERVE_ENGINE__REMOTE__URL"
            )
        tokenizer = load_chat_tokenizer(model_dir)
        headers = {}
        if settings.api_key is not None:
            headers["authorization"] = f"Bearer {settings.api_key.get_secret_value()}"
        with httpx.Client(base_url=settings.url.rstrip("/"), headers=headers, timeout=10) as http:
            models = _wait_for_models(http, settings)
            cards = {m["id"]: m for m in models}
            name = settings.model or next(
                (m["id"] for m in models if not m.get("parent")), models[0]["id"]
            )
            if name not in cards:
                raise ConfigurationError(
                    f"the vLLM server at {settings.url} serves {sorted(cards)}, not {name!r}"
                )
            max_len = int(cards[name].get("max_model_len") or 0)
            if max_len <= 0:
                raise ConfigurationError(f"{settings.url} does not say {name!r}'s max_model_len")
            r = http.post(
                "/tokenize", json={"model": name, "prompt": _PROBE, "add_special_tokens": False}
            )
            if r.status_code != 200:
                raise ConfigurationError(f"{settings.url}/tokenize answered {r.status_code}")
            theirs = r.json()["tokens"]
            ours = tokenizer.encode(_PROBE, add_special_tokens=False)
            if theirs != ours:
                raise ConfigurationError(
                    f"the vLLM server's model {name!r} does not tokenize like {model_dir}: "
                    "serve the same base model on both ends"
                )
        log.info("remote vLLM at %s: model %s, max_model_len %d", settings.url, name, max_len)
        return cls(settings, tokenizer, name, max_len)

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    def render_chat(self, messages: Sequence[ChatMessage]) -> list[int]:
        return render_chat(self._tokenizer, messages)

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
        model = self._model
        if lora is not None:
            model = await self._acquire(lora)
        body: dict[str, Any] = {
            "model": model,
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
        if mixture is not None:
            body["vllm_xargs"] = mixture.extra_args()
            # The plugin salts the prefix cache itself; sent too, so that no vLLM ever
            # hands KV computed under one weighting to another (equal salts share).
            body["cache_salt"] = mixture.salt()
        try:
            async with contextlib.AsyncExitStack() as stack:
                r = await self._open(body, request_id, stack)
                if r.status_code == 404 and lora is not None:
                    # The server lost our registration (it restarted): register again.
                    await r.aread()
                    await stack.aclose()
                    self._loaded.pop(lora.int_id, None)
                    body["model"] = await self._acquire(lora)
                    self._release(lora)  # acquired twice now: once is this request's
                    r = await self._open(body, request_id, stack)
                if r.status_code != 200:
                    text = (await r.aread()).decode(errors="replace")
                    raise remote_error(r.status_code, text, "the vLLM server refused the request")
                done = 0
                async for line in r.aiter_lines():
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
                        prompt_tokens=int(usage.get("prompt_tokens", len(prompt_token_ids))),
                        finish_reason=_finish(finish),
                    )
                    done = total
        except httpx.TimeoutException as e:
            raise EngineUnavailableError(f"the vLLM server stopped answering: {e!r}") from e
        except httpx.TransportError as e:
            raise EngineUnavailableError(f"the vLLM server is unreachable: {e!r}") from e
        finally:
            if lora is not None:
                self._release(lora)

    async def _open(
        self, body: dict[str, Any], request_id: str, stack: contextlib.AsyncExitStack
    ) -> httpx.Response:
        """POST /v1/completions, streamed; the response is closed with `stack`."""
        request = self._http.build_request(
            "POST", "/v1/completions", json=body, headers={"x-request-id": request_id}
        )
        response = await self._http.send(request, stream=True)
        stack.push_async_callback(response.aclose)
        return response

    async def check_health(self) -> None:
        if self._closed:
            raise EngineUnavailableError("the engine is shut down")
        try:
            r = await self._http.get("/health", timeout=5)
        except httpx.HTTPError as e:
            raise EngineUnavailableError(f"the vLLM server is unreachable: {e!r}") from e
        if r.status_code != 200:
            raise EngineUnavailableError(f"the vLLM server's /health answered {r.status_code}")

    async def shutdown(self) -> None:
        """Close the connections; the server keeps running (it is not ours to stop)."""
        if not self._closed:
            self._closed = True
            await self._http.aclose()

    @property
    def supports_mixture(self) -> bool:
        """Mixtures are sent; whether the server applies them is the start-up self-check's
        to prove (module doc): a server without the plugin fails it, and the dynamic arms
        materialize instead."""
        return True

    async def pin_adapter(self, lora: LoRATarget) -> None:
        """Register `lora` (a bundle) now and keep it registered until `unpin_adapter`."""
        if self._closed:
            raise EngineUnavailableError("the engine is shut down")
        await self._acquire(lora)

    async def unpin_adapter(self, lora: LoRATarget) -> None:
        if self._in_use.get(lora.int_id):
            self._release(lora)
            await self._evict()

    @property
    def registered(self) -> dict[int, str]:
        """Engine id -> name, of the adapters registered on the server (LRU first)."""
        return dict(self._loaded)

    # ------------------------------------------------------------------ adapters

    def remote_path(self, path: Path) -> str:
        """`path` as the server sees it (`path_map`, longest prefix first)."""
        text = str(path)
        for local in sorted(self._settings.path_map, key=len, reverse=True):
            if text == local or text.startswith(local.rstrip("/") + "/"):
                return self._settings.path_map[local] + text[len(local.rstrip("/")) :]
        return text

    async def _acquire(self, lora: LoRATarget) -> str:
        """The server's name of `lora`, registered first if needed (single-flight), and
        marked in use (never unloaded) until `_release`."""
        loaded_now = False
        while True:
            name = self._loaded.get(lora.int_id)
            if name is not None:
                self._loaded.move_to_end(lora.int_id)
                self._in_use[lora.int_id] = self._in_use.get(lora.int_id, 0) + 1
                if loaded_now:
                    await self._evict()
                return name
            pending = self._loading.get(lora.int_id)
            if pending is not None:  # another request is registering it: wait, look again
                await asyncio.shield(pending)
                continue
            fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
            self._loading[lora.int_id] = fut
            try:
                name = f"mergeserve-{lora.int_id}-{lora.name}"
                await self._post_adapter(
                    "/v1/load_lora_adapter",
                    {"lora_name": name, "lora_path": self.remote_path(lora.path)},
                    f"the vLLM server could not load adapter {lora.name} ({lora.path})",
                )
                self._loaded[lora.int_id] = name
                fut.set_result(name)
                loaded_now = True
            except BaseException as e:
                fut.set_exception(e)
                fut.exception()  # retrieved: waiters get it, no "never retrieved" warning
                raise
            finally:
                del self._loading[lora.int_id]

    def _release(self, lora: LoRATarget) -> None:
        self._in_use[lora.int_id] -= 1
        if not self._in_use[lora.int_id]:
            del self._in_use[lora.int_id]

    async def _evict(self) -> None:
        """Unregister the least recently used adapters beyond `max_adapters` (not in use)."""
        idle = [i for i in self._loaded if i not in self._in_use]
        for int_id in idle[: max(0, len(self._loaded) - self._settings.max_adapters)]:
            name = self._loaded.pop(int_id)
            with contextlib.suppress(MergeserveError, httpx.HTTPError):
                await self._post_adapter(
                    "/v1/unload_lora_adapter", {"lora_name": name}, f"unloading {name}"
                )

    async def _post_adapter(self, route: str, body: dict[str, str], what: str) -> None:
        try:
            r = await self._http.post(route, json=body, timeout=120)
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
        if r.status_code != 200:
            err = remote_error(r.status_code, r.text, what)
            raise EngineUnavailableError(err.message) if r.status_code >= 500 else err


def _finish(reason: str | None) -> FinishReason | None:
    if reason is None:
        return None
    if reason == "length":
        return "length"
    if reason in ("stop", "eos"):
        return "stop"
    raise EngineUnavailableError(f"the vLLM server ended the request: {reason}")


def _wait_for_models(http: httpx.Client, settings: RemoteSettings) -> list[dict[str, Any]]:
    """GET /v1/models until it answers (the server may still be loading its model)."""
    deadline = time.monotonic() + settings.connect_timeout_s
    last = ""
    while True:
        try:
            r = http.get("/v1/models")
            if r.status_code == 200:
                models: list[dict[str, Any]] = r.json()["data"]
                if models:
                    return models
                last = "it lists no model"
            elif r.status_code in (401, 403):
                raise ConfigurationError(
                    f"the vLLM server at {settings.url} refused the API key "
                    f"({r.status_code}): MERGESERVE_ENGINE__REMOTE__API_KEY"
                )
            else:
                last = f"/v1/models answered {r.status_code}"
        except httpx.HTTPError as e:
            last = repr(e)
        if time.monotonic() > deadline:
            raise ConfigurationError(
                f"no vLLM server answered at {settings.url} within "
                f"{settings.connect_timeout_s:.0f} s ({last})"
            )
        time.sleep(1.0)
