#!/usr/bin/env bash
# Reproduce docs/results.md (+ docs/results/results.{json,md,png}): the exact-match table
# of base, each demo expert, the static merges of all six, and both dynamic arms, served
# by the real server (vLLM) and scored through the OpenAI API on the test split (unseen
# templates included).
# Usage: scripts/demo_results.sh [N per task, default 50]
#
# Two passes over one reply cache (docs/results/replies.jsonl), because vLLM's CPU LoRA
# path computes every adapter at the engine's slot rank (max_lora_rank):
#  A. slot rank 16: base, the six rank-8 experts and dynamic:exact (top-2 of rank-8
#     experts: rank <= 16), ~2.5x faster than at 64;
#  B. slot rank 64: every static merge (rank 48; the literature's methods, the data-aware
#     ones built from the experts' examples and, for the evolutionary search, the dev
#     split in examples/dev.jsonl) and dynamic:twin (shared 48 + 8 per expert); every
#     reply of pass A is reused, and the table is written over all arms.
# Padding a slot with zeros does not change what an adapter computes, so the passes score
# the same adapters a single rank-64 server would.
# (max 32 new tokens: the longest answer, a 3-pair JSON object, is about 25 tokens)
# RESUME=1 keeps the replies of earlier runs: they are keyed by each model's content
# digest (GET /v1/models), so a retrained expert or a new router is asked again.
# ARMS_B overrides pass B's models (e.g. without dynamic:twin, the slowest arm).
# REPORT_ONLY=1 serves nothing: docs/results.md again from docs/results/results.{json,md}
# and docs/results/open_world.md (after scripts/open_world_results.sh, whose table it quotes).
set -euo pipefail
cd "$(dirname "$0")/.."
N="${1:-50}"
PORT="${PORT:-8765}"
ms=.venv/bin/mergeserve
out=docs/results
[[ -n "${RESUME:-}${REPORT_ONLY:-}" ]] || rm -f "$out/replies.jsonl"
work="$(mktemp -d)"
trap 'kill "${server:-0}" 2>/dev/null || true; rm -rf "$work"' EXIT

STATIC='["linear", "task_arithmetic", "ties", "dare_ties", "pcb", "lines", "regmean", "regmean_pp", "fisher", "adamerging", "adamerging_layer", "evolutionary"]'
# shellcheck source=scripts/serve_lib.sh
source scripts/serve_lib.sh
serve() {  # serve MAX_LORA_RANK STATIC_METHODS_JSON
  serve_with MERGESERVE_ENGINE__MAX_LORA_RANK="$1" MERGESERVE_MERGE__STATIC_METHODS="$2" \
    MERGESERVE_MERGE__DEV_FILE=examples/dev.jsonl MERGESERVE_MERGE__BUILD_THREADS=2
}
evaluate() {  # evaluate MODELS
  $ms eval --base-url "http://127.0.0.1:$PORT" --models "$1" --n "$N" \
    --concurrency 16 --max-tokens 32 --out "$out" --resume
}

ARMS_A='base,expert:*,dynamic:exact'
ARMS_B="${ARMS_B:-base,expert:*,static:*,dynamic:exact,dynamic:twin}"
if [[ -z "${REPORT_ONLY:-}" ]]; then
  serve 16 '[]'
  evaluate "$ARMS_A"
  stop
  serve 64 "$STATIC"
  evaluate "$ARMS_B"
  stop
fi

