// alignfast KL row kernels: the arithmetic of `linear_kl` on one pair of [rows, V] blocks of raw
// logits, the policy's z and the reference's z_ref, between the BLAS calls that form them.
//
// Plain C++ (no torch headers), shared by the CPU kernels (kl_rows_cpu.cpp), the CUDA launchers
// (cuda/kl_rows.cu) and the registration files (kl_ops.h fills these structs).
//
// With x = z/T, y = z_ref/T the tempered logits of a row, p = softmax(x), q = softmax(y):
//   lse = log Σ e^{x},  ref_lse = log Σ e^{y},
//   forward (reverse = false): kl = Σ_v p_v (log p_v − log q_v)
//   reverse (reverse = true):  kl = Σ_v q_v (log q_v − log p_v)
// computed in one pass with online maxima m, m_r: a = Σ e^{x−m}·((x−m) − (y−m_r)) gives
// kl = a/s − log s + log s_r (s = Σ e^{x−m}, s_r = Σ e^{y−m_r}); the reverse swaps the roles.
// For the upstream gradient g of a row's kl, the gradient on the raw policy logits:
//   forward: ∂L/∂z_v = g/T · p_v·((log p_v − log q_v) − kl),   reverse: ∂L/∂z_v = g/T · (p_v − q_v),
// written over z, or over z_ref (a fused loss that forms its own gradient in z meanwhile).
#pragma once

#include <cstdint>

namespace alignfast {

template <typename T>
struct KLStatsParams {
  const T* z = nullptr;      // policy raw logits: z[r, v] at z[r·z_stride + v] (contiguous along V)
  const T* z_ref = nullptr;  // reference raw logits: at z_ref[r·ref_stride + v]
  T* kl = nullptr;           // [rows] out
  T* lse = nullptr;          // [rows] out: log Σ e^{x}
  T* ref_lse = nullptr;      // [rows] out: log Σ e^{y}
  int64_t rows = 0, vocab = 0, z_stride = 0, ref_stride = 0;
  double temperature = 1.0;
  bool reverse = false;
};

template <typename T>
struct KLGradParams {
  const T* z = nullptr;      // policy raw logits (laid out as in KLStatsParams)
  const T* z_ref = nullptr;  // reference raw logits
  T* out = nullptr;          // ∂L/∂z, at out[r·out_stride + v]: z's memory, or z_ref's (each element
  int64_t out_stride = 0;    // is read before it is written, so out may be either input)
  const T* lse = nullptr;    // [rows] from the stats pass
  const T* ref_lse = nullptr;  // [rows] from the stats pass
  const T* kl = nullptr;     // [rows] from the stats pass (read for the forward KL only)
  const T* g = nullptr;      // [rows] upstream gradient of each row's kl
  int64_t rows = 0, vocab = 0, z_stride = 0, ref_stride = 0;
  double temperature = 1.0;
  bool reverse = false;
};

// CPU kernels (kl_rows_cpu.cpp), instantiated for float and double.
template <typename T>
void kl_rows_stats_cpu(const KLStatsParams<T>& p);
template <typename T>
void kl_rows_grad_cpu(const KLGradParams<T>& p);

}  // namespace alignfast
