// CPU kernels of upsample_shift_add and its backward (the kernel op of
// upsample_concat_conv2d; contract in docs/DESIGN.md, "Op contracts").
//
// result[n, o, y, x] = base[n, o, y, x] + sum_i sum_{a, c} [in bounds]
//     bilinear(taps[i][n, tap_channel(a, c, K, Cout, o)], y + a - p, x + c - p),  p = K / 2.
// Bilinear resizing is separable, so each tap tensor is resized along one
// axis at its own resolution and along the other at the output's:
// - planar base (NCHW), one task per (n, o) plane: G_a[r][x] = sum_c
//   horizontally interpolated row r of tap (a, c), shifted by c - p (K*h rows
//   of W per tap tensor, in L1/L2; float rows through simd::resize_row's
//   vector permutes), then every output row is
//   base + sum_i sum_a (wy0 * G_a[i0(Y)] + wy1 * G_a[i1(Y)]), Y = y + a - p:
//   2K vector multiply-adds per output element and tap tensor (float: 4
//   planes' rows at a time, simd::shift_add_planes).
// - channels_last base, one task per (n, y) output row, channels in chunks of
//   kChunk: U_c[j] = sum_a vertically interpolated pixel j of tap (a, c)
//   (vector over channels), then every output pixel adds sum_c (wx0 *
//   U_c[j0(X)] + wx1 * U_c[j1(X)]), X = x + c - p (float: a pixel's sums
//   over every (tap tensor, c) in registers, simd::shift_add_pixels).
// Accumulation in the opmath type (float for 16-bit), each output element
// rounded once. The result is written once; base and each tap read once per
// task that needs them.
//
// Backward (gather, no atomics): grad_taps[i][n, tap(a, c) o, r, j] =
// sum_{y, x in bounds} grad[n, o, y, x] wy(y + a - p, r) wx(x + c - p, j), as
// upsample_concat's backward per shift: pass 1 sums grad's rows into the
// source rows r for each a (R_a[r][x], float runs of at most
// simd::kRunLength terms added in double: resize_tables.h RowRunSums and its
// error bound), pass 2 sums each R_a row over the columns that read j,
// shifted by c - p, in double, and rounds once. Planar grad: one task per
// (tap tensor, n, o) plane; channels_last grad: one task per (tap tensor, n,
// source row r, channel chunk), pass 1 over r's reader rows only.
// Every task writes its own outputs in a fixed order: bitwise identical for
// every thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <type_traits>
#include <vector>

#include "cpu/output_buffers.h"
#include "cpu/resize_tables.h"
#include "cpu/simd_loops.h"
#include "cpu/upsample_shift_add.h"
#include "pyramid_index.h"
#include "upsample_shift_add_checks.h"

namespace pyramid_ext {
namespace {

// Channels per vector chunk in the channels_last kernels.
constexpr int64_t kChunk = 64;
// Planes per simd::shift_add_planes call in the planar float forward.
constexpr int64_t kPlanes = 4;

// acc[k] += w * src[k * stride], k < n; the float unit-stride case through
// the ISA-dispatched loop.
template <typename scalar_t, typename acc_t>
inline void axpy(acc_t* acc, const scalar_t* src, int64_t stride, acc_t w, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (stride == 1) return simd::axpy(acc, src, w, n);
  }
  if (stride == 1) {
#pragma omp simd
    for (int64_t k = 0; k < n; ++k) acc[k] += w * static_cast<acc_t>(src[k]);
  } else {
    for (int64_t k = 0; k < n; ++k) acc[k] += w * static_cast<acc_t>(src[k * stride]);
  }
}

// One tap tensor's geometry: sizes, strides (elements) and the resize tables
// from its (h, w) to the output's (H, W).
template <typename acc_t>
struct TapGeometry {
  int64_t h, w, sN, sC, sH, sW;
  std::vector<LinearTap<acc_t>> ty, tx;  // per output row / column
  std::vector<DstRange> ry, rx;          // output rows / columns reading each source row / column
  // With the readers: the planar backward's column factors over rx (the
  // channels_last backward computes each once per vector of channels; read
  // from here it measured slower: (8, 128, 32, 32), K = 3).
  ReaderFactors col_factors;
  // tx for the float forward's vector loops (simd::resize_rows over rows of
  // unit stride, simd::shift_add_pixels' terms over channels_last pixels)
  std::optional<ResizeTableArrays> tx_arrays;

