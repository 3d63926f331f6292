// CPU kernels of upsample_concat (functional and out=) and its backward.
//
// Forward writes every output element once: x's channels are copied, each
// branch's channels are bilinearly interpolated with bilinear_tap weights
// (pyramid_index.h, ATen's arithmetic). Planar outputs interpolate each
// branch row horizontally once, then blend two such rows per output row;
// channels_last outputs blend four source pixels per output pixel, vector
// over channels, and write each output pixel's parts in channel order.
// Backward: grad_branch = Wy^T G Wx per plane, as two passes of weighted
// vector adds into a small buffer, in a fixed order: no atomics, bitwise
// identical run to run.
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
#include "pyramid_index.h"
#include "upsample_concat_checks.h"

namespace pyramid_ext {
namespace {

// Planar outputs under 16 MiB (the output cache's 8 MiB ones) are written
// with plain stores: streamed, (16, 256, 16, 16)'s 8 MiB output was slower
// where its lines were still in L3 from the call before and no faster from
// memory (AMD EPYC Zen 4, L3 32 MiB, two threads, compare.py's uc.fresh.nchw
// with no_streaming_stores against streaming, four runs: 0.39-0.45 against
// 0.51-0.54 ms; x and the output from memory, in-process: 0.47 plain, 0.46
// streamed). channels_last keeps streaming there (from memory plain stores
// were 1.35x slower, in L3 no faster).
constexpr size_t kStreamPlanesMinBytes = size_t{16} << 20;

// One source of output channels: x (copied) or a branch (interpolated).
using Part = ConcatPart;

// Output planes (any strides; unit W stride is the fast case).
template <typename scalar_t>
void forward_planes(const std::vector<Part>& parts, const at::Tensor& out,
                    bool align_corners) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = out.size(0), C = out.size(1), H = out.size(2),
                W = out.size(3);
  const int64_t osN = out.stride(0), osC = out.stride(1), osH = out.stride(2),
                osW = out.stride(3);
  std::vector<int64_t> part_of(static_cast<size_t>(C));
  std::vector<std::vector<LinearTap<acc_t>>> th(parts.size()), tw(parts.size());
  for (size_t k = 0; k < parts.size(); ++k) {
    for (int64_t c = 0; c < parts[k].t.size(1); ++c)
      part_of[parts[k].channel_offset + c] = static_cast<int64_t>(k);
    if (parts[k].interpolate) {
      th[k] = axis_taps<acc_t>(parts[k].t.size(2), H, align_corners);
      tw[k] = axis_taps<acc_t>(parts[k].t.size(3), W, align_corners);
    }
  }
  // float: each branch's taps as the tables of simd::resize_planes (W then
  // H), so a task's run of planes of a branch is one call (a call per short
  // row, then per plane, cost as much as the row, the plane).
  std::vector<std::optional<ResizeTableArrays>> rows_h(parts.size()), rows_w(parts.size());
  std::vector<simd::PlaneResize> plane_resize(parts.size());
  if constexpr (std::is_same_v<scalar_t, float>) {
    for (size_t k = 0; k < parts.size(); ++k) {
      if (!parts[k].interpolate) continue;
      rows_h[k].emplace(th[k]);
      rows_w[k].emplace(tw[k]);
      plane_resize[k] = {rows_w[k]->from(0), rows_h[k]->from(0), parts[k].t.size(3), parts[k].t.size(2), W, H};
    }
  }
  // Each part's pointer and strides, read once, not per plane (a plane is a
  // few hundred elements on small maps: the per-plane work outside the
  // resize and copy calls was a fifth of the CPU time on (16, 256, 16, 16)).
  struct PartView {
    const scalar_t* data;
    int64_t sN, sC, sH, sW, channels, h, w;
  };
  std::vector<PartView> views;
  for (const Part& part : parts) {
    const at::Tensor& t = part.t;
    views.push_back({t.const_data_ptr<scalar_t>(), t.stride(0), t.stride(1), t.stride(2), t.stride(3), t.size(1),
                     t.size(2), t.size(3)});
  }
  const int64_t plane = H * W;
  const bool out_planes_dense = osW == 1 && osH == W && osC == plane;
  scalar_t* o = out.mutable_data_ptr<scalar_t>();
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, plane));
  // float, a fresh large output of contiguous planes (output_buffers::streamed
  // in planes) of kStreamPlanesMinBytes or more: written with streaming
  // stores (simd::copy_streaming), each branch plane resized into
  // `plane_buf` first (its rows of W floats would leave lines partly
  // streamed)
  const bool stream =
      std::is_same_v<scalar_t, float> && out_planes_dense && output_buffers::streamed(out, plane, kStreamPlanesMinBytes);
  // d[i] = s[i], i < count (contiguous runs)
  auto copy_run = [stream](const scalar_t* s, int64_t count, scalar_t* d) {
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (stream) return simd::copy_streaming(d, s, count);
    }
    std::copy(s, s + count, d);
  };
  at::parallel_for(0, N * C, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> hrows, plane_buf;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / C, oc = task % C;
      const size_t k = static_cast<size_t>(part_of[oc]);
      const Part& part = parts[k];
      const PartView& v = views[k];
      const int64_t c = oc - part.channel_offset;
      const scalar_t* src = v.data + n * v.sN + c * v.sC;
      const int64_t sH = v.sH, sW = v.sW;
      scalar_t* dst = o + n * osN + oc * osC;
      if (!part.interpolate) {
        if (sW == 1 && sH == W && v.sC == plane && out_planes_dense) {
          // This plane and the part's next ones in this task are contiguous
          // on both sides (an NCHW x): one copy.
          const int64_t planes = std::min(end - task, v.channels - c);
          copy_run(src, planes * plane, dst);
          task += planes - 1;
          continue;
        }
        if (sW == 1 && osW == 1 && sH == W && osH == W) {  // whole plane contiguous on both sides
          copy_run(src, plane, dst);
          continue;
        }
        for (int64_t h = 0; h < H; ++h) {
          const scalar_t* s = src + h * sH;
          scalar_t* d = dst + h * osH;
          if (sW == 1 && osW == 1) {
            std::copy(s, s + W, d);
          } else {
            for (int64_t w = 0; w < W; ++w) d[w * osW] = s[w * sW];
          }
        }
        continue;
      }
      const int64_t hb = v.h;
      const auto& ty = th[k];
      const auto& tx = tw[k];
      // Each source row interpolated along W once.
      hrows.resize(static_cast<size_t>(hb * W));
      if constexpr (std::is_same_v<scalar_t, float>) {
        if (sW == 1 && osW == 1) {
          const int64_t planes = std::min(end - task, v.channels - c);
          if (stream) {
            plane_buf.resize(static_cast<size_t>(plane));
            for (int64_t q = 0; q < planes; ++q) {
              simd::resize_planes(plane_buf.data(), plane, W, src + q * v.sC, v.sC, sH, plane_resize[k], 1,
                                  hrows.data());
              simd::copy_streaming(dst + q * osC, plane_buf.data(), plane);
            }
          } else {
            simd::resize_planes(dst, osC, osH, src, v.sC, sH, plane_resize[k], planes, hrows.data());
          }
          task += planes - 1;
          continue;
        }
      }
      for (int64_t i = 0; i < hb; ++i) {
        const scalar_t* s = src + i * sH;
        acc_t* r = hrows.data() + i * W;
        for (int64_t w = 0; w < W; ++w) {
          r[w] = tx[w].w0 * static_cast<acc_t>(s[tx[w].i0 * sW]) +
                 tx[w].w1 * static_cast<acc_t>(s[tx[w].i1 * sW]);
        }
      }
      for (int64_t h = 0; h < H; ++h) {
        const acc_t* r0 = hrows.data() + ty[h].i0 * W;
        const acc_t* r1 = hrows.data() + ty[h].i1 * W;
        const acc_t w0 = ty[h].w0, w1 = ty[h].w1;
        scalar_t* d = dst + h * osH;
        if constexpr (std::is_same_v<scalar_t, float>) {
          if (osW == 1) {
            simd::blend(d, r0, r1, w0, w1, W);
            continue;
          }
        }
        if (osW == 1) {
#pragma omp simd
          for (int64_t w = 0; w < W; ++w)
            d[w] = static_cast<scalar_t>(w0 * r0[w] + w1 * r1[w]);
        } else {
          for (int64_t w = 0; w < W; ++w)
            d[w * osW] = static_cast<scalar_t>(w0 * r0[w] + w1 * r1[w]);
        }
      }
    }
    if (stream) simd::stream_fence();
  });
}

