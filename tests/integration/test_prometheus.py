"""A real Prometheus (Debian's package) scrapes /metrics of the real app over HTTP."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from mergeserve.config import Settings
from mergeserve.runtime.engine import FakeEngine
from mergeserve.server.app import create_app
from mergeserve.testing import free_port
from tests.integration.conftest import uvicorn_in_thread


@pytest.fixture
def prometheus_bin() -> str:
    path = shutil.which("prometheus")
    if path is None:
        pytest.fail("prometheus is missing: `make test` installs Debian's prometheus package")
    return path


def start_prometheus(binary: str, target: str, work: Path) -> Iterator[str]:
    port = free_port()
    config = work / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
        "scrape_configs:\n  - job_name: mergeserve\n"
        f"    static_configs:\n      - targets: ['{target}']\n"
    )
    log = (work / "prometheus.log").open("w")
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={work / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def query(url: str, promql: str) -> list[dict[str, Any]]:
    r = httpx.get(f"{url}/api/v1/query", params={"query": promql}, timeout=5)
    r.raise_for_status()
    result: list[dict[str, Any]] = r.json()["data"]["result"]
    return result


def wait_for(url: str, promql: str, want: float, timeout: float = 30) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    last: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        try:
            last = query(url, promql)
        except httpx.HTTPError:
            last = []
        if last and float(last[0]["value"][1]) == want:
            return last
        time.sleep(0.25)
    raise AssertionError(f"{promql} never reached {want}; last: {last}")


def test_prometheus_scrapes_arm_router_and_merge_metrics(
    prometheus_bin: str, experts_dir: Path, tmp_path: Path
) -> None:
    settings = Settings(model=None, experts_dir=experts_dir, cache=tmp_path / "cache")
    app = create_app(settings, FakeEngine(context_len=256))
    with uvicorn_in_thread(app) as base_url:
        client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)
        for content in ("What is 2 plus 2?", "What is the capital of Peru?", "Add 4 and 9."):
            client.chat.completions.create(
                model="dynamic", messages=[{"role": "user", "content": content}]
            )
        client.chat.completions.create(
            model="static:ties", messages=[{"role": "user", "content": "hi"}]
        )
        target = base_url.removeprefix("http://")
        for url in start_prometheus(prometheus_bin, target, tmp_path):
            wait_for(url, 'up{job="mergeserve"}', 1)
            got = wait_for(url, 'mergeserve_requests_total{arm="dynamic:exact",status="ok"}', 3)
            print(f"\nPrometheus /api/v1/query mergeserve_requests_total: {got}")
            wait_for(url, 'mergeserve_requests_total{arm="static:ties",status="ok"}', 1)
            wait_for(url, "sum(mergeserve_merge_latency_seconds_count)", 3)
            wait_for(url, "mergeserve_router_latency_seconds_count", 3)
            experts = query(url, "mergeserve_expert_weight_count")
            assert {e["metric"]["expert"] for e in experts} == {"alpha", "beta"}
            wait_for(url, "mergeserve_registry_version", 1)
