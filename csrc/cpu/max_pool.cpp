// Float max pooling on CPU: channels_last forward and both backwards (see
// max_pool.h). The vector loops are simd::max_pixels / simd::max_rect
// (simd_loops_body.inc, one copy per ISA).
#include "cpu/max_pool.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <memory>

#if defined(__linux__)
#include <unistd.h>
#endif

#include "cpu/scratch.h"
#include "cpu/simd_loops.h"
#include "cpu/test_overrides.h"

namespace pyramid_ext {
namespace max_pool {
namespace {

// Scratch left uninitialized (cpu/scratch.h): its users write every entry they read.
using cpu::scratch;

// channels_last: one task per sample (both phases, or zeroing and adding,
// while the sample is in cache) when the samples share evenly among the
// threads or there are at least four per thread; else the work is split
// finer. test_overrides: channels_last_max_tasks (1 per sample, 2 split).
// Tiny inputs (under kTinyElements) run per sample: the split's extra
// tasks would cost more in thread dispatch than they save.
constexpr int64_t kTinyElements = 1 << 16;

bool channels_last_per_sample(int64_t N, int64_t elements) {
  const int64_t forced = test_overrides::get(test_overrides::kChannelsLastMaxTasks);
  if (forced) return forced == 1;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  return N % threads == 0 || N >= 4 * threads || elements < kTinyElements;
}

// Samples per task: enough that a task reads at least kTinyElements / 2.
int64_t sample_grain(int64_t per_sample) {
  return std::max<int64_t>(1, kTinyElements / 2 / std::max<int64_t>(1, per_sample));
}

}  // namespace

std::vector<BinRect> bin_rects(const Levels& lv) {
  std::vector<BinRect> rects;
  const int64_t C = lv.channels;
  for (size_t l = 0; l < lv.bh.size(); ++l)
    for (int64_t i = 0; i < lv.bh[l]; ++i)
      for (int64_t j = 0; j < lv.bw[l]; ++j) {
        const int64_t o0 = packed_index(lv.offset[l], C, lv.bh[l], lv.bw[l], 0, i, j, lv.channels_last_levels);
        const int64_t o1 = packed_index(lv.offset[l], C, lv.bh[l], lv.bw[l], 1, i, j, lv.channels_last_levels);
        rects.push_back({lv.h.seg_begin[lv.win_h0[l] + i], lv.h.seg_end[lv.win_h0[l] + i],
                         lv.w.seg_begin[lv.win_w0[l] + j], lv.w.seg_end[lv.win_w0[l] + j], o0, o1 - o0});
      }
  return rects;
}

bool fits_int32_index(int64_t H, int64_t W) { return H * W <= std::numeric_limits<int32_t>::max(); }

namespace {

// Phase 2 as steps: a bin is the maximum of its cells or, where bins of a
// finer level (more bins) tile it exactly (with overlap: a maximum does not
// care), of those bins, computed before it. The indexed forward keeps every
// bin's keys for that (their maximum is the keys' maximum: max_pool_combine
// is a maximum under a total order); the values-only forward reads the bins
// back from the packed output (levels packed channels_last only: a bin's
// channels are contiguous there, so a rectangle of a level's bins reads
// like cells). On bins (1, 2, 3, 6) of 16 x 16 every level above 6 comes
// from level 6's bins (1 from 2's): 272 reads of a vector of channels per
// sample instead of 540. Values only: exact wherever the cells' combine is
// (a bin whose maximum is NaN, or zero beside a -0.0, is flagged by the
// finer bin that holds that element, and the sample is computed again with
// indices).
struct BinStep {
  const BinRect* rect;
  int64_t bin;  // its number in packed order
  bool from_bins;
  // from_bins: the source level's bin (0, 0) (offset in a sample of the
  // packed output, and number in packed order) and its bins per row.
  int64_t src_offset, src_bin, src_bw;
  int64_t a0, a1, b0, b1;  // cells, or the source level's bins
};

// The windows of one level along one axis (segment ranges, ascending) that
// lie inside [lo, hi) and cover it; false if they do not cover it.
bool covering_windows(const AxisSegments& axis, int64_t first, int64_t count, int64_t lo, int64_t hi, int64_t* i0,
                      int64_t* i1) {
  int64_t begin = -1, end = -1, reach = lo;
  for (int64_t i = 0; i < count; ++i) {
    const int64_t s = axis.seg_begin[first + i], e = axis.seg_end[first + i];
    if (s < lo || e > hi) continue;
    if (begin < 0) begin = i;
    if (s > reach) return false;  // a gap
    reach = std::max(reach, e);
    end = i + 1;
  }
  *i0 = begin;
  *i1 = end;
  return begin >= 0 && reach == hi && axis.seg_begin[first + begin] == lo;
}

// allow_bins false: every bin from its cells, in packed order.
std::vector<BinStep> bin_steps(const Levels& lv, const std::vector<BinRect>& rects, bool allow_bins) {
  const int64_t L = static_cast<int64_t>(lv.bh.size());
  std::vector<int64_t> first_rect(static_cast<size_t>(L + 1), 0);
  for (int64_t l = 0; l < L; ++l) first_rect[l + 1] = first_rect[l] + lv.bh[l] * lv.bw[l];
  // Finer levels first; a bin may read the bins of levels before its own.
  std::vector<int64_t> order(static_cast<size_t>(L));
  for (int64_t l = 0; l < L; ++l) order[l] = l;
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return lv.bh[a] * lv.bw[a] > lv.bh[b] * lv.bw[b]; });
  std::vector<BinStep> steps;
  for (int64_t k = 0; k < L; ++k) {
    const int64_t l = order[k];
    for (int64_t b = first_rect[l]; b < first_rect[l + 1]; ++b) {
      const BinRect& r = rects[b];
      BinStep best{&r, b, false, 0, 0, 0, r.a0, r.a1, r.b0, r.b1};
      int64_t best_reads = (r.a1 - r.a0) * (r.b1 - r.b0);
      for (int64_t q = 0; allow_bins && q < k; ++q) {
        const int64_t src = order[q];
        int64_t i0, i1, j0, j1;
        if (!covering_windows(lv.h, lv.win_h0[src], lv.bh[src], r.a0, r.a1, &i0, &i1) ||
            !covering_windows(lv.w, lv.win_w0[src], lv.bw[src], r.b0, r.b1, &j0, &j1))
          continue;
        const int64_t reads = (i1 - i0) * (j1 - j0);
        if (reads < best_reads) {
          best_reads = reads;
          best = {&r, b, true, lv.offset[src], first_rect[src], lv.bw[src], i0, i1, j0, j1};
        }
      }
      steps.push_back(best);
    }
  }
  return steps;
}

}  // namespace