  TapGeometry(const at::Tensor& t, int64_t H, int64_t W, bool align_corners, bool readers)
      : h(t.size(2)), w(t.size(3)), sN(t.stride(0)), sC(t.stride(1)), sH(t.stride(2)), sW(t.stride(3)),
        ty(axis_taps<acc_t>(h, H, align_corners)), tx(axis_taps<acc_t>(w, W, align_corners)) {
    if constexpr (std::is_same_v<acc_t, float>) {
      if (!readers && t.scalar_type() == at::kFloat) tx_arrays.emplace(tx);
    }
    if (readers) {
      ry = axis_readers<acc_t>(h, H, align_corners);
      rx = axis_readers<acc_t>(w, W, align_corners);
      col_factors = ReaderFactors(tx, rx);
    }
  }
};

template <typename scalar_t, typename acc_t>
std::vector<TapGeometry<acc_t>> geometries(const std::vector<at::Tensor>& taps, int64_t H, int64_t W,
                                           bool align_corners, bool readers) {
  std::vector<TapGeometry<acc_t>> g;
  g.reserve(taps.size());
  for (const auto& t : taps) g.emplace_back(t, H, W, align_corners, readers);
  return g;
}

// Each tensor's data pointer (T const: read-only), read once before the
// parallel loops (the checked accessor per plane or task, and stride() per
// element, cost as much as the work on small planes).
template <typename T>
std::vector<T*> data_of(const std::vector<at::Tensor>& ts) {
  std::vector<T*> d;
  for (const at::Tensor& t : ts) {
    if constexpr (std::is_const_v<T>) {
      d.push_back(t.const_data_ptr<std::remove_const_t<T>>());
    } else {
      d.push_back(t.mutable_data_ptr<T>());
    }
  }
  return d;
}

// ------------------------------- forward -----------------------------------

// Planar base and result: one task per (n, o) plane.
template <typename scalar_t>
void forward_planes(const at::Tensor& base, const std::vector<at::Tensor>& taps, int64_t K, bool align_corners,
                    const at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = base.size(0), C = base.size(1), H = base.size(2), W = base.size(3), p = K / 2;
  const auto geo = geometries<scalar_t, acc_t>(taps, H, W, align_corners, false);
  const scalar_t* bp = base.const_data_ptr<scalar_t>();
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  const int64_t bsN = base.stride(0), bsC = base.stride(1), bsH = base.stride(2), bsW = base.stride(3);
  const int64_t osN = out.stride(0), osC = out.stride(1), osH = out.stride(2), osW = out.stride(3);
  int64_t rows_per_plane = 0;  // G rows of all tap tensors
  for (const auto& g : geo) rows_per_plane += K * g.h;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, H * W + rows_per_plane * W));
  // float, unit W strides: each output row's terms (offset of its G row,
  // weight), the same for every plane, in the order of the loop below, for
  // one simd::shift_add_planes call per kPlanes planes.
  std::vector<int64_t> term_off, term_first;
  std::vector<float> term_w;
  const bool rows_call = std::is_same_v<scalar_t, float> && bsW == 1 && osW == 1;
  if (rows_call) {
    for (int64_t y = 0; y < H; ++y) {
      term_first.push_back(static_cast<int64_t>(term_off.size()));
      int64_t g_rows = 0;
      for (const auto& g : geo) {
        for (int64_t a = 0; a < K; ++a) {
          const int64_t Y = y + a - p;
          if (Y < 0 || Y >= H) continue;
          const LinearTap<acc_t>& t = g.ty[Y];
          term_off.push_back(g_rows + (a * g.h + t.i0) * W);
          term_w.push_back(static_cast<float>(t.w0));
          if (t.w1 != acc_t(0)) {
            term_off.push_back(g_rows + (a * g.h + t.i1) * W);
            term_w.push_back(static_cast<float>(t.w1));
          }
        }
        g_rows += K * g.h * W;
      }
    }
    term_first.push_back(static_cast<int64_t>(term_off.size()));
  }
  // K = 1 and every tap tensor's rows through simd::resize_rows: each G row
  // is written whole (the one shift is zero), not added to a zeroed one.
  const bool write_rows = std::is_same_v<scalar_t, float> && K == 1 &&
                          std::all_of(geo.begin(), geo.end(), [](const auto& g) { return g.tx_arrays && g.sW == 1; });
  // Each tap tensor's data (data_of: the checked accessor per plane was a
  // twentieth of the kernel on (16, 64, 16, 16)) and where its elements end
  // (the floats after a plane's row that its vector loads may read).
  const std::vector<const scalar_t*> tap_data = data_of<const scalar_t>(taps);
  std::vector<const scalar_t*> tap_ends;
  for (size_t i = 0; i < taps.size(); ++i) {
    int64_t last = 0;
    for (int64_t d = 0; d < taps[i].dim(); ++d) last += (taps[i].size(d) - 1) * taps[i].stride(d);
    tap_ends.push_back(tap_data[i] + last + 1);
  }
  // float rows: kPlanes planes per simd::shift_add_planes call (their G rows side by side)
  const int64_t group = rows_call ? kPlanes : 1;
  // base's and the result's planes prefetched while G is computed, where a
  // group's fit in L1 (4 KiB each)
  const bool prefetch = rows_call && H * W * static_cast<int64_t>(sizeof(scalar_t)) <= 4096;
  at::parallel_for(0, N * C, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> G(static_cast<size_t>(group * rows_per_plane * W));
    std::vector<acc_t> row(static_cast<size_t>(W));
    float* out_planes[kPlanes];
    const float* base_planes[kPlanes];
    for (int64_t task0 = begin; task0 < end; task0 += group) {
      const int64_t planes = std::min(group, end - task0);
      for (int64_t q = 0; q < planes; ++q) {
        const int64_t task = task0 + q, n = task / C, o = task % C;
        const scalar_t* bplane = bp + n * bsN + o * bsC;
        scalar_t* oplane = op + n * osN + o * osC;
        if (prefetch) {
          // in flight while G is computed: read by shift_add_planes only,
          // base's loads had been most of its time on (16, 64, 16, 16)
          for (int64_t y = 0; y < H; ++y) {
            for (int64_t x = 0; x < W; x += 64 / static_cast<int64_t>(sizeof(scalar_t))) {
              __builtin_prefetch(bplane + y * bsH + x);
              __builtin_prefetch(oplane + y * osH + x, 1);
            }
          }
        }
        // G rows of plane q: tap tensor after tap tensor, a-major, then source row.
        acc_t* g_plane = G.data() + q * rows_per_plane * W;
        if (!write_rows) std::fill(g_plane, g_plane + rows_per_plane * W, acc_t(0));
        acc_t* g_of = g_plane;
        for (size_t i = 0; i < geo.size(); ++i) {
          const auto& g = geo[i];
          const scalar_t* tp = tap_data[i] + n * g.sN;
          for (int64_t a = 0; a < K; ++a) {
            for (int64_t c = 0; c < K; ++c) {
              const ShiftRange xs = shift_range(c - p, W);
              const scalar_t* plane = tp + tap_channel(a, c, K, C, o) * g.sC;
              if constexpr (std::is_same_v<scalar_t, float>) {
                if (g.tx_arrays && g.sW == 1) {  // the plane's rows in one call
                  const int64_t readable = tap_ends[i] - plane;
                  simd::resize_rows(g_of + a * g.h * W + xs.first, W, plane, g.sH, g.h, g.w, readable,
                                    g.tx_arrays->from(xs.first + c - p), xs.end - xs.first, !write_rows);
                  continue;
                }
              }
              for (int64_t r = 0; r < g.h; ++r) {
                const scalar_t* s = plane + r * g.sH;
                acc_t* d = g_of + (a * g.h + r) * W;
                for (int64_t x = xs.first; x < xs.end; ++x) {
                  const LinearTap<acc_t>& t = g.tx[x + c - p];
                  d[x] += t.w0 * static_cast<acc_t>(s[t.i0 * g.sW]) + t.w1 * static_cast<acc_t>(s[t.i1 * g.sW]);
                }
              }
            }
          }
          g_of += K * g.h * W;
        }
        if constexpr (std::is_same_v<scalar_t, float>) {
          if (rows_call) {
            out_planes[q] = oplane;
            base_planes[q] = bplane;
            continue;
          }
        }
        for (int64_t y = 0; y < H; ++y) {
          const scalar_t* b = bplane + y * bsH;
          for (int64_t x = 0; x < W; ++x) row[x] = static_cast<acc_t>(b[x * bsW]);
          const acc_t* g_rows = g_plane;
          for (const auto& g : geo) {
            for (int64_t a = 0; a < K; ++a) {
              const int64_t Y = y + a - p;
              if (Y < 0 || Y >= H) continue;
              const LinearTap<acc_t>& t = g.ty[Y];
              const acc_t* ga = g_rows + a * g.h * W;
              axpy<acc_t, acc_t>(row.data(), ga + t.i0 * W, 1, t.w0, W);
              if (t.w1 != acc_t(0)) axpy<acc_t, acc_t>(row.data(), ga + t.i1 * W, 1, t.w1, W);
            }
            g_rows += K * g.h * W;
          }
          scalar_t* d = oplane + y * osH;
          if (osW == 1) {
#pragma omp simd
            for (int64_t x = 0; x < W; ++x) d[x] = static_cast<scalar_t>(row[x]);
          } else {
            for (int64_t x = 0; x < W; ++x) d[x * osW] = static_cast<scalar_t>(row[x]);
          }
        }
      }
      if constexpr (std::is_same_v<scalar_t, float>) {
        if (rows_call)
          simd::shift_add_planes(out_planes, osH, base_planes, bsH, G.data(), rows_per_plane * W, term_off.data(),
                                 term_w.data(), term_first.data(), H, W, planes);
      }
    }
  });
}