open_traffic_section() {  # every arm on open traffic, from docs/results/open_world.md
  echo "## Every arm on open traffic"
  echo
  echo "From [results/open_world.md](results/open_world.md) (\`scripts/open_world_results.sh 50\`:"
  echo "the splits, the oracle and \`route:top1\`, adapter switching behind the same router, are"
  echo "described there, with the two-skill compositions, the blending study and the gates)."
  echo
  awk '/^\| arm \|/ {p = 1} p && !/^\|/ {exit} p' docs/results/open_world.md
  echo
  echo "![every arm on the four splits](results/open_world/open_world.png)"
}
{
  echo "# Demo results: base, experts, static merges and dynamic merging on the six demo tasks"
  echo
  echo "Exact match (%) on the test split, $N prompts per task (every template, the held-out"
  echo "one included; \"unseen templates\" is the accuracy on the held-out template alone),"
  echo "greedy, through the OpenAI API of the real server (vLLM, fp32, CPU)."
  echo "\"normalized\" is the model's score divided by each task's own expert, averaged."
  echo "\`static:*\` merge all six experts (rank 48) with the options of each method's static"
  echo "arm (declared beside it in mergeserve/adapters/merging/; \`mergeserve methods\`): linear = the average, task_arithmetic λ = 0.5,"
  echo "ties density 0.5, dare_ties density 0.5 λ = 0.5 seed 0, pcb ratio 0.2, lines"
  echo "α = 1/6 β = 0.5; regmean/regmean_pp α = 0.9, fisher, adamerging (task- and layer-wise)"
  echo "and evolutionary (CMA-ES) with their defaults (README, \"Merging adapters offline\"),"
  echo "learning from each expert's 20 examples.jsonl (evolutionary: the loss on 24 examples"
  echo "of the dev split, examples/dev.jsonl = \`mergeserve split --split dev --n 8\`)."
  echo "\"build s\" is the wall time of building each static merge (2 torch threads, CPU)."
  echo "\`dynamic:*\` route each request (MiniLM prototypes; top-2, floor 0.1, grid 0.05) and"
  echo "merge per request: \`dynamic:exact\` = Σ wᵢΔᵢ, \`dynamic:twin\` = shared (0.3 Σ Δ) +"
  echo "Σ wᵢ·exclusiveᵢ (rank 8). Frankenmerging (stacking layers of different models)"
  echo "changes the architecture and is out of scope for merging adapters of one base."
  echo "These are the six skills alone; every arm on open traffic (requests of no skill,"
  echo "requests needing two skills, and \`route:top1\`, adapter switching) is in"
  echo "[results/open_world.md](results/open_world.md) (\`scripts/open_world_results.sh\`)."
  echo
  echo "Reproduce with one command: \`scripts/demo_results.sh $N\`, which runs"
  echo
  echo '```bash'
  echo 'MERGESERVE_ENGINE__MAX_LORA_RANK=16 MERGESERVE_MERGE__STATIC_METHODS=[] mergeserve serve --port 8765 &'
  echo "mergeserve eval --base-url http://127.0.0.1:8765 --models '$ARMS_A' --n $N --concurrency 16 --max-tokens 32 --out docs/results --resume"
  echo '# restart with the static arms, at the slot rank that holds them'
  echo "MERGESERVE_ENGINE__MAX_LORA_RANK=64 MERGESERVE_MERGE__STATIC_METHODS='$STATIC' MERGESERVE_MERGE__DEV_FILE=examples/dev.jsonl mergeserve serve --port 8765 &"
  echo "mergeserve eval --base-url http://127.0.0.1:8765 --models '$ARMS_B' --n $N --concurrency 16 --max-tokens 32 --out docs/results --resume"
  echo '```'
  echo
  cat "$out/results.md"
  echo
  .venv/bin/python - "$out/results.json" <<'PY'
import json, sys

r = json.load(open(sys.argv[1]))
mean = {
    m: 100 * sum(c["accuracy"] for c in row.values()) / len(row)
    for m, row in r["accuracy"].items()
}
static = {m: v for m, v in mean.items() if m.startswith("static:")}
dyn = mean.get("dynamic:exact")
if static and dyn is not None:
    best = max(static, key=lambda m: static[m])
    gap = dyn - static[best]
    verdict = "within" if gap <= 10 else "not within"
    print(
        f"Best static merge: `{best}`, {static[best]:.1f} mean exact match; "
        f"`dynamic:exact` {dyn:.1f}: {gap:.1f} points apart, {verdict} 10 points."
    )
PY
  echo
  echo "![mean exact match of every arm, with build times](results/ranking.png)"
  echo
  echo "![exact match per task](results/results.png)"
  echo
  open_traffic_section
} > docs/results.md
echo "written: docs/results.md"
