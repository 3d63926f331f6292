// The argument checks of upsample_shift_add and its backward, for the CPU
// kernels (csrc/cpu/upsample_shift_add.cpp) and the CUDA launchers: one rule
// and one message per error on every device, each naming the argument
// (base, taps[i], kernel_size, grad, tap_shapes, channels_last), with the
// exception classes of the Python backends (pyramid_ext/_ops.py,
// check_shift_add_args): ValueError for shapes and values, TypeError for
// dtypes. Host code only; the device of base is the caller's check.
#pragma once

#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <cstdint>

namespace pyramid_ext {

inline void check_shift_add_kernel_size(const char* op, int64_t kernel_size) {
  TORCH_CHECK_VALUE(kernel_size > 0 && kernel_size % 2 == 1, op, ": kernel_size must be odd and positive, got ",
                    kernel_size);
}

inline void check_upsample_shift_add(const char* op, const at::Tensor& base, at::TensorList taps,
                                     int64_t kernel_size) {
  TORCH_CHECK_VALUE(base.dim() == 4, op, ": base must be a 4-D (N, Cout, H, W) tensor, got shape ", base.sizes());
  const auto st = base.scalar_type();
  TORCH_CHECK_TYPE(st == at::kDouble || st == at::kFloat || st == at::kHalf || st == at::kBFloat16, op,
                   ": base must be float64, float32, float16 or bfloat16, got ", st);
  TORCH_CHECK_VALUE(base.size(2) > 0 && base.size(3) > 0, op,
                    ": base must have non-zero height and width, got shape ", base.sizes());
  check_shift_add_kernel_size(op, kernel_size);
  const int64_t channels = kernel_size * kernel_size * base.size(1);
  for (size_t i = 0; i < taps.size(); ++i) {
    const at::Tensor& t = taps[i];
    TORCH_CHECK_VALUE(t.dim() == 4, op, ": taps[", i, "] must be a 4-D (N, K*K*Cout, h, w) tensor, got shape ",
                      t.sizes());
    TORCH_CHECK_VALUE(t.size(0) == base.size(0), op, ": taps[", i, "] has batch size ", t.size(0),
                      " but base has ", base.size(0));
    TORCH_CHECK_VALUE(t.size(1) == channels, op, ": taps[", i, "] has ", t.size(1),
                      " channels, expected kernel_size^2 * base channels = ", channels);
    TORCH_CHECK_VALUE(t.size(2) > 0 && t.size(3) > 0, op, ": taps[", i,
                      "] must have non-zero height and width, got shape ", t.sizes());
    TORCH_CHECK_TYPE(t.scalar_type() == st, op, ": taps[", i, "] has dtype ", t.scalar_type(), " but base has ",
                     st);
    TORCH_CHECK_VALUE(t.device() == base.device(), op, ": taps[", i, "] is on ", t.device(), " but base is on ",
                      base.device());
  }
}

inline void check_upsample_shift_add_backward(const char* op, const at::Tensor& grad, c10::IntArrayRef tap_shapes,
                                              int64_t kernel_size, const c10::List<bool>& channels_last) {
  TORCH_CHECK_VALUE(grad.dim() == 4, op, ": grad must be a 4-D (N, Cout, H, W) tensor, got shape ", grad.sizes());
  const auto st = grad.scalar_type();
  TORCH_CHECK_TYPE(st == at::kDouble || st == at::kFloat || st == at::kHalf || st == at::kBFloat16, op,
                   ": grad must be float64, float32, float16 or bfloat16, got ", st);
  TORCH_CHECK_VALUE(grad.size(2) > 0 && grad.size(3) > 0, op,
                    ": grad must have non-zero height and width, got shape ", grad.sizes());
  check_shift_add_kernel_size(op, kernel_size);
  TORCH_CHECK_VALUE(tap_shapes.size() % 2 == 0, op, ": tap_shapes must hold (h, w) pairs, got ",
                    tap_shapes.size(), " values");
  TORCH_CHECK_VALUE(channels_last.size() * 2 == tap_shapes.size(), op, ": channels_last must have one entry per "
                    "tap tensor (", tap_shapes.size() / 2, "), got ", channels_last.size());
  for (size_t k = 0; k < tap_shapes.size(); ++k) {
    TORCH_CHECK_VALUE(tap_shapes[k] > 0, op, ": tap_shapes must be positive, got ", tap_shapes);
  }
}

}  // namespace pyramid_ext
