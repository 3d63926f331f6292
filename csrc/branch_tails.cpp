// The pyramid branches' tails (pyramid_ext/nn.py, functional.py): a 1x1 conv as
// a matrix product, then optionally an eval BatchNorm and a ReLU, one branch
// (`_C._pointwise_tail`) or all of a pyramid's (`_C._pointwise_tails`: without
// autograd cut at samples among the threads; with it the branches side by
// side, or one autograd node for them all, PointwiseTailsBackward). Split from
// fast_calls.cpp, whose eager fast paths share its no-grad computation
// (fast_call_checks.h: tail_without_autograd, tails_without_autograd).
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/extension.h>

#include <algorithm>
#include <cstring>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "cpu/pointwise_product.h"
#include "fast_call_checks.h"

namespace pyramid_ext {
namespace {

using namespace fast_calls;  // the argument checks, TailArgs, make_autograd_node (fast_call_checks.h)

// A branch tail on a pooled map (pyramid_ext/nn.py `_run_modules`, and
// functional.py `_conv1x1_as_product`): a 1x1 conv as one matrix product,
// then, each optional, an eval BatchNorm with its running statistics and a
// ReLU (relu: 0 none, 1 out of place, 2 in place), in one call: on pooled maps
// the Python between these ops cost as much as the ops (a PPM's four tails on
// (16, 8, 8, 8)). The ops are ATen's, called through the dispatcher: autograd
// records them as it records the modules' calls. The Python layer has checked
// the modules and the sizes. The product: an NCHW result from planes of at
// least kBmmMinPixels pixels that are one (Cin, H*W) matrix per sample is
// bmm(weight, x[n]) (no copy in or out); otherwise the rows of x's pixels (a
// view for channels_last x, a copy for smaller NCHW planes) times the weight,
// the result channels_last where x is (and H*W > 1), else NCHW. Below
// kBmmMinPixels MKL's bmm was 1.3-7x slower than that copy and one mm (AMD
// EPYC, one and two threads: 1x1 convs 256 -> 64 on 16 samples and 2048 ->
// 512 on 2 of 2x2 and 3x3 planes, PPM levels; about even from 16 pixels).
constexpr int64_t kBmmMinPixels = 16;

// Whether the product of x takes the per-sample bmm (above).
bool per_sample_bmm(const at::Tensor& x) {
  return x.stride(1) != 1 && x.stride(2) == x.size(3) * x.stride(3) && x.size(2) * x.size(3) >= kBmmMinPixels;
}

// Without autograd, a float32 tail runs on our product kernel
// (cpu/pointwise_product.h: the product, bias, BatchNorm and ReLU in one
// pass, written in the result's layout) where this CPU has a copy of it;
// ATen's ops otherwise, and always where autograd records them.
bool float_param(const std::optional<at::Tensor>& t) {
  return !t || (t->scalar_type() == at::kFloat && t->dim() == 1 && t->is_contiguous() && t->device().is_cpu());
}

// The kernel transposes the weight on every call (a weight may change
// between calls without a version bump, through .data), and MKL's sgemm is
// the faster product in a loop: the kernel wins only on small weights, where
// the fused epilogue, no copies and a small footprint count. Measured (two
// threads, Intel Xeon, in a loop): 256 -> 64 channels on (16, b, b) pooled
// levels even (the PPM in context 946 -> 808 us, no grad); 512 -> 128 on
// (4, 6, 6) 76 -> 118 us, 2048 -> 512 on (2, 1, 1) 46 -> 700 us.
constexpr int64_t kProductMaxWeight = int64_t{1} << 15;  // cin * cout floats

bool product_kernel_takes(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                          const std::optional<at::Tensor>& bn_w, const std::optional<at::Tensor>& bn_b,
                          const std::optional<at::Tensor>& bn_mean, const std::optional<at::Tensor>& bn_var) {
  if (x.scalar_type() != at::kFloat || weight.scalar_type() != at::kFloat || !x.device().is_cpu() ||
      !weight.device().is_cpu() || weight.dim() != 4 || weight.size(2) != 1 || weight.size(3) != 1 ||
      weight.size(0) * weight.size(1) > kProductMaxWeight)
    return false;
  if (bn_mean.has_value() != bn_var.has_value()) return false;
  // (under a TorchDispatchMode, e.g. a FLOP counter, the ops stay visible)
  return float_param(bias) && float_param(bn_w) && float_param(bn_b) && float_param(bn_mean) && float_param(bn_var) &&
         cpu::pointwise_product::available() && c10::impl::TorchDispatchModeTLS::stack_len() == 0;
}

cpu::pointwise_product::Plan product_plan(const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                          const std::optional<at::Tensor>& bn_w,
                                          const std::optional<at::Tensor>& bn_b,
                                          const std::optional<at::Tensor>& bn_mean,
                                          const std::optional<at::Tensor>& bn_var, double eps, int64_t relu,
                                          bool rows) {
  auto ptr = [](const std::optional<at::Tensor>& t) { return t ? t->const_data_ptr<float>() : nullptr; };
  return cpu::pointwise_product::make_plan(weight.const_data_ptr<float>(), weight.size(0), weight.size(1),
                                           weight.stride(0), weight.stride(1), ptr(bias), ptr(bn_w), ptr(bn_b),
                                           ptr(bn_mean), ptr(bn_var), eps, relu != 0, rows);
}

cpu::pointwise_product::Layout product_layout(const at::Tensor& t) {
  return {t.size(2), t.size(3), t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

// Whether the kernel runs x's product into `result` along planes (both
// planar): then its plan needs no rows (make_plan's `rows`), and pieces are
// cut at whole kPlaneUnit pixels.
bool product_planes(const at::Tensor& x, const at::Tensor& result) {
  return cpu::pointwise_product::planar(product_layout(x)) && cpu::pointwise_product::planar(product_layout(result));
}

// Samples [n0, n1) of x through the plan into the same samples of `result`.
void run_product(const cpu::pointwise_product::Plan& plan, const at::Tensor& x, int64_t n0, int64_t n1,
                 at::Tensor& result) {
  const int64_t pixels = x.size(2) * x.size(3);
  cpu::pointwise_product::run(plan, x.const_data_ptr<float>(), product_layout(x), result.data_ptr<float>(),
                              product_layout(result), n0 * pixels, n1 * pixels);
}

at::Tensor run_pointwise_tail(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                              const std::optional<at::Tensor>& bn_weight, const std::optional<at::Tensor>& bn_bias,
                              const std::optional<at::Tensor>& bn_mean, const std::optional<at::Tensor>& bn_var,
                              double bn_eps, int64_t relu) {
  const int64_t n = x.size(0), cin = x.size(1), h = x.size(2), w = x.size(3), cout = weight.size(0);
  at::Tensor out;
  if (per_sample_bmm(x)) {
    const at::Tensor w3d = weight.reshape({cout, cin}).expand({n, cout, cin});
    const at::Tensor cols = x.view({n, cin, h * w});
    out = bias ? at::baddbmm(bias->view({cout, 1}), w3d, cols) : at::bmm(w3d, cols);
    out = out.view({n, cout, h, w});
  } else {
    const at::Tensor rows = x.permute({0, 2, 3, 1}).reshape({n * h * w, cin});
    const at::Tensor w2d = weight.reshape({cout, cin}).t();
    out = bias ? at::addmm(*bias, rows, w2d) : at::mm(rows, w2d);
    out = out.view({n, h, w, cout}).permute({0, 3, 1, 2});
    if (!(x.stride(1) == 1 && h * w > 1)) out = out.contiguous();
  }
  if (bn_mean.has_value()) {
    out = at::batch_norm(out, bn_weight, bn_bias, bn_mean, bn_var, /*training=*/false, /*momentum=*/0.0, bn_eps,
                         at::globalContext().userEnabledCuDNN());
  }
  if (relu == 2) {
    out.relu_();
  } else if (relu == 1) {
    out = at::relu(out);
  }
  return out;
}

at::Tensor empty_tail_result(const at::Tensor& x, int64_t cout, bool allocated_after);
bool any_requires_grad(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       const std::optional<at::Tensor>& bn_w, const std::optional<at::Tensor>& bn_b,
                       const std::optional<at::Tensor>& bn_mean, const std::optional<at::Tensor>& bn_var);

// Rows of pixels per thread at least: about 2^18 multiply-adds (a parallel
// region costs microseconds).
int64_t product_grain(int64_t cin, int64_t cout) {
  return std::max<int64_t>(6, (int64_t{1} << 18) / std::max<int64_t>(1, cin * cout));
}

// A tail without autograd: on the product kernel where it takes it, else ATen's ops.
at::Tensor unrecorded_tail(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           const std::optional<at::Tensor>& bn_weight, const std::optional<at::Tensor>& bn_bias,
                           const std::optional<at::Tensor>& bn_mean, const std::optional<at::Tensor>& bn_var,
                           double bn_eps, int64_t relu) {
  if (!product_kernel_takes(x, weight, bias, bn_weight, bn_bias, bn_mean, bn_var))
    return run_pointwise_tail(x, weight, bias, bn_weight, bn_bias, bn_mean, bn_var, bn_eps, relu);
  at::Tensor result = empty_tail_result(x, weight.size(0), bn_mean.has_value() || relu == 1);
  const int64_t pixels = x.size(2) * x.size(3);
  // planar maps cut at whole units (the plane kernel's vectors)
  const auto src = product_layout(x), dst = product_layout(result);
  const bool planes = product_planes(x, result);
  const int64_t unit = planes ? cpu::pointwise_product::kPlaneUnit : 1;
  const auto plan = product_plan(weight, bias, bn_weight, bn_bias, bn_mean, bn_var, bn_eps, relu, !planes);
  at::parallel_for(0, x.size(0) * pixels / unit,
                   std::max<int64_t>(1, product_grain(weight.size(1), weight.size(0)) / unit),
                   [&](int64_t begin, int64_t end) {
                     cpu::pointwise_product::run(plan, x.const_data_ptr<float>(), src, result.data_ptr<float>(), dst,
                                                 begin * unit, end * unit);
                   });
  return result;
}

// One pointwise_tail per branch of a pyramid (nn.py `pyramid_branches`: every
// tail a 1x1 conv, optionally an eval BatchNorm and a ReLU), the branches run
// side by side, one per thread, each tail's ops on that one thread. On pooled
// maps each op is too small for ATen to share among threads: on (16, 256,
// 16, 16) to 64 channels, bins 1, 2, 3, 6, channels_last, the four tails took
// 0.64 ms one after another on two threads, and 0.09, 0.12, 0.16 and 0.36 ms
// each on one. The branches go to the least loaded thread, largest first
// (load: the product's multiply-adds). The caller's thread-local state (grad
// mode, autocast, dispatch keys, Python modes) is set on each worker, so
// autograd records the ops as the serial calls would (recorded_tails: where
// the tails node, further below, does not apply). Without autograd the
// branches are cut into pieces of samples instead (share_tails, below), and
// with it the tails node records that computation as one node.
// `args`: per branch x, weight, bias, BatchNorm weight, bias, running mean
// and variance, eps, relu (as pointwise_tail's).

// Without autograd: every tail's samples cut into pieces so that each thread
// gets an even share of the multiply-adds (one branch can hold most of them:
// a PPM's 6x6 level has 36/50), each piece's product, BatchNorm and ReLU
// written into the branch's result by the thread that computes it. The same
// ops per element as run_pointwise_tail (the product over a piece's rows, the
// BatchNorm into the result's slice, the ReLU in place), so the same values.
struct TailPiece {
  int64_t branch, n0, n1;  // samples [n0, n1)
};

// The cost model of share_tails, in multiply-adds: a piece's fixed cost (its
// ops' calls, allocations and the BatchNorm's per-call work: about 10 us a
// piece, a 16 x 256 -> 64 product's worth), and the factor of a product over
// NCHW planes under kBmmMinPixels, copied in as rows and back out (its
// 1-thread time per multiply-add 1.5-2x the others', (16, 256) pooled to 2x2
// and 3x3, Intel Xeon).
constexpr double kPieceMacs = 1 << 19;
constexpr double kTransposedRowsFactor = 1.5;

// Per thread, the pieces of its share: branches largest first, each thread's
// share a run of the cost line, cut at whole samples.
std::vector<std::vector<TailPiece>> share_tails(const std::vector<TailArgs>& args, int64_t threads) {
  const int64_t branches = static_cast<int64_t>(args.size());
  std::vector<double> per_sample(static_cast<size_t>(branches)), branch_cost(static_cast<size_t>(branches));
  std::vector<int64_t> order(static_cast<size_t>(branches));
  double total = 0;
  for (int64_t b = 0; b < branches; ++b) {
    const at::Tensor& x = std::get<0>(args[static_cast<size_t>(b)]);
    const int64_t pixels = x.size(2) * x.size(3);
    const bool transposed_rows = x.stride(1) != 1 && pixels > 1 && !per_sample_bmm(x);  // run_tail_piece's rows
    per_sample[static_cast<size_t>(b)] = static_cast<double>(x.size(1) * pixels) *
                                         static_cast<double>(std::get<1>(args[static_cast<size_t>(b)]).size(0)) *
                                         (transposed_rows ? kTransposedRowsFactor : 1.0);
    branch_cost[static_cast<size_t>(b)] =
        kPieceMacs + per_sample[static_cast<size_t>(b)] * static_cast<double>(x.size(0));
    total += branch_cost[static_cast<size_t>(b)];
    order[static_cast<size_t>(b)] = b;
  }
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t u, int64_t v) { return branch_cost[u] > branch_cost[v]; });
  std::vector<std::vector<TailPiece>> pieces(static_cast<size_t>(threads));
  const double share = total / static_cast<double>(threads);
  int64_t t = 0;
  double done = 0;
  for (int64_t b : order) {
    const double cost = per_sample[static_cast<size_t>(b)];
    const int64_t samples = std::get<0>(args[static_cast<size_t>(b)]).size(0);
    for (int64_t n = 0; n < samples;) {
      int64_t k = samples - n;
      const double bound = share * static_cast<double>(t + 1);
      if (t + 1 < threads && cost > 0) {
        k = std::min<int64_t>(k, std::llround((bound - done - kPieceMacs) / cost));
        if (k <= 0) {
          ++t;
          continue;
        }
      }
      pieces[static_cast<size_t>(t)].push_back({b, n, n + k});
      done += kPieceMacs + cost * static_cast<double>(k);
      n += k;
      if (t + 1 < threads && done >= bound - cost / 2) ++t;
    }
  }
  return pieces;
}

bool any_requires_grad(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       const std::optional<at::Tensor>& bn_w, const std::optional<at::Tensor>& bn_b,
                       const std::optional<at::Tensor>& bn_mean, const std::optional<at::Tensor>& bn_var) {
  auto needs = [](const std::optional<at::Tensor>& t) { return t.has_value() && t->requires_grad(); };
  return x.requires_grad() || weight.requires_grad() || needs(bias) || needs(bn_w) || needs(bn_b) ||
         needs(bn_mean) || needs(bn_var);
}

bool tails_need_grad(const std::vector<TailArgs>& args) {
  if (!at::GradMode::is_enabled()) return false;
  for (const auto& [x, w, bias, bn_w, bn_b, bn_mean, bn_var, eps, relu] : args)
    if (any_requires_grad(x, w, bias, bn_w, bn_b, bn_mean, bn_var)) return true;
  return false;
}

// x's pixels as rows (n * h * w, cin): a view where they are one matrix, one
// copy per sample where each sample's pixels are (a pooled level of
// channels_last x: the levels of a sample side by side; reshape's copy
// through TensorIterator took 1.5-2x as long), else reshape's copy.
at::Tensor pixel_rows(const at::Tensor& x) {
  const int64_t n = x.size(0), cin = x.size(1), pixels = x.size(2) * x.size(3);
  const bool sample_rows = x.stride(1) == 1 && x.stride(3) == cin && x.stride(2) == x.size(3) * cin;
  if (!sample_rows || n == 1 || pixels == 1 || x.stride(0) == pixels * cin)
    return x.permute({0, 2, 3, 1}).reshape({n * pixels, cin});
  at::Tensor rows = at::empty({n * pixels, cin}, x.options());
  const size_t bytes = static_cast<size_t>(pixels * cin) * x.element_size();
  const char* src = static_cast<const char*>(x.const_data_ptr());
  char* dst = static_cast<char*>(rows.data_ptr());
  for (int64_t i = 0; i < n; ++i)
    std::memcpy(dst + static_cast<size_t>(i) * bytes, src + i * x.stride(0) * x.element_size(), bytes);
  return rows;
}

// One piece: run_pointwise_tail's ops on samples [n0, n1) of x, into that
// slice of `result` (laid out as run_pointwise_tail's result).
void run_tail_piece(const TailArgs& a, int64_t n0, int64_t n1, at::Tensor& result) {
  const auto& [x_all, weight, bias, bn_w, bn_b, bn_mean, bn_var, eps, relu] = a;
  if (n1 == n0) return;  // (no samples: the result is empty)
  const at::Tensor x = x_all.narrow(0, n0, n1 - n0);
  const int64_t n = n1 - n0, cin = x.size(1), h = x.size(2), w = x.size(3), cout = weight.size(0);
  at::Tensor dst = result.narrow(0, n0, n);
  const bool norm = bn_mean.has_value();
  // The product straight into the result where nothing follows it but the
  // ReLU and the result has its layout; else into its own tensor.
  if (per_sample_bmm(x)) {
    const at::Tensor w3d = weight.reshape({cout, cin}).expand({n, cout, cin});
    const at::Tensor cols = x.view({n, cin, h * w});
    at::Tensor prod = norm ? at::empty({n, cout, h * w}, x.options()) : dst.view({n, cout, h * w});
    if (bias) {
      at::baddbmm_out(prod, bias->view({cout, 1}), w3d, cols);
    } else {
      at::bmm_out(prod, w3d, cols);
    }
    if (norm) {
      at::Tensor save_mean = at::empty({0}, x.options()), save_invstd = at::empty({0}, x.options());
      at::native_batch_norm_out(dst, save_mean, save_invstd, prod.view({n, cout, h, w}), bn_w, bn_b, bn_mean, bn_var,
                                /*training=*/false, /*momentum=*/0.0, eps);
    }
  } else {
    const at::Tensor rows = pixel_rows(x);
    const at::Tensor w2d = weight.reshape({cout, cin}).t();
    // result channels_last (or 1x1): its memory is the product's rows
    const bool rows_layout = dst.permute({0, 2, 3, 1}).is_contiguous();
    at::Tensor prod = (norm || !rows_layout) ? at::empty({n * h * w, cout}, x.options())
                                             : dst.permute({0, 2, 3, 1}).view({n * h * w, cout});
    if (bias) {
      at::addmm_out(prod, *bias, rows, w2d);
    } else {
      at::mm_out(prod, rows, w2d);
    }
    at::Tensor out = prod.view({n, h, w, cout}).permute({0, 3, 1, 2});
    if (!rows_layout) out = out.contiguous();
    if (norm) {
      at::Tensor save_mean = at::empty({0}, x.options()), save_invstd = at::empty({0}, x.options());
      at::native_batch_norm_out(dst, save_mean, save_invstd, out, bn_w, bn_b, bn_mean, bn_var, /*training=*/false,
                                /*momentum=*/0.0, eps);
    } else if (!rows_layout) {
      dst.copy_(out);
    }
  }
  if (relu != 0) dst.relu_();
}

// run_pointwise_tail's result layout for x: NCHW from the per-sample bmm,
// else channels_last where x is (and H*W > 1), else NCHW; a 1x1 map with no
// op after the product that allocates (a BatchNorm, an out-of-place ReLU)
// keeps the product's strides (N, C, 1, 1) -> (C, 1, C, C).
at::Tensor empty_tail_result(const at::Tensor& x, int64_t cout, bool allocated_after) {
  const int64_t n = x.size(0), h = x.size(2), w = x.size(3);
  const bool bmm = per_sample_bmm(x);
  if (!bmm && h * w == 1 && !allocated_after) return at::empty({n, h, w, cout}, x.options()).permute({0, 3, 1, 2});
  const bool channels_last = !bmm && x.stride(1) == 1 && h * w > 1;
  return at::empty({n, cout, h, w}, x.options().memory_format(channels_last ? at::MemoryFormat::ChannelsLast
                                                                            : at::MemoryFormat::Contiguous));
}

// The tails without autograd: cut at samples on two threads or more, else
// one after another (one tail: unrecorded_tail, as _pointwise_tail).
std::vector<at::Tensor> unrecorded_tails(const std::vector<TailArgs>& args) {
  const int64_t branches = static_cast<int64_t>(args.size());
  std::vector<at::Tensor> outs(static_cast<size_t>(branches));
  const int64_t num_threads = at::get_num_threads();
  if (num_threads < 2 || at::in_parallel_region() || branches == 1) {
    for (int64_t b = 0; b < branches; ++b) {
      const auto& [x, w, bias, bn_w, bn_b, bn_mean, bn_var, eps, relu] = args[static_cast<size_t>(b)];
      outs[static_cast<size_t>(b)] = unrecorded_tail(x, w, bias, bn_w, bn_b, bn_mean, bn_var, eps, relu);
    }
    return outs;
  }
  for (int64_t b = 0; b < branches; ++b) {
    const TailArgs& a = args[static_cast<size_t>(b)];
    outs[static_cast<size_t>(b)] = empty_tail_result(std::get<0>(a), std::get<1>(a).size(0),
                                                   std::get<5>(a).has_value() || std::get<8>(a) == 1);
  }
  const auto pieces = share_tails(args, num_threads);
  // Branches our product kernel takes: their plans, made once here.
  std::vector<std::optional<cpu::pointwise_product::Plan>> plans(static_cast<size_t>(branches));
  for (int64_t b = 0; b < branches; ++b) {
    const auto& [x, w, bias, bn_w, bn_b, bn_mean, bn_var, eps, relu] = args[static_cast<size_t>(b)];
    if (product_kernel_takes(x, w, bias, bn_w, bn_b, bn_mean, bn_var)) {
      // (pieces cut at samples: whole units where the maps are planar)
      plans[static_cast<size_t>(b)] = product_plan(w, bias, bn_w, bn_b, bn_mean, bn_var, eps, relu,
                                                   !product_planes(x, outs[static_cast<size_t>(b)]));
    }
  }
  const at::ThreadLocalState state;
  at::parallel_for(0, num_threads, 1, [&](int64_t begin, int64_t end) {
    at::ThreadLocalStateGuard guard(state);
    for (int64_t t = begin; t < end; ++t)
      for (const TailPiece& p : pieces[static_cast<size_t>(t)]) {
        const auto& plan = plans[static_cast<size_t>(p.branch)];
        at::Tensor& out = outs[static_cast<size_t>(p.branch)];
        if (plan) {
          run_product(*plan, std::get<0>(args[static_cast<size_t>(p.branch)]), p.n0, p.n1, out);
        } else {
          run_tail_piece(args[static_cast<size_t>(p.branch)], p.n0, p.n1, out);
        }
      }
  });
  return outs;
}

// The tails with autograd recording ATen's ops (the side-by-side path):
// where the tails node below does not apply.
std::vector<at::Tensor> recorded_tails(const std::vector<TailArgs>& args) {
  const int64_t branches = static_cast<int64_t>(args.size());
  std::vector<at::Tensor> outs(static_cast<size_t>(branches));
  auto run = [&](int64_t b) {
    const auto& [x, w, bias, bn_w, bn_b, bn_mean, bn_var, eps, relu] = args[static_cast<size_t>(b)];
    outs[static_cast<size_t>(b)] = run_pointwise_tail(x, w, bias, bn_w, bn_b, bn_mean, bn_var, eps, relu);
  };
  std::vector<int64_t> order(static_cast<size_t>(branches));
  std::vector<double> cost(static_cast<size_t>(branches));
  double total = 0, largest = 0;
  for (int64_t b = 0; b < branches; ++b) {
    order[static_cast<size_t>(b)] = b;
    const auto& a = args[static_cast<size_t>(b)];
    cost[static_cast<size_t>(b)] = static_cast<double>(std::get<0>(a).numel()) * std::get<1>(a).size(0);
    total += cost[static_cast<size_t>(b)];
    largest = std::max(largest, cost[static_cast<size_t>(b)]);
  }
  // In turn (each op on ATen's threads) with one thread, inside a parallel
  // region, or where the largest branch is over 1.5x its even share of the
  // threads: one thread would then hold it alone while the others idle, and
  // its ops on all threads may be faster (side by side was measured on two
  // threads only; PPM bins 1, 2, 3, 6 put 36/50 of the work in one branch).
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), branches);
  if (threads < 2 || at::in_parallel_region() || largest * static_cast<double>(threads) > 1.5 * total) {
    for (int64_t b = 0; b < branches; ++b) run(b);
    return outs;
  }
  std::stable_sort(order.begin(), order.end(), [&](int64_t u, int64_t v) { return cost[u] > cost[v]; });
  std::vector<std::vector<int64_t>> work(static_cast<size_t>(threads));
  std::vector<double> load(static_cast<size_t>(threads), 0.0);
  for (int64_t b : order) {
    const size_t t = static_cast<size_t>(std::min_element(load.begin(), load.end()) - load.begin());
    work[t].push_back(b);
    load[t] += cost[static_cast<size_t>(b)];
  }
  const at::ThreadLocalState state;
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    at::ThreadLocalStateGuard guard(state);
    for (int64_t t = begin; t < end; ++t)
      for (int64_t b : work[static_cast<size_t>(t)]) run(b);
  });
  return outs;
}

