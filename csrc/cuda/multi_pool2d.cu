// CUDA kernels of pyramid_ext::multi_pool2d and multi_pool2d_backward.
//
// Forward, one pass over x: every window boundary of every level cuts each
// axis into segments (make_axis_segments); each segment x segment cell is
// reduced once (sum, or max with its flat index), then the cells are combined
// into every level's bins. The plan (cuts, windows -> segment ranges, level
// table) travels by value in a kernel argument when it fits (no host-to-device
// copy, CUDA-graph friendly); otherwise a direct kernel, one thread per bin
// looping over its window, handles any number of windows.
//
// Backward is a gather without atomics: for avg, the gradient is constant
// over a cell (computed once per cell, then written over the cell); for max,
// each element sums, level after level, the grads of the covering bins whose
// index is its own flat index.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "cuda/common.cuh"
#include "pool_plan.h"
#include "pyramid_index.h"

namespace pyramid_ext {
namespace cuda {
namespace {

// Plan limits: make_axis_segments' segments per axis (plus the uncovered head
// and tail this plan adds), windows per axis, levels.
constexpr int kMaxCutSegs = 64;
constexpr int kMaxSeg = kMaxCutSegs + 2;
constexpr int kMaxWin = 256;
constexpr int kMaxLevels = 32;
constexpr int kThreads = 256;

// One axis: segment s is [cut[s], cut[s + 1]); the segments tile [0, size),
// `covered` says whether any window reads segment s; window k spans segments
// [win_seg[k][0], win_seg[k][1]).
struct AxisPlan {
  int32_t nseg;
  int32_t cut[kMaxSeg + 1];
  uint8_t covered[kMaxSeg];
  uint8_t win_seg[kMaxWin][2];
};

// Level l: bh[l] x bw[l] bins over the H windows [hoff, hoff + bh) and the W
// windows [woff, woff + bw); its block starts at C * boff[l] in each sample's
// packed output; boff[nlevels] = T = sum(bh * bw).
struct PoolPlan {
  AxisPlan h;
  AxisPlan w;
  int32_t nlevels;
  int32_t bh[kMaxLevels];
  int32_t bw[kMaxLevels];
  int32_t hoff[kMaxLevels];
  int32_t woff[kMaxLevels];
  int32_t boff[kMaxLevels + 1];
};
static_assert(sizeof(PoolPlan) <= 4000, "PoolPlan must fit a 4 KB kernel argument");

// Fills `ax` from one axis' segments; false when the axis exceeds the limits.
bool build_axis(const AxisSegments& a, int64_t size, AxisPlan& ax) {
  if (a.num_windows() > kMaxWin || size > std::numeric_limits<int32_t>::max()) return false;
  if (a.num_segments() > kMaxCutSegs) return false;
  std::vector<int64_t> cuts;
  int shift = 0;
  if (a.cuts.empty()) {
    cuts = {0, size};
  } else {
    if (a.cuts.front() > 0) {
      cuts.push_back(0);
      shift = 1;
    }
    cuts.insert(cuts.end(), a.cuts.begin(), a.cuts.end());
    if (a.cuts.back() < size) cuts.push_back(size);
  }
  ax.nseg = static_cast<int32_t>(cuts.size()) - 1;
  for (size_t s = 0; s < cuts.size(); ++s) ax.cut[s] = static_cast<int32_t>(cuts[s]);
  for (int s = 0; s < ax.nseg; ++s) {
    // No window boundary lies inside a segment, so its first coordinate
    // tells whether the whole segment is read.
    ax.covered[s] = a.seg_of[static_cast<size_t>(cuts[s])] >= 0 ? 1 : 0;
  }
  for (int64_t k = 0; k < a.num_windows(); ++k) {
    ax.win_seg[k][0] = static_cast<uint8_t>(a.seg_begin[k] + shift);
    ax.win_seg[k][1] = static_cast<uint8_t>(a.seg_end[k] + shift);
  }
  return true;
}

// The kernel argument for the window plan `wp` of an H x W map; false when
// the plan exceeds the limits (the direct kernels take any plan).
bool build_plan(const WindowPlan& wp, int64_t H, int64_t W, PoolPlan& plan) {
  const int64_t nlevels = wp.levels();
  if (nlevels > kMaxLevels) return false;
  if (!build_axis(wp.h, H, plan.h) || !build_axis(wp.w, W, plan.w)) return false;
  plan.nlevels = static_cast<int32_t>(nlevels);
  for (int64_t l = 0; l < nlevels; ++l) {
    plan.bh[l] = static_cast<int32_t>(wp.bh[l]);
    plan.bw[l] = static_cast<int32_t>(wp.bw[l]);
    plan.hoff[l] = static_cast<int32_t>(wp.win_h0[l]);
    plan.woff[l] = static_cast<int32_t>(wp.win_w0[l]);
    plan.boff[l] = static_cast<int32_t>(wp.first_bin[l]);
  }
  plan.boff[nlevels] = static_cast<int32_t>(wp.total);
  return true;
}

// The direct kernels' table (int64, on the device): per level (bh, bw, hoff,
// woff, boff), then the H bounds, then the W bounds.
at::Tensor direct_table(const WindowPlan& wp, at::IntArrayRef hb, at::IntArrayRef wb, const at::Device& device) {
  const int64_t nlevels = wp.levels();
  std::vector<int64_t> t;
  t.reserve(static_cast<size_t>(5 * nlevels) + hb.size() + wb.size());
  for (int64_t l = 0; l < nlevels; ++l) {
    t.insert(t.end(), {wp.bh[l], wp.bw[l], wp.win_h0[l], wp.win_w0[l], wp.first_bin[l]});
  }
  t.insert(t.end(), hb.begin(), hb.end());
  t.insert(t.end(), wb.begin(), wb.end());
  at::Tensor host = at::empty({static_cast<int64_t>(t.size())}, at::TensorOptions().dtype(at::kLong));
  std::copy(t.begin(), t.end(), host.data_ptr<int64_t>());
  return host.to(device);
}

// Threads for a kernel that gives one block to each (n, c) plane.
int plane_threads(int64_t plane_size) {
  const int64_t want = ceil_div(ceil_div(plane_size, 8), kWarp) * kWarp;
  return static_cast<int>(std::min<int64_t>(std::max<int64_t>(want, kWarp), kThreads));
}

// How many parts each cell is cut into so that `workers` workers all get work.
int splits_for(int64_t ncells, int workers) {
  return ncells >= workers ? 1 : static_cast<int>(ceil_div(workers, ncells));
}

__host__ __device__ inline int64_t align8(int64_t bytes) { return (bytes + 7) / 8 * 8; }

// Channels per block for the channels_last kernels (threadIdx.x over C).
int channel_tile(int64_t C) {
  int ct = 1;
  while (ct < kWarp && ct < C) ct *= 2;
  return ct;
}

__device__ __forceinline__ bool covers(const uint8_t (&ws)[2], int s) {
  return s >= ws[0] && s < ws[1];
}

// ---------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------

// Average pooling's long sums: each thread sums float runs of at most
// kRunLength elements (RunSum, common.cuh), its runs, the warp tree, and the
// combination of cell parts into bins are double, the mean is divided in
// double. The planned kernels keep each cell part in shared memory rounded
// once to acc_t (float parts: the shared-memory plan is unchanged); those
// parts are few (at most 66 x 66 cells x 8 splits), so an element passes at
// most kRunLength - 1 + 1 float roundings and, for up to 2^31 elements,
// fewer than 2^31 / 12 + 40000 double additions: with the final rounding
//   |mean - exact| <= (14 * 2^-24 + 2^-25) mean(|x|) < 8.7e-7 mean(|x|)
// (the direct kernels skip the part rounding). Float accumulation drifted by
// up to n * 2^-24 (8e-5 on a 46341^2 map).

// pool_fwd_rows_kernel's shared scratch per warp: a row's column results
// (double sums; or acc_t maxima and their int64 indices).
template <typename acc_t, bool kMax>
__host__ __device__ inline int64_t rows_scratch_bytes(int64_t W) {
  return kMax ? align8(W * static_cast<int64_t>(sizeof(acc_t))) + W * static_cast<int64_t>(sizeof(int64_t))
              : W * static_cast<int64_t>(sizeof(double));
}

// Columns per lane of pool_fwd_rows_kernel for rows of W pixels; 0: too wide
// (the per-cell kernel takes them).
inline int rows_kernel_cols(int64_t W) { return W <= kWarp ? 1 : W <= 2 * kWarp ? 2 : W <= 4 * kWarp ? 4 : 0; }

// Bin (i, j) of level l, channel c of sample n, from the cell parts in shared
// memory (part p of cell (sh, sw) at `((sh * nsw + sw) * splits + p) * stride
// + lane`), written at its packed position: the second phase of the planned
// kernels (NCHW: stride 1, lane 0; channels_last: a lane per channel of the tile).
template <typename scalar_t, typename acc_t, bool kMax>
__device__ __forceinline__ void write_bin(const PoolPlan& plan, int l, int i, int j, int splits, int stride, int lane,
                                          const acc_t* part_val, const int64_t* part_idx, int64_t n, int64_t c,
                                          int64_t C, int64_t T, bool cl_levels, scalar_t* __restrict__ values,
                                          int64_t* __restrict__ indices) {
  const int nsw = plan.w.nseg;
  const int hs = plan.h.win_seg[plan.hoff[l] + i][0];
  const int he = plan.h.win_seg[plan.hoff[l] + i][1];
  const int ws = plan.w.win_seg[plan.woff[l] + j][0];
  const int we = plan.w.win_seg[plan.woff[l] + j][1];
  double sum = 0.0;
  acc_t best = neg_inf<acc_t>();
  int64_t best_idx = kNoIndex;
  for (int sh = hs; sh < he; ++sh) {
    for (int sw = ws; sw < we; ++sw) {
      const int base = (sh * nsw + sw) * splits;
      for (int p = 0; p < splits; ++p) {
        const int at = (base + p) * stride + lane;
        if constexpr (kMax) {
          max_pool_combine(best, best_idx, part_val[at], part_idx[at]);
        } else {
          sum += part_val[at];
        }
      }
    }
  }
  const int64_t o = packed_index(n * C * T + C * plan.boff[l], C, plan.bh[l], plan.bw[l], c, i, j, cl_levels);
  if constexpr (kMax) {
    values[o] = static_cast<scalar_t>(best);
    indices[o] = best_idx;
  } else {
    const int64_t area = int64_t{plan.h.cut[he] - plan.h.cut[hs]} * (plan.w.cut[we] - plan.w.cut[ws]);
    values[o] = static_cast<scalar_t>(static_cast<acc_t>(sum / static_cast<double>(area)));
  }
}

// The bins of one (n, c) plane from its cell parts (the NCHW kernels):
// threads over each level's bins.
template <typename scalar_t, typename acc_t, bool kMax>
__device__ __forceinline__ void write_plane_bins(const PoolPlan& plan, const acc_t* part_val, const int64_t* part_idx,
                                                 int splits, int64_t plane, int64_t C, int64_t T, bool cl_levels,
                                                 scalar_t* __restrict__ values, int64_t* __restrict__ indices) {
  const int64_t n = plane / C;
  const int64_t c = plane % C;
  for (int l = 0; l < plan.nlevels; ++l) {
    const int bw = plan.bw[l];
    for (int b = threadIdx.x; b < plan.bh[l] * bw; b += blockDim.x) {
      write_bin<scalar_t, acc_t, kMax>(plan, l, b / bw, b % bw, splits, 1, 0, part_val, part_idx, n, c, C, T,
                                       cl_levels, values, indices);
    }
  }
}

// NCHW: one block per (n, c) plane. Warps reduce cell parts (lanes stride the
// part's elements in row-major order, then a shuffle tree), parts go to shared
// memory, then threads combine parts into every level's bins.
template <typename scalar_t, typename acc_t, bool kMax>
__global__ void pool_fwd_nchw_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ values,
                                     int64_t* __restrict__ indices, const __grid_constant__ PoolPlan plan,
                                     int64_t planes, int64_t C, int64_t H, int64_t W, int splits,
                                     bool cl_levels) {
  PE_DYNAMIC_SHARED(smem);
  const int nsw = plan.w.nseg;
  const int nitems = plan.h.nseg * nsw * splits;
  acc_t* part_val = reinterpret_cast<acc_t*>(smem);
  int64_t* part_idx = reinterpret_cast<int64_t*>(smem + align8(int64_t{nitems} * sizeof(acc_t)));
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const int nwarps = blockDim.x / kWarp;
  const int64_t T = plan.boff[plan.nlevels];

  for (int64_t plane = blockIdx.x; plane < planes; plane += gridDim.x) {
    const scalar_t* xp = x + plane * H * W;
    for (int item = warp; item < nitems; item += nwarps) {
      const int cell = item / splits;
      const int part = item % splits;
      const int sh = cell / nsw;
      const int sw = cell % nsw;
      if (!plan.h.covered[sh] || !plan.w.covered[sw]) continue;  // warp-uniform
      const int64_t h0 = plan.h.cut[sh];
      const int64_t w0 = plan.w.cut[sw];
      const int64_t cw = plan.w.cut[sw + 1] - w0;
      const int64_t cells = (plan.h.cut[sh + 1] - h0) * cw;
      const int64_t e_end = cells * (part + 1) / splits;
      int64_t e = cells * part / splits + lane;
      int64_t r = e / cw;
      int64_t col = e % cw;
      const int64_t dq = kWarp / cw;
      const int64_t dr = kWarp % cw;
      RunSum<acc_t> sum;
      acc_t best = neg_inf<acc_t>();
      int64_t best_idx = kNoIndex;
      for (; e < e_end; e += kWarp) {
        const int64_t flat = (h0 + r) * W + (w0 + col);
        const acc_t v = static_cast<acc_t>(xp[flat]);
        if constexpr (kMax) {
          max_pool_combine(best, best_idx, v, flat);
        } else {
          sum.add(v);
        }
        col += dr;
        r += dq;
        if (col >= cw) {
          col -= cw;
          ++r;
        }
      }
      if constexpr (kMax) {
        warp_max(best, best_idx);
        if (lane == 0) {
          part_val[item] = best;
          part_idx[item] = best_idx;
        }
      } else {
        const double total = warp_sum(sum.sum());
        if (lane == 0) part_val[item] = static_cast<acc_t>(total);
      }
    }
#if PE_EMU_PLANT_BUG != 1  // test-only (tests/test_cuda_emu.py): the barrier removed
    __syncthreads();
#endif

    write_plane_bins<scalar_t, acc_t, kMax>(plan, part_val, part_idx, splits, plane, C, T, cl_levels, values,
                                            indices);
    __syncthreads();  // the next plane reuses the shared parts
  }
}

// NCHW rows of at most kWarp * kCols pixels: one block per (n, c) plane; a
// warp reads whole rows (lane j holds columns j, j + 32, ...: every load
// coalesced) of one band of an H-segment's rows (`splits` bands per segment),
// keeping one RunSum (or running max) per column; at the band's end the column
// results go to the warp's shared scratch and lane t combines W-segment t's
// columns, in order, into that cell's part. The bins are then made from the
// parts as in pool_fwd_nchw_kernel (write_plane_bins). Per element a load and
// an add; the per-cell kernel spends, per cell, 64-bit index divisions and a
// shuffle tree, which dominate on maps of small cells (the first H200 timings,
// DESIGN). Precision: the per-cell kernel's (float runs of at most 12 rows in
// a column, then double: columns, the part rounded once to acc_t).
template <typename scalar_t, typename acc_t, bool kMax, int kCols>
__global__ void pool_fwd_rows_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ values,
                                     int64_t* __restrict__ indices, const __grid_constant__ PoolPlan plan,
                                     int64_t planes, int64_t C, int64_t H, int64_t W, int splits,
                                     bool cl_levels) {
  PE_DYNAMIC_SHARED(smem);
  const int nsh = plan.h.nseg;
  const int nsw = plan.w.nseg;
  const int nitems = nsh * nsw * splits;
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const int nwarps = blockDim.x / kWarp;
  const int width = static_cast<int>(W);
  acc_t* part_val = reinterpret_cast<acc_t*>(smem);
  int64_t* part_idx = reinterpret_cast<int64_t*>(smem + align8(int64_t{nitems} * sizeof(acc_t)));
  unsigned char* scratch = smem + align8(int64_t{nitems} * sizeof(acc_t)) +
                           (kMax ? int64_t{nitems} * sizeof(int64_t) : 0) + warp * rows_scratch_bytes<acc_t, kMax>(W);
  double* col_sum = reinterpret_cast<double*>(scratch);
  acc_t* col_max = reinterpret_cast<acc_t*>(scratch);
  int64_t* col_idx = reinterpret_cast<int64_t*>(scratch + align8(W * static_cast<int64_t>(sizeof(acc_t))));
  const int64_t T = plan.boff[plan.nlevels];

  for (int64_t plane = blockIdx.x; plane < planes; plane += gridDim.x) {
    const scalar_t* xp = x + plane * H * W;
    for (int item = warp; item < nsh * splits; item += nwarps) {
      const int sh = item / splits;
      const int part = item % splits;
      if (!plan.h.covered[sh]) continue;  // warp-uniform
      const int h0 = plan.h.cut[sh];
      const int64_t rows = plan.h.cut[sh + 1] - h0;
      const int r0 = h0 + static_cast<int>(rows * part / splits);
      const int r1 = h0 + static_cast<int>(rows * (part + 1) / splits);
      RunSum<acc_t> sum[kCols];
      acc_t best[kCols];
      int64_t best_idx[kCols];
#pragma unroll
      for (int k = 0; k < kCols; ++k) {
        best[k] = neg_inf<acc_t>();
        best_idx[k] = kNoIndex;
      }
      for (int r = r0; r < r1; ++r) {
        const scalar_t* row = xp + int64_t{r} * W;
#pragma unroll
        for (int k = 0; k < kCols; ++k) {
          const int col = lane + k * kWarp;
          if (col < width) {
            const acc_t v = static_cast<acc_t>(row[col]);
            if constexpr (kMax) {
              max_pool_combine(best[k], best_idx[k], v, int64_t{r} * W + col);
            } else {
              sum[k].add(v);
            }
          }
        }
      }
#pragma unroll
      for (int k = 0; k < kCols; ++k) {
        const int col = lane + k * kWarp;
        if (col < width) {
          if constexpr (kMax) {
            col_max[col] = best[k];
            col_idx[col] = best_idx[k];
          } else {
            col_sum[col] = sum[k].sum();
          }
        }
      }
      __syncwarp();
      for (int sw = lane; sw < nsw; sw += kWarp) {
        if (!plan.w.covered[sw]) continue;
        const int at = (sh * nsw + sw) * splits + part;
        if constexpr (kMax) {
          acc_t b = neg_inf<acc_t>();
          int64_t bi = kNoIndex;
          for (int col = plan.w.cut[sw]; col < plan.w.cut[sw + 1]; ++col) {
            max_pool_combine(b, bi, col_max[col], col_idx[col]);
          }
          part_val[at] = b;
          part_idx[at] = bi;
        } else {
          double total = 0.0;
          for (int col = plan.w.cut[sw]; col < plan.w.cut[sw + 1]; ++col) total += col_sum[col];
          part_val[at] = static_cast<acc_t>(total);
        }
      }
      __syncwarp();  // the warp's next band rewrites its scratch
    }
#if PE_EMU_PLANT_BUG != 1  // test-only (tests/test_cuda_emu.py): the barrier removed
    __syncthreads();
#endif
    write_plane_bins<scalar_t, acc_t, kMax>(plan, part_val, part_idx, splits, plane, C, T, cl_levels, values,
                                            indices);
    __syncthreads();  // the next plane reuses the shared parts
  }
}

// channels_last: one block per (n, tile of blockDim.x channels); threadIdx.x
// runs over the contiguous C dimension (coalesced loads), threadIdx.y over
// cell parts, each reduced sequentially in row-major order.
template <typename scalar_t, typename acc_t, bool kMax>
__global__ void pool_fwd_cl_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ values,
                                   int64_t* __restrict__ indices, const __grid_constant__ PoolPlan plan,
                                   int64_t N, int64_t C, int64_t H, int64_t W, int64_t ctiles, int splits,
                                   bool cl_levels) {
  PE_DYNAMIC_SHARED(smem);
  const int CT = blockDim.x;
  const int R = blockDim.y;
  const int tx = threadIdx.x;
  const int nsw = plan.w.nseg;
  const int nitems = plan.h.nseg * nsw * splits;
  acc_t* part_val = reinterpret_cast<acc_t*>(smem);
  int64_t* part_idx = reinterpret_cast<int64_t*>(smem + align8(int64_t{nitems} * CT * sizeof(acc_t)));
  const int64_t T = plan.boff[plan.nlevels];

  for (int64_t blk = blockIdx.x; blk < N * ctiles; blk += gridDim.x) {
    const int64_t n = blk / ctiles;
    const int64_t c = (blk % ctiles) * CT + tx;
    const bool valid = c < C;
    const scalar_t* xn = x + n * H * W * C + c;
    for (int item = threadIdx.y; item < nitems; item += R) {
      const int cell = item / splits;
      const int part = item % splits;
      const int sh = cell / nsw;
      const int sw = cell % nsw;
      if (!valid || !plan.h.covered[sh] || !plan.w.covered[sw]) continue;
      const int64_t h0 = plan.h.cut[sh];
      const int64_t w0 = plan.w.cut[sw];
      const int64_t cw = plan.w.cut[sw + 1] - w0;
      const int64_t cells = (plan.h.cut[sh + 1] - h0) * cw;
      const int64_t e_end = cells * (part + 1) / splits;
      int64_t e = cells * part / splits;
      int64_t r = e / cw;
      int64_t col = e % cw;
      RunSum<acc_t> sum;
      acc_t best = neg_inf<acc_t>();
      int64_t best_idx = kNoIndex;
      for (; e < e_end; ++e) {
        const int64_t flat = (h0 + r) * W + (w0 + col);
        const acc_t v = static_cast<acc_t>(xn[flat * C]);
        if constexpr (kMax) {
          max_pool_combine(best, best_idx, v, flat);
        } else {
          sum.add(v);
        }
        if (++col == cw) {
          col = 0;
          ++r;
        }
      }
      if constexpr (kMax) {
        part_val[item * CT + tx] = best;
        part_idx[item * CT + tx] = best_idx;
      } else {
        part_val[item * CT + tx] = static_cast<acc_t>(sum.sum());
      }
    }
    __syncthreads();

    if (valid) {
      for (int64_t b = threadIdx.y; b < T; b += R) {
        int l = 0;
        while (b >= plan.boff[l + 1]) ++l;
        const int bw = plan.bw[l];
        const int local = static_cast<int>(b - plan.boff[l]);
        write_bin<scalar_t, acc_t, kMax>(plan, l, local / bw, local % bw, splits, CT, tx, part_val, part_idx, n, c, C,
                                         T, cl_levels, values, indices);
      }
    }
    __syncthreads();
  }
}

