#!/usr/bin/env bash
# `make services`: the four services as four processes against real back ends.
# Every VOD_* variable already set wins; the defaults below are this machine's servers.
# Ctrl-C (or SIGTERM) stops all four and waits for them to finish in-flight work.
set -euo pipefail
BIN=${BIN:-.venv/bin}

export VOD_DB_URL=${VOD_DB_URL:-mysql+aiomysql://root@127.0.0.1:3306/vod}
export VOD_REDIS_URL=${VOD_REDIS_URL:-redis://127.0.0.1:6379/0}
export VOD_AMQP_URL=${VOD_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/}
export VOD_BLOB_URL=${VOD_BLOB_URL:-file://./var/blobs}
export VOD_API_URL=${VOD_API_URL:-http://127.0.0.1:8001}
export VOD_STREAM_URL=${VOD_STREAM_URL:-http://127.0.0.1:8002}
export VOD_SCHEDULER_URL=${VOD_SCHEDULER_URL:-http://127.0.0.1:8003}
export VOD_DB_MIGRATE=${VOD_DB_MIGRATE:-1}
if [[ -z "${VOD_INTERNAL_TOKEN:-}" ]]; then
  # Local convenience only: production sets a long-lived secret shared by all replicas.
  VOD_INTERNAL_TOKEN=$("$BIN/python" -c 'import secrets; print(secrets.token_urlsafe(32))')
  export VOD_INTERNAL_TOKEN
fi

if [[ -z "${VOD_JWT_PRIVATE_KEY:-}" ]]; then
  # Local convenience only: a dev key pair under ./var (made once). Production passes the
  # PEMs (or paths to them) in VOD_JWT_PRIVATE_KEY / VOD_JWT_PUBLIC_KEY.
  "$BIN/python" -c 'from pathlib import Path; from shared.auth import ensure_dev_keypair; ensure_dev_keypair(Path("var"))'
  keys=var
  export VOD_JWT_PRIVATE_KEY="$keys/jwt-ed25519-private.pem"
  export VOD_JWT_PUBLIC_KEY="${VOD_JWT_PUBLIC_KEY:-$keys/jwt-ed25519-public.pem}"
fi

"$BIN/python" -m shared.db create-database

pids=()
stop() {
  trap - INT TERM
  kill -TERM "${pids[@]}" 2>/dev/null || true
  wait "${pids[@]}" 2>/dev/null || true
}
trap stop INT TERM

# Upstreams first; the gateway last.
for service in api_service stream_service scheduler_service gateway; do
  "$BIN/python" -m "$service" &
  pids+=("$!")
done
echo "vod services are starting: http://127.0.0.1:${VOD_GATEWAY_PORT:-8000}/  (Ctrl-C to stop)"
# Any one exiting stops the rest: a half-running suite is worse than a stopped one.
status=0
wait -n "${pids[@]}" || status=$?
stop
exit "$status"