struct Bins {
  std::vector<BinRect> rects;
  std::vector<BinStep> indexed_steps;  // bin_steps(lv, rects, true)
  std::vector<BinStep> values_steps;   // bin_steps(lv, rects, lv.channels_last_levels)
  // Whether the indexed forward's per-sample tasks scan the bins built from
  // cells straight from their windows' pixels (IndexedPhases::sample_direct).
  bool direct = false;
};

// Scanning bins from their pixels reads pixels again where windows overlap
// or several levels are scanned. That costs less than writing cells and
// combining them while the pixels read again come from cache: up to 1.6
// times the cells' pixels (overlapping windows of one level read neighbours
// again), or 3 times where a sample fits in L2 (one thread, Intel AVX-512:
// bins 1, 2, 3, 6 on (16, 256, 16, 16) reading 1.56 times, 1.4x faster; 4, 5
// there, 2.6 times, 1.4x; 2, 3 on (8, 512, 32, 32), 2.1 times, 0.7x).
constexpr int64_t kDirectReadsPercent = 160;
constexpr int64_t kCachedSampleBytes = 512 << 10;
constexpr int64_t kCachedReadsPercent = 300;
// Cells and windows of more bytes than a quarter of L2, at most 96 KB, in
// samples of more than kCachedSampleBytes, are scanned by rows
// (IndexedPhases::wide). The cell scan walks the cell once per few vectors
// of channels; where the cell stays in L2 between those walks it is faster
// (AMD EPYC Zen 3, 512 KB L2, two threads, bins 1, 2, 3, 6: (8, 512, 32,
// 32), 72 KB windows, by rows 1.2x slower; (16, 256, 16, 16), a sample in
// L2, 1.1x). The 96 KB cap: on an AMD EPYC Zen 4 (1 MB L2, so a quarter is
// 256 KB) larger cells were faster by rows, with either ISA copy, x read
// from memory or not (two threads, in-process, max_cell_rows forced:
// indexed (4, 512, 60, 60), 200 KB cells, 1.28 -> 0.78 ms after a 64 MB
// read, 1.01 -> 0.70 back to back; spp forward+backward (8, 512, 32, 32),
// 128 KB cells, 1.48 -> 1.16 ms).
constexpr int64_t kMaxWideCellBytes = int64_t{96} << 10;
// With an L2 of 1 MB or more, cells of more than 32 KB: on the Zen 4 the
// 40-50 KB cells of (8, 512, 32, 32) (bins 1, 2, 3, 6) were faster by rows
// too, with either ISA copy (in-process, max_cell_rows forced, x read from
// memory: 1.09 -> 0.93 ms AVX-512, 1.05 -> 0.96 ms AVX2). Zen 3's 512 KB L2
// keeps the rule above (its 72 KB windows walked faster).
constexpr int64_t kLargeL2Bytes = int64_t{1} << 20;
constexpr int64_t kLargeL2WideCellBytes = int64_t{32} << 10;
static int64_t wide_cell_bytes() {
  static const int64_t bytes = [] {
    int64_t l2 = 0;
#if defined(__linux__) && defined(_SC_LEVEL2_CACHE_SIZE)
    l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);
#endif
    if (l2 >= kLargeL2Bytes) return kLargeL2WideCellBytes;
    return std::min(kMaxWideCellBytes, l2 > 0 ? std::max<int64_t>(l2 / 4, 32 << 10) : int64_t{128} << 10);
  }();
  return bytes;
}

