#!/usr/bin/env bash
# Labeling speed on one GPU (issue 11, 1a-1c): real-size open_clip architectures with random weights (speed does not
# depend on the values) under bf16 autocast. Installs nothing: uses the project's own environment.
#
#     bench/gpu.sh                      # ViT-B-16 and RN50x64; about 8 minutes on an H100/H200
#     PEAK_TFLOPS=312 bench/gpu.sh      # another GPU: its peak dense bf16 matrix TFLOP/s (A100: 312)
#     DRY_RUN=1 bench/gpu.sh            # the same steps with small models and tiny sizes (CPU check of the script)
#     COMPILE=1 bench/gpu.sh            # the 1a/1b pipeline runs with --compile (torch.compile of the image tower)
#
# Prints, per model: images/s of the bare batched forward, the per-image loop and the pipeline's steady state, the
# model TFLOP/s (FlopCounterMode on one view x (1 + K^2) views per image) and its fraction of PEAK_TFLOPS; then the
# scaling over grids and batch sizes. JSON results land in $OUT (default out/bench-gpu).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PEAK=${PEAK_TFLOPS:-989}   # H100/H200 SXM dense bf16
OUT=${OUT:-out/bench-gpu}
mkdir -p "$OUT"

if [ "${DRY_RUN:-0}" = 1 ]; then
    VIT=cdul-synth-rn; RN=cdul-synth-rn; IMG=224  # same code paths, models small enough for a loaded CPU
    VIT_SIZES="2 4"; RN_SIZES="2 4"; LOOP=2; VIT_BATCH=2; RN_BATCH=2; SCALE_SIZES="2 4"; SCALE_BATCHES="2"
    GRIDS="2 3"; THREADS=1
else
    if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
        echo "bench/gpu.sh: torch sees no CUDA GPU here (DRY_RUN=1 runs the CPU check)" >&2
        exit 1
    fi
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    VIT=ViT-B-16; RN=RN50x64; IMG=480
    VIT_SIZES="512 2560"; RN_SIZES="48 240"; LOOP=32; VIT_BATCH=64; RN_BATCH=16; SCALE_SIZES="256 1280"
    SCALE_BATCHES="32 128"; GRIDS="2 3 4"; THREADS=$(nproc)
fi
echo "== $(date -u +%FT%TZ)  load: $(uptime | sed 's/.*load average: //')  peak bf16: $PEAK TFLOP/s"

common=(--pretrained none --precision amp --image-size "$IMG" --rounds 1 --warm-up 0)
[ "${COMPILE:-0}" = 1 ] && common+=(--label-arg compile=true)
echo "== 1a/1b $VIT, views cut on the device (the GPU default)"
"$PY" bench/label_efficiency.py --model "$VIT" "${common[@]}" --sizes $VIT_SIZES --loop-images "$LOOP" \
    --batch-size "$VIT_BATCH" --driver-threads "$THREADS" --peak-tflops "$PEAK" --json "$OUT/efficiency-$VIT-device.json"
echo "== 1a/1b $VIT, exact views (CPU, PIL)"
"$PY" bench/label_efficiency.py --model "$VIT" "${common[@]}" --sizes $VIT_SIZES --loop-images "$LOOP" \
    --batch-size "$VIT_BATCH" --driver-threads "$THREADS" --peak-tflops "$PEAK" --label-arg views=exact \
    --json "$OUT/efficiency-$VIT-exact.json"
echo "== 1a/1b $RN, views cut on the device"
"$PY" bench/label_efficiency.py --model "$RN" "${common[@]}" --sizes $RN_SIZES --loop-images "$LOOP" \
    --batch-size "$RN_BATCH" --driver-threads "$THREADS" --peak-tflops "$PEAK" --json "$OUT/efficiency-$RN-device.json"
echo "== 1c $VIT scaling: grids $GRIDS, batch sizes $SCALE_BATCHES (one GPU: one CLIP actor)"
"$PY" bench/label_scaling.py --model "$VIT" --pretrained none --precision amp --image-size "$IMG" \
    --sizes $SCALE_SIZES --grids $GRIDS --actors --batch-size "$VIT_BATCH" --batch-sizes $SCALE_BATCHES --repeats 1 \
    --json "$OUT/scaling-$VIT.json"
echo "== done $(date -u +%FT%TZ); JSON in $OUT"
