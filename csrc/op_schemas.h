// The op schemas, declared once: by csrc/ops.cpp for torch.ops.pyramid_ext
// and by the CUDA emulator's test module (csrc/cuda_emu/module.cpp) for
// torch.ops.pyramid_ext_emu, so both namespaces hold the very same ops.
#pragma once

#include <torch/library.h>

namespace pyramid_ext {

inline void define_ops(torch::Library& m) {
  // Pools x (N, C, H, W) over every window of every level in one pass.
  // h_bounds / w_bounds: flat [start, end) pairs of every level's windows
  // along H / W; level_bins: flat (bh, bw) per level; mode: 0 avg, 1 max.
  // Returns the packed values (N, C * sum(bh * bw)), level after level, each
  // level channel-major or, with channels_last_levels, (bh, bw, C); and for
  // max the matching int64 flat indices (h * W + w), else an empty tensor.
  m.def(
      "multi_pool2d(Tensor x, SymInt[] h_bounds, SymInt[] w_bounds, "
      "int[] level_bins, int mode, bool channels_last_levels) "
      "-> (Tensor, Tensor)");
  // Gradient of multi_pool2d with respect to x: (N, C, H, W), channels_last
  // when channels_last_input. `indices` is required for max, ignored for avg.
  // `addend` (x's shape, any strides, e.g. a channel slice of a bigger
  // gradient): the result is addend + that gradient, written in one pass.
  m.def(
      "multi_pool2d_backward(Tensor grad, Tensor? indices, SymInt[] "
      "input_shape, SymInt[] h_bounds, SymInt[] w_bounds, int[] level_bins, "
      "int mode, bool channels_last_levels, bool channels_last_input, "
      "Tensor? addend=None) -> Tensor");
  // Bilinearly resizes each branch to `size` and writes it, with x, into one
  // concatenated (N, C_x + sum C_k, H, W) output: x first (or last when not
  // x_first), branches in order. All tensors share one dtype and device.
  m.def(
      "upsample_concat(Tensor? x, Tensor[] branches, SymInt[] size, "
      "bool align_corners, bool x_first, bool channels_last) -> Tensor");
  // Same, written into a caller's `out` through its strides.
  m.def(
      "upsample_concat_out(Tensor? x, Tensor[] branches, bool align_corners, "
      "bool x_first, Tensor(a!) out) -> ()");
  // Gradients of the branches, from grad_out's channels [channel_offset,
  // channel_offset + sum C_k). branch_shapes: flat (C_k, h_k, w_k) per
  // branch. Results are channels_last when channels_last.
  m.def(
      "upsample_concat_backward(Tensor grad_out, SymInt[] branch_shapes, "
      "SymInt channel_offset, bool align_corners, bool channels_last) "
      "-> Tensor[]");
  // base + every tap product of `taps` bilinearly resized to base's (H, W),
  // shifted by its kernel tap and added (zero padding, as a stride-1 conv
  // pads): result[n, o, y, x] = base[n, o, y, x] + sum_i sum_{a, c}
  // [in bounds] bilinear(taps[i][n, (a * K + c) * Cout + o], y + a - K / 2,
  // x + c - K / 2). taps[i]: (N, K * K * Cout, h_i, w_i), any h_i, w_i >= 1.
  // The result has base's shape, dtype and memory format.
  m.def(
      "upsample_shift_add(Tensor base, Tensor[] taps, int kernel_size, "
      "bool align_corners) -> Tensor");
  // Gradients of the taps (the gradient of base is grad itself). tap_shapes:
  // flat (h_i, w_i) per tap tensor; grad_taps[i] is channels_last when
  // channels_last[i].
  m.def(
      "upsample_shift_add_backward(Tensor grad, SymInt[] tap_shapes, "
      "int kernel_size, bool align_corners, bool[] channels_last) -> Tensor[]");
}

}  // namespace pyramid_ext
