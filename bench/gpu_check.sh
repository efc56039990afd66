#!/usr/bin/env bash
# The GPU check, for a machine with one CUDA GPU and no internet (run from the repo root; wheels in .whl/ from
# bench/gpu_wheels.sh, made where pip reaches PyPI). Under 8 minutes on an H200. Writes its results under $OUT
# (or ./gpu-check): the gpu-2b benchmark's tables (fixed and variable workloads, and packing), the memory
# planner's prediction against the measured CUDA peak where the planner is present, and the GPU-marked tests.
#
#   bash bench/gpu_wheels.sh                       # here, once
#   bash bench/gpu_check.sh                        # there (the device tool: carry .whl)
set -uo pipefail
out="${OUT:-$PWD/gpu-check}"
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:$PWD/src"
else
  export PYTHONPATH="$PWD/src"
fi
export PYTHONUNBUFFERED=1 VLMTUNE_CACHE=/tmp/vlmtune-cache HF_HUB_OFFLINE=1
log="$out/gpu_check.log"
step() { echo "== $* ($(date +%T))" | tee -a "$log"; }

step "versions"
python3 - <<'PY' 2>&1 | tee -a "$log"
import torch, transformers, peft, accelerate
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))
print("transformers", transformers.__version__, "peft", peft.__version__, "accelerate", accelerate.__version__)
try:
    import bitsandbytes
    print("bitsandbytes", bitsandbytes.__version__)
except ImportError as e:
    print("bitsandbytes missing:", e)
PY

step "bench gpu-2b: fixed and variable workloads"
timeout 210 python3 -m vlmtune.bench --preset gpu-2b --workload both --rounds 1 --work /tmp/bench-plain \
  --out "$out/bench_gpu2b.json" 2>&1 | tail -30 | tee -a "$log"

step "bench gpu-2b: variable workload with packing"
timeout 90 python3 -m vlmtune.bench --preset gpu-2b --workload variable --rounds 1 --set train.packing=true \
  --work /tmp/bench-packing --out "$out/bench_gpu2b_packing.json" 2>&1 | tail -20 | tee -a "$log"

step "memory planner: predicted vs measured CUDA peak (2B bf16 LoRA, nf4 QLoRA, full projector)"
timeout 120 python3 -m vlmtune.bench.memory --steps 4 --out "$out/memory_gpu.json" 2>&1 | tail -20 | tee -a "$log"

step "GPU-marked tests"
timeout 60 python3 -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tail -15 | tee -a "$log"
step "done"