std::shared_ptr<const Bins> make_bins(const Levels& lv) {
  auto bins = std::make_shared<Bins>();  // the steps point into rects: built in place
  bins->rects = bin_rects(lv);
  bins->indexed_steps = bin_steps(lv, bins->rects, true);
  bins->values_steps = bin_steps(lv, bins->rects, lv.channels_last_levels);
  int64_t direct_reads = 0;
  for (const BinStep& s : bins->indexed_steps)
    if (!s.from_bins) direct_reads += (lv.h.cuts[s.a1] - lv.h.cuts[s.a0]) * (lv.w.cuts[s.b1] - lv.w.cuts[s.b0]);
  const int64_t cell_reads = (lv.h.cuts.back() - lv.h.cuts.front()) * (lv.w.cuts.back() - lv.w.cuts.front());
  const int64_t sample_bytes = static_cast<int64_t>(lv.h.seg_of.size() * lv.w.seg_of.size()) * lv.channels * 4;
  const int64_t percent = sample_bytes <= kCachedSampleBytes ? kCachedReadsPercent : kDirectReadsPercent;
  bins->direct = direct_reads * 100 <= percent * cell_reads;
  return bins;
}

namespace {

// Bins::direct, unless test_overrides::kChannelsLastMaxDirect forces it (1
// never, 2 always).
bool use_direct(const Bins& bins) {
  const int64_t forced = test_overrides::get(test_overrides::kChannelsLastMaxDirect);
  return forced ? forced == 2 : bins.direct;
}

// The indexed forward's two phases for one sample (forward_channels_last):
// phase 1 scans H-segment a's rows into its row of cells, phase 2 combines
// the cells into bins. Scratch for one sample's cells is the caller's.
struct IndexedPhases {
  const float* x;
  const Levels& lv;
  const std::vector<BinRect>& rects;
  const std::vector<BinStep>& steps;  // bin_steps(lv, rects, true)
  bool direct;                        // use_direct(bins): sample_direct first
  int64_t H, W, C, SW;

  // Phase 1 for H-segment a of sample n: each cell of its row of cells as
  // keys (simd::max_cell_keys: the cell's pixels scanned by ATen's rule from
  // its first pixel, like ATen's window from (-inf, its first element), the
  // state in registers), for phase 2 to combine with an integer maximum.
  // Where a cell is wide (wide(): more than wide_cell_bytes()) the segment's rows are
  // scanned instead, each front to back, into row_v / row_i (SW * C each:
  // simd::max_pixels, the same scan with the state in memory), then made
  // keys: max_cell_keys walks a cell once per few vectors of channels, its
  // pixels C floats apart, and found the next vectors' lines evicted.
  // Returns whether a cell is NaN (a NaN, once taken, is only replaced by a
  // later NaN: whether the cells' pixels hold one); then the keys are not to
  // be used and the sample's cells are scanned again with scan_rows.
  bool scan_cells(int64_t n, int64_t a, int64_t* cell_k, float* row_v, int32_t* row_i) const {
    const int64_t h0 = lv.h.cuts[a], h1 = lv.h.cuts[a + 1];
    if (lv.h.seg_of[h0] < 0) return false;  // no window reads these rows
    const float* rows = x + ((n * H + h0) * W) * C;
    bool nan = false;
    if (by_rows(a)) {
      scan_row_cells(n, a, row_v, row_i);
      for (int64_t b = 0; b < SW; ++b)
        if (lv.w.seg_of[lv.w.cuts[b]] >= 0)
          nan |= simd::max_keys(cell_k + (a * SW + b) * C, nullptr, nullptr, 0, row_v + b * C, row_i + b * C, C);
      return nan;
    }
    for (int64_t b = 0; b < SW; ++b) {
      const int64_t w0 = lv.w.cuts[b], w1 = lv.w.cuts[b + 1];
      if (lv.w.seg_of[w0] < 0) continue;
      nan |= simd::max_cell_keys(cell_k + (a * SW + b) * C, nullptr, nullptr, 0, rows + w0 * C, h1 - h0, W * C,
                                 w1 - w0, C, C, static_cast<int32_t>(h0 * W + w0), static_cast<int32_t>(W));
    }
    return nan;
  }