// channels_last output (unit channel stride): one task per output row.
template <typename scalar_t>
void forward_pixels(const std::vector<Part>& parts, const at::Tensor& out,
                    bool align_corners) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = out.size(0), H = out.size(2), W = out.size(3);
  const int64_t osN = out.stride(0), osH = out.stride(2), osW = out.stride(3);
  std::vector<std::vector<LinearTap<acc_t>>> th(parts.size()), tw(parts.size());
  for (size_t k = 0; k < parts.size(); ++k) {
    if (parts[k].interpolate) {
      th[k] = axis_taps<acc_t>(parts[k].t.size(2), H, align_corners);
      tw[k] = axis_taps<acc_t>(parts[k].t.size(3), W, align_corners);
    }
  }
  // float: each branch's W taps as the table of simd::concat_pixels (one
  // call per output row; a call per pixel of a few channels cost as much as
  // the pixel).
  std::vector<std::optional<ResizeTableArrays>> rows_w(parts.size());
  if constexpr (std::is_same_v<scalar_t, float>) {
    for (size_t k = 0; k < parts.size(); ++k)
      if (parts[k].interpolate) rows_w[k].emplace(tw[k]);
  }
  // Each part's pointer and strides, read once, not per row and part (the
  // tensor accessors were a tenth of the CPU time on (16, 256, 16, 16)).
  struct PartView {
    const scalar_t* data;
    int64_t sN, sC, sH, sW, channels;
  };
  std::vector<PartView> views;
  for (const Part& part : parts) {
    const at::Tensor& t = part.t;
    views.push_back({t.const_data_ptr<scalar_t>(), t.stride(0), t.stride(1), t.stride(2), t.stride(3), t.size(1)});
  }
  scalar_t* o = out.mutable_data_ptr<scalar_t>();
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, W * out.size(1)));
  // float: the parts with unit channel stride (all, unless layouts are
  // mixed) of an output row in one simd::concat_pixels call, pixel by pixel,
  // so the row's memory is written front to back in one stream (part after
  // part, each over the whole row, had been five interleaved streams: 6-20%
  // more CPU time on (16, 256, 16, 16) and (8, 512, 32, 32)); the others in
  // the loops below.
  std::vector<bool> in_pixel_call(parts.size(), false);
  if constexpr (std::is_same_v<scalar_t, float>) {
    for (size_t k = 0; k < parts.size(); ++k) in_pixel_call[k] = views[k].sC == 1;
  }
  // A fresh large output (output_buffers::streamed in pixels) written with
  // streaming stores where each vector store fills whole 64-byte lines: every
  // part in the pixel call, at a multiple of 16 channels.
  bool stream = output_buffers::streamed(out, osW);
  for (size_t k = 0; k < parts.size(); ++k)
    stream = stream && in_pixel_call[k] && parts[k].channel_offset % 16 == 0 && views[k].channels % 16 == 0;
  at::parallel_for(0, N * H, grain, [&](int64_t begin, int64_t end) {
    std::vector<simd::PixelPart> pixel_parts;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / H, h = task % H;
      if constexpr (std::is_same_v<scalar_t, float>) {
        pixel_parts.clear();
        for (size_t k = 0; k < parts.size(); ++k) {
          if (!in_pixel_call[k]) continue;
          const PartView& v = views[k];
          const scalar_t* src = v.data + n * v.sN;
          simd::PixelPart p{};
          p.s_stride = v.sW;
          p.offset = parts[k].channel_offset;
          p.n = v.channels;
          p.copy = !parts[k].interpolate;
          if (p.copy) {
            p.s0 = src + h * v.sH;
          } else {
            const LinearTap<acc_t> ty = th[k][h];
            p.s0 = src + ty.i0 * v.sH;
            p.s1 = src + ty.i1 * v.sH;
            p.wy0 = ty.w0;
            p.wy1 = ty.w1;
            p.t = rows_w[k]->from(0);
          }
          pixel_parts.push_back(p);
        }
        if (!pixel_parts.empty())
          simd::concat_pixels(o + n * osN + h * osH, osW, pixel_parts.data(),
                              static_cast<int64_t>(pixel_parts.size()), W, stream);
      }
      for (size_t k = 0; k < parts.size(); ++k) {
        if (in_pixel_call[k]) continue;
        const Part& part = parts[k];
        const PartView& v = views[k];
        const int64_t Ck = v.channels;
        const int64_t sC = v.sC, sH = v.sH, sW = v.sW;
        const scalar_t* src = v.data + n * v.sN;
        scalar_t* row = o + n * osN + h * osH + part.channel_offset;
        if (!part.interpolate) {
          for (int64_t w = 0; w < W; ++w) {
            const scalar_t* s = src + h * sH + w * sW;
            scalar_t* d = row + w * osW;
            if (sC == 1) {
              std::copy(s, s + Ck, d);
            } else {
              for (int64_t c = 0; c < Ck; ++c) d[c] = s[c * sC];
            }
          }
          continue;
        }
        const LinearTap<acc_t> ty = th[k][h];
        const scalar_t* s0 = src + ty.i0 * sH;
        const scalar_t* s1 = src + ty.i1 * sH;
        for (int64_t w = 0; w < W; ++w) {
          const LinearTap<acc_t> tx = tw[k][w];
          const scalar_t* p00 = s0 + tx.i0 * sW;
          const scalar_t* p01 = s0 + tx.i1 * sW;
          const scalar_t* p10 = s1 + tx.i0 * sW;
          const scalar_t* p11 = s1 + tx.i1 * sW;
          scalar_t* d = row + w * osW;
          if (sC == 1) {
#pragma omp simd
            for (int64_t c = 0; c < Ck; ++c) {
              d[c] = static_cast<scalar_t>(
                  ty.w0 * (tx.w0 * static_cast<acc_t>(p00[c]) +
                           tx.w1 * static_cast<acc_t>(p01[c])) +
                  ty.w1 * (tx.w0 * static_cast<acc_t>(p10[c]) +
                           tx.w1 * static_cast<acc_t>(p11[c])));
            }
          } else {
            for (int64_t c = 0; c < Ck; ++c) {
              const int64_t q = c * sC;
              d[c] = static_cast<scalar_t>(
                  ty.w0 * (tx.w0 * static_cast<acc_t>(p00[q]) +
                           tx.w1 * static_cast<acc_t>(p01[q])) +
                  ty.w1 * (tx.w0 * static_cast<acc_t>(p10[q]) +
                           tx.w1 * static_cast<acc_t>(p11[q])));
            }
          }
        }
      }
    }
    if (stream) simd::stream_fence();
  });
}

