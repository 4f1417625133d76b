#!/usr/bin/env bash
# (B) on the GPU machine: `gist-fast bench`, ViT-B/16 in bf16 at batch 128 and 256, every
# implementation, with the largest batch within 16 GiB (benchmarks/README.md).
#   bash benchmarks/gpu_bench.sh GIT_SHA
# Back in $OUT: log.txt, device.txt, results.csv (rows appended after every cell) and bench.md
# (redrawn from it); the PNGs are drawn here, from the CSV, by benchmarks/plot.py.
# Stage budgets (s) can be overridden: T_DEVICE T_INSTALL T_BENCH; BENCH_ARGS replaces the bench's arguments.
source "$(dirname "$0")/gpu_stages.sh"
T_DEVICE=${T_DEVICE:-15} T_INSTALL=${T_INSTALL:-25} T_BENCH=${T_BENCH:-410}
# the bench starts no cell that would end later than this before its stage's end (reports and exit);
# it expects a compiled implementation's first cell to take --compile-seconds (90, ViT-B on an H100)
BENCH_MARGIN=${BENCH_MARGIN:-15}
BENCH_ARGS=${BENCH_ARGS:---device cuda --dtype bf16 --models vit_base --batches 128,256 --memory-budget 16GiB}
plan "$T_DEVICE" "$T_INSTALL" "$T_BENCH"

device_info "$T_DEVICE"
install "$T_INSTALL"
# shellcheck disable=SC2086  # BENCH_ARGS is a list of arguments
stage "gist-fast bench" "$T_BENCH" "$LOG" "$PYTHON" -m gist_fast bench $BENCH_ARGS --out "$OUT" --no-plots \
  --time-budget $((T_BENCH > BENCH_MARGIN ? T_BENCH - BENCH_MARGIN : 0))
finish
