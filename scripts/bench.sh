#!/usr/bin/env bash
# Regenerate the benchmark results on the harness (benchmarks/harness.py) and
# docs/benchmarks.md. Outside CI: each benchmark owns the machine while it runs (2 cores:
# run nothing else). Durations on the 2-core AMD EPYC of the last full run (code d5ac5d1,
# bench.sh's log timestamps; first start compiled):
#   threads ~10 min, peers ~26 min, cpu_lora ~18 min, lora_engine ~10 min (twice: the
#   projections, vLLM's default targets), lora_op ~1 min, sparse_mixture ~8 min (twice:
#   eager, compiled), serve_throughput ~28 min (twice: all arms, then the one-task
#   arms over 24 rounds), remote_fleet ~23 min (twice: eager, compiled), lora_slots
#   ~12 min, merge_math ~15 min, hot_add ~3 min, load ~10 min (5 fresh servers), startup
#   ~31 min, routing (accuracy and latency of every router) ~3 min: about 3 h 20 min, plus
#   the venv and llama.cpp's build the first time (scripts/bench_deps.sh).
# Usage: scripts/bench.sh [name ...]   (default: all, in this order)
# RESUME=1 continues an interrupted run, in this clone or a later one: a result measured on
# this very code is kept (benchmarks/harness.py's `commit`: the last commit that changed
# code, so committing results, docs, tests or the README keeps results current), every
# other one is measured again. A checkout with uncommitted code changes resumes nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bench_deps.sh
out=benchmarks/results
mkdir -p "$out"
commit="$(.venv/bin/python benchmarks/harness.py commit)"
all=(threads peers cpu_lora lora_engine lora_op sparse_mixture serve_throughput remote_fleet
    lora_slots merge_math hot_add load startup routing)
declare -A extra=([load]="--rounds 5" [startup]="--rounds 5" [routing]="--threads 2 --loo")
run() {  # run NAME RESULT [ARGS...]: benchmarks/NAME.py ARGS > results/RESULT.cpu-2core.json
    local name=$1 result=$2
    shift 2
    local file="$out/$result.cpu-2core.json"
    if [[ -n "${RESUME:-}" && -f "$file" && -n "$commit" && "$commit" != *+dirty ]] &&
        [[ "$(.venv/bin/python benchmarks/harness.py commit "$file")" == "$commit" ]]; then
        echo "bench: $result kept (measured on $commit)" >&2
        return
    fi
    .venv/bin/python "benchmarks/$name.py" "$@" > "$out/$result.cpu-2core.json.part"
    mv "$out/$result.cpu-2core.json.part" "$out/$result.cpu-2core.json"
}
for b in "${@:-${all[@]}}"; do
    echo "bench: $b ($(date +%T))" >&2
    # shellcheck disable=SC2086  # extra flags split on purpose
    run "$b" "$b" ${extra[$b]:-}
    if [ "$b" = lora_engine ]; then  # again where vLLM puts LoRA layers (lm_head too)
        run lora_engine lora_engine.vllm-targets --vllm-default-targets
    fi
    if [ "$b" = sparse_mixture ]; then  # again compiled, as the deploy files run it
        run sparse_mixture sparse_mixture.compiled --compile
    fi
    if [ "$b" = serve_throughput ]; then  # the one-task arms again, beside the pinned merge,
        # over more rounds (three arms: ~20 s a round) to tell a few % from the noise
        run serve_throughput serve_throughput.one-task --rounds 24 \
            --arms "expert one-task,dynamic:routed one-task,dynamic:pinned one-task"
    fi
    if [ "$b" = remote_fleet ]; then  # again compiled, as the deploy files run it
        run remote_fleet remote_fleet.deployed --profile deployed
    fi
done
.venv/bin/python benchmarks/report.py
