// Registers the CUDA row kernels (row_kernels.cu), the KL row kernels (kl_rows.cu), the GAE scan (gae.cu)
// and the PPO/GRPO token pass
// (pg_token_loss.cu) for the `alignfast` operators declared in
// ../alignfast.cpp. Compiled only in CUDA builds (setup.py globs csrc/cuda/*.cpp then).
// The checks are those of the CPU registration (../row_ops.h); the launch runs on torch's
// current stream of z's device.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../gae_ops.h"
#include "../kl_ops.h"
#include "../pg_token_loss_ops.h"
#include "../row_ops.h"
#include "gae.cuh"
#include "kl_rows.cuh"
#include "pg_token_loss.cuh"
#include "row_kernels.cuh"

namespace alignfast {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> logprob_rows_stats_cuda_op(
    const at::Tensor& z, const at::Tensor& targets, double temperature, std::optional<double> softcap,
    bool with_entropy, bool with_zmean) {
  const c10::cuda::OptionalCUDAGuard guard(z.device());
  return rows_stats(z, targets, temperature, softcap, with_entropy, with_zmean, c10::DeviceType::CUDA,
                    [](const auto& p) {
                      C10_CUDA_CHECK(logprob_rows_stats_cuda(p, c10::cuda::getCurrentCUDAStream().stream()));
                    });
}

void logprob_rows_grad_cuda_op(at::Tensor z, const at::Tensor& targets, const at::Tensor& lse,
                               const std::optional<at::Tensor>& entropy, const std::optional<at::Tensor>& g_logprob,
                               const std::optional<at::Tensor>& g_entropy, const std::optional<at::Tensor>& g_lse,
                               const std::optional<at::Tensor>& g_zmean, double temperature,
                               std::optional<double> softcap) {
  const c10::cuda::OptionalCUDAGuard guard(z.device());
  rows_grad_(z, targets, lse, entropy, g_logprob, g_entropy, g_lse, g_zmean, temperature, softcap,
             c10::DeviceType::CUDA, [](const auto& p) {
               C10_CUDA_CHECK(logprob_rows_grad_cuda(p, c10::cuda::getCurrentCUDAStream().stream()));
             });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kl_rows_stats_cuda_op(const at::Tensor& z, const at::Tensor& z_ref,
                                                                    double temperature, bool reverse) {
  const c10::cuda::OptionalCUDAGuard guard(z.device());
  return kl_stats(z, z_ref, temperature, reverse, c10::DeviceType::CUDA, [](const auto& p) {
    C10_CUDA_CHECK(kl_rows_stats_cuda(p, c10::cuda::getCurrentCUDAStream().stream()));
  });
}

void kl_rows_grad_cuda_op(at::Tensor z, at::Tensor z_ref, const at::Tensor& lse, const at::Tensor& ref_lse,
                          const at::Tensor& kl, const at::Tensor& g, double temperature, bool reverse,
                          bool into_ref) {
  const c10::cuda::OptionalCUDAGuard guard(z.device());
  kl_grad_(z, z_ref, lse, ref_lse, kl, g, temperature, reverse, into_ref, c10::DeviceType::CUDA, [](const auto& p) {
    C10_CUDA_CHECK(kl_rows_grad_cuda(p, c10::cuda::getCurrentCUDAStream().stream()));
  });
}

std::tuple<at::Tensor, at::Tensor> gae_scan_cuda_op(const at::Tensor& rewards, const at::Tensor& values,
                                                    const at::Tensor& valid, double gamma, double lam) {
  const c10::cuda::OptionalCUDAGuard guard(rewards.device());
  return gae_scan(rewards, values, valid, gamma, lam, c10::DeviceType::CUDA, [](const auto& p) {
    C10_CUDA_CHECK(gae_scan_cuda(p, c10::cuda::getCurrentCUDAStream().stream()));
  });
}

PgTokenOutputs pg_token_loss_cuda_op(const at::Tensor& logp, const std::optional<at::Tensor>& old_logp,
                                     const std::optional<at::Tensor>& ref_logp, const at::Tensor& advantages,
                                     const at::Tensor& valid, double ratio_low, double ratio_high,
                                     std::optional<double> dual_clip, std::optional<double> log_ratio_clamp,
                                     std::optional<std::string> kl_estimator, double kl_coef) {
  const c10::cuda::OptionalCUDAGuard guard(logp.device());
  return pg_token_loss(logp, old_logp, ref_logp, advantages, valid, ratio_low, ratio_high, dual_clip,
                       log_ratio_clamp, kl_estimator, kl_coef, c10::DeviceType::CUDA, [](const auto& p) {
                         C10_CUDA_CHECK(pg_token_loss_cuda(p, c10::cuda::getCurrentCUDAStream().stream()));
                       });
}

}  // namespace
}  // namespace alignfast

TORCH_LIBRARY_IMPL(alignfast, CUDA, m) {
  m.impl("logprob_rows_stats", &alignfast::logprob_rows_stats_cuda_op);
  m.impl("logprob_rows_grad_", &alignfast::logprob_rows_grad_cuda_op);
  m.impl("kl_rows_stats", &alignfast::kl_rows_stats_cuda_op);
  m.impl("kl_rows_grad_", &alignfast::kl_rows_grad_cuda_op);
  m.impl("gae_scan", &alignfast::gae_scan_cuda_op);
  m.impl("pg_token_loss", &alignfast::pg_token_loss_cuda_op);
}
