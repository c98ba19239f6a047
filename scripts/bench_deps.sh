#!/usr/bin/env bash
# What the benchmarks need beyond the project's own dependencies: llama.cpp, the peer that
# also mixes LoRAs per request (benchmarks/peers.py). The PyPI sdist of llama-cpp-python
# vendors llama.cpp's library and its GGUF converters; it is built here with cmake (about
# 7 minutes on 2 cores) into .venv. Benchmark-only: nothing in mergeserve imports it, and
# `make test` never installs it. The sdist stays in the bench cache, where
# benchmarks/llamacpp_peer.py takes the converters from. A no-op once installed.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=0.3.36
CACHE="${MERGESERVE_BENCH_CACHE:-$HOME/.cache/mergeserve/bench}"
SDIST="$CACHE/llama_cpp_python-$VERSION.tar.gz"
mkdir -p "$CACHE"
if [[ ! -f "$SDIST" ]]; then
    .venv/bin/pip download --no-deps --no-binary :all: -d "$CACHE" "llama-cpp-python==$VERSION"
fi
if [[ "$(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("llama_cpp_python"))' 2>/dev/null)" != "$VERSION" ]]; then
    echo "bench deps: building llama-cpp-python $VERSION from its sdist (minutes)" >&2
    # --no-deps: its requirements other than these are already in .venv (numpy,
    # typing-extensions); a resolver must never touch torch here.
    .venv/bin/pip install diskcache jinja2
    # Not -march=native: on a CPU that reports AMX, ggml's native build runs AMX tile
    # instructions, and a VM that does not hand AMX state to the guest kills the process
    # with SIGILL (seen on this project's machines). The vector extensions the CPU reports
    # are switched on one by one instead; AMX stays off.
    cpu_flags=" $(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | cut -d: -f2) "
    cmake_args="-DGGML_NATIVE=OFF"
    for pair in avx:AVX avx2:AVX2 fma:FMA f16c:F16C avx512f:AVX512 \
        avx512_vnni:AVX512_VNNI avx512_bf16:AVX512_BF16; do
        if [[ "$cpu_flags" == *" ${pair%%:*} "* ]]; then
            cmake_args+=" -DGGML_${pair#*:}=ON"
        fi
    done
    echo "bench deps: CMAKE_ARGS=$cmake_args" >&2
    CMAKE_ARGS="$cmake_args" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
        .venv/bin/pip install --no-deps --no-cache-dir "$SDIST"
fi
