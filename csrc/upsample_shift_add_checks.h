// The argument checks of upsample_shift_add and upsample_shift_add_backward,
// for the CPU kernel (csrc/cpu/upsample_shift_add.cpp) and the CUDA launchers
// (csrc/cuda/upsample_shift_add.cu, also in the emulated build): one rule and
// one message for each error on every device, each naming the argument
// (base, taps[i], kernel_size, grad, tap_shapes, channels_last); ValueError,
// or TypeError for a dtype, as the Python backends raise. Host code
// only. Whether base (or grad) is on the kernel's device is the caller's
// check; the taps must be on base's device.
#pragma once

#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <string>

#include "upsample_concat_checks.h"  // is_pyramid_float

namespace pyramid_ext {

// Python's names of the dtypes, so the messages read as the Python backends'
// (pyramid_ext/_ops.py, check_shift_add_args).
inline std::string shift_add_dtype_name(at::ScalarType st) {
  switch (st) {
    case at::kDouble: return "torch.float64";
    case at::kFloat: return "torch.float32";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kInt: return "torch.int32";
    case at::kLong: return "torch.int64";
    default: return std::string("torch.") + c10::toString(st);
  }
}

// A tensor's shape as Python prints it: (2, 3, 5, 4).
inline std::string shift_add_shape(const at::Tensor& t) {
  std::string s = "(";
  for (int64_t d = 0; d < t.dim(); ++d) s += (d ? ", " : "") + std::to_string(t.size(d));
  return s + (t.dim() == 1 ? ",)" : ")");
}

inline void check_shift_add_kernel_size(const char* op, int64_t kernel_size) {
  TORCH_CHECK_VALUE(kernel_size > 0 && kernel_size % 2 == 1, op, ": kernel_size must be odd and positive, got ",
                    kernel_size);
}

// base (N, Cout, H, W): float64/32/16/bf16, non-zero H and W. taps[i]
// (N, K*K*Cout, h_i, w_i): base's batch size, dtype and device, non-zero
// h_i and w_i. Strides are free (the CUDA kernels read through them). The
// rules, their order, words and exception types (ValueError, TypeError for
// dtypes) are those of the Python backends' check (_ops.check_shift_add_args).
inline void check_upsample_shift_add(const char* op, const at::Tensor& base, at::TensorList taps,
                                     int64_t kernel_size) {
  TORCH_CHECK_VALUE(base.defined(), op, ": base is undefined");
  TORCH_CHECK_VALUE(base.dim() == 4, op, ": base must be a 4-D (N, Cout, H, W) tensor, got shape ",
                    shift_add_shape(base));
  TORCH_CHECK_TYPE(is_pyramid_float(base.scalar_type()), op,
                   ": base must be float64, float32, float16 or bfloat16, got ",
                   shift_add_dtype_name(base.scalar_type()));
  TORCH_CHECK_VALUE(base.size(2) > 0 && base.size(3) > 0, op,
                    ": base must have non-zero height and width, got shape ", shift_add_shape(base));
  check_shift_add_kernel_size(op, kernel_size);
  const int64_t channels = kernel_size * kernel_size * base.size(1);
  for (size_t i = 0; i < taps.size(); ++i) {
    const at::Tensor& t = taps[i];
    TORCH_CHECK_VALUE(t.defined(), op, ": taps[", i, "] is undefined");
    TORCH_CHECK_VALUE(t.dim() == 4, op, ": taps[", i, "] must be a 4-D (N, K*K*Cout, h, w) tensor, got shape ",
                      shift_add_shape(t));
    TORCH_CHECK_VALUE(t.size(0) == base.size(0), op, ": taps[", i, "] has batch size ", t.size(0),
                      " but base has ", base.size(0));
    TORCH_CHECK_VALUE(t.size(1) == channels, op, ": taps[", i, "] has ", t.size(1),
                      " channels, expected kernel_size^2 * base channels = ", channels);
    TORCH_CHECK_VALUE(t.size(2) > 0 && t.size(3) > 0, op, ": taps[", i,
                      "] must have non-zero height and width, got shape ", shift_add_shape(t));
    TORCH_CHECK_TYPE(t.scalar_type() == base.scalar_type(), op, ": taps[", i, "] has dtype ",
                     shift_add_dtype_name(t.scalar_type()), " but base has ",
                     shift_add_dtype_name(base.scalar_type()));
    TORCH_CHECK_VALUE(t.device() == base.device(), op, ": taps[", i, "] is on ", t.device(), " but base is on ",
                      base.device());
  }
}

// grad (N, Cout, H, W): float64/32/16/bf16, non-zero H and W; tap_shapes a
// flat (h_i, w_i) per tap tensor, each positive; one channels_last flag per
// tap tensor.
inline void check_upsample_shift_add_backward(const char* op, const at::Tensor& grad, c10::IntArrayRef tap_shapes,
                                              int64_t kernel_size, const c10::List<bool>& channels_last) {
  TORCH_CHECK_VALUE(grad.defined(), op, ": grad is undefined");
  TORCH_CHECK_VALUE(grad.dim() == 4, op, ": grad must be a 4-D (N, Cout, H, W) tensor, got shape ",
                    shift_add_shape(grad));
  TORCH_CHECK_TYPE(is_pyramid_float(grad.scalar_type()), op,
                   ": grad must be float64, float32, float16 or bfloat16, got ",
                   shift_add_dtype_name(grad.scalar_type()));
  TORCH_CHECK_VALUE(grad.size(2) > 0 && grad.size(3) > 0, op,
                    ": grad must have non-zero height and width, got shape ", shift_add_shape(grad));
  check_shift_add_kernel_size(op, kernel_size);
  TORCH_CHECK_VALUE(tap_shapes.size() % 2 == 0, op, ": tap_shapes must hold (h, w) pairs, got ",
                    tap_shapes.size(), " values");
  const size_t ntaps = tap_shapes.size() / 2;
  TORCH_CHECK_VALUE(channels_last.size() == ntaps, op, ": channels_last must hold one flag per tap tensor (",
                    ntaps, "), got ", channels_last.size());
  for (size_t i = 0; i < ntaps; ++i) {
    TORCH_CHECK_VALUE(tap_shapes[2 * i] > 0 && tap_shapes[2 * i + 1] > 0, op, ": tap_shapes[", i,
                      "] must be a positive (h, w), got (", tap_shapes[2 * i], ", ", tap_shapes[2 * i + 1], ")");
  }
}

}  // namespace pyramid_ext
