// PPO/GRPO per-token loss in one elementwise pass: plain C++ parameters and the per-token math,
// shared by the CPU kernel (pg_token_loss_cpu.cpp), the CUDA kernel (cuda/pg_token_loss.cu) and the
// registration files. The semantics of alignfast.losses.pg_token's torch backend (and of the Triton
// kernel in alignfast/kernels/pg_token_loss.py). Per token t, every output 0 where valid_t is false:
//   lr = logp − old (0 when old is absent: on-policy, ρ = 1), clamped to [−C, C] when C is set
//        (∂lr/∂logp = 1 inside, 0 outside);   ρ = exp(lr)
//   u = −A·ρ,  c = −A·clip(ρ, lo, hi);   l = max(u, c),  ∂l/∂logp = 0 if c > u else −A·ρ·∂lr/∂logp
//   dual clip (A < 0, l > −c_d·A): l = −c_d·A, ∂l/∂logp = 0
//   KL term (x = ref − logp): k1 = −x (∂ 1), k2 = x²/2 (∂ −x), k3 = eˣ − 1 − x (∂ −(eˣ − 1));
//   l += β·k, ∂l/∂logp += β·∂k when β ≠ 0
//   approx_kl = ρ − 1 − lr;  flags = kClipped·[c > u] | kClipLow·[ρ < lo, A < 0] | kClipHigh·[ρ > hi, A > 0]
//                                    | kDualClipped·[dual clip applied]
// The option flags are runtime values, not template constants: they are uniform over the launch
// (no divergence), the pass is memory-bound, and 2⁵ instantiations per dtype would buy nothing.
#pragma once

#include <math.h>

#include <cstdint>

#if defined(__CUDACC__)
#define ALIGNFAST_HD __host__ __device__ __forceinline__
#else
#define ALIGNFAST_HD inline
#endif

namespace alignfast {

enum PgTokenFlag : uint8_t { kClipped = 1, kClipLow = 2, kClipHigh = 4, kDualClipped = 8 };
enum PgKlEstimator : int { kNoKl = 0, kK1 = 1, kK2 = 2, kK3 = 3 };

template <typename T>
struct PgTokenParams {
  const T* logp = nullptr;        // [rows, steps] log π
  const T* old_logp = nullptr;    // [rows, steps] log π_old, or nullptr: on-policy (ρ = 1)
  const T* ref_logp = nullptr;    // [rows, steps] log π_ref, or nullptr: no KL term
  const T* advantages = nullptr;  // [rows, steps], or [rows] when adv_per_row
  const bool* valid = nullptr;    // [rows, steps]
  T* loss = nullptr;              // [rows, steps] out: l_t
  T* dloss = nullptr;             // [rows, steps] out: ∂l_t/∂logp_t
  T* ratio = nullptr;             // [rows, steps] out: ρ_t
  T* approx_kl = nullptr;         // [rows, steps] out: ρ_t − 1 − log ρ_t
  T* kl = nullptr;                // [rows, steps] out: k_t; nullptr when ref_logp is
  uint8_t* flags = nullptr;       // [rows, steps] out: PgTokenFlag bits
  int64_t rows = 0, steps = 0;
  bool adv_per_row = false;
  T ratio_low = 0, ratio_high = 0;  // lo = 1 − ε_low, hi = 1 + ε_high
  bool dual = false;
  T dual_clip = 0;  // c_d > 1 when dual
  bool clamp = false;
  T log_ratio_clamp = 0;  // C when clamp
  int kl_estimator = kNoKl;  // PgKlEstimator, used when ref_logp is set
  T kl_coef = 0;             // β
};

ALIGNFAST_HD float pg_exp(float x) { return expf(x); }
ALIGNFAST_HD double pg_exp(double x) { return exp(x); }
ALIGNFAST_HD float pg_expm1(float x) { return expm1f(x); }
ALIGNFAST_HD double pg_expm1(double x) { return expm1(x); }

// Token i of the flattened [rows, steps] batch: reads the inputs, writes every output.
template <typename T>
ALIGNFAST_HD void pg_token_element(const PgTokenParams<T>& p, int64_t i) {
  if (!p.valid[i]) {
    p.loss[i] = p.dloss[i] = p.ratio[i] = p.approx_kl[i] = T(0);
    if (p.kl) p.kl[i] = T(0);
    p.flags[i] = 0;
    return;
  }
  const T logp = p.logp[i];
  const T adv = p.advantages[p.adv_per_row ? i / p.steps : i];
  T lr = p.old_logp ? logp - p.old_logp[i] : T(0);
  T dlr = T(1);
  if (p.clamp) {
    if (!(lr >= -p.log_ratio_clamp && lr <= p.log_ratio_clamp)) dlr = T(0);
    lr = lr < -p.log_ratio_clamp ? -p.log_ratio_clamp : (lr > p.log_ratio_clamp ? p.log_ratio_clamp : lr);
  }
  const T ratio = pg_exp(lr);
  const T clipped_ratio = ratio < p.ratio_low ? p.ratio_low : (ratio > p.ratio_high ? p.ratio_high : ratio);
  const T unclipped = -adv * ratio, clipped = -adv * clipped_ratio;
  const bool is_clipped = clipped > unclipped;
  T loss = is_clipped ? clipped : unclipped;
  T dloss = is_clipped ? T(0) : unclipped * dlr;
  uint8_t flags = (is_clipped ? kClipped : 0) | (ratio < p.ratio_low && adv < T(0) ? kClipLow : 0) |
                  (ratio > p.ratio_high && adv > T(0) ? kClipHigh : 0);
  if (p.dual && adv < T(0)) {
    const T floor = -adv * p.dual_clip;
    if (loss > floor) {
      loss = floor;
      dloss = T(0);
      flags |= kDualClipped;
    }
  }
  if (p.ref_logp) {
    const T x = p.ref_logp[i] - logp;
    T k, dk;
    if (p.kl_estimator == kK1) {
      k = logp - p.ref_logp[i];
      dk = T(1);
    } else if (p.kl_estimator == kK2) {
      const T d = logp - p.ref_logp[i];
      k = T(0.5) * d * d;
      dk = d;
    } else {
      const T e = pg_expm1(x);
      k = e - x;
      dk = -e;
    }
    if (p.kl_coef != T(0)) {
      loss += p.kl_coef * k;
      dloss += p.kl_coef * dk;
    }
    p.kl[i] = k;
  }
  p.loss[i] = loss;
  p.dloss[i] = dloss;
  p.ratio[i] = ratio;
  p.approx_kl[i] = pg_expm1(lr) - lr;
  p.flags[i] = flags;
}

template <typename T>
void pg_token_loss_cpu(const PgTokenParams<T>& p);

}  // namespace alignfast
