#!/usr/bin/env bash
# (A) on the GPU machine: the CUDA tests, then the op micro-benchmarks (benchmarks/README.md).
#   bash benchmarks/gpu_tests.sh GIT_SHA
# Back in $OUT: log.txt, device.txt, tests.txt (pytest summaries), bench_gpu_ops.json, bench_gpu_ops.md.
# Stage budgets (s) can be overridden: T_DEVICE T_INSTALL T_WHEELS T_GPU_TESTS T_OP_TESTS T_OPS_BENCH.
source "$(dirname "$0")/gpu_stages.sh"
T_DEVICE=${T_DEVICE:-15} T_INSTALL=${T_INSTALL:-25} T_WHEELS=${T_WHEELS:-10}
T_GPU_TESTS=${T_GPU_TESTS:-85} T_OP_TESTS=${T_OP_TESTS:-145} T_OPS_BENCH=${T_OPS_BENCH:-155}
OPS_RESERVE=${OPS_RESERVE:-20}  # the longest single measurement (a compilation + do_bench) after its last start
plan "$T_DEVICE" "$T_INSTALL" "$T_WHEELS" "$T_GPU_TESTS" "$T_OP_TESTS" "$T_OPS_BENCH"

device_info "$T_DEVICE"
install "$T_INSTALL"
install_wheels "$T_WHEELS"
# each its own process: a device-side assert in one leaves the other a working CUDA context
stage "pytest -m gpu" "$T_GPU_TESTS" "$OUT/tests.txt" "${PYTEST[@]}" -m gpu tests
stage "pytest Triton kernels, fused ops, losses" "$T_OP_TESTS" "$OUT/tests.txt" "${PYTEST[@]}" \
  tests/test_triton_kernels.py tests/test_ops.py tests/test_losses.py
stage "op micro-benchmarks" "$T_OPS_BENCH" "$LOG" "$PYTHON" benchmarks/bench_gpu_ops.py --out "$OUT" \
  --time-budget $((T_OPS_BENCH > OPS_RESERVE ? T_OPS_BENCH - OPS_RESERVE : 0))
finish
