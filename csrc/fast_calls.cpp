// The eager fast path's C++ half (pyramid_ext/functional.py, `_fast_pool`).
//
// Calling a custom op from Python converts every argument against the schema:
// each element of a SymInt[] is checked for a SymInt (an isinstance per
// element), and the call is boxed. For a pyramid of small maps that cost more
// than the kernel. A `_PoolCall` holds one call's constants (windows,
// level_bins, mode, the levels' views), built once per (shape, bins, ...) by
// the Python layer, which has checked them; calling it passes only x and calls
// the op through the dispatcher with its typed signature. The dispatcher still
// runs every key (autograd, Python modes such as a TorchDispatchMode, vmap,
// profiling), so the op is the same op; only the Python-side argument
// conversion is skipped. Never used under torch.compile or export (the
// Python layer takes the op's ordinary path there).
//
// `levels_handing_on_x` is the same call for the pyramid modules' training
// step (pyramid_ext/_pool_through.py): one autograd node that pools x and
// also returns x itself, whose backward is one multi_pool2d_backward call
// with x's other gradient as the addend. In C++ for the same reason as the
// rest of this file: the Python autograd.Function, the window lists converted
// per call and the level views built in Python cost more than a small
// input's pooling (issue 12: PPM with grad at 0.67x eager on (1, 8, 8, 8)).
#include <torch/csrc/autograd/custom_function.h>
#include <torch/extension.h>

#include <tuple>
#include <utility>
#include <vector>

#include "pyramid_index.h"

namespace pyramid_ext {
namespace {

using PoolSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, c10::SymIntArrayRef, c10::SymIntArrayRef,
                                                   at::IntArrayRef, int64_t, bool);
using UpsampleSig = at::Tensor(const std::optional<at::Tensor>&, at::TensorList, c10::SymIntArrayRef, bool, bool,
                               bool);

using PoolBackwardSig = at::Tensor(const at::Tensor&, const std::optional<at::Tensor>&, c10::SymIntArrayRef,
                                   c10::SymIntArrayRef, c10::SymIntArrayRef, at::IntArrayRef, int64_t, bool, bool,
                                   const std::optional<at::Tensor>&);

struct LevelView {
  std::vector<int64_t> size, stride;
  int64_t offset;
};

// One call's window constants. A CustomClassHolder so that an autograd node
// can hold them (an IValue capsule in its saved data) after the PoolCall that
// built it is dropped from the Python cache.
struct PoolConstants : torch::CustomClassHolder {
  std::vector<int64_t> h_bounds, w_bounds, level_bins;
  int64_t mode = kPoolAvg;
  bool channels_last_levels = false;
  std::vector<LevelView> views;  // each level's (N, C, bh, bw) view of the packed buffer
};

const c10::TypedOperatorHandle<PoolSig>& pool_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("pyramid_ext::multi_pool2d", "").typed<PoolSig>();
  return op;
}

std::tuple<at::Tensor, at::Tensor> call_pool(const at::Tensor& x, const PoolConstants& k, int64_t mode) {
  return pool_op().call(x, c10::fromIntArrayRefSlow(k.h_bounds), c10::fromIntArrayRefSlow(k.w_bounds), k.level_bins,
                        mode, k.channels_last_levels);
}
std::tuple<at::Tensor, at::Tensor> call_pool(const at::Tensor& x, const PoolConstants& k) {
  return call_pool(x, k, k.mode);
}

// _ops._channels_last: channels_last memory and not also NCHW-contiguous.
bool channels_last(const at::Tensor& t) {
  return t.dim() == 4 && !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast);
}

// (*levels, x) = (multi_pool2d(x, avg) per level, x); the backward of all in
// one multi_pool2d_backward(grad_values, ..., addend=grad_x) call. The formulas
// of _pool_through._AvgPoolHandingOnX (the path of the other backends): the
// levels are outputs of this node (detached aliases of the packed buffer, not
// autograd views, whose backward would each write a packed-sized zero-filled
// gradient for autograd to add up); their gradients are packed with one cat.
struct PoolHandingOnX : public torch::autograd::Function<PoolHandingOnX> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                                                const c10::intrusive_ptr<PoolConstants>& k) {
    at::Tensor values;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      values = std::get<0>(call_pool(x, *k));
    }
    torch::autograd::variable_list out;
    out.reserve(k->views.size() + 1);
    for (const LevelView& v : k->views) out.push_back(values.as_strided(v.size, v.stride, v.offset).detach());
    ctx->set_materialize_grads(false);  // an unused output's gradient stays undefined (no zeros written)
    auto& saved = ctx->saved_data;
    saved["constants"] = c10::IValue::make_capsule(k);
    saved["input_shape"] = x.sizes();
    saved["channels_last_input"] = channels_last(x);
    // x itself: Function::apply returns an input as a view of it whose
    // gradient comes to this node.
    out.push_back(x);
    return out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const at::Tensor grad_x_through = grads.back();
    const at::Tensor* some = nullptr;  // a defined level gradient
    for (size_t i = 0; i + 1 < grads.size() && !some; ++i)
      if (grads[i].defined()) some = &grads[i];
    if (!some) return {grad_x_through, at::Tensor()};
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("pyramid_ext::multi_pool2d_backward", "")
                               .typed<PoolBackwardSig>();
    const auto& saved = ctx->saved_data;
    const auto k = c10::static_intrusive_pointer_cast<PoolConstants>(saved.at("constants").toCapsule());
    std::optional<at::Tensor> addend;
    if (grad_x_through.defined()) addend = grad_x_through;
    const std::vector<int64_t> shape = saved.at("input_shape").toIntVector();
    // The packed (N, C * total) gradient in the layout the levels view:
    // (N, bh, bw, C) blocks for channels_last levels, else (N, C, bh, bw).
    const int64_t n = shape[0], c = shape[1];
    std::vector<at::Tensor> pieces;
    pieces.reserve(grads.size() - 1);
    for (size_t i = 0; i + 1 < grads.size(); ++i) {
      const int64_t cells = c * k->level_bins[2 * i] * k->level_bins[2 * i + 1];
      const at::Tensor& g = grads[i];
      if (!g.defined())
        pieces.push_back(at::zeros({n, cells}, some->options()));
      else if (k->channels_last_levels)
        pieces.push_back(g.permute({0, 2, 3, 1}).reshape({n, cells}));
      else
        pieces.push_back(g.reshape({n, cells}));
    }
    const at::Tensor grad_values = at::cat(pieces, 1);
    at::Tensor grad_x = op.call(grad_values, std::nullopt, c10::fromIntArrayRefSlow(shape),
                                c10::fromIntArrayRefSlow(k->h_bounds), c10::fromIntArrayRefSlow(k->w_bounds),
                                k->level_bins, k->mode, k->channels_last_levels,
                                saved.at("channels_last_input").toBool(), addend);
    return {grad_x, at::Tensor()};
  }
};

