// Boundary of the GAE scan: checks (naming the argument), outputs, parameters; shared by the CPU
// (alignfast.cpp) and CUDA (cuda/bindings.cpp) registrations.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "gae.h"

namespace alignfast {

template <typename Launch>
std::tuple<at::Tensor, at::Tensor> gae_scan(const at::Tensor& rewards_in, const at::Tensor& values_in,
                                            const at::Tensor& valid_in, double gamma, double lam,
                                            c10::DeviceType device_type, Launch&& launch) {
  TORCH_CHECK(rewards_in.device().type() == device_type, "rewards must be a ", device_type, " tensor, got ",
              rewards_in.device());
  TORCH_CHECK(rewards_in.dim() == 2, "rewards must be 2-D [B, T], got shape ", rewards_in.sizes());
  TORCH_CHECK(rewards_in.scalar_type() == at::kFloat || rewards_in.scalar_type() == at::kDouble,
              "rewards must be float32 or float64, got ", rewards_in.scalar_type());
  TORCH_CHECK(values_in.sizes() == rewards_in.sizes(), "values must have rewards' shape ", rewards_in.sizes(),
              ", got ", values_in.sizes());
  TORCH_CHECK(values_in.scalar_type() == rewards_in.scalar_type(), "values must have rewards' dtype ",
              rewards_in.scalar_type(), ", got ", values_in.scalar_type());
  TORCH_CHECK(valid_in.sizes() == rewards_in.sizes(), "valid must have rewards' shape ", rewards_in.sizes(),
              ", got ", valid_in.sizes());
  TORCH_CHECK(valid_in.scalar_type() == at::kBool, "valid must be bool, got ", valid_in.scalar_type());
  TORCH_CHECK(values_in.device() == rewards_in.device() && valid_in.device() == rewards_in.device(),
              "rewards, values and valid must be on one device");
  TORCH_CHECK(gamma >= 0 && gamma <= 1, "gamma must lie in [0, 1], got ", gamma);
  TORCH_CHECK(lam >= 0 && lam <= 1, "lam must lie in [0, 1], got ", lam);
  const at::Tensor rewards = rewards_in.contiguous(), values = values_in.contiguous(), valid = valid_in.contiguous();
  at::Tensor advantages = at::empty_like(rewards), returns = at::empty_like(rewards);
  if (rewards.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES(rewards.scalar_type(), "gae_scan", [&] {
      GaeParams<scalar_t> p;
      p.rewards = rewards.data_ptr<scalar_t>();
      p.values = values.data_ptr<scalar_t>();
      p.valid = valid.data_ptr<bool>();
      p.advantages = advantages.data_ptr<scalar_t>();
      p.returns = returns.data_ptr<scalar_t>();
      p.rows = rewards.size(0);
      p.steps = rewards.size(1);
      p.gamma = gamma;
      p.lam = lam;
      launch(p);
    });
  }
  return {advantages, returns};
}

}  // namespace alignfast
