// CUDA kernels of pyramid_ext::upsample_shift_add and
// upsample_shift_add_backward: a conv's tap products, computed at each tap
// tensor's own resolution, resized to the output, shifted and added (the
// contract: docs/DESIGN.md, "Op contracts").
//
// Forward: a gather, one output element per thread, no atomics.
// out[n, o, y, x] = base[n, o, y, x] plus, for every tap tensor i in order and
// every tap (a, c) in row-major order whose shifted position
// (Y, X) = (y + a - p, x + c - p), p = K / 2, lies inside (H, W), the bilinear
// sample of taps[i][n, (a*K + c)*Cout + o] at (Y, X) (bilinear_tap: exactly
// F.interpolate's weights; a tap tensor of the output's size is read directly,
// as ATen copies it). Summed in acc_t in that order, starting from base, and
// rounded once to the dtype. The tap tensors travel by value, kMaxTaps per
// launch; more take several launches that carry the running sum in an acc_t
// buffer, so the result is still rounded once.
//
// Backward: a gather, no atomics. With t = a*K + c, dy = a - p, dx = c - p:
// grad_taps[i][n, t*Cout + o, u, v] = sum of wY(u) * wX(v) * grad[n, o, Y - dy, X - dx]
// over the rows Y / columns X of the resized plane that read (u, v)
// (bilinear_readers: one contiguous range per axis), clipped to those whose
// shifted position lies inside grad (the conv's zero padding). The kernels are
// upsample_concat's backward ones (upsample_concat.cu) with the reader ranges
// clipped and grad read shifted: each element reduced by one thread, one warp
// or one block depending on how many outputs read it, float runs of at most
// kRunLength terms (RunSum) added in double, fixed-order shuffle /
// shared-memory trees in double, so the result is bitwise deterministic and
// within the bound stated at upsample_shift_bwd_group_kernel.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "cuda/common.cuh"
#include "pyramid_index.h"
#include "upsample_shift_add_checks.h"

