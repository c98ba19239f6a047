"""mergeserve.testing's server helpers (the e2e tier's fixtures stand on them)."""

from __future__ import annotations

import sys
from pathlib import Path

import httpx
import pytest

from mergeserve.testing import _on_a_port

TAKEN = [sys.executable, "-c", "print('[Errno 98] address already in use'); raise SystemExit(3)"]


def test_a_server_whose_port_was_taken_meanwhile_starts_on_another(tmp_path: Path) -> None:
    (tmp_path / "health").write_text("ok")  # http.server answers /health with this file
    ports: list[int] = []

    def cmd(port: int) -> list[str]:
        ports.append(port)
        if len(ports) == 1:
            return TAKEN
        return [
            sys.executable,
            "-m",
            "http.server",
            str(port),
            "--bind",
            "127.0.0.1",
            "--directory",
            str(tmp_path),
        ]

    with _on_a_port(cmd, None, tmp_path / "log", None, 60) as p:
        assert httpx.get(f"{p.base_url}/health", timeout=5).status_code == 200
        assert p.base_url.endswith(f":{ports[-1]}")
    assert len(ports) == 2


def test_a_given_port_is_not_changed(tmp_path: Path) -> None:
    with (
        pytest.raises(RuntimeError, match="address already in use"),
        _on_a_port(lambda p: TAKEN, 12345, tmp_path / "log", None, 60),
    ):
        pass
