#!/usr/bin/env bash
# The deployment path exactly as README.md states it, on a throwaway local server: the fenced bash block of
# README.md that runs `prefect ... deploy` is extracted and run as written (alma-r setup -> prefect deploy --all
# -> workers in the background -> prefect deployment run build-alma-r/tiny-cpu --watch) in CHECKOUT; then,
# optionally, a second run of build-alma-r/tiny-cpu with SECOND_PARAMS_JSON, whose GPU stages may go to
# alma-r-stage/gpu (run_deployment) on the `gpu` pool, checked to have completed there.
# The harness, not the README, provides the server: a temporary PREFECT_HOME, a free port, PREFECT_API_URL.
# Usage: scripts/deploy_check.sh [CHECKOUT [SECOND_PARAMS_JSON]]   (venv on PATH; CHECKOUT defaults to .)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
checkout=$(cd "${1:-.}" && pwd)
second=${2:-}
work=$(mktemp -d)
export PREFECT_HOME="$work/home" DO_NOT_TRACK=1 PREFECT_SERVER_ANALYTICS_ENABLED=false
unset PREFECT_API_URL
port=$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
pids=()  # process groups: the server first; cleanup stops them in reverse order
cleanup() {
  # workers shut down gracefully on SIGTERM only when their server answers: give them 10 s, then SIGKILL
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
    kill -TERM -- "-${pids[i]}" 2>/dev/null || true
    [ "$i" -gt 0 ] && sleep 1  # workers first, while the server still answers their goodbye
  done
  for _ in $(seq 20); do
    alive=0
    for pid in "${pids[@]}"; do kill -0 -- "-$pid" 2>/dev/null && alive=1; done
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

# the README's block, verbatim; its background workers stay in the block's process group, which outlives it
python - "$repo/README.md" >"$work/readme.sh" <<'PY'
import re, sys
blocks = re.findall(r"^```bash\n(.*?)^```", open(sys.argv[1], encoding="utf-8").read(), re.M | re.S)
chosen = [b for b in blocks if re.search(r"^prefect .*\bdeploy\b", b, re.M)]
assert len(chosen) == 1, f"README.md: expected one bash block running `prefect deploy`, found {len(chosen)}"
print(chosen[0], end="")
PY
echo "--- README.md deployment block"; cat "$work/readme.sh"
status=0
(cd "$checkout" && exec setsid bash -e "$work/readme.sh" >"$work/readme.log" 2>&1) &
pids+=($!)
wait "${pids[-1]}" || status=$?
echo "--- README.md deployment block: exit code $status"; cat "$work/readme.log"

if [ "$status" -eq 0 ]; then
  # the GPU pool templates of docs/deployment.md are accepted by a real server
  prefect work-pool create gpu-docker --type docker --base-job-template "$repo/configs/work-pools/docker-gpu.json"
  prefect work-pool create gpu-kubernetes --type kubernetes \
    --base-job-template "$repo/configs/work-pools/kubernetes-gpu.json"
fi
if [ "$status" -eq 0 ] && [ -n "$second" ]; then
  (cd "$checkout" && prefect deployment run build-alma-r/tiny-cpu --watch --params "$second") || status=$?
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
  if [ "$status" -ne 0 ]; then echo "--- workers (README block) log, after the second run"; tail -n 120 "$work/readme.log"; fi
fi
exit "$status"
