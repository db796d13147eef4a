#!/usr/bin/env bash
# The GPU checks of this folder, as one script: CUDA smoke runs of the chapter's trainer and
# of 02 (NCCL, one process, then resumed), then the benchmark table for the 124M shape at
# context 1024. Run it from the repository root on a machine with a CUDA GPU:
#
#     bash ch05/10_llm-training-speed/gpu_bench.sh
#
# Settings through the environment: OUT (where logs go, default /tmp/gpu_bench),
# CH05_DATA_DIR (a folder with tinyshakespeare.txt and the-verdict.txt; unset: download),
# DEVICE (default cuda), BENCH_ARGS, SMOKE_ARGS, BEST_ARGS and BEST_BATCH (to try the script on a
# CPU with a tiny model).
set -uo pipefail
OUT=${OUT:-/tmp/gpu_bench}
DEVICE=${DEVICE:-cuda}
PY=${PYTHON:-python3}
case $PY in */*) PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY") ;; esac  # survives the cd below
BENCH_ARGS=${BENCH_ARGS:---batch-size 16 --steps 5 --warmup-steps 2 --grad-accum-steps 1}
SMOKE_ARGS=${SMOKE_ARGS:---model small --context-length 256 --batch-size 4 --max-steps 6 --warmup-steps 2}
BEST_BATCH=${BEST_BATCH:-32}
BEST_ARGS=${BEST_ARGS:---model 124M --context-length 1024 --max-steps 12 --warmup-steps 4 --compile}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
FOLDER=ch05/10_llm-training-speed
status=0

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/gpu.txt" || true
$PY -c "import torch; print('torch', torch.__version__, '| cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"

echo "== smoke: the chapter's gpt_train.py on $DEVICE"
$PY ch05/01_main-chapter-code/gpt_train.py --model tiny --num-epochs 1 --device "$DEVICE" \
    --output-dir /tmp/gpu_bench_o --overwrite --no-progress >"$OUT/smoke.txt" 2>&1 || status=1
tail -n 4 "$OUT/smoke.txt"

ALL="--bf16 --native-ops --sdpa --pad-vocab --fused-adamw --no-decay-bias-norm --mask-on-the-fly"
[ "$DEVICE" = cuda ] && ALL="$ALL --tf32 --pin-memory"
echo "== smoke: 02 (every optimization but compile) under torchrun (NCCL on cuda, gloo on cpu), then resumed"
$PY -m torch.distributed.run --standalone --nproc_per_node=1 $FOLDER/02_opt_multi_gpu_ddp.py --device "$DEVICE" \
    $SMOKE_ARGS $ALL --output-dir /tmp/gpu_bench_02 --overwrite --no-progress >>"$OUT/smoke.txt" 2>&1 || status=1
$PY -m torch.distributed.run --standalone --nproc_per_node=1 $FOLDER/02_opt_multi_gpu_ddp.py --device "$DEVICE" \
    $SMOKE_ARGS $ALL --max-steps 9 --output-dir /tmp/gpu_bench_02 --resume --no-progress >>"$OUT/smoke.txt" 2>&1 \
    || status=1
tail -n 7 "$OUT/smoke.txt"

echo "== benchmark"
(cd $FOLDER && $PY speed_benchmark.py --device "$DEVICE" $BENCH_ARGS --output-json "$OUT/bench.json") \
    2>&1 | tee "$OUT/bench.txt" || status=1

# Dropout 0 lets scaled_dot_product_attention use its fused kernel, and a larger micro-batch
# keeps the GPU busier: the configuration to judge the MFU of the 124M shape by.
echo "== fully optimized, dropout 0, micro-batch $BEST_BATCH"
(cd $FOLDER && $PY 01_opt_single_gpu.py --device "$DEVICE" $ALL $BEST_ARGS --drop-rate 0 \
    --batch-size "$BEST_BATCH" --output-dir /tmp/gpu_bench_best --overwrite --no-progress) \
    2>&1 | tee "$OUT/best.txt" || status=1
exit $status