// Direct: one thread per output value, scanning its window row-major exactly
// as ATen's CPU adaptive pooling does. Any window count; x read via strides.
template <typename scalar_t, typename acc_t, bool kMax>
__global__ void pool_fwd_direct_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ values,
                                       int64_t* __restrict__ indices, const int64_t* __restrict__ table,
                                       int64_t nlevels, int64_t nh, int64_t N, int64_t C, int64_t H, int64_t W,
                                       int64_t sN, int64_t sC, int64_t sH, int64_t sW, int64_t T,
                                       bool cl_levels) {
  const int64_t* hb = table + 5 * nlevels;
  const int64_t* wb = hb + 2 * nh;
  const int64_t total = N * C * T;
  for (int64_t o = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; o < total;
       o += int64_t{gridDim.x} * blockDim.x) {
    const int64_t n = o / (C * T);
    const int64_t q = o - n * C * T;
    int64_t l = 0;
    while (l + 1 < nlevels && q >= C * table[5 * (l + 1) + 4]) ++l;
    const int64_t bh = table[5 * l], bw = table[5 * l + 1];
    const int64_t local = q - C * table[5 * l + 4];
    int64_t c, ij;
    if (cl_levels) {
      c = local % C;
      ij = local / C;
    } else {
      c = local / (bh * bw);
      ij = local % (bh * bw);
    }
    const int64_t i = ij / bw, j = ij % bw;
    const int64_t hs = hb[2 * (table[5 * l + 2] + i)], he = hb[2 * (table[5 * l + 2] + i) + 1];
    const int64_t ws = wb[2 * (table[5 * l + 3] + j)], we = wb[2 * (table[5 * l + 3] + j) + 1];
    const scalar_t* xp = x + n * sN + c * sC;
    if constexpr (kMax) {
      acc_t best = neg_inf<acc_t>();
      int64_t best_idx = hs * W + ws;
      for (int64_t h = hs; h < he; ++h) {
        for (int64_t w = ws; w < we; ++w) {
          const acc_t v = static_cast<acc_t>(xp[h * sH + w * sW]);
          if (max_pool_takes(v, best)) {
            best = v;
            best_idx = h * W + w;
          }
        }
      }
      values[o] = static_cast<scalar_t>(best);
      indices[o] = best_idx;
    } else {
      RunSum<acc_t> sum;
      for (int64_t h = hs; h < he; ++h) {
        for (int64_t w = ws; w < we; ++w) sum.add(static_cast<acc_t>(xp[h * sH + w * sW]));
      }
      values[o] = static_cast<scalar_t>(static_cast<acc_t>(sum.sum() / static_cast<double>((he - hs) * (we - ws))));
    }
  }
}

