// Max pooling of NCHW float planes with AVX2 (x86-64): the max counterpart of
// block_cells.cpp's average kernel.
//
// Per block of 8 planes: (1) each plane's H-segment rows are scanned in
// registers, up to 32 columns at a time, keeping per column the running
// maximum and the flat index of its row (ATen's rule: a value replaces the
// maximum when it is larger or NaN, so a column keeps its first maximum or
// its last NaN); (2) 8 columns of the 8 planes are transposed 8x8 in
// registers, values and indices alike, so each column is a vector over planes,
// and combined into its W-segment cell; (3) once per group of 32 planes, the
// cells of every bin are combined, four vectors of 8 planes at a time. Steps 2
// and 3 combine pieces of a window with max_pool_combine's rule (NaN wins, the
// later NaN among NaNs; otherwise the larger value, the earlier index among
// equal ones): a maximum under a total order of (value, index), so any
// grouping of the pieces gives the row-major scan's result, the same as the
// portable loops in multi_pool2d.cpp. Without NaN among the pieces only the
// last clause can hold, so blocks and groups without NaN (step 1 reports
// them) combine with half the instructions.
#include "cpu/max_pool.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <limits>

#include "cpu/avx2_tile.h"
#include "cpu/block_cells.h"

namespace pyramid_ext {
namespace max_pool {

#if PE_HAVE_AVX2_PATH

namespace {

using simd::avx2::tail_mask;
using simd::avx2::transpose8;

#define PE_AVX2 __attribute__((target("avx2")))
#define PE_AVX2_INLINE __attribute__((target("avx2"), always_inline)) inline

constexpr int64_t kB = simd::kCellBlock;     // planes per transposed block
constexpr int64_t kG = simd::kGroupPlanes;   // planes per group (bin step)
constexpr int kMaxVecs = 4;                  // column vectors per register pass

// The segment tables of one call as the max block kernel reads them (the
// average kernel's simd::CellBlock walks rows in bounded runs instead).
struct MaxCellBlock {
  int64_t W;
  int64_t SH;              // H-segments
  int64_t SW;              // W-segments
  const int64_t* h_cuts;   // SH + 1 row boundaries
  const char* h_used;      // SH flags: does some window read the segment
  const int64_t* col_seg;  // W: W-segment of each column, -1 if no window reads it
  const char* col_last;    // W: is the column the last of its W-segment
  int64_t prefetch_ahead;  // floats from a plane to the one to prefetch (0: none)
};

// Scratch elements cell_max_8planes needs for its row maxima (and as many indices).
inline int64_t max_rows_scratch(const MaxCellBlock& blk) {
  return kB * blk.SH * ((blk.W + 7) / 8 * 8);
}

// A running (maximum, flat index) per lane that every piece replaces: below
// every value, -inf included (its index is above every index).
struct Running {
  __m256 v;
  __m256i i;
};

PE_AVX2_INLINE Running empty_running() {
  return {_mm256_set1_ps(-std::numeric_limits<float>::infinity()),
          _mm256_set1_epi32(std::numeric_limits<int32_t>::max())};
}

// max_pool_combine per lane: NaN wins, the later NaN among NaNs; otherwise
// the larger value, the earlier index among equal values. kNaN false: the
// caller knows no NaN is among the pieces (then only the last clause), half
// the instructions.
template <bool kNaN>
PE_AVX2_INLINE void combine(Running& run, __m256 o, __m256i oi) {
  if (!kNaN) {
    const __m256 larger = _mm256_cmp_ps(o, run.v, _CMP_GT_OQ);
    const __m256 equal = _mm256_cmp_ps(o, run.v, _CMP_EQ_OQ);
    const __m256 earlier = _mm256_castsi256_ps(_mm256_cmpgt_epi32(run.i, oi));
    const __m256 take = _mm256_or_ps(larger, _mm256_and_ps(equal, earlier));
    run.v = _mm256_blendv_ps(run.v, o, take);
    run.i = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(run.i), _mm256_castsi256_ps(oi), take));
    return;
  }
  const __m256 nan_run = _mm256_cmp_ps(run.v, run.v, _CMP_UNORD_Q);
  const __m256 nan_o = _mm256_cmp_ps(o, o, _CMP_UNORD_Q);
  const __m256 larger = _mm256_cmp_ps(o, run.v, _CMP_GT_OQ);
  const __m256 equal = _mm256_cmp_ps(o, run.v, _CMP_EQ_OQ);
  const __m256 earlier = _mm256_castsi256_ps(_mm256_cmpgt_epi32(run.i, oi));
  const __m256 later = _mm256_castsi256_ps(_mm256_cmpgt_epi32(oi, run.i));
  const __m256 take = _mm256_or_ps(
      _mm256_or_ps(larger, _mm256_and_ps(equal, earlier)),
      _mm256_or_ps(_mm256_andnot_ps(nan_run, nan_o), _mm256_and_ps(nan_o, later)));
  run.v = _mm256_blendv_ps(run.v, o, take);
  run.i = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(run.i), _mm256_castsi256_ps(oi), take));
}

