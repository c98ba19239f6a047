"""What the hot-add benchmarks share (hot_add.py, load.py): a real server with the demo
experts minus the one to add and the admin API on, the mixed-task test prompts, the
upload, and the probe that times the first request routed to the new expert.

The scripts import this as a sibling (`python benchmarks/x.py` puts benchmarks/ on the path).
"""

from __future__ import annotations

import asyncio
import itertools
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import httpx

from mergeserve.config import default_experts_dir
from mergeserve.server.admin import UPLOAD_FILES
from mergeserve.tasks import TASKS, generate
from mergeserve.testing import ServerProcess, demo_experts_without, server_process

T = TypeVar("T")


def task_test_prompts(per_task: int = 60) -> dict[str, list[str]]:
    """Test-split prompts of each of the six tasks."""
    return {t: [s.prompt for s in generate(t, "test", per_task)] for t in TASKS}


def interleaved(prompts: Mapping[str, Sequence[str]]) -> Iterator[tuple[str, str]]:
    """(task, prompt) of each task in turn, forever: a mixed-task workload."""
    rows = [
        (t, p)
        for group in zip(*prompts.values(), strict=True)
        for t, p in zip(prompts, group, strict=True)
    ]
    return itertools.cycle(rows)


@dataclass(frozen=True)
class HotAddServer:
    server: ServerProcess
    expert: str
    """The expert held out, to upload."""
    expert_dir: Path
    token: str

    @property
    def base_url(self) -> str:
        return self.server.base_url


@contextmanager
def hot_add_server(
    expert: str, *, threads: int | None, token: str, env: Mapping[str, str] | None = None
) -> Iterator[HotAddServer]:
    """`mergeserve serve` (real vLLM, the embedded SmolLM2-135M-Instruct) with the demo
    experts but `expert`, the admin API on (bearer `token`) over a scratch registry, no
    static merges (saves start-up), `threads` engine threads (None: the engine's default,
    as `make serve` runs); `env` adds settings."""
    experts = default_experts_dir()
    if experts is None:
        raise SystemExit("run from a checkout: the demo experts are in examples/experts")
    with tempfile.TemporaryDirectory() as tmp:
        served = demo_experts_without(expert, Path(tmp) / "experts")
        full_env = {
            **({} if threads is None else {"MERGESERVE_ENGINE__CPU_THREADS": str(threads)}),
            "MERGESERVE_MERGE__STATIC_METHODS": "[]",
            "MERGESERVE_ADMIN__TOKEN": token,
            "MERGESERVE_ADMIN__REGISTRY_DIR": str(Path(tmp) / "registry"),
            **(env or {}),
        }
        log = Path(tmp) / "server.log"
        with server_process(["--experts-dir", str(served)], log, full_env) as s:
            yield HotAddServer(s, expert, experts / expert, token)


@dataclass(frozen=True)
class Upload:
    response: httpx.Response
    started: float
    """time.perf_counter() when the POST was sent."""
    seconds: float


async def upload_expert(server: HotAddServer, timeout_s: float = 600) -> Upload:
    """`POST /admin/experts` of the held-out expert's files."""
    files = [("files", (f, (server.expert_dir / f).read_bytes())) for f in UPLOAD_FILES]
    async with httpx.AsyncClient(base_url=server.base_url, timeout=timeout_s) as http:
        t0 = time.perf_counter()
        r = await http.post(
            "/admin/experts",
            headers={"Authorization": f"Bearer {server.token}"},
            data={"name": server.expert},
            files=files,
        )
        return Upload(r, t0, time.perf_counter() - t0)


async def probe_until_routed(
    send: Callable[[str], Awaitable[T]],
    routed: Callable[[T], bool],
    prompts: Sequence[str],
    stop: asyncio.Event,
    *,
    every_s: float = 0.1,
    limit: int = 300,
) -> list[T]:
    """From now on, `send` one of the new task's `prompts` every `every_s`, each on its own
    (a mixed load reaches the new task only every sixth request), until one is `routed` to
    the new expert, `stop` is set or `limit` were sent; every probe's result once all end."""
    results: list[T] = []
    pending = []

    async def probe(prompt: str) -> None:
        r = await send(prompt)
        results.append(r)
        if routed(r):
            stop.set()

    for i in range(limit):
        if stop.is_set():
            break
        pending.append(asyncio.create_task(probe(prompts[i % len(prompts)])))
        await asyncio.sleep(every_s)
    await asyncio.gather(*pending)
    return results
