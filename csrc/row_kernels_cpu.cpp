// CPU row kernels of the `cpp` backend: one pass over each row of a [rows, V] logits block.
//
// Rows run in parallel (at::parallel_for, OpenMP); inside a row the loops are written on GCC/Clang
// vector types as wide as the build targets (64 bytes: one AVX-512 register under -march=native on
// such a CPU; else 32: one AVX2 register, or two SSE registers in a portable build), with an explicit
// polynomial exp, so vectorisation does not depend on the optimiser or on -ffast-math (which would
// break NaN propagation). Feature flags are template constants (ALIGNFAST_BOOL_SWITCH).
// Only ATen's light parallel header is included: this file compiles in a few seconds.
#include <ATen/Parallel.h>

// Wide vector types also build without AVX (several SSE registers); they never cross an ABI boundary.
#pragma GCC diagnostic ignored "-Wpsabi"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "row_kernels.h"

namespace alignfast {
namespace {

// ------------------------------------------------------------------------------------------------
// SIMD packs. AVX-512 doubles the lanes of AVX2: with it (and the conversion-free exp below) the
// grad pass ran 2.2× faster than on 32-byte vectors on one Xeon (the exp polynomial is compute-bound).
// ------------------------------------------------------------------------------------------------
#if defined(__AVX512F__)
constexpr int kVecBytes = 64;
#else
constexpr int kVecBytes = 32;
#endif

// {0, 1, ..., W-1}: the lane indices of a pack (for masking a row's tail)
template <typename I, int W>
inline I iota() {
  I l;
  for (int j = 0; j < W; ++j) l[j] = j;
  return l;
}

template <typename T>
struct Simd;

template <>
struct Simd<float> {
  typedef float V __attribute__((vector_size(kVecBytes)));
  typedef int32_t I __attribute__((vector_size(kVecBytes)));
  static constexpr int W = kVecBytes / 4;
  static I lanes() { return iota<I, W>(); }