  // Whether a cell or window of h x w pixels is scanned by rows: more than
  // wide_cell_bytes() in a sample of more than kCachedSampleBytes (the
  // max_cell_rows test switch: 1 never, 2 always).
  bool wide(int64_t h, int64_t w) const {
    constexpr int64_t kF = sizeof(float);
    const int64_t forced = test_overrides::get(test_overrides::kMaxCellRows);
    if (forced) return forced == 2;
    return H * W * C * kF > kCachedSampleBytes && h * w * C * kF > wide_cell_bytes();
  }

  // Whether H-segment a has a wide cell (scan_cells scans its rows).
  bool by_rows(int64_t a) const {
    const int64_t h = lv.h.cuts[a + 1] - lv.h.cuts[a];
    for (int64_t b = 0; b < SW; ++b)
      if (wide(h, lv.w.cuts[b + 1] - lv.w.cuts[b])) return true;
    return false;
  }

  // Phase 1 of a sample holding a NaN: H-segment a's rows into its row of
  // cells' values and flat indices (max_pixels, the same scan), for the
  // combine by the NaN rule.
  void scan_rows(int64_t n, int64_t a, float* cell_v, int32_t* cell_i) const {
    scan_row_cells(n, a, cell_v + a * SW * C, cell_i + a * SW * C);
  }

  // scan_rows into one row of cells' values and indices (SW * C each).
  void scan_row_cells(int64_t n, int64_t a, float* row_v, int32_t* row_i) const {
    const int64_t h0 = lv.h.cuts[a], h1 = lv.h.cuts[a + 1];
    if (lv.h.seg_of[h0] < 0) return;
    for (int64_t h = h0; h < h1; ++h) {
      const float* row = x + ((n * H + h) * W) * C;
      for (int64_t b = 0; b < SW; ++b) {
        const int64_t w0 = lv.w.cuts[b], w1 = lv.w.cuts[b + 1];
        if (lv.w.seg_of[w0] < 0) continue;
        simd::max_pixels(row_v + b * C, row_i + b * C, row + w0 * C, w1 - w0, C, C, static_cast<int32_t>(h * W + w0),
                         h == h0);
      }
    }
  }

  // Sample n without cells (Bins::direct): each bin that phase 2 would
  // build from cells is scanned from its window's pixels (max_cell_keys, the
  // same scan as a cell's: ATen's window scan), written to the output and as
  // keys to bin_k; the other bins from those keys, as in cells_to_bins.
  // Returns false when a bin is NaN: the sample then takes the cells and the
  // NaN rule, which write every bin again.
  // A wide window (wide()) is scanned by rows into m / r (C each), as
  // scan_cells scans wide cells.
  bool sample_direct(int64_t n, float* out_n, int64_t* out_idx_n, int64_t* bin_k, float* m, int32_t* r_idx) const {
    for (const BinStep& s : steps) {
      const BinRect& r = *s.rect;
      int64_t* keys = bin_k + s.bin * C;
      if (s.from_bins) {
        simd::max_rect_keys(out_n + r.out_offset, out_idx_n + r.out_offset, r.c_stride, bin_k + s.src_bin * C,
                            s.src_bw * C, C, s.a0, s.a1, s.b0, s.b1, C, keys);
        continue;
      }
      const int64_t h0 = lv.h.cuts[s.a0], h1 = lv.h.cuts[s.a1], w0 = lv.w.cuts[s.b0], w1 = lv.w.cuts[s.b1];
      if (wide(h1 - h0, w1 - w0)) {
        for (int64_t h = h0; h < h1; ++h)
          simd::max_pixels(m, r_idx, x + ((n * H + h) * W + w0) * C, w1 - w0, C, C, static_cast<int32_t>(h * W + w0),
                           h == h0);
        if (simd::max_keys(keys, out_n + r.out_offset, out_idx_n + r.out_offset, r.c_stride, m, r_idx, C))
          return false;
        continue;
      }
      if (simd::max_cell_keys(keys, out_n + r.out_offset, out_idx_n + r.out_offset, r.c_stride,
                              x + ((n * H + h0) * W + w0) * C, h1 - h0, W * C, w1 - w0, C, C,
                              static_cast<int32_t>(h0 * W + w0), static_cast<int32_t>(W)))
        return false;
    }
    return true;
  }

