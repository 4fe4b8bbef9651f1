// Boundary of the row kernels: checks the tensors of one call (TORCH_CHECK, messages naming the
// argument), allocates outputs, fills the kernels' parameter structs and hands them to a
// device's launcher. Shared by the CPU registration (alignfast.cpp) and the CUDA one
// (cuda/bindings.cpp), so both devices check exactly the same things.
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

#include <cmath>
#include <optional>
#include <tuple>
#include <utility>

#include "row_kernels.h"

namespace alignfast {

#define AF_CHECK_DEVICE(x, dev) \
  TORCH_CHECK((x).device() == (dev), #x " must be on ", (dev), " (the device of z), got ", (x).device())
#define AF_CHECK_ROWS(x, n)                                                                                   \
  TORCH_CHECK((x).dim() == 1 && (x).size(0) == (n), #x " must be 1-D with one entry per row of z ([", (n), \
              "]), got shape ", (x).sizes())

// A [rows, V] block stored vocab-major ([V, rows] transposed): its vocab entries are not adjacent.
inline bool vocab_major(const at::Tensor& z) { return z.size(1) > 1 && z.stride(1) != 1; }

// The strides of z as the kernels take them (RowStatsParams).
template <typename P>
void set_layout(P& p, const at::Tensor& z) {
  const bool vm = vocab_major(z);
  p.rows = z.size(0);
  p.vocab = z.size(1);
  p.z_stride = vm ? 1 : z.stride(0);
  p.vocab_stride = vm ? z.stride(1) : 1;
}

// z is a 2-D [rows, V ≥ 1] float32/float64 logits block on the device type (any layout).
inline void check_logits(const at::Tensor& z, c10::DeviceType device_type) {
  TORCH_CHECK(z.device().type() == device_type, "z must be a ", device_type, " tensor, got ", z.device());
  TORCH_CHECK(z.dim() == 2, "z must be a 2-D [rows, V] logits block, got shape ", z.sizes());
  TORCH_CHECK(z.scalar_type() == at::kFloat || z.scalar_type() == at::kDouble,
              "z must be float32 or float64 (the accumulation dtype), got ", z.scalar_type());
  TORCH_CHECK(z.size(1) > 0, "z must have at least one column (vocab entry), got shape ", z.sizes());
}

// Whether x stays finite in z's dtype (the kernels take options as scalar_t: 1e39 is inf in float32).
inline bool fits(double x, const at::Tensor& z) {
  return std::isfinite(x) && (z.scalar_type() != at::kFloat || std::isfinite(static_cast<float>(x)));
}

inline void check_temperature(double temperature, const at::Tensor& z) {
  TORCH_CHECK(temperature > 0 && fits(1.0 / temperature, z), "temperature must be > 0 with a reciprocal finite "
              "in z's dtype ", z.scalar_type(), ", got ", temperature);
}

inline void check_block(const at::Tensor& z, const at::Tensor& targets, double temperature,
                        std::optional<double> softcap, c10::DeviceType device_type) {
  check_logits(z, device_type);
  if (device_type == c10::DeviceType::CPU) {
    TORCH_CHECK(!vocab_major(z) || z.stride(0) == 1 || z.size(0) == 1,
                "z must be contiguous along V (stride(1) == 1) or along the rows (stride(0) == 1, the "
                "transpose of a [V, rows] block), got strides ", z.strides());
  } else {
    TORCH_CHECK(!vocab_major(z), "z must be contiguous along V (stride(1) == 1), got strides ", z.strides());
  }
  TORCH_CHECK(targets.scalar_type() == at::kLong, "targets must be int64, got ", targets.scalar_type());
  AF_CHECK_DEVICE(targets, z.device());
  AF_CHECK_ROWS(targets, z.size(0));
  check_temperature(temperature, z);
  TORCH_CHECK(!softcap.has_value() || (*softcap > 0 && fits(*softcap, z) && fits(1.0 / *softcap, z)),
              "softcap must be a finite number > 0 or None, with it and its reciprocal finite in z's dtype ",
              z.scalar_type(), ", got ", softcap.value_or(0));
}

// A block written in place: no two of its elements may share memory (rows sharing memory would race
// and give wrong values; `assert_no_internal_overlap` alone catches only stride-0 views).
inline void check_writable(const at::Tensor& z, const char* name) {
  at::assert_no_internal_overlap(z);
  const bool apart = vocab_major(z) ? z.stride(1) >= z.size(0) : (z.size(0) <= 1 || z.stride(0) >= z.size(1));
  TORCH_CHECK(apart, name, " is written in place, so its rows must not overlap in memory; got shape ", z.sizes(),
              " and strides ", z.strides());
}

// Whether the memory spans of a and b (first to last element) intersect.
inline bool spans_intersect(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0 || !a.has_storage() || !b.has_storage() ||
      !a.storage().is_alias_of(b.storage())) {
    return false;
  }
  auto span = [](const at::Tensor& t) {
    int64_t last = 0;
    for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
    const int64_t item = static_cast<int64_t>(t.element_size()), lo = t.storage_offset() * item;
    return std::pair<int64_t, int64_t>(lo, lo + (last + 1) * item);
  };
  const auto [a_lo, a_hi] = span(a);
  const auto [b_lo, b_hi] = span(b);
  return a_lo < b_hi && b_lo < a_hi;
}

// Host-side range check of the targets (CPU only: on CUDA it would synchronise).
inline void check_targets_in_range(const at::Tensor& targets, int64_t vocab) {
  const at::Tensor t = targets.contiguous();
  const int64_t* p = t.data_ptr<int64_t>();
  for (int64_t i = 0; i < t.numel(); ++i) {
    TORCH_CHECK(p[i] >= 0 && p[i] < vocab, "targets[", i, "] = ", p[i], " is outside [0, V=", vocab,
                "); ignored positions must be removed before the row kernels");
  }
}

// A per-row input [rows] of z's dtype and device, contiguous; `written`: the block a kernel writes while
// reading it, which it must not overlap (a row's write would change what later rows read).
inline std::optional<at::Tensor> checked_row_vector(const std::optional<at::Tensor>& t, const char* name,
                                                    const at::Tensor& z, const at::Tensor* written = nullptr) {
  if (!t.has_value()) return std::nullopt;
  TORCH_CHECK(t->dim() == 1 && t->size(0) == z.size(0), name, " must be 1-D with one entry per row of z ([",
              z.size(0), "]), got shape ", t->sizes());
  TORCH_CHECK(t->scalar_type() == z.scalar_type(), name, " must have z's dtype ", z.scalar_type(), ", got ",
              t->scalar_type());
  TORCH_CHECK(t->device() == z.device(), name, " must be on ", z.device(), " (the device of z), got ",
              t->device());
  at::Tensor out = t->contiguous();
  TORCH_CHECK(written == nullptr || !spans_intersect(out, *written), name,
              " shares memory with the block written in place; pass a separate tensor");
  return out;
}

template <typename T>
const T* ptr_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<T>() : nullptr;
}

