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
    CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" .venv/bin/pip install --no-deps "$SDIST"
fi