void upsample_concat_out_impl(const std::optional<at::Tensor>& x,
                              at::TensorList branches, bool align_corners,
                              bool x_first, const at::Tensor& out,
                              const char* fn) {
  std::vector<Part> parts = concat_parts(x, branches, x_first);
  TORCH_CHECK(out.device().is_cpu(), fn, ": out must be a CPU tensor, got ", out.device());
  check_upsample_concat_parts(fn, parts, out);
  if (out.numel() == 0) return;
  for (auto& p : parts) {
    // Kernels read NCHW- or channels_last-contiguous inputs through strides;
    // anything else is made contiguous first.
    if (!p.t.is_contiguous() &&
        !p.t.is_contiguous(at::MemoryFormat::ChannelsLast)) {
      p.t = p.t.contiguous();
    }
  }
  const bool pixels = out.stride(1) == 1 && out.size(1) > 1;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, out.scalar_type(), "upsample_concat_cpu", [&] {
        if (pixels) forward_pixels<scalar_t>(parts, out, align_corners);
        else forward_planes<scalar_t>(parts, out, align_corners);
      });
}

void upsample_concat_out_cpu(const std::optional<at::Tensor>& x,
                             at::TensorList branches, bool align_corners,
                             bool x_first, const at::Tensor& out) {
  upsample_concat_out_impl(x, branches, align_corners, x_first, out,
                           "pyramid_ext::upsample_concat_out");
}

