"""ExpertRegistry on real PEFT LoRA dirs: content identity, atomic commits, leases."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergeserve.adapters.registry import (
    ExpertBusyError,
    ExpertExistsError,
    ExpertGoneError,
    ExpertNotFoundError,
    ExpertRef,
    ExpertRegistry,
    RegistrySnapshot,
)
from mergeserve.errors import AdapterError, ConfigurationError
from mergeserve.testing import make_random_lora, make_tiny_llama

WEIGHTS = "adapter_model.safetensors"


@pytest.fixture(scope="module")
def loras(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two real PEFT LoRA dirs (different random weights) for a one-layer tiny llama."""
    d = tmp_path_factory.mktemp("loras")
    base = make_tiny_llama(
        d / "base", hidden_size=64, num_layers=1, num_heads=2, intermediate_size=96
    )
    return {
        seed: make_random_lora(
            base, d / seed, rank=2, alpha=4, target_modules=["q_proj", "v_proj"], seed=i
        )
        for i, seed in enumerate(("a", "b"), start=1)
    }


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "registry"


@pytest.fixture
def reg(root: Path) -> Iterator[ExpertRegistry]:
    with ExpertRegistry.open(root) as r:
        yield r


def _variant(src: Path, dst: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / WEIGHTS))
    edit(tensors)
    save_file(tensors, str(dst / WEIGHTS))
    return dst


def _first(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    return tensors[sorted(tensors)[0]]


def _disk(root: Path) -> tuple[bytes | None, list[str]]:
    """Manifest bytes and every path under the root: what a failed change must not touch."""
    manifest = root / "manifest.json"
    listing = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    return (manifest.read_bytes() if manifest.exists() else None), listing


def _objects(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "objects").iterdir())


