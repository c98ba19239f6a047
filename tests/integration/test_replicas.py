"""Two mergeserve processes share one registry dir: each serves what the other hot-adds or
removes within 2 s (the manifest watch), with no restart. Real server processes on
loopback; the fake engine stands in for vLLM, which plays no part in the registry."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from mergeserve.server.admin import UPLOAD_FILES
from mergeserve.testing import ServerProcess, make_random_lora, make_tiny_llama, server_process

TOKEN = "replica-admin"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
DEADLINE_S = 2.0


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, ...]]:
    tmp = tmp_path_factory.mktemp("replicas")
    base = make_tiny_llama(tmp / "tiny-llama")
    for i, name in enumerate(("alpha", "beta"), start=1):
        d = make_random_lora(base, tmp / "experts" / name, rank=4, seed=i)
        (d / "examples.jsonl").write_text(json.dumps({"prompt": f"a question for {name}"}) + "\n")
    make_random_lora(base, tmp / "fresh", rank=4, seed=9)
    (tmp / "fresh" / "examples.jsonl").write_text(json.dumps({"prompt": "translate this"}) + "\n")
    env = {
        "MERGESERVE_ADMIN__TOKEN": TOKEN,
        "MERGESERVE_ADMIN__REGISTRY_DIR": str(tmp / "registry"),
        "MERGESERVE_MERGE__STATIC_METHODS": '["linear"]',
    }
    args = ["--engine", "fake", "--model", str(base), "--experts-dir", str(tmp / "experts")]
    with contextlib.ExitStack() as stack:
        servers = tuple(
            stack.enter_context(
                server_process(args, tmp / f"{r}.log", env | {"MERGESERVE_CACHE": str(tmp / r)})
            )
            for r in ("a", "b")
        )
        yield (*servers, tmp / "fresh")  # type: ignore[misc]


def models(server: ServerProcess) -> set[str]:
    data = httpx.get(f"{server.base_url}/v1/models", timeout=10).json()["data"]
    return {m["id"] for m in data}


def wait_for(server: ServerProcess, present: bool, since: float) -> float:
    """Seconds from `since` until `expert:fresh` is (or is no longer) served by `server`."""
    while time.monotonic() - since < 30:
        if ("expert:fresh" in models(server)) == present:
            return time.monotonic() - since
        time.sleep(0.05)
    raise AssertionError(f"{server.base_url} never {'served' if present else 'dropped'} fresh")


def ask(server: ServerProcess, model: str, **extra: object) -> dict:
    r = httpx.post(
        f"{server.base_url}/v1/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": "hi"}], **extra},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    body: dict = r.json()
    return body


def test_a_hot_add_on_one_replica_is_served_by_the_other(replicas: tuple) -> None:
    a, b, fresh = replicas
    assert "expert:fresh" not in models(a) | models(b)
    files = [("files", (f, (fresh / f).read_bytes())) for f in UPLOAD_FILES]
    r = httpx.post(
        f"{a.base_url}/admin/experts", headers=AUTH, data={"name": "fresh"}, files=files, timeout=60
    )
    assert r.status_code == 201, r.text
    seen = wait_for(b, present=True, since=time.monotonic())
    print(f"\nreplica b served the expert added on a {seen:.2f} s after the POST's answer")
    assert seen < DEADLINE_S, f"replica b served the new expert {seen:.2f} s after the add"
    assert ask(b, "expert:fresh")["choices"][0]["message"]["content"].startswith("[expert:fresh]")
    merge = ask(b, "dynamic:exact", merge_weights={"fresh": 1})["merge"]
    assert merge["weights"] == {"fresh": 1.0}
    listing = httpx.get(f"{b.base_url}/admin/experts", headers=AUTH, timeout=10).json()
    fresh_entry = next(e for e in listing["experts"] if e["name"] == "fresh")
    assert fresh_entry["source"] == "registry"


def test_a_removal_on_one_replica_is_dropped_by_the_other(replicas: tuple) -> None:
    a, b, _ = replicas
    assert "expert:fresh" in models(a)
    assert "expert:fresh" in models(b)
    # The DELETE answers only after the removal grace (files are deleted once no replica
    # can still use them); the other replica must drop the expert well before that.
    with ThreadPoolExecutor(1) as pool:
        t0 = time.monotonic()
        pending = pool.submit(
            httpx.delete, f"{b.base_url}/admin/experts/fresh", headers=AUTH, timeout=60
        )
        gone = wait_for(a, present=False, since=t0)
        r = pending.result()
    assert r.status_code == 200, r.text
    print(f"\nreplica a dropped the expert removed on b {gone:.2f} s after the DELETE was sent")
    assert gone < DEADLINE_S
    r = httpx.post(
        f"{a.base_url}/v1/chat/completions",
        json={"model": "expert:fresh", "messages": [{"role": "user", "content": "hi"}]},
        timeout=30,
    )
    assert r.status_code == 404
    assert r.json()["error"]["type"] == "not_found_error"