// forward_pixels for float with every tap tensor's tables in float: each
// (tap tensor, c)'s U rows are computed first (simd::axpy_pixels, a call
// per source row and weight), then the output row's pixels from base and
// every term in one simd::shift_add_pixels call, the sums in registers (a
// call per tap tensor and c that added its terms into a row buffer in
// memory, copied out at the end, took 1.7x as long on (16, 64, 16, 16) with
// taps of bins 1, 2, 3, 6). The same arithmetic, in the same order.
void forward_pixels_float(const at::Tensor& base, const std::vector<at::Tensor>& taps,
                          const std::vector<TapGeometry<float>>& geo, int64_t K, const at::Tensor& out) {
  const int64_t N = base.size(0), C = base.size(1), H = base.size(2), W = base.size(3), p = K / 2;
  // U block of (tap tensor i, c): g.w pixels of kChunk floats, at u_first[i * K + c].
  std::vector<int64_t> u_first;
  int64_t u_size = 0;
  for (const auto& g : geo) {
    for (int64_t c = 0; c < K; ++c) {
      u_first.push_back(u_size);
      u_size += g.w * kChunk;
    }
  }
  // Output pixel x's terms, (tap tensor, c) in order; the same for every row
  // (Y = y reads inside the map for a = p, so every (i, c) block holds a sum).
  std::vector<simd::PixelTerm> terms;
  std::vector<int64_t> first;
  for (int64_t x = 0; x < W; ++x) {
    first.push_back(static_cast<int64_t>(terms.size()));
    for (size_t i = 0; i < geo.size(); ++i) {
      for (int64_t c = 0; c < K; ++c) {
        const int64_t X = x + c - p;
        if (X < 0 || X >= W) continue;
        const LinearTap<float>& t = geo[i].tx[X];
        const int64_t block = u_first[i * K + c];
        terms.push_back({block + t.i0 * kChunk, block + t.i1 * kChunk, t.w0, t.w1});
      }
    }
  }
  first.push_back(static_cast<int64_t>(terms.size()));
  const float* bp = base.const_data_ptr<float>();
  float* op = out.mutable_data_ptr<float>();
  const std::vector<const float*> tap_data = data_of<const float>(taps);
  const int64_t bsN = base.stride(0), bsH = base.stride(2), bsW = base.stride(3);
  const int64_t osN = out.stride(0), osH = out.stride(2), osW = out.stride(3);
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, W * C));
  at::parallel_for(0, N * H, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> U(static_cast<size_t>(u_size));
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / H, y = task % H;
      for (int64_t c0 = 0; c0 < C; c0 += kChunk) {
        const int64_t cn = std::min(kChunk, C - c0);
        for (size_t i = 0; i < geo.size(); ++i) {
          const auto& g = geo[i];
          const float* tp = tap_data[i] + n * g.sN + c0 * g.sC;
          for (int64_t c = 0; c < K; ++c) {
            // U[j] = sum_a wy-blend of source rows at Y = y + a - p, pixel j
            float* u = U.data() + u_first[i * K + c];
            std::fill(u, u + g.w * kChunk, 0.f);
            for (int64_t a = 0; a < K; ++a) {
              const int64_t Y = y + a - p;
              if (Y < 0 || Y >= H) continue;
              const LinearTap<float>& t = g.ty[Y];
              const float* ch = tp + tap_channel(a, c, K, C, 0) * g.sC;
              if (g.sC == 1) {
                simd::axpy_pixels(u, kChunk, ch + t.i0 * g.sH, g.sW, t.w0, g.w, cn);
                if (t.w1 != 0.f) simd::axpy_pixels(u, kChunk, ch + t.i1 * g.sH, g.sW, t.w1, g.w, cn);
                continue;
              }
              for (int64_t j = 0; j < g.w; ++j) {
                axpy<float, float>(u + j * kChunk, ch + t.i0 * g.sH + j * g.sW, g.sC, t.w0, cn);
                if (t.w1 != 0.f) axpy<float, float>(u + j * kChunk, ch + t.i1 * g.sH + j * g.sW, g.sC, t.w1, cn);
              }
            }
          }
        }
        simd::shift_add_pixels(op + n * osN + y * osH + c0, osW, bp + n * bsN + y * bsH + c0, bsW, U.data(),
                               terms.data(), first.data(), W, cn);
      }
    }
  });
}