def _wait_until(cond: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_add_list_and_reload_round_trip(
    reg: ExpertRegistry, root: Path, loras: dict[str, Path]
) -> None:
    reg.add("alpha", loras["a"])
    snap = reg.add("beta", loras["b"])
    assert snap is reg.snapshot()
    assert (snap.version, snap.names, len(snap)) == (2, ("alpha", "beta"), 2)
    ref = snap["alpha"]
    assert ref.rank == 2
    assert set(ref.target_modules) == {"q_proj", "v_proj"}
    assert ref.path == root.resolve() / "objects" / ref.digest
    assert ref.size_bytes == sum(p.stat().st_size for p in ref.path.iterdir())
    # Weights, config and the README PEFT writes are copied byte for byte.
    for f in ("adapter_config.json", WEIGHTS, "README.md"):
        assert (ref.path / f).read_bytes() == (loras["a"] / f).read_bytes()
    doc = json.loads((root / "manifest.json").read_text())
    assert (doc["format"], doc["version"], sorted(doc["experts"])) == (1, 2, ["alpha", "beta"])
    assert doc["experts"]["beta"]["digest"] == snap["beta"].digest
    reg.close()
    with ExpertRegistry.open(root) as again:
        assert again.snapshot() == snap
        assert again.snapshot()["alpha"] == ref
        assert again.verify() == ()


def test_same_content_under_two_names_is_stored_once(
    reg: ExpertRegistry, root: Path, loras: dict[str, Path]
) -> None:
    reg.add("x", loras["a"])
    snap = reg.add("y", loras["a"])
    assert snap["x"].digest == snap["y"].digest
    assert _objects(root) == [snap["x"].digest]
    reg.remove("x")
    assert _objects(root) == [snap["x"].digest]  # y still points at it
    reg.remove("y")
    assert _objects(root) == []


def test_digest_is_the_content(reg: ExpertRegistry, tmp_path: Path, loras: dict[str, Path]) -> None:
    def nudge(t: dict[str, torch.Tensor]) -> None:
        _first(t)[0, 0] += 1e-3

    base = reg.add("a", loras["a"])["a"].digest
    moved = shutil.copytree(loras["a"], tmp_path / "elsewhere")
    assert reg.add("moved", moved)["moved"].digest == base  # the path plays no part

    # Hidden files, pickles and subdirs are neither hashed nor copied.
    noisy = shutil.copytree(loras["a"], tmp_path / "noisy")
    (noisy / ".DS_Store").write_bytes(b"junk")
    (noisy / "training_args.bin").write_bytes(b"pickle")
    (noisy / "checkpoint-10").mkdir()
    (noisy / "checkpoint-10" / "x").write_bytes(b"x")
    ref = reg.add("noisy", noisy)["noisy"]
    assert ref.digest == base
    assert sorted(p.name for p in ref.path.iterdir()) == [
        "README.md",
        "adapter_config.json",
        WEIGHTS,
    ]

    changed = _variant(loras["a"], tmp_path / "changed", nudge)
    assert reg.add("changed", changed)["changed"].digest != base
    card = shutil.copytree(loras["a"], tmp_path / "card")
    (card / "examples.jsonl").write_text('{"prompt": "hi"}\n')
    ref = reg.add("card", card)["card"]
    assert ref.digest != base
    assert (ref.path / "examples.jsonl").read_text() == '{"prompt": "hi"}\n'
    assert reg.add("b", loras["b"])["b"].digest != base


def _pickle_only(d: Path) -> None:
    (d / WEIGHTS).rename(d / "adapter_model.bin")


def _nan(d: Path) -> None:
    t = load_file(str(d / WEIGHTS))
    _first(t)[0, 0] = float("nan")
    save_file(t, str(d / WEIGHTS))


def _bad_config(d: Path) -> None:
    (d / "adapter_config.json").write_text("{not json")


def _no_rank(d: Path) -> None:
    cfg = json.loads((d / "adapter_config.json").read_text())
    del cfg["r"]
    (d / "adapter_config.json").write_text(json.dumps(cfg))


def _huge_extra(d: Path) -> None:
    with (d / "examples.jsonl").open("wb") as f:
        f.truncate(17 << 20)  # sparse: over the 16 MiB cap without writing it


@pytest.mark.parametrize(
    ("name", "edit", "error", "match"),
    [
        ("a", None, ExpertExistsError, "already exists"),
        ("../evil", None, AdapterError, "adapter name"),
        ("new", _pickle_only, AdapterError, "pickle"),
        ("new", _nan, AdapterError, "NaN"),
        ("new", _bad_config, AdapterError, "not valid JSON"),
        ("new", _no_rank, AdapterError, "'r'"),
        ("new", _huge_extra, AdapterError, "over the limit"),
    ],
    ids=["duplicate", "bad-name", "pickle", "nan", "bad-config", "no-rank", "huge-extra"],
)
def test_failed_add_changes_nothing(
    reg: ExpertRegistry,
    root: Path,
    tmp_path: Path,
    loras: dict[str, Path],
    name: str,
    edit: Callable[[Path], None] | None,
    error: type[Exception],
    match: str,
) -> None:
    reg.add("a", loras["a"])
    before, snap = _disk(root), reg.snapshot()
    src = shutil.copytree(loras["b"], tmp_path / "candidate")
    if edit is not None:
        edit(src)
    with pytest.raises(error, match=match) as e:
        reg.add(name, src)
    assert _disk(root) == before
    assert reg.snapshot() is snap
    # Errors name the caller's dir, never the staging copy.
    assert ".tmp-" not in str(e.value)


def test_validator_refusal_changes_nothing(root: Path, loras: dict[str, Path]) -> None:
    seen: list[Path] = []

    def refuse_b(path: Path) -> None:
        seen.append(path)
        if (path / WEIGHTS).read_bytes() == (loras["b"] / WEIGHTS).read_bytes():
            raise ValueError("wrong base model")

    with ExpertRegistry.open(root, refuse_b) as reg:
        reg.add("a", loras["a"])
        before, snap = _disk(root), reg.snapshot()
        with pytest.raises(ValueError, match="wrong base model"):
            reg.add("b", loras["b"])
        assert (_disk(root), reg.snapshot()) == (before, snap)
    # The validator saw the staged copy, the bytes that would be stored.
    assert seen
    assert all(p.parent.parent == root.resolve() / "objects" for p in seen)


def _failing_fsync(target: Path) -> Callable[[int], None]:
    real = os.fsync

    def fsync(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}") == str(target):
            raise OSError(errno.EIO, "injected fsync failure")
        real(fd)

    return fsync


def _failing_replace(src: object, dst: object) -> None:
    raise OSError(errno.EIO, "injected replace failure")


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
@pytest.mark.parametrize("where", ["replace", "fsync-temp-manifest", "fsync-root-dir"])
def test_failure_while_committing_the_manifest_changes_nothing(
    reg: ExpertRegistry,
    root: Path,
    loras: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
    where: str,
) -> None:
    reg.add("a", loras["a"])
    before, snap = _disk(root), reg.snapshot()
    if where == "replace":
        monkeypatch.setattr(os, "replace", _failing_replace)
    elif where == "fsync-temp-manifest":
        monkeypatch.setattr(os, "fsync", _failing_fsync(root.resolve() / "manifest.json.tmp"))
    else:  # after the rename: the old manifest must be put back
        monkeypatch.setattr(os, "fsync", _failing_fsync(root.resolve()))
    with pytest.raises(OSError, match="injected"):
        reg.add("b", loras["b"])
    assert _disk(root) == before
    assert reg.snapshot() is snap
    monkeypatch.undo()
    assert reg.add("b", loras["b"]).version == snap.version + 1  # and it still works


_CRASH = """
import os, sys
from mergeserve.adapters.registry import ExpertRegistry
reg = ExpertRegistry.open(sys.argv[1])
os.replace = lambda src, dst: os._exit(17)  # power cut between temp manifest and rename
reg.add("b", sys.argv[2])
"""


def test_crash_before_the_manifest_rename_keeps_the_old_manifest_and_reopen_cleans(
    root: Path, loras: dict[str, Path]
) -> None:
    with ExpertRegistry.open(root) as reg:
        snap = reg.add("a", loras["a"])
    before = _disk(root)
    proc = subprocess.run(
        [sys.executable, "-c", _CRASH, str(root), str(loras["b"])],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 17, proc.stderr
    assert (root / "manifest.json").read_bytes() == before[0]
    half = json.loads((root / "manifest.json.tmp").read_text())  # written, never renamed
    orphan = half["experts"]["b"]["digest"]
    left = _objects(root)
    assert [n for n in left if not n.startswith(".tmp-")] == sorted([snap["a"].digest, orphan])
    assert any(n.startswith(".tmp-") for n in left)  # the emptied staging dir

    with ExpertRegistry.open(root) as reg:
        assert reg.snapshot() == snap
        assert _disk(root) == before
        assert reg.add("b", loras["b"])["b"].digest == orphan


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"{not json", "not valid JSON"),
        (b"[]", "JSON object"),
        (b'{"format": 2, "version": 1, "experts": {}}', "unsupported format"),
        (b'{"format": 1, "version": -1, "experts": {}}', "version"),
        (b'{"format": 1, "version": 1, "experts": []}', "'experts'"),
        (b'{"format": 1, "version": 1, "experts": {"a": {"digest": "x"}}}', "expert 'a'"),
    ],
    ids=["json", "array", "format", "version", "experts", "entry"],
)
def test_corrupt_manifest_is_refused_naming_the_file_and_nothing_is_deleted(
    root: Path, loras: dict[str, Path], content: bytes, match: str
) -> None:
    with ExpertRegistry.open(root) as reg:
        reg.add("a", loras["a"])
    (root / "manifest.json").write_bytes(content)
    before = _disk(root)
    with pytest.raises(ConfigurationError, match=match) as e:
        ExpertRegistry.open(root)
    assert str(root.resolve() / "manifest.json") in str(e.value)
    assert _disk(root) == before  # no "garbage" collected on the strength of a bad manifest


