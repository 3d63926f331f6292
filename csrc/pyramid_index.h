// Index and interpolation math shared by the CPU and CUDA kernels.
//
// Everything the kernels compute about *where* to read and *with which
// weight* lives here, as inline functions usable from host and device code,
// so the CPU and CUDA kernels run one formula. The integer math (segments,
// packed indices, the max rule) is bit-identical on both, and so is the
// floating-point math: the CPU build uses -ffp-contract=off and the CUDA
// build --fmad=false (setup.py; the emulated CUDA build -ffp-contract=off),
// so every operation here rounds once, in the order written, on every device
// (IEEE division and no flush-to-zero on both: nvcc's defaults without
// --use_fast_math). The CPU tests therefore execute the arithmetic the CUDA
// kernels use, and tests/test_cuda_emu.py runs the CUDA kernels' own code
// with it. (The kernels' summation orders are their own, not this header's.)
//
// Against PyTorch eager the taps are not always bit-identical: ATen's kernels
// may contract `scale * (dst + 0.5) - 0.5` in bilinear_tap into one FMA
// (nvcc's default for its CUDA kernels; this project's CPU torch 2.13 build
// does it too: F.interpolate in float32, 129 -> 300 columns, matches the
// fused source at every column and this formula at all but 3). Then src, and
// so the weights, differ by one rounding of src (about 6e-8 * src in float,
// 1.1e-16 * src in double), times the difference of the two neighbours in
// the value; i0 moves by one only where src is within that of an integer
// (weights 0 and 1, same bound). Tests against eager allow it:
// tests/test_upsample_concat.py TOL[float32] (atol 1e-5), the per-element
// bound of tests/test_properties.py (weights rounded in the accumulation
// type), tests/test_cuda.py UP_ATOL_F32.
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define PE_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define PE_HOST_DEVICE inline
#endif