class PoolCall {
 public:
  PoolCall(std::vector<int64_t> h_bounds, std::vector<int64_t> w_bounds, std::vector<int64_t> level_bins,
           int64_t mode, bool channels_last_levels, bool unbatched,
           std::vector<std::tuple<std::vector<int64_t>, std::vector<int64_t>, int64_t>> views)
      : k_(c10::make_intrusive<PoolConstants>()), unbatched_(unbatched) {
    k_->h_bounds = std::move(h_bounds);
    k_->w_bounds = std::move(w_bounds);
    k_->level_bins = std::move(level_bins);
    k_->mode = mode;
    k_->channels_last_levels = channels_last_levels;
    for (auto& [size, stride, offset] : views) k_->views.push_back({std::move(size), std::move(stride), offset});
  }

  // (values, indices) as the op returns them. A max call whose indices are
  // not wanted and that records no autograd node (which would need them)
  // runs mode kPoolMaxValues: the same values, no indices tracked.
  std::tuple<at::Tensor, at::Tensor> packed(const at::Tensor& x, bool want_indices) const {
    pybind11::gil_scoped_release no_gil;
    const at::Tensor x4 = unbatched_ ? x.unsqueeze(0) : x;
    if (!want_indices && k_->mode == kPoolMax && !(at::GradMode::is_enabled() && x.requires_grad()))
      return call_pool(x4, *k_, kPoolMaxValues);
    return call_pool(x4, *k_);
  }

  // (levels, x_through) for a 4-D x that requires grad, in grad mode, average
  // pooling (the Python layer checks): x_through equals x and carries both
  // of x's gradients to the pooling node.
  std::pair<std::vector<at::Tensor>, at::Tensor> levels_handing_on_x(const at::Tensor& x) const {
    TORCH_CHECK(!unbatched_ && k_->mode == kPoolAvg, "_PoolCall.levels_handing_on_x: a batched average pooling call");
    pybind11::gil_scoped_release no_gil;
    torch::autograd::variable_list out = PoolHandingOnX::apply(x, k_);
    at::Tensor x_through = out.back();
    out.pop_back();
    return {std::move(out), std::move(x_through)};
  }

  at::Tensor spp(const at::Tensor& x) const {
    at::Tensor values = std::get<0>(packed(x, false));
    return unbatched_ ? values.select(0, 0) : values;
  }

  std::vector<at::Tensor> levels(const at::Tensor& x) const { return views(std::get<0>(packed(x, false))); }

  std::pair<std::vector<at::Tensor>, std::vector<at::Tensor>> levels_with_indices(const at::Tensor& x) const {
    auto [values, indices] = packed(x, true);
    return {views(values), views(indices)};
  }

 private:
  std::vector<at::Tensor> views(const at::Tensor& packed) const {
    std::vector<at::Tensor> out;
    out.reserve(k_->views.size());
    for (const LevelView& v : k_->views) out.push_back(packed.as_strided(v.size, v.stride, v.offset));
    return out;
  }

  c10::intrusive_ptr<PoolConstants> k_;
  bool unbatched_;
};

at::Tensor upsample_concat(const std::optional<at::Tensor>& x, const std::vector<at::Tensor>& branches,
                           int64_t height, int64_t width, bool align_corners, bool x_first, bool channels_last) {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("pyramid_ext::upsample_concat", "").typed<UpsampleSig>();
  pybind11::gil_scoped_release no_gil;
  const c10::SymInt size[2] = {c10::SymInt(height), c10::SymInt(width)};
  return op.call(x, branches, size, align_corners, x_first, channels_last);
}

}  // namespace

void register_fast_calls(pybind11::module_& m) {
  pybind11::class_<PoolCall>(m, "_PoolCall",
                             "The eager fast path's multi_pool2d call with its constants (pyramid_ext.functional).")
      .def(pybind11::init<std::vector<int64_t>, std::vector<int64_t>, std::vector<int64_t>, int64_t, bool, bool,
                          std::vector<std::tuple<std::vector<int64_t>, std::vector<int64_t>, int64_t>>>())
      .def("packed", &PoolCall::packed, pybind11::arg("x"), pybind11::arg("want_indices") = true)
      .def("spp", &PoolCall::spp)
      .def("levels", &PoolCall::levels)
      .def("levels_with_indices", &PoolCall::levels_with_indices)
      .def("levels_handing_on_x", &PoolCall::levels_handing_on_x);
  m.def("_upsample_concat", &upsample_concat,
        "The eager fast path's upsample_concat call (arguments checked by pyramid_ext.functional).");
}

}  // namespace pyramid_ext
