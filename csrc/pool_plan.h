// The host-side plan of one multi_pool2d call, and the checks of its
// arguments, shared by the CPU kernels (csrc/cpu/multi_pool2d.cpp), the CUDA
// launchers (csrc/cuda/multi_pool2d.cu, also in the emulated build) and the
// test-only binding pyramid_ext._C._pool_plan (csrc/ops.cpp). Host code only.
//
// Every device runs the same checks with the same messages, and reads the
// segments and the per-level offsets from one WindowPlan; what a device adds
// (the CPU's bin list, CUDA's fixed-size kernel argument) is built from it.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>
#include <vector>

#include "pyramid_index.h"

namespace pyramid_ext {

// Windows, segments and the packed layout of one call (op contract in
// docs/DESIGN.md). Level l has bh[l] x bw[l] bins over the H windows
// [win_h0[l], win_h0[l] + bh[l]) and the W windows [win_w0[l], ...) of the
// bounds lists; in each sample's packed output its block of
// channels * bh[l] * bw[l] values starts at offset[l].
struct WindowPlan {
  AxisSegments h;  // segments of H, and the segment range of every H window
  AxisSegments w;
  std::vector<int64_t> bh, bw;          // bins per level
  std::vector<int64_t> win_h0, win_w0;  // first window of each level
  std::vector<int64_t> first_bin;       // bins of the levels before l
  std::vector<int64_t> offset;          // channels * first_bin[l]
  int64_t channels = 0;
  int64_t total = 0;  // T = sum over levels of bh * bw; a sample holds channels * T values

  int64_t levels() const { return static_cast<int64_t>(bh.size()); }
};

// Checks the window arguments against an (H, W) map and builds the plan.
// `op` prefixes every message ("pyramid_ext::multi_pool2d"). level_bins:
// (bh, bw) pairs, at least one, all positive; h_bounds / w_bounds: a
// [start, end) pair per window of every level with 0 <= start < end <= size.
inline WindowPlan make_window_plan(const char* op, c10::IntArrayRef h_bounds, c10::IntArrayRef w_bounds,
                                   c10::IntArrayRef level_bins, int64_t H, int64_t W, int64_t C) {
  TORCH_CHECK(!level_bins.empty() && level_bins.size() % 2 == 0, op,
              ": level_bins must hold (bh, bw) pairs, at least one, got ", level_bins.size(), " values");
  WindowPlan p;
  p.channels = C;
  int64_t nh = 0, nw = 0;
  for (size_t l = 0; l < level_bins.size(); l += 2) {
    TORCH_CHECK(level_bins[l] > 0 && level_bins[l + 1] > 0, op, ": level_bins must be positive, got (",
                level_bins[l], ", ", level_bins[l + 1], ")");
    p.bh.push_back(level_bins[l]);
    p.bw.push_back(level_bins[l + 1]);
    p.win_h0.push_back(nh);
    p.win_w0.push_back(nw);
    p.first_bin.push_back(p.total);
    p.offset.push_back(C * p.total);
    nh += level_bins[l];
    nw += level_bins[l + 1];
    p.total += level_bins[l] * level_bins[l + 1];
  }
  auto check_axis = [op](c10::IntArrayRef bounds, int64_t windows, int64_t size, const char* name,
                         const char* axis) {
    TORCH_CHECK(static_cast<int64_t>(bounds.size()) == 2 * windows, op, ": ", name, " has ", bounds.size(),
                " values, level_bins needs ", 2 * windows, " (a [start, end) pair per window of every level)");
    for (size_t k = 0; k < bounds.size(); k += 2) {
      TORCH_CHECK(0 <= bounds[k] && bounds[k] < bounds[k + 1] && bounds[k + 1] <= size, op, ": window [",
                  bounds[k], ", ", bounds[k + 1], ") along ", axis, " is empty or outside [0, ", size, ")");
    }
  };
  check_axis(h_bounds, nh, H, "h_bounds", "H");
  check_axis(w_bounds, nw, W, "w_bounds", "W");
  p.h = make_axis_segments(h_bounds.data(), nh, H);
  p.w = make_axis_segments(w_bounds.data(), nw, W);
  return p;
}

inline void check_pool_mode(const char* op, int64_t mode) {
  TORCH_CHECK(mode == kPoolAvg || mode == kPoolMax || mode == kPoolMaxValues, op,
              ": mode must be 0 (avg), 1 (max) or 2 (max, values only), got ", mode);
}

// The backward's modes: a values-only max pooling has no indices to route
// its gradient through.
inline void check_pool_backward_mode(const char* op, int64_t mode) {
  TORCH_CHECK(mode == kPoolAvg || mode == kPoolMax, op, ": mode must be 0 (avg) or 1 (max), got ", mode,
              " (mode 2, max values only, has no backward: use 1)");
}

inline void check_pool_dtype(const char* op, const char* name, const at::Tensor& t) {
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kDouble || st == at::kFloat || st == at::kHalf || st == at::kBFloat16, op, ": ", name,
              " must be float64, float32, float16 or bfloat16, got ", st);
}

// A checked multi_pool2d or multi_pool2d_backward call: x's (or input_shape's)
// sizes, the layout of x (of grad_x for the backward), and the plan.
struct PoolCall {
  int64_t N = 0, C = 0, H = 0, W = 0;
  bool channels_last = false;
  WindowPlan plan;
};

