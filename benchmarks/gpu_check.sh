#!/usr/bin/env bash
# GPU check in one go, under 8 minutes: environment, native build, the tests on CUDA, the gpu suite.
#   benchmarks/gpu_check.sh RESULTS_DIR
# RESULTS_DIR gets at most 7 files (the device tool brings back 8 from $OUT, 2 folders down at most):
# gpu_check.log (everything printed), tests_gpu.log, tests_ops.log, tests_rest.log, the gpu suite's
# summary.md and results.csv, and gpu_check.tgz with everything else (the suite's per-case results and
# plots, the tests' junit XML). Each log is there as soon as its step ends, so a run cut short by a
# timeout still leaves what it did.
#
# Uses the python that has a CUDA torch (PYTHON, default python3) as it is: alignfast runs from this
# tree (PYTHONPATH) with alignfast._C built in place, so nothing needs an index. Packages that python
# lacks can come as wheels in .whl/ (benchmarks/gpu_wheels.sh saves them where pip works; carry the
# folder to an offline machine): they are installed into a private --target folder first.
set -uo pipefail

RESULTS=${1:?usage: benchmarks/gpu_check.sh RESULTS_DIR}
mkdir -p "$RESULTS" && RESULTS=$(cd "$RESULTS" && pwd)
cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
exec > >(tee "$RESULTS/gpu_check.log") 2>&1
TEE=$!
export PYTHONUNBUFFERED=1

pack() {   # the suite's two summaries beside the logs, everything else in one archive
    local f
    for f in summary.md results.csv; do
        [[ -f $WORK/bench/$f ]] && cp "$WORK/bench/$f" "$RESULTS/"
    done
    tar czf "$RESULTS/gpu_check.tgz" -C "$WORK" . 2>/dev/null
    exec >&- 2>&-
    wait "$TEE" 2>/dev/null   # the log's last lines
}
trap pack EXIT

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
    echo "no CUDA torch in $PY: a venv (.venv-gpu) with torch and the extras from the index (if one answers)"
    "$PY" -m venv .venv-gpu && PY=.venv-gpu/bin/python
    timeout "$(cap 240)" "$PY" -m pip install -q --retries 0 --timeout 10 torch -e ".[test,bench,gpu]" || STATUS=1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c 'import sys, torch; print(sys.executable, "torch", torch.__version__, "cuda", torch.version.cuda,
          torch.cuda.is_available())'

step "CUDA toolkit"
# torch finds CUDA_HOME as the folder above `which nvcc`; where nvcc is a wrapper script elsewhere
# (/usr/local/bin/nvcc), that folder has no headers: take the toolkit nvcc itself reports (TOP).
NVCC=$(command -v nvcc || true)
if [[ -n $NVCC ]]; then
    "$NVCC" --version | tail -n 2
    guess=${CUDA_HOME:-$(dirname "$(dirname "$NVCC")")}
    if [[ ! -f $guess/include/cuda_runtime_api.h ]]; then
        top=$("$NVCC" -v --dryrun -c -x cu /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n 1)
        for home in "$top" /usr/local/cuda; do
            if [[ -n $home && -f $home/include/cuda_runtime_api.h ]]; then
                CUDA_HOME=$(cd "$home" && pwd -P) && export CUDA_HOME && break
            fi
        done
    fi
    echo "CUDA_HOME=${CUDA_HOME:-$guess}"
elif "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "!!! no nvcc on a CUDA machine: the cuda backend cannot be built, so it goes untested"
    STATUS=1
else
    echo "no nvcc (no CUDA device either: a rehearsal)"
fi