// channels_last base and result (unit channel stride): one task per (n, y)
// output row, channels in chunks of kChunk.
template <typename scalar_t>
void forward_pixels(const at::Tensor& base, const std::vector<at::Tensor>& taps, int64_t K, bool align_corners,
                    const at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = base.size(0), C = base.size(1), H = base.size(2), W = base.size(3), p = K / 2;
  const auto geo = geometries<scalar_t, acc_t>(taps, H, W, align_corners, false);
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (std::all_of(geo.begin(), geo.end(), [](const auto& g) { return g.tx_arrays.has_value(); }))
      return forward_pixels_float(base, taps, geo, K, out);
  }
  int64_t max_w = 1;
  for (const auto& g : geo) max_w = std::max(max_w, g.w);
  const scalar_t* bp = base.const_data_ptr<scalar_t>();
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  const std::vector<const scalar_t*> tap_data = data_of<const scalar_t>(taps);
  const int64_t bsN = base.stride(0), bsC = base.stride(1), bsH = base.stride(2), bsW = base.stride(3);
  const int64_t osN = out.stride(0), osH = out.stride(2), osW = out.stride(3);
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, W * C));
  at::parallel_for(0, N * H, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(static_cast<size_t>(W * kChunk));
    std::vector<acc_t> U(static_cast<size_t>(max_w * kChunk));
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / H, y = task % H;
      for (int64_t c0 = 0; c0 < C; c0 += kChunk) {
        const int64_t cn = std::min(kChunk, C - c0);
        const scalar_t* b = bp + n * bsN + y * bsH + c0 * bsC;
        for (int64_t x = 0; x < W; ++x) {
          acc_t* d = acc.data() + x * kChunk;
          const scalar_t* s = b + x * bsW;
          if (bsC == 1) {
#pragma omp simd
            for (int64_t k = 0; k < cn; ++k) d[k] = static_cast<acc_t>(s[k]);
          } else {
            for (int64_t k = 0; k < cn; ++k) d[k] = static_cast<acc_t>(s[k * bsC]);
          }
        }
        for (size_t i = 0; i < geo.size(); ++i) {
          const auto& g = geo[i];
          const scalar_t* tp = tap_data[i] + n * g.sN + c0 * g.sC;
          for (int64_t c = 0; c < K; ++c) {
            // U[j] = sum_a wy-blend of source rows at Y = y + a - p, pixel j
            bool any = false;
            for (int64_t a = 0; a < K; ++a) {
              const int64_t Y = y + a - p;
              if (Y < 0 || Y >= H) continue;
              if (!any) std::fill(U.begin(), U.begin() + g.w * kChunk, acc_t(0));
              any = true;
              const LinearTap<acc_t>& t = g.ty[Y];
              const scalar_t* ch = tp + tap_channel(a, c, K, C, 0) * g.sC;
              for (int64_t j = 0; j < g.w; ++j) {
                acc_t* u = U.data() + j * kChunk;
                axpy<scalar_t, acc_t>(u, ch + t.i0 * g.sH + j * g.sW, g.sC, t.w0, cn);
                if (t.w1 != acc_t(0)) axpy<scalar_t, acc_t>(u, ch + t.i1 * g.sH + j * g.sW, g.sC, t.w1, cn);
              }
            }
            if (!any) continue;
            const ShiftRange xs = shift_range(c - p, W);
            for (int64_t x = xs.first; x < xs.end; ++x) {
              const LinearTap<acc_t>& t = g.tx[x + c - p];
              acc_t* d = acc.data() + x * kChunk;
              axpy<acc_t, acc_t>(d, U.data() + t.i0 * kChunk, 1, t.w0, cn);
              if (t.w1 != acc_t(0)) axpy<acc_t, acc_t>(d, U.data() + t.i1 * kChunk, 1, t.w1, cn);
            }
          }
        }
        scalar_t* o = op + n * osN + y * osH + c0;
        for (int64_t x = 0; x < W; ++x) {
          const acc_t* s = acc.data() + x * kChunk;
          scalar_t* d = o + x * osW;
#pragma omp simd
          for (int64_t k = 0; k < cn; ++k) d[k] = static_cast<scalar_t>(s[k]);
        }
      }
    }
  });
}

