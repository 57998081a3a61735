#!/usr/bin/env bash
# The deployment path as users run it, on a throwaway local server:
#   prefect server start -> alma-r setup -> prefect deploy --all -> process workers ->
#   prefect deployment run build-alma-r/tiny-cpu --watch
# then the same run with its GPU stages handed to alma-r-stage/gpu (run_deployment) on the `gpu` pool.
# Usage: scripts/deploy_check.sh PARAMS_JSON [SECOND_PARAMS_JSON]   (from the repo root, venv on PATH)
set -euo pipefail
params=${1:?usage: scripts/deploy_check.sh PARAMS_JSON [SECOND_PARAMS_JSON]}
second=${2:-}
work=$(mktemp -d)
export PREFECT_HOME="$work/home" ALMA_R_HOME="$PWD" DO_NOT_TRACK=1 PREFECT_SERVER_ANALYTICS_ENABLED=false
unset PREFECT_API_URL
port=$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
pids=()  # server first; cleanup stops them in reverse order
cleanup() {
  # workers shut down gracefully on SIGTERM only when their server answers: give them 10 s, then SIGKILL
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
    kill -TERM -- "-${pids[i]}" 2>/dev/null || true
    [ "$i" -gt 0 ] && sleep 1  # workers first, while the server still answers their goodbye
  done
  for _ in $(seq 20); do
    alive=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [ "$alive" -eq 0 ] && break
    sleep 0.5
  done
  for pid in "${pids[@]}"; do kill -KILL -- "-$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
setsid prefect server start --host 127.0.0.1 --port "$port" >"$work/server.log" 2>&1 &
pids+=($!)
export PREFECT_API_URL="http://127.0.0.1:$port/api"
healthy() { python -c 'import os, urllib.request; urllib.request.urlopen(os.environ["PREFECT_API_URL"] + "/health", timeout=2)' 2>/dev/null; }
for _ in $(seq 240); do healthy && break; sleep 0.5; done
healthy || { cat "$work/server.log"; exit 1; }

alma-r setup --gpus 1
prefect --no-prompt deploy --all
# the GPU pool templates of docs/deployment.md are accepted by a real server
prefect work-pool create gpu-docker --type docker --base-job-template configs/work-pools/docker-gpu.json
prefect work-pool create gpu-kubernetes --type kubernetes --base-job-template configs/work-pools/kubernetes-gpu.json
setsid prefect worker start --pool cpu-process --limit 1 >"$work/worker-cpu.log" 2>&1 &
pids+=($!)
setsid prefect worker start --pool gpu --limit 1 >"$work/worker-gpu.log" 2>&1 &
pids+=($!)

status=0
prefect deployment run build-alma-r/tiny-cpu --watch --params "$params" || status=$?
if [ "$status" -eq 0 ] && [ -n "$second" ]; then
  prefect deployment run build-alma-r/tiny-cpu --watch --params "$second" || status=$?
  # every GPU stage the second run computed went through alma-r-stage/gpu and completed there
  python - <<'PY' || status=$?
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowFilter, FlowFilterName
with get_client(sync_client=True) as client:
    runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["alma-r-stage"])))
states = sorted((sorted(r.tags), r.state.name) for r in runs)
print("alma-r-stage flow runs:", states)
assert runs and all(r.state.is_completed() for r in runs), states
PY
fi
if [ "$status" -ne 0 ]; then
  echo "--- worker (cpu-process) log"; tail -n 60 "$work/worker-cpu.log"
  echo "--- worker (gpu) log"; tail -n 60 "$work/worker-gpu.log"
fi
exit "$status"
