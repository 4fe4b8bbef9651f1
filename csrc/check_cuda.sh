#!/usr/bin/env bash
# Compiles every csrc/cuda/*.cu with nvcc alone (no torch headers, no GPU needed) for each
# architecture, into a temporary directory, so a CUDA source that does not compile fails CI even
# on machines without a GPU. Then, when a torch is importable, syntax-checks the CUDA registration
# files (csrc/cuda/*.cpp: torch + CUDA runtime headers) with the host compiler: a CPU build of torch
# ships c10/cuda's headers except one generated at build time, stubbed here.
# Usage: csrc/check_cuda.sh [arch ...]   (default: sm_80 sm_90)
# Exits 0 with a notice when nvcc is absent; NVCC=/path/to/nvcc, CXX, PYTHON pick the tools.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
nvcc="${NVCC:-nvcc}"
if ! command -v "$nvcc" >/dev/null 2>&1; then
  echo "check_cuda: nvcc not found; skipping the CUDA compile check"
  exit 0
fi
archs=("$@")
[ ${#archs[@]} -eq 0 ] && archs=(sm_80 sm_90)
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT

shopt -s nullglob
sources=("$here"/cuda/*.cu)
if [ ${#sources[@]} -eq 0 ]; then
  echo "check_cuda: no .cu files under $here/cuda"
  exit 0
fi
status=0
for arch in "${archs[@]}"; do
  for src in "${sources[@]}"; do
    obj="$out/$(basename "$src" .cu).$arch.o"
    if "$nvcc" -c -std=c++17 -O3 -arch="$arch" -Xcompiler -Wall -I"$here" "$src" -o "$obj"; then
      echo "check_cuda: ok   $arch $(basename "$src")"
    else
      echo "check_cuda: FAIL $arch $(basename "$src")"
      status=1
    fi
  done
done

# The registration files, once (they do not depend on the architecture).
python="${PYTHON:-python3}"
cxx="${CXX:-c++}"
bindings=("$here"/cuda/*.cpp)
if [ ${#bindings[@]} -eq 0 ]; then
  :
elif ! torch_inc="$("$python" -c 'from torch.utils.cpp_extension import include_paths; print(*include_paths())' \
      2>/dev/null)"; then
  echo "check_cuda: torch is not importable by $python; skipping the registration files"
else
  # CUDA's own headers: $CUDA_HOME/include, else the directory nvcc itself passes with -I.
  cuda_inc="${CUDA_HOME:+$CUDA_HOME/include}"
  [ -n "$cuda_inc" ] || cuda_inc="$("$nvcc" -v --dryrun -c -x cu /dev/null 2>&1 \
      | sed -n 's/.*INCLUDES="-I\([^"]*\)".*/\1/p' | head -n 1)"
  mkdir -p "$out/stub/c10/cuda/impl"
  echo '#pragma once' > "$out/stub/c10/cuda/impl/cuda_cmake_macros.h"
  includes=()
  for dir in $torch_inc; do includes+=(-I"$dir"); done
  for src in "${bindings[@]}"; do
    if "$cxx" -fsyntax-only -std=c++20 -Wall -DTORCH_API_INCLUDE_EXTENSION_H "${includes[@]}" -I"$out/stub" \
        -I"$cuda_inc" -I"$here" "$src"; then
      echo "check_cuda: ok   host $(basename "$src")"
    else
      echo "check_cuda: FAIL host $(basename "$src")"
      status=1
    fi
  done
fi
exit $status
