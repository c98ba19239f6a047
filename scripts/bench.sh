#!/usr/bin/env bash
# Regenerate the benchmark results on the harness (benchmarks/harness.py) and
# docs/benchmarks.md. Outside CI: each benchmark owns the machine while it runs (2 cores:
# run nothing else). Durations measured on the 2-core machine, first start compiled:
#   threads.py ~15 min, peers.py ~25 min, cpu_lora.py ~30 min, serve_throughput.py ~40 min,
#   plus ~7 min to build llama.cpp the first time.
# Usage: scripts/bench.sh [name ...]   (default: all, in this order)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bench_deps.sh
out=benchmarks/results
mkdir -p "$out"
all=(threads peers cpu_lora serve_throughput)
for b in "${@:-${all[@]}}"; do
    echo "bench: $b ($(date +%T))" >&2
    .venv/bin/python "benchmarks/$b.py" > "$out/$b.cpu-2core.json.part"
    mv "$out/$b.cpu-2core.json.part" "$out/$b.cpu-2core.json"
done
.venv/bin/python benchmarks/report.py