// The tails with autograd as one node (eval tails: a 1x1 conv, an eval
// BatchNorm, a ReLU, each optional after the conv): the forward is the tails
// without autograd (cut at samples, on the product kernel where it takes
// them), so its values are those of a no-grad call, bit for bit; the
// backward is ATen's ops on the saved inputs, recorded under create_graph,
// so double backward holds. Why: recorded op by op the tails stayed whole
// (a cut branch's weight gradient would be a sum over the pieces) and
// autograd recorded 3-4 nodes a branch: the eval PPM forward with grad
// enabled took 1.00-1.02 ms against 0.81 without (16, 256, 16, 16) to 64
// channels, channels_last, two threads, eager's PPM between calls.
//
// Gradients per branch, g the output's: gy = threshold_backward(g, out, 0)
// with the ReLU (the mask of the output, as ReLU's own backward); with the
// BatchNorm gz = gy * weight / sqrt(var + eps) per channel, its weight's
// gradient sum(gy * (z - mean) / sqrt(var + eps)) from z = the product
// recomputed (only where that gradient is wanted), its bias's sum(gy); the
// conv's: bias sum(gz), weight gz^T x, input gz W over the pixels as rows.
// Each sum over the whole batch in one op: no order depends on the cut.
// A plain Node built as ATen's generated nodes are (see PoolLevelsBackward).
constexpr size_t kTailInputs = 5;  // x, weight, bias, BatchNorm weight, BatchNorm bias

