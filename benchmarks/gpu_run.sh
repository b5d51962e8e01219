#!/usr/bin/env bash
# The GPU figures of docs/PERFORMANCE.md in one run on an H100/H200 machine without network access.
# Before (on a machine with network, from the repo root):
#   ../shared/tools/device-wheels.sh ultralytics==8.4.190 ultralytics-thop polars polars-runtime-32 \
#     simplejpeg==1.9.0 zstandard==0.25.0 torchcodec==0.17.0 scikit-image==0.26.0 lazy-loader \
#     imageio tifffile networkx scipy
# then carry .whl/ to the GPU machine and run: bash benchmarks/gpu_run.sh OUT_DIR [BUDGET_S]
# Every step has a time limit inside BUDGET_S (default 540) and writes its log under a work folder;
# a failing step does not stop the others. OUT_DIR receives summary.log (every step's tail) and
# results.tgz (all logs and JSON files), refreshed after each step.
# SMALL=1 runs the same steps at toy sizes (CPU is fine) to check the script itself; SKIP="demo cpu_suite"
# leaves the named steps out (to give the others, e.g. the compiled bench pair at the end, more of the
# budget).
set -uo pipefail
OUT=${1:?usage: benchmarks/gpu_run.sh OUT_DIR [BUDGET_S]}
BUDGET=${2:-540}
START=$(date +%s)
W=/tmp/gpu_run/logs
D=/tmp/gpu_run/data
rm -rf /tmp/gpu_run && mkdir -p "$OUT" "$W" "$D"
exec > >(tee "$OUT/summary.log") 2>&1
if [ "${SMALL:-0}" != 1 ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
FF="python3 -m fredfusion"  # word-split on purpose: timeout runs programs, not functions
left() { echo $((BUDGET - ($(date +%s) - START))); }
pack() { tar -czf "$OUT/.results.$BASHPID.tgz" --exclude='*.pt' --exclude='*.pth' --exclude=yolo -C "$W" . 2>/dev/null && mv -f "$OUT/.results.$BASHPID.tgz" "$OUT/results.tgz"; }
step() {  # step NAME LIMIT_S command...
  local name=$1 limit=$2 l t0
  shift 2
  l=$(left)
  if [[ " ${SKIP:-} " == *" $name "* ]]; then echo "== $name: skipped (SKIP)"; return; fi
  if [ "$l" -lt 20 ]; then echo "== $name: skipped (budget spent)"; return; fi
  [ "$limit" -gt "$l" ] && limit=$l
  echo "== $name (limit ${limit} s, $(($(date +%s) - START)) s in): $*"
  t0=$(date +%s)
  timeout -k 5 "$limit" "$@" >"$W/$name.log" 2>&1
  echo "-- $name: rc $? in $(($(date +%s) - t0)) s"
  tail -n "${TAIL:-14}" "$W/$name.log"
  pack
}

if [ "${SMALL:-0}" = 1 ]; then
  SEQ=6 FRAMES=40 SRC="320 180" IMGSZ=320 HW="192 320" MODEL=n BATCH=8 STEPS=3 WARM=1 WORKERS=2 EPOCHS=1
  IMAGES=2000 DEMO=(--epochs 1 --frames 20 --sequences 6) DEV=cpu SUITE=(tests/test_config.py)
  SCALE=(--sequences 1 --frames 60 --read-seconds 2) CODEC_FRAMES=8
else
  SEQ=12 FRAMES=320 SRC="640 360" IMGSZ=640 HW="384 640" MODEL=s BATCH=128 STEPS=30 WARM=5 WORKERS=12 EPOCHS=3
  IMAGES=100000 DEMO=() DEV=cuda SUITE=(-n 6 --deselect tests/engine/test_convergence.py)  # the demo runs beside it
  SCALE=(--sequences 4 --frames 3050 --read-seconds 10) CODEC_FRAMES=64
fi
read -r SRC_W SRC_H <<<"$SRC"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$W/gpu.txt"
python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, \
'cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')" \
  | tee -a "$W/gpu.txt"
echo "commit ${COMMIT:-unknown}, $(nproc) CPUs" | tee -a "$W/gpu.txt"

