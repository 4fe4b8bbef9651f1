// CPU row kernels of the `cpp` backend: one pass over each row of a [rows, V] logits block.
//
// Rows run in parallel (at::parallel_for, OpenMP); inside a row the loops are written on the SIMD
// packs of simd_cpu.h (vector types as wide as the build targets, a polynomial exp). Feature flags
// are template constants (ALIGNFAST_BOOL_SWITCH).
// Only ATen's light parallel header is included: this file compiles in a few seconds.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "row_kernels.h"
#include "simd_cpu.h"

namespace alignfast {
namespace {

using namespace simd;  // NOLINT: the packs and their helpers

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
      return rounded(th * out_scale);
    } else {
      return rounded(z * out_scale);  // every pass sees the same x: see simd::rounded
    }
  }
  V operator()(V z) const {
    V th;
    return (*this)(z, th);
  }
};

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

// ------------------------------------------------------------------------------------------------
// Vocab-major blocks: z[r, v] at z[v·ld + r], the [V, rows] product W·hᵀ, which MKL forms faster than
// h·Wᵀ. Threads take ranges of vocab entries (contiguous memory: each streams its own part of the
// block); a pack's lanes are W adjacent rows, so there are no horizontal reductions. The per-row
// state lives in small arrays, one pack per W rows.
// ------------------------------------------------------------------------------------------------

// A vocab-major block's rows in packs: `packs` full ones, then `tail` rows (0 if none).
template <typename T>
struct RowPacks {
  using V = VecOf<T>;
  static constexpr int W = Simd<T>::W;
  int64_t packs, tail;
  explicit RowPacks(int64_t n) : packs(n / W), tail(n % W) {}
  int64_t count() const { return packs + (tail > 0); }
  V load_pack(const T* row_v, int64_t k) const {
    return k < packs ? load(row_v + k * W) : load_partial<T>(row_v + k * W, tail, T(0));
  }
  void store_pack(T* row_v, int64_t k, V x) const {
    if (k < packs) store(row_v + k * W, x);
    else store_partial(row_v + k * W, x, tail);
  }
  // pack k of a per-row input (0 where absent)
  V of(const T* x, int64_t k) const { return x ? load_pack(x, k) : V{}; }
};

// Per-row partial statistics of one vocab range, relative to its own max m (as in stats_rows).
template <typename T>
struct PartialStats {
  std::vector<VecOf<T>> m, s, t, zsum;
  explicit PartialStats(int64_t packs)
      : m(packs, splat<T>(-std::numeric_limits<T>::infinity())), s(packs), t(packs), zsum(packs) {}
};

// Tiles of vocab entries: pass A writes a tile's tempered logits (≤ 128 KiB, L2) and each row's max,
// pass B sums their exponentials; main memory sees each element once. At most 256 entries, so
// that a row's sum runs in short sequences (as stats_rows' tiles), whatever the number of rows.
inline int64_t col_tile(int64_t rows) {
  return std::clamp<int64_t>(32768 / std::max<int64_t>(rows, 1), 8, 256);
}

template <typename T, bool CAP, bool ENT, bool ZM>
void stats_cols_range(const RowStatsParams<T>& p, const RowPacks<T>& packs, int64_t v_begin, int64_t v_end,
                      PartialStats<T>& out) {
  using S = Simd<T>;
  using V = VecOf<T>;
  const Temper<T, CAP> temper(p.temperature, p.softcap);
  const V v_lowest = splat<T>(std::numeric_limits<T>::lowest()), one = splat<T>(T(1));
  const int64_t n = packs.count(), tile = col_tile(p.rows);
  std::vector<V> buf(tile * n), tile_max(n), vs(n), vt(n), zs(n);
  for (int64_t start = v_begin; start < v_end; start += tile) {
    const int64_t len = std::min(tile, v_end - start);
    std::fill(tile_max.begin(), tile_max.end(), splat<T>(-std::numeric_limits<T>::infinity()));
    std::fill(zs.begin(), zs.end(), V{});
    for (int64_t i = 0; i < len; ++i) {  // pass A (NaN never wins the max)
      const T* zv = p.z + (start + i) * p.vocab_stride;
      for (int64_t k = 0; k < n; ++k) {
        const V x = temper(packs.load_pack(zv, k));
        if constexpr (ZM) zs[k] += x;
        tile_max[k] = x > tile_max[k] ? x : tile_max[k];
        buf[i * n + k] = x;
      }
    }
    for (int64_t k = 0; k < n; ++k) {
      const V m = out.m[k], new_m = tile_max[k] > m ? tile_max[k] : m;
      const V f = new_m == m ? one : S::exp(m - new_m);  // no −inf − −inf before a row's first value
      if constexpr (ENT) out.t[k] = out.s[k] > V{} ? (out.t[k] + (m - new_m) * out.s[k]) * f : out.t[k];
      out.s[k] *= f;
      out.m[k] = new_m;
      if constexpr (ZM) out.zsum[k] += zs[k];
      vs[k] = V{};
      vt[k] = V{};
    }
    for (int64_t i = 0; i < len; ++i) {  // pass B, summed per tile (short runs of additions)
      for (int64_t k = 0; k < n; ++k) {
        V d = buf[i * n + k] - out.m[k];
        const V e = S::exp(d);
        vs[k] += e;
        if constexpr (ENT) {
          d = d < v_lowest ? v_lowest : d;
          vt[k] += e * d;
        }
      }
    }
    for (int64_t k = 0; k < n; ++k) {
      out.s[k] += vs[k];
      if constexpr (ENT) out.t[k] += vt[k];
    }
  }
}

