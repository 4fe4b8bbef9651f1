// CUDA KL row kernels of the `cuda` backend of `linear_kl`: one thread block per row of the policy's
// and the reference's [rows, V] raw logits blocks. Only CUDA headers (compiles with `nvcc -c` alone).
// Each thread keeps online statistics of both sides over its elements (16-byte loads where the two
// rows share their alignment, else scalar ones), merged with warp shuffles, then across warps
// through shared memory. The math is that of ../kl_rows.h.
#include <cuda_runtime.h>

#include <cstdint>

#include "../row_kernels.h"  // ALIGNFAST_BOOL_SWITCH
#include "kl_rows.cuh"
#include "row_common.cuh"

namespace alignfast {
namespace {

// Statistics of a set of tempered logit pairs (x, y) relative to their maxima m, m_r:
//   s = Σ e^{x−m},  s_r = Σ e^{y−m_r},
//   a = Σ e^{x−m}·((x−m) − (y−m_r))   (forward),   Σ e^{y−m_r}·((y−m_r) − (x−m))   (reverse).
template <typename T>
struct KLAcc {
  T m, mr, s, sr, a;
};

template <typename T>
__device__ __forceinline__ KLAcc<T> empty_acc() {
  return KLAcc<T>{neg_inf<T>(), neg_inf<T>(), T(0), T(0), T(0)};
}

// Re-centres acc on maxima (nm, nmr) ≥ its own: s·e^{m−nm}, s_r·e^{m_r−nmr}, and a (see kl_rows.h).
template <typename T, bool REV>
__device__ __forceinline__ KLAcc<T> recentred(const KLAcc<T>& acc, T nm, T nmr) {
  if (acc.s == T(0)) return KLAcc<T>{nm, nmr, T(0), T(0), T(0)};  // empty: nothing to rescale
  const T dm = acc.m - nm, dmr = acc.mr - nmr, f = fast_exp(dm), fr = fast_exp(dmr);
  const T a = REV ? (acc.a + (dmr - dm) * acc.sr) * fr : (acc.a + (dm - dmr) * acc.s) * f;
  return KLAcc<T>{nm, nmr, acc.s * f, acc.sr * fr, a};
}

template <typename T, bool REV>
__device__ __forceinline__ KLAcc<T> merge(const KLAcc<T>& a, const KLAcc<T>& b) {
  if (b.s == T(0)) return a;
  if (a.s == T(0)) return b;
  const T nm = a.m > b.m ? a.m : b.m, nmr = a.mr > b.mr ? a.mr : b.mr;
  const KLAcc<T> ra = recentred<T, REV>(a, nm, nmr), rb = recentred<T, REV>(b, nm, nmr);
  return KLAcc<T>{nm, nmr, ra.s + rb.s, ra.sr + rb.sr, ra.a + rb.a};
}

// Adds n tempered pairs: one re-centring per group (when a maximum is new), then n pairs of exps.
template <typename T, bool REV, int N>
__device__ __forceinline__ void accumulate(KLAcc<T>& acc, const T (&x)[N], const T (&y)[N]) {
  T mx = x[0], my = y[0];
#pragma unroll
  for (int j = 1; j < N; ++j) {
    mx = x[j] > mx ? x[j] : mx;
    my = y[j] > my ? y[j] : my;
  }
  if (mx > acc.m || my > acc.mr) {
    acc = recentred<T, REV>(acc, mx > acc.m ? mx : acc.m, my > acc.mr ? my : acc.mr);
  }
#pragma unroll
  for (int j = 0; j < N; ++j) {
    const T dx = x[j] - acc.m, dy = y[j] - acc.mr;
    const T ex = fast_exp(dx), ey = fast_exp(dy);
    acc.s += ex;
    acc.sr += ey;
    acc.a += REV ? ey * (dy - dx) : ex * (dx - dy);
  }
}

template <typename T>
__device__ __forceinline__ KLAcc<T> shuffled(const KLAcc<T>& acc, int offset) {
  KLAcc<T> o;
  o.m = __shfl_xor_sync(0xffffffffu, acc.m, offset);
  o.mr = __shfl_xor_sync(0xffffffffu, acc.mr, offset);
  o.s = __shfl_xor_sync(0xffffffffu, acc.s, offset);
  o.sr = __shfl_xor_sync(0xffffffffu, acc.sr, offset);
  o.a = __shfl_xor_sync(0xffffffffu, acc.a, offset);
  return o;
}

template <typename T, bool REV>
__device__ __forceinline__ KLAcc<T> block_reduce(KLAcc<T> acc) {
  __shared__ KLAcc<T> warp_acc[kWarps];
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) acc = merge<T, REV>(acc, shuffled(acc, offset));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warp_acc[warp] = acc;
  __syncthreads();
  if (warp == 0) {
    acc = lane < kWarps ? warp_acc[lane] : empty_acc<T>();
#pragma unroll
    for (int offset = kWarps / 2; offset > 0; offset >>= 1) acc = merge<T, REV>(acc, shuffled(acc, offset));
  }
  return acc;  // complete in thread 0
}

// Whether the rows z and z_ref can both be read in 16-byte packs after the same scalar head.
template <typename T>
__device__ __forceinline__ bool same_alignment(const T* z, const T* z_ref) {
  return (reinterpret_cast<uintptr_t>(z) - reinterpret_cast<uintptr_t>(z_ref)) % 16 == 0;
}

// stats: z, z_ref [rows, *_stride] (read only) -> kl, lse, ref_lse [rows].
template <typename T, bool REV>
__global__ void __launch_bounds__(kThreads) kl_stats_kernel(KLStatsParams<T> p) {
  using P = Pack<T>;
  constexpr int N = P::N;
  const int64_t row = blockIdx.x;
  const T* z = p.z + row * p.z_stride;
  const T* zr = p.z_ref + row * p.ref_stride;
  const T inv_t = static_cast<T>(1.0 / p.temperature);
  KLAcc<T> acc = empty_acc<T>();
  const RowSplit<T> split(z, p.vocab);
  const bool packed = same_alignment(z, zr);
  const int64_t scalar_end = packed ? split.head : p.vocab;
  for (int64_t i = threadIdx.x; i < scalar_end; i += kThreads) {
    const T x[1] = {mul_rn(z[i], inv_t)}, y[1] = {mul_rn(zr[i], inv_t)};
    accumulate<T, REV, 1>(acc, x, y);
  }
  if (packed) {
    const typename P::V* zv = reinterpret_cast<const typename P::V*>(z + split.head);
    const typename P::V* rv = reinterpret_cast<const typename P::V*>(zr + split.head);
    for (int64_t k = threadIdx.x; k < split.packs; k += kThreads) {
      T x[N], y[N];
      P::get(zv[k], x);
      P::get(rv[k], y);
#pragma unroll
      for (int j = 0; j < N; ++j) {
        x[j] = mul_rn(x[j], inv_t);
        y[j] = mul_rn(y[j], inv_t);
      }
      accumulate<T, REV, N>(acc, x, y);
    }
    for (int64_t i = split.tail_start + threadIdx.x; i < p.vocab; i += kThreads) {
      const T x[1] = {mul_rn(z[i], inv_t)}, y[1] = {mul_rn(zr[i], inv_t)};
      accumulate<T, REV, 1>(acc, x, y);
    }
  }
  acc = block_reduce<T, REV>(acc);
  if (threadIdx.x == 0) {
    const T log_s = log_(acc.s), log_sr = log_(acc.sr);
    p.kl[row] = REV ? acc.a / acc.sr - log_sr + log_s : acc.a / acc.s - log_s + log_sr;
    p.lse[row] = acc.m + log_s;
    p.ref_lse[row] = acc.mr + log_sr;
  }
}

// grad: out (z's or z_ref's memory) overwritten with c·e^{lp}·((lp − lq) − kl) (forward) or
// c·(e^{lp} − e^{lq}) (reverse), lp = x − lse, lq = y − ref_lse, c = g/T.
template <typename T, bool REV>
__global__ void __launch_bounds__(kThreads) kl_grad_kernel(KLGradParams<T> p) {
  using P = Pack<T>;
  constexpr int N = P::N;
  const int64_t row = blockIdx.x;
  const T* z = p.z + row * p.z_stride;
  const T* zr = p.z_ref + row * p.ref_stride;
  T* out = p.out + row * p.out_stride;
  const T inv_t = static_cast<T>(1.0 / p.temperature);
  const T lse = p.lse[row], ref_lse = p.ref_lse[row], c = p.g[row] * inv_t, kl = REV ? T(0) : p.kl[row];
  auto grad = [&](T zv, T yv) {
    const T lp = mul_rn(zv, inv_t) - lse, lq = mul_rn(yv, inv_t) - ref_lse;
    return REV ? c * (fast_exp(lp) - fast_exp(lq)) : c * fast_exp(lp) * ((lp - lq) - kl);
  };
  const RowSplit<T> split(z, p.vocab);
  const bool packed = same_alignment<T>(z, zr) && same_alignment<T>(z, out);
  const int64_t scalar_end = packed ? split.head : p.vocab;
  for (int64_t i = threadIdx.x; i < scalar_end; i += kThreads) out[i] = grad(z[i], zr[i]);
  if (packed) {
    const typename P::V* zv = reinterpret_cast<const typename P::V*>(z + split.head);
    const typename P::V* rv = reinterpret_cast<const typename P::V*>(zr + split.head);
    typename P::V* ov = reinterpret_cast<typename P::V*>(out + split.head);
    for (int64_t k = threadIdx.x; k < split.packs; k += kThreads) {
      T x[N], y[N];
      P::get(zv[k], x);
      P::get(rv[k], y);
#pragma unroll
      for (int j = 0; j < N; ++j) x[j] = grad(x[j], y[j]);
      ov[k] = P::make(x);
    }
    for (int64_t i = split.tail_start + threadIdx.x; i < p.vocab; i += kThreads) out[i] = grad(z[i], zr[i]);
  }
}

}  // namespace

