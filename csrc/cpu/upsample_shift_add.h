// upsample_shift_add's CPU forward written into its base (the op returns a new
// tensor): upsample_concat_conv2d's eager fast path (csrc/uc_conv_fast.cpp)
// adds the resized tap products into the product of x it has just written,
// without autograd, instead of reading it and writing a second output.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

namespace pyramid_ext::cpu {

// base += the op's sum (the op's arithmetic and order, so the op's bits).
// base: a dense CPU tensor no tap overlaps; the op's argument checks.
void upsample_shift_add_in_place(const at::Tensor& base, const std::vector<at::Tensor>& taps, int64_t kernel_size,
                                 bool align_corners);

}  // namespace pyramid_ext::cpu