  // Phase 2 for channels [c0, c0 + cn) of one sample, whose packed output
  // starts at out_n and out_idx_n; bin_k: scratch for every bin's keys (cn
  // per bin). With a NaN among the cells, every bin from its cells by the
  // NaN rule.
  void cells_to_bins(float* out_n, int64_t* out_idx_n, int64_t c0, int64_t cn, const float* cell_v,
                     const int32_t* cell_i, const int64_t* cell_k, bool nan, int64_t* bin_k) const {
    if (nan) {
      for (const BinRect& r : rects) {
        const int64_t o = r.out_offset + c0 * r.c_stride;
        simd::max_rect(out_n + o, out_idx_n + o, r.c_stride, cell_v + c0, cell_i + c0, SW * C, C, r.a0, r.a1, r.b0,
                       r.b1, cn, true);
      }
      return;
    }
    for (const BinStep& s : steps) {
      const BinRect& r = *s.rect;
      const int64_t o = r.out_offset + c0 * r.c_stride;
      if (s.from_bins) {
        simd::max_rect_keys(out_n + o, out_idx_n + o, r.c_stride, bin_k + s.src_bin * cn, s.src_bw * cn, cn, s.a0,
                            s.a1, s.b0, s.b1, cn, bin_k + s.bin * cn);
      } else {
        simd::max_rect_keys(out_n + o, out_idx_n + o, r.c_stride, cell_k + c0, SW * C, C, s.a0, s.a1, s.b0, s.b1, cn,
                            bin_k + s.bin * cn);
      }
    }
  }

  // Both phases for sample n, all channels, with one sample's scratch.
  void sample(int64_t n, float* out_n, int64_t* out_idx_n, float* cell_v, int32_t* cell_i, int64_t* cell_k,
              int64_t* bin_k) const {
    if (direct && sample_direct(n, out_n, out_idx_n, bin_k, cell_v, cell_i)) return;
    const int64_t SH = lv.h.num_segments();
    bool nan = false;
    for (int64_t a = 0; a < SH; ++a) nan |= scan_cells(n, a, cell_k, cell_v + a * SW * C, cell_i + a * SW * C);
    if (nan)
      for (int64_t a = 0; a < SH; ++a) scan_rows(n, a, cell_v, cell_i);
    cells_to_bins(out_n, out_idx_n, 0, C, cell_v, cell_i, cell_k, nan, bin_k);
  }
};

// Values only (out_idx null): phase 1 keeps each cell's maximum alone
// (simd::max_pixels_values), phase 2 combines them (simd::max_rect_values).
// A sample where some bin's lane is NaN or a zero beside a -0.0 cell (which
// NaN, or which zero, ATen returns depends on positions) is computed again
// by the indexed phases, its indices into scratch: the result is then the
// indexed forward's, bit for bit, for every input.
void forward_channels_last_values(const float* x, float* out, const Levels& lv, const Bins& bins, int64_t N,
                                  int64_t H, int64_t W) {
  const int64_t C = lv.channels;
  const int64_t SH = lv.h.num_segments(), SW = lv.w.num_segments();
  const int64_t cells_per_sample = SH * SW * C;
  const IndexedPhases indexed{x, lv, bins.rects, bins.indexed_steps, use_direct(bins), H, W, C, SW};
  auto scan_rows = [&](int64_t n, int64_t a, float* cell_v) {
    const int64_t h0 = lv.h.cuts[a], h1 = lv.h.cuts[a + 1];
    if (lv.h.seg_of[h0] < 0) return;  // no window reads these rows
    float* row_v = cell_v + a * SW * C;
    for (int64_t h = h0; h < h1; ++h) {  // the first row starts each cell (max_pixels_values' start)
      const float* row = x + ((n * H + h) * W) * C;
      for (int64_t b = 0; b < SW; ++b) {
        const int64_t w0 = lv.w.cuts[b], w1 = lv.w.cuts[b + 1];
        if (lv.w.seg_of[w0] < 0) continue;
        simd::max_pixels_values(row_v + b * C, row + w0 * C, w1 - w0, C, C, h == h0);
      }
    }
  };
  // Phase 2 for channels [c0, c0 + cn) of sample n; whether to redo it.
  const std::vector<BinStep>& steps = bins.values_steps;
  auto cells_to_bins = [&](int64_t n, int64_t c0, int64_t cn, const float* cell_v) {
    float* out_n = out + n * C * lv.total;
    bool redo = false;
    for (const BinStep& s : steps) {
      const BinRect& r = *s.rect;
      float* dst = out_n + r.out_offset + c0 * r.c_stride;
      if (s.from_bins) {
        redo |= simd::max_rect_values(dst, r.c_stride, out_n + s.src_offset + c0, s.src_bw * C, C, s.a0, s.a1, s.b0,
                                      s.b1, cn);
      } else {
        redo |= simd::max_rect_values(dst, r.c_stride, cell_v + c0, SW * C, C, s.a0, s.a1, s.b0, s.b1, cn);
      }
    }
    return redo;
  };
  auto redo_indexed = [&](int64_t n) {
    auto cell_v = scratch<float>(cells_per_sample);
    auto cell_i = scratch<int32_t>(cells_per_sample);
    auto cell_k = scratch<int64_t>(cells_per_sample);
    auto idx = scratch<int64_t>(C * lv.total);
    auto bin_k = scratch<int64_t>(C * lv.total);
    indexed.sample(n, out + n * C * lv.total, idx.get(), cell_v.get(), cell_i.get(), cell_k.get(), bin_k.get());
  };
  if (channels_last_per_sample(N, N * H * W * C)) {
    at::parallel_for(0, N, sample_grain(H * W * C), [&](int64_t begin, int64_t end) {
      auto cell_v = scratch<float>(cells_per_sample);
      for (int64_t n = begin; n < end; ++n) {
        for (int64_t a = 0; a < SH; ++a) scan_rows(n, a, cell_v.get());
        if (cells_to_bins(n, 0, C, cell_v.get())) redo_indexed(n);
      }
    });
    return;
  }
  auto cell_v = scratch<float>(N * cells_per_sample);
  at::parallel_for(0, N * SH, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task)
      scan_rows(task / SH, task % SH, cell_v.get() + (task / SH) * cells_per_sample);
  });
  const int64_t chunk = std::min<int64_t>(C, 256);
  const int64_t chunks = (C + chunk - 1) / chunk;
  std::vector<char> chunk_redo(static_cast<size_t>(N * chunks));
  at::parallel_for(0, N * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / chunks, c0 = (task % chunks) * chunk;
      chunk_redo[task] = cells_to_bins(n, c0, std::min(chunk, C - c0), cell_v.get() + n * cells_per_sample);
    }
  });
  // Rare (a NaN, or a zero maximum beside a -0.0): one sample at a time.
  for (int64_t n = 0; n < N; ++n)
    if (std::any_of(chunk_redo.begin() + n * chunks, chunk_redo.begin() + (n + 1) * chunks, [](char f) { return f; }))
      redo_indexed(n);
}

}  // namespace

