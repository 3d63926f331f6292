#include "cpu/simd_loops.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define PE_MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define PE_MULTIVERSION
#endif

namespace pyramid_ext {
namespace simd {

// Columns are taken kCols at a time with the rows innermost, so the partial
// sums stay in registers (a loop over rows with the sums in memory would be
// bound by store-to-load forwarding latency on short rows).
constexpr int64_t kCols = 64;

template <int64_t kWidth>
inline void sum_cols(float* acc, int64_t acc_stride, const float* src, int64_t rows, int64_t stride) {
  float a[kWidth];
  for (int64_t i = 0; i < kWidth; ++i) a[i] = src[i];
  for (int64_t r = 1; r < rows; ++r) {
    const float* row = src + r * stride;
    for (int64_t i = 0; i < kWidth; ++i) a[i] += row[i];
  }
  for (int64_t i = 0; i < kWidth; ++i) acc[i * acc_stride] = a[i];
}

PE_MULTIVERSION
void sum_rows(float* acc, int64_t acc_stride, const float* src, int64_t rows, int64_t stride, int64_t n) {
  int64_t w0 = 0;
  for (; w0 + kCols <= n; w0 += kCols) sum_cols<kCols>(acc + w0 * acc_stride, acc_stride, src + w0, rows, stride);
  for (; w0 + 16 <= n; w0 += 16) sum_cols<16>(acc + w0 * acc_stride, acc_stride, src + w0, rows, stride);
  for (; w0 + 4 <= n; w0 += 4) sum_cols<4>(acc + w0 * acc_stride, acc_stride, src + w0, rows, stride);
  for (; w0 < n; ++w0) sum_cols<1>(acc + w0 * acc_stride, acc_stride, src + w0, rows, stride);
}

template <int64_t kWidth>
inline void add_cols(float* acc, const float* src, int64_t rows, int64_t stride) {
  float a[kWidth];
  for (int64_t i = 0; i < kWidth; ++i) a[i] = acc[i];
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = src + r * stride;
    for (int64_t i = 0; i < kWidth; ++i) a[i] += row[i];
  }
  for (int64_t i = 0; i < kWidth; ++i) acc[i] = a[i];
}

PE_MULTIVERSION
void add_rows(float* acc, const float* src, int64_t rows, int64_t stride, int64_t n) {
  int64_t i = 0;
  for (; i + kCols <= n; i += kCols) add_cols<kCols>(acc + i, src + i, rows, stride);
  for (; i + 16 <= n; i += 16) add_cols<16>(acc + i, src + i, rows, stride);
  for (; i < n; ++i) add_cols<1>(acc + i, src + i, rows, stride);
}

PE_MULTIVERSION
void add(float* acc, const float* src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) acc[i] += src[i];
}

PE_MULTIVERSION
void max_rows(float* m, int32_t* r, const float* src, int64_t rows, int64_t stride, int64_t n, int32_t h0) {
  for (int64_t w0 = 0; w0 < n; w0 += kCols) {
    const int64_t cols = n - w0 < kCols ? n - w0 : kCols;
    float mv[kCols];
    int32_t rv[kCols];
    for (int64_t i = 0; i < cols; ++i) {
      mv[i] = src[w0 + i];
      rv[i] = h0;
    }
    for (int64_t k = 1; k < rows; ++k) {
      const float* row = src + k * stride + w0;
      const int32_t h = h0 + static_cast<int32_t>(k);
      for (int64_t i = 0; i < cols; ++i) {
        const float v = row[i];
        const bool take = v > mv[i] || v != v;
        mv[i] = take ? v : mv[i];
        rv[i] = take ? h : rv[i];
      }
    }
    for (int64_t i = 0; i < cols; ++i) {
      m[w0 + i] = mv[i];
      r[w0 + i] = rv[i];
    }
  }
}

PE_MULTIVERSION
void blend(float* d, const float* r0, const float* r1, float w0, float w1, int64_t n) {
  for (int64_t i = 0; i < n; ++i) d[i] = w0 * r0[i] + w1 * r1[i];
}

PE_MULTIVERSION
void axpy(float* acc, const float* src, float a, int64_t n) {
  for (int64_t i = 0; i < n; ++i) acc[i] += a * src[i];
}

PE_MULTIVERSION
void bilinear(float* d, const float* p00, const float* p01, const float* p10, const float* p11, float wy0,
              float wy1, float wx0, float wx1, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    d[i] = wy0 * (wx0 * p00[i] + wx1 * p01[i]) + wy1 * (wx0 * p10[i] + wx1 * p11[i]);
}

}  // namespace simd
}  // namespace pyramid_ext