def test_one_open_registry_per_root(reg: ExpertRegistry, root: Path) -> None:
    with pytest.raises(ConfigurationError, match="open in another process"):
        ExpertRegistry.open(root)
    reg.close()
    ExpertRegistry.open(root).close()
    with pytest.raises(AdapterError, match="closed"):
        reg.remove("a")


def test_remove_waits_for_leases_then_deletes_the_files(
    reg: ExpertRegistry, root: Path, loras: dict[str, Path]
) -> None:
    ref = reg.add("a", loras["a"])["a"]
    reg.add("b", loras["b"])
    result: list[RegistrySnapshot] = []
    with reg.lease(["a"]) as held:
        assert reg.usage() == {ref.digest: 1}
        remover = threading.Thread(target=lambda: result.append(reg.remove("a", timeout=10)))
        remover.start()
        time.sleep(0.2)
        assert remover.is_alive()  # still waiting for this lease
        assert "a" not in reg.snapshot()  # but unpublished already, and durably
        assert "a" not in json.loads((root / "manifest.json").read_text())["experts"]
        assert held["a"].path.joinpath(WEIGHTS).is_file()  # files usable by the holder
        with pytest.raises(ExpertNotFoundError):  # new requests cannot lease it
            reg.lease(["a"]).__enter__()
    remover.join(5)
    assert not remover.is_alive()
    assert result[0].names == ("b",)
    assert result[0] is reg.snapshot()
    assert not ref.path.exists()
    assert reg.usage() == {}


