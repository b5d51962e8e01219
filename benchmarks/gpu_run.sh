#!/usr/bin/env bash
# The GPU figures of docs/PERFORMANCE.md in one run on an H100/H200 machine without network access.
# Before (on a machine with network, from the repo root):
#   ../shared/tools/device-wheels.sh ultralytics==8.4.190 ultralytics-thop polars
# then carry .whl/ to the GPU machine and run: bash benchmarks/gpu_run.sh OUT_DIR
# Every step writes its log and JSON under OUT_DIR; a failing step does not stop the others.
set -uo pipefail
OUT=${1:?usage: benchmarks/gpu_run.sh OUT_DIR}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD/src
ff() { python3 -m fredfusion "$@"; }
step() { local name=$1; shift; echo "== $name: $*"; /usr/bin/time -f "$name wall %e s" "$@" >"$OUT/$name.log" 2>&1; tail -n 15 "$OUT/$name.log"; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt"
git rev-parse --short HEAD > "$OUT/commit.txt" 2>/dev/null || true
step synth ff synth --out /tmp/fs --sequences 10 --frames 300
step prepare ff prepare --fred-root /tmp/fs --out /tmp/fsp --imgsz 640 --workers 16
step bench_dual_s ff bench --data /tmp/fsp --modality dual --model s --batch 128 --eval-batch 256 \
  --input-shape 384 640 --workers 12 --steps 30 --warmup 5 --out "$OUT/bench_dual_s"
step bench_rgb_s ff bench --data /tmp/fsp --modality rgb --model s --batch 128 --eval-batch 256 \
  --input-shape 384 640 --workers 12 --steps 30 --warmup 5 --out "$OUT/bench_rgb_s"
step bench_dual_s_compile ff bench --data /tmp/fsp --modality dual --model s --batch 128 --eval-batch 256 \
  --input-shape 384 640 --workers 12 --steps 30 --warmup 10 --compile --skip read augment eval \
  --out "$OUT/bench_dual_s_compile"
step side_by_side python3 benchmarks/ultralytics_side_by_side.py --data /tmp/fsp --device cuda --model s \
  --imgsz 640 --batch 32 --epochs 5 --workers 8 --out "$OUT/side_by_side"
step demo ff demo --out /tmp/demo
