// Host-side tables of the bilinear resize (taps per output coordinate,
// readers per source coordinate) and the float-run / double row sums of the
// gather-style backward passes, shared by the CPU kernels of upsample_concat
// and upsample_shift_add. The arithmetic itself is pyramid_index.h's.
#pragma once

#include <cstdint>
#include <vector>

#include "cpu/simd_loops.h"
#include "pyramid_index.h"

namespace pyramid_ext {

// For each source column j, the output columns that read it (a gather over
// those replaces a scatter from every output column).
template <typename acc_t>
std::vector<DstRange> axis_readers(int64_t in_size, int64_t out_size,
                                   bool align_corners) {
  const acc_t scale = bilinear_scale<acc_t>(in_size, out_size, align_corners);
  std::vector<DstRange> readers(static_cast<size_t>(in_size));
  for (int64_t s = 0; s < in_size; ++s)
    readers[s] = bilinear_readers<acc_t>(s, in_size, out_size, scale, align_corners);
  return readers;
}

template <typename acc_t>
std::vector<LinearTap<acc_t>> axis_taps(int64_t in_size, int64_t out_size,
                                        bool align_corners) {
  const acc_t scale = bilinear_scale<acc_t>(in_size, out_size, align_corners);
  std::vector<LinearTap<acc_t>> taps(static_cast<size_t>(out_size));
  for (int64_t d = 0; d < out_size; ++d)
    taps[d] = bilinear_tap<acc_t>(d, in_size, out_size, scale, align_corners);
  return taps;
}

// One axis's taps as the arrays of a simd::ResizeTable (the float kernels'
// vector resize of rows, simd::resize_row).
struct ResizeTableArrays {
  std::vector<int32_t> i0, i1;
  std::vector<float> w0, w1;

  explicit ResizeTableArrays(const std::vector<LinearTap<float>>& taps) {
    for (const auto& t : taps) {
      i0.push_back(static_cast<int32_t>(t.i0));
      i1.push_back(static_cast<int32_t>(t.i1));
      w0.push_back(t.w0);
      w1.push_back(t.w1);
    }
  }
  // The table from output coordinate `first` on.
  simd::ResizeTable from(int64_t first) const {
    return {i0.data() + first, i1.data() + first, w0.data() + first, w1.data() + first};
  }
};

// The backward's long sums: grad_branch = Wy^T G Wx, where a 1x1 branch sums
// a whole plane of G. Pass 1, rows[i] = sum_h Wy[h, i] G[h, :]: each row's
// terms (weight x row of G, one rounding each) are summed in float runs of
// at most simd::kRunLength terms (at most two per output row h), and the
// runs are added to rows in double. Pass 2, grad[i][j] = sum over the columns
// w that read j of rows[i][w] Wx[w, j], in double. A term passes at most one
// product rounding and kRunLength - 1 float additions (a full run needs
// H >= 6, so W <= 2^31 / 6 for a plane of up to 2^31 elements), then fewer
// than 2H / kRunLength + W + 2 < 2^31 / 6 + 3 double operations, and the
// result one rounding to the dtype:
//   |err| <= (13 * 2^-24 + 2^31 / 6 * 2^-53) sum |Wy G Wx| < 8.2e-7 sum |Wy G Wx|
// (for non-negative G, 8.2e-7 relative to the gradient). Float accumulation
// over the H rows drifted by up to H * 2^-24.
//
// Pass 2's factors, tabled once per call: for source column j, of(j)[w -
// readers[j].first] is the double of bilinear_tap_weight(taps[w], j) for each
// output column w in readers[j] (computed per row and element, with its
// compares and selects, it had been most of the planar backwards' time).
struct ReaderFactors {
  std::vector<double> factors;
  std::vector<int64_t> first;  // column j's first entry in factors

  ReaderFactors() = default;
  template <typename acc_t>
  ReaderFactors(const std::vector<LinearTap<acc_t>>& taps, const std::vector<DstRange>& readers) {
    for (int64_t j = 0; j < static_cast<int64_t>(readers.size()); ++j) {
      first.push_back(static_cast<int64_t>(factors.size()));
      for (int64_t w = readers[j].first; w <= readers[j].last; ++w)
        factors.push_back(static_cast<double>(bilinear_tap_weight(taps[w], j)));
    }
  }
  const double* of(int64_t j) const { return factors.data() + first[j]; }
};

// One plane's (or channel chunk's) row sums: `rows` (double) and the float
// runs (`run`, zero outside a run), `width` values per row.
template <typename acc_t>
struct RowRunSums {
  int64_t width = 0;
  std::vector<double> rows;
  std::vector<acc_t> run;
  std::vector<int64_t> terms;  // terms in each row's current run

  void reset(int64_t num_rows, int64_t w) {
    width = w;
    rows.assign(static_cast<size_t>(num_rows * w), 0.0);
    run.assign(static_cast<size_t>(num_rows * w), acc_t(0));
    terms.assign(static_cast<size_t>(num_rows), 0);
  }
  void flush(int64_t i) {
    double* r = rows.data() + i * width;
    acc_t* q = run.data() + i * width;
#pragma omp simd
    for (int64_t k = 0; k < width; ++k) {
      r[k] += static_cast<double>(q[k]);
      q[k] = acc_t(0);
    }
    terms[i] = 0;
  }
  // The float run of row i, ready for one more term.
  acc_t* next_term(int64_t i) {
    if (terms[i] == simd::kRunLength) flush(i);
    ++terms[i];
    return run.data() + i * width;
  }
  void flush_all() {
    for (int64_t i = 0; i < static_cast<int64_t>(terms.size()); ++i)
      if (terms[i] > 0) flush(i);
  }
};

}  // namespace pyramid_ext
