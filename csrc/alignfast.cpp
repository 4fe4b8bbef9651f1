// alignfast._C: the native kernels' one registration file.
//
// Declares the `alignfast` operator schemas and registers the `cpp` backend's CPU kernels
// (row_kernels_cpu.cpp, kl_rows_cpu.cpp, gae_cpu.cpp, pg_token_loss_cpu.cpp). On CUDA builds, cuda/bindings.cpp
// registers the same ops for CUDA. Python wraps each op with a fake (meta) implementation beside
// its wrapper (alignfast/ops/native_rows.py, alignfast/losses/pg_token.py; gae_scan's in _native.py).
#include <torch/extension.h>
#include <torch/library.h>

#include "gae_ops.h"
#include "kl_ops.h"
#include "pg_token_loss_ops.h"
#include "row_ops.h"

namespace alignfast {

std::string version() { return "0.1.0"; }

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> logprob_rows_stats_cpu_op(
    const at::Tensor& z, const at::Tensor& targets, double temperature, std::optional<double> softcap,
    bool with_entropy, bool with_zmean) {
  return rows_stats(z, targets, temperature, softcap, with_entropy, with_zmean, c10::DeviceType::CPU,
                    [](const auto& p) { logprob_rows_stats_cpu(p); });
}

void logprob_rows_grad_cpu_op(at::Tensor z, const at::Tensor& targets, const at::Tensor& lse,
                              const std::optional<at::Tensor>& entropy, const std::optional<at::Tensor>& g_logprob,
                              const std::optional<at::Tensor>& g_entropy, const std::optional<at::Tensor>& g_lse,
                              const std::optional<at::Tensor>& g_zmean, double temperature,
                              std::optional<double> softcap) {
  rows_grad_(z, targets, lse, entropy, g_logprob, g_entropy, g_lse, g_zmean, temperature, softcap,
             c10::DeviceType::CPU, [](const auto& p) { logprob_rows_grad_cpu(p); });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kl_rows_stats_cpu_op(const at::Tensor& z, const at::Tensor& z_ref,
                                                                   double temperature, bool reverse) {
  return kl_stats(z, z_ref, temperature, reverse, c10::DeviceType::CPU, [](const auto& p) { kl_rows_stats_cpu(p); });
}

void kl_rows_grad_cpu_op(at::Tensor z, at::Tensor z_ref, const at::Tensor& lse, const at::Tensor& ref_lse,
                         const at::Tensor& kl, const at::Tensor& g, double temperature, bool reverse, bool into_ref) {
  kl_grad_(z, z_ref, lse, ref_lse, kl, g, temperature, reverse, into_ref, c10::DeviceType::CPU,
           [](const auto& p) { kl_rows_grad_cpu(p); });
}

std::tuple<at::Tensor, at::Tensor> gae_scan_cpu_op(const at::Tensor& rewards, const at::Tensor& values,
                                                   const at::Tensor& valid, double gamma, double lam) {
  return gae_scan(rewards, values, valid, gamma, lam, c10::DeviceType::CPU,
                  [](const auto& p) { gae_scan_cpu(p); });
}

PgTokenOutputs pg_token_loss_cpu_op(const at::Tensor& logp, const std::optional<at::Tensor>& old_logp,
                                    const std::optional<at::Tensor>& ref_logp, const at::Tensor& advantages,
                                    const at::Tensor& valid, double ratio_low, double ratio_high,
                                    std::optional<double> dual_clip, std::optional<double> log_ratio_clamp,
                                    std::optional<std::string> kl_estimator, double kl_coef) {
  return pg_token_loss(logp, old_logp, ref_logp, advantages, valid, ratio_low, ratio_high, dual_clip,
                       log_ratio_clamp, kl_estimator, kl_coef, c10::DeviceType::CPU,
                       [](const auto& p) { pg_token_loss_cpu(p); });
}

}  // namespace
}  // namespace alignfast

// Row kernels on one [rows, V] block of raw logits z (see row_kernels.h for the math).
// stats: z unchanged; entropy / zmean come back empty ([0]) unless asked for.
// grad_: z is overwritten with ∂L/∂z; a missing upstream gradient counts as 0.
TORCH_LIBRARY(alignfast, m) {
  m.def("logprob_rows_stats(Tensor z, Tensor targets, float temperature, float? softcap, bool with_entropy, "
        "bool with_zmean) -> (Tensor logprob, Tensor entropy, Tensor lse, Tensor zmean)");
  m.def("logprob_rows_grad_(Tensor(a!) z, Tensor targets, Tensor lse, Tensor? entropy, Tensor? g_logprob, "
        "Tensor? g_entropy, Tensor? g_lse, Tensor? g_zmean, float temperature, float? softcap) -> ()");
  // KL row kernels on a policy / reference pair of raw logits blocks (kl_rows.h): stats leaves both
  // unchanged; grad_ overwrites z (into_ref: z_ref, z unchanged) with ∂(Σ g·kl)/∂z.
  m.def("kl_rows_stats(Tensor z, Tensor z_ref, float temperature, bool reverse) "
        "-> (Tensor kl, Tensor lse, Tensor ref_lse)");
  m.def("kl_rows_grad_(Tensor(a!) z, Tensor(b!) z_ref, Tensor lse, Tensor ref_lse, Tensor kl, Tensor g, "
        "float temperature, bool reverse, bool into_ref=False) -> ()");
  // GAE reverse scan over [B, T] rollouts (gae.h): (advantages, returns), 0 where valid is false.
  m.def("gae_scan(Tensor rewards, Tensor values, Tensor valid, float gamma, float lam) "
        "-> (Tensor advantages, Tensor returns)");
  // PPO/GRPO per-token loss, ∂loss/∂logp and metric terms in one pass (pg_token_loss.h); kl is [0]
  // without ref_logp, flags uint8 bits (1 clipped, 2 clip low, 4 clip high, 8 dual-clipped).
  m.def("pg_token_loss(Tensor logp, Tensor? old_logp, Tensor? ref_logp, Tensor advantages, Tensor valid, "
        "float ratio_low, float ratio_high, float? dual_clip, float? log_ratio_clamp, str? kl_estimator, "
        "float kl_coef) -> (Tensor loss, Tensor dloss, Tensor ratio, Tensor approx_kl, Tensor kl, Tensor flags)");
}

TORCH_LIBRARY_IMPL(alignfast, CPU, m) {
  m.impl("logprob_rows_stats", &alignfast::logprob_rows_stats_cpu_op);
  m.impl("logprob_rows_grad_", &alignfast::logprob_rows_grad_cpu_op);
  m.impl("kl_rows_stats", &alignfast::kl_rows_stats_cpu_op);
  m.impl("kl_rows_grad_", &alignfast::kl_rows_grad_cpu_op);
  m.impl("gae_scan", &alignfast::gae_scan_cpu_op);
  m.impl("pg_token_loss", &alignfast::pg_token_loss_cpu_op);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "alignfast native kernels; the operators live in torch.ops.alignfast";
  m.def("version", &alignfast::version, "version of the native extension");
}