def test_remove_times_out_and_the_last_lease_deletes_the_files(
    reg: ExpertRegistry, root: Path, loras: dict[str, Path]
) -> None:
    ref = reg.add("a", loras["a"])["a"]
    with reg.lease() as held:
        t0 = time.monotonic()
        with pytest.raises(ExpertBusyError, match="1 in-flight") as e:
            reg.remove("a", timeout=0.1)
        assert 0.1 <= time.monotonic() - t0 < 2
        assert isinstance(e.value, TimeoutError)
        assert e.value.status_code == 409
        assert e.value.snapshot is reg.snapshot()
        assert "a" not in reg.snapshot()
        assert json.loads((root / "manifest.json").read_text())["experts"] == {}
        assert held["a"].path.is_dir()
    # Deleted by a background thread: renamed away at once, then the trash removed.
    assert _wait_until(lambda: _objects(root) == [])
    assert not ref.path.exists()


def test_files_left_by_a_timed_out_remove_are_deleted_by_the_next_open(
    root: Path, loras: dict[str, Path]
) -> None:
    reg = ExpertRegistry.open(root)
    ref = reg.add("a", loras["a"])["a"]
    with reg.lease(["a"]):
        with pytest.raises(ExpertBusyError):
            reg.remove("a", timeout=0)
        reg.close()
        with ExpertRegistry.open(root) as again:
            assert len(again.snapshot()) == 0
            assert not ref.path.exists()
    # The closed registry's last lease must not touch a root another registry owns.
    assert _objects(root) == []


def test_replace_keeps_the_old_files_until_their_last_lease_ends(
    reg: ExpertRegistry, loras: dict[str, Path]
) -> None:
    old = reg.add("a", loras["a"])["a"]
    with reg.lease(["a"]) as held:
        new = reg.add("a", loras["b"], replace=True)["a"]
        assert new.digest != old.digest
        assert held["a"] == old
        assert old.path.is_dir()
    assert _wait_until(lambda: not old.path.exists())
    assert new.path.is_dir()
    # Unleased: the replaced files go at once.
    reg.add("a", loras["a"], replace=True)
    assert not new.path.exists()


def test_versions_count_successful_changes_only(
    reg: ExpertRegistry, root: Path, loras: dict[str, Path]
) -> None:
    assert reg.snapshot().version == 0
    assert reg.add("a", loras["a"]).version == 1
    assert reg.add("b", loras["b"]).version == 2
    with pytest.raises(ExpertExistsError):
        reg.add("b", loras["a"])
    with pytest.raises(ExpertNotFoundError):
        reg.remove("nope")
    assert reg.remove("a").version == 3
    same = reg.snapshot()
    assert reg.add("b", loras["b"], replace=True) is same  # no change, no new version
    assert reg.add("b", loras["a"], replace=True).version == 4
    reg.close()
    with ExpertRegistry.open(root) as again:
        assert again.snapshot().version == 4


def test_snapshots_are_immutable(reg: ExpertRegistry, loras: dict[str, Path]) -> None:
    snap = reg.add("a", loras["a"])
    with pytest.raises(TypeError):
        snap.experts["b"] = snap["a"]  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        snap.version = 9  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        snap["a"].rank = 9  # type: ignore[misc]
    source: dict[str, ExpertRef] = {"a": snap["a"]}
    built = RegistrySnapshot(1, source)
    source.clear()
    assert built.names == ("a",)
    reg.add("b", loras["b"])
    assert snap.names == ("a",)  # an old snapshot does not see later changes
    with pytest.raises(ExpertNotFoundError) as e:
        snap["b"]
    assert (e.value.status_code, e.value.error_type) == (404, "not_found_error")


