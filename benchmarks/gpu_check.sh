#!/usr/bin/env bash
# GPU check in one go, under 8 minutes: environment, install + native build, the tests, the gpu suite.
#   benchmarks/gpu_check.sh RESULTS_DIR
# Writes RESULTS_DIR/{gpu_check.log, tests.log} and the gpu suite's report (results.csv, summary.md, ...).
# Works offline when torch (CUDA) and the test/bench dependencies are preinstalled on the machine.
set -uo pipefail

RESULTS=${1:?usage: benchmarks/gpu_check.sh RESULTS_DIR}
mkdir -p "$RESULTS" && RESULTS=$(cd "$RESULTS" && pwd)
cd "$(dirname "$0")/.." || exit 1
exec > >(tee "$RESULTS/gpu_check.log") 2>&1

TOTAL_S=${GPU_CHECK_SECONDS:-470}          # everything below, together
DEADLINE=$(( $(date +%s) + TOTAL_S ))
left() { echo $(( DEADLINE - $(date +%s) )); }
cap() { local l; l=$(left); echo $(( l < $1 ? (l > 1 ? l : 1) : $1 )); }   # min(left, $1)
step() { echo; echo "=== $* ($(left) s left)"; }

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv-gpu}
STATUS=0

step "python environment"
if "$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "system torch has CUDA: venv with --system-site-packages"
    "$PYTHON" -m venv --system-site-packages "$VENV"
    PY="$VENV/bin/python"
else
    echo "no CUDA torch in $PYTHON: fresh venv, pip install torch"
    "$PYTHON" -m venv "$VENV"
    PY="$VENV/bin/python"
    timeout "$(cap 150)" "$PY" -m pip install -q torch || STATUS=1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.is_available())'

step "install alignfast (builds alignfast._C)"
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
if ! timeout "$(cap 180)" "$PY" -m pip install -q --no-build-isolation -e ".[test,bench]"; then
    echo "install with extras failed (offline?): retrying without dependencies"
    timeout "$(cap 180)" "$PY" -m pip install -q --no-build-isolation --no-deps -e . || STATUS=1
fi

step "native extension in place"
timeout "$(cap 150)" "$PY" setup.py -q build_ext --inplace || STATUS=1
"$PY" -c 'import alignfast; print("backends:", alignfast.backends())' || STATUS=1

step "tests (log: $RESULTS/tests.log)"
timeout "$(cap 150)" "$PY" -m pytest tests -q -p no:cacheprovider > "$RESULTS/tests.log" 2>&1
echo "pytest exit status $?"; tail -n 15 "$RESULTS/tests.log"

step "gpu benchmark suite"
BUDGET=$(( $(left) - 45 ))                  # stop starting cases in time to write the report
if (( BUDGET > 30 )); then
    # shellcheck disable=SC2086  # BENCH_ARGS is a list of options
    timeout "$(( $(left) > 5 ? $(left) - 5 : 1 ))" "$PY" -m benchmarks.run --suite gpu --out "$RESULTS" \
        --budget "$BUDGET" --timeout 120 ${BENCH_ARGS:-} || STATUS=1
else
    echo "no time left for the benchmarks"; STATUS=1
fi

step "done, status $STATUS"
exit "$STATUS"