struct PointwiseTailsBackward : public torch::autograd::Node {
  struct Branch {
    torch::autograd::SavedVariable x, weight, bias, bn_weight, bn_bias, bn_mean, bn_var, out;
    bool has_bias = false, norm = false, has_bn_weight = false;
    double eps = 0;
    int64_t relu = 0;
  };
  std::vector<Branch> branches;

  std::string name() const override { return "pyramid_ext::PointwiseTailsBackward"; }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    for (Branch& b : branches)
      for (auto* v : {&b.x, &b.weight, &b.bias, &b.bn_weight, &b.bn_bias, &b.bn_mean, &b.bn_var, &b.out})
        v->reset_data();
  }

  torch::autograd::variable_list apply(torch::autograd::variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    torch::autograd::variable_list result(branches.size() * kTailInputs);
    auto me = getptr();
    for (size_t i = 0; i < branches.size(); ++i) {
      const at::Tensor& g = grads[i];
      const size_t e = i * kTailInputs;
      const bool need_x = task_should_compute_output(e), need_w = task_should_compute_output(e + 1),
                 need_b = task_should_compute_output(e + 2), need_bnw = task_should_compute_output(e + 3),
                 need_bnb = task_should_compute_output(e + 4);
      if (!g.defined() || !(need_x || need_w || need_b || need_bnw || need_bnb)) continue;
      const Branch& b = branches[i];
      const at::Tensor x = b.x.unpack(me), weight = b.weight.unpack(me);
      const int64_t cout = weight.size(0), cin = weight.size(1);
      const at::Tensor gy = b.relu != 0 ? at::threshold_backward(g, b.out.unpack(me), 0) : g;
      at::Tensor gz = gy;
      if (b.norm) {
        const at::Tensor invstd = (b.bn_var.unpack(me) + b.eps).rsqrt();
        const at::Tensor bn_weight = b.has_bn_weight ? b.bn_weight.unpack(me) : at::Tensor();
        const at::Tensor alpha = bn_weight.defined() ? bn_weight * invstd : invstd;
        if (need_x || need_w || need_b) gz = gy * alpha.view({1, cout, 1, 1});
        if (need_bnw && bn_weight.defined()) {
          const std::optional<at::Tensor> bias =
              b.has_bias ? std::optional<at::Tensor>(b.bias.unpack(me)) : std::nullopt;
          const at::Tensor z = run_pointwise_tail(x, weight, bias, std::nullopt, std::nullopt, std::nullopt,
                                                  std::nullopt, 0.0, 0);
          const at::Tensor xhat = (z - b.bn_mean.unpack(me).view({1, cout, 1, 1})) * invstd.view({1, cout, 1, 1});
          result[e + 3] = (gy * xhat).sum({0, 2, 3});
        }
        if (need_bnb) result[e + 4] = gy.sum({0, 2, 3});
      }
      if (need_b && b.has_bias) result[e + 2] = gz.sum({0, 2, 3});
      if (need_x || need_w) {
        const at::Tensor gz_rows = gz.permute({0, 2, 3, 1}).reshape({-1, cout});
        if (need_w) {
          const at::Tensor x_rows = x.permute({0, 2, 3, 1}).reshape({-1, cin});
          result[e + 1] = gz_rows.t().mm(x_rows).view({cout, cin, 1, 1});
        }
        if (need_x)
          result[e] = gz_rows.mm(weight.reshape({cout, cin}))
                          .view({x.size(0), x.size(2), x.size(3), cin})
                          .permute({0, 3, 1, 2});
      }
    }
    return result;
  }
};