step "packages from .whl/ (benchmarks/gpu_wheels.sh)"
SITE=${TMPDIR:-/tmp}/alignfast-site
if compgen -G ".whl/*.whl" > /dev/null; then
    for wheel in .whl/*.whl; do   # one at a time: a wheel that does not fit this python skips only itself
        timeout "$(cap 30)" "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$SITE" "$wheel" || echo "  skipped $wheel"
    done
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" PATH="$SITE/bin:$PATH"   # (ninja's binary: parallel builds)
else
    echo "none"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"   # alignfast (and benchmarks) from this tree
"$PY" - <<'EOF'
import importlib
for name in ("torch", "triton", "numpy", "transformers", "accelerate", "datasets", "trl", "peft", "liger_kernel",
             "cut_cross_entropy", "pytest", "pytest_benchmark", "xdist", "pytest_timeout", "hypothesis",
             "matplotlib", "yaml", "pyarrow", "fsspec"):
    try:
        print(f"  {name:18s} {getattr(importlib.import_module(name), '__version__', 'present')}")
    except Exception as e:  # noqa: BLE001 - a report, not a failure: the tests and cases that need it say so
        print(f"  {name:18s} MISSING ({type(e).__name__}: {str(e)[:80]})")
EOF

step "build alignfast._C in place (CPU and CUDA kernels)"
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
# this machine's GPU only (half the nvcc work of sm_80 + sm_90); 9.0 where torch cannot tell
ALIGNFAST_CUDA_ARCHS=${ALIGNFAST_CUDA_ARCHS:-$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' \
    2>/dev/null || echo 9.0)}
export ALIGNFAST_CUDA_ARCHS
echo "ALIGNFAST_CUDA_ARCHS=$ALIGNFAST_CUDA_ARCHS, ninja: $(command -v ninja || echo 'none (a serial build)')"
has_backend() { "$PY" -c "import sys, alignfast; sys.exit(0 if '$1' in alignfast.backends('$2') else 1)" 2>/dev/null; }
timeout "$(cap 240)" "$PY" setup.py -q build_ext --inplace || STATUS=1
WANT_CUDA=0
[[ -n $NVCC ]] && "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null \
    && WANT_CUDA=1
if (( WANT_CUDA )) && ! has_backend cuda cuda; then
    # setup.py turns a failed build into a warning: say it loudly, and keep the CPU kernels at least
    echo "!!! the CUDA kernels did not build (see the compiler output above): backend 'cuda' is untested"
    STATUS=1
    has_backend cpp cpu || ALIGNFAST_SKIP_CUDA=1 timeout "$(cap 120)" "$PY" setup.py -q build_ext --inplace
fi
"$PY" - <<'EOF'
import torch
import alignfast
from alignfast.ops.chunked import low_precision_products
print("backends: cpu", alignfast.backends("cpu"), "cuda", alignfast.backends("cuda"))
if torch.cuda.is_available():  # bf16 heads: grad_weight on tensor cores into fp32, or an fp32 GEMM
    print("bf16 grad_weight as addmm(out_dtype=fp32):", low_precision_products(torch.device("cuda")))
EOF
# what tests/gpu must then find (test_backends_of_this_device): a missing backend fails, not skips
export ALIGNFAST_EXPECT_BACKENDS="cpp$( (( WANT_CUDA )) && echo ,cuda)"

# The tests in three calls, the GPU's own first: tests/gpu (every backend on CUDA tensors) and the Triton
# kernels; then ops, losses and native (CPU tensors, but this machine's build); the rest (data,
# trainers, integrations: CPU, run by CI anyway) with the time left before the benchmarks' share.
# SIGINT on timeout, so pytest still prints the failures so far; -rfE names them.
PYTEST=("$PY" -m pytest -q -rfE -p no:cacheprovider)
if "$PY" -c 'import xdist' 2>/dev/null; then
    PYTEST+=(-n "${GPU_CHECK_WORKERS:-8}")
    export OMP_NUM_THREADS=2   # 8 workers on 16 cores
fi
"$PY" -c 'import pytest_timeout' 2>/dev/null && PYTEST+=(--timeout=180)
# Compile-only and emulated checks that CI runs: here the real build and launches prove them.
SKIP=(--ignore=tests/kernels/test_triton_compiles.py --ignore=tests/native/test_cuda_sources.py
      --ignore=tests/native/test_cuda_emulated.py)
run_tests() {   # name, seconds, paths...
    local name=$1 seconds=$2
    shift 2
    step "tests: $* (log: $RESULTS/tests_$name.log)"
    if (( seconds < 20 )); then
        echo "skipped: no time left before the benchmarks' share"
        return
    fi
    timeout -s INT -k 20 "$seconds" "${PYTEST[@]}" "${SKIP[@]}" --junitxml="$WORK/tests_$name.xml" "$@" \
        > "$RESULTS/tests_$name.log" 2>&1
    local rc=$?
    echo "pytest exit status $rc"
    tail -n 25 "$RESULTS/tests_$name.log"
    (( rc == 0 )) || STATUS=1
}
share() { local s=$(( $(left) - BENCH_S )); echo $(( s < $1 ? s : $1 )); }   # min($1, time before the bench)
# tests/gpu first, and before the benchmarks' share: it is what this machine is for (the rest can yield)
run_tests gpu "$(cap 150)" tests/gpu tests/kernels
[[ -f $WORK/tests_gpu.xml ]] || STATUS=1   # skipped or killed before its report: the GPU went untested
run_tests ops "$(share 150)" tests/ops tests/losses tests/native
run_tests rest "$(share 600)" tests --ignore=tests/gpu --ignore=tests/kernels --ignore=tests/ops \
    --ignore=tests/losses --ignore=tests/native

step "gpu benchmark suite (the target shape N=16384 first; results in $WORK/bench, packed at the end)"
BUDGET=$(( $(left) - 45 ))                  # stop starting cases in time to write the report
if (( BUDGET > 30 )); then
    # shellcheck disable=SC2086  # BENCH_ARGS is a list of options
    timeout "$(( $(left) > 5 ? $(left) - 5 : 1 ))" "$PY" -m benchmarks.run --suite gpu --out "$WORK/bench" \
        --budget "$BUDGET" --timeout 120 ${BENCH_ARGS:-} || STATUS=1
else
    echo "no time left for the benchmarks"; STATUS=1
fi

step "done, status $STATUS"
exit "$STATUS"