// ---------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------

// avg: the gradient of every element of cell (sh, sw) of channel c: the sum,
// level after level, of grad / area over the bins whose windows cover it.
template <typename scalar_t, typename acc_t>
__device__ acc_t avg_cell_grad(const PoolPlan& plan, const scalar_t* __restrict__ g, int64_t C, int64_t c,
                               int sh, int sw, bool cl_levels) {
  acc_t acc = acc_t(0);
  for (int l = 0; l < plan.nlevels; ++l) {
    const int bh = plan.bh[l];
    const int bw = plan.bw[l];
    for (int i = 0; i < bh; ++i) {
      const uint8_t(&hw)[2] = plan.h.win_seg[plan.hoff[l] + i];
      if (!covers(hw, sh)) continue;
      const int64_t area_h = plan.h.cut[hw[1]] - plan.h.cut[hw[0]];
      for (int j = 0; j < bw; ++j) {
        const uint8_t(&ww)[2] = plan.w.win_seg[plan.woff[l] + j];
        if (!covers(ww, sw)) continue;
        const int64_t area = area_h * (plan.w.cut[ww[1]] - plan.w.cut[ww[0]]);
        const int64_t o = packed_index(C * plan.boff[l], C, bh, bw, c, i, j, cl_levels);
        acc += static_cast<acc_t>(g[o]) / static_cast<acc_t>(area);
      }
    }
  }
  return acc;
}

