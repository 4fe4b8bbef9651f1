// Device helpers shared by the CUDA row kernels (row_kernels.cu, kl_rows.cu): 16-byte packs, the
// math functions per dtype, and the split of a row into a scalar head, 16-byte packs and a scalar
// tail. Only CUDA headers.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace alignfast {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

template <typename T>
struct Pack;
template <>
struct Pack<float> {
  using V = float4;
  static constexpr int N = 4;
  __device__ static void get(const V& v, float* x) { x[0] = v.x; x[1] = v.y; x[2] = v.z; x[3] = v.w; }
  __device__ static V make(const float* x) { return make_float4(x[0], x[1], x[2], x[3]); }
};
template <>
struct Pack<double> {
  using V = double2;
  static constexpr int N = 2;
  __device__ static void get(const V& v, double* x) { x[0] = v.x; x[1] = v.y; }
  __device__ static V make(const double* x) { return make_double2(x[0], x[1]); }
};

__device__ __forceinline__ float fast_exp(float x) { return __expf(x); }
__device__ __forceinline__ double fast_exp(double x) { return exp(x); }
__device__ __forceinline__ float log_(float x) { return logf(x); }
__device__ __forceinline__ double log_(double x) { return log(x); }
__device__ __forceinline__ float tanh_(float x) { return tanhf(x); }
__device__ __forceinline__ double tanh_(double x) { return tanh(x); }
// Rounded products (never fused into an FMA with what follows): every pass, stats and grad, sees the same
// tempered logit x = z·(1/T); a half-ulp mismatch at |x| ~ 1e5 put p at a one-hot row's argmax at 1.03.
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
template <typename T>
__device__ __forceinline__ T neg_inf() { return -static_cast<T>(INFINITY); }

// Splits a row at z into a scalar head (up to 16-byte alignment), 16-byte packs, a scalar tail.
template <typename T>
struct RowSplit {
  int64_t head, packs, tail_start;
  __device__ RowSplit(const T* z, int64_t vocab) {
    constexpr int N = Pack<T>::N;
    const int64_t mis = (reinterpret_cast<uintptr_t>(z) / sizeof(T)) % N;
    head = mis ? (N - mis < vocab ? N - mis : vocab) : 0;
    packs = (vocab - head) / N;
    tail_start = head + packs * N;
  }
};

}  // namespace
}  // namespace alignfast