void forward_channels_last(const float* x, float* out, int64_t* out_idx, const Levels& lv, const Bins& bins,
                           int64_t N, int64_t H, int64_t W) {
  const int64_t C = lv.channels;
  const int64_t SH = lv.h.num_segments(), SW = lv.w.num_segments();
  const int64_t cells_per_sample = SH * SW * C;
  if (!out_idx) return forward_channels_last_values(x, out, lv, bins, N, H, W);
  const IndexedPhases indexed{x, lv, bins.rects, bins.indexed_steps, use_direct(bins), H, W, C, SW};
  if (channels_last_per_sample(N, N * H * W * C)) {
    // One task per sample: its cells stay in cache between the phases.
    at::parallel_for(0, N, sample_grain(H * W * C), [&](int64_t begin, int64_t end) {
      auto cell_v = scratch<float>(cells_per_sample);
      auto cell_i = scratch<int32_t>(cells_per_sample);
      auto cell_k = scratch<int64_t>(cells_per_sample);
      auto bin_k = scratch<int64_t>(C * lv.total);
      for (int64_t n = begin; n < end; ++n)
        indexed.sample(n, out + n * C * lv.total, out_idx + n * C * lv.total, cell_v.get(), cell_i.get(),
                       cell_k.get(), bin_k.get());
    });
    return;
  }
  auto cell_k = scratch<int64_t>(N * cells_per_sample);
  std::vector<char> seg_nan(static_cast<size_t>(N * SH));
  at::parallel_for(0, N * SH, 1, [&](int64_t begin, int64_t end) {
    auto row_v = scratch<float>(SW * C);  // a row of cells, where scan_cells scans rows
    auto row_i = scratch<int32_t>(SW * C);
    for (int64_t task = begin; task < end; ++task)
      seg_nan[task] = indexed.scan_cells(task / SH, task % SH, cell_k.get() + (task / SH) * cells_per_sample,
                                         row_v.get(), row_i.get());
  });
  std::vector<char> sample_nan(static_cast<size_t>(N));
  for (int64_t n = 0; n < N; ++n)
    sample_nan[n] = std::any_of(seg_nan.begin() + n * SH, seg_nan.begin() + (n + 1) * SH, [](char f) { return f; });
  // Samples holding a NaN (rare): their cells' values and indices, for the
  // combine by the NaN rule; scratch only when there are some.
  cpu::Scratch<float> cell_v;
  cpu::Scratch<int32_t> cell_i;
  if (std::any_of(sample_nan.begin(), sample_nan.end(), [](char f) { return f; })) {
    cell_v = scratch<float>(N * cells_per_sample);
    cell_i = scratch<int32_t>(N * cells_per_sample);
    at::parallel_for(0, N * SH, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t n = task / SH;
        if (sample_nan[n])
          indexed.scan_rows(n, task % SH, cell_v.get() + n * cells_per_sample, cell_i.get() + n * cells_per_sample);
      }
    });
  }
  const int64_t chunk = std::min<int64_t>(C, 256);
  const int64_t chunks = (C + chunk - 1) / chunk;
  at::parallel_for(0, N * chunks, 1, [&](int64_t begin, int64_t end) {
    auto bin_k = scratch<int64_t>(chunk * lv.total);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / chunks, c0 = (task % chunks) * chunk;
      const bool nan = sample_nan[n];
      indexed.cells_to_bins(out + n * C * lv.total, out_idx + n * C * lv.total, c0, std::min(chunk, C - c0),
                            nan ? cell_v.get() + n * cells_per_sample : nullptr,
                            nan ? cell_i.get() + n * cells_per_sample : nullptr, cell_k.get() + n * cells_per_sample,
                            nan, bin_k.get());
    }
  });
}

