// GAE reverse scan (Schulman et al. 2016), plain C++ parameters shared by the CPU kernel
// (gae_cpu.cpp), the CUDA launcher (cuda/gae.cu) and the registration files. Per row b, for
// t = T−1 … 0 over the valid positions only (masked positions are skipped and give 0):
//   δ_t = r_t + γ·V_next − V_t,   A_t = δ_t + γλ·A_next,   R_t = A_t + V_t,
// with V_next, A_next those of the next valid position (0 past the last one). The semantics of
// alignfast.losses.gae's torch path.
#pragma once

#include <cstdint>

namespace alignfast {

template <typename T>
struct GaeParams {
  const T* rewards = nullptr;   // [rows, steps] contiguous
  const T* values = nullptr;    // [rows, steps] contiguous
  const bool* valid = nullptr;  // [rows, steps] contiguous
  T* advantages = nullptr;      // [rows, steps] out
  T* returns = nullptr;         // [rows, steps] out
  int64_t rows = 0, steps = 0;
  double gamma = 1.0, lam = 1.0;
};

template <typename T>
void gae_scan_cpu(const GaeParams<T>& p);

}  // namespace alignfast
