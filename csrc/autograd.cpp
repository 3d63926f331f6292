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
#include <c10/core/impl/LocalDispatchKeySet.h>
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

// ---- forward-mode AD (torch.autograd.forward_ad, level 0) ----
// The forward ops are linear in their float inputs (max pooling at its
// argmax), so an output's tangent is the op applied to the inputs' tangents:
// the primal output is computed from the inputs without their tangents
// (_fw_primal, which keeps their backward history), the tangent by the op
// called through the dispatcher on the tangents (so its own derivatives are
// recorded), and set on the output. Without this the ops' tangents were
// dropped silently (register_autograd's path had no jvp).

// A tensor's tangent at level 0, or an undefined tensor.
at::Tensor tangent_of(const at::Tensor& t) { return t.defined() ? t._fw_grad(/*level=*/0) : at::Tensor(); }

// A tangent as the ops read it: NCHW- or channels_last-contiguous.
at::Tensor dense_tangent(const at::Tensor& t) {
  return t.is_contiguous() || t.is_contiguous(at::MemoryFormat::ChannelsLast) ? t : t.contiguous();
}

bool any_tangent(std::initializer_list<const at::Tensor*> tensors, at::TensorList lists = {}) {
  for (const at::Tensor* t : tensors)
    if (t && tangent_of(*t).defined()) return true;
  for (const at::Tensor& t : lists)
    if (tangent_of(t).defined()) return true;
  return false;
}

at::Tensor primal_of(const at::Tensor& t) { return tangent_of(t).defined() ? t._fw_primal(/*level=*/0) : t; }

// t's tangent as the ops read it, or zeros like t.
at::Tensor tangent_or_zeros(const at::Tensor& t) {
  const at::Tensor g = tangent_of(t);
  return g.defined() ? dense_tangent(g) : at::zeros_like(t);
}

void set_tangents(const std::vector<at::Tensor>& outs, const std::vector<at::Tensor>& tangents) {
  for (size_t k = 0; k < outs.size(); ++k) outs[k]._set_fw_grad(tangents[k], /*level=*/0, /*is_inplace_op=*/false);
}

// upsample_concat's inputs as primals and tangents (zeros for an input without one).
struct UpsampleDuals {
  std::optional<at::Tensor> x_primal, x_tangent;
  std::vector<at::Tensor> branch_primals, branch_tangents;
};

UpsampleDuals split_duals(const std::optional<at::Tensor>& x, at::TensorList branches) {
  UpsampleDuals d;
  if (x.has_value() && x->defined()) {
    d.x_primal = primal_of(*x);
    d.x_tangent = tangent_or_zeros(*x);
  }
  for (const at::Tensor& b : branches) {
    d.branch_primals.push_back(primal_of(b));
    d.branch_tangents.push_back(tangent_or_zeros(b));
  }
  return d;
}

// Max pooling's tangent: x's tangent at each bin's argmax (`indices`, flat
// h * W + w, packed as the values are), per level gathered from the (N, C,
// H * W) tangent and packed again.
at::Tensor max_pool_tangent(const at::Tensor& tangent, const at::Tensor& indices, at::IntArrayRef level_bins,
                            bool channels_last_levels) {
  const int64_t N = tangent.size(0), C = tangent.size(1);
  const at::Tensor planes = tangent.reshape({N, C, -1});
  std::vector<at::Tensor> levels;
  int64_t offset = 0;
  for (size_t l = 0; l + 1 < level_bins.size(); l += 2) {
    const int64_t bins = level_bins[l] * level_bins[l + 1];
    const at::Tensor block = indices.slice(1, offset, offset + C * bins);
    const at::Tensor index =
        channels_last_levels ? block.view({N, bins, C}).transpose(1, 2) : block.view({N, C, bins});
    const at::Tensor taken = planes.gather(2, index);
    levels.push_back((channels_last_levels ? taken.transpose(1, 2) : taken).reshape({N, C * bins}));
    offset += C * bins;
  }
  return at::cat(levels, 1);
}

