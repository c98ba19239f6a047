"""Bad input against the real server (real vLLM): every case of benchmarks/reliability.py
gets its 4xx OpenAI-shaped error, and the registry, its manifest and /v1/models stay
byte-identical."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.reliability import CASES, Target, run_cases, table
from tests.e2e.conftest import ADMIN_TOKEN, MAX_UPLOAD_BYTES, RealServer

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]


def test_every_bad_input_is_a_4xx_and_changes_nothing(
    real_server: RealServer, tmp_path: Path
) -> None:
    if real_server.name != "tiny-llama":
        pytest.skip("the cases build adapters of the base model: the tiny llama is enough")
    target = Target(
        real_server.base_url,
        ADMIN_TOKEN,
        real_server.registry,
        real_server.allowed,
        real_server.base,
        tmp_path / "work",
        "rand",
        MAX_UPLOAD_BYTES,
    )
    rows = run_cases(target)
    print("\n" + table(rows))
    assert len(rows) == len(CASES)
    for row in rows:
        assert 400 <= row.status < 500, row
        assert row.ok, row