at::Tensor upsample_concat_cpu(const std::optional<at::Tensor>& x,
                               at::TensorList branches, c10::IntArrayRef size,
                               bool align_corners, bool x_first,
                               bool channels_last) {
  const char* fn = "pyramid_ext::upsample_concat";
  const ConcatOut like = upsample_concat_out_like(fn, concat_parts(x, branches, x_first), size);
  const auto fmt = channels_last ? at::MemoryFormat::ChannelsLast
                                 : at::MemoryFormat::Contiguous;
  at::Tensor out = output_buffers::empty(like.sizes, like.options, fmt);
  upsample_concat_out_impl(x, branches, align_corners, x_first, out, fn);
  return out;
}

// ------------------------------- backward ----------------------------------

// One branch gradient as the tasks write it: data, sizes and strides, read
// once before the parallel loop (the tensor accessors per task, and
// stride() per element, cost as much as the small planes' work).
template <typename scalar_t>
struct GradOut {
  scalar_t* data;
  int64_t C, h, w, sN, sC, sH, sW;
};

// Per branch: its first task (tasks are (n, chunk of `chunk` channels),
// branch after branch; the last entry is the total), the taps along H and W,
// the output columns that read each branch column and their factors, and
// its gradient.
template <typename scalar_t, typename acc_t>
struct BackwardTables {
  std::vector<int64_t> first_task;
  std::vector<std::vector<LinearTap<acc_t>>> th, tw;
  std::vector<std::vector<DstRange>> readers;
  std::vector<ReaderFactors> factors;
  std::vector<GradOut<scalar_t>> outs;

