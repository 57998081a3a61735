#!/usr/bin/env bash
# The checks that need a GPU machine, as one script: run it on a machine with one NVIDIA GPU and many cores, from
# the repository root, and read the results in $OUT (default ./gpu-check/). It needs only the machine's own
# python3 with torch; the project's pure-Python dependencies can come as wheels in .whl/ (installed to
# /tmp/site, nothing is written outside /tmp and $OUT).
#
#   GPU_CHECK_PARTS="learning bench resume profile" OUT=/tmp/out bash scripts/gpu_check.sh
#
# Parts (each writes <part>.log and its results; a failing part does not stop the others, the exit status is the
# number of failed parts):
#   learning  the learning check on the machine's CPU cores (GPU hidden), 10 seeds under the default kernels and
#             5 under ATEN_CPU_CAPABILITY=avx2 + ONEDNN_MAX_CPU_ISA=AVX2 at once, one process and thread per
#             seed: learning-check-default.md / learning-check-avx2.md (sections of docs/learning-check.md)
#   bench     benchmarks/cpo_vs_trl.py on CUDA, bfloat16, the 1B LLaMA: our engine against TRL's CPOTrainer,
#             side by side (needs the benchmark's data folder in $ALMA_DATA)
#   resume    scripts/gpu_resume_check.py: bf16 CPO with LoRA dropout on CUDA, interrupted at a checkpoint and
#             resumed in a new process, against an uninterrupted run (exact resume needs the CUDA RNG state)
#   profile   benchmarks/profile_step.py on CUDA (the bench's 1B setup, LoRA and full): where our engine's step
#             spends its time, the GPU's busy share and the host's waits (TRL was faster there: why)
set -u
OUT=${OUT:-$PWD/gpu-check}
PARTS=${GPU_CHECK_PARTS-"learning bench resume profile"}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 PREFECT_SERVER_ANALYTICS_ENABLED=false

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
  lscpu | grep -E "Model name|^CPU\(s\)|Flags" | cut -c1-400
  python3 --version
} >"$OUT/machine.txt" 2>&1

WHEELS=${GPU_CHECK_WHEELS:-.whl}
if [ -d "$WHEELS" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl \
    >"$OUT/wheels.log" 2>&1 || { echo "wheel install failed: see wheels.log"; exit 1; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# alma_r as Python sees it (the package-dir mapping of pyproject.toml), without installing: symlinks in /tmp/pkg.
rm -rf /tmp/pkg && mkdir -p /tmp/pkg
python3 -c "import sys; sys.path.insert(0, 'scripts'); from pathlib import Path; \
from lint_imports import stage_package; stage_package(Path('.').resolve(), Path('/tmp/pkg'))"
export PYTHONPATH=/tmp/pkg${PYTHONPATH:+:$PYTHONPATH}
python3 -c "import torch, transformers, peft, accelerate; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
torch.cuda.get_device_name(0), '| transformers', transformers.__version__, '| peft', peft.__version__, \
'| accelerate', accelerate.__version__)" >>"$OUT/machine.txt" 2>&1

failed=0
part() { case " $PARTS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

if part learning; then
  cp docs/learning-check.md "$OUT/learning-check-default.md"
  cp docs/learning-check.md "$OUT/learning-check-avx2.md"
  lc="python3 -P -m alma_r.cli learning-check --variant main --write-doc"
  CUDA_VISIBLE_DEVICES="" $lc --seeds 10 --jobs 10 --doc "$OUT/learning-check-default.md" \
    >"$OUT/learning-default.log" 2>&1 &
  default_pid=$!
  CUDA_VISIBLE_DEVICES="" ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \
    $lc --seeds 5 --jobs 5 --doc "$OUT/learning-check-avx2.md" >"$OUT/learning-avx2.log" 2>&1 &
  avx2_pid=$!
fi

if part bench; then
  python3 benchmarks/cpo_vs_trl.py --device cuda --dtype bfloat16 --model-size 1b --steps 30 --pairs 512 \
    --peak-tflops 790 >"$OUT/bench.log" 2>&1 || { echo "bench failed"; failed=$((failed + 1)); }
fi

if part resume; then
  python3 scripts/gpu_resume_check.py --out "$OUT/resume.json" >"$OUT/resume.log" 2>&1 \
    || { echo "resume failed"; failed=$((failed + 1)); }
fi

if part profile; then
  for ft in lora full; do
    python3 benchmarks/profile_step.py --device cuda --dtype bfloat16 --model-size 1b --finetune "$ft" \
      --trace "$OUT/profile-$ft.json" >"$OUT/profile-$ft.log" 2>&1 || { echo "profile $ft failed"; failed=$((failed + 1)); }
  done
fi

if part learning; then
  wait "$default_pid" || { echo "learning check (default kernels) failed"; failed=$((failed + 1)); }
  wait "$avx2_pid" || { echo "learning check (avx2) failed"; failed=$((failed + 1)); }
fi
for f in "$OUT"/*.log; do echo "== $f"; tail -n 25 "$f"; done
exit "$failed"
