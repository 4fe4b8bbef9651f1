#!/usr/bin/env bash
# Compiles every csrc/cuda/*.cu with nvcc alone (no torch headers, no GPU needed) for each
# architecture, into a temporary directory, so a CUDA source that does not compile fails CI even
# on machines without a GPU. Usage: csrc/check_cuda.sh [arch ...]   (default: sm_80 sm_90)
# Exits 0 with a notice when nvcc is absent; NVCC=/path/to/nvcc picks a compiler.
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
exit $status
