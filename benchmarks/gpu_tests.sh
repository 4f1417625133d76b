#!/usr/bin/env bash
# (A) on the GPU machine: the CUDA tests, then the op micro-benchmarks (benchmarks/README.md).
#   bash benchmarks/gpu_tests.sh GIT_SHA
# Back in $OUT: log.txt, device.txt, tests.txt (pytest summaries), results.csv (the op rows, appended
# after every measurement) and ops.md (redrawn from it).
# Stage budgets (s) can be overridden: T_DEVICE T_INSTALL T_WHEELS T_GPU_TESTS T_OP_TESTS T_OPS_BENCH;
# OPS_ARGS replaces the op benchmark's arguments (e.g. --providers compile).
source "$(dirname "$0")/gpu_stages.sh"
T_DEVICE=${T_DEVICE:-15} T_INSTALL=${T_INSTALL:-25} T_WHEELS=${T_WHEELS:-10}
T_GPU_TESTS=${T_GPU_TESTS:-85} T_OP_TESTS=${T_OP_TESTS:-145} T_OPS_BENCH=${T_OPS_BENCH:-155}
OPS_RESERVE=${OPS_RESERVE:-20}  # the longest single measurement (a compilation + do_bench) after its last start
OPS_ARGS=${OPS_ARGS:---rep-ms 50}
plan "$T_DEVICE" "$T_INSTALL" "$T_WHEELS" "$T_GPU_TESTS" "$T_OP_TESTS" "$T_OPS_BENCH"

device_info "$T_DEVICE"
install "$T_INSTALL"
install_wheels "$T_WHEELS"
# each its own process: a device-side assert in one leaves the other a working CUDA context
stage "pytest -m gpu" "$T_GPU_TESTS" "$OUT/tests.txt" "${PYTEST[@]}" -m gpu tests
stage "pytest Triton kernels, fused ops, losses" "$T_OP_TESTS" "$OUT/tests.txt" "${PYTEST[@]}" \
  tests/test_triton_kernels.py tests/test_ops.py tests/test_losses.py
# shellcheck disable=SC2086  # OPS_ARGS is a list of arguments
stage "op micro-benchmarks" "$T_OPS_BENCH" "$LOG" "$PYTHON" benchmarks/bench_ops.py --device cuda $OPS_ARGS \
  --out "$OUT" --no-plots --time-budget $((T_OPS_BENCH > OPS_RESERVE ? T_OPS_BENCH - OPS_RESERVE : 0))
finish