// Dense (NCHW- or channels_last-contiguous) as the kernels read it, else a copy.
at::Tensor dense(const at::Tensor& t) {
  if (t.is_contiguous() || t.is_contiguous(at::MemoryFormat::ChannelsLast)) return t;
  return t.contiguous();
}

bool pixels_layout(const at::Tensor& t) { return t.stride(1) == 1 && t.size(1) > 1; }

// The result into out (dense, base's sizes and layout), which may be base
// itself: each task reads an element of base before it writes that element
// of out, and no other task touches it.
void forward(const at::Tensor& base, const std::vector<at::Tensor>& taps, int64_t K, bool align_corners,
             const at::Tensor& out) {
  const bool pixels = pixels_layout(base);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, base.scalar_type(), "upsample_shift_add_cpu", [&] {
    if (pixels) forward_pixels<scalar_t>(base, taps, K, align_corners, out);
    else forward_planes<scalar_t>(base, taps, K, align_corners, out);
  });
}

at::Tensor upsample_shift_add_cpu(const at::Tensor& base_in, at::TensorList taps_in, int64_t kernel_size,
                                  bool align_corners) {
  const char* op = "pyramid_ext::upsample_shift_add";
  check_upsample_shift_add(op, base_in, taps_in, kernel_size);
  TORCH_CHECK_VALUE(base_in.device().is_cpu(), op, ": base must be a CPU tensor, got ", base_in.device());
  const at::Tensor base = dense(base_in);
  std::vector<at::Tensor> taps;
  for (const auto& t : taps_in) taps.push_back(dense(t));
  at::Tensor out = output_buffers::empty_like_dense(base);
  if (out.numel() == 0) return out;
  if (taps.empty()) return out.copy_(base);
  forward(base, taps, kernel_size, align_corners, out);
  return out;
}

