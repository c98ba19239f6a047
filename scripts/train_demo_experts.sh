#!/usr/bin/env bash
# Retrain the demo expert set (examples/experts/<task>) on the embedded SmolLM2-135M-Instruct.
# Steps per task are what each needed to pass 90% exact match on a 2-core CPU. add and
# sort_numbers train in two stages: the first run, then a continuation from it (--init)
# on fresh data (seed 1) at half the learning rate, which is how the committed ones were
# made (the first stage alone scored 86% on their test splits). sort_numbers has a third
# stage on the task's train-only paraphrases (--paraphrases, seed 2): after two stages it
# scored 100% on the trained phrasings but 2/8 on the held-out one, where it ordered the
# numbers wrongly; more ways of asking, none of them the held-out one, is the remedy.
# It still scored 0.91 on 200 prompts of the held-out template (0.99 on the dev
# phrasings): a fourth stage (COMPOSED) gives a third of its prompts to phrasings
# composed from parts (mergeserve.tasks.composed: frame x verb x noun x direction x list
# format, thousands of ways of asking, none an evaluation phrasing, none using the
# held-out template's words). Chosen on dev (300 prompts 0.977 against 0.970, dev
# phrasings 0.99 both), then the held-out template once: 0.95 (190/200) from 0.91. It
# keeps the paraphrase stage's examples.jsonl, so the router is the one measured before.
# add and reverse_words end with the same paraphrase stage (issue 23: asked in phrasings
# written outside the project, they scored 0.85 and 0.875; on the dev part of
# mergeserve.tasks.phrasings add scored 0.86, failing word problems and "Add up: a, b").
# capital, sentiment and to_json scored 1.0 there and on their held-out template, so they
# keep their one-stage recipe. reverse_words keeps its first stage's examples.jsonl (the
# router's prototypes): its paraphrases ("I typed …, write those words again …", "Read
# these words … and write them out") spread its prototypes over writing requests; its
# open-world threshold fell from 0.448 to 0.353 and "Write a haiku about autumn." was
# routed to it. On the dev splits (benchmarks/open_world.py) its first-stage examples
# sent 96.2% of general requests to none against 95.5%, at 99.3% of unseen phrasings
# routed right against 100%.
# Usage: scripts/train_demo_experts.sh [task ...]   (default: all six; existing dirs are kept)
set -euo pipefail
cd "$(dirname "$0")/.."
declare -A STEPS=([sentiment]=60 [capital]=120 [reverse_words]=150 [to_json]=120 [sort_numbers]=450 [add]=600)
declare -A MORE=([sort_numbers]=300 [add]=350)
declare -A PARAPHRASED=([sort_numbers]=300 [add]=300 [reverse_words]=150)
declare -A COMPOSED=([sort_numbers]=300)
declare -A FIRST_EXAMPLES=([reverse_words]=1)
ORDER=(sentiment capital reverse_words to_json sort_numbers add)
tasks=("${@:-${ORDER[@]}}")
stage="$(mktemp -d)"
trap 'rm -rf "$stage"' EXIT
train() { .venv/bin/mergeserve train-expert --rank 8 --alpha 16 --batch-size 16 "$@"; }
for t in "${tasks[@]}"; do
  out="examples/experts/$t"
  if [[ -e "$out" ]]; then echo "keep $out"; continue; fi
  # stage 1, then (MORE) a continuation on fresh data, then (PARAPHRASED) one on the
  # paraphrases, then (COMPOSED) one on composed phrasings too; the last stage writes $out
  last="$stage/$t.1"
  [[ -n "${MORE[$t]:-}${PARAPHRASED[$t]:-}" ]] || last="$out"
  train --task "$t" --steps "${STEPS[$t]}" --lr 1e-3 --seed 0 --threads 2 --out "$last"
  if [[ -n "${MORE[$t]:-}" ]]; then
    next="$stage/$t.2"
    [[ -n "${PARAPHRASED[$t]:-}" ]] || next="$out"
    train --task "$t" --init "$last" --steps "${MORE[$t]}" --lr 5e-4 --seed 1 --threads 2 \
      --out "$next"
    last="$next"
  fi
  if [[ -n "${PARAPHRASED[$t]:-}" ]]; then
    next="$stage/$t.3"
    [[ -n "${COMPOSED[$t]:-}" ]] || next="$out"
    train --task "$t" --init "$last" --paraphrases --steps "${PARAPHRASED[$t]}" --lr 5e-4 \
      --seed 2 --threads 2 --out "$next"
    [[ -z "${FIRST_EXAMPLES[$t]:-}" ]] || cp "$stage/$t.1/examples.jsonl" "$next/examples.jsonl"
    last="$next"
  fi
  if [[ -n "${COMPOSED[$t]:-}" ]]; then  # the router keeps the paraphrase stage's examples
    train --task "$t" --init "$last" --paraphrases --composed --steps "${COMPOSED[$t]}" \
      --lr 5e-4 --seed 3 --threads 2 --out "$out"
    cp "$last/examples.jsonl" "$out/examples.jsonl"
  fi
done