std::tuple<at::Tensor, at::Tensor> multi_pool2d_autograd(const at::Tensor& x, c10::SymIntArrayRef h_bounds,
                                                         c10::SymIntArrayRef w_bounds, at::IntArrayRef level_bins,
                                                         int64_t mode, bool channels_last_levels);

std::tuple<at::Tensor, at::Tensor> multi_pool2d_with_tangent(const at::Tensor& x, const at::Tensor& tangent,
                                                             c10::SymIntArrayRef h_bounds,
                                                             c10::SymIntArrayRef w_bounds, at::IntArrayRef level_bins,
                                                             int64_t mode, bool channels_last_levels) {
  static const auto op = op_handle<PoolSig>("pyramid_ext::multi_pool2d");
  // values only (mode 2): the argmax is needed for the tangent
  const int64_t primal_mode = mode == kPoolMaxValues ? kPoolMax : mode;
  auto [values, indices] = multi_pool2d_autograd(x._fw_primal(/*level=*/0), h_bounds, w_bounds, level_bins,
                                                 primal_mode, channels_last_levels);
  const at::Tensor t = dense_tangent(tangent);
  at::Tensor values_tangent =
      mode == kPoolAvg ? std::get<0>(op.call(t, h_bounds, w_bounds, level_bins, mode, channels_last_levels))
                       : max_pool_tangent(t, indices, level_bins, channels_last_levels);
  values._set_fw_grad(values_tangent, /*level=*/0, /*is_inplace_op=*/false);
  if (mode == kPoolMaxValues) indices = at::empty({0}, indices.options());
  return {values, indices};
}

std::tuple<at::Tensor, at::Tensor> multi_pool2d_autograd(const at::Tensor& x, c10::SymIntArrayRef h_bounds,
                                                         c10::SymIntArrayRef w_bounds, at::IntArrayRef level_bins,
                                                         int64_t mode, bool channels_last_levels) {
  if (const at::Tensor tangent = tangent_of(x); tangent.defined())
    return multi_pool2d_with_tangent(x, tangent, h_bounds, w_bounds, level_bins, mode, channels_last_levels);
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
                                    bool channels_last_out);

// upsample_concat with a tangent on some input (forward-mode AD, above): the
// tangent is the op on the inputs' tangents, zeros where an input has none.
at::Tensor upsample_concat_with_tangents(const std::optional<at::Tensor>& x, at::TensorList branches,
                                         c10::SymIntArrayRef size, bool align_corners, bool x_first,
                                         bool channels_last_out) {
  static const auto op = op_handle<UpsampleSig>("pyramid_ext::upsample_concat");
  const UpsampleDuals d = split_duals(x, branches);
  at::Tensor out = upsample_concat_autograd(d.x_primal, d.branch_primals, size, align_corners, x_first,
                                            channels_last_out);
  out._set_fw_grad(op.call(d.x_tangent, d.branch_tangents, size, align_corners, x_first, channels_last_out),
                   /*level=*/0, /*is_inplace_op=*/false);
  return out;
}

at::Tensor upsample_concat_autograd(const std::optional<at::Tensor>& x, at::TensorList branches,
                                    c10::SymIntArrayRef size, bool align_corners, bool x_first,
                                    bool channels_last_out) {
  bool tangents = x.has_value() && tangent_of(*x).defined();
  for (const at::Tensor& b : branches) tangents = tangents || tangent_of(b).defined();
  if (tangents) return upsample_concat_with_tangents(x, branches, size, align_corners, x_first, channels_last_out);
  bool needs_grad = x.has_value() && records({&*x});
  for (const at::Tensor& b : branches) needs_grad = needs_grad || records({&b});
  if (!needs_grad) {
    static const auto op = op_handle<UpsampleSig>("pyramid_ext::upsample_concat");
    at::AutoDispatchBelowADInplaceOrView below;
    return op.call(x, branches, size, align_corners, x_first, channels_last_out);
  }
  return UpsampleConcatFunction::apply(x, branches, size, align_corners, x_first, channels_last_out)[0];
}

