// C entry points into the CUDA launchers of csrc/cuda, compiled against the emulator, for ctypes:
// each fills the launcher's parameter struct from raw pointers and returns its cudaError_t.
#include <cstdint>

#include "gae.cuh"
#include "kl_rows.cuh"
#include "pg_token_loss.cuh"
#include "row_kernels.cuh"

namespace {

template <typename T>
int row_stats(const T* z, const int64_t* targets, T* logprob, T* entropy, T* lse, T* zmean, int64_t rows,
              int64_t vocab, int64_t z_stride, double temperature, double softcap) {
  alignfast::RowStatsParams<T> p;
  p.z = z, p.targets = targets, p.logprob = logprob, p.entropy = entropy, p.lse = lse, p.zmean = zmean;
  p.rows = rows, p.vocab = vocab, p.z_stride = z_stride, p.temperature = temperature, p.softcap = softcap;
  return alignfast::logprob_rows_stats_cuda(p, nullptr);
}

template <typename T>
int row_grad(T* z, const int64_t* targets, const T* lse, const T* entropy, const T* g_logprob,
             const T* g_entropy, const T* g_lse, const T* g_zmean, int64_t rows, int64_t vocab,
             int64_t z_stride, double temperature, double softcap) {
  alignfast::RowGradParams<T> p;
  p.z = z, p.targets = targets, p.lse = lse, p.entropy = entropy;
  p.g_logprob = g_logprob, p.g_entropy = g_entropy, p.g_lse = g_lse, p.g_zmean = g_zmean;
  p.rows = rows, p.vocab = vocab, p.z_stride = z_stride, p.temperature = temperature, p.softcap = softcap;
  return alignfast::logprob_rows_grad_cuda(p, nullptr);
}

template <typename T>
int kl_stats(const T* z, const T* z_ref, T* kl, T* lse, T* ref_lse, int64_t rows, int64_t vocab, int64_t z_stride,
             int64_t ref_stride, double temperature, bool reverse) {
  alignfast::KLStatsParams<T> p;
  p.z = z, p.z_ref = z_ref, p.kl = kl, p.lse = lse, p.ref_lse = ref_lse;
  p.rows = rows, p.vocab = vocab, p.z_stride = z_stride, p.ref_stride = ref_stride;
  p.temperature = temperature, p.reverse = reverse;
  return alignfast::kl_rows_stats_cuda(p, nullptr);
}

template <typename T>
int kl_grad(T* z, T* z_ref, const T* lse, const T* ref_lse, const T* kl, const T* g, int64_t rows,
            int64_t vocab, int64_t z_stride, int64_t ref_stride, double temperature, bool reverse, bool into_ref) {
  alignfast::KLGradParams<T> p;
  p.z = z, p.z_ref = z_ref, p.lse = lse, p.ref_lse = ref_lse, p.kl = kl, p.g = g;
  p.out = into_ref ? z_ref : z, p.out_stride = into_ref ? ref_stride : z_stride;
  p.rows = rows, p.vocab = vocab, p.z_stride = z_stride, p.ref_stride = ref_stride;
  p.temperature = temperature, p.reverse = reverse;
  return alignfast::kl_rows_grad_cuda(p, nullptr);
}

template <typename T>
int gae(const T* rewards, const T* values, const bool* valid, T* advantages, T* returns, int64_t rows,
        int64_t steps, double gamma, double lam) {
  alignfast::GaeParams<T> p;
  p.rewards = rewards, p.values = values, p.valid = valid, p.advantages = advantages, p.returns = returns;
  p.rows = rows, p.steps = steps, p.gamma = gamma, p.lam = lam;
  return alignfast::gae_scan_cuda(p, nullptr);
}

// options: ratio_low, ratio_high, dual_clip (<= 0: off), log_ratio_clamp (<= 0: off), kl_coef.
template <typename T>
int pg_token(const T* logp, const T* old_logp, const T* ref_logp, const T* advantages, const bool* valid,
             T* loss, T* dloss, T* ratio, T* approx_kl, T* kl, uint8_t* flags, int64_t rows, int64_t steps,
             bool adv_per_row, const double* options, int kl_estimator) {
  alignfast::PgTokenParams<T> p;
  p.logp = logp, p.old_logp = old_logp, p.ref_logp = ref_logp, p.advantages = advantages, p.valid = valid;
  p.loss = loss, p.dloss = dloss, p.ratio = ratio, p.approx_kl = approx_kl, p.kl = kl, p.flags = flags;
  p.rows = rows, p.steps = steps, p.adv_per_row = adv_per_row;
  p.ratio_low = T(options[0]), p.ratio_high = T(options[1]);
  p.dual = options[2] > 0, p.dual_clip = T(options[2]);
  p.clamp = options[3] > 0, p.log_ratio_clamp = T(options[3]);
  p.kl_coef = T(options[4]), p.kl_estimator = kl_estimator;
  return alignfast::pg_token_loss_cuda(p, nullptr);
}

}  // namespace

#define ALIGNFAST_EMU_EXPORT(T, SUFFIX)                                                                 \
  extern "C" int row_stats_##SUFFIX(const T* z, const int64_t* t, T* lp, T* ent, T* lse, T* zm, int64_t n, \
                                    int64_t vocab, int64_t stride, double temp, double cap) {             \
    return row_stats(z, t, lp, ent, lse, zm, n, vocab, stride, temp, cap);                                \
  }                                                                                                       \
  extern "C" int row_grad_##SUFFIX(T* z, const int64_t* t, const T* lse, const T* ent, const T* g_lp,     \
                                   const T* g_ent, const T* g_lse, const T* g_zm, int64_t n, int64_t vocab, \
                                   int64_t stride, double temp, double cap) {                             \
    return row_grad(z, t, lse, ent, g_lp, g_ent, g_lse, g_zm, n, vocab, stride, temp, cap);               \
  }                                                                                                       \
  extern "C" int kl_stats_##SUFFIX(const T* z, const T* zr, T* kl, T* lse, T* rlse, int64_t n, int64_t vocab,  \
                                   int64_t stride, int64_t ref_stride, double temp, bool rev) {           \
    return kl_stats(z, zr, kl, lse, rlse, n, vocab, stride, ref_stride, temp, rev);                       \
  }                                                                                                       \
  extern "C" int kl_grad_##SUFFIX(T* z, T* zr, const T* lse, const T* rlse, const T* kl, const T* g,       \
                                  int64_t n, int64_t vocab, int64_t stride, int64_t ref_stride, double temp, \
                                  bool rev, bool into_ref) {                                              \
    return kl_grad(z, zr, lse, rlse, kl, g, n, vocab, stride, ref_stride, temp, rev, into_ref);           \
  }                                                                                                       \
  extern "C" int gae_##SUFFIX(const T* r, const T* v, const bool* valid, T* adv, T* ret, int64_t rows,   \
                              int64_t steps, double gamma, double lam) {                                  \
    return gae(r, v, valid, adv, ret, rows, steps, gamma, lam);                                           \
  }                                                                                                       \
  extern "C" int pg_token_##SUFFIX(const T* lp, const T* old, const T* ref, const T* adv, const bool* ok, \
                                   T* loss, T* dloss, T* ratio, T* akl, T* kl, uint8_t* flags, int64_t rows, \
                                   int64_t steps, bool adv_per_row, const double* options, int est) {     \
    return pg_token(lp, old, ref, adv, ok, loss, dloss, ratio, akl, kl, flags, rows, steps, adv_per_row,  \
                    options, est);                                                                        \
  }

ALIGNFAST_EMU_EXPORT(float, f32)
ALIGNFAST_EMU_EXPORT(double, f64)
