// Float max-pooling kernels of multi_pool2d on CPU: max_pool_nchw.cpp (the
// AVX2 block kernel for NCHW planes), max_pool.cpp (channels_last forward,
// both backwards; vector loops from simd_loops). multi_pool2d.cpp dispatches
// to them and keeps the portable loops for other dtypes.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "pyramid_index.h"

namespace pyramid_ext {

// multi_pool2d_backward's optional addend, read through its strides; the
// result is addend + the pooling gradient (rounded to scalar_t first, so it
// equals `addend + multi_pool2d_backward(...)` bit for bit). Used by
// multi_pool2d.cpp's kernels and the float max kernels alike.
template <typename scalar_t>
struct Addend {
  const scalar_t* data = nullptr;  // null: no addend
  int64_t sn = 0, sc = 0, sh = 0, sw = 0;

  // d[w] = addend[n, c, h, w] + g[w] for w < W (g may be d): a row of an
  // NCHW result, written once.
  void add_row(scalar_t* d, const scalar_t* g, int64_t n, int64_t c, int64_t h, int64_t W) const {
    add_run(d, g, data + n * sn + c * sc + h * sh, sw, W);
  }
  // d[c] = addend[n, c, h, w] + g[c] for c < C (g may be d): a pixel of a
  // channels_last result.
  void add_pixel(scalar_t* d, const scalar_t* g, int64_t n, int64_t h, int64_t w, int64_t C) const {
    add_run(d, g, data + n * sn + h * sh + w * sw, sc, C);
  }

 private:
  static void add_run(scalar_t* d, const scalar_t* g, const scalar_t* s, int64_t stride, int64_t len) {
    if (stride == 1) {
#pragma omp simd
      for (int64_t k = 0; k < len; ++k) d[k] = s[k] + g[k];
    } else {
      for (int64_t k = 0; k < len; ++k) d[k] = s[k * stride] + g[k];
    }
  }
};

namespace max_pool {

// What the max kernels read of one call's window plan (multi_pool2d.cpp's
// PoolPlan): the segment tables and, per level, its bins, its first window
// along each axis and its offset in a sample of the packed output.
struct Levels {
  const AxisSegments& h;
  const AxisSegments& w;
  const std::vector<int64_t>& bh;
  const std::vector<int64_t>& bw;
  const std::vector<int64_t>& win_h0;
  const std::vector<int64_t>& win_w0;
  const std::vector<int64_t>& offset;
  int64_t channels;
  int64_t total;  // bins per channel, all levels
  bool channels_last_levels;
};

// One bin as a rectangle of cells (H-segments [a0, a1), W-segments [b0,
// b1)), and where its channel 0 goes in a sample of the packed output, with
// the step per channel. bin_rects: every bin, in packed order.
struct BinRect {
  int64_t a0, a1, b0, b1, out_offset, c_stride;
};
std::vector<BinRect> bin_rects(const Levels& lv);

// One plan's bins as the channels_last kernels and the backwards read them
// (bin_rects and phase 2's steps, max_pool.cpp), built once per plan:
// multi_pool2d.cpp keeps them with its cached plan (rebuilt per call, with
// the plan, they made a (1, 8, 8, 8) channels_last call 14 instead of 9 us).
struct Bins;
std::shared_ptr<const Bins> make_bins(const Levels& lv);

// Whether forward_nchw_blocks serves (N, C, H, W) float input here: an AVX2
// CPU, the block kernels not switched off by a test (test_overrides:
// no_block_kernel, simd_isa=baseline), and flat indices h * W + w that fit
// in int32.
bool nchw_blocks_available(int64_t H, int64_t W);

// Max pooling of NCHW float planes, values and int64 flat indices in the
// packed layout. Groups of 32 planes, each reduced as four blocks of 8: per
// plane the column maxima of each H-segment and their rows (ATen's scan
// rule), then 8 columns of the 8 planes transposed so that each column is a
// vector over planes and combined into its W-segment cell, then cells into
// bins, 32 planes at a time. Only call when nchw_blocks_available(H, W).
void forward_nchw_blocks(const float* x, float* out, int64_t* out_idx, const Levels& lv, int64_t N,
                         int64_t H, int64_t W);

// Flat indices h * W + w are kept as int32 in the kernels below.
bool fits_int32_index(int64_t H, int64_t W);

// Max pooling of channels_last float input (only where fits_int32_index).
// Phase 1 scans one H-segment's rows of a sample into its row of cells
// ([cell][channel] maxima and flat indices; ATen's rule, pixels of a cell in
// row-major order, whole pixels read contiguously); phase 2 combines each
// bin's cells, vector over channels. One task per sample runs both when the
// samples share evenly among the threads (or there are at least four per
// thread), else phase 1 is split over (sample, H-segment) and phase 2 over
// (sample, channel chunk); test_overrides: channels_last_max_tasks (which
// also picks the backward's split). With indices, per-sample tasks scan
// the bins phase 2 would build from cells straight from their windows'
// pixels instead where that reads few pixels again (max_pool.cpp,
// Bins::direct; test_overrides: channels_last_max_direct). out_idx null:
// values only (mode kPoolMaxValues): the cells hold maxima alone, and a
// sample where a bin's value depends on positions (NaN, or zero beside a
// -0.0) is computed again with indices, so the values are the indexed
// forward's bit for bit.
void forward_channels_last(const float* x, float* out, int64_t* out_idx, const Levels& lv, const Bins& bins,
                           int64_t N, int64_t H, int64_t W);

// Gradient of max pooling, float, NCHW or channels_last grad_x: each bin's
// gradient added to the element its index names, per element in level-then-
// bin order (the order of the portable loop), then the addend, if any, added
// to it (addend + that rounded sum, as `addend + backward` would give).
// NCHW: one plane per step, zeroed, added to, the addend's plane added.
// channels_last: one sample per task, zeroed, added to, the addend's sample
// added; or
// (the split of channels_last_max_tasks) zeroed in blocks of rows, added to
// in chunks of channels, the addend added by rows. stream (gx is
// output_buffers::streamed in planes (NCHW) or rows of pixels (channels_last)):
// each plane or block of rows (channels_last: samples of 4 MiB and more, the
// contributions sorted by row first, in their order) is built in an L1/L2
// buffer and written out with streaming stores. No two tasks write one
// element, so the result does not depend on the thread count; every path adds
// in the same order.
void backward(const float* grad, const int64_t* indices, float* gx, const Levels& lv, const Bins& bins, int64_t N,
              int64_t H, int64_t W, bool channels_last, const Addend<float>& add, bool stream);

}  // namespace max_pool
}  // namespace pyramid_ext