// multi_pool2d(x, h_bounds, w_bounds, level_bins, mode, ...): x 4-D,
// floating, contiguous in NCHW or channels_last memory format (the Python
// layer makes it so), with non-zero H and W. The device check is the caller's.
// check_pool_input: every check but the windows' (call.plan left empty), for
// a caller that takes the plan from a cache of checked plans.
inline PoolCall check_pool_input(const char* op, const at::Tensor& x, int64_t mode) {
  TORCH_CHECK(x.dim() == 4, op, ": x must be 4-D (N, C, H, W), got ", x.dim(), "-D");
  check_pool_dtype(op, "x", x);
  check_pool_mode(op, mode);
  PoolCall call;
  // A tensor contiguous in both formats (C == 1, or H == W == 1) is NCHW.
  call.channels_last = !x.is_contiguous();
  TORCH_CHECK(!call.channels_last || x.is_contiguous(at::MemoryFormat::ChannelsLast), op,
              ": x must be contiguous in NCHW or channels_last memory format");
  call.N = x.size(0);
  call.C = x.size(1);
  call.H = x.size(2);
  call.W = x.size(3);
  TORCH_CHECK(call.H > 0 && call.W > 0, op, ": x must have non-zero height and width, got ", x.sizes());
  return call;
}

inline PoolCall check_multi_pool2d(const char* op, const at::Tensor& x, c10::IntArrayRef h_bounds,
                                   c10::IntArrayRef w_bounds, c10::IntArrayRef level_bins, int64_t mode) {
  PoolCall call = check_pool_input(op, x, mode);
  call.plan = make_window_plan(op, h_bounds, w_bounds, level_bins, call.H, call.W, call.C);
  return call;
}

// multi_pool2d_backward(grad, indices, input_shape, h_bounds, w_bounds,
// level_bins, mode, channels_last_levels, channels_last_input): grad
// floating, shaped (N, C * T); for max, indices int64 shaped like grad on
// grad's device (ignored for avg). The device check is the caller's. As for
// the forward, the checks before the windows' (check_pool_backward_input)
// and after them (check_pool_backward_grad, T from the plan) are also
// callable alone.
inline PoolCall check_pool_backward_input(const char* op, const at::Tensor& grad, c10::IntArrayRef input_shape,
                                          int64_t mode, bool channels_last_input) {
  check_pool_dtype(op, "grad", grad);
  check_pool_backward_mode(op, mode);
  TORCH_CHECK(input_shape.size() == 4, op, ": input_shape must be (N, C, H, W), got ", input_shape);
  PoolCall call;
  call.N = input_shape[0];
  call.C = input_shape[1];
  call.H = input_shape[2];
  call.W = input_shape[3];
  TORCH_CHECK(call.N >= 0 && call.C >= 0 && call.H >= 0 && call.W >= 0, op, ": invalid input_shape ",
              input_shape);
  call.channels_last = channels_last_input;
  return call;
}

inline void check_pool_backward_grad(const char* op, const at::Tensor& grad, const std::optional<at::Tensor>& indices,
                                     int64_t mode, const PoolCall& call, int64_t total) {
  const int64_t packed = call.C * total;
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == call.N && grad.size(1) == packed, op, ": grad must have shape (",
              call.N, ", ", packed, ") = (N, C * total), got ", grad.sizes());
  if (mode == kPoolMax) {
    TORCH_CHECK(indices.has_value() && indices->defined(), op, ": indices are required for max");
    TORCH_CHECK(indices->scalar_type() == at::kLong, op, ": indices must be int64, got ", indices->scalar_type());
    TORCH_CHECK(indices->device() == grad.device(), op, ": indices are on ", indices->device(),
                " but grad is on ", grad.device());
    TORCH_CHECK(indices->sizes() == grad.sizes(), op, ": indices must have grad's shape ", grad.sizes(), ", got ",
                indices->sizes());
  }
}

inline PoolCall check_multi_pool2d_backward(const char* op, const at::Tensor& grad,
                                            const std::optional<at::Tensor>& indices, c10::IntArrayRef input_shape,
                                            c10::IntArrayRef h_bounds, c10::IntArrayRef w_bounds,
                                            c10::IntArrayRef level_bins, int64_t mode, bool channels_last_input) {
  PoolCall call = check_pool_backward_input(op, grad, input_shape, mode, channels_last_input);
  call.plan = make_window_plan(op, h_bounds, w_bounds, level_bins, call.H, call.W, call.C);
  check_pool_backward_grad(op, grad, indices, mode, call, call.plan.total);
  return call;
}

// multi_pool2d_backward's addend: x's shape, grad's dtype and device, any
// strides (read through them; e.g. a channel slice of a bigger gradient).
// Messages as pyramid_ext/_ops.py's check_pool_addend.
inline void check_pool_addend(const char* op, const std::optional<at::Tensor>& addend, const at::Tensor& grad,
                              c10::IntArrayRef input_shape) {
  if (!addend.has_value() || !addend->defined()) return;
  TORCH_CHECK(addend->sizes() == input_shape, op, ": addend must have input_shape ", input_shape, ", got ",
              addend->sizes());
  TORCH_CHECK(addend->scalar_type() == grad.scalar_type(), op, ": addend has dtype ", addend->scalar_type(),
              " but grad has ", grad.scalar_type());
  TORCH_CHECK(addend->device() == grad.device(), op, ": addend is on ", addend->device(), " but grad is on ",
              grad.device());
}

}  // namespace pyramid_ext