// Forward-mode AD of the ops whose autograd is Python (pyramid_ext/_ops.py:
// the three backward ops, upsample_shift_add; every Triton op, below).
// torch.library's autograd runs them below autograd when no input requires
// grad, so a tangent reaches the kernel at ADInplaceOrView, which every call
// below their autograd passes (before, it was dropped there silently:
// upsample_concat_conv2d's taps plan returned no tangent). Where an input
// also requires grad, that autograd (no jvp) raises: the Python entry points
// take _functorch's Functions inside a dual level
// (backends.autograd_functions_needed). Each op is linear in its float inputs, so the
// output's tangent is the op of the inputs' tangents (zeros where an input
// has none), called with autograd back on (WithAutograd) so that a tangent
// that requires grad records its own derivatives (and _fw_primal, an
// autograd kernel, can run). The primal output is the op of the primals
// below ADInplaceOrView.

// Undoes, for its scope, the exclusion of the autograd keys that torch.library's
// autograd set before it redispatched below autograd.
class WithAutograd {
 public:
  WithAutograd() : guard_(without_autograd_exclusion(c10::impl::tls_local_dispatch_key_set())) {}

 private:
  static c10::impl::LocalDispatchKeySet without_autograd_exclusion(c10::impl::LocalDispatchKeySet keys) {
    keys.excluded_ = keys.excluded_ - c10::autograd_dispatch_keyset;
    return keys;
  }
  c10::impl::ForceDispatchKeyGuard guard_;
};

using ShiftAddSig = at::Tensor(const at::Tensor&, at::TensorList, int64_t, bool);
using ShiftAddBackwardSig = std::vector<at::Tensor>(const at::Tensor&, c10::SymIntArrayRef, int64_t, bool,
                                                    const c10::List<bool>&);

// addend + (linear in grad): the tangent is the op of grad's tangent onto addend's.
template <const char* kName>
at::Tensor multi_pool2d_backward_ad(const at::Tensor& grad, const std::optional<at::Tensor>& indices,
                                    c10::SymIntArrayRef input_shape, c10::SymIntArrayRef h_bounds,
                                    c10::SymIntArrayRef w_bounds, at::IntArrayRef level_bins, int64_t mode,
                                    bool channels_last_levels, bool channels_last_input,
                                    const std::optional<at::Tensor>& addend) {
  static const auto op = op_handle<PoolBackwardSig>(kName);
  const bool has_addend = addend.has_value() && addend->defined();
  if (!any_tangent({&grad, has_addend ? &*addend : nullptr})) {
    at::AutoDispatchBelowADInplaceOrView below;
    return op.call(grad, indices, input_shape, h_bounds, w_bounds, level_bins, mode, channels_last_levels,
                   channels_last_input, addend);
  }
  WithAutograd autograd;
  std::optional<at::Tensor> addend_primal, addend_tangent;
  if (has_addend) {
    addend_primal = primal_of(*addend);
    if (tangent_of(*addend).defined()) addend_tangent = tangent_of(*addend);
  }
  const at::Tensor grad_primal = primal_of(grad), grad_tangent = tangent_or_zeros(grad);
  at::Tensor out;
  {
    at::AutoDispatchBelowADInplaceOrView below;
    out = op.call(grad_primal, indices, input_shape, h_bounds, w_bounds, level_bins, mode, channels_last_levels,
                  channels_last_input, addend_primal);
  }
  out._set_fw_grad(op.call(grad_tangent, indices, input_shape, h_bounds, w_bounds, level_bins, mode,
                           channels_last_levels, channels_last_input, addend_tangent),
                   /*level=*/0, /*is_inplace_op=*/false);
  return out;
}

template <const char* kName>
std::vector<at::Tensor> upsample_concat_backward_ad(const at::Tensor& grad_out, c10::SymIntArrayRef branch_shapes,
                                                    c10::SymInt channel_offset, bool align_corners,
                                                    bool channels_last) {
  static const auto op = op_handle<UpsampleBackwardSig>(kName);
  if (!any_tangent({&grad_out})) {
    at::AutoDispatchBelowADInplaceOrView below;
    return op.call(grad_out, branch_shapes, std::move(channel_offset), align_corners, channels_last);
  }
  WithAutograd autograd;
  const at::Tensor primal = primal_of(grad_out), tangent = tangent_or_zeros(grad_out);
  std::vector<at::Tensor> outs;
  {
    at::AutoDispatchBelowADInplaceOrView below;
    outs = op.call(primal, branch_shapes, channel_offset, align_corners, channels_last);
  }
  set_tangents(outs, op.call(tangent, branch_shapes, std::move(channel_offset), align_corners, channels_last));
  return outs;
}

