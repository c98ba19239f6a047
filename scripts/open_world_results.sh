#!/usr/bin/env bash
# Reproduce docs/results/open_world.md: every arm on the three splits of open traffic,
# served by the real server (vLLM, fp32, CPU) and scored through the OpenAI API, greedy,
# 32 new tokens:
#   demo       the six tasks' test split (N per task, unseen templates included), exact match
#   two-skill  requests needing two skills at once (N per composition), exact match
#   general    requests outside every skill (the general split's test part), harm: the
#              fraction of replies equal to base's greedy reply, and token F1 with it
# plus the open-world gates' AUROC (benchmarks/open_world.py --split test).
# Usage: scripts/open_world_results.sh [N, default 50]
#
# Two passes, as scripts/demo_results.sh (vLLM's CPU LoRA path computes every adapter at
# the engine's slot rank): slot rank 16 for base, the experts, dynamic:exact and
# route:top1; 64 for the static merges (rank 48) and dynamic:twin. Replies are cached
# under docs/results/open_world/<suite>/replies.jsonl by each model's content digest, so
# a rerun (RESUME=1) asks only what changed; the demo suite starts from the replies of
# docs/results/replies.jsonl (same digests: same replies).
# STATIC overrides pass B's static arms (comma-separated model ids).
set -euo pipefail
cd "$(dirname "$0")/.."
N="${1:-50}"
PORT="${PORT:-8766}"
ms=.venv/bin/mergeserve
out=docs/results/open_world
STATIC="${STATIC:-static:linear,static:task_arithmetic,static:ties,static:dare_ties}"
work="$(mktemp -d)"
trap 'kill "${server:-0}" 2>/dev/null || true; rm -rf "$work"' EXIT
mkdir -p "$out/demo" "$out/two_skill" "$out/general"
if [[ -z "${RESUME:-}" ]]; then
  rm -f "$out"/*/replies.jsonl
  [[ -f docs/results/replies.jsonl ]] && cp docs/results/replies.jsonl "$out/demo/replies.jsonl"
fi

serve() {  # serve MAX_LORA_RANK STATIC_METHODS_JSON
  MERGESERVE_ENGINE__MAX_LORA_RANK="$1" MERGESERVE_MERGE__STATIC_METHODS="$2" \
    MERGESERVE_MERGE__BUILD_THREADS=2 \
    $ms serve --experts-dir examples/experts --port "$PORT" > "$work/server.log" 2>&1 &
  server=$!
  for _ in $(seq 900); do
    curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && return 0
    kill -0 "$server" 2>/dev/null || { tail -50 "$work/server.log" >&2; exit 1; }
    sleep 1
  done
  echo "server did not start" >&2; exit 1
}
stop() { kill "$server"; wait "$server" || true; }
evaluate() {  # evaluate SUITE MODELS
  local dir="${1//-/_}"
  $ms eval --base-url "http://127.0.0.1:$PORT" --suite "$1" --models "$2" --n "$N" \
    --concurrency 16 --max-tokens 32 --out "$out/$dir" --resume > "$work/eval.log" 2>&1 \
    || { tail -30 "$work/eval.log" >&2; exit 1; }
  cp "$out/$dir/results.json" "$out/$dir/results.$3.json" 2>/dev/null || true
  cp "$out/$dir/general.json" "$out/$dir/general.$3.json" 2>/dev/null || true
}

ARMS_A='base,expert:*,dynamic:exact,route:top1'
serve 16 '[]'
for suite in demo two-skill general; do evaluate "$suite" "$ARMS_A" a; done
stop
methods="$(echo "$STATIC" | tr ',' '\n' | sed 's/^static://' | jq -R . | jq -sc .)"
serve 64 "$methods"
for suite in demo two-skill general; do evaluate "$suite" "base,$STATIC,dynamic:twin" b; done
stop

.venv/bin/python benchmarks/open_world.py --split test --out "$out/gates.test.json" > /dev/null
.venv/bin/python -m mergeserve.tasks.open_report "$out" > docs/results/open_world.md
echo "written: docs/results/open_world.md"
