#!/usr/bin/env bash
# The first thing to run on a GPU machine: does PyTorch see the GPU, do the smoke runs pass on it,
# and how fast are edits there?   bash scripts/gpu_check.sh   (results in gpu_check/, or $OUT)
#
# Sets up .venv with the CUDA build of PyTorch when there is none, then
#   1. prints the device, its memory and the library versions (gpu_check/device.txt);
#   2. runs the smoke profile (every notebook, tiny settings) on CUDA, replacing data/runs/smoke/;
#   3. times single edits of four editors (one per family) in fp32 and bf16 (gpu_check/speed_*.txt).
# Exits non-zero at the first step that fails; each step has its own time limit.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check}
mkdir -p "$OUT"
if [ ! -x "${NORMGROWTH_VENV:-.venv}/bin/python" ]; then
  NORMGROWTH_TORCH=cuda bash scripts/setup.sh
fi
# shellcheck disable=SC1091
. "${NORMGROWTH_VENV:-.venv}/bin/activate"
export TRANSFORMERS_VERBOSITY=error NORMGROWTH_DEVICE=cuda

timeout 120 python - <<'EOF' | tee "$OUT/device.txt"
import torch, transformers
if not torch.cuda.is_available():
    raise SystemExit("PyTorch sees no CUDA device: install the CUDA build (NORMGROWTH_TORCH=cuda bash scripts/setup.sh)")
p = torch.cuda.get_device_properties(0)
print(f"device: {p.name}, {p.total_memory / 1024**3:.1f} GiB, {torch.cuda.device_count()} visible")
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}")
print(f"bf16 supported: {torch.cuda.is_bf16_supported()}")
EOF

echo "== smoke profile on CUDA" | tee "$OUT/smoke.txt"
timeout 1800 python -m repro.study --profile smoke --force 2>&1 | tee -a "$OUT/smoke.txt"

for dtype in float32 bfloat16; do
  echo "== edit speed, $dtype" | tee "$OUT/speed_$dtype.txt"
  timeout 1800 python benchmarks/edit_speed.py --dtype "$dtype" --editors rome memit ft-m mend --edits 3 \
    --json "$OUT/speed_$dtype.json" 2>&1 | tee -a "$OUT/speed_$dtype.txt"
done
echo "gpu check passed; results in $OUT/"
