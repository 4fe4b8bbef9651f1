// CPU KL row kernels of the `cpp` backend of `linear_kl` (math in kl_rows.h): one pass over each row
// pair of the policy's and the reference's [rows, V] raw logits blocks for the statistics, one
// read-modify-write pass for the gradient. Rows in parallel (at::parallel_for); SIMD packs of
// simd_cpu.h inside a row. The PyTorch path this replaces makes ~10 passes over the two blocks.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "kl_rows.h"
#include "row_kernels.h"  // ALIGNFAST_BOOL_SWITCH
#include "simd_cpu.h"

namespace alignfast {
namespace {

using namespace simd;  // NOLINT: the packs and their helpers

// ------------------------------------------------------------------------------------------------
// stats, over tiles of a row: pass A writes the tile's tempered logits of both sides to L1 buffers
// and finds their maxima; on new maxima m' ≥ m, m_r' ≥ m_r the running sums are re-centred:
//   s ← s·e^{m−m'},  s_r ← s_r·e^{m_r−m_r'},
//   forward: a ← (a + ((m−m') − (m_r−m_r'))·s)·e^{m−m'}     (a = Σ e^{x−m}·((x−m) − (y−m_r)))
//   reverse: a ← (a + ((m_r−m_r') − (m−m'))·s_r)·e^{m_r−m_r'} (a = Σ e^{y−m_r}·((y−m_r) − (x−m)))
// pass B adds the tile's terms from L1. Then kl = a/s − log s + log s_r (reverse: a/s_r − log s_r + log s).
// ------------------------------------------------------------------------------------------------
template <typename T, bool REV>
void stats_rows(const KLStatsParams<T>& p, int64_t begin, int64_t end) {
  using S = Simd<T>;
  using V = VecOf<T>;
  using Lane = decltype(S::lanes()[0]);
  constexpr int W = S::W;
  const T neg_inf = -std::numeric_limits<T>::infinity();
  const V inv_t = splat<T>(T(1.0 / p.temperature)), v_neg_inf = splat<T>(neg_inf);
  const V v_lowest = splat<T>(std::numeric_limits<T>::lowest());
  alignas(64) T bx[kTile];
  alignas(64) T by[kTile];

  for (int64_t row = begin; row < end; ++row) {
    const T* z = p.z + row * p.z_stride;
    const T* zr = p.z_ref + row * p.ref_stride;
    T m = neg_inf, mr = neg_inf, s = 0, sr = 0, a = 0;
    for (int64_t start = 0; start < p.vocab; start += kTile) {
      const int64_t len = std::min(kTile, p.vocab - start);
      const int64_t full = len / W * W;
      V mx = v_neg_inf, my = v_neg_inf;  // (NaN never wins the max; it reaches the sums in pass B)
      for (int64_t i = 0; i < full; i += W) {
        const V x = load(z + start + i) * inv_t, y = load(zr + start + i) * inv_t;
        mx = x > mx ? x : mx;
        my = y > my ? y : my;
        store(bx + i, x);
        store(by + i, y);
      }
      int64_t padded = full;
      if (full < len) {  // tail: unused lanes −inf on both sides (their terms vanish in pass B)
        const auto live = S::lanes() < static_cast<Lane>(len - full);
        V x = load_partial<T>(z + start + full, len - full, T(0)) * inv_t;
        V y = load_partial<T>(zr + start + full, len - full, T(0)) * inv_t;
        x = live ? x : v_neg_inf;
        y = live ? y : v_neg_inf;
        mx = x > mx ? x : mx;
        my = y > my ? y : my;
        store(bx + full, x);
        store(by + full, y);
        padded += W;
      }
      const T tmx = hmax<T>(mx), tmy = hmax<T>(my);
      if (m == neg_inf) {  // the row's first tile
        m = tmx;
        mr = tmy;
      } else {
        const T nm = std::max(m, tmx), nmr = std::max(mr, tmy);
        const T dm = m - nm, dmr = mr - nmr, f = std::exp(dm), fr = std::exp(dmr);
        a = REV ? (a + (dmr - dm) * sr) * fr : (a + (dm - dmr) * s) * f;
        s *= f;
        sr *= fr;
        m = nm;
        mr = nmr;
      }
      const V vm = splat<T>(m), vmr = splat<T>(mr);
      V vs = V{}, vsr = V{}, va = V{};
      for (int64_t i = 0; i < padded; i += W) {
        V dx = load(bx + i) - vm, dy = load(by + i) - vmr;
        const V ex = S::exp(dx), ey = S::exp(dy);
        vs += ex;
        vsr += ey;
        dx = dx < v_lowest ? v_lowest : dx;  // padded lanes: 0·(lowest − lowest), never 0·NaN
        dy = dy < v_lowest ? v_lowest : dy;
        va += REV ? ey * (dy - dx) : ex * (dx - dy);
      }
      s += hsum<T>(vs);
      sr += hsum<T>(vsr);
      a += hsum<T>(va);
    }
    const T log_s = std::log(s), log_sr = std::log(sr);
    p.kl[row] = REV ? a / sr - log_sr + log_s : a / s - log_s + log_sr;
    p.lse[row] = m + log_s;
    p.ref_lse[row] = mr + log_sr;
  }
}

// ------------------------------------------------------------------------------------------------
// grad, in place (over z or z_ref): with lp = x − lse, lq = y − ref_lse and c = g/T,
//   forward: ∂L/∂z = c·e^{lp}·((lp − lq) − kl),   reverse: ∂L/∂z = c·(e^{lp} − e^{lq}).
// ------------------------------------------------------------------------------------------------
template <typename T, bool REV>
void grad_rows(const KLGradParams<T>& p, int64_t begin, int64_t end) {
  using S = Simd<T>;
  using V = VecOf<T>;
  constexpr int W = S::W;
  const V inv_t = splat<T>(T(1.0 / p.temperature));
  const int64_t full = p.vocab / W * W;

  for (int64_t row = begin; row < end; ++row) {
    const T* z = p.z + row * p.z_stride;
    const T* zr = p.z_ref + row * p.ref_stride;
    T* out = p.out + row * p.out_stride;
    const V lse = splat<T>(p.lse[row]), ref_lse = splat<T>(p.ref_lse[row]);
    const V c = splat<T>(p.g[row] / static_cast<T>(p.temperature));
    const V kl = splat<T>(REV ? T(0) : p.kl[row]);
    auto grad = [&](V x, V y) {
      const V lp = rounded(x * inv_t) - lse, lq = rounded(y * inv_t) - ref_lse;  // as the stats pass stored them
      if constexpr (REV) return c * (S::exp(lp) - S::exp(lq));
      return c * S::exp(lp) * ((lp - lq) - kl);
    };
    for (int64_t i = 0; i < full; i += W) store(out + i, grad(load(z + i), load(zr + i)));
    if (full < p.vocab) {
      const int64_t rest = p.vocab - full;
      store_partial(out + full, grad(load_partial<T>(z + full, rest, T(0)), load_partial<T>(zr + full, rest, T(0))),
                    rest);
    }
  }
}

}  // namespace

template <typename T>
void kl_rows_stats_cpu(const KLStatsParams<T>& p) {
  ALIGNFAST_BOOL_SWITCH(p.reverse, REV, [&] {
    at::parallel_for(0, p.rows, row_grain(p.vocab), [&](int64_t b, int64_t e) { stats_rows<T, REV>(p, b, e); });
  });
}

template <typename T>
void kl_rows_grad_cpu(const KLGradParams<T>& p) {
  ALIGNFAST_BOOL_SWITCH(p.reverse, REV, [&] {
    at::parallel_for(0, p.rows, row_grain(p.vocab), [&](int64_t b, int64_t e) { grad_rows<T, REV>(p, b, e); });
  });
}

template void kl_rows_stats_cpu<float>(const KLStatsParams<float>&);
template void kl_rows_stats_cpu<double>(const KLStatsParams<double>&);
template void kl_rows_grad_cpu<float>(const KLGradParams<float>&);
template void kl_rows_grad_cpu<double>(const KLGradParams<double>&);

}  // namespace alignfast