// Whether the tails node records these tails: CPU tensors, no gradient
// wanted for the BatchNorm's running statistics (eager's batch_norm would
// give them one), no forward-mode tangent, no functorch transform, no
// TorchDispatchMode (its handler sees ATen's ops, as before).
bool tails_node_takes(const std::vector<TailArgs>& args) {
  if (functorch_transform_active() || c10::impl::TorchDispatchModeTLS::stack_len() > 0) return false;
  auto tangent = [](const std::optional<at::Tensor>& t) { return t && t->_fw_grad(/*level=*/0).defined(); };
  for (const auto& [x, w, bias, bn_w, bn_b, bn_mean, bn_var, eps, relu] : args) {
    if (!x.device().is_cpu() || (bn_mean && bn_mean->requires_grad()) || (bn_var && bn_var->requires_grad()) ||
        bn_mean.has_value() != bn_var.has_value())
      return false;
    if (x._fw_grad(0).defined() || w._fw_grad(0).defined() || tangent(bias) || tangent(bn_w) || tangent(bn_b))
      return false;
  }
  return true;
}

std::vector<at::Tensor> tails_node(const std::vector<TailArgs>& args) {
  std::vector<at::Tensor> outs;
  {
    // below autograd: nothing recorded, and the results (a 1x1 map's is a
    // permuted empty) are plain tensors, not autograd views, for set_history
    at::AutoDispatchBelowADInplaceOrView below;
    outs = unrecorded_tails(args);
  }
  auto node = make_autograd_node<PointwiseTailsBackward>();
  std::vector<at::Tensor> inputs;
  inputs.reserve(args.size() * kTailInputs);
  node->branches.resize(args.size());
  auto opt = [](const std::optional<at::Tensor>& t) { return t ? *t : at::Tensor(); };
  for (size_t i = 0; i < args.size(); ++i) {
    const auto& [x, w, bias, bn_w, bn_b, bn_mean, bn_var, eps, relu] = args[i];
    inputs.insert(inputs.end(), {x, w, opt(bias), opt(bn_w), opt(bn_b)});
    auto& b = node->branches[i];
    b.x = torch::autograd::SavedVariable(x, false);
    b.weight = torch::autograd::SavedVariable(w, false);
    b.has_bias = bias.has_value();
    if (bias) b.bias = torch::autograd::SavedVariable(*bias, false);
    b.norm = bn_mean.has_value();
    b.has_bn_weight = bn_w.has_value();
    if (bn_w) b.bn_weight = torch::autograd::SavedVariable(*bn_w, false);
    if (bn_mean) {
      b.bn_mean = torch::autograd::SavedVariable(*bn_mean, false);
      b.bn_var = torch::autograd::SavedVariable(*bn_var, false);
    }
    b.eps = eps;
    b.relu = relu;
  }
  node->set_next_edges(torch::autograd::collect_next_edges(inputs));
  for (size_t i = 0; i < outs.size(); ++i) {
    torch::autograd::set_history(outs[i], node);
    if (std::get<8>(args[i]) != 0) node->branches[i].out = torch::autograd::SavedVariable(outs[i], true);
  }
  return outs;
}

