// Boundary of the KL row kernels (kl_rows.h): checks the tensors of one call (TORCH_CHECK, messages
// naming the argument), allocates outputs, fills the parameter structs and hands them to a device's
// launcher. Shared by the CPU registration (alignfast.cpp) and the CUDA one (cuda/bindings.cpp).
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "kl_rows.h"
#include "row_ops.h"  // check_logits, checked_row_vector

namespace alignfast {

inline void check_kl_blocks(const at::Tensor& z, const at::Tensor& z_ref, double temperature,
                            c10::DeviceType device_type) {
  check_logits(z, device_type);
  TORCH_CHECK(z.size(1) == 1 || z.stride(1) == 1, "z must be contiguous along V (stride(1) == 1), got strides ",
              z.strides());
  TORCH_CHECK(z_ref.sizes() == z.sizes(), "z_ref must have z's shape ", z.sizes(), ", got ", z_ref.sizes());
  TORCH_CHECK(z_ref.scalar_type() == z.scalar_type(), "z_ref must have z's dtype ", z.scalar_type(), ", got ",
              z_ref.scalar_type());
  TORCH_CHECK(z_ref.device() == z.device(), "z_ref must be on ", z.device(), " (the device of z), got ",
              z_ref.device());
  TORCH_CHECK(z_ref.size(1) == 1 || z_ref.stride(1) == 1,
              "z_ref must be contiguous along V (stride(1) == 1), got strides ", z_ref.strides());
  check_temperature(temperature, z);
}

// stats: (kl, lse, ref_lse), each [rows] in z's dtype. `launch` gets a KLStatsParams<float|double>.
template <typename Launch>
std::tuple<at::Tensor, at::Tensor, at::Tensor> kl_stats(const at::Tensor& z, const at::Tensor& z_ref,
                                                       double temperature, bool reverse,
                                                       c10::DeviceType device_type, Launch&& launch) {
  check_kl_blocks(z, z_ref, temperature, device_type);
  const int64_t rows = z.size(0);
  at::Tensor kl = at::empty({rows}, z.options()), lse = at::empty({rows}, z.options());
  at::Tensor ref_lse = at::empty({rows}, z.options());
  if (rows > 0) {
    AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "kl_rows_stats", [&] {
      KLStatsParams<scalar_t> p;
      p.z = z.data_ptr<scalar_t>();
      p.z_ref = z_ref.data_ptr<scalar_t>();
      p.kl = kl.data_ptr<scalar_t>();
      p.lse = lse.data_ptr<scalar_t>();
      p.ref_lse = ref_lse.data_ptr<scalar_t>();
      p.rows = rows;
      p.vocab = z.size(1);
      p.z_stride = z.stride(0);
      p.ref_stride = z_ref.stride(0);
      p.temperature = temperature;
      p.reverse = reverse;
      launch(p);
    });
  }
  return {kl, lse, ref_lse};
}

// grad: overwrites z (into_ref: z_ref, leaving z as it was) with ∂L/∂z of Σ_rows g·kl. `launch` gets a
// KLGradParams<float|double>.
template <typename Launch>
void kl_grad_(at::Tensor& z, at::Tensor& z_ref, const at::Tensor& lse_in, const at::Tensor& ref_lse_in,
              const at::Tensor& kl_in, const at::Tensor& g_in, double temperature, bool reverse, bool into_ref,
              c10::DeviceType device_type, Launch&& launch) {
  check_kl_blocks(z, z_ref, temperature, device_type);
  at::Tensor& out = into_ref ? z_ref : z;
  check_writable(out, into_ref ? "z_ref" : "z");
  // each element is read before it is written, so z and z_ref may be one tensor, but not overlap otherwise
  const bool same = z.data_ptr() == z_ref.data_ptr() && z.strides() == z_ref.strides();
  TORCH_CHECK(same || !spans_intersect(z, z_ref), "z_ref shares memory with z (without being the same view), "
              "and one of them is written in place; pass separate blocks");
  const at::Tensor lse = *checked_row_vector(lse_in, "lse", z, &out);
  const at::Tensor ref_lse = *checked_row_vector(ref_lse_in, "ref_lse", z, &out);
  const at::Tensor kl = *checked_row_vector(kl_in, "kl", z, &out);
  const at::Tensor g = *checked_row_vector(g_in, "g", z, &out);
  if (z.size(0) == 0) return;
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "kl_rows_grad_", [&] {
    KLGradParams<scalar_t> p;
    p.z = z.data_ptr<scalar_t>();
    p.z_ref = z_ref.data_ptr<scalar_t>();
    p.out = out.data_ptr<scalar_t>();
    p.out_stride = out.stride(0);
    p.lse = lse.data_ptr<scalar_t>();
    p.ref_lse = ref_lse.data_ptr<scalar_t>();
    p.kl = kl.data_ptr<scalar_t>();
    p.g = g.data_ptr<scalar_t>();
    p.rows = z.size(0);
    p.vocab = z.size(1);
    p.z_stride = z.stride(0);
    p.ref_stride = z_ref.stride(0);
    p.temperature = temperature;
    p.reverse = reverse;
    launch(p);
  });
}

}  // namespace alignfast
