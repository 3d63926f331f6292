// CUDA kernels of pyramid_ext::upsample_concat, upsample_concat_out and
// upsample_concat_backward.
//
// Forward: one write pass over the output. Each thread writes one output
// element, through out's strides (out may be a channel slice of a bigger
// buffer, NCHW or channels_last): a copy for x (and for branches already at
// the output size, as ATen copies them), else the bilinear blend of the four
// taps (bilinear_tap, exactly ATen's weights) in the accumulation type.
//
// Backward: a gather, no atomics. grad_branch[n, c, i, j] is the sum over the
// output rows / columns that read (i, j) (bilinear_readers: one contiguous
// range per axis) of the tap weights times grad_out; each branch element is
// reduced by one thread, one warp or one block depending on how many outputs
// read it, with fixed-order shuffle / shared-memory trees (bitwise
// deterministic). A 1x1 branch thus gets a whole block per (n, c) plane.
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

#include "cuda/common.cuh"
#include "pyramid_index.h"
#include "upsample_concat_checks.h"

namespace pyramid_ext {
namespace cuda {
namespace {

constexpr int kMaxParts = 16;
constexpr int kThreads = 256;

// One input of the concatenation: channels [previous c_end, c_end) of the
// launch's channel range.
struct UpPart {
  const void* data;
  int64_t sn, sc, sh, sw;
  double scale_h;  // bilinear_scale<acc_t>, stored exactly in a double
  double scale_w;
  int64_t c_end;
  int64_t ih, iw;
  int32_t copy;  // same spatial size as out: a plain copy, as ATen does
};

struct UpParams {
  UpPart part[kMaxParts];
  int32_t nparts;
};
static_assert(sizeof(UpParams) <= 4000, "UpParams must fit a 4 KB kernel argument");

// index_t int32 (fewer than 2^31 elements): coordinates decoded with FastDiv
// (div_c, div_ow, div_oh); int64: with `/`, the FastDivs unused.
template <typename scalar_t, typename acc_t, typename index_t, bool kChannelsFastest>
__global__ void upsample_concat_kernel(const __grid_constant__ UpParams P, scalar_t* __restrict__ out,
                                       index_t N, index_t C, int64_t c_start, index_t OH, index_t OW,
                                       int64_t osn, int64_t osc, int64_t osh, int64_t osw, bool align_corners,
                                       FastDiv div_c, FastDiv div_ow, FastDiv div_oh) {
  const int64_t total = int64_t{N} * C * OH * OW;
  // an int64 counter: an int32 one could overflow past total - 1 + the grid's stride
  for (int64_t e = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; e < total;
       e += int64_t{gridDim.x} * blockDim.x) {
    index_t n, c, oh, ow;
    if constexpr (std::is_same_v<index_t, int32_t>) {
      const uint32_t u = static_cast<uint32_t>(e);
      if constexpr (kChannelsFastest) {
        const uint32_t q = div_c.div(u);
        c = static_cast<index_t>(u - q * div_c.divisor);
        const uint32_t q2 = div_ow.div(q);
        ow = static_cast<index_t>(q - q2 * div_ow.divisor);
        n = static_cast<index_t>(div_oh.div(q2));
        oh = static_cast<index_t>(q2 - static_cast<uint32_t>(n) * div_oh.divisor);
      } else {
        const uint32_t q = div_ow.div(u);
        ow = static_cast<index_t>(u - q * div_ow.divisor);
        const uint32_t q2 = div_oh.div(q);
        oh = static_cast<index_t>(q - q2 * div_oh.divisor);
        n = static_cast<index_t>(div_c.div(q2));
        c = static_cast<index_t>(q2 - static_cast<uint32_t>(n) * div_c.divisor);
      }
    } else if constexpr (kChannelsFastest) {
      c = e % C;
      index_t rest = e / C;
      ow = rest % OW;
      rest /= OW;
      oh = rest % OH;
      n = rest / OH;
    } else {
      ow = e % OW;
      index_t rest = e / OW;
      oh = rest % OH;
      rest /= OH;
      c = rest % C;
      n = rest / C;
    }
    int p = 0;
    while (p + 1 < P.nparts && static_cast<int64_t>(c) >= P.part[p].c_end) ++p;
    const UpPart& pt = P.part[p];
    const int64_t cb = static_cast<int64_t>(c) - (p > 0 ? P.part[p - 1].c_end : 0);
    const scalar_t* src = static_cast<const scalar_t*>(pt.data) + int64_t{n} * pt.sn + cb * pt.sc;
    scalar_t v;
    if (pt.copy) {
      v = src[int64_t{oh} * pt.sh + int64_t{ow} * pt.sw];
    } else {
      const LinearTap<acc_t> th =
          bilinear_tap<acc_t>(oh, pt.ih, OH, static_cast<acc_t>(pt.scale_h), align_corners);
      const LinearTap<acc_t> tw =
          bilinear_tap<acc_t>(ow, pt.iw, OW, static_cast<acc_t>(pt.scale_w), align_corners);
      const scalar_t* r0 = src + th.i0 * pt.sh;
      const scalar_t* r1 = src + th.i1 * pt.sh;
      const acc_t v00 = static_cast<acc_t>(r0[tw.i0 * pt.sw]);
      const acc_t v01 = static_cast<acc_t>(r0[tw.i1 * pt.sw]);
      const acc_t v10 = static_cast<acc_t>(r1[tw.i0 * pt.sw]);
      const acc_t v11 = static_cast<acc_t>(r1[tw.i1 * pt.sw]);
      v = static_cast<scalar_t>(th.w0 * (tw.w0 * v00 + tw.w1 * v01) + th.w1 * (tw.w0 * v10 + tw.w1 * v11));
    }
    out[int64_t{n} * osn + (c_start + int64_t{c}) * osc + int64_t{oh} * osh + int64_t{ow} * osw] = v;
  }
}

// ---------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------

struct BwdArgs {
  int64_t gsn, gsc, gsh, gsw;  // grad_out strides
  int64_t c_off;               // the branch's first channel in grad_out
  int64_t bsn, bsc, bsh, bsw;  // grad_branch strides
  int64_t N, C, h, w;          // grad_branch sizes
  int64_t OH, OW;
  bool align_corners;
  bool channels_fastest;  // element order: (n, i, j, c) instead of (n, c, i, j)
};

__device__ __forceinline__ void decode(const BwdArgs& a, int64_t e, int64_t& n, int64_t& c, int64_t& i,
                                       int64_t& j) {
  if (a.channels_fastest) {
    c = e % a.C;
    int64_t rest = e / a.C;
    j = rest % a.w;
    rest /= a.w;
    i = rest % a.h;
    n = rest / a.h;
  } else {
    j = e % a.w;
    int64_t rest = e / a.w;
    i = rest % a.h;
    rest /= a.h;
    c = rest % a.C;
    n = rest / a.C;
  }
}

// G threads per branch element (1, one warp, or the whole block); the G
// threads stride the element's reader rectangle row-major and reduce with a
// fixed tree. A small branch's element reads a whole plane: each thread sums
// its terms in float runs (RunSum, common.cuh), the runs and the trees in
// double. A term is rounded at most twice in float (wh * ww * g) and passes
// at most kRunLength - 1 float additions; a full run leaves fewer than
// 2^31 / 6 + 10 double roundings for a plane of up to 2^31 elements (shorter
// runs leave more, under 2^31, but fewer float ones), so with the final
// rounding the result is within (14 * 2^-24 + 2^-25) sum |terms|
// < 8.7e-7 sum |terms| of fp64.
template <typename scalar_t, typename acc_t, int G>
__global__ void upsample_bwd_group_kernel(const scalar_t* __restrict__ g, scalar_t* __restrict__ gb,
                                          const BwdArgs a, acc_t scale_h, acc_t scale_w) {
  PE_SHARED_ARRAY(double, warp_part, [kThreads / kWarp]);
  const int groups = blockDim.x / G;
  const int member = threadIdx.x % G;
  const int64_t total = a.N * a.C * a.h * a.w;
  for (int64_t e = blockIdx.x * int64_t{groups} + threadIdx.x / G; e < total; e += int64_t{gridDim.x} * groups) {
    int64_t n, c, i, j;
    decode(a, e, n, c, i, j);
    const DstRange rr = bilinear_readers<acc_t>(i, a.h, a.OH, scale_h, a.align_corners);
    const DstRange rc = bilinear_readers<acc_t>(j, a.w, a.OW, scale_w, a.align_corners);
    const int64_t nr = rr.last - rr.first + 1;
    const int64_t nc = rc.last - rc.first + 1;
    const scalar_t* gp = g + n * a.gsn + (a.c_off + c) * a.gsc;
    double acc = 0.0;
    if (nr > 0 && nc > 0) {
      if constexpr (G == 1) {
        for (int64_t oh = rr.first; oh <= rr.last; ++oh) {
          const acc_t wh =
              bilinear_tap_weight(bilinear_tap<acc_t>(oh, a.h, a.OH, scale_h, a.align_corners), i);
          RunSum<acc_t> row;
          for (int64_t ow = rc.first; ow <= rc.last; ++ow) {
            const acc_t ww =
                bilinear_tap_weight(bilinear_tap<acc_t>(ow, a.w, a.OW, scale_w, a.align_corners), j);
            row.add(ww * static_cast<acc_t>(gp[oh * a.gsh + ow * a.gsw]));
          }
          acc += static_cast<double>(wh) * row.sum();
        }
      } else {
        RunSum<acc_t> part;
        const int64_t region = nr * nc;
        int64_t k = member;
        int64_t r = k / nc;
        int64_t col = k % nc;
        const int64_t dq = G / nc;
        const int64_t dr = G % nc;
        for (; k < region; k += G) {
          const int64_t oh = rr.first + r;
          const int64_t ow = rc.first + col;
          const acc_t wh =
              bilinear_tap_weight(bilinear_tap<acc_t>(oh, a.h, a.OH, scale_h, a.align_corners), i);
          const acc_t ww =
              bilinear_tap_weight(bilinear_tap<acc_t>(ow, a.w, a.OW, scale_w, a.align_corners), j);
          part.add(wh * ww * static_cast<acc_t>(gp[oh * a.gsh + ow * a.gsw]));
          col += dr;
          r += dq;
          if (col >= nc) {
            col -= nc;
            ++r;
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
    if (member == 0) gb[n * a.bsn + c * a.bsc + i * a.bsh + j * a.bsw] = static_cast<scalar_t>(static_cast<acc_t>(acc));
  }
}

// channels_last grad_out with many readers per element: one block per
// (n, i, j, tile of 32 channels); threadIdx.x over channels (coalesced),
// threadIdx.y strides the reader rectangle; a shared-memory tree over y
// (float runs per thread, double after them, as above).
constexpr int kClRows = 8;

template <typename scalar_t, typename acc_t>
__global__ void upsample_bwd_cl_kernel(const scalar_t* __restrict__ g, scalar_t* __restrict__ gb,
                                       const BwdArgs a, acc_t scale_h, acc_t scale_w) {
  PE_SHARED_ARRAY(double, part, [kClRows][kWarp]);
  const int tx = threadIdx.x;
  const int ty = threadIdx.y;
  const int64_t ctiles = (a.C + kWarp - 1) / kWarp;
  const int64_t blocks = a.N * a.h * a.w * ctiles;
  for (int64_t blk = blockIdx.x; blk < blocks; blk += gridDim.x) {
    const int64_t ct = blk % ctiles;
    int64_t rest = blk / ctiles;
    const int64_t j = rest % a.w;
    rest /= a.w;
    const int64_t i = rest % a.h;
    const int64_t n = rest / a.h;
    const int64_t c = ct * kWarp + tx;
    const bool valid = c < a.C;
    const DstRange rr = bilinear_readers<acc_t>(i, a.h, a.OH, scale_h, a.align_corners);
    const DstRange rc = bilinear_readers<acc_t>(j, a.w, a.OW, scale_w, a.align_corners);
    const int64_t nr = rr.last - rr.first + 1;
    const int64_t nc = rc.last - rc.first + 1;
    RunSum<acc_t> acc;
    if (valid && nr > 0 && nc > 0) {
      const scalar_t* gp = g + n * a.gsn + (a.c_off + c) * a.gsc;
      const int64_t region = nr * nc;
      int64_t k = ty;
      int64_t r = k / nc;
      int64_t col = k % nc;
      const int64_t dq = kClRows / nc;
      const int64_t dr = kClRows % nc;
      for (; k < region; k += kClRows) {
        const int64_t oh = rr.first + r;
        const int64_t ow = rc.first + col;
        const acc_t wh = bilinear_tap_weight(bilinear_tap<acc_t>(oh, a.h, a.OH, scale_h, a.align_corners), i);
        const acc_t ww = bilinear_tap_weight(bilinear_tap<acc_t>(ow, a.w, a.OW, scale_w, a.align_corners), j);
        acc.add(wh * ww * static_cast<acc_t>(gp[oh * a.gsh + ow * a.gsw]));
        col += dr;
        r += dq;
        if (col >= nc) {
          col -= nc;
          ++r;
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
      gb[n * a.bsn + c * a.bsc + i * a.bsh + j * a.bsw] = static_cast<scalar_t>(static_cast<acc_t>(part[0][tx]));
    __syncthreads();
  }
}

// ---------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------

// Channels fastest in memory (channels_last, or a channel slice of it).
bool channels_fastest(const at::Tensor& t) { return t.size(1) > 1 && t.stride(1) == 1; }

void upsample_concat_impl(const std::vector<ConcatPart>& parts, bool align_corners, const at::Tensor& out) {
  if (out.numel() == 0) return;
  DeviceGuard guard(out.device());
  auto stream = current_stream();
  const int64_t N = out.size(0), OH = out.size(2), OW = out.size(3);
  const bool cf = channels_fastest(out);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "upsample_concat_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    int64_t c_start = 0;
    size_t k = 0;
    while (k < parts.size()) {
      UpParams P;
      P.nparts = 0;
      int64_t chunk_c = 0;
      for (; k < parts.size() && P.nparts < kMaxParts; ++k) {
        const at::Tensor& t = parts[k].t;
        if (t.size(1) == 0) continue;
        UpPart& pt = P.part[P.nparts++];
        pt.data = t.const_data_ptr<scalar_t>();
        pt.sn = t.stride(0);
        pt.sc = t.stride(1);
        pt.sh = t.stride(2);
        pt.sw = t.stride(3);
        pt.ih = t.size(2);
        pt.iw = t.size(3);
        pt.copy = (pt.ih == OH && pt.iw == OW) ? 1 : 0;
        pt.scale_h = static_cast<double>(bilinear_scale<acc_t>(pt.ih, OH, align_corners));
        pt.scale_w = static_cast<double>(bilinear_scale<acc_t>(pt.iw, OW, align_corners));
        chunk_c += t.size(1);
        pt.c_end = chunk_c;
      }
      if (P.nparts == 0) break;
      const int64_t total = N * chunk_c * OH * OW;
      const unsigned grid = grid_for(total, kThreads, kThreads);
      const bool small = total <= std::numeric_limits<int32_t>::max();
      if (small) {
        const FastDiv dc(chunk_c), dow(OW), doh(OH);
        if (cf) {
          PE_LAUNCH((upsample_concat_kernel<scalar_t, acc_t, int32_t, true>), grid, kThreads, 0, stream)(
              P, op, static_cast<int32_t>(N), static_cast<int32_t>(chunk_c), c_start, static_cast<int32_t>(OH),
              static_cast<int32_t>(OW), out.stride(0), out.stride(1), out.stride(2), out.stride(3), align_corners,
              dc, dow, doh);
        } else {
          PE_LAUNCH((upsample_concat_kernel<scalar_t, acc_t, int32_t, false>), grid, kThreads, 0, stream)(
              P, op, static_cast<int32_t>(N), static_cast<int32_t>(chunk_c), c_start, static_cast<int32_t>(OH),
              static_cast<int32_t>(OW), out.stride(0), out.stride(1), out.stride(2), out.stride(3), align_corners,
              dc, dow, doh);
        }
      } else if (cf) {
        PE_LAUNCH((upsample_concat_kernel<scalar_t, acc_t, int64_t, true>), grid, kThreads, 0, stream)(
            P, op, N, chunk_c, c_start, OH, OW, out.stride(0), out.stride(1), out.stride(2), out.stride(3),
            align_corners, FastDiv(), FastDiv(), FastDiv());
      } else {
        PE_LAUNCH((upsample_concat_kernel<scalar_t, acc_t, int64_t, false>), grid, kThreads, 0, stream)(
            P, op, N, chunk_c, c_start, OH, OW, out.stride(0), out.stride(1), out.stride(2), out.stride(3),
            align_corners, FastDiv(), FastDiv(), FastDiv());
      }
      PE_KERNEL_LAUNCH_CHECK();
      c_start += chunk_c;
    }
  });
}

at::Tensor upsample_concat_cuda(const std::optional<at::Tensor>& x, at::TensorList branches,
                                c10::SymIntArrayRef size_s, bool align_corners, bool x_first, bool channels_last) {
  const char* op = "pyramid_ext::upsample_concat";
  std::vector<ConcatPart> parts = concat_parts(x, branches, x_first);
  const ConcatOut like = upsample_concat_out_like(op, parts, C10_AS_INTARRAYREF_SLOW(size_s));
  const auto fmt = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  at::Tensor out = at::empty(like.sizes, like.options.memory_format(fmt));
  TORCH_CHECK(on_device(out), op, ": inputs must be CUDA tensors, got ", out.device());
  DeviceGuard guard(out.device());
  check_upsample_concat_parts(op, parts, out);
  upsample_concat_impl(parts, align_corners, out);
  return out;
}

void upsample_concat_out_cuda(const std::optional<at::Tensor>& x, at::TensorList branches, bool align_corners,
                              bool x_first, const at::Tensor& out) {
  const char* op = "pyramid_ext::upsample_concat_out";
  TORCH_CHECK(out.defined() && on_device(out), op, ": out must be a CUDA tensor");
  std::vector<ConcatPart> parts = concat_parts(x, branches, x_first);
  check_upsample_concat_parts(op, parts, out);
  upsample_concat_impl(parts, align_corners, out);
}

std::vector<at::Tensor> upsample_concat_backward_cuda(const at::Tensor& grad_out, c10::SymIntArrayRef shapes_s,
                                                      c10::SymInt channel_offset_s, bool align_corners,
                                                      bool channels_last) {
  const char* op = "pyramid_ext::upsample_concat_backward";
  TORCH_CHECK(on_device(grad_out), op, ": grad_out must be a CUDA tensor, got ", grad_out.device());
  TORCH_CHECK(grad_out.dim() == 4, op, ": grad_out must be 4-D (N, C, H, W), got ", grad_out.dim(), "-D");
  TORCH_CHECK(is_pyramid_float(grad_out.scalar_type()), op,
              ": grad_out must be float64, float32, float16 or bfloat16, got ", grad_out.scalar_type());
  const at::IntArrayRef shapes = C10_AS_INTARRAYREF_SLOW(shapes_s);
  const int64_t channel_offset = channel_offset_s.guard_int(__FILE__, __LINE__);
  TORCH_CHECK(shapes.size() % 3 == 0, op, ": branch_shapes must hold (C, h, w) triples, got ", shapes.size(),
              " values");
  const int64_t nb = static_cast<int64_t>(shapes.size()) / 3;
  int64_t channels = 0;
  for (int64_t k = 0; k < nb; ++k) {
    TORCH_CHECK(shapes[3 * k] >= 0 && shapes[3 * k + 1] > 0 && shapes[3 * k + 2] > 0, op,
                ": invalid branch shape (", shapes[3 * k], ", ", shapes[3 * k + 1], ", ", shapes[3 * k + 2], ")");
    channels += shapes[3 * k];
  }
  TORCH_CHECK(channel_offset >= 0 && channel_offset + channels <= grad_out.size(1), op, ": channels [",
              channel_offset, ", ", channel_offset + channels, ") are outside grad_out's ", grad_out.size(1));

  DeviceGuard guard(grad_out.device());
  auto stream = current_stream();
  const auto fmt = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const int64_t N = grad_out.size(0), OH = grad_out.size(2), OW = grad_out.size(3);
  const bool cf = channels_fastest(grad_out);
  std::vector<at::Tensor> grads;
  int64_t c_off = channel_offset;
  for (int64_t k = 0; k < nb; ++k) {
    const int64_t C = shapes[3 * k], h = shapes[3 * k + 1], w = shapes[3 * k + 2];
    at::Tensor gb = at::empty({N, C, h, w}, grad_out.options().memory_format(fmt));
    grads.push_back(gb);
    const int64_t off = c_off;
    c_off += C;
    if (gb.numel() == 0) continue;
    if (OH == 0 || OW == 0) {
      gb.zero_();
      continue;
    }
    BwdArgs a;
    a.gsn = grad_out.stride(0);
    a.gsc = grad_out.stride(1);
    a.gsh = grad_out.stride(2);
    a.gsw = grad_out.stride(3);
    a.c_off = off;
    a.bsn = gb.stride(0);
    a.bsc = gb.stride(1);
    a.bsh = gb.stride(2);
    a.bsw = gb.stride(3);
    a.N = N;
    a.C = C;
    a.h = h;
    a.w = w;
    a.OH = OH;
    a.OW = OW;
    a.align_corners = align_corners;
    a.channels_fastest = cf;
    // Outputs reading one branch element, about: a stretch of OH / h rows
    // plus the neighbours' taps.
    const int64_t readers = std::min(OH, OH / h + 2) * std::min(OW, OW / w + 2);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_out.scalar_type(), "upsample_concat_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const acc_t scale_h = bilinear_scale<acc_t>(h, OH, align_corners);
      const acc_t scale_w = bilinear_scale<acc_t>(w, OW, align_corners);
      const scalar_t* gp = grad_out.const_data_ptr<scalar_t>();
      scalar_t* bp = gb.mutable_data_ptr<scalar_t>();
      const int64_t elems = N * C * h * w;
      if (cf && readers >= 64) {
        const unsigned grid = grid_for(N * h * w * ceil_div(C, kWarp), 1, kWarp * kClRows);
        PE_LAUNCH((upsample_bwd_cl_kernel<scalar_t, acc_t>), grid, dim3(kWarp, kClRows), 0, stream)(
            gp, bp, a, scale_h, scale_w);
      } else if (readers >= 2048) {
        const unsigned grid = grid_for(elems, 1, kThreads);
        PE_LAUNCH((upsample_bwd_group_kernel<scalar_t, acc_t, kThreads>), grid, kThreads, 0, stream)(
            gp, bp, a, scale_h, scale_w);
      } else if (readers >= 64) {
        const unsigned grid = grid_for(elems, kThreads / kWarp, kThreads);
        PE_LAUNCH((upsample_bwd_group_kernel<scalar_t, acc_t, kWarp>), grid, kThreads, 0, stream)(
            gp, bp, a, scale_h, scale_w);
      } else {
        const unsigned grid = grid_for(elems, kThreads, kThreads);
        PE_LAUNCH((upsample_bwd_group_kernel<scalar_t, acc_t, 1>), grid, kThreads, 0, stream)(
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
  m.impl("upsample_concat", &pyramid_ext::cuda::upsample_concat_cuda);
  m.impl("upsample_concat_out", &pyramid_ext::cuda::upsample_concat_out_cuda);
  m.impl("upsample_concat_backward", &pyramid_ext::cuda::upsample_concat_backward_cuda);
}
