// Launcher of the CUDA PPO/GRPO token pass (pg_token_loss.cu); parameters and math in ../pg_token_loss.h.
#pragma once

#include <cuda_runtime_api.h>

#include "../pg_token_loss.h"

namespace alignfast {

// One thread per token (grid-stride); returns the launch error.
template <typename T>
cudaError_t pg_token_loss_cuda(const PgTokenParams<T>& p, cudaStream_t stream);

}  // namespace alignfast