// ------------------------------- backward ----------------------------------

// One tap (a, c)'s gradient rows from the source rows' sums R (h rows of W,
// double): dst[r, j] = sum over the output columns X that read j, with
// x = X - c + p inside the map, of wx(X, j) * R[r][x], in double.
template <typename scalar_t, typename acc_t>
inline void columns_pass(scalar_t* dst, int64_t dsH, int64_t dsW, const double* R, const TapGeometry<acc_t>& g,
                         int64_t W, int64_t shift) {
  for (int64_t r = 0; r < g.h; ++r) {
    const double* row = R + r * W;
    for (int64_t j = 0; j < g.w; ++j) {
      const int64_t first = std::max(g.rx[j].first, shift), last = std::min(g.rx[j].last, W - 1 + shift);
      const double* wt = g.col_factors.of(j);  // wt[X - rx[j].first]: reader X's factor
      const int64_t x0 = g.rx[j].first;
      double sum = 0;
      for (int64_t X = first; X <= last; ++X) sum += wt[X - x0] * row[X - shift];
      dst[r * dsH + j * dsW] = static_cast<scalar_t>(sum);
    }
  }
}

// Planar grad: one task per (tap tensor, n, o) plane.
template <typename scalar_t>
void backward_planes(const at::Tensor& grad, std::vector<at::Tensor>& grads, int64_t K, bool align_corners) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = grad.size(0), C = grad.size(1), H = grad.size(2), W = grad.size(3), p = K / 2;
  const auto geo = geometries<scalar_t, acc_t>(grads, H, W, align_corners, true);
  const scalar_t* gp = grad.const_data_ptr<scalar_t>();
  const int64_t gsN = grad.stride(0), gsC = grad.stride(1), gsH = grad.stride(2), gsW = grad.stride(3);
  const int64_t planes = N * C;
  const int64_t tasks = planes * static_cast<int64_t>(grads.size());
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, K * H * W));
  const std::vector<scalar_t*> grad_data = data_of<scalar_t>(grads);
  // acc[x] += w * row[x], x < W: float unit-stride rows through axpy's loop
  // for this ISA, read once (not dispatched per row of a vector or two).
  const simd::AxpyLoop axpy_loop = simd::axpy_loop();
  auto add_row = [&](acc_t* acc, const scalar_t* row, acc_t w) {
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (gsW == 1) return axpy_loop(acc, row, w, W);
    }
    axpy<scalar_t, acc_t>(acc, row, gsW, w, W);
  };
  at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) {
    RowRunSums<acc_t> sums;
    for (int64_t task = begin; task < end; ++task) {
      const size_t i = static_cast<size_t>(task / planes);
      const int64_t n = (task % planes) / C, o = task % C;
      const auto& g = geo[i];
      const scalar_t* src = gp + n * gsN + o * gsC;
      for (int64_t a = 0; a < K; ++a) {
        // R[r][x] = sum over Y reading r (y = Y - a + p inside) of wy(Y, r) * grad[y][x]
        sums.reset(g.h, W);
        const ShiftRange ys = shift_range(p - a, H);  // Y with y = Y + p - a in [0, H)
        for (int64_t Y = ys.first; Y < ys.end; ++Y) {
          const scalar_t* s = src + (Y + p - a) * gsH;
          const LinearTap<acc_t>& t = g.ty[Y];
          add_row(sums.next_term(t.i0), s, t.w0);
          if (t.w1 != acc_t(0)) add_row(sums.next_term(t.i1), s, t.w1);
        }
        sums.flush_all();
        for (int64_t c = 0; c < K; ++c) {
          scalar_t* dst = grad_data[i] + n * g.sN + tap_channel(a, c, K, C, o) * g.sC;
          columns_pass<scalar_t, acc_t>(dst, g.sH, g.sW, sums.rows.data(), g, W, c - p);
        }
      }
    }
  });
}

