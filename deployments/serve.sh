#!/usr/bin/env bash
# `make serve`: a local Prefect server on 127.0.0.1, the deployments from deployments/prefect.yaml, a process
# worker for flow runs, and one edit and one animate task worker on the tiny profile. Ctrl-C stops them all.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
PORT=${RECAST_SERVE_PORT:-4200}
export PREFECT_HOME=${PREFECT_HOME:-$PWD/.prefect-server}
export PREFECT_API_URL=http://127.0.0.1:$PORT/api
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export PREFECT_WORKER_QUERY_SECONDS=${PREFECT_WORKER_QUERY_SECONDS:-2}
export RECAST_EXECUTION=workers
export RECAST_ROOT=$PWD
export RECAST_INCOMING=${RECAST_INCOMING:-file://$PWD/artifacts/incoming}
mkdir -p "$PREFECT_HOME" artifacts/incoming logs

pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

"$BIN/prefect" server start --host 127.0.0.1 --port "$PORT" > logs/server.log 2>&1 & pids+=($!)
for _ in $(seq 1 120); do curl -sf "$PREFECT_API_URL/health" > /dev/null && break; sleep 1; done
curl -sf "$PREFECT_API_URL/health" > /dev/null || { echo "server did not start: see logs/server.log"; exit 1; }

"$BIN/prefect" work-pool create recast-flows --type process > /dev/null 2>&1 || true
"$BIN/prefect" --no-prompt deploy --all --prefect-file deployments/prefect.yaml > logs/deploy.log 2>&1 \
  || { echo "deploy failed: see logs/deploy.log"; exit 1; }
"$BIN/prefect" worker start --pool recast-flows > logs/flow-worker.log 2>&1 & pids+=($!)
"$BIN/recast" worker edit > logs/edit-worker.log 2>&1 & pids+=($!)
"$BIN/recast" worker animate > logs/animate-worker.log 2>&1 & pids+=($!)

cat <<MSG
recast is serving:
  Prefect UI   http://127.0.0.1:$PORT   (Deployments -> recast-edit/edit -> Run -> Custom run)
  photos       upload under $PWD/artifacts (runs from the UI read only under the storage root)
  logs         logs/*.log
Ctrl-C stops the server and the workers.
MSG
wait
