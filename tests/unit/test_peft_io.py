from __future__ import annotations

import json
from pathlib import Path

import pytest

from mergeserve.adapters.peft_io import discover_lora_dirs, read_lora_dir
from mergeserve.errors import AdapterError
from tests.conftest import write_fake_lora_dir


def test_reads_rank_alpha_targets(tmp_path: Path) -> None:
    d = write_fake_lora_dir(tmp_path / "ex1", rank=8, rank_pattern={"q_proj": 16})
    info = read_lora_dir(d)
    assert (info.name, info.rank, info.lora_alpha) == ("ex1", 16, 16.0)
    assert info.target_modules == ("q_proj", "v_proj")


def test_pickle_weights_are_refused(tmp_path: Path) -> None:
    d = write_fake_lora_dir(tmp_path / "p")
    (d / "adapter_model.safetensors").unlink()
    (d / "adapter_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(AdapterError, match="pickle"):
        read_lora_dir(d)


@pytest.mark.parametrize(
    ("config_text", "match"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        (json.dumps({"peft_type": "IA3", "r": 8}), "not LORA"),
        (json.dumps({"peft_type": "LORA"}), "'r' must be an integer"),
        (json.dumps({"r": 8.5}), "'r' must be an integer"),
        (json.dumps({"r": True}), "'r' must be an integer"),
        (json.dumps({"r": "8"}), "'r' must be an integer"),
        (json.dumps({"r": 8, "lora_alpha": "16"}), "'lora_alpha' must be a finite number"),
        ('{"r": 8, "lora_alpha": Infinity}', "'lora_alpha' must be a finite number"),
        (json.dumps({"r": 8, "base_model_name_or_path": False}), "a string or null"),
        (json.dumps({"r": 8, "base_model_name_or_path": 0}), "a string or null"),
        (json.dumps({"r": 8, "base_model_name_or_path": []}), "a string or null"),
        (json.dumps({"r": 8, "base_model_name_or_path": {}}), "a string or null"),
        (json.dumps({"r": 8, "target_modules": [1]}), "a list of strings"),
        (
            json.dumps({"r": 8, "rank_pattern": {"q": 4.5}}),
            "'rank_pattern' must be an object of integers",
        ),
        (json.dumps({"r": 8, "rank_pattern": [4]}), "'rank_pattern' must be an object"),
        (json.dumps({"r": 8, "alpha_pattern": {"x" * 300: 4}}), "1..256 characters"),
        (json.dumps({"r": 8, "alpha_pattern": {f"k{i}": 1 for i in range(1025)}}), "at most 1024"),
        (json.dumps({"r": 8, "use_rslora": "yes"}), "'use_rslora' must be true or false"),
        (json.dumps({"peft_type": "LORA", "r": 0}), "rank must be >= 1"),
    ],
)
def test_bad_configs_say_what_is_wrong(tmp_path: Path, config_text: str, match: str) -> None:
    d = write_fake_lora_dir(tmp_path / "bad")
    (d / "adapter_config.json").write_text(config_text)
    with pytest.raises(AdapterError, match=match):
        read_lora_dir(d)


def test_names_are_restricted(tmp_path: Path) -> None:
    d = write_fake_lora_dir(tmp_path / "ok")
    with pytest.raises(AdapterError, match="adapter name"):
        read_lora_dir(d, name="../escape")


def test_discovery_is_sorted_and_skips_non_adapters(tmp_path: Path) -> None:
    write_fake_lora_dir(tmp_path / "zeta")
    write_fake_lora_dir(tmp_path / "alpha")
    (tmp_path / "notes").mkdir()
    assert [i.name for i in discover_lora_dirs(tmp_path)] == ["alpha", "zeta"]
    with pytest.raises(AdapterError, match="does not exist"):
        discover_lora_dirs(tmp_path / "missing")