// NV vectors of 8 columns scanned over `rows` rows of stride W (the first row
// at flat offset row0 = h0 * W), maxima and row offsets in registers; the
// stored index is row offset + column (col0 + lane). With kTail the last
// vector holds the row's last columns (mask m); its padding lanes are never
// read. Each row read is also prefetched `ahead` floats further on (the next
// block's planes). Returns whether a column's maximum is NaN (a NaN, once
// taken, is only replaced by a later NaN, so: whether the columns hold one).
template <int NV, bool kTail>
PE_AVX2_INLINE bool max_cols(float* dv, int32_t* di, const float* src, int64_t rows, int64_t W, __m256i m,
                             int64_t ahead, int32_t row0, int32_t col0) {
  __m256 mv[NV], mr[NV];
  const __m256 first_row = _mm256_castsi256_ps(_mm256_set1_epi32(row0));
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) {
    _mm_prefetch(reinterpret_cast<const char*>(src + ahead + 8 * v), _MM_HINT_T1);
    mv[v] = (kTail && v == NV - 1) ? _mm256_maskload_ps(src + 8 * v, m) : _mm256_loadu_ps(src + 8 * v);
    mr[v] = first_row;
  }
  int32_t row = row0;
  for (int64_t r = 1; r < rows; ++r) {
    src += W;
    row += static_cast<int32_t>(W);
    const __m256 this_row = _mm256_castsi256_ps(_mm256_set1_epi32(row));
#pragma GCC unroll 8
    for (int v = 0; v < NV; v += 2) _mm_prefetch(reinterpret_cast<const char*>(src + ahead + 8 * v), _MM_HINT_T1);
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      const __m256 x = (kTail && v == NV - 1) ? _mm256_maskload_ps(src + 8 * v, m) : _mm256_loadu_ps(src + 8 * v);
      // ATen's scan: larger, or NaN.
      const __m256 take = _mm256_or_ps(_mm256_cmp_ps(x, mv[v], _CMP_GT_OQ), _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
      mv[v] = _mm256_blendv_ps(mv[v], x, take);
      mr[v] = _mm256_blendv_ps(mr[v], this_row, take);
    }
  }
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  __m256 nan = _mm256_setzero_ps();
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) {
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(mv[v], mv[v], _CMP_UNORD_Q));
    _mm256_storeu_ps(dv + 8 * v, mv[v]);
    const __m256i col = _mm256_add_epi32(lane, _mm256_set1_epi32(col0 + 8 * v));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(di + 8 * v),
                        _mm256_add_epi32(_mm256_castps_si256(mr[v]), col));
  }
  return _mm256_movemask_ps(nan) != 0;
}

template <bool kTail>
PE_AVX2 bool max_cols_n(int nv, float* dv, int32_t* di, const float* src, int64_t rows, int64_t W, __m256i m,
                        int64_t ahead, int32_t row0, int32_t col0) {
  switch (nv) {
    case 1: return max_cols<1, kTail>(dv, di, src, rows, W, m, ahead, row0, col0);
    case 2: return max_cols<2, kTail>(dv, di, src, rows, W, m, ahead, row0, col0);
    case 3: return max_cols<3, kTail>(dv, di, src, rows, W, m, ahead, row0, col0);
    default: return max_cols<4, kTail>(dv, di, src, rows, W, m, ahead, row0, col0);
  }
}

// dv[w], di[w] = maximum over rows h0 .. h0 + rows - 1 of column w and its
// flat index, for w < W (dv, di padded to a multiple of 8). Returns whether
// some maximum is NaN.
PE_AVX2 bool max_rows(float* dv, int32_t* di, const float* src, int64_t rows, int64_t W, int64_t ahead,
                      int64_t h0) {
  const int64_t full = W / 8, tail = W % 8;
  const __m256i m = tail_mask(tail);
  const int32_t row0 = static_cast<int32_t>(h0 * W);
  int64_t v = 0;
  bool nan = false;
  for (; v + kMaxVecs <= full; v += kMaxVecs)
    nan |= max_cols<kMaxVecs, false>(dv + 8 * v, di + 8 * v, src + 8 * v, rows, W, m, ahead, row0,
                              static_cast<int32_t>(8 * v));
  if (tail) {
    nan |= max_cols_n<true>(static_cast<int>(full - v + 1), dv + 8 * v, di + 8 * v, src + 8 * v, rows, W, m, ahead,
                     row0, static_cast<int32_t>(8 * v));
  } else if (v < full) {
    nan |= max_cols_n<false>(static_cast<int>(full - v), dv + 8 * v, di + 8 * v, src + 8 * v, rows, W, m, ahead,
                             row0, static_cast<int32_t>(8 * v));
  }
  return nan;
}