  BackwardTables(std::vector<at::Tensor>& grads, int64_t N, int64_t H,
                 int64_t W, int64_t chunk, bool align_corners) {
    int64_t tasks = 0;
    for (auto& gb : grads) {
      first_task.push_back(tasks);
      tasks += N * ((gb.size(1) + chunk - 1) / chunk);
      th.push_back(axis_taps<acc_t>(gb.size(2), H, align_corners));
      tw.push_back(axis_taps<acc_t>(gb.size(3), W, align_corners));
      readers.push_back(axis_readers<acc_t>(gb.size(3), W, align_corners));
      factors.emplace_back(tw.back(), readers.back());
      outs.push_back({gb.mutable_data_ptr<scalar_t>(), gb.size(1), gb.size(2), gb.size(3), gb.stride(0),
                      gb.stride(1), gb.stride(2), gb.stride(3)});
    }
    first_task.push_back(tasks);
  }
};

// grad_branch[n, c] = Wy^T G Wx for each plane; G read through its strides.
template <typename scalar_t>
void backward_planes(const at::Tensor& g, std::vector<at::Tensor>& grads,
                     const std::vector<int64_t>& offsets, bool align_corners) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = g.size(0), H = g.size(2), W = g.size(3);
  const int64_t gsN = g.stride(0), gsC = g.stride(1), gsH = g.stride(2),
                gsW = g.stride(3);
  const scalar_t* gp = g.const_data_ptr<scalar_t>();
  // Tasks are (branch, n, c) planes, numbered branch after branch.
  const BackwardTables<scalar_t, acc_t> t(grads, N, H, W, 1, align_corners);
  const auto& first_task = t.first_task;
  const auto& th = t.th;
  const auto& readers = t.readers;
  const int64_t tasks = first_task.back();
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, H * W));
  const simd::AxpyLoop axpy = simd::axpy_loop();
  at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) {
    RowRunSums<acc_t> sums;
    std::vector<double> acc;
    for (int64_t task = begin; task < end; ++task) {
      size_t k = 0;
      while (task >= first_task[k + 1]) ++k;
      const GradOut<scalar_t>& gb = t.outs[k];
      const int64_t Ck = gb.C, hb = gb.h, wb = gb.w;
      const int64_t n = (task - first_task[k]) / Ck;
      const int64_t c = (task - first_task[k]) % Ck;
      const scalar_t* src = gp + n * gsN + (offsets[k] + c) * gsC;
      const auto& ty = th[k];
      // rows[i][w] = sum_h Wy[h, i] * G[h, w]
      sums.reset(hb, W);
      auto add_row = [&](int64_t i, acc_t wt, const scalar_t* s) {
        acc_t* r = sums.next_term(i);
        if constexpr (std::is_same_v<scalar_t, float>) {
          if (gsW == 1) return axpy(r, s, wt, W);
        }
        if (gsW == 1) {
#pragma omp simd
          for (int64_t w = 0; w < W; ++w) r[w] += wt * static_cast<acc_t>(s[w]);
        } else {
          for (int64_t w = 0; w < W; ++w) r[w] += wt * static_cast<acc_t>(s[w * gsW]);
        }
      };
      for (int64_t h = 0; h < H; ++h) {
        const scalar_t* s = src + h * gsH;
        add_row(ty[h].i0, ty[h].w0, s);
        if (ty[h].w1 != acc_t(0)) add_row(ty[h].i1, ty[h].w1, s);
      }
      sums.flush_all();
      // grad[i][j] = sum over the columns w that read j of rows[i][w] * Wx[w, j]
      acc.assign(static_cast<size_t>(hb * wb), 0.0);
      const auto& rw = readers[k];
      const ReaderFactors& f = t.factors[k];
      for (int64_t i = 0; i < hb; ++i) {
        const double* r = sums.rows.data() + i * W;
        double* a = acc.data() + i * wb;
        for (int64_t j = 0; j < wb; ++j) {
          double sum = 0;
          const double* wt = f.of(j);  // wt[w - first]: reader w's factor
          for (int64_t w = rw[j].first; w <= rw[j].last; ++w) sum += wt[w - rw[j].first] * r[w];
          a[j] = sum;
        }
      }
      scalar_t* dst = gb.data + n * gb.sN + c * gb.sC;
      for (int64_t i = 0; i < hb; ++i)
        for (int64_t j = 0; j < wb; ++j)
          dst[i * gb.sH + j * gb.sW] = static_cast<scalar_t>(acc[i * wb + j]);
    }
  });
}

