#!/usr/bin/env bash
# Reproduce docs/results.md (+ .json, .png): the exact-match table of base, each demo expert
# and the static merges of all six, served by the real server (vLLM) and scored through the
# OpenAI API on the test split (unseen templates included).
# Usage: scripts/demo_results.sh [N per task, default 50]
# (max 32 new tokens: the longest answer, a 3-pair JSON object, is about 25 tokens)
# RESUME=1 reuses the replies a stopped run cached in docs/results/replies.jsonl (only
# valid while the experts are unchanged: the cache is keyed by model name, not content).
set -euo pipefail
cd "$(dirname "$0")/.."
N="${1:-50}"
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
  --concurrency 16 --max-tokens 32 --out docs/results ${RESUME:+--resume}
{
  echo "# Demo results: base, experts and static merges on the six demo tasks"
  echo
  echo "Exact match (%) on the test split, $N prompts per task (every template, the held-out"
  echo "one included; \"unseen templates\" is the accuracy on the held-out template alone),"
  echo "greedy, through the OpenAI API of the real server (vLLM, fp32, CPU)."
  echo "\"normalized\" is the model's score divided by each task's own expert, averaged."
  echo "\`expert:static_*\` are static merges of all six experts (rank 48), served as LoRAs."
  echo
  echo "Reproduce with one command: \`scripts/demo_results.sh $N\`, which runs"
  echo
  echo '```bash'
  echo 'E=(examples/experts/{add,capital,reverse_words,sentiment,sort_numbers,to_json}); D=<temp experts dir>'
  echo 'mergeserve merge --method linear "${E[@]}" --out $D/static_linear'
  echo 'mergeserve merge --method task_arithmetic --scale 0.5 "${E[@]}" --out $D/static_task_arithmetic'
  echo 'mergeserve merge --method ties --density 0.5 --rank 48 "${E[@]}" --out $D/static_ties'
  echo 'mergeserve merge --method dare_ties --density 0.5 --scale 0.5 --rank 48 --seed 0 "${E[@]}" --out $D/static_dare_ties'
  echo '# $D also links the six experts'
  echo 'MERGESERVE_ENGINE__MAX_LORA_RANK=64 MERGESERVE_ENGINE__MAX_LORAS=4 mergeserve serve --experts-dir $D --port 8765 &'
  echo "mergeserve eval --base-url http://127.0.0.1:8765 --models 'base,expert:*' --n $N --concurrency 16 --max-tokens 32 --out docs/results"
  echo '```'
  echo
  cat docs/results/results.md
  echo
  echo "![exact match per task](results/results.png)"
} > docs/results.md
echo "written: docs/results.md"