// cells[(a * SW + b) * cell_stride + k] (value and index) = the maximum of
// plane k over H-segment a and W-segment b, for every pair some window reads.
// Step 2: the rows' column maxima of the 8 planes (max_rows' output)
// transposed and combined into W-segment cells. kNaN: whether some maximum
// is NaN (else the cheaper combine).
template <bool kNaN>
PE_AVX2 void cells_from_rows(const MaxCellBlock& blk, float* cell_v, int32_t* cell_i, int64_t cell_stride,
                             const float* rows_v, const int32_t* rows_i) {
  const int64_t W = blk.W, SH = blk.SH, SW = blk.SW;
  const int64_t Wp = (W + 7) / 8 * 8;
  for (int64_t a = 0; a < SH; ++a) {
    if (!blk.h_used[a]) continue;
    Running run = empty_running();
    for (int64_t w0 = 0; w0 < W; w0 += 8) {
      __m256 rv[8], ri[8], cv[8], ci[8];
      for (int64_t k = 0; k < 8; ++k) {
        rv[k] = _mm256_loadu_ps(rows_v + (k * SH + a) * Wp + w0);
        ri[k] = _mm256_loadu_ps(reinterpret_cast<const float*>(rows_i + (k * SH + a) * Wp + w0));
      }
      transpose8(rv, cv);
      transpose8(ri, ci);
      const int64_t n = W - w0 < 8 ? W - w0 : 8;
#pragma GCC unroll 8
      for (int64_t j = 0; j < 8; ++j) {
        if (j >= n) break;
        const int64_t b = blk.col_seg[w0 + j];
        if (b < 0) continue;  // no window reads this column
        combine<kNaN>(run, cv[j], _mm256_castps_si256(ci[j]));
        if (blk.col_last[w0 + j]) {
          _mm256_storeu_ps(cell_v + (a * SW + b) * cell_stride, run.v);
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(cell_i + (a * SW + b) * cell_stride), run.i);
          run = empty_running();
        }
      }
    }
  }
}

// cells[(a * SW + b) * cell_stride + k] (value and index) = the maximum of
// plane k over H-segment a and W-segment b, for every pair some window reads.
// rows: scratch of max_rows_scratch(blk) floats and as many indices. Returns
// whether some cell is NaN.
PE_AVX2 bool cell_max_8planes(const MaxCellBlock& blk, const float* const planes[kB], float* cell_v,
                              int32_t* cell_i, int64_t cell_stride, float* rows_v, int32_t* rows_i) {
  const int64_t W = blk.W, SH = blk.SH;
  const int64_t Wp = (W + 7) / 8 * 8;
  bool nan = false;
  for (int64_t k = 0; k < kB; ++k)
    for (int64_t a = 0; a < SH; ++a) {
      if (!blk.h_used[a]) continue;
      const int64_t h0 = blk.h_cuts[a], at = (k * SH + a) * Wp;
      nan |= max_rows(rows_v + at, rows_i + at, planes[k] + h0 * W, blk.h_cuts[a + 1] - h0, W, blk.prefetch_ahead,
                      h0);
    }
  if (nan) {
    cells_from_rows<true>(blk, cell_v, cell_i, cell_stride, rows_v, rows_i);
  } else {
    cells_from_rows<false>(blk, cell_v, cell_i, cell_stride, rows_v, rows_i);
  }
  return nan;
}

// vals/idx[r * 32 + k] = the maximum over the cells of rects[r] of plane k,
// for the 32 planes of a group (cell stride 32). kNaN: whether some cell is
// NaN.
template <bool kNaN>
PE_AVX2 void bin_max_32planes(const float* cell_v, const int32_t* cell_i, int64_t SW, const simd::CellRect* rects,
                              int64_t num_rects, float* vals, int32_t* idx) {
  for (int64_t r = 0; r < num_rects; ++r) {
    const simd::CellRect& rc = rects[r];
    Running run[4] = {empty_running(), empty_running(), empty_running(), empty_running()};
    for (int64_t a = rc.a0; a < rc.a1; ++a)
      for (int64_t b = rc.b0; b < rc.b1; ++b) {
        const int64_t at = (a * SW + b) * kG;
#pragma GCC unroll 4
        for (int q = 0; q < 4; ++q)
          combine<kNaN>(run[q], _mm256_loadu_ps(cell_v + at + 8 * q),
                  _mm256_loadu_si256(reinterpret_cast<const __m256i*>(cell_i + at + 8 * q)));
      }
#pragma GCC unroll 4
    for (int q = 0; q < 4; ++q) {
      _mm256_storeu_ps(vals + r * kG + 8 * q, run[q].v);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(idx + r * kG + 8 * q), run[q].i);
    }
  }
}