namespace pyramid_ext {

// Pooling modes, as passed in the op schemas' `mode` argument.
constexpr int64_t kPoolAvg = 0;
constexpr int64_t kPoolMax = 1;
// Max pooling, values only: the values of kPoolMax (bit for bit) and an
// empty indices tensor, as for avg; no backward (a gradient needs indices).
constexpr int64_t kPoolMaxValues = 2;

// ---------------------------------------------------------------------------
// Bilinear interpolation, exactly as ATen's upsample_bilinear2d computes it
// (UpSample.h: area_pixel_compute_scale / area_pixel_compute_source_index,
// UpSampleKernel.cpp: compute_source_index_and_lambda). acc_t is float for
// float/half/bfloat16 and double for double, like ATen's opmath type.
// ---------------------------------------------------------------------------

template <typename acc_t>
PE_HOST_DEVICE acc_t bilinear_scale(int64_t in_size, int64_t out_size,
                                    bool align_corners) {
  if (align_corners) {
    return out_size > 1 ? static_cast<acc_t>(in_size - 1) / (out_size - 1)
                        : static_cast<acc_t>(0);
  }
  return static_cast<acc_t>(in_size) / out_size;
}

// The two source indices and weights that output coordinate `dst` reads.
// i1 == i0 at the last row/column; weights sum to one.
template <typename acc_t>
struct LinearTap {
  int64_t i0;
  int64_t i1;
  acc_t w0;
  acc_t w1;
};

template <typename acc_t>
PE_HOST_DEVICE LinearTap<acc_t> bilinear_tap(int64_t dst, int64_t in_size,
                                             int64_t out_size, acc_t scale,
                                             bool align_corners) {
  LinearTap<acc_t> t;
  if (in_size == out_size) {  // ATen copies when sizes match
    t.i0 = dst;
    t.i1 = dst;
    t.w0 = static_cast<acc_t>(1);
    t.w1 = static_cast<acc_t>(0);
    return t;
  }
  acc_t src;
  if (align_corners) {
    src = scale * dst;
  } else {
    src = scale * (dst + static_cast<acc_t>(0.5)) - static_cast<acc_t>(0.5);
    if (src < 0) src = 0;
  }
  int64_t i0 = static_cast<int64_t>(floor(src));
  if (i0 > in_size - 1) i0 = in_size - 1;
  acc_t lambda = src - static_cast<acc_t>(i0);
  lambda = lambda < 0 ? static_cast<acc_t>(0)
                      : (lambda > 1 ? static_cast<acc_t>(1) : lambda);
  t.i0 = i0;
  t.i1 = i0 + (i0 < in_size - 1 ? 1 : 0);
  t.w1 = lambda;
  t.w0 = static_cast<acc_t>(1) - lambda;
  return t;
}

// The weight with which the output coordinate whose taps are `t` reads source
// coordinate `src`: w0 if i0 == src, plus w1 if i1 == src (both at the last
// row/column, where i0 == i1), else zero. The transpose of the interpolation,
// as the gather-style backward passes need it.
template <typename acc_t>
PE_HOST_DEVICE acc_t bilinear_tap_weight(const LinearTap<acc_t>& t,
                                         int64_t src) {
  acc_t w = static_cast<acc_t>(0);
  if (t.i0 == src) w += t.w0;
  if (t.i1 == src) w += t.w1;
  return w;
}

// The range [first, last] of output coordinates whose taps read source
// coordinate `src` (with a non-zero or zero weight). Taps are monotone in dst,
// so the set is contiguous; used by gather-style backward passes that sum,
// for each source element, over the output elements that read it. Returns
// first > last when no output reads `src` (downsampling skips it).
struct DstRange {
  int64_t first;
  int64_t last;
};

template <typename acc_t>
PE_HOST_DEVICE DstRange bilinear_readers(int64_t src, int64_t in_size,
                                         int64_t out_size, acc_t scale,
                                         bool align_corners) {
  // Binary search for the first dst whose i1 >= src, then walk while i0 <= src.
  int64_t lo = 0, hi = out_size;  // first dst with tap.i1 >= src
  while (lo < hi) {
    int64_t mid = (lo + hi) / 2;
    if (bilinear_tap<acc_t>(mid, in_size, out_size, scale, align_corners).i1 <
        src) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  int64_t first = lo;
  lo = first;
  hi = out_size;  // first dst with tap.i0 > src
  while (lo < hi) {
    int64_t mid = (lo + hi) / 2;
    if (bilinear_tap<acc_t>(mid, in_size, out_size, scale, align_corners).i0 <=
        src) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  DstRange r;
  r.first = first;
  r.last = lo - 1;
  return r;
}

// ---------------------------------------------------------------------------
// upsample_shift_add: a K x K convolution of a resized map, computed as the
// resized "tap products" P_t (t = a * K + c, each a 1x1 conv at the source
// resolution) shifted and added: out[y, x] += up(P_t)[y + a - K/2, x + c - K/2]
// where that coordinate is inside the map (zero padding).
// ---------------------------------------------------------------------------

// The output coordinates [first, end) whose shifted coordinate dst + shift
// lies in [0, size); empty (first == end) when |shift| >= size.
struct ShiftRange {
  int64_t first;
  int64_t end;
};

PE_HOST_DEVICE ShiftRange shift_range(int64_t shift, int64_t size) {
  ShiftRange r;
  r.first = shift < 0 ? -shift : 0;
  r.end = shift > 0 ? size - shift : size;
  if (r.first > size) r.first = size;
  if (r.end < r.first) r.end = r.first;
  return r;
}

// The channel of kernel tap (a, c), output channel o, in a (N, K*K*Cout, h, w)
// tensor of tap products: tap-major, as the 1x1 conv with weight
// W.permute(2, 3, 0, 1).reshape(K*K*Cout, Cin, 1, 1) lays them out.
PE_HOST_DEVICE int64_t tap_channel(int64_t a, int64_t c, int64_t kernel_size,
                                   int64_t cout, int64_t o) {
  return (a * kernel_size + c) * cout + o;
}

// ---------------------------------------------------------------------------
// Max pooling: the comparison ATen's CPU adaptive max pooling uses. A value
// replaces the running maximum when it is larger or NaN, scanning the window
// row-major; so the result is the first maximum, or the last NaN.
// ---------------------------------------------------------------------------

template <typename T>
PE_HOST_DEVICE bool max_pool_takes(T val, T running_max) {
  return val > running_max || val != val;
}

// Combines the (value, flat index) results of two disjoint pieces of one
// window into the result a single row-major scan over the union would give:
// NaN wins, the later NaN among NaNs; otherwise the larger value, the earlier
// index among equal values.
template <typename T>
PE_HOST_DEVICE void max_pool_combine(T& val, int64_t& idx, T other_val,
                                     int64_t other_idx) {
  const bool nan = val != val;
  const bool other_nan = other_val != other_val;
  bool take;
  if (nan || other_nan) {
    take = other_nan && (!nan || other_idx > idx);
  } else {
    take = other_val > val || (other_val == val && other_idx < idx);
  }
  if (take) {
    val = other_val;
    idx = other_idx;
  }
}

// ---------------------------------------------------------------------------
// Pooling windows as data. The Python layer computes each window's [start,
// end) from a window policy (adaptive, SPPNet, Keras 'same') and passes, per
// axis, the flat list [start_0, end_0, start_1, end_1, ...] over every level.
// The union of all window boundaries cuts the axis into segments; reducing
// each segment x segment cell once and combining cells into windows pools
// every level in one pass over the input, also where windows overlap.
// ---------------------------------------------------------------------------

struct AxisSegments {
  // Segment s covers [cuts[s], cuts[s + 1]).
  std::vector<int64_t> cuts;
  // Window k covers segments [seg_begin[k], seg_end[k]).
  std::vector<int64_t> seg_begin;
  std::vector<int64_t> seg_end;
  // Segment of each coordinate in [0, size), or -1 where no window reads it.
  std::vector<int64_t> seg_of;

  int64_t num_segments() const {
    return static_cast<int64_t>(cuts.size()) - 1;
  }
  int64_t num_windows() const { return static_cast<int64_t>(seg_begin.size()); }
};

// `bounds` holds 2 * num_windows values; every window must satisfy
// 0 <= start < end <= size (make_window_plan in pool_plan.h checks it).
inline AxisSegments make_axis_segments(const int64_t* bounds,
                                       int64_t num_windows, int64_t size) {
  AxisSegments a;
  std::vector<char> is_cut(static_cast<size_t>(size + 1), 0);
  std::vector<char> covered(static_cast<size_t>(size), 0);
  for (int64_t k = 0; k < num_windows; ++k) {
    const int64_t s = bounds[2 * k], e = bounds[2 * k + 1];
    is_cut[s] = 1;
    is_cut[e] = 1;
    for (int64_t i = s; i < e; ++i) covered[i] = 1;
  }
  std::vector<int64_t> seg_at(static_cast<size_t>(size + 1), -1);
  for (int64_t i = 0; i <= size; ++i) {
    if (is_cut[i]) {
      seg_at[i] = static_cast<int64_t>(a.cuts.size());
      a.cuts.push_back(i);
    }
  }
  a.seg_of.assign(static_cast<size_t>(size), -1);
  int64_t seg = -1;
  for (int64_t i = 0; i < size; ++i) {
    if (is_cut[i]) seg = seg_at[i];
    if (covered[i]) a.seg_of[i] = seg;
  }
  a.seg_begin.resize(static_cast<size_t>(num_windows));
  a.seg_end.resize(static_cast<size_t>(num_windows));
  for (int64_t k = 0; k < num_windows; ++k) {
    a.seg_begin[k] = seg_at[bounds[2 * k]];
    a.seg_end[k] = seg_at[bounds[2 * k + 1]];
  }
  return a;
}

// Layout of the packed pooling output: for each sample, level after level,
// each level a block of C * bh * bw values, either channel-major (C, bh, bw)
// or, for channels_last levels, (bh, bw, C). Offsets are per sample.
PE_HOST_DEVICE int64_t packed_index(int64_t level_offset, int64_t channels,
                                    int64_t bh, int64_t bw, int64_t c,
                                    int64_t i, int64_t j,
                                    bool channels_last_levels) {
  (void)bh;
  return channels_last_levels ? level_offset + (i * bw + j) * channels + c
                              : level_offset + (c * bh + i) * bw + j;
}

}  // namespace pyramid_ext