  // e^x, Cephes' expf polynomial (max rel. error ~2 ulp on [-87, 88]); 0 below -87.3 (where
  // e^x would be denormal), finite (≈2e38) above 88.3, NaN in → NaN out. n = round(x·log2 e) by
  // adding 1.5·2^23 (its low mantissa bits then hold n): no float↔int conversions on the way.
  static V exp(V x) {
    const V lo = V{} - 87.3f, hi = V{} + 88.3f;
    const float round = 12582912.0f;  // 1.5·2^23
    V c = x < lo ? lo : x;
    c = c > hi ? hi : c;
    const V shifted = c * 1.44269504088896341f + round;
    I n;
    std::memcpy(&n, &shifted, sizeof(V));
    const V fn = shifted - round;
    V r = c - fn * 0.693359375f + fn * 2.12194440e-4f;
    V y = r * 1.9875691500e-4f + 1.3981999507e-3f;
    y = y * r + 8.3334519073e-3f;
    y = y * r + 4.1665795894e-2f;
    y = y * r + 1.6666665459e-1f;
    y = y * r + 5.0000001201e-1f;
    y = y * (r * r) + r + 1.0f;
    I bits = (n + 127) << 23;  // n + 127 in the exponent field (n's bits above 23 shift out)
    V scale;
    std::memcpy(&scale, &bits, sizeof(V));
    V out = y * scale;
    return x < lo ? V{} : out;
  }
  // tanh(y) = 1 − 2/(e^{2y} + 1): saturates to ±1, absolute error ~1e-7.
  static V tanh(V y) { return 1.0f - 2.0f / (exp(y + y) + 1.0f); }
};

// float64 is the test oracle's dtype, not a fast path: per-lane libm.
template <>
struct Simd<double> {
  typedef double V __attribute__((vector_size(kVecBytes)));
  typedef int64_t I __attribute__((vector_size(kVecBytes)));
  static constexpr int W = kVecBytes / 8;
  static I lanes() { return iota<I, W>(); }
  static V exp(V x) {
    for (int j = 0; j < W; ++j) x[j] = std::exp(x[j]);
    return x;
  }
  static V tanh(V x) {
    for (int j = 0; j < W; ++j) x[j] = std::tanh(x[j]);
    return x;
  }
};

template <typename T>
using VecOf = typename Simd<T>::V;

template <typename T>
inline VecOf<T> splat(T s) {
  return VecOf<T>{} + s;
}
template <typename T>
inline VecOf<T> load(const T* p) {
  VecOf<T> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename T>
inline VecOf<T> load_partial(const T* p, int64_t n, T fill) {
  VecOf<T> v = splat<T>(fill);
  std::memcpy(&v, p, n * sizeof(T));
  return v;
}
template <typename T>
inline void store(T* p, VecOf<T> v) {
  std::memcpy(p, &v, sizeof(v));
}
template <typename T>
inline void store_partial(T* p, VecOf<T> v, int64_t n) {
  std::memcpy(p, &v, n * sizeof(T));
}
template <typename T>
inline T hsum(VecOf<T> v) {
  T r = 0;
  for (int j = 0; j < Simd<T>::W; ++j) r += v[j];
  return r;
}
template <typename T>
inline T hmax(VecOf<T> v) {
  T r = v[0];
  for (int j = 1; j < Simd<T>::W; ++j) r = v[j] > r ? v[j] : r;
  return r;
}

// x = softcap·tanh(z/softcap)/T (CAP) or z/T; `th` receives tanh(z/softcap) for the chain rule.
template <typename T, bool CAP>
struct Temper {
  using V = VecOf<T>;
  V inv_cap, out_scale;
  Temper(double temperature, double softcap)
      : inv_cap(splat<T>(CAP ? T(1.0 / softcap) : T(1))),
        out_scale(splat<T>(CAP ? T(softcap / temperature) : T(1.0 / temperature))) {}
  V operator()(V z, V& th) const {
    if constexpr (CAP) {
      th = Simd<T>::tanh(z * inv_cap);
      return th * out_scale;
    } else {
      return z * out_scale;
    }
  }
  V operator()(V z) const {
    V th;
    return (*this)(z, th);
  }
};

// Elements of a row per tile: pass A writes the tile's tempered logits to an L1 buffer and finds
// their max, pass B sums exponentials from that buffer. Main memory sees each element once.
constexpr int64_t kTile = 1024;

// grain for at::parallel_for: at least ~32k elements of work per task
inline int64_t row_grain(int64_t vocab) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(vocab, 1));
}

// ------------------------------------------------------------------------------------------------
// stats: online logsumexp over tiles.
//   m = running max, s = Σ e^{x−m}, t = Σ e^{x−m}·(x−m); on a new max m' ≥ m:
//   s ← s·e^{m−m'},  t ← (t + (m−m')·s)·e^{m−m'}.
//   lse = m + log s,  entropy = log s − t/s,  zmean = Σx / V,  logprob = x_t − lse.
// ------------------------------------------------------------------------------------------------
template <typename T, bool CAP, bool ENT, bool ZM>
void stats_rows(const RowStatsParams<T>& p, int64_t begin, int64_t end) {
  using S = Simd<T>;
  using V = VecOf<T>;
  constexpr int W = S::W;
  const Temper<T, CAP> temper(p.temperature, p.softcap);
  const T neg_inf = -std::numeric_limits<T>::infinity();
  const V v_neg_inf = splat<T>(neg_inf), v_lowest = splat<T>(std::numeric_limits<T>::lowest());
  alignas(64) T buf[kTile];

  for (int64_t row = begin; row < end; ++row) {
    const T* z = p.z + row * p.z_stride;
    T m = neg_inf, s = 0, t = 0;
    V zsum = V{};
    for (int64_t start = 0; start < p.vocab; start += kTile) {
      const int64_t len = std::min(kTile, p.vocab - start);
      const int64_t full = len / W * W;
      // pass A: buf = tempered tile, its max, and the row's Σx
      V vmax = v_neg_inf;
      for (int64_t i = 0; i < full; i += W) {
        const V x = temper(load(z + start + i));
        if constexpr (ZM) zsum += x;
        vmax = x > vmax ? x : vmax;
        store(buf + i, x);
      }
      int64_t padded = full;
      if (full < len) {  // tail: tempered(0) = 0 adds nothing to Σx; unused lanes become −inf
        V x = temper(load_partial<T>(z + start + full, len - full, T(0)));
        if constexpr (ZM) zsum += x;
        using Lane = decltype(S::lanes()[0]);
        x = S::lanes() < static_cast<Lane>(len - full) ? x : v_neg_inf;
        vmax = x > vmax ? x : vmax;
        store(buf + full, x);
        padded += W;
      }
      const T tmax = hmax<T>(vmax);
      if (tmax > m) {
        if (s > 0) {
          const T f = std::exp(m - tmax);
          t = (t + (m - tmax) * s) * f;
          s *= f;
        }
        m = tmax;
      }
      // pass B (from L1): Σ e^{x−m}, Σ e^{x−m}·(x−m); (x−m) clamped so that e = 0 never meets −inf
      const V vm = splat<T>(m);
      V vs = V{}, vt = V{};
      for (int64_t i = 0; i < padded; i += W) {
        V d = load(buf + i) - vm;
        const V e = S::exp(d);
        vs += e;
        if constexpr (ENT) {
          d = d < v_lowest ? v_lowest : d;
          vt += e * d;
        }
      }
      s += hsum<T>(vs);
      if constexpr (ENT) t += hsum<T>(vt);
    }
    const T log_s = std::log(s);
    const T lse = m + log_s;
    const T x_t = temper(splat<T>(z[p.targets[row]]))[0];
    p.lse[row] = lse;
    p.logprob[row] = x_t - lse;
    if constexpr (ENT) p.entropy[row] = log_s - t / s;
    if constexpr (ZM) p.zmean[row] = hsum<T>(zsum) / static_cast<T>(p.vocab);
  }
}

// ------------------------------------------------------------------------------------------------
// grad: with lp_v = x_v − lse, p_v = e^{lp_v}, in one read-modify-write pass per row:
//   ∂L/∂z_v = [c0 + ce·lp_v]·p_v + czm  (+ g_lp/T at v = t), times (1 − tanh²) with a softcap;
//   c0 = (g_lse − g_lp − g_ent·H)/T,  ce = −g_ent/T,  czm = g_zm/(T·V).
// ------------------------------------------------------------------------------------------------
template <typename T, bool CAP, bool ENT, bool ZM>
void grad_rows(const RowGradParams<T>& p, int64_t begin, int64_t end) {
  using S = Simd<T>;
  using V = VecOf<T>;
  constexpr int W = S::W;
  const Temper<T, CAP> temper(p.temperature, p.softcap);
  const T inv_t = static_cast<T>(1.0 / p.temperature);
  const int64_t full = p.vocab / W * W;

  for (int64_t row = begin; row < end; ++row) {
    T* z = p.z + row * p.z_stride;
    const T g_lp = p.g_logprob ? p.g_logprob[row] : T(0);
    const T g_lse = p.g_lse ? p.g_lse[row] : T(0);
    const T g_ent = ENT ? p.g_entropy[row] : T(0);
    const T c0s = (g_lse - g_lp - (ENT ? g_ent * p.entropy[row] : T(0))) * inv_t;
    const V c0 = splat<T>(c0s), ce = splat<T>(-g_ent * inv_t), lse = splat<T>(p.lse[row]);
    const V czm = splat<T>(ZM ? p.g_zmean[row] * inv_t / static_cast<T>(p.vocab) : T(0));
    const int64_t target = p.targets[row];
    const T z_t = z[target];

    auto grad = [&](V zv) {
      V th;
      const V lp = temper(zv, th) - lse;
      const V e = S::exp(lp);
      V d = ENT ? e * (c0 + ce * lp) : e * c0;
      if constexpr (ZM) d += czm;
      if constexpr (CAP) d *= T(1) - th * th;
      return d;
    };
    for (int64_t i = 0; i < full; i += W) store(z + i, grad(load(z + i)));
    if (full < p.vocab) {
      const int64_t rest = p.vocab - full;
      store_partial(z + full, grad(load_partial<T>(z + full, rest, T(0))), rest);
    }
    // the one-hot term, at the target
    V th_t;
    temper(splat<T>(z_t), th_t);
    z[target] += g_lp * inv_t * (CAP ? T(1) - th_t[0] * th_t[0] : T(1));
  }
}

}  // namespace

