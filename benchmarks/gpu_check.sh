#!/usr/bin/env bash
# One call on the GPU machine (python3 there has torch, triton, timm): install, run the tests on
# CUDA, run the micro-benchmarks and `gist-fast bench` in bf16 for ViT-T/S/B, and leave at most
# 5 files under $OUT:  gpu_check.log (everything), tests.txt (pytest summaries), bench.md,
# activation_memory.md, results.tgz (benchmarks/results/<device>/: JSON, markdown, PNGs).
# Every stage has its own time limit (a device command gets 10 minutes in all); override with
#   T_INSTALL T_TESTS T_MICRO T_BENCH  (seconds), BENCH_ARGS (extra `gist-fast bench` arguments).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gist_fast_gpu_out}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
: >"$LOG"
stage() { echo "=== $(date +%T) $*" | tee -a "$LOG"; }

stage "device"
nvidia-smi >>"$LOG" 2>&1
python3 -c "import torch, triton, timm; print('torch', torch.__version__, 'triton', triton.__version__, 'timm', timm.__version__, torch.cuda.get_device_name())" 2>&1 | tee -a "$LOG"

stage "install"
timeout "${T_INSTALL:-150}" python3 -m pip install --no-deps --no-build-isolation -e . >>"$LOG" 2>&1 || stage "install FAILED (rc $?)"

# optional baselines carried as wheels (the GPU machine has no index): liger-kernel for the loss benchmark
ls .whl/*.whl >/dev/null 2>&1 && python3 -m pip install -q --no-index --no-deps .whl/*.whl >>"$LOG" 2>&1

stage "tests: gpu-marked, then the whole suite on CUDA"
{
  timeout "${T_TESTS:-180}" python3 -m pytest -q -x -m gpu -p no:cacheprovider tests 2>&1 | tail -n 30
  echo "--- whole suite"
  timeout "${T_TESTS:-180}" python3 -m pytest -q -p no:cacheprovider tests 2>&1 | tail -n 40
} >"$OUT/tests.txt"
cat "$OUT/tests.txt" >>"$LOG"

DEV=$(python3 -c "import torch; from gist_fast.bench import device_slug; print(device_slug(torch.device('cuda')))" 2>>"$LOG" || echo cuda)
RES="benchmarks/results/$DEV"
mkdir -p "$RES"

stage "micro-benchmarks (benchmarks/bench_*.py except bench_e2e.py)"
for f in benchmarks/bench_*.py; do
  [ -e "$f" ] || continue
  case "$(basename "$f")" in bench_e2e.py|bench_gpu_ops.py) continue ;; esac
  name=$(basename "$f" .py)
  timeout "${T_MICRO:-90}" python3 -m pytest -q -p no:cacheprovider "$f" --benchmark-json="$RES/$name.json" >>"$LOG" 2>&1 \
    || echo "$f: rc $?" | tee -a "$LOG"
done

stage "fused ops on the GPU (do_bench vs eager, torch.compile, Liger-Kernel if installed)"
timeout "${T_MICRO:-90}" python3 benchmarks/bench_gpu_ops.py --out "$RES" >>"$LOG" 2>&1 || stage "bench_gpu_ops rc $?"

stage "saved activations (vit_base)"
timeout 120 python3 benchmarks/activation_memory.py vit_base_patch16_224 >"$OUT/activation_memory.md" 2>>"$LOG"
cp "$OUT/activation_memory.md" "$RES/activation_memory.md" 2>/dev/null

stage "gist-fast bench (bf16, ViT-T/S/B)"
timeout "${T_BENCH:-300}" python3 -m gist_fast.bench --device cuda --dtype bf16 \
  --models vit_tiny,vit_small,vit_base --batches 64,128,256 --steps 10 --warmup 3 \
  --memory-budget 16GiB --out "$RES" ${BENCH_ARGS:-} >>"$LOG" 2>&1 || stage "bench rc $?"
cp "$RES/bench.md" "$OUT/bench.md" 2>/dev/null

stage "collect"
tar czf "$OUT/results.tgz" "$RES" 2>>"$LOG"
ls -la "$OUT" | tee -a "$LOG"