template <const char* kName>
at::Tensor upsample_shift_add_ad(const at::Tensor& base, at::TensorList taps, int64_t kernel_size,
                                 bool align_corners) {
  static const auto op = op_handle<ShiftAddSig>(kName);
  if (!any_tangent({&base}, taps)) {
    at::AutoDispatchBelowADInplaceOrView below;
    return op.call(base, taps, kernel_size, align_corners);
  }
  WithAutograd autograd;
  std::vector<at::Tensor> tap_primals, tap_tangents;
  for (const at::Tensor& t : taps) {
    tap_primals.push_back(primal_of(t));
    tap_tangents.push_back(tangent_or_zeros(t));
  }
  const at::Tensor base_primal = primal_of(base), base_tangent = tangent_or_zeros(base);
  at::Tensor out;
  {
    at::AutoDispatchBelowADInplaceOrView below;
    out = op.call(base_primal, tap_primals, kernel_size, align_corners);
  }
  out._set_fw_grad(op.call(base_tangent, tap_tangents, kernel_size, align_corners), /*level=*/0,
                   /*is_inplace_op=*/false);
  return out;
}

template <const char* kName>
std::vector<at::Tensor> upsample_shift_add_backward_ad(const at::Tensor& grad, c10::SymIntArrayRef tap_shapes,
                                                       int64_t kernel_size, bool align_corners,
                                                       const c10::List<bool>& channels_last) {
  static const auto op = op_handle<ShiftAddBackwardSig>(kName);
  if (!any_tangent({&grad})) {
    at::AutoDispatchBelowADInplaceOrView below;
    return op.call(grad, tap_shapes, kernel_size, align_corners, channels_last);
  }
  WithAutograd autograd;
  const at::Tensor primal = primal_of(grad), tangent = tangent_or_zeros(grad);
  std::vector<at::Tensor> outs;
  {
    at::AutoDispatchBelowADInplaceOrView below;
    outs = op.call(primal, tap_shapes, kernel_size, align_corners, channels_last);
  }
  set_tangents(outs, op.call(tangent, tap_shapes, kernel_size, align_corners, channels_last));
  return outs;
}

// Triton's forward ops (pyramid_ext::<op>_triton, declared by pyramid_ext.triton
// in Python; their autograd is torch.library's too): the tangent as
// multi_pool2d_with_tangent / upsample_concat_with_tangents compute it.
template <const char* kName>
std::tuple<at::Tensor, at::Tensor> multi_pool2d_ad(const at::Tensor& x, c10::SymIntArrayRef h_bounds,
                                                   c10::SymIntArrayRef w_bounds, at::IntArrayRef level_bins,
                                                   int64_t mode, bool channels_last_levels) {
  static const auto op = op_handle<PoolSig>(kName);
  if (!any_tangent({&x})) {
    at::AutoDispatchBelowADInplaceOrView below;
    return op.call(x, h_bounds, w_bounds, level_bins, mode, channels_last_levels);
  }
  WithAutograd autograd;
  const at::Tensor primal = primal_of(x), tangent = dense_tangent(tangent_of(x));
  // values only (mode 2): the argmax is needed for the tangent
  const int64_t primal_mode = mode == kPoolMaxValues ? kPoolMax : mode;
  at::Tensor values, indices;
  {
    at::AutoDispatchBelowADInplaceOrView below;
    std::tie(values, indices) = op.call(primal, h_bounds, w_bounds, level_bins, primal_mode, channels_last_levels);
  }
  values._set_fw_grad(mode == kPoolAvg
                          ? std::get<0>(op.call(tangent, h_bounds, w_bounds, level_bins, mode, channels_last_levels))
                          : max_pool_tangent(tangent, indices, level_bins, channels_last_levels),
                      /*level=*/0, /*is_inplace_op=*/false);
  if (mode == kPoolMaxValues) indices = at::empty({0}, indices.options());
  return {values, indices};
}

