// Segment-cell sums of a block of 8 NCHW float planes, with AVX2 (x86-64).
//
// Average pooling of NCHW planes reduces each H-segment's rows (vector over
// W), then each W-segment's columns. The second step wants vectors over
// planes, so the row sums of 8 planes are transposed 8x8 in registers
// (instead of being stored transposed one float at a time, which bound the
// portable loop) and the columns of each W-segment are summed as vectors of
// 8 planes. Summation order per cell: rows top to bottom, then columns left
// to right, the same as the portable loops in multi_pool2d.cpp.
#include "cpu/block_cells.h"

#include <algorithm>

#include "cpu/avx2_tile.h"
#include "cpu/simd_loops.h"
#include "cpu/test_overrides.h"

namespace pyramid_ext {
namespace simd {

#if PE_HAVE_AVX2_PATH

namespace {

using avx2::tail_mask;
using avx2::transpose8;

#define PE_AVX2 __attribute__((target("avx2")))

// NV vectors of 8 columns summed over `rows` rows of stride W, the partial
// sums in registers; with kTail the last vector holds the row's last
// columns (mask m) and its padding lanes come out zero. Each row read is
// also prefetched `ahead` floats further on (the next block's planes), so
// memory works while this block's cells and bins are computed.
template <int NV, bool kTail>
PE_AVX2 inline void sum_cols(float* dst, const float* src, int64_t rows, int64_t W, __m256i m,
                             int64_t ahead) {
  __m256 a[NV];
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) a[v] = _mm256_setzero_ps();
  for (int64_t r = 0; r < rows; ++r, src += W) {
#pragma GCC unroll 8
    for (int v = 0; v < NV; v += 2) _mm_prefetch(reinterpret_cast<const char*>(src + ahead + 8 * v), _MM_HINT_T1);
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v)
      a[v] = _mm256_add_ps(a[v], (kTail && v == NV - 1) ? _mm256_maskload_ps(src + 8 * v, m)
                                                        : _mm256_loadu_ps(src + 8 * v));
  }
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) _mm256_storeu_ps(dst + 8 * v, a[v]);
}

template <bool kTail>
PE_AVX2 void sum_cols_n(int nv, float* dst, const float* src, int64_t rows, int64_t W, __m256i m,
                        int64_t ahead) {
  switch (nv) {
    case 1: return sum_cols<1, kTail>(dst, src, rows, W, m, ahead);
    case 2: return sum_cols<2, kTail>(dst, src, rows, W, m, ahead);
    case 3: return sum_cols<3, kTail>(dst, src, rows, W, m, ahead);
    case 4: return sum_cols<4, kTail>(dst, src, rows, W, m, ahead);
    case 5: return sum_cols<5, kTail>(dst, src, rows, W, m, ahead);
    case 6: return sum_cols<6, kTail>(dst, src, rows, W, m, ahead);
    case 7: return sum_cols<7, kTail>(dst, src, rows, W, m, ahead);
    default: return sum_cols<8, kTail>(dst, src, rows, W, m, ahead);
  }
}

// dst[w] = sum over r < rows of src[r * W + w] for w < W; dst is padded to a
// multiple of 8 with zeros. Up to 64 columns at a time, so rows up to 64
// wide are read front to back (one stream for the prefetcher).
PE_AVX2 void sum_rows(float* dst, const float* src, int64_t rows, int64_t W, int64_t ahead) {
  const int64_t full = W / 8, tail = W % 8;
  const __m256i m = tail_mask(tail);
  int64_t v = 0;
  for (; v + 8 <= full; v += 8) sum_cols<8, false>(dst + 8 * v, src + 8 * v, rows, W, m, ahead);
  if (tail) {
    sum_cols_n<true>(static_cast<int>(full - v + 1), dst + 8 * v, src + 8 * v, rows, W, m, ahead);
  } else if (v < full) {
    sum_cols_n<false>(static_cast<int>(full - v), dst + 8 * v, src + 8 * v, rows, W, m, ahead);
  }
}

// s += the 8 lanes of c, widened to double (lanes 0-3 in s[0], 4-7 in s[1]).
PE_AVX2 inline void add_f64(__m256d s[2], __m256 c) {
  s[0] = _mm256_add_pd(s[0], _mm256_cvtps_pd(_mm256_castps256_ps128(c)));
  s[1] = _mm256_add_pd(s[1], _mm256_cvtps_pd(_mm256_extractf128_ps(c, 1)));
}