// max: the gradient of the element at flat index `flat` in cell (sh, sw):
// the sum, level after level, of the grads of the covering bins whose index
// is `flat`.
template <typename scalar_t, typename acc_t>
__device__ acc_t max_elem_grad(const PoolPlan& plan, const scalar_t* __restrict__ g,
                               const int64_t* __restrict__ idx, int64_t C, int64_t c, int sh, int sw,
                               int64_t flat, bool cl_levels) {
  acc_t acc = acc_t(0);
  for (int l = 0; l < plan.nlevels; ++l) {
    const int bh = plan.bh[l];
    const int bw = plan.bw[l];
    for (int i = 0; i < bh; ++i) {
      if (!covers(plan.h.win_seg[plan.hoff[l] + i], sh)) continue;
      for (int j = 0; j < bw; ++j) {
        if (!covers(plan.w.win_seg[plan.woff[l] + j], sw)) continue;
        const int64_t o = packed_index(C * plan.boff[l], C, bh, bw, c, i, j, cl_levels);
        if (idx[o] == flat) acc += static_cast<acc_t>(g[o]);
      }
    }
  }
  return acc;
}

// multi_pool2d_backward's optional addend, read through its strides: each
// element written is addend + the pooling gradient rounded to scalar_t (so
// it equals `addend + multi_pool2d_backward(...)` bit for bit).
template <typename scalar_t>
struct Addend {
  const scalar_t* data;  // null: no addend
  int64_t sn, sc, sh, sw;
};

