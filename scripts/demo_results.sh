#!/usr/bin/env bash
# Reproduce docs/results.md (+ .json, .png): the exact-match table of base, each demo expert
# and the static merges of all six, served by the real server (vLLM) and scored through the
# OpenAI API on the test split (unseen templates included).
# Usage: scripts/demo_results.sh [N per task, default 100]
set -euo pipefail
cd "$(dirname "$0")/.."
N="${1:-100}"
PORT="${PORT:-8765}"
work="$(mktemp -d)"
trap 'kill "${server:-0}" 2>/dev/null || true; rm -rf "$work"' EXIT
experts=()
for cfg in examples/experts/*/adapter_config.json; do experts+=("$(dirname "$cfg")"); done
[[ ${#experts[@]} -eq 6 ]] || { echo "expected 6 experts under examples/experts" >&2; exit 1; }
mkdir -p "$work/experts"
for d in "${experts[@]}"; do ln -s "$PWD/$d" "$work/experts/$(basename "$d")"; done
ms=.venv/bin/mergeserve
# Static merges of all six, each at rank 48 (the exact rank of a sum of six rank-8 experts).
$ms merge --method linear "${experts[@]}" --out "$work/experts/static_linear"
$ms merge --method task_arithmetic --scale 0.5 "${experts[@]}" --out "$work/experts/static_task_arithmetic"
$ms merge --method ties --density 0.5 --rank 48 "${experts[@]}" --out "$work/experts/static_ties"
$ms merge --method dare_ties --density 0.5 --scale 0.5 --rank 48 --seed 0 "${experts[@]}" --out "$work/experts/static_dare_ties"
MERGESERVE_ENGINE__MAX_LORA_RANK=64 MERGESERVE_ENGINE__MAX_LORAS=4 \
  $ms serve --experts-dir "$work/experts" --port "$PORT" > "$work/server.log" 2>&1 &
server=$!
for _ in $(seq 600); do
  curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break
  kill -0 "$server" 2>/dev/null || { tail -50 "$work/server.log" >&2; exit 1; }
  sleep 1
done
$ms eval --base-url "http://127.0.0.1:$PORT" --models 'base,expert:*' --n "$N" \
  --concurrency 16 --out docs/results
