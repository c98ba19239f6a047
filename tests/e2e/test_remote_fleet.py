"""One mergeserve in front of two real vLLM OpenAI servers (RemoteVllmEngine with two URLs),
all on loopback; both servers load mergeserve's plugin, so dynamic requests are the mixture
over the wire. A second mergeserve, the mixture off, in front of the same two servers
materializes every merge, and a third serves the mixture on its own in-process engine:
the references the mixture over the wire must equal token for token.

The last tests kill one server (its whole process group, SIGKILL: a crash) in the middle of
a load, then start it again on the same port.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from mergeserve.testing import (
    ServerProcess,
    free_port,
    kill_process_group,
    server_process,
    vllm_server_process,
)
from tests.e2e.conftest import ENGINE_ENV, tiny_llama_and_two_experts, vllm_lora_args

pytestmark = pytest.mark.vllm

VLLM_ARGS = vllm_lora_args("tiny-fleet", max_loras=3)
PLUGIN = {"MERGESERVE_LORA_COMPILE": "0", "MERGESERVE_MIXTURE_PLUGIN": "1"}
WEIGHTINGS = [{"rand": 0.6, "rand2": 0.9}, {"rand": 1.0, "rand2": 0.3}, {"rand2": 1.0}]


@dataclass
class Fleet:
    tmp: Path
    base: Path
    ports: list[int]
    vllm: list[ServerProcess | None]
    mixture: ServerProcess
    materialized: ServerProcess
    local: ServerProcess
    stack: Any = field(repr=False)

    @property
    def urls(self) -> list[str]:
        return [f"http://127.0.0.1:{p}" for p in self.ports]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("fleet")
    base, experts = tiny_llama_and_two_experts(tmp)
    ports = [free_port(), free_port()]
    with contextlib.ExitStack() as stack:
        vllm: list[ServerProcess | None] = [
            stack.enter_context(
                vllm_server_process(base, tmp / f"vllm{i}.log", VLLM_ARGS, PLUGIN, port=port)
            )
            for i, port in enumerate(ports)
        ]
        urls = ",".join(f"http://127.0.0.1:{p}" for p in ports)

        def mergeserve(name: str, mixture: bool, remote: bool = True) -> ServerProcess:
            env = ENGINE_ENV | {
                "MERGESERVE_ENGINE__MIXTURE": str(mixture).lower(),
                # Three slots: one bundle is pinned (kept registered on every server).
                "MERGESERVE_ENGINE__MAX_LORAS": "3",
                "MERGESERVE_MERGE__CACHE_DIR": str(tmp / name / "merged"),
                "MERGESERVE_CACHE": str(tmp / name / "cache"),
            }
            if remote:
                env |= {
                    "MERGESERVE_ENGINE__KIND": "remote",
                    "MERGESERVE_ENGINE__REMOTE__URL": urls,
                    "MERGESERVE_ENGINE__REMOTE__HEALTH_INTERVAL_S": "0.5",
                    "MERGESERVE_ENGINE__REMOTE__MAX_BACKOFF_S": "2",
                }
            args = ["--model", str(base), "--experts-dir", str(experts)]
            return stack.enter_context(server_process(args, tmp / f"{name}.log", env))

        yield Fleet(
            tmp,
            base,
            ports,
            vllm,
            mergeserve("mixture", True),
            mergeserve("materialized", False),
            mergeserve("local", True, remote=False),  # the in-process engine's mixture
            stack,
        )


def chat(server: ServerProcess, content: str, model: str = "dynamic:exact", **body: Any) -> Any:
    r = httpx.post(
        f"{server.base_url}/v1/chat/completions",
        json={
            "model": model,
            "messages": [{"role": "user", "content": content}],
            "temperature": 0,
            "max_tokens": 12,
            **body,
        },
        timeout=120,
    )
    return r


def served(url: str) -> float:
    """Requests a vLLM server finished (its own counter)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("vllm:request_success_total{")
    )


def endpoints(server: ServerProcess) -> dict[str, dict[str, Any]]:
    ready = httpx.get(f"{server.base_url}/ready", timeout=10)
    if ready.status_code != 200:
        return {}
    return {e["url"]: e for e in ready.json()["endpoints"]}


def adapters(url: str) -> set[str]:
    models = httpx.get(f"{url}/v1/models", timeout=10).json()["data"]
    return {m["root"] for m in models if m.get("parent")}


def test_both_servers_pass_the_self_check_and_hold_the_pinned_bundle(fleet: Fleet) -> None:
    ready = httpx.get(f"{fleet.mixture.base_url}/ready", timeout=10).json()
    assert ready["mixture"] is True
    assert {e["url"]: e["up"] for e in ready["endpoints"]} == dict.fromkeys(fleet.urls, True)
    # The bundle is registered on both servers (one root under the mixture's merge dir).
    merged = fleet.tmp / "mixture"
    roots = [{r for r in adapters(u) if Path(r).is_relative_to(merged)} for u in fleet.urls]
    assert roots[0]
    assert roots[0] == roots[1]