std::vector<at::Tensor> pointwise_tails_impl(const std::vector<TailArgs>& args) {
  if (!tails_need_grad(args)) return unrecorded_tails(args);
  if (tails_node_takes(args)) return tails_node(args);
  return recorded_tails(args);
}

std::vector<at::Tensor> pointwise_tails(const std::vector<TailArgs>& args) {
  pybind11::gil_scoped_release no_gil;
  return pointwise_tails_impl(args);
}

at::Tensor pointwise_tail(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                          const std::optional<at::Tensor>& bn_weight, const std::optional<at::Tensor>& bn_bias,
                          const std::optional<at::Tensor>& bn_mean, const std::optional<at::Tensor>& bn_var,
                          double bn_eps, int64_t relu) {
  pybind11::gil_scoped_release no_gil;
  if (at::GradMode::is_enabled() && any_requires_grad(x, weight, bias, bn_weight, bn_bias, bn_mean, bn_var))
    return pointwise_tails_impl({TailArgs{x, weight, bias, bn_weight, bn_bias, bn_mean, bn_var, bn_eps, relu}})[0];
  return unrecorded_tail(x, weight, bias, bn_weight, bn_bias, bn_mean, bn_var, bn_eps, relu);
}

// share_tails' pieces for `threads` threads, per thread (branch, first
// sample, end sample): for the tests.
std::vector<std::vector<std::tuple<int64_t, int64_t, int64_t>>> tail_pieces(const std::vector<TailArgs>& args,
                                                                            int64_t threads) {
  std::vector<std::vector<std::tuple<int64_t, int64_t, int64_t>>> out;
  for (const auto& mine : share_tails(args, threads)) {
    out.emplace_back();
    for (const TailPiece& p : mine) out.back().emplace_back(p.branch, p.n0, p.n1);
  }
  return out;
}