template <typename scalar_t>
__device__ __forceinline__ scalar_t with_addend(const Addend<scalar_t>& a, scalar_t v, int64_t n, int64_t c,
                                                int64_t h, int64_t w) {
  return a.data ? static_cast<scalar_t>(a.data[n * a.sn + c * a.sc + h * a.sh + w * a.sw] + v) : v;
}

// NCHW grad_x: one block per (n, c) plane; warps write cell parts (lanes over
// the part's elements), uncovered cells get zeros.
template <typename scalar_t, typename acc_t, bool kMax>
__global__ void pool_bwd_nchw_kernel(const scalar_t* __restrict__ grad, const int64_t* __restrict__ indices,
                                     scalar_t* __restrict__ gx, const __grid_constant__ PoolPlan plan,
                                     int64_t planes, int64_t C, int64_t H, int64_t W, int splits,
                                     bool cl_levels, const Addend<scalar_t> add) {
  PE_DYNAMIC_SHARED(smem);
  acc_t* cell_val = reinterpret_cast<acc_t*>(smem);
  const int nsw = plan.w.nseg;
  const int ncells = plan.h.nseg * nsw;
  const int nitems = ncells * splits;
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const int nwarps = blockDim.x / kWarp;
  const int64_t T = plan.boff[plan.nlevels];

  for (int64_t plane = blockIdx.x; plane < planes; plane += gridDim.x) {
    const int64_t n = plane / C;
    const int64_t c = plane % C;
    const scalar_t* g = grad + n * C * T;
    const int64_t* idx = kMax ? indices + n * C * T : nullptr;
    scalar_t* out = gx + plane * H * W;
    if constexpr (!kMax) {
      for (int cell = threadIdx.x; cell < ncells; cell += blockDim.x) {
        const int sh = cell / nsw;
        const int sw = cell % nsw;
        cell_val[cell] = (plan.h.covered[sh] && plan.w.covered[sw])
                             ? avg_cell_grad<scalar_t, acc_t>(plan, g, C, c, sh, sw, cl_levels)
                             : acc_t(0);
      }
      __syncthreads();
    }
    for (int item = warp; item < nitems; item += nwarps) {
      const int cell = item / splits;
      const int part = item % splits;
      const int sh = cell / nsw;
      const int sw = cell % nsw;
      const bool covered = plan.h.covered[sh] && plan.w.covered[sw];
      const int64_t h0 = plan.h.cut[sh];
      const int64_t w0 = plan.w.cut[sw];
      const int64_t cw = plan.w.cut[sw + 1] - w0;
      const int64_t cells = (plan.h.cut[sh + 1] - h0) * cw;
      const int64_t e_end = cells * (part + 1) / splits;
      int64_t e = cells * part / splits + lane;
      int64_t r = e / cw;
      int64_t col = e % cw;
      const int64_t dq = kWarp / cw;
      const int64_t dr = kWarp % cw;
      acc_t cell_grad = acc_t(0);
      if constexpr (!kMax) cell_grad = cell_val[cell];
      const scalar_t cell_out = static_cast<scalar_t>(cell_grad);
      for (; e < e_end; e += kWarp) {
        const int64_t flat = (h0 + r) * W + (w0 + col);
        if constexpr (kMax) {
          const acc_t v = covered ? max_elem_grad<scalar_t, acc_t>(plan, g, idx, C, c, sh, sw, flat, cl_levels)
                                  : acc_t(0);
          out[flat] = with_addend(add, static_cast<scalar_t>(v), n, c, h0 + r, w0 + col);
        } else {
          out[flat] = with_addend(add, cell_out, n, c, h0 + r, w0 + col);
        }
        col += dr;
        r += dq;
        if (col >= cw) {
          col -= cw;
          ++r;
        }
      }
    }
    __syncthreads();
  }
}

