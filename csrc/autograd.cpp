// Autograd of the compiled forward ops (multi_pool2d, upsample_concat), in C++.
//
// The same formulas as pyramid_ext/_ops.py's make_pool_autograd and
// make_upsample_concat_autograd (which the Triton ops use): registered here
// instead of through torch.library's Python autograd, whose per-call cost
// (a Python kernel at the Autograd key, boxing every argument, a Python
// autograd.Function) was several times a small input's whole eager pooling.
// Sizes and windows stay SymInts, so torch.compile(dynamic=True) and
// torch.export trace through these functions as before. The backward ops keep
// their Python autograd (_ops.py, double backward): the backward below calls
// them through the dispatcher, so their derivatives are recorded as before.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <initializer_list>
#include <optional>
#include <tuple>
#include <vector>

#include "pyramid_index.h"

namespace pyramid_ext {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using PoolSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, c10::SymIntArrayRef, c10::SymIntArrayRef,
                                                   at::IntArrayRef, int64_t, bool);
using PoolBackwardSig = at::Tensor(const at::Tensor&, const std::optional<at::Tensor>&, c10::SymIntArrayRef,
                                   c10::SymIntArrayRef, c10::SymIntArrayRef, at::IntArrayRef, int64_t, bool, bool,
                                   const std::optional<at::Tensor>&);
using UpsampleSig = at::Tensor(const std::optional<at::Tensor>&, at::TensorList, c10::SymIntArrayRef, bool, bool,
                               bool);
using UpsampleBackwardSig = std::vector<at::Tensor>(const at::Tensor&, c10::SymIntArrayRef, c10::SymInt, bool, bool);

template <typename Sig>
c10::TypedOperatorHandle<Sig> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

// _ops._channels_last: channels_last memory and not also NCHW-contiguous.
bool channels_last(const at::Tensor& t) {
  return t.dim() == 4 && !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast);
}