void register_tails(pybind11::module_& m) {
  m.def("_pointwise_tail", &pointwise_tail,
        "A 1x1 conv as a matrix product, then optionally an eval BatchNorm and a ReLU (checked by pyramid_ext.nn).");
  m.def("_pointwise_tails", &pointwise_tails,
        "_pointwise_tail for each branch of a pyramid (a list of its argument tuples), shared among the intra-op "
        "threads: without autograd cut at samples, else the branches side by side.");
  m.def("_tail_pieces", &tail_pieces,
        "_pointwise_tails' cut of its branches' samples among `threads` threads: per thread (branch, start, end) "
        "(for the tests).");
  m.attr("_PRODUCT_KERNEL_MAX_WEIGHT") = kProductMaxWeight;  // the bound the Python gates read
  m.def("_pointwise_product_available", &cpu::pointwise_product::available,
        "Whether _pointwise_tail's float32 product kernel runs on this CPU now (AVX-512, or AVX2 with FMA; the "
        "simd_isa test switch respected): for the tests.");
}

}  // namespace

at::Tensor fast_calls::tail_without_autograd(const at::Tensor& x, const at::Tensor& weight,
                                             const std::optional<at::Tensor>& bias) {
  return unrecorded_tail(x, weight, bias, std::nullopt, std::nullopt, std::nullopt, std::nullopt, 0.0, 0);
}

std::vector<at::Tensor> fast_calls::tails_without_autograd(const std::vector<TailArgs>& args) {
  return unrecorded_tails(args);
}

void fast_calls::register_branch_tails(pybind11::module_& m) { register_tails(m); }

}  // namespace pyramid_ext
