// alignfast._C: the native kernels' one registration file.
//
// Declares the `alignfast` operator schemas and registers the `cpp` backend's CPU kernels
// (row_kernels_cpu.cpp). On CUDA builds, cuda/bindings.cpp registers the same ops for CUDA.
// Python wraps each op with a fake (meta) implementation in alignfast/ops/native_rows.py.
#include <torch/extension.h>
#include <torch/library.h>

#include "gae_ops.h"
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

std::tuple<at::Tensor, at::Tensor> gae_scan_cpu_op(const at::Tensor& rewards, const at::Tensor& values,
                                                   const at::Tensor& valid, double gamma, double lam) {
  return gae_scan(rewards, values, valid, gamma, lam, c10::DeviceType::CPU,
                  [](const auto& p) { gae_scan_cpu(p); });
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
  // GAE reverse scan over [B, T] rollouts (gae.h): (advantages, returns), 0 where valid is false.
  m.def("gae_scan(Tensor rewards, Tensor values, Tensor valid, float gamma, float lam) "
        "-> (Tensor advantages, Tensor returns)");
}

TORCH_LIBRARY_IMPL(alignfast, CPU, m) {
  m.impl("logprob_rows_stats", &alignfast::logprob_rows_stats_cpu_op);
  m.impl("logprob_rows_grad_", &alignfast::logprob_rows_grad_cpu_op);
  m.impl("gae_scan", &alignfast::gae_scan_cpu_op);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "alignfast native kernels; the operators live in torch.ops.alignfast";
  m.def("version", &alignfast::version, "version of the native extension");
}
