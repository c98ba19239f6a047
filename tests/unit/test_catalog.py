from __future__ import annotations

from pathlib import Path

import pytest

from mergeserve.adapters.peft_io import discover_lora_dirs
from mergeserve.errors import ConfigurationError, ModelNotFoundError
from mergeserve.runtime.materialize import IdAllocator
from mergeserve.service.catalog import ModelCatalog


def test_base_and_one_model_per_expert_with_distinct_ids(experts_dir: Path) -> None:
    cat = ModelCatalog.build(Path("/base"), discover_lora_dirs(experts_dir), max_lora_rank=16)
    assert [m.id for m in cat] == ["base", "expert:alpha", "expert:beta"]
    assert cat.resolve("base").lora is None
    ids = {cat.resolve(n).lora.int_id for n in ("expert:alpha", "expert:beta")}  # type: ignore[union-attr]
    assert ids == {1, 2}


def test_unknown_model(experts_dir: Path) -> None:
    cat = ModelCatalog.build(Path("/base"), [], max_lora_rank=16)
    with pytest.raises(ModelNotFoundError) as e:
        cat.resolve("expert:alpha")
    assert (e.value.status_code, e.value.code, e.value.param) == (404, "model_not_found", "model")


def test_rank_above_slot_size_fails_at_start_naming_the_expert(experts_dir: Path) -> None:
    with pytest.raises(ConfigurationError, match=r"alpha \(r=8\)"):
        ModelCatalog.build(Path("/base"), discover_lora_dirs(experts_dir), max_lora_rank=1)


def test_static_and_dynamic_models_share_one_id_space(experts_dir: Path) -> None:
    infos = discover_lora_dirs(experts_dir)
    ids = IdAllocator(1)
    cat = ModelCatalog.build(
        Path("/base"),
        infos,
        max_lora_rank=16,
        static={"ties": infos[0]},
        dynamic_default="twin",
        ids=ids,
    )
    assert [m.id for m in cat] == [
        "base",
        "expert:alpha",
        "expert:beta",
        "static:ties",
        "dynamic:twin",
        "dynamic:exact",
        "dynamic",
        "route:top1",
    ]
    assert cat.resolve("static:ties").lora.int_id == 3  # type: ignore[union-attr]
    assert ids() == 4  # merged adapters get ids after every fixed one
    alias = cat.resolve("dynamic")
    assert (alias.kind, alias.mode, alias.arm, alias.lora) == (
        "dynamic",
        "twin",
        "dynamic:twin",
        None,
    )
    assert cat.resolve("dynamic:exact").arm == "dynamic:exact"
    assert dict(cat.resolve("expert:beta").weights) == {"beta": 1.0}
    assert "dynamic" in cat
    assert "dynamic:other" not in cat
