#include "cpu/simd_loops.h"

#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define PE_MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define PE_MULTIVERSION
#endif
// Helpers of the multiversioned loops: always inlined, so each clone
// compiles them for its own instruction set.
#define PE_INLINE inline __attribute__((always_inline))

namespace pyramid_ext {
namespace simd {

// Columns are taken kCols at a time with the rows innermost, so the partial
// sums stay in registers (a loop over rows with the sums in memory would be
// bound by store-to-load forwarding latency on short rows).
constexpr int64_t kCols = 64;

template <int64_t kWidth>
PE_INLINE void sum_cols(float* acc, int64_t acc_stride, const float* src, int64_t rows, int64_t stride) {
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

PE_MULTIVERSION
void add_rows(float* __restrict acc, const float* __restrict src, int64_t rows, int64_t stride,
              int64_t n) {
  for (; rows >= 4; rows -= 4, src += 4 * stride) {
    const float *s0 = src, *s1 = src + stride, *s2 = src + 2 * stride, *s3 = src + 3 * stride;
    for (int64_t i = 0; i < n; ++i) acc[i] = acc[i] + s0[i] + s1[i] + s2[i] + s3[i];
  }
  if (rows == 3) {
    const float *s0 = src, *s1 = src + stride, *s2 = src + 2 * stride;
    for (int64_t i = 0; i < n; ++i) acc[i] = acc[i] + s0[i] + s1[i] + s2[i];
  } else if (rows == 2) {
    const float *s0 = src, *s1 = src + stride;
    for (int64_t i = 0; i < n; ++i) acc[i] = acc[i] + s0[i] + s1[i];
  } else if (rows == 1) {
    for (int64_t i = 0; i < n; ++i) acc[i] += src[i];
  }
}

PE_MULTIVERSION
void add(float* acc, const float* src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) acc[i] += src[i];
}

// 16 floats as one value (lowered to the target's vector width).
typedef float v16 __attribute__((vector_size(64)));

// s += p[0..16) (by reference: returning a vector type by value changes the ABI per target).
PE_INLINE void add16(v16& s, const float* p) {
  v16 v;
  std::memcpy(&v, p, sizeof(v));
  s += v;
}

template <int kVecs>
PE_INLINE void rect_means_cols(float* dst, int64_t dst_stride, const float* cells, int64_t row_stride,
                            int64_t cell_stride, int64_t a0, int64_t a1, int64_t b0, int64_t b1, float area) {
  v16 s[kVecs] = {};
  for (int64_t a = a0; a < a1; ++a)
    for (int64_t b = b0; b < b1; ++b) {
      const float* c = cells + a * row_stride + b * cell_stride;
      for (int v = 0; v < kVecs; ++v) add16(s[v], c + 16 * v);
    }
  for (int v = 0; v < kVecs; ++v) {
    const v16 m = s[v] / area;
    if (dst_stride == 1) {
      std::memcpy(dst + 16 * v, &m, sizeof(m));
    } else {
      for (int i = 0; i < 16; ++i) dst[(16 * v + i) * dst_stride] = m[i];
    }
  }
}

PE_MULTIVERSION
void rect_means(float* dst, int64_t dst_stride, const float* cells, int64_t row_stride, int64_t cell_stride,
                int64_t a0, int64_t a1, int64_t b0, int64_t b1, float area, int64_t n) {
  int64_t k = 0;
  for (; k + 64 <= n; k += 64)  // four independent sums hide the add latency
    rect_means_cols<4>(dst + k * dst_stride, dst_stride, cells + k, row_stride, cell_stride, a0, a1, b0, b1, area);
  for (; k + 16 <= n; k += 16)
    rect_means_cols<1>(dst + k * dst_stride, dst_stride, cells + k, row_stride, cell_stride, a0, a1, b0, b1, area);
  for (; k < n; ++k) {
    float s = 0;
    for (int64_t a = a0; a < a1; ++a)
      for (int64_t b = b0; b < b1; ++b) s += cells[a * row_stride + b * cell_stride + k];
    dst[k * dst_stride] = s / area;
  }
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
