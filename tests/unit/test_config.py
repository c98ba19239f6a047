from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from mergeserve.cli import build_parser, settings_from_args
from mergeserve.config import Settings


def test_nested_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MERGESERVE_ENGINE__DTYPE", "bfloat16")
    monkeypatch.setenv("MERGESERVE_ENGINE__MAX_LORA_RANK", "32")
    monkeypatch.setenv("MERGESERVE_SERVER__PORT", "9123")
    monkeypatch.setenv("MERGESERVE_CACHE", "/tmp/x")
    s = Settings()
    assert (s.engine.dtype, s.engine.max_lora_rank, s.server.port) == ("bfloat16", 32, 9123)
    assert s.cache == Path("/tmp/x")


def test_rank_must_be_one_vllm_accepts() -> None:
    with pytest.raises(ValidationError, match="max_lora_rank must be one of"):
        Settings(engine={"max_lora_rank": 12})  # type: ignore[arg-type]


def test_dtype_is_never_auto() -> None:
    assert Settings().engine.dtype == "float32"
    with pytest.raises(ValidationError):
        Settings(engine={"dtype": "auto"})  # type: ignore[arg-type]


def test_cli_options_override_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MERGESERVE_SERVER__PORT", "9123")
    args = build_parser().parse_args(
        ["serve", "--port", "8100", "--experts-dir", "none", "--model", "/m", "--engine", "fake"]
    )
    s = settings_from_args(args)
    assert (s.server.port, s.experts_dir, s.model, s.engine.kind) == (
        8100,
        None,
        Path("/m"),
        "fake",
    )


def test_settings_instances_do_not_share_nested_defaults() -> None:
    a, b = Settings(), Settings()
    a.server.port = 1
    assert b.server.port == 8000


def test_an_empty_admin_token_turns_admin_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MERGESERVE_ADMIN__TOKEN", "")
    assert Settings().admin.token is None
    monkeypatch.setenv("MERGESERVE_ADMIN__TOKEN", "s3cret")
    token = Settings().admin.token
    assert token is not None
    assert token.get_secret_value() == "s3cret"