namespace {

// A max index from the forward (or the caller), in [0, HW).
int64_t checked_index(int64_t k, int64_t HW) {
  TORCH_CHECK(0 <= k && k < HW, "multi_pool2d_backward: index out of range");
  return k;
}

// channels_last backward into a fresh large gx, written once with streaming
// stores: each sample's contributions are first sorted by their row (a
// stable counting sort: rect-major, channel-minor, the order the per-sample
// scatter adds them in), then each block of rows is zeroed in a buffer that
// stays in cache, added to in that order, given the addend, and copied out.
// Zeroing gx in place (memset, then the scatter) read every line of it from
// memory first. (output_buffers::streamed in rows of W * C floats.)
void backward_rows_streamed(const float* grad, const int64_t* indices, float* gx, const Levels& lv,
                            const Bins& bins, int64_t N, int64_t H, int64_t W, const Addend<float>& add) {
  const int64_t C = lv.channels, HW = H * W, row = W * C;
  const std::vector<BinRect>& rects = bins.rects;
  const int64_t per_sample = C * static_cast<int64_t>(rects.size());
  // entry q of sample n: its element's offset in its row, and its gradient
  auto pos = scratch<int64_t>(N * per_sample);
  auto val = scratch<float>(N * per_sample);
  auto first = scratch<int64_t>(N * (H + 1));  // sample n's row h: entries [first[h], first[h + 1])
  // pixel k's row and its offset in the row (k / W and k % W: two integer
  // divisions per entry had been most of the sort's time)
  std::vector<int32_t> row_of(static_cast<size_t>(HW));
  std::vector<int64_t> offset_of(static_cast<size_t>(HW));
  for (int64_t k = 0; k < HW; ++k) {
    row_of[k] = static_cast<int32_t>(k / W);
    offset_of[k] = (k % W) * C;
  }
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> next(static_cast<size_t>(H));
    for (int64_t n = begin; n < end; ++n) {
      const float* g = grad + n * C * lv.total;
      const int64_t* ix = indices + n * C * lv.total;
      int64_t* f = first.get() + n * (H + 1);
      std::fill(f, f + H + 1, int64_t{0});
      for (const BinRect& r : rects)
        for (int64_t c = 0; c < C; ++c) {
          const int64_t k = ix[r.out_offset + c * r.c_stride];
          ++f[row_of[checked_index(k, HW)] + 1];
        }
      for (int64_t h = 0; h < H; ++h) f[h + 1] += f[h];
      std::copy(f, f + H, next.begin());
      for (const BinRect& r : rects)
        for (int64_t c = 0; c < C; ++c) {
          const int64_t o = r.out_offset + c * r.c_stride, k = ix[o];
          const int64_t q = n * per_sample + next[row_of[k]]++;
          pos[q] = offset_of[k] + c;
          val[q] = g[o];
        }
    }
  });
  // Blocks of rows of at most 256 KB (in L2 while added to), a row at least.
  const int64_t rows = std::max<int64_t>(1, (int64_t{256} << 10) / (row * static_cast<int64_t>(sizeof(float))));
  const int64_t blocks = (H + rows - 1) / rows;
  at::parallel_for(0, N * blocks, 1, [&](int64_t begin, int64_t end) {
    auto buf = scratch<float>(std::min(rows, H) * row);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / blocks, h0 = task % blocks * rows, h1 = std::min(H, h0 + rows);
      const int64_t* f = first.get() + n * (H + 1);
      const int64_t* p = pos.get() + n * per_sample;
      const float* v = val.get() + n * per_sample;
      std::memset(buf.get(), 0, static_cast<size_t>((h1 - h0) * row) * sizeof(float));
      for (int64_t h = h0; h < h1; ++h) {
        float* dst = buf.get() + (h - h0) * row;
        for (int64_t q = f[h]; q < f[h + 1]; ++q) dst[p[q]] += v[q];
        if (add.data)
          for (int64_t w = 0; w < W; ++w) add.add_pixel(dst + w * C, dst + w * C, n, h, w, C);
      }
      simd::copy_streaming(gx + (n * H + h0) * row, buf.get(), (h1 - h0) * row);
    }
    simd::stream_fence();
  });
}

}  // namespace

