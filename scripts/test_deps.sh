#!/usr/bin/env bash
# System tools the test suite uses as real parts, not mocks: Debian's prometheus package
# (the `prometheus` server scrapes /metrics in the integration tier, `promtool check
# metrics` validates the exposition). Installed once with apt-get; a no-op afterwards.
set -euo pipefail
if command -v prometheus >/dev/null && command -v promtool >/dev/null; then
    exit 0
fi
sudo=()
if [[ "$(id -u)" != 0 ]]; then
    command -v sudo >/dev/null || {
        echo "test deps: install Debian's 'prometheus' package (needs root)" >&2
        exit 1
    }
    sudo=(sudo)
fi
echo "test deps: apt-get install prometheus" >&2
"${sudo[@]}" apt-get update -qq
DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends \
    prometheus >/dev/null
