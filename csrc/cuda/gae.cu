// CUDA GAE reverse scan: one thread per row (rollout batches have few rows and T in the
// thousands; the scan is sequential in T and reads 9 bytes per step). Only CUDA headers.
#include <cuda_runtime.h>

#include <cstdint>

#include "gae.cuh"

namespace alignfast {
namespace {

constexpr int kThreads = 128;

// rewards, values, valid: [rows, steps]; advantages, returns: [rows, steps] out (see ../gae.h).
template <typename T>
__global__ void __launch_bounds__(kThreads) gae_kernel(GaeParams<T> p) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (b >= p.rows) return;
  const T gamma = static_cast<T>(p.gamma), gl = static_cast<T>(p.gamma * p.lam);
  const int64_t off = b * p.steps;
  T next_v = 0, next_a = 0;
  for (int64_t t = p.steps - 1; t >= 0; --t) {
    const int64_t i = off + t;
    if (!p.valid[i]) {
      p.advantages[i] = T(0);
      p.returns[i] = T(0);
      continue;
    }
    const T v = p.values[i];
    const T a = p.rewards[i] + gamma * next_v - v + gl * next_a;
    p.advantages[i] = a;
    p.returns[i] = a + v;
    next_v = v;
    next_a = a;
  }
}

}  // namespace

template <typename T>
cudaError_t gae_scan_cuda(const GaeParams<T>& p, cudaStream_t stream) {
  if (p.rows == 0 || p.steps == 0) return cudaSuccess;
  const int64_t blocks = (p.rows + kThreads - 1) / kThreads;
  gae_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

template cudaError_t gae_scan_cuda<float>(const GaeParams<float>&, cudaStream_t);
template cudaError_t gae_scan_cuda<double>(const GaeParams<double>&, cudaStream_t);

}  // namespace alignfast