// stats: (logprob, entropy, lse, zmean), each [rows] in z's dtype; entropy / zmean are empty when
// not asked for. `launch` is called with a RowStatsParams<float|double>.
template <typename Launch>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> rows_stats(
    const at::Tensor& z, const at::Tensor& targets_in, double temperature, std::optional<double> softcap,
    bool with_entropy, bool with_zmean, c10::DeviceType device_type, Launch&& launch) {
  check_block(z, targets_in, temperature, softcap, device_type);  // read only: any layout of z
  if (device_type == c10::DeviceType::CPU) check_targets_in_range(targets_in, z.size(1));
  const at::Tensor targets = targets_in.contiguous();
  const int64_t rows = z.size(0);
  at::Tensor logprob = at::empty({rows}, z.options()), lse = at::empty({rows}, z.options());
  at::Tensor entropy = at::empty({with_entropy ? rows : 0}, z.options());
  at::Tensor zmean = at::empty({with_zmean ? rows : 0}, z.options());
  if (rows > 0) {
    AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "logprob_rows_stats", [&] {
      RowStatsParams<scalar_t> p;
      p.z = z.data_ptr<scalar_t>();
      p.targets = targets.data_ptr<int64_t>();
      p.logprob = logprob.data_ptr<scalar_t>();
      p.entropy = with_entropy ? entropy.data_ptr<scalar_t>() : nullptr;
      p.lse = lse.data_ptr<scalar_t>();
      p.zmean = with_zmean ? zmean.data_ptr<scalar_t>() : nullptr;
      set_layout(p, z);
      p.temperature = temperature;
      p.softcap = softcap.value_or(0.0);
      launch(p);
    });
  }
  return {logprob, entropy, lse, zmean};
}

// grad: overwrites z with ∂L/∂z. `launch` is called with a RowGradParams<float|double>.
template <typename Launch>
void rows_grad_(at::Tensor& z, const at::Tensor& targets_in, const at::Tensor& lse_in,
                const std::optional<at::Tensor>& entropy_in, const std::optional<at::Tensor>& g_logprob_in,
                const std::optional<at::Tensor>& g_entropy_in, const std::optional<at::Tensor>& g_lse_in,
                const std::optional<at::Tensor>& g_zmean_in, double temperature, std::optional<double> softcap,
                c10::DeviceType device_type, Launch&& launch) {
  check_block(z, targets_in, temperature, softcap, device_type);
  check_writable(z, "z");
  if (device_type == c10::DeviceType::CPU) check_targets_in_range(targets_in, z.size(1));
  const at::Tensor targets = targets_in.contiguous();
  TORCH_CHECK(!spans_intersect(targets, z), "targets shares memory with z, which is written in place");
  const at::Tensor lse = *checked_row_vector(lse_in, "lse", z, &z);
  const auto entropy = checked_row_vector(entropy_in, "entropy", z, &z);
  const auto g_logprob = checked_row_vector(g_logprob_in, "g_logprob", z, &z);
  const auto g_entropy = checked_row_vector(g_entropy_in, "g_entropy", z, &z);
  const auto g_lse = checked_row_vector(g_lse_in, "g_lse", z, &z);
  const auto g_zmean = checked_row_vector(g_zmean_in, "g_zmean", z, &z);
  TORCH_CHECK(!g_entropy.has_value() || entropy.has_value(),
              "entropy must be given when g_entropy is (the gradient of the entropy needs it)");
  if (z.size(0) == 0) return;
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "logprob_rows_grad_", [&] {
    RowGradParams<scalar_t> p;
    p.z = z.data_ptr<scalar_t>();
    p.targets = targets.data_ptr<int64_t>();
    p.lse = lse.data_ptr<scalar_t>();
    p.entropy = ptr_or_null<scalar_t>(entropy);
    p.g_logprob = ptr_or_null<scalar_t>(g_logprob);
    p.g_entropy = ptr_or_null<scalar_t>(g_entropy);
    p.g_lse = ptr_or_null<scalar_t>(g_lse);
    p.g_zmean = ptr_or_null<scalar_t>(g_zmean);
    set_layout(p, z);
    p.temperature = temperature;
    p.softcap = softcap.value_or(0.0);
    launch(p);
  });
}

}  // namespace alignfast