// channels_last grad_x: one block per (n, channel tile); threadIdx.x over C.
template <typename scalar_t, typename acc_t, bool kMax>
__global__ void pool_bwd_cl_kernel(const scalar_t* __restrict__ grad, const int64_t* __restrict__ indices,
                                   scalar_t* __restrict__ gx, const __grid_constant__ PoolPlan plan, int64_t N,
                                   int64_t C, int64_t H, int64_t W, int64_t ctiles, int splits, bool cl_levels,
                                   const Addend<scalar_t> add) {
  PE_DYNAMIC_SHARED(smem);
  acc_t* cell_val = reinterpret_cast<acc_t*>(smem);
  const int CT = blockDim.x;
  const int R = blockDim.y;
  const int tx = threadIdx.x;
  const int nsw = plan.w.nseg;
  const int ncells = plan.h.nseg * nsw;
  const int nitems = ncells * splits;
  const int64_t T = plan.boff[plan.nlevels];

  for (int64_t blk = blockIdx.x; blk < N * ctiles; blk += gridDim.x) {
    const int64_t n = blk / ctiles;
    const int64_t c = (blk % ctiles) * CT + tx;
    const bool valid = c < C;
    const scalar_t* g = grad + n * C * T;
    const int64_t* idx = kMax ? indices + n * C * T : nullptr;
    scalar_t* out = gx + n * H * W * C + c;
    if constexpr (!kMax) {
      for (int cell = threadIdx.y; cell < ncells; cell += R) {
        const int sh = cell / nsw;
        const int sw = cell % nsw;
        if (valid) {
          cell_val[cell * CT + tx] = (plan.h.covered[sh] && plan.w.covered[sw])
                                         ? avg_cell_grad<scalar_t, acc_t>(plan, g, C, c, sh, sw, cl_levels)
                                         : acc_t(0);
        }
      }
      __syncthreads();
    }
    for (int item = threadIdx.y; item < nitems; item += R) {
      if (!valid) continue;
      const int cell = item / splits;
      const int part = item % splits;
      const int sh = cell / nsw;
      const int sw = cell % nsw;
      const bool covered = plan.h.covered[sh] && plan.w.covered[sw];
      const int64_t h0 = plan.h.cut[sh];
      const int64_t w0 = plan.w.cut[sw];
      const int64_t cw = plan.w.cut[sw + 1] - w0;
      const int64_t cells = (plan.h.cut[sh + 1] - h0) * cw;
      const int64_t e_end = cells * (part + 1) / splits;
      int64_t e = cells * part / splits;
      int64_t r = e / cw;
      int64_t col = e % cw;
      acc_t cell_grad = acc_t(0);
      if constexpr (!kMax) cell_grad = cell_val[cell * CT + tx];
      const scalar_t cell_out = static_cast<scalar_t>(cell_grad);
      for (; e < e_end; ++e) {
        const int64_t flat = (h0 + r) * W + (w0 + col);
        if constexpr (kMax) {
          const acc_t v = covered ? max_elem_grad<scalar_t, acc_t>(plan, g, idx, C, c, sh, sw, flat, cl_levels)
                                  : acc_t(0);
          out[flat * C] = with_addend(add, static_cast<scalar_t>(v), n, c, h0 + r, w0 + col);
        } else {
          out[flat * C] = with_addend(add, cell_out, n, c, h0 + r, w0 + col);
        }
        if (++col == cw) {
          col = 0;
          ++r;
        }
      }
    }
    __syncthreads();
  }
}

// Direct backward: one thread per grad_x element, in grad_x's memory order,
// testing every window of every level.
template <typename scalar_t, typename acc_t, bool kMax>
__global__ void pool_bwd_direct_kernel(const scalar_t* __restrict__ grad, const int64_t* __restrict__ indices,
                                       scalar_t* __restrict__ gx, const int64_t* __restrict__ table,
                                       int64_t nlevels, int64_t nh, int64_t N, int64_t C, int64_t H, int64_t W,
                                       int64_t T, bool cl_levels, bool cl_input, const Addend<scalar_t> add) {
  const int64_t* hb = table + 5 * nlevels;
  const int64_t* wb = hb + 2 * nh;
  const int64_t total = N * C * H * W;
  for (int64_t o = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; o < total;
       o += int64_t{gridDim.x} * blockDim.x) {
    int64_t n, c, h, w;
    if (cl_input) {
      c = o % C;
      int64_t rest = o / C;
      w = rest % W;
      rest /= W;
      h = rest % H;
      n = rest / H;
    } else {
      w = o % W;
      int64_t rest = o / W;
      h = rest % H;
      rest /= H;
      c = rest % C;
      n = rest / C;
    }
    const int64_t flat = h * W + w;
    const scalar_t* g = grad + n * C * T;
    const int64_t* idx = kMax ? indices + n * C * T : nullptr;
    acc_t acc = acc_t(0);
    for (int64_t l = 0; l < nlevels; ++l) {
      const int64_t bh = table[5 * l], bw = table[5 * l + 1];
      const int64_t hoff = table[5 * l + 2], woff = table[5 * l + 3], boff = table[5 * l + 4];
      for (int64_t i = 0; i < bh; ++i) {
        const int64_t hs = hb[2 * (hoff + i)], he = hb[2 * (hoff + i) + 1];
        if (h < hs || h >= he) continue;
        for (int64_t j = 0; j < bw; ++j) {
          const int64_t ws = wb[2 * (woff + j)], we = wb[2 * (woff + j) + 1];
          if (w < ws || w >= we) continue;
          const int64_t po = packed_index(C * boff, C, bh, bw, c, i, j, cl_levels);
          if constexpr (kMax) {
            if (idx[po] == flat) acc += static_cast<acc_t>(g[po]);
          } else {
            acc += static_cast<acc_t>(g[po]) / static_cast<acc_t>((he - hs) * (we - ws));
          }
        }
      }
    }
    gx[o] = with_addend(add, static_cast<scalar_t>(acc), n, c, h, w);
  }
}

// ---------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------

// Which kernel runs one multi_pool2d (or backward) call, and how it is launched.
struct PoolLaunch {
  enum Kind { kPlanes, kChannelTiles, kDirect };
  Kind kind = kDirect;
  unsigned grid = 1;
  dim3 block;
  int64_t smem = 0;    // dynamic shared memory, bytes
  int splits = 1;      // parts per cell (planned kernels)
  int64_t ctiles = 0;  // channel tiles per sample (kChannelTiles)
};

