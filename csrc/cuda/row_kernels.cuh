// Launchers of the CUDA row kernels (row_kernels.cu). Raw pointers, sizes and a stream: no torch
// types, so the .cu file compiles with nvcc alone (see csrc/check_cuda.sh). The parameter structs
// and the math are those of ../row_kernels.h; cuda/bindings.cpp checks tensors and calls these.
#pragma once

#include <cuda_runtime_api.h>

#include "../row_kernels.h"

namespace alignfast {

// One thread block per row; returns the launch error (cudaSuccess when queued).
template <typename T>
cudaError_t logprob_rows_stats_cuda(const RowStatsParams<T>& p, cudaStream_t stream);
template <typename T>
cudaError_t logprob_rows_grad_cuda(const RowGradParams<T>& p, cudaStream_t stream);

}  // namespace alignfast