template <const char* kName>
at::Tensor upsample_concat_ad(const std::optional<at::Tensor>& x, at::TensorList branches, c10::SymIntArrayRef size,
                              bool align_corners, bool x_first, bool channels_last_out) {
  static const auto op = op_handle<UpsampleSig>(kName);
  const bool has_x = x.has_value() && x->defined();
  if (!any_tangent({has_x ? &*x : nullptr}, branches)) {
    at::AutoDispatchBelowADInplaceOrView below;
    return op.call(x, branches, size, align_corners, x_first, channels_last_out);
  }
  WithAutograd autograd;
  const UpsampleDuals d = split_duals(x, branches);
  at::Tensor out;
  {
    at::AutoDispatchBelowADInplaceOrView below;
    out = op.call(d.x_primal, d.branch_primals, size, align_corners, x_first, channels_last_out);
  }
  out._set_fw_grad(op.call(d.x_tangent, d.branch_tangents, size, align_corners, x_first, channels_last_out),
                   /*level=*/0, /*is_inplace_op=*/false);
  return out;
}

// The ops' names, as template arguments.
constexpr char kPoolBackward[] = "pyramid_ext::multi_pool2d_backward";
constexpr char kUpsampleBackward[] = "pyramid_ext::upsample_concat_backward";
constexpr char kShiftAdd[] = "pyramid_ext::upsample_shift_add";
constexpr char kShiftAddBackward[] = "pyramid_ext::upsample_shift_add_backward";
constexpr char kPoolTriton[] = "pyramid_ext::multi_pool2d_triton";
constexpr char kPoolBackwardTriton[] = "pyramid_ext::multi_pool2d_backward_triton";
constexpr char kUpsampleTriton[] = "pyramid_ext::upsample_concat_triton";
constexpr char kUpsampleBackwardTriton[] = "pyramid_ext::upsample_concat_backward_triton";
constexpr char kShiftAddTriton[] = "pyramid_ext::upsample_shift_add_triton";
constexpr char kShiftAddBackwardTriton[] = "pyramid_ext::upsample_shift_add_backward_triton";

}  // namespace

TORCH_LIBRARY_IMPL(pyramid_ext, Autograd, m) {
  m.impl("multi_pool2d", TORCH_FN(multi_pool2d_autograd));
  m.impl("upsample_concat", TORCH_FN(upsample_concat_autograd));
}

TORCH_LIBRARY_IMPL(pyramid_ext, ADInplaceOrView, m) {
  m.impl("multi_pool2d_backward", TORCH_FN(multi_pool2d_backward_ad<kPoolBackward>));
  m.impl("upsample_concat_backward", TORCH_FN(upsample_concat_backward_ad<kUpsampleBackward>));
  m.impl("upsample_shift_add", TORCH_FN(upsample_shift_add_ad<kShiftAdd>));
  m.impl("upsample_shift_add_backward", TORCH_FN(upsample_shift_add_backward_ad<kShiftAddBackward>));
  // Triton's ops, declared when pyramid_ext.triton is imported (a kernel may be
  // registered before its op's schema; the schema is checked against it then).
  m.impl("multi_pool2d_triton", TORCH_FN(multi_pool2d_ad<kPoolTriton>));
  m.impl("multi_pool2d_backward_triton", TORCH_FN(multi_pool2d_backward_ad<kPoolBackwardTriton>));
  m.impl("upsample_concat_triton", TORCH_FN(upsample_concat_ad<kUpsampleTriton>));
  m.impl("upsample_concat_backward_triton", TORCH_FN(upsample_concat_backward_ad<kUpsampleBackwardTriton>));
  m.impl("upsample_shift_add_triton", TORCH_FN(upsample_shift_add_ad<kShiftAddTriton>));
  m.impl("upsample_shift_add_backward_triton", TORCH_FN(upsample_shift_add_backward_ad<kShiftAddBackwardTriton>));
}

}  // namespace pyramid_ext
