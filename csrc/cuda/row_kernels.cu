// CUDA row kernels of the `cuda` backend: one thread block per row of a [rows, V] logits block.
//
// Only CUDA headers: this file compiles with `nvcc -c` alone (csrc/check_cuda.sh). Each row is read
// with 16-byte loads (float4 / double2) after a scalar head that reaches 16-byte alignment; every
// thread keeps online statistics of its elements, merged with warp shuffles and then across warps
// through shared memory. The math is that of ../row_kernels.h.
#include <cuda_runtime.h>

#include <cstdint>

#include "row_common.cuh"
#include "row_kernels.cuh"

namespace alignfast {
namespace {

// x = softcap·tanh(z/softcap)/T (CAP) or z/T; th = tanh(z/softcap) for the chain rule.
template <typename T, bool CAP>
struct Temper {
  T inv_cap, out_scale;
  Temper(double temperature, double softcap)
      : inv_cap(CAP ? T(1.0 / softcap) : T(1)), out_scale(CAP ? T(softcap / temperature) : T(1.0 / temperature)) {}
  __device__ __forceinline__ T operator()(T z, T& th) const {
    if constexpr (CAP) {
      th = tanh_(z * inv_cap);
      return mul_rn(th, out_scale);
    } else {
      th = T(0);
      return mul_rn(z, out_scale);
    }
  }
};

// Statistics of a set of tempered logits x relative to their max m:
//   s = Σ e^{x−m},  t = Σ e^{x−m}·(x−m),  zs = Σ x.
template <typename T>
struct Acc {
  T m, s, t, zs;
};

// a ∪ b. With m = max(ma, mb): s = sa·e^{ma−m} + sb·e^{mb−m}, t = Σ_k (t_k + (m_k−m)·s_k)·e^{m_k−m}.
template <typename T, bool ENT>
__device__ __forceinline__ Acc<T> merge(Acc<T> a, const Acc<T>& b) {
  if (b.s == T(0) && b.m == neg_inf<T>()) {
    a.zs += b.zs;
    return a;
  }
  if (a.s == T(0) && a.m == neg_inf<T>()) {
    Acc<T> r = b;
    r.zs += a.zs;
    return r;
  }
  const T m = a.m > b.m ? a.m : b.m;
  const T fa = fast_exp(a.m - m), fb = fast_exp(b.m - m);
  Acc<T> r;
  r.m = m;
  r.s = a.s * fa + b.s * fb;
  r.t = ENT ? (a.t + (a.m - m) * a.s) * fa + (b.t + (b.m - m) * b.s) * fb : T(0);
  r.zs = a.zs + b.zs;
  return r;
}

// Adds n tempered values to acc: one rescale per group (when its max is new), then n exps.
template <typename T, bool ENT, int N>
__device__ __forceinline__ void accumulate(Acc<T>& acc, const T (&x)[N]) {
  T mx = x[0];
#pragma unroll
  for (int j = 1; j < N; ++j) mx = x[j] > mx ? x[j] : mx;
  if (mx > acc.m) {
    if (acc.s > T(0)) {
      const T f = fast_exp(acc.m - mx);
      if (ENT) acc.t = (acc.t + (acc.m - mx) * acc.s) * f;
      acc.s *= f;
    }
    acc.m = mx;
  }
#pragma unroll
  for (int j = 0; j < N; ++j) {
    const T d = x[j] - acc.m;
    const T e = fast_exp(d);
    acc.s += e;
    if (ENT) acc.t += e * d;
    acc.zs += x[j];
  }
}

template <typename T, bool ENT>
__device__ __forceinline__ Acc<T> block_reduce(Acc<T> acc) {
  __shared__ Acc<T> warp_acc[kWarps];
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    Acc<T> other;
    other.m = __shfl_xor_sync(0xffffffffu, acc.m, offset);
    other.s = __shfl_xor_sync(0xffffffffu, acc.s, offset);
    other.t = __shfl_xor_sync(0xffffffffu, acc.t, offset);
    other.zs = __shfl_xor_sync(0xffffffffu, acc.zs, offset);
    acc = merge<T, ENT>(acc, other);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warp_acc[warp] = acc;
  __syncthreads();
  if (warp == 0) {
    acc = lane < kWarps ? warp_acc[lane] : Acc<T>{neg_inf<T>(), T(0), T(0), T(0)};
#pragma unroll
    for (int offset = kWarps / 2; offset > 0; offset >>= 1) {
      Acc<T> other;
      other.m = __shfl_xor_sync(0xffffffffu, acc.m, offset);
      other.s = __shfl_xor_sync(0xffffffffu, acc.s, offset);
      other.t = __shfl_xor_sync(0xffffffffu, acc.t, offset);
      other.zs = __shfl_xor_sync(0xffffffffu, acc.zs, offset);
      acc = merge<T, ENT>(acc, other);
    }
  }
  return acc;  // complete in thread 0
}

// stats: z [rows, z_stride] (read only) -> logprob, entropy?, lse, zmean? [rows].
template <typename T, bool CAP, bool ENT, bool ZM>
__global__ void __launch_bounds__(kThreads) stats_kernel(RowStatsParams<T> p, Temper<T, CAP> temper) {
  using P = Pack<T>;
  constexpr int N = P::N;
  const int64_t row = blockIdx.x;
  const T* z = p.z + row * p.z_stride;
  const RowSplit<T> split(z, p.vocab);
  Acc<T> acc{neg_inf<T>(), T(0), T(0), T(0)};
  T th;
  for (int64_t i = threadIdx.x; i < split.head; i += kThreads) {
    const T x[1] = {temper(z[i], th)};
    accumulate<T, ENT, 1>(acc, x);
  }
  const typename P::V* zv = reinterpret_cast<const typename P::V*>(z + split.head);
  for (int64_t k = threadIdx.x; k < split.packs; k += kThreads) {
    T x[N];
    P::get(zv[k], x);
#pragma unroll
    for (int j = 0; j < N; ++j) x[j] = temper(x[j], th);
    accumulate<T, ENT, N>(acc, x);
  }
  for (int64_t i = split.tail_start + threadIdx.x; i < p.vocab; i += kThreads) {
    const T x[1] = {temper(z[i], th)};
    accumulate<T, ENT, 1>(acc, x);
  }
  acc = block_reduce<T, ENT>(acc);
  if (threadIdx.x == 0) {
    const T log_s = log_(acc.s);
    const T lse = acc.m + log_s;
    p.lse[row] = lse;
    p.logprob[row] = temper(z[p.targets[row]], th) - lse;
    if (ENT) p.entropy[row] = log_s - acc.t / acc.s;
    if (ZM) p.zmean[row] = acc.zs / static_cast<T>(p.vocab);
  }
}

// grad: z [rows, z_stride] overwritten in place with
//   ∂L/∂z_v = ([c0 + ce·lp_v]·p_v + czm) · (1 − tanh²)  (+ g_lp/T·(1 − tanh²) at v = t),
//   lp_v = x_v − lse, p_v = e^{lp_v}, c0 = (g_lse − g_lp − g_ent·H)/T, ce = −g_ent/T, czm = g_zm/(T·V).
template <typename T, bool CAP, bool ENT, bool ZM>
__global__ void __launch_bounds__(kThreads) grad_kernel(RowGradParams<T> p, Temper<T, CAP> temper) {
  using P = Pack<T>;
  constexpr int N = P::N;
  const int64_t row = blockIdx.x;
  T* z = p.z + row * p.z_stride;
  const T inv_t = static_cast<T>(1.0 / p.temperature);
  const T g_lp = p.g_logprob ? p.g_logprob[row] : T(0);
  const T g_lse = p.g_lse ? p.g_lse[row] : T(0);
  const T g_ent = ENT ? p.g_entropy[row] : T(0);
  const T c0 = (g_lse - g_lp - (ENT ? g_ent * p.entropy[row] : T(0))) * inv_t;
  const T ce = -g_ent * inv_t, lse = p.lse[row];
  const T czm = ZM ? p.g_zmean[row] * inv_t / static_cast<T>(p.vocab) : T(0);
  const int64_t target = p.targets[row];

  __shared__ T z_t;  // the target's raw logit, read before any thread overwrites it
  if (threadIdx.x == 0) z_t = z[target];
  __syncthreads();

  auto grad = [&](T zv) {
    T th;
    const T lp = temper(zv, th) - lse;
    const T e = fast_exp(lp);
    T d = ENT ? e * (c0 + ce * lp) : e * c0;
    if (ZM) d += czm;
    if (CAP) d *= T(1) - th * th;
    return d;
  };
  const RowSplit<T> split(z, p.vocab);
  for (int64_t i = threadIdx.x; i < split.head; i += kThreads) z[i] = grad(z[i]);
  typename P::V* zv = reinterpret_cast<typename P::V*>(z + split.head);
  for (int64_t k = threadIdx.x; k < split.packs; k += kThreads) {
    T x[N];
    P::get(zv[k], x);
#pragma unroll
    for (int j = 0; j < N; ++j) x[j] = grad(x[j]);
    zv[k] = P::make(x);
  }
  for (int64_t i = split.tail_start + threadIdx.x; i < p.vocab; i += kThreads) z[i] = grad(z[i]);
  __syncthreads();
  if (threadIdx.x == 0) {  // the one-hot term, at the target
    T th;
    temper(z_t, th);
    z[target] += g_lp * inv_t * (CAP ? T(1) - th * th : T(1));
  }
}

}  // namespace

template <typename T>
cudaError_t logprob_rows_stats_cuda(const RowStatsParams<T>& p, cudaStream_t stream) {
  if (p.rows == 0) return cudaSuccess;
  if (p.rows > 0x7fffffffLL) return cudaErrorInvalidValue;
  const bool cap = p.softcap > 0, ent = p.entropy != nullptr, zm = p.zmean != nullptr;
  ALIGNFAST_BOOL_SWITCH(cap, CAP, [&] {
    ALIGNFAST_BOOL_SWITCH(ent, ENT, [&] {
      ALIGNFAST_BOOL_SWITCH(zm, ZM, [&] {
        stats_kernel<T, CAP, ENT, ZM><<<static_cast<unsigned>(p.rows), kThreads, 0, stream>>>(
            p, Temper<T, CAP>(p.temperature, p.softcap));
      });
    });
  });
  return cudaGetLastError();
}

template <typename T>
cudaError_t logprob_rows_grad_cuda(const RowGradParams<T>& p, cudaStream_t stream) {
  if (p.rows == 0) return cudaSuccess;
  if (p.rows > 0x7fffffffLL) return cudaErrorInvalidValue;
  const bool cap = p.softcap > 0, ent = p.g_entropy != nullptr, zm = p.g_zmean != nullptr;
  ALIGNFAST_BOOL_SWITCH(cap, CAP, [&] {
    ALIGNFAST_BOOL_SWITCH(ent, ENT, [&] {
      ALIGNFAST_BOOL_SWITCH(zm, ZM, [&] {
        grad_kernel<T, CAP, ENT, ZM><<<static_cast<unsigned>(p.rows), kThreads, 0, stream>>>(
            p, Temper<T, CAP>(p.temperature, p.softcap));
      });
    });
  });
  return cudaGetLastError();
}

template cudaError_t logprob_rows_stats_cuda<float>(const RowStatsParams<float>&, cudaStream_t);
template cudaError_t logprob_rows_stats_cuda<double>(const RowStatsParams<double>&, cudaStream_t);
template cudaError_t logprob_rows_grad_cuda<float>(const RowGradParams<float>&, cudaStream_t);
template cudaError_t logprob_rows_grad_cuda<double>(const RowGradParams<double>&, cudaStream_t);

}  // namespace alignfast