template <typename T>
cudaError_t kl_rows_stats_cuda(const KLStatsParams<T>& p, cudaStream_t stream) {
  if (p.rows == 0) return cudaSuccess;
  if (p.rows > 0x7fffffffLL) return cudaErrorInvalidValue;
  ALIGNFAST_BOOL_SWITCH(p.reverse, REV, [&] {
    kl_stats_kernel<T, REV><<<static_cast<unsigned>(p.rows), kThreads, 0, stream>>>(p);
  });
  return cudaGetLastError();
}

template <typename T>
cudaError_t kl_rows_grad_cuda(const KLGradParams<T>& p, cudaStream_t stream) {
  if (p.rows == 0) return cudaSuccess;
  if (p.rows > 0x7fffffffLL) return cudaErrorInvalidValue;
  ALIGNFAST_BOOL_SWITCH(p.reverse, REV, [&] {
    kl_grad_kernel<T, REV><<<static_cast<unsigned>(p.rows), kThreads, 0, stream>>>(p);
  });
  return cudaGetLastError();
}

template cudaError_t kl_rows_stats_cuda<float>(const KLStatsParams<float>&, cudaStream_t);
template cudaError_t kl_rows_stats_cuda<double>(const KLStatsParams<double>&, cudaStream_t);
template cudaError_t kl_rows_grad_cuda<float>(const KLGradParams<float>&, cudaStream_t);
template cudaError_t kl_rows_grad_cuda<double>(const KLGradParams<double>&, cudaStream_t);

}  // namespace alignfast
