"""kill -9 during a hot-add, then restart: the previous or the new version loads, never a
torn one. At two levels: a process adding experts to the registry in a loop, killed at
many points; and the real server killed while it answers POST /admin/experts."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from mergeserve.adapters.registry import ExpertRegistry
from mergeserve.failpoints import ENV as FAILPOINTS
from mergeserve.failpoints import HOT_ADD
from mergeserve.server.admin import UPLOAD_FILES
from mergeserve.testing import make_random_lora, make_tiny_llama, server_process

TOKEN = "faults-admin"
AUTH = {"Authorization": f"Bearer {TOKEN}"}

_ADDER = """
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from safetensors.torch import load_file, save_file
from mergeserve.adapters.registry import ExpertRegistry
from mergeserve.failpoints import ENV as FAILPOINTS
from mergeserve.failpoints import HOT_ADD
root, src, work = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
reg = ExpertRegistry.open(root, shared=True)
tensors = load_file(src / "adapter_model.safetensors")
first = next(iter(tensors))
start = len(reg.snapshot())
print("ready", flush=True)
for i in range(start, start + 10_000):
    # A distinct expert each time: every add copies, fsyncs and commits new content.
    d = work / f"e{i}"
    d.mkdir()
    (d / "adapter_config.json").write_bytes((src / "adapter_config.json").read_bytes())
    tensors[first][0, 0] = float(i)
    save_file(tensors, d / "adapter_model.safetensors")
    reg.add(f"e{i}", d)
"""


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("faults") / "tiny-llama")


def check_intact(root: Path) -> int:
    """Open the registry as a restarted server does; assert nothing torn; the count."""
    with ExpertRegistry.open(root, shared=True) as reg:
        snap = reg.snapshot()
        names = sorted(snap.names, key=lambda n: int(n[1:]))
        # Adds commit in order, each with version + 1: a prefix of them, no gaps.
        assert names == [f"e{i}" for i in range(len(names))]
        assert snap.version == len(names)
        assert reg.verify() == ()  # every committed object hashes to its digest
        objects = sorted(p.name for p in (root / "objects").iterdir())
        assert objects == sorted(snap.digests)  # leftovers of the killed add: collected
        assert not (root / "manifest.json.tmp").exists()
        return len(names)


def test_kill_9_during_registry_adds_leaves_the_previous_or_the_new_version(
    base: Path, tmp_path: Path
) -> None:
    src = make_random_lora(base, tmp_path / "src", rank=8)
    root = tmp_path / "registry"
    rng = random.Random(9)
    counts = []
    for kill in range(10):
        work = tmp_path / f"work{kill}"
        work.mkdir()
        proc = subprocess.Popen(
            [sys.executable, "-c", _ADDER, str(root), str(src), str(work)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.05, 0.6))  # somewhere inside some add
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        counts.append(check_intact(root))
    assert counts == sorted(counts)
    assert counts[-1] > counts[0] > 0  # the kills landed among real adds


def _stopped(pid: int, timeout_s: float = 120) -> bool:
    """Wait until process `pid` is stopped (SIGSTOP at a failpoint)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat[stat.rindex(")") + 2] == "T":
            return True
        time.sleep(0.05)
    return False


def test_kill_9_at_every_stage_of_a_server_add_then_restart(base: Path, tmp_path: Path) -> None:
    """The server stops itself at one named stage of POST /admin/experts (a failpoint),
    is killed there, and restarts: an add killed before its manifest is durable is gone,
    one killed after is served; the registry is intact and every listed expert answers."""
    experts = tmp_path / "experts"
    d = make_random_lora(base, experts / "alpha", rank=4, seed=1)
    (d / "examples.jsonl").write_text(json.dumps({"prompt": "alpha"}) + "\n")
    env = {
        "MERGESERVE_ADMIN__TOKEN": TOKEN,
        "MERGESERVE_ADMIN__REGISTRY_DIR": str(tmp_path / "registry"),
        "MERGESERVE_CACHE": str(tmp_path / "cache"),
        "MERGESERVE_MERGE__STATIC_METHODS": '["linear"]',
    }
    args = ["--engine", "fake", "--model", str(base), "--experts-dir", str(experts)]

    def upload(url: str, name: str, seed: int) -> httpx.Response:
        u = make_random_lora(base, tmp_path / name, rank=4, seed=seed)
        (u / "examples.jsonl").write_text(json.dumps({"prompt": name}) + "\n")
        files = [("files", (f, (u / f).read_bytes())) for f in UPLOAD_FILES]
        return httpx.post(
            f"{url}/admin/experts", headers=AUTH, data={"name": name}, files=files, timeout=300
        )

    expected = {"alpha"}
    stages: list[str | None] = [*HOT_ADD, None]  # the last start only checks the last kill
    for i, stage in enumerate(stages):
        log = tmp_path / f"server{i}.log"
        with server_process(args, log, env | {FAILPOINTS: stage or ""}) as p:
            listing = httpx.get(f"{p.base_url}/admin/experts", headers=AUTH, timeout=10).json()
            assert {e["name"] for e in listing["experts"]} == expected, stages[i - 1]
            for name in expected:  # every expert it lists answers
                r = httpx.post(
                    f"{p.base_url}/v1/chat/completions",
                    json={
                        "model": f"expert:{name}",
                        "messages": [{"role": "user", "content": "x"}],
                    },
                    timeout=30,
                )
                assert r.status_code == 200, r.text
            with ExpertRegistry.open(tmp_path / "registry", shared=True) as reg:
                assert reg.verify() == ()
            if stage is None:
                break
            with ThreadPoolExecutor(1) as pool:
                pending = pool.submit(upload, p.base_url, f"up{i}", 10 + i)
                assert _stopped(p.pid), f"the server never reached {stage}"
                assert f"failpoint {stage} reached" in log.read_text()
                os.kill(p.pid, signal.SIGKILL)
                with pytest.raises(httpx.HTTPError):
                    pending.result()
        # Durable from the commit on: the next start serves it.
        if HOT_ADD.index(stage) >= HOT_ADD.index("hot_add.committed"):
            expected = expected | {f"up{i}"}
    with ExpertRegistry.open(tmp_path / "registry", shared=True) as reg:
        assert reg.verify() == ()
        assert sorted(reg.snapshot().names) == sorted(expected - {"alpha"})
        assert sorted(p.name for p in (tmp_path / "registry" / "objects").iterdir()) == sorted(
            reg.snapshot().digests
        )
