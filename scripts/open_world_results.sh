#!/usr/bin/env bash
# Reproduce docs/results/open_world.md: every arm on the four splits of open traffic,
# served by the real server (vLLM, fp32, CPU) and scored through the OpenAI API, greedy,
# 32 new tokens:
#   demo       the six tasks' test split (N per task, unseen templates included), exact match
#   phrasings  the six tasks asked in phrasings no expert trained on (mergeserve.tasks.
#              phrasings, test part, N per task), exact match
#   two-skill  requests needing two skills at once (N per composition), exact match
#   general    requests outside every skill (the general split's test part), harm: the
#              fraction of replies equal to base's greedy reply, and token F1 with it
# plus the open-world gates' AUROC (benchmarks/open_world.py --split test), the choice of
# what dynamic:twin's shared adapter gets outside the experts (MERGESERVE_MERGE__TWIN_NONE
# base, the default, against shared), and the blending study on the two-skill split
# (benchmarks/blend.py: dev, then test once).
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
SUITES=(demo phrasings two-skill general)
mkdir -p "$out/demo" "$out/phrasings" "$out/two_skill" "$out/general"
if [[ -z "${RESUME:-}" ]]; then
  rm -f "$out"/*/replies.jsonl
  rm -rf "$out/twin_shared"
fi
# The demo suite starts from the six-task replies of docs/results (same digests, same
# replies); this copy and twin_shared's are not committed (.gitignore).
if [[ ! -f "$out/demo/replies.jsonl" && -f docs/results/replies.jsonl ]]; then
  cp docs/results/replies.jsonl "$out/demo/replies.jsonl"
fi

# shellcheck source=scripts/serve_lib.sh
source scripts/serve_lib.sh
serve() {  # serve MAX_LORA_RANK STATIC_METHODS_JSON [TWIN_NONE]
  serve_with MERGESERVE_ENGINE__MAX_LORA_RANK="$1" MERGESERVE_MERGE__STATIC_METHODS="$2" \
    MERGESERVE_MERGE__BUILD_THREADS=2 MERGESERVE_MERGE__TWIN_NONE="${3:-base}"
}
evaluate() {  # evaluate SUITE MODELS PASS [DIR]
  local dir="${4:-${1//-/_}}"
  $ms eval --base-url "http://127.0.0.1:$PORT" --suite "$1" --models "$2" --n "$N" \
    --concurrency 16 --max-tokens 32 --out "$out/$dir" --resume > "$work/eval.log" 2>&1 \
    || { tail -30 "$work/eval.log" >&2; exit 1; }
  cp "$out/$dir/results.json" "$out/$dir/results.$3.json" 2>/dev/null || true
  cp "$out/$dir/general.json" "$out/$dir/general.$3.json" 2>/dev/null || true
}

ARMS_A='base,expert:*,dynamic:exact,route:top1'
serve 16 '[]'
for suite in "${SUITES[@]}"; do evaluate "$suite" "$ARMS_A" a; done
stop
methods="$(echo "$STATIC" | tr ',' '\n' | sed 's/^static://' | jq -R . | jq -sc .)"
serve 64 "$methods"
for suite in "${SUITES[@]}"; do evaluate "$suite" "base,$STATIC,dynamic:twin" b; done
stop
# Pass C: dynamic:twin with S at full weight on every request (TWIN_NONE=shared); each
# suite's cache is copied so base's replies are not asked again (same digest).
for suite in demo phrasings two_skill general; do
  mkdir -p "$out/twin_shared/$suite"
  [[ -f "$out/twin_shared/$suite/replies.jsonl" ]] \
    || cp "$out/$suite/replies.jsonl" "$out/twin_shared/$suite/replies.jsonl"
done
serve 64 '[]' shared
for suite in "${SUITES[@]}"; do
  evaluate "$suite" "base,dynamic:twin" c "twin_shared/${suite//-/_}"
done
stop
# Pass D: blending on the two-skill split, pinned weights through dynamic:exact's mixture.
serve 16 '[]'
for split in dev test; do
  .venv/bin/python benchmarks/blend.py --base-url "http://127.0.0.1:$PORT" --split "$split" \
    --n 25 --out "benchmarks/results/blend.$split.cpu-2core.json" > "$work/blend.log" 2>&1 \
    || { tail -30 "$work/blend.log" >&2; exit 1; }
done
stop

.venv/bin/python benchmarks/open_world.py --split test --out "$out/gates.test.json" > /dev/null
.venv/bin/python -m mergeserve.tasks.open_report "$out" > docs/results/open_world.md
echo "written: docs/results/open_world.md"
