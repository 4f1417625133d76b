# Sourced by gpu_tests.sh and gpu_bench.sh (benchmarks/README.md): stages with their own time
# budgets, each writing straight into $OUT, so a command always ends inside the device's 10 minutes
# and whatever finished comes back.
#   $1 or GIT_SHA: the commit measured (.git may not travel to the GPU machine)
#   OUT: results folder (the device tool sets it); PYTHON: interpreter (python3)
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export OUT=${OUT:-/tmp/gist_fast_gpu_out} PYTHONUNBUFFERED=1
export GIT_SHA=${1:-${GIT_SHA:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}}
PYTHON=${PYTHON:-python3}
GRACE=5     # seconds from a stage's TERM to its KILL
LIMIT=470   # worst case of all stages: 8 minutes less 10 s for this script's own steps
LOG=$OUT/log.txt
FAILED=()
mkdir -p "$OUT"

# pytest that turns TERM into KeyboardInterrupt, so a stage stopped at its budget still prints
# the summary of the tests that ran
PYTEST=("$PYTHON" -c 'import signal, sys, pytest
signal.signal(signal.SIGTERM, signal.default_int_handler)
sys.exit(pytest.main())' -q -p no:cacheprovider --tb=short -rfEs --durations=10)

note() {  # note TEXT [FILE]: a timestamped line in the log (and FILE) and on stdout
  local files=("$LOG")
  [ "${2:-$LOG}" != "$LOG" ] && files+=("$2")
  echo "=== $(date +%T) $1" | tee -a "${files[@]}"
}

plan() {  # plan BUDGET...: refuse to start when the stages could outlast LIMIT
  local total=0 b
  for b in "$@"; do total=$((total + b + GRACE)); done
  note "git $GIT_SHA; stage budgets $* s, ${GRACE} s grace each: worst case ${total} s of ${LIMIT} s"
  ((total <= LIMIT)) || { note "over ${LIMIT} s: lower the T_* budgets"; exit 2; }
}

stage() {  # stage NAME BUDGET FILE COMMAND...: COMMAND for at most BUDGET s, output appended to FILE
  local name=$1 budget=$2 file=$3 start=$SECONDS rc
  shift 3
  note "$name: start (budget ${budget} s)" "$file"
  timeout -k "$GRACE" "$budget" "$@" 2>&1 | tee -a "$file"
  rc=${PIPESTATUS[0]}
  ((rc == 124 || rc == 137)) && name="$name stopped at its budget"
  note "$name: rc $rc after $((SECONDS - start)) s" "$file"
  ((rc == 0)) || FAILED+=("$name (rc $rc)")
  return "$rc"
}

device_info() {  # device_info BUDGET: the GPU, versions and SHA in $OUT/device.txt
  stage device "$1" "$OUT/device.txt" bash -c 'nvidia-smi; "$@"' device "$PYTHON" -c 'import json, torch
from gist_fast.bench_harness import device_slug, environment
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
print(json.dumps(environment(device), indent=1))
print("add results.csv to benchmarks/results/" + device_slug(device) + " (benchmarks/README.md)")'
}

install() {  # install BUDGET: gist_fast without the C++ extension (the GPU runs the Triton kernels)
  stage install "$1" "$LOG" env GIST_FAST_NO_EXT=1 "$PYTHON" -m pip install -q --no-deps --no-build-isolation -e .
}

install_wheels() {  # install_wheels BUDGET: packages carried in .whl/ (the GPU machine has no index)
  if ! ls .whl/*.whl >/dev/null 2>&1; then
    note "no .whl/ wheels: the Liger-Kernel baseline is left out"
    return 0
  fi
  stage wheels "$1" "$LOG" "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
}

finish() {  # what came back, and a non-zero exit status when a stage failed
  ls -l "$OUT" | tee -a "$LOG"
  if ((${#FAILED[@]})); then
    note "stages that failed: ${FAILED[*]}"
    exit 1
  fi
  note "all stages passed"
}