template <typename T>
void logprob_rows_stats_cpu(const RowStatsParams<T>& p) {
  const bool cap = p.softcap > 0, ent = p.entropy != nullptr, zm = p.zmean != nullptr;
  ALIGNFAST_BOOL_SWITCH(cap, CAP, [&] {
    ALIGNFAST_BOOL_SWITCH(ent, ENT, [&] {
      ALIGNFAST_BOOL_SWITCH(zm, ZM, [&] {
        at::parallel_for(0, p.rows, row_grain(p.vocab),
                         [&](int64_t b, int64_t e) { stats_rows<T, CAP, ENT, ZM>(p, b, e); });
      });
    });
  });
}

template <typename T>
void logprob_rows_grad_cpu(const RowGradParams<T>& p) {
  const bool cap = p.softcap > 0, ent = p.g_entropy != nullptr, zm = p.g_zmean != nullptr;
  ALIGNFAST_BOOL_SWITCH(cap, CAP, [&] {
    ALIGNFAST_BOOL_SWITCH(ent, ENT, [&] {
      ALIGNFAST_BOOL_SWITCH(zm, ZM, [&] {
        at::parallel_for(0, p.rows, row_grain(p.vocab),
                         [&](int64_t b, int64_t e) { grad_rows<T, CAP, ENT, ZM>(p, b, e); });
      });
    });
  });
}

template void logprob_rows_stats_cpu<float>(const RowStatsParams<float>&);
template void logprob_rows_stats_cpu<double>(const RowStatsParams<double>&);
template void logprob_rows_grad_cpu<float>(const RowGradParams<float>&);
template void logprob_rows_grad_cpu<double>(const RowGradParams<double>&);

}  // namespace alignfast
