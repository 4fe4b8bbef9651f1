// Launchers of the CUDA KL row kernels (kl_rows.cu). Raw pointers, sizes and a stream: no torch
// types, so the .cu file compiles with nvcc alone. Parameters and math: ../kl_rows.h.
#pragma once

#include <cuda_runtime_api.h>

#include "../kl_rows.h"

namespace alignfast {

// One thread block per row pair; returns the launch error (cudaSuccess when queued).
template <typename T>
cudaError_t kl_rows_stats_cuda(const KLStatsParams<T>& p, cudaStream_t stream);
template <typename T>
cudaError_t kl_rows_grad_cuda(const KLGradParams<T>& p, cudaStream_t stream);

}  // namespace alignfast
