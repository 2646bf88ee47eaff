#!/usr/bin/env bash
# `make serve`: a local Prefect server on 127.0.0.1, the deployments from deployments/prefect.yaml, a process
# worker for flow runs, and one edit and one animate task worker on the tiny profile. Ctrl-C (or TERM) stops
# them all, with everything they started, and returns.
#   RECAST_SERVE_PORT      the server's port (default 4200)
#   RECAST_SERVE_DATABASE  postgres: run the server on a local PostgreSQL (Debian's), started here; or a
#                          postgresql+asyncpg:// URL of one you run. Default: SQLite under PREFECT_HOME.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
PORT=${RECAST_SERVE_PORT:-4200}
export PREFECT_HOME=${PREFECT_HOME:-$PWD/.prefect-server}
export PREFECT_API_URL=http://127.0.0.1:$PORT/api
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export PREFECT_WORKER_QUERY_SECONDS=${PREFECT_WORKER_QUERY_SECONDS:-2}
# Flow and task runs log at INFO, so the UI shows each run's logs.
export PREFECT_LOGGING_LEVEL=${RECAST_SERVE_LOG_LEVEL:-INFO}
export RECAST_EXECUTION=workers
export RECAST_ROOT=$PWD
export RECAST_INCOMING=${RECAST_INCOMING:-file://$PWD/artifacts/incoming}
mkdir -p "$PREFECT_HOME" artifacts/incoming logs

groups=()
# Each process runs in a session of its own, so stopping it stops everything it started (flow-run processes).
start() { local log=$1; shift; setsid "$@" > "logs/$log" 2>&1 & groups+=($!); }
cleanup() {
  trap - EXIT INT TERM
  for g in "${groups[@]}"; do kill -TERM -- "-$g" 2>/dev/null || true; done
  for _ in $(seq 1 20); do
    alive=0; for g in "${groups[@]}"; do kill -0 -- "-$g" 2>/dev/null && alive=1; done
    [ "$alive" = 0 ] && break; sleep 0.5
  done
  for g in "${groups[@]}"; do kill -KILL -- "-$g" 2>/dev/null || true; done
  [ -n "${PGSTOP:-}" ] && eval "$PGSTOP" > /dev/null 2>&1 || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM

case "${RECAST_SERVE_DATABASE:-}" in
  "") ;;
  postgres)
    eval "$(deployments/postgres.sh start "$PREFECT_HOME/postgres")"  # sets the URL and PGSTOP
    ;;
  *) export PREFECT_API_DATABASE_CONNECTION_URL=$RECAST_SERVE_DATABASE ;;
esac

start server.log "$BIN/prefect" server start --host 127.0.0.1 --port "$PORT"
for _ in $(seq 1 120); do curl -sf "$PREFECT_API_URL/health" > /dev/null && break; sleep 1; done
curl -sf "$PREFECT_API_URL/health" > /dev/null || { echo "server did not start: see logs/server.log"; exit 1; }

"$BIN/prefect" work-pool create recast-flows --type process > /dev/null 2>&1 || true
"$BIN/prefect" --no-prompt deploy --all --prefect-file deployments/prefect.yaml > logs/deploy.log 2>&1 \
  || { echo "deploy failed: see logs/deploy.log"; exit 1; }
start flow-worker.log "$BIN/prefect" worker start --pool recast-flows
start edit-worker.log "$BIN/recast" worker edit
start animate-worker.log "$BIN/recast" worker animate

cat <<MSG
recast is serving:
  Prefect UI   http://127.0.0.1:$PORT   (Deployments -> recast-edit/edit -> Run -> Custom run)
  photos       upload under $PWD/artifacts (runs from the UI read only under the storage root)
  logs         logs/*.log
Ctrl-C stops the server and the workers.
MSG
wait