def test_leases_count_per_digest(reg: ExpertRegistry, loras: dict[str, Path]) -> None:
    snap = reg.add("a", loras["a"])
    snap = reg.add("twin", loras["a"])
    snap = reg.add("b", loras["b"])
    da, db = snap["a"].digest, snap["b"].digest
    with reg.lease(), reg.lease(["a", "twin"]), reg.lease("b"):
        assert reg.usage() == {da: 2, db: 2}
    assert reg.usage() == {}
    with pytest.raises(ExpertNotFoundError), reg.lease(["a", "nope"]):
        pass
    assert reg.usage() == {}
    with pytest.raises(RuntimeError), reg.lease(["a"]):
        raise RuntimeError
    assert reg.usage() == {}


def test_concurrent_adds_all_land_with_distinct_versions(
    reg: ExpertRegistry, root: Path, loras: dict[str, Path]
) -> None:
    n = 6
    start = threading.Barrier(n)
    results: dict[str, RegistrySnapshot] = {}
    errors: list[BaseException] = []

    def add(i: int) -> None:
        try:
            start.wait()
            results[f"e{i}"] = reg.add(f"e{i}", loras["ab"[i % 2]])
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=add, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    assert sorted(s.version for s in results.values()) == list(range(1, n + 1))
    assert all(name in snap for name, snap in results.items())
    final = reg.snapshot()
    assert (final.version, final.names) == (n, tuple(f"e{i}" for i in range(n)))
    assert len(_objects(root)) == 2
    reg.close()
    with ExpertRegistry.open(root) as again:
        assert again.snapshot() == final


def test_verify_reports_tampered_objects(reg: ExpertRegistry, loras: dict[str, Path]) -> None:
    snap = reg.add("a", loras["a"])
    snap = reg.add("twin", loras["a"])
    reg.add("b", loras["b"])
    assert reg.verify() == ()
    weights = snap["a"].path / WEIGHTS
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")
    assert reg.verify() == ("a", "twin")


# ------------------------------------------------------------------ shared mode (replicas)


@pytest.fixture
def pair(root: Path) -> Iterator[tuple[ExpertRegistry, ExpertRegistry]]:
    """Two registries on one root, as two replicas have (flock is per open file, so two
    opens in one process exclude each other as two processes do)."""
    a = ExpertRegistry.open(root, shared=True)
    b = ExpertRegistry.open(root, shared=True)
    yield a, b
    a.close()
    b.close()


def test_shared_replicas_see_each_others_changes_and_lose_none(
    pair: tuple[ExpertRegistry, ExpertRegistry], root: Path, loras: dict[str, Path]
) -> None:
    a, b = pair
    a.add("a", loras["a"])
    assert "a" not in b.snapshot()
    assert b.refresh().names == ("a",)
    b.add("b", loras["b"])  # b had refreshed; now a adds without refreshing first:
    a.add("c", loras["a"])
    doc = json.loads((root / "manifest.json").read_text())
    assert sorted(doc["experts"]) == ["a", "b", "c"]  # no update lost
    assert doc["version"] == 3  # one sequence across both
    assert b.refresh().names == ("a", "b", "c")
    assert b.snapshot().version == a.snapshot().version == 3
    with pytest.raises(ExpertExistsError):
        b.add("c", loras["b"])  # taken by the other replica


def test_shared_removal_keeps_files_another_replica_leases(
    pair: tuple[ExpertRegistry, ExpertRegistry], loras: dict[str, Path]
) -> None:
    a, b = pair
    ref = a.add("a", loras["a"])["a"]
    b.refresh()
    with b.lease(["a"]) as held:
        a.remove("a", timeout=1)  # a holds no lease: done, but b's lease keeps the files
        assert "a" not in a.snapshot()
        assert held["a"].path.joinpath(WEIGHTS).is_file()
        assert "a" not in b.refresh()  # b learns of it while still leasing
        assert ref.path.is_dir()
    assert _wait_until(lambda: not ref.path.exists())  # b's last lease deleted them


def test_shared_removal_by_the_other_replica_is_collected_on_refresh(
    pair: tuple[ExpertRegistry, ExpertRegistry], loras: dict[str, Path]
) -> None:
    a, b = pair
    ref = a.add("a", loras["a"])["a"]
    b.refresh()
    with a.lease(["a"]):
        b.remove("a", timeout=0)
    # a's lease ended before a heard of the removal: nobody deleted the files yet...
    assert ref.path.is_dir()
    assert "a" in a.snapshot()
    a.refresh()  # ...until a adopts the manifest without them
    assert not ref.path.exists()
    assert a.snapshot() == b.snapshot()


