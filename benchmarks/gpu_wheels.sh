#!/usr/bin/env bash
# Saves into .whl/ (git-ignored) the wheels of the Python packages that the lent GPU machines lack
# for the tests and the benchmarks' baselines: they are offline, with Python 3.12, torch, triton,
# transformers, accelerate, pytest, pytest-benchmark, pytest-xdist, hypothesis, peft, pandas and
# pyarrow preinstalled, but no TRL, datasets (and its dill, multiprocess), Liger-Kernel or
# cut-cross-entropy; xxhash (datasets imports it) and ninja (the extension's parallel build: without it
# setup.py compiles one file at a time). Run it where pip reaches an index, then carry .whl with the tree:
#   bash benchmarks/gpu_wheels.sh && <on the machine> bash benchmarks/gpu_check.sh OUT
# The versions are those of .venv (what the CPU suite ran) where it has them. ~3 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER=${PYVER:-3.12}

pinned() {   # NAME==VERSION as installed in .venv, else NAME (the newest)
    local v
    v=$(.venv/bin/python -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1" 2>/dev/null) \
        && echo "$1==$v" || echo "$1"
}

rm -rf .whl && mkdir .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    "$(pinned trl)" "$(pinned datasets)" "$(pinned dill)" "$(pinned multiprocess)" "$(pinned liger-kernel)" \
    "$(pinned cut-cross-entropy)" "$(pinned xxhash)" "$(pinned ninja)" "$@"
ls -l .whl && du -sh .whl
