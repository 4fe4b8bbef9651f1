// SIMD helpers of the CPU kernels (row_kernels_cpu.cpp, kl_rows_cpu.cpp): packs of floats or doubles
// as GCC/Clang vector types as wide as the build targets (64 bytes: one AVX-512 register under
// -march=native on such a CPU; else 32: one AVX2 register, or two SSE registers in a portable build),
// with an explicit polynomial exp, so vectorisation does not depend on the optimiser or on
// -ffast-math (which would break NaN propagation). Plain C++: no torch headers.
#pragma once

// Wide vector types also build without AVX (several SSE registers); they never cross an ABI boundary.
#pragma GCC diagnostic ignored "-Wpsabi"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace alignfast {
namespace simd {

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
  // tanh to a few ulp: for |y| < 0.625 Cephes' tanhf minimax polynomial y + y³·P(y²) (1 − 2/(e^{2y} + 1)
  // keeps only an absolute ~1e-7 there, all relative precision of a small y: softcap·tanh(z/softcap) lost
  // z's digits under a large softcap); beyond it sign(y)·(1 − 2/(e^{2|y|} + 1)), saturating to ±1.
  static V tanh(V y) {
    const V a = y < 0.0f ? -y : y;
    const V z = y * y;
    const V p = (((-5.70498872745e-3f * z + 2.06390887954e-2f) * z - 5.37397155531e-2f) * z +
                 1.33314422036e-1f) * z - 3.33332819422e-1f;
    const V near = y + y * z * p;
    const V far = 1.0f - 2.0f / (exp(a + a) + 1.0f);
    return a < 0.625f ? near : (y < 0.0f ? -far : far);
  }
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

// x as stored in a T: a barrier the compiler cannot fuse across, so `rounded(z·s) − lse` never becomes
// one FMA with the unrounded product. The grad passes must see the tempered logit the stats pass
// stored; with the product fused, p at a one-hot row's argmax came out 1.03 at |z/T| ~ 1e5.
template <typename V>
inline V rounded(V x) {
#if defined(__GNUC__) && defined(__x86_64__) && (defined(__AVX512F__) || defined(__AVX__))
  asm("" : "+v"(x));  // one register holds the pack (64 bytes with AVX-512, 32 with AVX)
#elif defined(__GNUC__)
  asm("" : "+m"(x));  // several registers (a portable build): through memory
#endif
  return x;
}
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

// Elements of a row per tile: pass A writes the tile's tempered logits to an L1 buffer and finds
// their max, pass B sums exponentials from that buffer. Main memory sees each element once.
constexpr int64_t kTile = 1024;

// grain for at::parallel_for: at least ~32k elements of work per task
inline int64_t row_grain(int64_t vocab) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(vocab, 1));
}

}  // namespace simd
}  // namespace alignfast
