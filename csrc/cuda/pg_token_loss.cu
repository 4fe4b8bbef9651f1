// CUDA PPO/GRPO token pass: one thread per token, each running the per-token math shared with the
// CPU kernel (pg_token_element in ../pg_token_loss.h), so the two native backends cannot drift apart.
// Only CUDA headers.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "pg_token_loss.cuh"

namespace alignfast {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = int64_t(1) << 20;  // grid-stride beyond 2^28 tokens

// logp, old_logp, ref_logp, advantages ([rows, steps] or [rows]), valid: inputs; loss, dloss,
// ratio, approx_kl, kl, flags: [rows, steps] outputs (see ../pg_token_loss.h).
template <typename T>
__global__ void __launch_bounds__(kThreads) pg_token_kernel(PgTokenParams<T> p) {
  const int64_t n = p.rows * p.steps;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < n; i += stride) {
    pg_token_element(p, i);
  }
}

}  // namespace

template <typename T>
cudaError_t pg_token_loss_cuda(const PgTokenParams<T>& p, cudaStream_t stream) {
  const int64_t n = p.rows * p.steps;
  if (n == 0) return cudaSuccess;
  const int64_t blocks = std::min((n + kThreads - 1) / kThreads, kMaxBlocks);
  pg_token_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

template cudaError_t pg_token_loss_cuda<float>(const PgTokenParams<float>&, cudaStream_t);
template cudaError_t pg_token_loss_cuda<double>(const PgTokenParams<double>&, cudaStream_t);

}  // namespace alignfast