# Phase A: the demo on the GPU; CPU-only work alongside (the bench sample, the CPU suite on this
# machine's torch with the GPU hidden, COCO metrics on 100k images). The demo figure is therefore an
# upper bound; everything of phase B runs alone.
(
  step synth 60 python3 - "$D/fred" "$SEQ" "$FRAMES" "$SRC_W" "$SRC_H" <<'EOF'
import sys
from multiprocessing import Pool
from pathlib import Path
from fredfusion.data.synth import write_sample
out, seq, frames, w, h = Path(sys.argv[1]), *map(int, sys.argv[2:])
def one(i):
    write_sample(out, frames=frames, width=w, height=h, sequence_ids=[i], seed=i)
with Pool(min(seq, 12)) as pool:
    pool.map(one, range(seq))
print(f"wrote {seq} sequences x {frames} frames at {w}x{h}")
EOF
  step prepare 90 $FF prepare --fred-root "$D/fred" --out "$D/prep" --imgsz "$IMGSZ" --workers 12 --device cpu
  CUDA_VISIBLE_DEVICES= TAIL=6 step cpu_suite 150 python3 -m pytest -q -rfE -p no:cacheprovider "${SUITE[@]}"
  step coco_100k 90 python3 benchmarks/bench_coco_metrics.py --images "$IMAGES"
) &
BG=$!
step demo 260 $FF demo --out "$D/demo" --device "$DEV" "${DEMO[@]}"
wait $BG

# Phase B: the GPU path alone.
TAIL=20 step cuda_tests 120 python3 -m pytest -q -rfE -p no:cacheprovider tests/reliability/test_cuda.py tests/data/test_augment.py -k "cuda or device or mixed or sync or resume"
# the data-scale figures: codecs (GPU decode rates), prepare on the GPU at FRED's frame counts, random
# reads of the compressed store through the loader, extrapolation to all of FRED
TAIL=40 step codecs 60 python3 benchmarks/bench_codecs.py --frames "$CODEC_FRAMES" --out "$W/codecs.json"
TAIL=30 step fred_scale 120 python3 benchmarks/bench_fred_scale.py "${SCALE[@]}" --device "$DEV" --workers 12 \
  --batch "$BATCH" --out "$D/scale"
cp "$D/scale/bench_fred_scale.json" "$W/" 2>/dev/null
BENCH=(--data "$D/prep" --model "$MODEL" --batch "$BATCH" --eval-batch $((BATCH * 2)) --input-shape $HW
  --workers "$WORKERS" --steps "$STEPS" --warmup "$WARM" --device "$DEV")
step bench_dual 90 $FF bench --modality dual "${BENCH[@]}" --out "$W/bench_dual"
step bench_rgb 75 $FF bench --modality rgb "${BENCH[@]}" --out "$W/bench_rgb"
TAIL=24 step side_by_side 170 python3 benchmarks/ultralytics_side_by_side.py --data "$D/prep" --device "$DEV" \
  --model "$MODEL" --imgsz "$IMGSZ" --batch $((BATCH / 2)) --epochs "$EPOCHS" --workers 8 --out "$W/side_by_side"
# the compiled step twice on one cache folder (outside the packed logs): cold (every graph compiled and
# stored), then warm (loaded); each bench.json "compile" has the first calls' seconds and the cache state,
# i.e. the first-compile and the warm-start times, and the compiled rates. The cold run leaves the warm
# one WARM_S of the budget (a cold run cut short leaves the graphs it finished: the warm one says partial).
CACHE=/tmp/gpu_run/compile_cache WARM_S=75
COMPILED=(--modality dual "${BENCH[@]}" --compile --compile-cache "$CACHE" --skip read augment eval --warmup 10)
COLD_S=$(($(left) - WARM_S))
((COLD_S > 150)) && COLD_S=150
((COLD_S < 20)) && COLD_S=20
TAIL=16 step bench_dual_compile "$COLD_S" $FF bench "${COMPILED[@]}" --out "$W/bench_dual_compile"
TAIL=16 step bench_dual_compile_warm "$WARM_S" $FF bench "${COMPILED[@]}" --out "$W/bench_dual_compile_warm"
echo "== done in $(($(date +%s) - START)) s"