// The launch selection of the forward and the backward: with a plan, an NCHW
// tensor gets the per-plane kernel if its shared memory fits, a channels_last
// tensor the channel-tile kernel with the widest tile whose shared memory
// fits; otherwise the direct kernel, one thread per item of `direct_items`.
// `smem_bytes(splits, tile)`: the planned kernel's dynamic shared memory for
// `splits` parts per cell and `tile` channels per block (1 per plane).
template <typename SmemBytes>
PoolLaunch choose_pool_launch(bool planned, bool nchw, int64_t ncells, int64_t N, int64_t C, int64_t plane_size,
                              int64_t direct_items, SmemBytes smem_bytes) {
  PoolLaunch launch;
  if (planned && nchw) {
    const int threads = plane_threads(plane_size);
    const int splits = splits_for(ncells, threads / kWarp);
    const int64_t smem = smem_bytes(splits, 1);
    if (smem <= max_dynamic_smem()) {
      launch.kind = PoolLaunch::kPlanes;
      launch.grid = grid_for(N * C, 1, threads);
      launch.block = dim3(threads);
      launch.smem = smem;
      launch.splits = splits;
      return launch;
    }
  } else if (planned) {
    for (int ct = channel_tile(C); ct >= 1; ct /= 2) {
      const int rows = kThreads / ct;
      const int splits = splits_for(ncells, rows);
      const int64_t smem = smem_bytes(splits, ct);
      if (smem > max_dynamic_smem()) continue;
      launch.kind = PoolLaunch::kChannelTiles;
      launch.ctiles = ceil_div(C, ct);
      launch.grid = grid_for(N * launch.ctiles, 1, kThreads);
      launch.block = dim3(ct, rows);
      launch.smem = smem;
      launch.splits = splits;
      return launch;
    }
  }
  launch.grid = grid_for(direct_items, kThreads, kThreads);
  launch.block = dim3(kThreads);
  return launch;
}

std::tuple<at::Tensor, at::Tensor> multi_pool2d_cuda(const at::Tensor& x, c10::SymIntArrayRef h_bounds,
                                                     c10::SymIntArrayRef w_bounds, at::IntArrayRef level_bins,
                                                     int64_t mode, bool channels_last_levels) {
  const char* op = "pyramid_ext::multi_pool2d";
  TORCH_CHECK(on_device(x), op, ": x must be a CUDA tensor, got ", x.device());
  const at::IntArrayRef hb = C10_AS_INTARRAYREF_SLOW(h_bounds);
  const at::IntArrayRef wb = C10_AS_INTARRAYREF_SLOW(w_bounds);
  const PoolCall call = check_multi_pool2d(op, x, hb, wb, level_bins, mode);
  const WindowPlan& wp = call.plan;
  const bool nchw = !call.channels_last;
  const int64_t N = call.N, C = call.C, H = call.H, W = call.W;
  // Values-only max (kPoolMaxValues) runs the max kernels and drops the indices.
  const bool is_max = mode != kPoolAvg;

  DeviceGuard guard(x.device());
  at::Tensor values = at::empty({N, C * wp.total}, x.options());
  at::Tensor indices = is_max ? at::empty({N, C * wp.total}, x.options().dtype(at::kLong))
                              : at::empty({0}, x.options().dtype(at::kLong));
  if (values.numel() == 0) return {values, mode == kPoolMax ? indices : at::empty({0}, indices.options())};

  auto stream = current_stream();
  PoolPlan plan;
  const bool planned = build_plan(wp, H, W, plan);
  const int64_t ncells = planned ? int64_t{plan.h.nseg} * plan.w.nseg : 0;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "multi_pool2d_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* vp = values.mutable_data_ptr<scalar_t>();
    int64_t* ip = is_max ? indices.mutable_data_ptr<int64_t>() : nullptr;
    // Partial sums (and for max their indices) of every cell part, per channel of the block.
    auto smem_bytes = [&](int splits, int tile) -> int64_t {
      const int64_t items = ncells * splits * tile;
      return align8(items * static_cast<int64_t>(sizeof(acc_t))) +
             (is_max ? items * static_cast<int64_t>(sizeof(int64_t)) : 0)
#if PE_EMU_PLANT_BUG == 2  // test-only (tests/test_cuda_emu.py): one partial short
             - (nchw ? static_cast<int64_t>(sizeof(acc_t)) : 0)
#endif
          ;
    };
    const PoolLaunch L = choose_pool_launch(planned, nchw, ncells, N, C, H * W, N * C * wp.total, smem_bytes);
    // Rows of at most 128 pixels: the row kernel, the same block per plane,
    // with `splits` bands per H-segment and a column scratch per warp.
    const int cols = rows_kernel_cols(W);
    const int nwarps = static_cast<int>(L.block.x) / kWarp;
    const int band_splits = L.kind == PoolLaunch::kPlanes ? splits_for(plan.h.nseg, nwarps) : 1;
    const int64_t rows_smem =
        smem_bytes(band_splits, 1) + nwarps * (is_max ? rows_scratch_bytes<acc_t, true>(W)
                                                      : rows_scratch_bytes<acc_t, false>(W));
    if (L.kind == PoolLaunch::kPlanes && cols > 0 && rows_smem <= max_dynamic_smem()) {
      auto launch_rows = [&](auto max_tag, auto cols_tag) {
        PE_LAUNCH((pool_fwd_rows_kernel<scalar_t, acc_t, decltype(max_tag)::value, decltype(cols_tag)::value>),
                  L.grid, L.block, rows_smem, stream)(xp, vp, ip, plan, N * C, C, H, W, band_splits,
                                                      channels_last_levels);
      };
      auto with_cols = [&](auto max_tag) {
        if (cols == 1) {
          launch_rows(max_tag, std::integral_constant<int, 1>{});
        } else if (cols == 2) {
          launch_rows(max_tag, std::integral_constant<int, 2>{});
        } else {
          launch_rows(max_tag, std::integral_constant<int, 4>{});
        }
      };
      if (is_max) {
        with_cols(std::true_type{});
      } else {
        with_cols(std::false_type{});
      }
    } else if (L.kind == PoolLaunch::kPlanes) {
      if (is_max) {
        PE_LAUNCH((pool_fwd_nchw_kernel<scalar_t, acc_t, true>), L.grid, L.block, L.smem, stream)(
            xp, vp, ip, plan, N * C, C, H, W, L.splits, channels_last_levels);
      } else {
        PE_LAUNCH((pool_fwd_nchw_kernel<scalar_t, acc_t, false>), L.grid, L.block, L.smem, stream)(
            xp, vp, ip, plan, N * C, C, H, W, L.splits, channels_last_levels);
      }
    } else if (L.kind == PoolLaunch::kChannelTiles) {
      if (is_max) {
        PE_LAUNCH((pool_fwd_cl_kernel<scalar_t, acc_t, true>), L.grid, L.block, L.smem, stream)(
            xp, vp, ip, plan, N, C, H, W, L.ctiles, L.splits, channels_last_levels);
      } else {
        PE_LAUNCH((pool_fwd_cl_kernel<scalar_t, acc_t, false>), L.grid, L.block, L.smem, stream)(
            xp, vp, ip, plan, N, C, H, W, L.ctiles, L.splits, channels_last_levels);
      }
    } else {
      const at::Tensor table = direct_table(wp, hb, wb, x.device());
      const int64_t nlevels = wp.levels(), nh = wp.h.num_windows();
      if (is_max) {
        PE_LAUNCH((pool_fwd_direct_kernel<scalar_t, acc_t, true>), L.grid, L.block, 0, stream)(
            xp, vp, ip, table.const_data_ptr<int64_t>(), nlevels, nh, N, C, H, W, x.stride(0), x.stride(1),
            x.stride(2), x.stride(3), wp.total, channels_last_levels);
      } else {
        PE_LAUNCH((pool_fwd_direct_kernel<scalar_t, acc_t, false>), L.grid, L.block, 0, stream)(
            xp, vp, ip, table.const_data_ptr<int64_t>(), nlevels, nh, N, C, H, W, x.stride(0), x.stride(1),
            x.stride(2), x.stride(3), wp.total, channels_last_levels);
      }
    }
    PE_KERNEL_LAUNCH_CHECK();
  });
  if (mode == kPoolMaxValues) indices = at::empty({0}, indices.options());
  return {values, indices};
}

