// Launcher of the CUDA GAE reverse scan (gae.cu); parameters and semantics in ../gae.h.
#pragma once

#include <cuda_runtime_api.h>

#include "../gae.h"

namespace alignfast {

// One thread per row, scanning its T steps backwards; returns the launch error.
template <typename T>
cudaError_t gae_scan_cuda(const GaeParams<T>& p, cudaStream_t stream);

}  // namespace alignfast