#undef PE_AVX2_INLINE
#undef PE_AVX2

}  // namespace

bool nchw_blocks_available(int64_t H, int64_t W) {
  return simd::cell_sums_8planes_available() && H * W <= std::numeric_limits<int32_t>::max();
}

void forward_nchw_blocks(const float* x, float* out, int64_t* out_idx, const Levels& lv, int64_t N, int64_t H,
                         int64_t W) {
  const int64_t C = lv.channels;
  const int64_t SH = lv.h.num_segments(), SW = lv.w.num_segments();
  const int64_t planes = N * C, groups = (planes + kG - 1) / kG;
  std::vector<char> h_used(static_cast<size_t>(SH)), col_last(static_cast<size_t>(W));
  for (int64_t a = 0; a < SH; ++a) h_used[a] = lv.h.seg_of[lv.h.cuts[a]] >= 0;
  for (int64_t w = 0; w < W; ++w) col_last[w] = w + 1 == W || lv.w.seg_of[w + 1] != lv.w.seg_of[w];
  // The next block's planes are prefetched while this one is reduced.
  const MaxCellBlock cb{W, SH, SW, lv.h.cuts.data(), h_used.data(), lv.w.seg_of.data(), col_last.data(),
                           kB * H * W};
  const std::vector<BinRect> bins = bin_rects(lv);
  std::vector<simd::CellRect> rects;
  for (const BinRect& r : bins) rects.push_back({r.a0, r.a1, r.b0, r.b1, 0.0});
  const int64_t num_rects = static_cast<int64_t>(rects.size());
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, H * W * kG));
  at::parallel_for(0, groups, grain, [&](int64_t begin, int64_t end) {
    const size_t scratch = static_cast<size_t>(max_rows_scratch(cb));
    std::vector<float> rows_v(scratch);
    std::vector<int32_t> rows_i(scratch);
    // Lanes of blocks past the last plane are combined but never written out.
    std::vector<float> cell_v(static_cast<size_t>(SH * SW * kG)), bin_v(static_cast<size_t>(num_rects * kG));
    std::vector<int32_t> cell_i(cell_v.size()), bin_i(bin_v.size());
    for (int64_t grp = begin; grp < end; ++grp) {
      const int64_t p0 = grp * kG, pn = std::min(kG, planes - p0);
      bool nan = false;
      for (int64_t q = 0; q * kB < pn; ++q) {
        const float* plane_ptrs[kB];
        for (int64_t k = 0; k < kB; ++k) plane_ptrs[k] = x + (p0 + std::min(q * kB + k, pn - 1)) * H * W;
        nan |= cell_max_8planes(cb, plane_ptrs, cell_v.data() + q * kB, cell_i.data() + q * kB, kG, rows_v.data(),
                                rows_i.data());
      }
      // Lanes of blocks a partial group does not reach hold stale cells: with
      // the cheaper combine too, they only reach lanes that are not written out.
      if (nan) {
        bin_max_32planes<true>(cell_v.data(), cell_i.data(), SW, rects.data(), num_rects, bin_v.data(), bin_i.data());
      } else {
        bin_max_32planes<false>(cell_v.data(), cell_i.data(), SW, rects.data(), num_rects, bin_v.data(),
                                bin_i.data());
      }
      for (int64_t k = 0; k < pn; ++k) {
        const int64_t plane = p0 + k, n = plane / C, c = plane % C;
        for (int64_t r = 0; r < num_rects; ++r) {
          const int64_t o = n * C * lv.total + bins[r].out_offset + c * bins[r].c_stride;
          out[o] = bin_v[r * kG + k];
          out_idx[o] = bin_i[r * kG + k];
        }
      }
    }
  });
}

#else  // no AVX2 path on this platform

bool nchw_blocks_available(int64_t, int64_t) { return false; }

void forward_nchw_blocks(const float*, float*, int64_t*, const Levels&, int64_t, int64_t, int64_t) {}

#endif

}  // namespace max_pool
}  // namespace pyramid_ext