PE_AVX2 void cell_sums_avx2(const CellBlock& blk, const float* const planes[kCellBlock], double* cells,
                            int64_t cell_stride, float* rows) {
  const int64_t W = blk.W, SW = blk.SW, P = blk.runs_per_pass;
  const int64_t Wp = (W + 7) / 8 * 8;
  for (int64_t r0 = 0; r0 < blk.num_runs; r0 += P) {
    const int64_t r1 = std::min(blk.num_runs, r0 + P);
    // 1. Float row sums of the pass's runs, each plane read front to back:
    //    rows[k][run][w].
    for (int64_t k = 0; k < kCellBlock; ++k)
      for (int64_t r = r0; r < r1; ++r)
        sum_rows(rows + (k * P + r - r0) * Wp, planes[k] + blk.run_h0[r] * W, blk.run_rows[r], W,
                 blk.prefetch_ahead);
    // 2. Eight columns of the 8 planes at a time, transposed so that each
    //    column is a vector over planes; a run's columns summed into their
    //    W-segment's cell: in float, `chunk` columns at a time (so that an
    //    element's float additions, rows then columns, stay under
    //    kRunLength), each chunk added in double.
    for (int64_t r = r0; r < r1; ++r) {
      double* cell_row = cells + blk.run_seg[r] * SW * cell_stride;
      const bool first = blk.run_first[r];
      const int64_t chunk = kRunLength + 1 - blk.run_rows[r];
      __m256 f = _mm256_setzero_ps();
      int64_t in_chunk = 0;
      __m256d s[2] = {_mm256_setzero_pd(), _mm256_setzero_pd()};
      for (int64_t w0 = 0; w0 < W; w0 += 8) {
        __m256 v[8], c[8];
        for (int64_t k = 0; k < 8; ++k) v[k] = _mm256_loadu_ps(rows + (k * P + r - r0) * Wp + w0);
        transpose8(v, c);
        const int64_t n = W - w0 < 8 ? W - w0 : 8;
#pragma GCC unroll 8
        for (int64_t j = 0; j < 8; ++j) {
          if (j >= n) break;
          const int64_t b = blk.col_seg[w0 + j];
          if (b < 0) continue;  // no window reads this column
          f = _mm256_add_ps(f, c[j]);
          const bool last = blk.col_last[w0 + j];
          if (++in_chunk == chunk || last) {
            add_f64(s, f);
            f = _mm256_setzero_ps();
            in_chunk = 0;
          }
          if (last) {
            double* cell = cell_row + b * cell_stride;
            if (!first) {
              s[0] = _mm256_add_pd(_mm256_loadu_pd(cell), s[0]);
              s[1] = _mm256_add_pd(_mm256_loadu_pd(cell + 4), s[1]);
            }
            _mm256_storeu_pd(cell, s[0]);
            _mm256_storeu_pd(cell + 4, s[1]);
            s[0] = s[1] = _mm256_setzero_pd();
          }
        }
      }
    }
  }
}

PE_AVX2 void bin_means_avx2(const double* cells, int64_t SW, const CellRect* rects, int64_t num_rects,
                            float* means) {
  // Eight vectors of 4 planes: eight independent add chains per bin, and the
  // loop over a bin's cells paid once per 32 planes.
  for (int64_t r = 0; r < num_rects; ++r) {
    const CellRect& rc = rects[r];
    __m256d s[8];
#pragma GCC unroll 8
    for (int v = 0; v < 8; ++v) s[v] = _mm256_setzero_pd();
    for (int64_t a = rc.a0; a < rc.a1; ++a) {
      const double* cell = cells + (a * SW + rc.b0) * kGroupPlanes;
      for (int64_t b = rc.b0; b < rc.b1; ++b, cell += kGroupPlanes) {
#pragma GCC unroll 8
        for (int v = 0; v < 8; ++v) s[v] = _mm256_add_pd(s[v], _mm256_loadu_pd(cell + 4 * v));
      }
    }
    const __m256d area = _mm256_set1_pd(rc.area);
    float* m = means + r * kGroupPlanes;
#pragma GCC unroll 8
    for (int v = 0; v < 8; ++v) _mm_storeu_ps(m + 4 * v, _mm256_cvtpd_ps(_mm256_div_pd(s[v], area)));
  }
}

#undef PE_AVX2

}  // namespace

bool cell_sums_8planes_available() {
  static const bool ok = __builtin_cpu_supports("avx2");
  // The test-only switches stand in for a CPU without AVX2.
  return ok && !test_overrides::get(test_overrides::kNoBlockKernel) &&
         test_overrides::get(test_overrides::kSimdIsa) != static_cast<int64_t>(Isa::kBaseline);
}

void cell_sums_8planes(const CellBlock& blk, const float* const planes[kCellBlock], double* cells,
                       int64_t cell_stride, float* rows) {
  cell_sums_avx2(blk, planes, cells, cell_stride, rows);
}

void bin_means_32planes(const double* cells, int64_t SW, const CellRect* rects, int64_t num_rects,
                        float* means) {
  bin_means_avx2(cells, SW, rects, num_rects, means);
}

#else  // no AVX2 path on this platform

bool cell_sums_8planes_available() { return false; }

void cell_sums_8planes(const CellBlock&, const float* const*, double*, int64_t, float*) {}

void bin_means_32planes(const double*, int64_t, const CellRect*, int64_t, float*) {}

#endif

}  // namespace simd
}  // namespace pyramid_ext