def test_the_mixture_over_two_servers_equals_the_local_mixture_and_the_merge(
    fleet: Fleet,
) -> None:
    assert httpx.get(f"{fleet.local.base_url}/ready", timeout=10).json()["mixture"] is True
    prompt = "Add 30 and 45."
    texts = []
    for w in WEIGHTINGS:
        mix = chat(fleet.mixture, prompt, merge_weights=w).json()
        ref = chat(fleet.materialized, prompt, merge_weights=w).json()
        local = chat(fleet.local, prompt, merge_weights=w).json()
        for other in (ref, local):
            assert mix["merge"]["weights"] == other["merge"]["weights"]
            text = other["choices"][0]["message"]["content"]
            assert mix["choices"][0]["message"]["content"] == text, w
            assert mix["usage"]["completion_tokens"] == other["usage"]["completion_tokens"]
        texts.append(mix["choices"][0]["message"]["content"])
    assert len(set(texts)) > 1


def test_requests_spread_over_both_servers(fleet: Fleet) -> None:
    before = [served(u) for u in fleet.urls]
    prompts = [f"Tell me about the number {i}." for i in range(12)]
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        replies = list(pool.map(lambda p: chat(fleet.mixture, p, model="base"), prompts))
    assert [r.status_code for r in replies] == [200] * 12
    after = [served(u) for u in fleet.urls]
    assert all(a > b for a, b in zip(after, before, strict=True)), (before, after)


def stream(server: ServerProcess, content: str, started: threading.Event) -> tuple[str, float]:
    """A streamed base request of 480 tokens: ('ok' or the error event's message, when it
    ended); `started` is set at its first token."""
    body = {
        "model": "base",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 480,
        "ignore_eos": True,
        "stream": True,
    }
    outcome = "no [DONE]"
    route = f"{server.base_url}/v1/chat/completions"
    with httpx.stream("POST", route, json=body, timeout=120) as r:
        if r.status_code != 200:
            return f"HTTP {r.status_code}", time.monotonic()
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                outcome = "ok" if outcome == "no [DONE]" else outcome
                break
            event = json.loads(line[6:])
            if "error" in event:
                outcome = event["error"]["message"]
            elif any(c.get("delta", {}).get("content") for c in event.get("choices", [])):
                started.set()  # a token (the first event carries only the role)
    return outcome, time.monotonic()


def test_a_killed_server_hangs_no_request_and_is_taken_back_once_healthy(fleet: Fleet) -> None:
    """Kill server 0 while 8 long streams are generating on the two; then start it again."""
    victim, url = fleet.vllm[0], fleet.urls[0]
    assert victim is not None
    n = 8
    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        for _ in range(5):  # a batch, until one is caught with all n streaming at once
            started = [threading.Event() for _ in range(n)]
            futures = [
                pool.submit(stream, fleet.mixture, f"Count to {i}.", started[i]) for i in range(n)
            ]
            on_victim = 0
            while not all(f.done() for f in futures):
                if all(e.is_set() for e in started):
                    on_victim = endpoints(fleet.mixture)[url]["outstanding"]
                    break
                time.sleep(0.01)
            if on_victim:
                break
            assert [f.result()[0] for f in futures] == ["ok"] * n
        assert on_victim > 0, "no batch had all its streams on both servers at once"
        killed = time.monotonic()
        kill_process_group(victim)
        fleet.vllm[0] = None
        results = [f.result(timeout=120) for f in futures]
    elapsed = time.monotonic() - killed
    failed = [(why, t - killed) for why, t in results if why != "ok"]
    # No request hung: every stream ended. Those streaming from the dead server (and only
    # those) ended with an error event naming it, at once; the others finished on the live
    # server.
    assert 1 <= len(failed) <= on_victim, results
    assert all(url in why for why, _ in failed), failed
    failed_after = max(t for _, t in failed)
    assert failed_after < 5
    assert elapsed < 90
    assert endpoints(fleet.mixture)[url]["up"] is False
    # Meanwhile the other server serves everything.
    assert chat(fleet.mixture, "Add 1 and 2.", merge_weights=WEIGHTINGS[0]).status_code == 200

    # Started again on the same port: taken back within 10 s of being healthy.
    back = fleet.stack.enter_context(
        vllm_server_process(
            fleet.base, fleet.tmp / "vllm0-again.log", VLLM_ARGS, PLUGIN, port=fleet.ports[0]
        )
    )
    healthy = time.monotonic()
    while not endpoints(fleet.mixture)[url]["up"]:
        assert time.monotonic() - healthy < 10, endpoints(fleet.mixture)
        time.sleep(0.1)
    recovery = time.monotonic() - healthy
    fleet.vllm[0] = back
    # The pinned bundle is registered on it again, and it serves requests again.
    merged = fleet.tmp / "mixture"
    assert any(Path(r).is_relative_to(merged) for r in adapters(url))
    prompt = "Add 30 and 45."
    mix = chat(fleet.mixture, prompt, merge_weights=WEIGHTINGS[1]).json()
    ref = chat(fleet.materialized, prompt, merge_weights=WEIGHTINGS[1]).json()
    assert mix["choices"][0]["message"]["content"] == ref["choices"][0]["message"]["content"]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda i: chat(fleet.mixture, f"Say {i}.", model="base"), range(8)))
    assert [r.status_code for r in replies] == [200] * 8
    assert served(url) > 0
    print(
        f"failover: {len(failed)} of {n} failed ({on_victim} were on the killed server), "
        f"failed {failed_after:.2f} s after the kill, all answered {elapsed:.1f} s after it; "
        f"taken back {recovery:.2f} s after healthy"
    )
