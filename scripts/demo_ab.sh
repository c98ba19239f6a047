#!/usr/bin/env bash
# Reproduce docs/ab/: the A/B report of dynamic against the best static merge of
# docs/results.md, static:regmean_pp (examples/experiments.regmean_pp.toml; RegMean++
# reads the base model and examples/dev.jsonl), served
# at the rank it was built (slots of rank 64), then `mergeserve ab-report`:
#  - offline: both arms answer the same N test prompts per task (paired bootstrap CIs);
#    replies are shared with docs/results (keyed by content digest, so a reply already
#    there for the same adapter is not asked again);
#  - online: ONLINE labelled dev prompts per task sent through the experiment itself,
#    each from its own user, each reply's exact match posted to /v1/feedback.
# Usage: scripts/demo_ab.sh [N per task, default 50] [ONLINE per task, default 10]
set -euo pipefail
cd "$(dirname "$0")/.."
N="${1:-50}"
ONLINE="${2:-10}"
PORT="${PORT:-8766}"
ms=.venv/bin/mergeserve
out=docs/ab
mkdir -p "$out"
rm -f "$out/feedback.jsonl"
work="$(mktemp -d)"
trap 'kill "${server:-0}" 2>/dev/null || true; rm -rf "$work"' EXIT
MERGESERVE_ENGINE__MAX_LORA_RANK=64 MERGESERVE_MERGE__STATIC_METHODS='["regmean_pp"]' \
  MERGESERVE_MERGE__DEV_FILE=examples/dev.jsonl MERGESERVE_MERGE__BACKGROUND_BUILDS=false \
  MERGESERVE_SERVER__QUEUE_BUDGET_S=0 MERGESERVE_EXPERIMENTS__FILE=examples/experiments.regmean_pp.toml \
  MERGESERVE_EXPERIMENTS__FEEDBACK_LOG="$out/feedback.jsonl" \
  $ms serve --experts-dir examples/experts --port "$PORT" > "$work/server.log" 2>&1 &
server=$!
for _ in $(seq 900); do
  curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break
  kill -0 "$server" 2>/dev/null || { tail -50 "$work/server.log" >&2; exit 1; }
  sleep 1
done
$ms ab-report --experiment regmean-pp-vs-dynamic --base-url "http://127.0.0.1:$PORT" \
  --n "$N" --online "$ONLINE" --feedback "$out/feedback.jsonl" \
  --reply-cache docs/results/replies.jsonl --concurrency 16 --max-tokens 32 --out "$out"
kill "$server"; wait "$server" || true
printf '\nReproduce: `scripts/demo_ab.sh %s %s` (serves examples/experiments.regmean_pp.toml at slot rank 64, then `mergeserve ab-report --experiment regmean-pp-vs-dynamic --n %s --online %s --feedback docs/ab/feedback.jsonl`). Online prompts come from the dev split, offline ones from the test split.\n' \
  "$N" "$ONLINE" "$N" "$ONLINE" >> "$out/ab-report.md"
