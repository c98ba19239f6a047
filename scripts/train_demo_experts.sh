#!/usr/bin/env bash
# Retrain the demo expert set (examples/experts/<task>) on the embedded SmolLM2-135M-Instruct.
# Steps per task are what each needed to pass 90% dev exact match on a 2-core CPU.
# Usage: scripts/train_demo_experts.sh [task ...]   (default: all six; existing dirs are kept)
set -euo pipefail
cd "$(dirname "$0")/.."
declare -A STEPS=([sentiment]=60 [capital]=120 [reverse_words]=150 [to_json]=120 [sort_numbers]=450 [add]=600)
ORDER=(sentiment capital reverse_words to_json sort_numbers add)
tasks=("${@:-${ORDER[@]}}")
for t in "${tasks[@]}"; do
  out="examples/experts/$t"
  if [[ -e "$out" ]]; then echo "keep $out"; continue; fi
  .venv/bin/mergeserve train-expert --task "$t" --steps "${STEPS[$t]}" --rank 8 --alpha 16 \
    --lr 1e-3 --batch-size 16 --seed 0 --threads 2 --out "$out"
done