namespace pyramid_ext {
namespace cuda {
namespace {

constexpr int kMaxTaps = 16;
constexpr int kThreads = 256;

// One tap tensor (N, K*K*Cout, ih, iw), read through its strides.
struct ShiftTap {
  const void* data;
  int64_t sn, sc, sh, sw;
  int64_t ih, iw;
  double scale_h;  // bilinear_scale<acc_t>, stored exactly in a double
  double scale_w;
  int32_t copy;  // the output's size: read directly, as ATen copies it
};

struct ShiftParams {
  ShiftTap tap[kMaxTaps];
  int32_t ntaps;
};
static_assert(sizeof(ShiftParams) <= 3500, "ShiftParams and the other arguments must fit 4 KB");

struct ShiftOut {
  int64_t bsn, bsc, bsh, bsw;  // base
  int64_t osn, osc, osh, osw;  // out, and the running sum (same strides)
  int64_t K;
  bool align_corners;
  bool read_partial;   // an earlier launch added the first tap tensors: start from its running sum
  bool write_partial;  // tap tensors follow in a later launch: store the running sum
};

template <typename scalar_t, typename acc_t, typename index_t, bool kChannelsFastest>
__global__ void upsample_shift_add_kernel(const __grid_constant__ ShiftParams P, const scalar_t* __restrict__ base,
                                          acc_t* __restrict__ partial, scalar_t* __restrict__ out, index_t N,
                                          index_t C, index_t H, index_t W, const ShiftOut s) {
  const index_t total = N * C * H * W;
  const int64_t K = s.K;
  const int64_t pad = K / 2;
  for (index_t e = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<index_t>(gridDim.x) * blockDim.x) {
    index_t n, c, y, x;
    if constexpr (kChannelsFastest) {
      c = e % C;
      index_t rest = e / C;
      x = rest % W;
      rest /= W;
      y = rest % H;
      n = rest / H;
    } else {
      x = e % W;
      index_t rest = e / W;
      y = rest % H;
      rest /= H;
      c = rest % C;
      n = rest / C;
    }
    const int64_t o_at = int64_t{n} * s.osn + int64_t{c} * s.osc + int64_t{y} * s.osh + int64_t{x} * s.osw;
    acc_t acc = s.read_partial
                    ? partial[o_at]
                    : static_cast<acc_t>(
                          base[int64_t{n} * s.bsn + int64_t{c} * s.bsc + int64_t{y} * s.bsh + int64_t{x} * s.bsw]);
    // The taps whose shifted position (y + a - pad, x + cc - pad) is inside the output.
    const int64_t a_first = pad > y ? pad - y : 0;
    const int64_t a_last = H - 1 - y + pad < K - 1 ? H - 1 - y + pad : K - 1;
    const int64_t c_first = pad > x ? pad - x : 0;
    const int64_t c_last = W - 1 - x + pad < K - 1 ? W - 1 - x + pad : K - 1;
    for (int i = 0; i < P.ntaps; ++i) {
      const ShiftTap& tp = P.tap[i];
      const scalar_t* src = static_cast<const scalar_t*>(tp.data) + int64_t{n} * tp.sn + int64_t{c} * tp.sc;
      const int64_t tap_step = int64_t{C} * tp.sc;  // from tap t's channel o to tap t + 1's
      const acc_t scale_h = static_cast<acc_t>(tp.scale_h);
      const acc_t scale_w = static_cast<acc_t>(tp.scale_w);
      for (int64_t a = a_first; a <= a_last; ++a) {
        const int64_t Y = y + a - pad;
        const scalar_t* row_base = src + a * K * tap_step;
        if (tp.copy) {
          for (int64_t cc = c_first; cc <= c_last; ++cc) {
            acc += static_cast<acc_t>(row_base[cc * tap_step + Y * tp.sh + (x + cc - pad) * tp.sw]);
          }
          continue;
        }
        const LinearTap<acc_t> th = bilinear_tap<acc_t>(Y, tp.ih, H, scale_h, s.align_corners);
        for (int64_t cc = c_first; cc <= c_last; ++cc) {
          const LinearTap<acc_t> tw = bilinear_tap<acc_t>(x + cc - pad, tp.iw, W, scale_w, s.align_corners);
          const scalar_t* r0 = row_base + cc * tap_step + th.i0 * tp.sh;
          const scalar_t* r1 = row_base + cc * tap_step + th.i1 * tp.sh;
          const acc_t v00 = static_cast<acc_t>(r0[tw.i0 * tp.sw]);
          const acc_t v01 = static_cast<acc_t>(r0[tw.i1 * tp.sw]);
          const acc_t v10 = static_cast<acc_t>(r1[tw.i0 * tp.sw]);
          const acc_t v11 = static_cast<acc_t>(r1[tw.i1 * tp.sw]);
          acc += th.w0 * (tw.w0 * v00 + tw.w1 * v01) + th.w1 * (tw.w0 * v10 + tw.w1 * v11);
        }
      }
    }
    if (s.write_partial) {
      partial[o_at] = acc;
    } else {
      out[o_at] = static_cast<scalar_t>(acc);
    }
  }
}

// ---------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------

struct ShiftBwdArgs {
  int64_t gsn, gsc, gsh, gsw;  // grad strides
  int64_t bsn, bsc, bsh, bsw;  // grad_tap strides
  int64_t N, C, h, w;          // grad_tap sizes, C = K*K*Cout
  int64_t Cout, K;
  int64_t OH, OW;  // grad's height and width
  bool align_corners;
  bool channels_fastest;  // element order: (n, u, v, ch) instead of (n, ch, u, v)
};

__device__ __forceinline__ void decode(const ShiftBwdArgs& a, int64_t e, int64_t& n, int64_t& ch, int64_t& u,
                                       int64_t& v) {
  if (a.channels_fastest) {
    ch = e % a.C;
    int64_t rest = e / a.C;
    v = rest % a.w;
    rest /= a.w;
    u = rest % a.h;
    n = rest / a.h;
  } else {
    v = e % a.w;
    int64_t rest = e / a.w;
    u = rest % a.h;
    rest /= a.h;
    ch = rest % a.C;
    n = rest / a.C;
  }
}

// What grad_tap element (ch, u, v) sums: the rows Y and columns X of the
// resized plane that read (u, v), clipped to the shifted position being inside
// grad; grad's row is Y - dy, its column X - dx, its channel o.
struct ShiftReaders {
  DstRange rows;
  DstRange cols;
  int64_t dy, dx;
  int64_t o;
};

template <typename acc_t>
__device__ __forceinline__ ShiftReaders shift_readers(const ShiftBwdArgs& a, int64_t ch, int64_t u, int64_t v,
                                                      acc_t scale_h, acc_t scale_w) {
  ShiftReaders r;
  const int64_t t = ch / a.Cout;
  const int64_t pad = a.K / 2;
  r.o = ch - t * a.Cout;
  r.dy = t / a.K - pad;
  r.dx = t % a.K - pad;
  r.rows = bilinear_readers<acc_t>(u, a.h, a.OH, scale_h, a.align_corners);
  r.cols = bilinear_readers<acc_t>(v, a.w, a.OW, scale_w, a.align_corners);
  // 0 <= Y - dy < OH and 0 <= X - dx < OW
  if (r.rows.first < r.dy) r.rows.first = r.dy;
  if (r.rows.last > a.OH - 1 + r.dy) r.rows.last = a.OH - 1 + r.dy;
  if (r.cols.first < r.dx) r.cols.first = r.dx;
  if (r.cols.last > a.OW - 1 + r.dx) r.cols.last = a.OW - 1 + r.dx;
  return r;
}

// G threads per grad_tap element (1, one warp, or the whole block); the G
// threads stride the element's clipped reader rectangle row-major and reduce
// with a fixed tree. A small tap tensor's element reads a whole plane: each
// thread sums its terms in float runs (RunSum), the runs and the trees in
// double, as upsample_concat's backward (whose bound carries over: a term is
// rounded at most twice in float, wh * ww * g, and passes at most
// kRunLength - 1 float additions), so for a plane of up to 2^31 elements the
// result is within (14 * 2^-24 + 2^-25) sum |terms| < 8.7e-7 sum |terms| of fp64.
template <typename scalar_t, typename acc_t, int G>
__global__ void upsample_shift_bwd_group_kernel(const scalar_t* __restrict__ g, scalar_t* __restrict__ gb,
                                                const ShiftBwdArgs a, acc_t scale_h, acc_t scale_w) {
  PE_SHARED_ARRAY(double, warp_part, [kThreads / kWarp]);
  const int groups = blockDim.x / G;
  const int member = threadIdx.x % G;
  const int64_t total = a.N * a.C * a.h * a.w;
  for (int64_t e = blockIdx.x * int64_t{groups} + threadIdx.x / G; e < total; e += int64_t{gridDim.x} * groups) {
    int64_t n, ch, u, v;
    decode(a, e, n, ch, u, v);
    const ShiftReaders r = shift_readers<acc_t>(a, ch, u, v, scale_h, scale_w);
    const int64_t nr = r.rows.last - r.rows.first + 1;
    const int64_t nc = r.cols.last - r.cols.first + 1;
    const scalar_t* gp = g + n * a.gsn + r.o * a.gsc;
    double acc = 0.0;
    if (nr > 0 && nc > 0) {
      if constexpr (G == 1) {
        for (int64_t Y = r.rows.first; Y <= r.rows.last; ++Y) {
          const acc_t wh = bilinear_tap_weight(bilinear_tap<acc_t>(Y, a.h, a.OH, scale_h, a.align_corners), u);
          const scalar_t* grow = gp + (Y - r.dy) * a.gsh;
          RunSum<acc_t> row;
          for (int64_t X = r.cols.first; X <= r.cols.last; ++X) {
            const acc_t ww = bilinear_tap_weight(bilinear_tap<acc_t>(X, a.w, a.OW, scale_w, a.align_corners), v);
            row.add(ww * static_cast<acc_t>(grow[(X - r.dx) * a.gsw]));
          }
          acc += static_cast<double>(wh) * row.sum();
        }
      } else {
        RunSum<acc_t> part;
        const int64_t region = nr * nc;
        int64_t k = member;
        int64_t row = k / nc;
        int64_t col = k % nc;
        const int64_t dq = G / nc;
        const int64_t dr = G % nc;
        for (; k < region; k += G) {
          const int64_t Y = r.rows.first + row;
          const int64_t X = r.cols.first + col;
          const acc_t wh = bilinear_tap_weight(bilinear_tap<acc_t>(Y, a.h, a.OH, scale_h, a.align_corners), u);
          const acc_t ww = bilinear_tap_weight(bilinear_tap<acc_t>(X, a.w, a.OW, scale_w, a.align_corners), v);
          part.add(wh * ww * static_cast<acc_t>(gp[(Y - r.dy) * a.gsh + (X - r.dx) * a.gsw]));
          col += dr;
          row += dq;
          if (col >= nc) {
            col -= nc;
            ++row;
          }
        }
        acc = part.sum();
      }
    }
    if constexpr (G >= kWarp) acc = warp_sum(acc);
    if constexpr (G > kWarp) {
      const int warp = threadIdx.x / kWarp;
      const int lane = threadIdx.x % kWarp;
      if (lane == 0) warp_part[warp] = acc;
      __syncthreads();
      if (warp == 0) {
        acc = lane < G / kWarp ? warp_part[lane] : 0.0;
        acc = warp_sum(acc);
      }
      __syncthreads();  // warp_part is reused by the next element
    }
    if (member == 0) {
      gb[n * a.bsn + ch * a.bsc + u * a.bsh + v * a.bsw] = static_cast<scalar_t>(static_cast<acc_t>(acc));
    }
  }
}

// channels_last grad with many readers per element: one block per
// (n, u, v, tile of 32 tap channels); threadIdx.x over the tap channels
// (consecutive o of one tap: coalesced reads of grad), threadIdx.y strides each
// channel's reader rectangle (clipped per tap, so per thread); a shared-memory
// tree over y (float runs per thread, double after them, as above).
constexpr int kClRows = 8;

template <typename scalar_t, typename acc_t>
__global__ void upsample_shift_bwd_cl_kernel(const scalar_t* __restrict__ g, scalar_t* __restrict__ gb,
                                             const ShiftBwdArgs a, acc_t scale_h, acc_t scale_w) {
  PE_SHARED_ARRAY(double, part, [kClRows][kWarp]);
  const int tx = threadIdx.x;
  const int ty = threadIdx.y;
  const int64_t ctiles = (a.C + kWarp - 1) / kWarp;
  const int64_t blocks = a.N * a.h * a.w * ctiles;
  for (int64_t blk = blockIdx.x; blk < blocks; blk += gridDim.x) {
    const int64_t ct = blk % ctiles;
    int64_t rest = blk / ctiles;
    const int64_t v = rest % a.w;
    rest /= a.w;
    const int64_t u = rest % a.h;
    const int64_t n = rest / a.h;
    const int64_t ch = ct * kWarp + tx;
    const bool valid = ch < a.C;
    RunSum<acc_t> acc;
    if (valid) {
      const ShiftReaders r = shift_readers<acc_t>(a, ch, u, v, scale_h, scale_w);
      const int64_t nr = r.rows.last - r.rows.first + 1;
      const int64_t nc = r.cols.last - r.cols.first + 1;
      if (nr > 0 && nc > 0) {
        const scalar_t* gp = g + n * a.gsn + r.o * a.gsc;
        const int64_t region = nr * nc;
        int64_t k = ty;
        int64_t row = k / nc;
        int64_t col = k % nc;
        const int64_t dq = kClRows / nc;
        const int64_t dr = kClRows % nc;
        for (; k < region; k += kClRows) {
          const int64_t Y = r.rows.first + row;
          const int64_t X = r.cols.first + col;
          const acc_t wh = bilinear_tap_weight(bilinear_tap<acc_t>(Y, a.h, a.OH, scale_h, a.align_corners), u);
          const acc_t ww = bilinear_tap_weight(bilinear_tap<acc_t>(X, a.w, a.OW, scale_w, a.align_corners), v);
          acc.add(wh * ww * static_cast<acc_t>(gp[(Y - r.dy) * a.gsh + (X - r.dx) * a.gsw]));
          col += dr;
          row += dq;
          if (col >= nc) {
            col -= nc;
            ++row;
          }
        }
      }
    }
    part[ty][tx] = acc.sum();
    __syncthreads();
#pragma unroll
    for (int s = kClRows / 2; s > 0; s /= 2) {
      if (ty < s) part[ty][tx] += part[ty + s][tx];
      __syncthreads();
    }
    if (ty == 0 && valid)
      gb[n * a.bsn + ch * a.bsc + u * a.bsh + v * a.bsw] = static_cast<scalar_t>(static_cast<acc_t>(part[0][tx]));
    __syncthreads();
  }
}

// ---------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------

// Channels fastest in memory (channels_last).
bool channels_fastest(const at::Tensor& t) { return t.size(1) > 1 && t.stride(1) == 1; }

at::Tensor upsample_shift_add_cuda(const at::Tensor& base, at::TensorList taps, int64_t kernel_size,
                                   bool align_corners) {
  const char* op = "pyramid_ext::upsample_shift_add";
  check_upsample_shift_add(op, base, taps, kernel_size);
  TORCH_CHECK(on_device(base), op, ": base must be a CUDA tensor, got ", base.device());
  DeviceGuard guard(base.device());
  at::Tensor out = at::empty_like(base);  // base's strides (it is dense: NCHW or channels_last)
  if (out.numel() == 0) return out;
  if (taps.empty()) {
    out.copy_(base);
    return out;
  }
  auto stream = current_stream();
  const int64_t N = base.size(0), C = base.size(1), H = base.size(2), W = base.size(3);
  const bool cf = channels_fastest(out);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, base.scalar_type(), "upsample_shift_add_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t ntaps = static_cast<int64_t>(taps.size());
    // More tap tensors than one launch takes: the running sum between
    // launches, in acc_t, with out's strides.
    at::Tensor partial;
    if (ntaps > kMaxTaps) partial = at::empty_like(out, out.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    ShiftOut s;
    s.bsn = base.stride(0);
    s.bsc = base.stride(1);
    s.bsh = base.stride(2);
    s.bsw = base.stride(3);
    s.osn = out.stride(0);
    s.osc = out.stride(1);
    s.osh = out.stride(2);
    s.osw = out.stride(3);
    TORCH_INTERNAL_ASSERT(!partial.defined() || partial.strides() == out.strides());
    s.K = kernel_size;
    s.align_corners = align_corners;
    const scalar_t* bp = base.const_data_ptr<scalar_t>();
    scalar_t* op_ = out.mutable_data_ptr<scalar_t>();
    acc_t* pp = partial.defined() ? partial.mutable_data_ptr<acc_t>() : nullptr;
    const int64_t total = N * C * H * W;
    const unsigned grid = grid_for(total, kThreads, kThreads);
    const bool small = total <= std::numeric_limits<int32_t>::max();
    for (int64_t first = 0; first < ntaps; first += kMaxTaps) {
      ShiftParams P;
      P.ntaps = 0;
      for (int64_t i = first; i < ntaps && i < first + kMaxTaps; ++i) {
        const at::Tensor& t = taps[i];
        ShiftTap& tp = P.tap[P.ntaps++];
        tp.data = t.const_data_ptr<scalar_t>();
        tp.sn = t.stride(0);
        tp.sc = t.stride(1);
        tp.sh = t.stride(2);
        tp.sw = t.stride(3);
        tp.ih = t.size(2);
        tp.iw = t.size(3);
        tp.copy = (tp.ih == H && tp.iw == W) ? 1 : 0;
        tp.scale_h = static_cast<double>(bilinear_scale<acc_t>(tp.ih, H, align_corners));
        tp.scale_w = static_cast<double>(bilinear_scale<acc_t>(tp.iw, W, align_corners));
      }
      s.read_partial = first > 0;
      s.write_partial = first + kMaxTaps < ntaps;
      if (small && cf) {
        PE_LAUNCH((upsample_shift_add_kernel<scalar_t, acc_t, int32_t, true>), grid, kThreads, 0, stream)(
            P, bp, pp, op_, static_cast<int32_t>(N), static_cast<int32_t>(C), static_cast<int32_t>(H),
            static_cast<int32_t>(W), s);
      } else if (small) {
        PE_LAUNCH((upsample_shift_add_kernel<scalar_t, acc_t, int32_t, false>), grid, kThreads, 0, stream)(
            P, bp, pp, op_, static_cast<int32_t>(N), static_cast<int32_t>(C), static_cast<int32_t>(H),
            static_cast<int32_t>(W), s);
      } else if (cf) {
        PE_LAUNCH((upsample_shift_add_kernel<scalar_t, acc_t, int64_t, true>), grid, kThreads, 0, stream)(
            P, bp, pp, op_, N, C, H, W, s);
      } else {
        PE_LAUNCH((upsample_shift_add_kernel<scalar_t, acc_t, int64_t, false>), grid, kThreads, 0, stream)(
            P, bp, pp, op_, N, C, H, W, s);
      }
      PE_KERNEL_LAUNCH_CHECK();
    }
  });
  return out;
}

std::vector<at::Tensor> upsample_shift_add_backward_cuda(const at::Tensor& grad, c10::SymIntArrayRef shapes_s,
                                                         int64_t kernel_size, bool align_corners,
                                                         const c10::List<bool>& channels_last) {
  const char* op = "pyramid_ext::upsample_shift_add_backward";
  const at::IntArrayRef shapes = C10_AS_INTARRAYREF_SLOW(shapes_s);
  check_upsample_shift_add_backward(op, grad, shapes, kernel_size, channels_last);
  TORCH_CHECK(on_device(grad), op, ": grad must be a CUDA tensor, got ", grad.device());
  DeviceGuard guard(grad.device());
  auto stream = current_stream();
  const int64_t N = grad.size(0), Cout = grad.size(1), OH = grad.size(2), OW = grad.size(3);
  const int64_t C = kernel_size * kernel_size * Cout;
  const bool cf = channels_fastest(grad);
  std::vector<at::Tensor> grads;
  for (size_t i = 0; i < shapes.size() / 2; ++i) {
    const int64_t h = shapes[2 * i], w = shapes[2 * i + 1];
    const auto fmt = channels_last.get(i) ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
    at::Tensor gb = at::empty({N, C, h, w}, grad.options().memory_format(fmt));
    grads.push_back(gb);
    if (gb.numel() == 0) continue;
    ShiftBwdArgs a;
    a.gsn = grad.stride(0);
    a.gsc = grad.stride(1);
    a.gsh = grad.stride(2);
    a.gsw = grad.stride(3);
    a.bsn = gb.stride(0);
    a.bsc = gb.stride(1);
    a.bsh = gb.stride(2);
    a.bsw = gb.stride(3);
    a.N = N;
    a.C = C;
    a.h = h;
    a.w = w;
    a.Cout = Cout;
    a.K = kernel_size;
    a.OH = OH;
    a.OW = OW;
    a.align_corners = align_corners;
    a.channels_fastest = cf;
    // Outputs reading one tap element, about: a stretch of OH / h rows plus
    // the neighbours' taps (as upsample_concat's backward).
    const int64_t readers = std::min(OH, OH / h + 2) * std::min(OW, OW / w + 2);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "upsample_shift_add_bwd_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const acc_t scale_h = bilinear_scale<acc_t>(h, OH, align_corners);
      const acc_t scale_w = bilinear_scale<acc_t>(w, OW, align_corners);
      const scalar_t* gp = grad.const_data_ptr<scalar_t>();
      scalar_t* bp = gb.mutable_data_ptr<scalar_t>();
      const int64_t elems = N * C * h * w;
      if (cf && readers >= 64) {
        const unsigned grid = grid_for(N * h * w * ceil_div(C, kWarp), 1, kWarp * kClRows);
        PE_LAUNCH((upsample_shift_bwd_cl_kernel<scalar_t, acc_t>), grid, dim3(kWarp, kClRows), 0, stream)(
            gp, bp, a, scale_h, scale_w);
      } else if (readers >= 2048) {
        const unsigned grid = grid_for(elems, 1, kThreads);
        PE_LAUNCH((upsample_shift_bwd_group_kernel<scalar_t, acc_t, kThreads>), grid, kThreads, 0, stream)(
            gp, bp, a, scale_h, scale_w);
      } else if (readers >= 64) {
        const unsigned grid = grid_for(elems, kThreads / kWarp, kThreads);
        PE_LAUNCH((upsample_shift_bwd_group_kernel<scalar_t, acc_t, kWarp>), grid, kThreads, 0, stream)(
            gp, bp, a, scale_h, scale_w);
      } else {
        const unsigned grid = grid_for(elems, kThreads, kThreads);
        PE_LAUNCH((upsample_shift_bwd_group_kernel<scalar_t, acc_t, 1>), grid, kThreads, 0, stream)(
            gp, bp, a, scale_h, scale_w);
      }
      PE_KERNEL_LAUNCH_CHECK();
    });
  }
  return grads;
}

}  // namespace
}  // namespace cuda
}  // namespace pyramid_ext

PE_CUDA_LIBRARY_IMPL(m) {
  m.impl("upsample_shift_add", &pyramid_ext::cuda::upsample_shift_add_cuda);
  m.impl("upsample_shift_add_backward", &pyramid_ext::cuda::upsample_shift_add_backward_cuda);
}
