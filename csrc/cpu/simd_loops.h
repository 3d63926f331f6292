// Hot inner loops of the CPU kernels for float, compiled for several
// instruction sets (AVX-512, AVX2, baseline) and picked at run time from the
// CPU's features (simd_loops.cpp), so a source build runs at the width the
// machine has without -march flags. Other dtypes use the generic loops in
// the kernels.
#pragma once

#include <cstdint>

namespace pyramid_ext {
namespace simd {

// The instruction sets the loops are compiled for (values of the test-only
// switch test_overrides::kSimdIsa; 0 there means "the best available").
enum class Isa : int64_t { kBaseline = 1, kAvx2 = 2, kAvx512 = 3 };
bool isa_available(Isa isa);
// The ISA the loops run now (the best available, unless a test forced one).
Isa active_isa();

// acc[w * acc_stride] = sum over r < rows of src[r * stride + w], for w < n.
void sum_rows(float* acc, int64_t acc_stride, const float* src, int64_t rows, int64_t stride, int64_t n);
// acc[i] = (((acc[i] + src[i]) + src[stride + i]) + ...) over `rows` rows,
// for i < n: rows added in order, four at a time (one pass over acc per four
// rows, each row read front to back).
void add_rows(float* acc, const float* src, int64_t rows, int64_t stride, int64_t n);
// acc[i] += src[i]
void add(float* acc, const float* src, int64_t n);
// One bin's means over a vector of n channels: dst[k * dst_stride] = (sum
// over a0 <= a < a1, b0 <= b < b1 of cells[a * row_stride + b * cell_stride
// + k]) / area, summed a-major in registers.
void rect_means(float* dst, int64_t dst_stride, const float* cells, int64_t row_stride, int64_t cell_stride,
                int64_t a0, int64_t a1, int64_t b0, int64_t b1, float area, int64_t n);
// Column-wise running max over rows, ATen's rule (larger, or NaN): m/r hold
// the current maximum and its row; rows h0 + 1 .. h0 + rows - 1 are scanned
// after m is seeded with row h0.
void max_rows(float* m, int32_t* r, const float* src, int64_t rows, int64_t stride, int64_t n, int32_t h0);
// d[i] = w0 * r0[i] + w1 * r1[i]
void blend(float* d, const float* r0, const float* r1, float w0, float w1, int64_t n);
// acc[i] += a * src[i]
void axpy(float* acc, const float* src, float a, int64_t n);
// d[i] = wy0 * (wx0 * p00[i] + wx1 * p01[i]) + wy1 * (wx0 * p10[i] + wx1 * p11[i])
void bilinear(float* d, const float* p00, const float* p01, const float* p10, const float* p11, float wy0,
              float wy1, float wx0, float wx1, int64_t n);
// Max pooling over a vector of n channels, continuing a scan: pixel p < pixels
// (at src + p * stride) updates m[k] and its flat index r[k] = idx0 + p by
// ATen's rule (larger, or NaN), pixels in order.
void max_pixels(float* m, int32_t* r, const float* src, int64_t pixels, int64_t stride, int64_t n, int32_t idx0);
// One bin's maxima over a vector of n channels: the cells a0 <= a < a1,
// b0 <= b < b1 (values cells_v, flat indices cells_i at a * row_stride + b *
// cell_stride + k) combined by max_pool_combine's rule; dst[k * dst_stride]
// and dst_idx[k * dst_stride] receive value and index.
void max_rect(float* dst, int64_t* dst_idx, int64_t dst_stride, const float* cells_v, const int32_t* cells_i,
              int64_t row_stride, int64_t cell_stride, int64_t a0, int64_t a1, int64_t b0, int64_t b1, int64_t n);

}  // namespace simd
}  // namespace pyramid_ext
