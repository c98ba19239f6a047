"""BundlePins: the engine's pins follow the current bundles in the background, so a
request never waits on a pin or an unpin; a superseded bundle is unpinned once no request
holds it, and one that is current again (a removal undone) is never unpinned."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from mergeserve.runtime.engine import LoRATarget
from mergeserve.runtime.materialize import MaterializedAdapter
from mergeserve.runtime.pinning import BundlePins


class Leases:
    """A stand-in for AdapterCache.pins: leases held per key."""

    def __init__(self) -> None:
        self.held: dict[str, int] = {}

    def pins(self, key: str) -> int:
        return self.held.get(key, 0)


class Engine:
    """Pin and unpin calls that take `delay_s` each, as an engine under load does."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.pinned: list[str] = []
        self.calls: list[str] = []
        self.gate: asyncio.Event | None = None

    async def pin(self, lora: LoRATarget) -> None:
        self.calls.append(f"pin {lora.name}")
        if self.gate is not None:
            await self.gate.wait()
        await asyncio.sleep(self.delay_s)
        self.pinned.append(lora.name)

    async def unpin(self, lora: LoRATarget) -> None:
        self.calls.append(f"unpin {lora.name}")
        await asyncio.sleep(self.delay_s)
        self.pinned.remove(lora.name)


def bundle(name: str) -> MaterializedAdapter:
    return MaterializedAdapter(name, LoRATarget(name, hash(name) % 1000, Path(name)), 8, 0, 0.0)


def make(engine: Engine, leases: Leases, max_pinned: int = 3) -> BundlePins:
    pins = BundlePins(leases)  # type: ignore[arg-type]  # only .pins(key) is read
    pins.configure(engine.pin, engine.unpin, max_pinned)
    return pins


async def test_serving_a_new_bundle_does_not_wait_for_its_pin() -> None:
    engine, leases = Engine(), Leases()
    engine.gate = asyncio.Event()  # the pin blocks until released
    pins = make(engine, leases)
    await asyncio.wait_for(pins.serve("exact", bundle("b1")), 1)  # returns at once
    await asyncio.sleep(0)
    assert engine.calls == ["pin b1"]
    assert engine.pinned == []  # pinning, not pinned yet
    engine.gate.set()
    await pins.settled()
    assert engine.pinned == ["b1"] == pins.pinned


async def test_the_old_bundle_is_unpinned_once_drained_and_the_new_pinned() -> None:
    engine, leases = Engine(delay_s=0.01), Leases()
    pins = make(engine, leases)
    await pins.serve("exact", bundle("b1"))
    await pins.settled()
    leases.held["b1"] = 1  # a request still generating on b1
    await pins.serve("exact", bundle("b2"))
    await pins.settled()
    assert engine.pinned == ["b1", "b2"]  # b1 held: kept beside b2
    leases.held["b1"] = 0
    await pins.serve("exact", bundle("b2"))  # the next request of the mode sweeps
    await pins.settled()
    assert engine.pinned == ["b2"]
    assert engine.calls == ["pin b1", "pin b2", "unpin b1"]


async def test_a_bundle_current_again_is_not_unpinned() -> None:
    # add (b1 -> b2) then remove (b2 -> b1) before b1 drained: b1 serves again.
    engine, leases = Engine(), Leases()
    pins = make(engine, leases)
    await pins.serve("exact", bundle("b1"))
    leases.held["b1"] = 1
    await pins.serve("exact", bundle("b2"))
    await pins.serve("exact", bundle("b1"))
    leases.held["b1"] = 0  # drained for a moment, while current
    await pins.serve("exact", bundle("b1"))
    await pins.settled()
    assert "b1" in engine.pinned
    assert "b2" not in engine.pinned  # superseded and never held
    assert engine.calls.count("pin b1") == 1  # pinned once, not again


async def test_changes_during_a_pin_are_caught_up() -> None:
    engine, leases = Engine(), Leases()
    engine.gate = asyncio.Event()
    pins = make(engine, leases)
    await pins.serve("exact", bundle("b1"))
    await asyncio.sleep(0)  # b1's pin started and blocks
    await pins.serve("exact", bundle("b2"))  # meanwhile b2 is current, b1 retiring
    engine.gate.set()
    await pins.settled()
    assert engine.pinned == ["b2"]  # b1 pinned, then swept (no lease); b2 pinned


@pytest.mark.parametrize("max_pinned", [0, 1])
async def test_at_most_max_pinned(max_pinned: int) -> None:
    engine, leases = Engine(), Leases()
    pins = make(engine, leases, max_pinned)
    await pins.serve("exact", bundle("b1"))
    await pins.serve("twin", bundle("t1"))
    await pins.settled()
    assert len(engine.pinned) == max_pinned


async def test_retire_all_unpins_what_no_request_holds() -> None:
    engine, leases = Engine(), Leases()
    pins = make(engine, leases)
    await pins.serve("exact", bundle("b1"))
    await pins.serve("twin", bundle("t1"))
    await pins.settled()
    leases.held["t1"] = 1
    await pins.retire_all()  # waits for the unpins it can do
    assert engine.pinned == ["t1"]
    leases.held["t1"] = 0
    await pins.retire_all()
    assert engine.pinned == []


async def test_close_stops_a_pending_pin() -> None:
    engine, leases = Engine(), Leases()
    engine.gate = asyncio.Event()
    pins = make(engine, leases)
    await pins.serve("exact", bundle("b1"))
    await asyncio.sleep(0)
    await asyncio.wait_for(pins.close(), 1)
    assert engine.pinned == []


async def test_a_bundle_kept_out_by_draining_ones_is_pinned_once_they_go() -> None:
    # One pinnable slot: the new bundle waits for the old one to drain, then takes it.
    engine, leases = Engine(), Leases()
    pins = make(engine, leases, max_pinned=1)
    await pins.serve("exact", bundle("b1"))
    await pins.settled()
    leases.held["b1"] = 1
    await pins.serve("exact", bundle("b2"))
    await pins.settled()
    assert engine.pinned == ["b1"]  # b1 still generating: b2 served unpinned
    leases.held["b1"] = 0
    await pins.serve("exact", bundle("b2"))
    await pins.settled()
    assert engine.pinned == ["b2"]


async def test_a_pin_the_engine_refused_is_not_asked_again() -> None:
    engine, leases = Engine(), Leases()
    calls = 0

    async def refuse(lora: LoRATarget) -> None:
        nonlocal calls
        calls += 1
        raise RuntimeError("no slot")

    pins = make(engine, leases)
    pins.configure(refuse, engine.unpin)
    await pins.serve("exact", bundle("b1"))
    await pins.serve("twin", bundle("t1"))  # another change: b1 is not tried again
    await pins.settled()
    assert calls == 2  # once each
    assert pins.pinned == []
