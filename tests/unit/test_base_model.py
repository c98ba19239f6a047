from __future__ import annotations

import multiprocessing as mp
import time
from pathlib import Path

import pytest

from mergeserve.errors import ConfigurationError
from mergeserve.runtime.base_model import (
    EMBEDDED_GGUF,
    ensure_embedded_model,
    find_embedded_gguf,
    resolve_base_model,
)


def test_embedded_gguf_is_found_in_the_installed_distribution() -> None:
    path = find_embedded_gguf()
    assert path.name == EMBEDDED_GGUF
    assert path.stat().st_size > 50_000_000


def test_missing_distribution_is_a_clear_error() -> None:
    with pytest.raises(ConfigurationError, match="install it"):
        find_embedded_gguf("no-such-distribution-xyz")


def _slow_converter(gguf: Path, out: Path) -> None:
    # Count every conversion in a log beside the gguf; slow enough for the race to happen.
    with (gguf.parent / "conversions.log").open("a") as f:
        f.write("x\n")
    time.sleep(1.0)
    (out / "config.json").write_text("{}")
    (out / "model.safetensors").write_text("w")


def _convert_in_child(cache: str, gguf: str, q: mp.Queue) -> None:  # type: ignore[type-arg]
    q.put(str(ensure_embedded_model(Path(cache), Path(gguf), converter=_slow_converter)))


def test_two_processes_convert_once_and_agree(tmp_path: Path) -> None:
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"gguf" * 1000)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [
        ctx.Process(target=_convert_in_child, args=(str(tmp_path / "cache"), str(gguf), q))
        for _ in range(2)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    results = {q.get(timeout=5), q.get(timeout=5)}
    assert len(results) == 1
    assert (tmp_path / "conversions.log").read_text() == "x\n"
    final = Path(results.pop())
    assert (final / "config.json").is_file()
    # Nothing half-written is left beside it.
    assert [p.name for p in final.parent.iterdir() if p.name.startswith(".convert-")] == []


def test_failed_conversion_leaves_no_model_and_is_retried(tmp_path: Path) -> None:
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"gguf")

    def broken(_: Path, out: Path) -> None:
        (out / "model.safetensors").write_text("partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        ensure_embedded_model(tmp_path, gguf, converter=broken)
    assert [p for p in (tmp_path / "models").iterdir() if p.is_dir()] == []
    final = ensure_embedded_model(tmp_path, gguf, converter=_slow_converter)
    assert (final / "config.json").is_file()


def test_a_converter_that_writes_no_config_is_refused(tmp_path: Path) -> None:
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"gguf")
    with pytest.raises(ConfigurationError, match=r"wrote no config\.json"):
        ensure_embedded_model(tmp_path, gguf, converter=lambda g, o: None)


def test_user_model_dir_must_be_a_hf_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="not a Hugging Face model dir"):
        resolve_base_model(tmp_path, tmp_path / "cache")
    (tmp_path / "config.json").write_text("{}")
    assert resolve_base_model(tmp_path, tmp_path / "cache") == tmp_path
