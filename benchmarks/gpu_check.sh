#!/usr/bin/env bash
# GPU check in one go, under 8 minutes: environment, native build, the tests on CUDA, the gpu suite.
#   benchmarks/gpu_check.sh RESULTS_DIR
# Writes RESULTS_DIR/{gpu_check.log, tests_gpu.log, tests_rest.log} and the gpu suite's report
# (results.csv, summary.md, ...).
#
# Uses the python that has a CUDA torch (PYTHON, default python3) as it is: alignfast runs from this
# tree (PYTHONPATH) with alignfast._C built in place, so nothing needs an index. Packages that python
# lacks can come as wheels in .whl/ (benchmarks/gpu_wheels.sh saves them where pip works; carry the
# folder to an offline machine): they are installed into a private --target folder first. Without a
# CUDA torch (an online machine) a venv with torch from the index is made instead.
set -uo pipefail

RESULTS=${1:?usage: benchmarks/gpu_check.sh RESULTS_DIR}
mkdir -p "$RESULTS" && RESULTS=$(cd "$RESULTS" && pwd)
cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD
exec > >(tee "$RESULTS/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1

TOTAL_S=${GPU_CHECK_SECONDS:-470}          # everything below, together
BENCH_S=${GPU_CHECK_BENCH_SECONDS:-200}    # kept for the benchmarks out of the total
DEADLINE=$(( $(date +%s) + TOTAL_S ))
left() { echo $(( DEADLINE - $(date +%s) )); }
cap() { local l; l=$(left); echo $(( l < $1 ? (l > 1 ? l : 1) : $1 )); }   # min(left, $1)
step() { echo; echo "=== $* ($(left) s left)"; }

PY=${PYTHON:-python3}
STATUS=0

step "python"
# GPU_CHECK_ANY_TORCH=1 takes a CPU torch as it is: a rehearsal of this script on a machine without a GPU.
if [[ ${GPU_CHECK_ANY_TORCH:-0} != 1 ]] &&
        ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "no CUDA torch in $PY: a venv (.venv-gpu) with torch and the extras from the index"
    "$PY" -m venv .venv-gpu && PY=.venv-gpu/bin/python
    timeout "$(cap 240)" "$PY" -m pip install -q torch -e ".[test,bench,gpu]" || STATUS=1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c 'import sys, torch; print(sys.executable, "torch", torch.__version__, "cuda", torch.version.cuda,
          torch.cuda.is_available())'

step "packages from .whl/ (benchmarks/gpu_wheels.sh)"
SITE=${TMPDIR:-/tmp}/alignfast-site
if compgen -G ".whl/*.whl" > /dev/null; then
    timeout "$(cap 60)" "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" .whl/*.whl || STATUS=1
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
else
    echo "none"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"   # alignfast (and benchmarks) from this tree
"$PY" - <<'EOF'
import importlib
for name in ("torch", "triton", "numpy", "transformers", "accelerate", "datasets", "trl", "peft", "liger_kernel",
             "cut_cross_entropy", "pytest", "pytest_benchmark", "xdist", "hypothesis", "matplotlib", "yaml"):
    try:
        print(f"  {name:18s} {getattr(importlib.import_module(name), '__version__', 'present')}")
    except Exception as e:  # noqa: BLE001 - a report, not a failure: the tests and cases that need it say so
        print(f"  {name:18s} MISSING ({type(e).__name__}: {str(e)[:80]})")
EOF

step "build alignfast._C in place (CPU and CUDA kernels)"
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
timeout "$(cap 240)" "$PY" setup.py -q build_ext --inplace || STATUS=1
"$PY" -c 'import alignfast; print("backends:", alignfast.backends())' || STATUS=1

# The tests that exercise the GPU first (tests/gpu: every backend on CUDA tensors; the Triton kernels;
# then the ops and losses, on CPU tensors but on the same machine's build), in
# parallel where pytest-xdist is there; the rest (data, trainers, integrations: mostly CPU, run by CI
# anyway) only with the time left before the benchmarks' share.
XDIST=()
"$PY" -c 'import xdist' 2>/dev/null && XDIST=(-n "${GPU_CHECK_WORKERS:-8}")
GPU_TESTS=(tests/gpu tests/kernels tests/ops tests/losses tests/native)
step "tests on CUDA: ${GPU_TESTS[*]} (log: $RESULTS/tests_gpu.log)"
GPU_TESTS_S=$(( $(left) - BENCH_S > 60 ? $(left) - BENCH_S : 60 ))
timeout "$(cap "$GPU_TESTS_S")" "$PY" -m pytest "${GPU_TESTS[@]}" -q -p no:cacheprovider "${XDIST[@]}" \
    > "$RESULTS/tests_gpu.log" 2>&1
echo "pytest exit status $?"; tail -n 25 "$RESULTS/tests_gpu.log"

REST_S=$(( $(left) - BENCH_S ))
step "the other tests (log: $RESULTS/tests_rest.log)"
if (( REST_S > 30 )); then
    timeout "$REST_S" "$PY" -m pytest tests -q -p no:cacheprovider "${XDIST[@]}" \
        $(printf -- '--ignore=%s ' "${GPU_TESTS[@]}") > "$RESULTS/tests_rest.log" 2>&1
    echo "pytest exit status $?"; tail -n 15 "$RESULTS/tests_rest.log"
else
    echo "skipped: the time left is the benchmarks'"
fi

step "gpu benchmark suite (the target shape N=16384 first)"
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