// channels_last grad: one task per (tap tensor, n, source row r, chunk of
// kChunk channels); pass 1 reads only the output rows that read r.
template <typename scalar_t>
void backward_pixels(const at::Tensor& grad, std::vector<at::Tensor>& grads, int64_t K, bool align_corners) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = grad.size(0), C = grad.size(1), H = grad.size(2), W = grad.size(3), p = K / 2;
  const auto geo = geometries<scalar_t, acc_t>(grads, H, W, align_corners, true);
  const scalar_t* gp = grad.const_data_ptr<scalar_t>();
  const int64_t gsN = grad.stride(0), gsC = grad.stride(1), gsH = grad.stride(2), gsW = grad.stride(3);
  const int64_t chunks = (C + kChunk - 1) / kChunk;
  std::vector<int64_t> first_task{0};  // tasks of tap tensor i: [first_task[i], first_task[i + 1])
  for (const auto& g : geo) first_task.push_back(first_task.back() + N * g.h * chunks);
  const std::vector<scalar_t*> grad_data = data_of<scalar_t>(grads);
  at::parallel_for(0, first_task.back(), 1, [&](int64_t begin, int64_t end) {
    // R[x][k]: double sums and the float run, W pixels of kChunk channels.
    std::vector<double> R(static_cast<size_t>(W * kChunk));
    std::vector<acc_t> run(static_cast<size_t>(W * kChunk));
    std::vector<double> sum(static_cast<size_t>(kChunk));
    for (int64_t task = begin; task < end; ++task) {
      size_t i = 0;
      while (task >= first_task[i + 1]) ++i;
      const auto& g = geo[i];
      const int64_t local = task - first_task[i];
      const int64_t n = local / (g.h * chunks), r = (local / chunks) % g.h, c0 = (local % chunks) * kChunk;
      const int64_t cn = std::min(kChunk, C - c0);
      const scalar_t* src = gp + n * gsN + c0 * gsC;
      for (int64_t a = 0; a < K; ++a) {
        const ShiftRange ys = shift_range(p - a, H);
        const int64_t y_first = std::max(g.ry[r].first, ys.first), y_last = std::min(g.ry[r].last, ys.end - 1);
        std::fill(R.begin(), R.end(), 0.0);
        std::fill(run.begin(), run.end(), acc_t(0));
        int64_t terms = 0;
        auto flush = [&] {
          for (int64_t q = 0; q < W * kChunk; ++q) {
            R[q] += static_cast<double>(run[q]);
            run[q] = acc_t(0);
          }
          terms = 0;
        };
        for (int64_t Y = y_first; Y <= y_last; ++Y) {
          const acc_t wt = bilinear_tap_weight(g.ty[Y], r);
          if (wt == acc_t(0)) continue;
          if (terms == simd::kRunLength) flush();
          ++terms;
          const scalar_t* row = src + (Y + p - a) * gsH;
          for (int64_t x = 0; x < W; ++x)
            axpy<scalar_t, acc_t>(run.data() + x * kChunk, row + x * gsW, gsC, wt, cn);
        }
        if (terms > 0) flush();
        for (int64_t c = 0; c < K; ++c) {
          const int64_t shift = c - p;
          scalar_t* dst = grad_data[i] + n * g.sN + (tap_channel(a, c, K, C, 0) + c0) * g.sC + r * g.sH;
          for (int64_t j = 0; j < g.w; ++j) {
            const int64_t first = std::max(g.rx[j].first, shift), last = std::min(g.rx[j].last, W - 1 + shift);
            std::fill(sum.begin(), sum.end(), 0.0);
            for (int64_t X = first; X <= last; ++X) {
              const double wt = static_cast<double>(bilinear_tap_weight(g.tx[X], j));
              const double* q = R.data() + (X - shift) * kChunk;
#pragma omp simd
              for (int64_t k = 0; k < cn; ++k) sum[k] += wt * q[k];
            }
            scalar_t* d = dst + j * g.sW;
            for (int64_t k = 0; k < cn; ++k) d[k * g.sC] = static_cast<scalar_t>(sum[k]);
          }
        }
      }
    }
  });
}

