// Boundary of the PPO/GRPO token pass: checks (naming the argument), outputs, parameters; shared by
// the CPU (alignfast.cpp) and CUDA (cuda/bindings.cpp) registrations. Math in pg_token_loss.h.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <optional>
#include <string>
#include <tuple>

#include "pg_token_loss.h"

namespace alignfast {

using PgTokenOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

inline void check_like_logp(const char* name, const at::Tensor& t, const at::Tensor& logp) {
  TORCH_CHECK(t.sizes() == logp.sizes(), name, " must have logp's shape ", logp.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == logp.scalar_type(), name, " must have logp's dtype ", logp.scalar_type(),
              ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == logp.device(), name, " is on ", t.device(), " but logp is on ", logp.device());
}

inline int pg_kl_code(const std::optional<std::string>& name) {
  if (!name) return kNoKl;
  if (*name == "k1") return kK1;
  if (*name == "k2") return kK2;
  if (*name == "k3") return kK3;
  TORCH_CHECK(false, "kl_estimator must be 'k1', 'k2' or 'k3', got '", *name, "'");
  return kNoKl;  // unreachable: TORCH_CHECK(false) throws
}

// (loss, dloss, ratio, approx_kl, kl, flags): each [B, T] in logp's dtype (kl [0] without ref_logp;
// flags uint8).
template <typename Launch>
PgTokenOutputs pg_token_loss(const at::Tensor& logp_in, const std::optional<at::Tensor>& old_in,
                             const std::optional<at::Tensor>& ref_in, const at::Tensor& adv_in,
                             const at::Tensor& valid_in, double ratio_low, double ratio_high,
                             std::optional<double> dual_clip, std::optional<double> log_ratio_clamp,
                             const std::optional<std::string>& kl_estimator, double kl_coef,
                             c10::DeviceType device_type, Launch&& launch) {
  TORCH_CHECK(logp_in.device().type() == device_type, "logp must be a ", device_type, " tensor, got ",
              logp_in.device());
  TORCH_CHECK(logp_in.dim() == 2, "logp must be 2-D [B, T], got shape ", logp_in.sizes());
  TORCH_CHECK(logp_in.scalar_type() == at::kFloat || logp_in.scalar_type() == at::kDouble,
              "logp must be float32 or float64, got ", logp_in.scalar_type());
  if (old_in) check_like_logp("old_logp", *old_in, logp_in);
  if (ref_in) check_like_logp("ref_logp", *ref_in, logp_in);
  const int64_t rows = logp_in.size(0), steps = logp_in.size(1);
  const bool per_row = adv_in.dim() == 1;
  TORCH_CHECK((per_row && adv_in.size(0) == rows) || adv_in.sizes() == logp_in.sizes(),
              "advantages must be [B, T]=", logp_in.sizes(), " or [B]=[", rows, "], got ", adv_in.sizes());
  TORCH_CHECK(adv_in.scalar_type() == logp_in.scalar_type(), "advantages must have logp's dtype ",
              logp_in.scalar_type(), ", got ", adv_in.scalar_type());
  TORCH_CHECK(adv_in.device() == logp_in.device(), "advantages must be on logp's device");
  TORCH_CHECK(valid_in.sizes() == logp_in.sizes(), "valid must have logp's shape ", logp_in.sizes(), ", got ",
              valid_in.sizes());
  TORCH_CHECK(valid_in.scalar_type() == at::kBool, "valid must be bool, got ", valid_in.scalar_type());
  TORCH_CHECK(valid_in.device() == logp_in.device(), "valid must be on logp's device");
  TORCH_CHECK(ratio_low <= ratio_high, "ratio_low must be <= ratio_high, got ", ratio_low, " > ", ratio_high);
  TORCH_CHECK(!dual_clip || *dual_clip > 1, "dual_clip must be > 1, got ", dual_clip.value_or(0));
  TORCH_CHECK(!log_ratio_clamp || *log_ratio_clamp > 0, "log_ratio_clamp must be > 0, got ",
              log_ratio_clamp.value_or(0));
  TORCH_CHECK(std::isfinite(kl_coef), "kl_coef must be finite, got ", kl_coef);
  const int kl_code = pg_kl_code(kl_estimator);
  TORCH_CHECK(!ref_in || kl_code != kNoKl, "ref_logp needs a kl_estimator ('k1', 'k2' or 'k3')");
  TORCH_CHECK(ref_in || kl_coef == 0, "kl_coef=", kl_coef, " needs ref_logp");

  const at::Tensor logp = logp_in.contiguous(), adv = adv_in.contiguous(), valid = valid_in.contiguous();
  const at::Tensor old = old_in ? old_in->contiguous() : at::Tensor();
  const at::Tensor ref = ref_in ? ref_in->contiguous() : at::Tensor();
  at::Tensor loss = at::empty_like(logp), dloss = at::empty_like(logp), ratio = at::empty_like(logp),
             approx_kl = at::empty_like(logp);
  at::Tensor kl = ref_in ? at::empty_like(logp) : at::empty({0}, logp.options());
  at::Tensor flags = at::empty(logp.sizes(), logp.options().dtype(at::kByte));
  if (logp.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES(logp.scalar_type(), "pg_token_loss", [&] {
      PgTokenParams<scalar_t> p;
      p.logp = logp.data_ptr<scalar_t>();
      p.old_logp = old_in ? old.data_ptr<scalar_t>() : nullptr;
      p.ref_logp = ref_in ? ref.data_ptr<scalar_t>() : nullptr;
      p.advantages = adv.data_ptr<scalar_t>();
      p.valid = valid.data_ptr<bool>();
      p.loss = loss.data_ptr<scalar_t>();
      p.dloss = dloss.data_ptr<scalar_t>();
      p.ratio = ratio.data_ptr<scalar_t>();
      p.approx_kl = approx_kl.data_ptr<scalar_t>();
      p.kl = ref_in ? kl.data_ptr<scalar_t>() : nullptr;
      p.flags = flags.data_ptr<uint8_t>();
      p.rows = rows;
      p.steps = steps;
      p.adv_per_row = per_row;
      // Cast from double once, as torch casts a Python scalar to the tensor's dtype.
      p.ratio_low = static_cast<scalar_t>(ratio_low);
      p.ratio_high = static_cast<scalar_t>(ratio_high);
      p.dual = dual_clip.has_value();
      p.dual_clip = static_cast<scalar_t>(dual_clip.value_or(0));
      p.clamp = log_ratio_clamp.has_value();
      p.log_ratio_clamp = static_cast<scalar_t>(log_ratio_clamp.value_or(0));
      p.kl_estimator = kl_code;
      p.kl_coef = static_cast<scalar_t>(kl_coef);
      launch(p);
    });
  }
  return {loss, dloss, ratio, approx_kl, kl, flags};
}

}  // namespace alignfast