at::Tensor multi_pool2d_backward_cuda(const at::Tensor& grad_in, const std::optional<at::Tensor>& indices_opt,
                                      c10::SymIntArrayRef input_shape_s, c10::SymIntArrayRef h_bounds,
                                      c10::SymIntArrayRef w_bounds, at::IntArrayRef level_bins, int64_t mode,
                                      bool channels_last_levels, bool channels_last_input,
                                      const std::optional<at::Tensor>& addend) {
  const char* op = "pyramid_ext::multi_pool2d_backward";
  TORCH_CHECK(on_device(grad_in), op, ": grad must be a CUDA tensor, got ", grad_in.device());
  const at::IntArrayRef hb = C10_AS_INTARRAYREF_SLOW(h_bounds);
  const at::IntArrayRef wb = C10_AS_INTARRAYREF_SLOW(w_bounds);
  const PoolCall call = check_multi_pool2d_backward(op, grad_in, indices_opt, C10_AS_INTARRAYREF_SLOW(input_shape_s),
                                                    hb, wb, level_bins, mode, channels_last_input);
  check_pool_addend(op, addend, grad_in, C10_AS_INTARRAYREF_SLOW(input_shape_s));
  const WindowPlan& wp = call.plan;
  const int64_t N = call.N, C = call.C, H = call.H, W = call.W;
  const bool is_max = mode == kPoolMax;
  const at::Tensor indices = is_max ? indices_opt->contiguous() : at::Tensor();

  DeviceGuard guard(grad_in.device());
  const at::Tensor grad = grad_in.contiguous();
  const auto fmt = channels_last_input ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  at::Tensor gx = at::empty({N, C, H, W}, grad.options().memory_format(fmt));
  if (gx.numel() == 0) return gx;

  auto stream = current_stream();
  PoolPlan plan;
  const bool planned = build_plan(wp, H, W, plan);
  const int64_t ncells = planned ? int64_t{plan.h.nseg} * plan.w.nseg : 0;
  // A tensor that is contiguous in both formats (C == 1, or H == W == 1) is
  // written the same either way; the NCHW kernel covers it.
  const bool nchw = gx.is_contiguous();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "multi_pool2d_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    const int64_t* ip = is_max ? indices.const_data_ptr<int64_t>() : nullptr;
    scalar_t* op_ = gx.mutable_data_ptr<scalar_t>();
    Addend<scalar_t> add{nullptr, 0, 0, 0, 0};
    if (addend.has_value() && addend->defined()) {
      add = Addend<scalar_t>{addend->const_data_ptr<scalar_t>(), addend->stride(0), addend->stride(1),
                             addend->stride(2), addend->stride(3)};
    }
    // avg: the gradient of every cell, per channel of the block; max needs none.
    auto smem_bytes = [&](int /*splits*/, int tile) -> int64_t {
      return is_max ? 0 : ncells * tile * static_cast<int64_t>(sizeof(acc_t));
    };
    const PoolLaunch L = choose_pool_launch(planned, nchw, ncells, N, C, H * W, N * C * H * W, smem_bytes);
    if (L.kind == PoolLaunch::kPlanes) {
      if (is_max) {
        PE_LAUNCH((pool_bwd_nchw_kernel<scalar_t, acc_t, true>), L.grid, L.block, L.smem, stream)(
            gp, ip, op_, plan, N * C, C, H, W, L.splits, channels_last_levels, add);
      } else {
        PE_LAUNCH((pool_bwd_nchw_kernel<scalar_t, acc_t, false>), L.grid, L.block, L.smem, stream)(
            gp, ip, op_, plan, N * C, C, H, W, L.splits, channels_last_levels, add);
      }
    } else if (L.kind == PoolLaunch::kChannelTiles) {
      if (is_max) {
        PE_LAUNCH((pool_bwd_cl_kernel<scalar_t, acc_t, true>), L.grid, L.block, L.smem, stream)(
            gp, ip, op_, plan, N, C, H, W, L.ctiles, L.splits, channels_last_levels, add);
      } else {
        PE_LAUNCH((pool_bwd_cl_kernel<scalar_t, acc_t, false>), L.grid, L.block, L.smem, stream)(
            gp, ip, op_, plan, N, C, H, W, L.ctiles, L.splits, channels_last_levels, add);
      }
    } else {
      const at::Tensor table = direct_table(wp, hb, wb, grad.device());
      const int64_t nlevels = wp.levels(), nh = wp.h.num_windows();
      if (is_max) {
        PE_LAUNCH((pool_bwd_direct_kernel<scalar_t, acc_t, true>), L.grid, L.block, 0, stream)(
            gp, ip, op_, table.const_data_ptr<int64_t>(), nlevels, nh, N, C, H, W, wp.total, channels_last_levels,
            !nchw, add);
      } else {
        PE_LAUNCH((pool_bwd_direct_kernel<scalar_t, acc_t, false>), L.grid, L.block, 0, stream)(
            gp, ip, op_, table.const_data_ptr<int64_t>(), nlevels, nh, N, C, H, W, wp.total, channels_last_levels,
            !nchw, add);
      }
    }
    PE_KERNEL_LAUNCH_CHECK();
  });
  return gx;
}

}  // namespace
}  // namespace cuda
}  // namespace pyramid_ext

PE_CUDA_LIBRARY_IMPL(m) {
  m.impl("multi_pool2d", &pyramid_ext::cuda::multi_pool2d_cuda);
  m.impl("multi_pool2d_backward", &pyramid_ext::cuda::multi_pool2d_backward_cuda);
}