std::vector<at::Tensor> upsample_shift_add_backward_cpu(const at::Tensor& grad_in, c10::IntArrayRef tap_shapes,
                                                        int64_t kernel_size, bool align_corners,
                                                        const c10::List<bool>& channels_last) {
  const char* op = "pyramid_ext::upsample_shift_add_backward";
  check_upsample_shift_add_backward(op, grad_in, tap_shapes, kernel_size, channels_last);
  TORCH_CHECK_VALUE(grad_in.device().is_cpu(), op, ": grad must be a CPU tensor, got ", grad_in.device());
  const at::Tensor grad = dense(grad_in);
  const int64_t N = grad.size(0), C = grad.size(1);
  std::vector<at::Tensor> grads;
  for (size_t i = 0; i < channels_last.size(); ++i) {
    const auto fmt = channels_last[i] ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
    grads.push_back(at::empty({N, kernel_size * kernel_size * C, tap_shapes[2 * i], tap_shapes[2 * i + 1]},
                              grad.options().memory_format(fmt)));
  }
  if (grad.numel() == 0 || grads.empty()) return grads;
  const bool pixels = pixels_layout(grad);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "upsample_shift_add_backward_cpu",
                                  [&] {
                                    if (pixels) backward_pixels<scalar_t>(grad, grads, kernel_size, align_corners);
                                    else backward_planes<scalar_t>(grad, grads, kernel_size, align_corners);
                                  });
  return grads;
}

}  // namespace

void cpu::upsample_shift_add_in_place(const at::Tensor& base, const std::vector<at::Tensor>& taps,
                                      int64_t kernel_size, bool align_corners) {
  const char* op = "pyramid_ext::upsample_shift_add (in place)";
  check_upsample_shift_add(op, base, taps, kernel_size);
  TORCH_CHECK(base.device().is_cpu() && (base.is_contiguous() || base.is_contiguous(at::MemoryFormat::ChannelsLast)),
              op, ": base must be a dense CPU tensor");
  if (base.numel() == 0 || taps.empty()) return;
  std::vector<at::Tensor> dense_taps;
  for (const auto& t : taps) dense_taps.push_back(dense(t));
  forward(base, dense_taps, kernel_size, align_corners, base);
}

TORCH_LIBRARY_IMPL(pyramid_ext, CPU, m) {
  m.impl("upsample_shift_add", &upsample_shift_add_cpu);
  m.impl("upsample_shift_add_backward", &upsample_shift_add_backward_cpu);
}

}  // namespace pyramid_ext