// channels_last G: the same two passes, vector over a chunk of channels.
template <typename scalar_t>
void backward_pixels(const at::Tensor& g, std::vector<at::Tensor>& grads,
                     const std::vector<int64_t>& offsets, bool align_corners) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = g.size(0), H = g.size(2), W = g.size(3);
  const int64_t gsN = g.stride(0), gsH = g.stride(2), gsW = g.stride(3);
  const scalar_t* gp = g.const_data_ptr<scalar_t>();
  constexpr int64_t kChunk = 64;
  // Tasks are (branch, n, channel chunk), numbered branch after branch.
  const BackwardTables<scalar_t, acc_t> t(grads, N, H, W, kChunk, align_corners);
  const auto& first_task = t.first_task;
  const auto& th = t.th;
  const auto& readers = t.readers;
  const int64_t tasks = first_task.back();
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    RowRunSums<acc_t> sums;
    std::vector<double> acc;
    for (int64_t task = begin; task < end; ++task) {
      size_t k = 0;
      while (task >= first_task[k + 1]) ++k;
      const GradOut<scalar_t>& gb = t.outs[k];
      const int64_t Ck = gb.C, hb = gb.h, wb = gb.w;
      const int64_t chunks = (Ck + kChunk - 1) / kChunk;
      const int64_t n = (task - first_task[k]) / chunks;
      const int64_t c0 = ((task - first_task[k]) % chunks) * kChunk;
      const int64_t cn = std::min(kChunk, Ck - c0);
      const scalar_t* src = gp + n * gsN + offsets[k] + c0;
      const auto& ty = th[k];
      // A row of rows: W pixels of kChunk channels.
      sums.reset(hb, W * kChunk);
      auto add_row = [&](int64_t i, acc_t wt, const scalar_t* row) {
        acc_t* r = sums.next_term(i);
        for (int64_t w = 0; w < W; ++w) {
          const scalar_t* s = row + w * gsW;
          acc_t* q = r + w * kChunk;
#pragma omp simd
          for (int64_t c = 0; c < cn; ++c) q[c] += wt * static_cast<acc_t>(s[c]);
        }
      };
      for (int64_t h = 0; h < H; ++h) {
        const scalar_t* row = src + h * gsH;
        add_row(ty[h].i0, ty[h].w0, row);
        if (ty[h].w1 != acc_t(0)) add_row(ty[h].i1, ty[h].w1, row);
      }
      sums.flush_all();
      acc.assign(static_cast<size_t>(hb * wb * kChunk), 0.0);
      const auto& rw = readers[k];
      const ReaderFactors& f = t.factors[k];
      for (int64_t i = 0; i < hb; ++i) {
        for (int64_t j = 0; j < wb; ++j) {
          double* a = acc.data() + (i * wb + j) * kChunk;
          for (int64_t w = rw[j].first; w <= rw[j].last; ++w) {
            const double* r = sums.rows.data() + (i * W + w) * kChunk;
            const double wt = f.of(j)[w - rw[j].first];
#pragma omp simd
            for (int64_t c = 0; c < cn; ++c) a[c] += wt * r[c];
          }
        }
      }
      scalar_t* dst = gb.data + n * gb.sN + c0 * gb.sC;
      for (int64_t i = 0; i < hb; ++i)
        for (int64_t j = 0; j < wb; ++j)
          for (int64_t c = 0; c < cn; ++c)
            dst[i * gb.sH + j * gb.sW + c * gb.sC] = static_cast<scalar_t>(acc[(i * wb + j) * kChunk + c]);
    }
  });
}

