// alignfast row kernels: the arithmetic on one [rows, V] block of raw logits between two BLAS calls.
//
// Plain C++ (no torch headers), shared by the CPU kernels (row_kernels_cpu.cpp), the CUDA
// launchers (cuda/row_kernels.cu) and the registration files that check tensors and fill these
// parameter structs. Every pointer is commented with what it points to and its shape.
//
// With x = softcap·tanh(z/softcap)/T the tempered logits of a row (softcap optional), p = softmax(x):
//   lse = log Σ_v e^{x_v},  logprob = x_t − lse,  entropy = lse − Σ_v p_v x_v,  zmean = (1/V) Σ_v x_v.
// For upstream gradients g_lp, g_ent, g_lse, g_zm of a row, the gradient on the raw logits is
//   ∂L/∂z_v = (1/T)·(1 − tanh²(z_v/softcap))·( g_lp·[v = t] + p_v·(g_lse − g_lp − g_ent·(log p_v + H)) + g_zm/V ).
#pragma once

#include <cstdint>

namespace alignfast {

template <typename T>
struct RowStatsParams {
  const T* z = nullptr;              // raw logits: z[r, v] at z[r·z_stride + v·vocab_stride] (see below)
  const int64_t* targets = nullptr;  // [rows] target ids in [0, vocab)
  T* logprob = nullptr;              // [rows] out: x_t − lse
  T* entropy = nullptr;              // [rows] out, or nullptr when not wanted
  T* lse = nullptr;                  // [rows] out
  T* zmean = nullptr;                // [rows] out, or nullptr when not wanted
  // row-major (vocab_stride 1, the rows z_stride apart), or on the CPU vocab-major (z_stride 1: the
  // [V, rows] product W·hᵀ, the rows of a vocab entry adjacent, vocab entries vocab_stride apart)
  int64_t rows = 0, vocab = 0, z_stride = 0, vocab_stride = 1;
  double temperature = 1.0;
  double softcap = 0.0;  // <= 0: no softcap
};

template <typename T>
struct RowGradParams {
  T* z = nullptr;                      // in: raw logits; out: ∂L/∂z; laid out as in RowStatsParams
  const int64_t* targets = nullptr;    // [rows]
  const T* lse = nullptr;              // [rows] logsumexp of the tempered row (from the stats pass)
  const T* entropy = nullptr;          // [rows], needed (non-null) when g_entropy is given
  const T* g_logprob = nullptr;        // [rows] upstream gradients; nullptr means 0
  const T* g_entropy = nullptr;        // [rows]
  const T* g_lse = nullptr;            // [rows]
  const T* g_zmean = nullptr;          // [rows]
  int64_t rows = 0, vocab = 0, z_stride = 0, vocab_stride = 1;
  double temperature = 1.0;
  double softcap = 0.0;  // <= 0: no softcap
};

// CPU kernels (row_kernels_cpu.cpp), instantiated for float and double.
template <typename T>
void logprob_rows_stats_cpu(const RowStatsParams<T>& p);
template <typename T>
void logprob_rows_grad_cpu(const RowGradParams<T>& p);

}  // namespace alignfast

// Compile-time feature flags from runtime booleans: the kernel is instantiated once per
// combination and never branches on them inside its loops.
#define ALIGNFAST_BOOL_SWITCH(COND, NAME, ...) \
  [&] {                                        \
    if (COND) {                                \
      constexpr bool NAME = true;              \
      return __VA_ARGS__();                    \
    } else {                                   \
      constexpr bool NAME = false;             \
      return __VA_ARGS__();                    \
    }                                          \
  }()