template <typename T, bool CAP, bool ENT, bool ZM>
void stats_cols(const RowStatsParams<T>& p) {
  constexpr int W = Simd<T>::W;
  const RowPacks<T> packs(p.rows);
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), p.vocab / 64));
  std::vector<PartialStats<T>> partial(parts, PartialStats<T>(packs.count()));
  at::parallel_for(0, parts, 1, [&](int64_t b, int64_t e) {
    for (int64_t q = b; q < e; ++q) {
      stats_cols_range<T, CAP, ENT, ZM>(p, packs, p.vocab * q / parts, p.vocab * (q + 1) / parts, partial[q]);
    }
  });
  const Temper<T, CAP> temper(p.temperature, p.softcap);
  for (int64_t row = 0; row < p.rows; ++row) {  // merge the ranges: lse = M + log Σ_q s_q·e^{m_q − M}
    const int64_t k = row / W, j = row % W;
    T big = -std::numeric_limits<T>::infinity();
    for (const auto& q : partial) big = std::max(big, q.m[k][j]);
    T s = 0, t = 0, zsum = 0;
    for (const auto& q : partial) {
      if constexpr (ZM) zsum += q.zsum[k][j];
      if (q.s[k][j] == 0) continue;  // an empty range, its m −inf (a NaN sum still propagates)
      const T shift = q.m[k][j] - big, f = std::exp(shift);
      s += q.s[k][j] * f;
      if constexpr (ENT) t += (q.t[k][j] + shift * q.s[k][j]) * f;
    }
    const T log_s = std::log(s);
    const T lse = big + log_s;
    const T x_t = temper(splat<T>(p.z[p.targets[row] * p.vocab_stride + row]))[0];
    p.lse[row] = lse;
    p.logprob[row] = x_t - lse;
    if constexpr (ENT) p.entropy[row] = log_s - t / s;
    if constexpr (ZM) p.zmean[row] = zsum / static_cast<T>(p.vocab);
  }
}

template <typename T, bool CAP, bool ENT, bool ZM>
void grad_cols(const RowGradParams<T>& p) {
  using S = Simd<T>;
  using V = VecOf<T>;
  const Temper<T, CAP> temper(p.temperature, p.softcap);
  const T inv_t = static_cast<T>(1.0 / p.temperature);
  const RowPacks<T> packs(p.rows);
  const int64_t n = packs.count();
  std::vector<V> c0(n), ce(n), czm(n), lse(n);
  for (int64_t k = 0; k < n; ++k) {
    const V g_lp = packs.of(p.g_logprob, k), g_ent = packs.of(p.g_entropy, k);
    c0[k] = (packs.of(p.g_lse, k) - g_lp - (ENT ? g_ent * packs.of(p.entropy, k) : V{})) * inv_t;
    ce[k] = -g_ent * inv_t;
    czm[k] = ZM ? packs.of(p.g_zmean, k) * (inv_t / static_cast<T>(p.vocab)) : V{};
    lse[k] = packs.of(p.lse, k);
  }
  std::vector<T> z_t(p.rows);
  for (int64_t row = 0; row < p.rows; ++row) z_t[row] = p.z[p.targets[row] * p.vocab_stride + row];

  at::parallel_for(0, p.vocab, 64, [&](int64_t v_begin, int64_t v_end) {
    for (int64_t v = v_begin; v < v_end; ++v) {
      T* zv = p.z + v * p.vocab_stride;
      for (int64_t k = 0; k < n; ++k) {
        V th;
        const V lp = temper(packs.load_pack(zv, k), th) - lse[k];
        const V e = S::exp(lp);
        V d = ENT ? e * (c0[k] + ce[k] * lp) : e * c0[k];
        if constexpr (ZM) d += czm[k];
        if constexpr (CAP) d *= T(1) - th * th;
        packs.store_pack(zv, k, d);
      }
    }
  });
  for (int64_t row = 0; row < p.rows; ++row) {  // the one-hot term, at each row's target
    V th_t;
    temper(splat<T>(z_t[row]), th_t);
    const T g_lp = p.g_logprob ? p.g_logprob[row] : T(0);
    p.z[p.targets[row] * p.vocab_stride + row] += g_lp * inv_t * (CAP ? T(1) - th_t[0] * th_t[0] : T(1));
  }
}

}  // namespace

template <typename T>
void logprob_rows_stats_cpu(const RowStatsParams<T>& p) {
  const bool cap = p.softcap > 0, ent = p.entropy != nullptr, zm = p.zmean != nullptr;
  ALIGNFAST_BOOL_SWITCH(cap, CAP, [&] {
    ALIGNFAST_BOOL_SWITCH(ent, ENT, [&] {
      ALIGNFAST_BOOL_SWITCH(zm, ZM, [&] {
        if (p.vocab_stride != 1) return stats_cols<T, CAP, ENT, ZM>(p);
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
        if (p.vocab_stride != 1) return grad_cols<T, CAP, ENT, ZM>(p);
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