std::vector<at::Tensor> upsample_concat_backward_cpu(
    const at::Tensor& grad_out, c10::IntArrayRef branch_shapes,
    int64_t channel_offset, bool align_corners, bool channels_last) {
  TORCH_CHECK(grad_out.dim() == 4,
              "upsample_concat_backward: grad_out must be 4-D");
  TORCH_CHECK(branch_shapes.size() % 3 == 0,
              "upsample_concat_backward: branch_shapes must hold (C, h, w) "
              "triples");
  const int64_t N = grad_out.size(0);
  const auto fmt = channels_last ? at::MemoryFormat::ChannelsLast
                                 : at::MemoryFormat::Contiguous;
  std::vector<at::Tensor> grads;
  std::vector<int64_t> offsets;
  int64_t c = channel_offset;
  for (size_t k = 0; k < branch_shapes.size(); k += 3) {
    TORCH_CHECK(branch_shapes[k] >= 0 && branch_shapes[k + 1] > 0 &&
                    branch_shapes[k + 2] > 0,
                "upsample_concat_backward: invalid branch shape");
    grads.push_back(at::empty(
        {N, branch_shapes[k], branch_shapes[k + 1], branch_shapes[k + 2]},
        grad_out.options().memory_format(fmt)));
    offsets.push_back(c);
    c += branch_shapes[k];
  }
  TORCH_CHECK(channel_offset >= 0 && c <= grad_out.size(1),
              "upsample_concat_backward: branches exceed grad_out's channels");
  if (grad_out.numel() == 0 || grads.empty()) return grads;
  const at::Tensor g =
      (grad_out.is_contiguous() ||
       grad_out.is_contiguous(at::MemoryFormat::ChannelsLast))
          ? grad_out
          : grad_out.contiguous();
  const bool pixels = g.stride(1) == 1 && g.size(1) > 1;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, g.scalar_type(), "upsample_concat_backward_cpu",
      [&] {
        if (pixels) backward_pixels<scalar_t>(g, grads, offsets, align_corners);
        else backward_planes<scalar_t>(g, grads, offsets, align_corners);
      });
  return grads;
}

}  // namespace

TORCH_LIBRARY_IMPL(pyramid_ext, CPU, m) {
  m.impl("upsample_concat", &upsample_concat_cpu);
  m.impl("upsample_concat_out", &upsample_concat_out_cpu);
  m.impl("upsample_concat_backward", &upsample_concat_backward_cpu);
}

}  // namespace pyramid_ext