void backward(const float* grad, const int64_t* indices, float* gx, const Levels& lv, const Bins& bins, int64_t N,
              int64_t H, int64_t W, bool channels_last, const Addend<float>& add, bool stream) {
  const int64_t C = lv.channels, HW = H * W;
  const std::vector<BinRect>& rects = bins.rects;
  auto checked = [HW](int64_t k) { return checked_index(k, HW); };
  if (!channels_last) {
    // One plane per step: zeroed, then every bin's gradient added in order,
    // then the addend's plane added while the plane is in cache (stream:
    // in `buf`, then copied out).
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, HW));
    at::parallel_for(0, N * C, grain, [&](int64_t begin, int64_t end) {
      auto buf = scratch<float>(stream ? HW : 0);
      for (int64_t plane = begin; plane < end; ++plane) {
        const int64_t n = plane / C, c = plane % C;
        const float* g = grad + n * C * lv.total;
        const int64_t* ix = indices + n * C * lv.total;
        float* dst = stream ? buf.get() : gx + plane * HW;
        std::memset(dst, 0, static_cast<size_t>(HW) * sizeof(float));
        for (const BinRect& r : rects) {
          const int64_t o = r.out_offset + c * r.c_stride;
          dst[checked(ix[o])] += g[o];
        }
        if (add.data)
          for (int64_t h = 0; h < H; ++h) add.add_row(dst + h * W, dst + h * W, n, c, h, W);
        if (stream) simd::copy_streaming(gx + plane * HW, dst, HW);
      }
      if (stream) simd::stream_fence();
    });
    return;
  }
  // Streamed by blocks of rows where a sample is larger than an L2 (else it
  // stays in cache between its zeroing and its additions: (8, 512, 32, 32),
  // 2 MiB samples, measured no gain, the contributions' sort a loss on bins
  // 1, 2, 3, 6; (4, 512, 60, 60) and (1, 2048, 64, 64) gained 15-30%).
  constexpr int64_t kStreamSampleBytes = int64_t{4} << 20;
  if (stream && HW * C * int64_t{sizeof(float)} >= kStreamSampleBytes)
    return backward_rows_streamed(grad, indices, gx, lv, bins, N, H, W, add);
  // channels_last: each bin's gradient added to a zeroed sample, channel by
  // channel (the elements of one bin are distinct, so channels can be split).
  auto scatter = [&](int64_t n, int64_t c0, int64_t cn) {
    const float* g = grad + n * C * lv.total;
    const int64_t* ix = indices + n * C * lv.total;
    float* dst = gx + n * HW * C;
    for (const BinRect& r : rects)
      for (int64_t c = c0; c < c0 + cn; ++c) {
        const int64_t o = r.out_offset + c * r.c_stride;
        dst[checked(ix[o]) * C + c] += g[o];
      }
  };
  // The addend's pixels of rows [h0, h1) of sample n added (addend + grad).
  auto add_rows = [&](int64_t n, int64_t h0, int64_t h1) {
    for (int64_t h = h0; h < h1; ++h)
      for (int64_t w = 0; w < W; ++w) {
        float* px = gx + ((n * H + h) * W + w) * C;
        add.add_pixel(px, px, n, h, w, C);
      }
  };
  if (channels_last_per_sample(N, N * HW * C)) {
    // One task per sample: zeroed contiguously, then added to while in cache.
    at::parallel_for(0, N, sample_grain(HW * C), [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        std::memset(gx + n * HW * C, 0, static_cast<size_t>(HW * C) * sizeof(float));
        scatter(n, 0, C);
        if (add.data) add_rows(n, 0, H);
      }
    });
    return;
  }
  // Fewer samples than threads can share: zeroed in blocks of rows, then
  // added to in chunks of channels (a chunk's own zeroing would be strided
  // pieces of every pixel, several times slower), then the addend by rows.
  at::parallel_for(0, N * H, 1, [&](int64_t begin, int64_t end) {
    std::memset(gx + begin * W * C, 0, static_cast<size_t>((end - begin) * W * C) * sizeof(float));
  });
  const int64_t chunk = std::min<int64_t>(C, 256), chunks = (C + chunk - 1) / chunk;
  at::parallel_for(0, N * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / chunks, c0 = (task % chunks) * chunk;
      scatter(n, c0, std::min(chunk, C - c0));
    }
  });
  if (!add.data) return;
  at::parallel_for(0, N * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) add_rows(task / H, task % H, task % H + 1);
  });
}

}  // namespace max_pool
}  // namespace pyramid_ext