def test_shared_and_exclusive_opens_exclude_each_other(root: Path) -> None:
    with (
        ExpertRegistry.open(root, shared=True),
        pytest.raises(ConfigurationError, match="open it shared"),
    ):
        ExpertRegistry.open(root)
    with ExpertRegistry.open(root), pytest.raises(ConfigurationError, match="open in another"):
        ExpertRegistry.open(root, shared=True)


# ------------------------------------------- collection by reference, repair, digest leases


def test_open_drops_an_entry_whose_object_is_gone_and_frees_its_name(
    root: Path, loras: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    with ExpertRegistry.open(root) as reg:
        a = reg.add("a", loras["a"])["a"]
        b = reg.add("b", loras["b"])["b"]
    shutil.rmtree(a.path)  # deleted by hand, or by a faulty older version
    (b.path / WEIGHTS).unlink()  # an incomplete object is dropped alike
    with ExpertRegistry.open(root) as reg:
        snap = reg.snapshot()
        assert (snap.names, snap.version) == ((), 3)  # the repair is a committed change
        doc = json.loads((root / "manifest.json").read_text())
        assert (doc["experts"], doc["version"]) == ({}, 3)
        assert "dropping expert 'a'" in caplog.text
        assert "is missing" in caplog.text
        assert "dropping expert 'b'" in caplog.text
        assert "incomplete" in caplog.text
        assert not b.path.exists()  # the broken leftover was collected
        assert reg.add("a", loras["a"])["a"].path.joinpath(WEIGHTS).is_file()  # not stuck


def test_a_shared_refresh_repairs_an_entry_whose_object_is_gone(
    pair: tuple[ExpertRegistry, ExpertRegistry], loras: dict[str, Path]
) -> None:
    a, b = pair
    ref = a.add("x", loras["a"])["x"]
    shutil.rmtree(ref.path)
    assert "x" not in b.refresh()
    assert "x" not in a.refresh()
    a.add("x", loras["a"])
    assert b.refresh()["x"].path.joinpath(WEIGHTS).is_file()


def test_a_re_add_between_unpublish_and_collect_revives_the_object(
    reg: ExpertRegistry, loras: dict[str, Path]
) -> None:
    ref = reg.add("a", loras["a"])["a"]
    snap, gone = reg.unpublish("a")
    assert gone == ref
    assert "a" not in snap
    again = reg.add("a", loras["a"])["a"]  # the same content, before the collection ran
    assert again.digest == ref.digest
    reg.collect(ref.digest, timeout=1)  # referenced again: nothing is deleted
    assert again.path.joinpath(WEIGHTS).is_file()
    with reg.lease(["a"]) as held:
        assert held["a"].path.joinpath(WEIGHTS).is_file()
    reg.remove("a")
    assert not ref.path.exists()


def test_a_re_add_while_the_removal_waits_for_a_lease_keeps_the_files(
    reg: ExpertRegistry, loras: dict[str, Path]
) -> None:
    ref = reg.add("a", loras["a"])["a"]
    with reg.lease(["a"]):
        remover = threading.Thread(target=lambda: reg.remove("a", timeout=10))
        remover.start()
        assert _wait_until(lambda: "a" not in reg.snapshot())
        reg.add("a", loras["a"])  # revived while the remover waits for this lease
        remover.join(5)
        assert not remover.is_alive()  # a referenced digest needs no wait
    time.sleep(0.1)  # the orphan collector, had the lease's end started one
    assert ref.path.joinpath(WEIGHTS).is_file()
    assert reg.verify() == ()


def test_a_shared_re_add_by_another_replica_during_the_collection_keeps_the_files(
    pair: tuple[ExpertRegistry, ExpertRegistry], loras: dict[str, Path]
) -> None:
    a, b = pair
    ref = a.add("x", loras["a"])["x"]
    a.unpublish("x")
    b.add("x", loras["a"])  # b re-adds the same content before a collects
    a.collect(ref.digest, timeout=1)
    assert ref.path.joinpath(WEIGHTS).is_file()
    assert a.refresh()["x"] == b.snapshot()["x"]
    assert a.verify() == ()


def test_a_digest_lease_holds_the_content_resolved_not_the_name(
    reg: ExpertRegistry, loras: dict[str, Path]
) -> None:
    old = reg.add("a", loras["a"])["a"]
    with reg.lease(digests=[old.digest]) as held:
        assert held["a"] == old
    with reg.lease(digests=[old.digest]):  # in flight across the remove/re-add below
        reg.unpublish("a")
        new = reg.add("a", loras["b"])["a"]
        assert new.digest != old.digest
        with reg.lease(digests=[old.digest]):  # still leased by a request: still there
            assert old.path.joinpath(WEIGHTS).is_file()
        assert reg.usage() == {old.digest: 1}  # the old content, never the new one
    assert _wait_until(lambda: not old.path.exists())
    with pytest.raises(ExpertGoneError) as e:
        reg.lease(digests=[old.digest]).__enter__()
    assert e.value.status_code == 404
    assert isinstance(e.value, ExpertNotFoundError)
    assert reg.usage() == {}
    with reg.lease(digests=[new.digest]):
        assert reg.usage() == {new.digest: 1}


def test_a_stale_replica_cannot_lease_files_another_replica_deleted(
    pair: tuple[ExpertRegistry, ExpertRegistry], loras: dict[str, Path]
) -> None:
    a, b = pair
    ref = a.add("x", loras["a"])["x"]
    b.refresh()
    a.remove("x", timeout=1)  # b leases nothing: the files go at once
    assert not ref.path.exists()
    assert "x" in b.snapshot()  # b has not heard of it yet
    with pytest.raises(ExpertGoneError):
        b.lease(["x"]).__enter__()
    with pytest.raises(ExpertGoneError):
        b.lease(digests=[ref.digest]).__enter__()
    assert b.usage() == {}
    assert "x" not in b.refresh()


def test_a_lease_taken_by_a_replica_blocks_the_other_replicas_collection(
    pair: tuple[ExpertRegistry, ExpertRegistry], loras: dict[str, Path]
) -> None:
    a, b = pair
    ref = a.add("x", loras["a"])["x"]
    b.refresh()
    with b.lease(digests=[ref.digest]):
        a.remove("x", timeout=1)
        assert ref.path.joinpath(WEIGHTS).is_file()
    b.refresh()  # b learns the removal; its lease has ended: b deletes
    assert not ref.path.exists()


# ------------------------------------------- adapters the registry must never store


def _with_config(src: Path, dst: Path, **changes: object) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    cfg.update(changes)
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"base_model_name_or_path": False}, "a string or null"),
        ({"base_model_name_or_path": 0}, "a string or null"),
        ({"lora_alpha": 1e39}, "not finite once scaled"),
        ({"r": 3}, "its config says rank 3"),
        ({"rank_pattern": {"q_proj": 4}}, "its config says rank 4"),
    ],
    ids=["base-false", "base-zero", "alpha-overflow", "r-mismatch", "rank-pattern-mismatch"],
)
def test_adapters_that_would_poison_the_registry_are_refused_and_change_nothing(
    reg: ExpertRegistry,
    root: Path,
    loras: dict[str, Path],
    tmp_path: Path,
    changes: dict[str, object],
    match: str,
) -> None:
    reg.add("a", loras["a"])
    before = _disk(root)
    bad = _with_config(loras["b"], tmp_path / "bad", **changes)
    with pytest.raises(AdapterError, match=match):
        reg.add("bad", bad)
    assert _disk(root) == before
    reg.close()
    with ExpertRegistry.open(root) as again:  # and the registry still opens
        assert again.snapshot().names == ("a",)


def test_a_manifest_that_would_not_open_again_is_never_committed(
    reg: ExpertRegistry, root: Path, loras: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    reg.add("a", loras["a"])
    before = _disk(root)
    real = ExpertRegistry._ref_from_json

    def refuse(self: ExpertRegistry, name: str, entry: object) -> ExpertRef:
        if name == "b":
            raise TypeError("as if a field of b could not be read back")
        return real(self, name, entry)

    monkeypatch.setattr(ExpertRegistry, "_ref_from_json", refuse)
    with pytest.raises(AdapterError, match="would not open again"):
        reg.add("b", loras["b"])
    assert _disk(root) == before
    assert reg.snapshot().names == ("a",)
