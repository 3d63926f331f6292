// A 1x1 convolution of a small float32 map as one product over its pixels,
// with the branch tail's epilogue (bias, eval BatchNorm, ReLU) applied in
// registers: branch_tails.cpp's pointwise tails without autograd (a PPM's
// branch tails on the pooled maps, upsample_concat_conv2d's tap products).
//
// Why our own: these products are small (16 samples x 50 pooled pixels x
// 256 -> 64 channels), and MKL's sgemm, called per branch and per piece,
// paid 2-3x its time when its code and buffers had left the cache (the
// tails right after the pooling, the tap products after the eager code a
// benchmark runs between calls): (16, 64, b, b), b = 1, 2, 3, 6, to 64
// channels, NCHW, two threads, 107 us in a loop, 305 after the eager
// upsample_concat_conv2d. A register-blocked kernel reads the weight once
// per block of rows and writes the result once, in the result's layout (no
// rows copied in or out, no BatchNorm or ReLU pass).
//
// Numbers: each output is fma(x[ci], w[ci], acc) over ci = 0, 1, ... in
// order from 0, then + bias, then * scale + shift (BatchNorm), then the
// ReLU, so the value does not depend on how the rows are cut among threads,
// and the AVX2 and AVX-512 copies agree bit for bit. The bound is that of
// any float32 dot product of cin terms (the convolution's: another order).
// A CPU without AVX2 and FMA (or the simd_isa test switch set to baseline)
// has no copy: the callers keep ATen's product there.
#pragma once

#include <cstdint>

#include "cpu/scratch.h"

namespace pyramid_ext::cpu::pointwise_product {

// Where the elements of an (N, C, H, W) map lie (element strides).
struct Layout {
  int64_t h, w;            // pixels per sample: h * w, enumerated row by row
  int64_t sn, sc, sh, sw;  // strides of sample, channel, row, column
};

// The weight (cout, cin) transposed in blocks of kBlock output channels
// (cout rounded up to whole blocks, zeros after cout): block k is cin rows
// of kBlock floats, contiguous, so a block's rows stay in cache while the
// pixels pass (rows of the whole cout, kBlock floats read from every 4 * cout
// bytes, had fallen into few cache sets: 2048 -> 512 channels ran 3x slower
// than MKL). The epilogue's per-channel terms, cout_pad floats each (null
// where absent).
constexpr int64_t kBlock = 64;
struct Plan {
  int64_t cin = 0, cout = 0, cout_pad = 0;
  const float* weight = nullptr;  // the caller's (cout, cin), for planes (below); alive while run runs
  int64_t w_row = 0, w_col = 0;
  Scratch<float> wt;            // (null: a plan without rows) wt[(co / kBlock * cin + ci) * kBlock + co % kBlock] = weight[co][ci]
  Scratch<float> bias;          // added to the product
  Scratch<float> scale, shift;  // eval BatchNorm: y * scale + shift
  bool relu = false;
};

// Whether the running copy of the loops has the kernel: AVX-512, or AVX2
// with FMA (the simd_isa test switch respected: baseline has none).
bool available();

// The plan for a weight given as cout rows of cin floats, row_stride and
// col_stride apart; bias (or null); BatchNorm's weight, bias, running mean
// and variance (each or all null: no BatchNorm; weight / bias null alone
// mean 1 / 0) and eps; relu. rows: whether run may take rows of pixels
// (needs wt); false where every call's maps are planar (below: run_planes
// reads the caller's weight, so the transposition would be work for nothing).
Plan make_plan(const float* weight, int64_t cout, int64_t cin, int64_t row_stride, int64_t col_stride,
               const float* bias, const float* bn_weight, const float* bn_bias, const float* bn_mean,
               const float* bn_var, double bn_eps, bool relu, bool rows);

// Output pixels [p0, p1) of the n * h * w pixels (sample by sample, row by
// row): dst(pixel, co) = epilogue(sum_ci src(pixel, ci) * weight[co][ci]).
// src has plan.cin channels, dst plan.cout. The same h and w in both.
// Where src and dst are planar (NCHW-like: each channel's h * w pixels
// contiguous), h * w and p0, p1 multiples of kPlaneUnit, the kernel runs
// along the planes instead: 6 output channels x 64 pixels a block (6 x 16
// on AVX2), the weight broadcast from the caller's layout (no
// transposition), whole vectors of pixels loaded and stored; the same sums
// in the same order, so the same bits as the rows.
constexpr int64_t kPlaneUnit = 16;
bool planar(const Layout& l);
void run(const Plan& plan, const float* src, const Layout& src_layout, float* dst, const Layout& dst_layout,
         int64_t p0, int64_t p1);

}  // namespace pyramid_ext::cpu::pointwise_product