struct PoolFunction : public torch::autograd::Function<PoolFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, c10::SymIntArrayRef h_bounds,
                               c10::SymIntArrayRef w_bounds, at::IntArrayRef level_bins, int64_t mode,
                               bool channels_last_levels) {
    static const auto op = op_handle<PoolSig>("pyramid_ext::multi_pool2d");
    at::Tensor values, indices;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      std::tie(values, indices) = op.call(x, h_bounds, w_bounds, level_bins, mode, channels_last_levels);
    }
    auto& saved = ctx->saved_data;
    saved["input_shape"] = x.sym_sizes();
    saved["h_bounds"] = h_bounds;
    saved["w_bounds"] = w_bounds;
    saved["level_bins"] = level_bins;
    saved["mode"] = mode;
    saved["channels_last_levels"] = channels_last_levels;
    saved["channels_last_input"] = channels_last(x);
    if (mode == kPoolMax) ctx->save_for_backward({indices});
    ctx->mark_non_differentiable({indices});
    return {values, indices};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = op_handle<PoolBackwardSig>("pyramid_ext::multi_pool2d_backward");
    const auto& saved = ctx->saved_data;
    const int64_t mode = saved.at("mode").toInt();
    std::optional<at::Tensor> indices;
    if (mode == kPoolMax) indices = ctx->get_saved_variables()[0];
    at::Tensor grad_x = op.call(grads[0].contiguous(), indices, saved.at("input_shape").toSymIntVector(),
                                saved.at("h_bounds").toSymIntVector(), saved.at("w_bounds").toSymIntVector(),
                                saved.at("level_bins").toIntVector(), mode,
                                saved.at("channels_last_levels").toBool(), saved.at("channels_last_input").toBool(),
                                /*addend=*/std::nullopt);
    return {grad_x, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// Whether a call records a node: grad mode on and an input requiring grad.
// Otherwise the op is called below autograd directly: Function::apply would
// still build a node and fill its saved data (IValue lists of the windows),
// which on a small input cost as much as the kernel.
bool records(std::initializer_list<const at::Tensor*> inputs) {
  if (!at::GradMode::is_enabled()) return false;
  for (const at::Tensor* t : inputs)
    if (t->defined() && t->requires_grad()) return true;
  return false;
}

std::tuple<at::Tensor, at::Tensor> multi_pool2d_autograd(const at::Tensor& x, c10::SymIntArrayRef h_bounds,
                                                         c10::SymIntArrayRef w_bounds, at::IntArrayRef level_bins,
                                                         int64_t mode, bool channels_last_levels) {
  if (!records({&x})) {
    static const auto op = op_handle<PoolSig>("pyramid_ext::multi_pool2d");
    at::AutoDispatchBelowADInplaceOrView below;
    return op.call(x, h_bounds, w_bounds, level_bins, mode, channels_last_levels);
  }
  TORCH_CHECK(mode != kPoolMaxValues, "pyramid_ext::multi_pool2d: mode 2 (max, values only) has no gradient, ",
              "and x requires grad: use mode 1");
  auto out = PoolFunction::apply(x, h_bounds, w_bounds, level_bins, mode, channels_last_levels);
  return {out[0], out[1]};
}

struct UpsampleConcatFunction : public torch::autograd::Function<UpsampleConcatFunction> {
  static variable_list forward(AutogradContext* ctx, const std::optional<at::Tensor>& x, at::TensorList branches,
                               c10::SymIntArrayRef size, bool align_corners, bool x_first, bool channels_last_out) {
    static const auto op = op_handle<UpsampleSig>("pyramid_ext::upsample_concat");
    at::Tensor out;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      out = op.call(x, branches, size, align_corners, x_first, channels_last_out);
    }
    std::vector<c10::SymInt> shapes;
    c10::SymInt branch_channels = 0;
    for (const at::Tensor& b : branches) {
      shapes.push_back(b.sym_size(1));
      shapes.push_back(b.sym_size(2));
      shapes.push_back(b.sym_size(3));
      branch_channels = branch_channels + b.sym_size(1);
    }
    const bool has_x = x.has_value() && x->defined();
    auto& saved = ctx->saved_data;
    saved["branch_shapes"] = c10::SymIntArrayRef(shapes);
    saved["x_channels"] = has_x ? x->sym_size(1) : c10::SymInt(0);
    saved["branch_channels"] = branch_channels;
    saved["x_first"] = x_first;
    saved["align_corners"] = align_corners;
    saved["has_x"] = has_x;
    return {out};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = op_handle<UpsampleBackwardSig>("pyramid_ext::upsample_concat_backward");
    const auto& saved = ctx->saved_data;
    const std::vector<c10::SymInt> shapes = saved.at("branch_shapes").toSymIntVector();
    const c10::SymInt cx = saved.at("x_channels").toSymInt();
    const c10::SymInt cb = saved.at("branch_channels").toSymInt();
    const bool x_first = saved.at("x_first").toBool();
    const size_t num_branches = shapes.size() / 3;
    const at::Tensor& grad_out = grads[0];
    // The gradients per input slot: x's (also when x is None), each branch's,
    // then the 4 non-tensors; needs_input_grad counts the tensors given only.
    variable_list result(1 + num_branches + 4);
    const bool has_x = saved.at("has_x").toBool();
    const size_t first_branch_edge = has_x ? 1 : 0;
    if (has_x && ctx->needs_input_grad(0)) {
      const c10::SymInt x_offset = x_first ? c10::SymInt(0) : cb;
      result[0] = grad_out.slice_symint(1, x_offset, x_offset + cx);
    }
    bool any_branch = false;
    for (size_t k = 0; k < num_branches; ++k) any_branch = any_branch || ctx->needs_input_grad(first_branch_edge + k);
    if (any_branch) {
      at::Tensor g = grad_out;
      if (!(g.is_contiguous() || g.is_contiguous(at::MemoryFormat::ChannelsLast))) g = g.contiguous();
      std::vector<at::Tensor> grad_branches = op.call(g, shapes, x_first ? cx : c10::SymInt(0),
                                                      saved.at("align_corners").toBool(), channels_last(g));
      for (size_t k = 0; k < num_branches; ++k) result[1 + k] = grad_branches[k];
    }
    return result;
  }
};

at::Tensor upsample_concat_autograd(const std::optional<at::Tensor>& x, at::TensorList branches,
                                    c10::SymIntArrayRef size, bool align_corners, bool x_first,
                                    bool channels_last_out) {
  bool needs_grad = x.has_value() && records({&*x});
  for (const at::Tensor& b : branches) needs_grad = needs_grad || records({&b});
  if (!needs_grad) {
    static const auto op = op_handle<UpsampleSig>("pyramid_ext::upsample_concat");
    at::AutoDispatchBelowADInplaceOrView below;
    return op.call(x, branches, size, align_corners, x_first, channels_last_out);
  }
  return UpsampleConcatFunction::apply(x, branches, size, align_corners, x_first, channels_last_out)[0];
}

}  // namespace

TORCH_LIBRARY_IMPL(pyramid_ext, Autograd, m) {
  m.impl("multi_pool2d", TORCH_FN(multi_pool2d_autograd));
  m.impl("upsample_concat", TORCH_FN(upsample_concat_autograd));
}

}  // namespace pyramid_ext
