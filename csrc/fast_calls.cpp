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
#include <ATen/Parallel.h>
#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/ThreadLocalState.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/extension.h>

#include <algorithm>
#include <cstring>
#include <list>
#include <memory>
#include <mutex>
#include <string>

#include <tuple>
#include <unordered_map>
#include <utility>
#include <vector>

#include "cpu/pointwise_product.h"
#include "fast_call_checks.h"
#include "pyramid_index.h"

namespace pyramid_ext {
namespace {

using namespace fast_calls;  // the argument checks, TailArgs (fast_call_checks.h)

using PoolSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, c10::SymIntArrayRef, c10::SymIntArrayRef,
                                                   at::IntArrayRef, int64_t, bool);
using UpsampleSig = at::Tensor(const std::optional<at::Tensor>&, at::TensorList, c10::SymIntArrayRef, bool, bool,
                               bool);

using UpsampleOutSig = void(const std::optional<at::Tensor>&, at::TensorList, bool, bool, const at::Tensor&);

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
  std::vector<int64_t> input_shape;  // (N, C, H, W) as the op sees x (unbatched: N = 1)
  bool channels_last_input = false;
  int64_t row = 0;  // C * T, the packed buffer's row
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

// Each level's (N, C, bh, bw) view of a packed (N, C * T) buffer (a
// (C, bh, bw) view for an unbatched call's levels).
at::Tensor level_view(const at::Tensor& packed, const LevelView& v) {
  return packed.as_strided(v.size, v.stride, v.offset);
}

// The packed (N, C * T) gradient of the levels (`grads[i]`: level i's, any
// strides, or undefined: an output not used), written once: one empty buffer,
// each level's gradient copied into its view of it, an unused level's view
// zeroed. Autograd's own route, a level as an as_strided view of the packed
// values, wrote a zero-filled packed-sized gradient per level
// (AsStridedBackward0: new_zeros, copy) and added them up: on (16, 256, 16, 16)
// about 0.5 ms of a 4 ms step. Differentiable (copy_ into views of a buffer),
// so double backward records it.
at::Tensor pack_level_grads(const PoolConstants& k, const torch::autograd::variable_list& grads, int64_t n,
                            int64_t row, const at::TensorOptions& options) {
  at::Tensor packed = at::empty({n, row}, options);
  for (size_t i = 0; i < k.views.size(); ++i) {
    at::Tensor dst = level_view(packed, k.views[i]);
    if (grads[i].defined())
      dst.copy_(grads[i]);
    else
      dst.zero_();
  }
  return packed;
}

const c10::TypedOperatorHandle<PoolBackwardSig>& pool_backward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("pyramid_ext::multi_pool2d_backward", "")
                             .typed<PoolBackwardSig>();
  return op;
}

// The first defined gradient among grads[0, count), or nullptr.
const at::Tensor* first_defined(const torch::autograd::variable_list& grads, size_t count) {
  for (size_t i = 0; i < count; ++i)
    if (grads[i].defined()) return &grads[i];
  return nullptr;
}

// torch 2.14 holds autograd nodes in c10::intrusive_ptr, earlier releases
// (2.11 on the GPU machines seen here) in std::shared_ptr: an Edge's holder
// says which.
template <typename NodeT>
auto make_autograd_node() {
  using Holder = decltype(torch::autograd::Edge::function);
  if constexpr (std::is_same_v<Holder, std::shared_ptr<torch::autograd::Node>>) {
    return std::make_shared<NodeT>();
  } else {
    return c10::make_intrusive<NodeT>();
  }
}

// levels = multi_pool2d(x) per level (avg or max), as one autograd node whose
// outputs are the levels themselves, its backward one multi_pool2d_backward
// call on the level gradients packed once (pack_level_grads). The levels are
// aliases of the packed buffer made below autograd (as_strided under
// AutoDispatchBelowADInplaceOrView: plain tensors, not autograd views, each
// with its own version counter; nothing reads the values in the backward, so
// a level modified in place changes no gradient but its own, as for eager
// pooling's outputs). Max saves the packed indices (their views, returned by
// PoolCall, share their version counter: an index level modified in place
// makes the backward raise, as before).
//
// A plain autograd Node, built as ATen's generated code builds its nodes
// (collect_next_edges, set_history), rather than a torch::autograd::Function:
// Function::apply's bookkeeping (input and output infos, the wrapping of each
// output, the saved-data map) cost about as much as a tiny input's kernel.
// What Function::apply would also do is checked by the caller: no functorch
// transform (PoolCall::records) and no forward-mode tangent on x (no jvp
// here; the op's own autograd kernel raises for one, as before).
struct PoolLevelsBackward : public torch::autograd::Node {
  c10::intrusive_ptr<PoolConstants> k;
  torch::autograd::SavedVariable indices;  // the packed indices (max)

  std::string name() const override { return "pyramid_ext::PoolLevelsBackward"; }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    indices.reset_data();
  }

  torch::autograd::variable_list apply(torch::autograd::variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    const at::Tensor* some = first_defined(grads, grads.size());
    if (!some) return {at::Tensor()};
    std::optional<at::Tensor> saved_indices;
    if (k->mode == kPoolMax) saved_indices = indices.unpack(getptr());
    const at::Tensor grad_values = pack_level_grads(*k, grads, k->input_shape[0], k->row, some->options());
    at::Tensor grad_x = pool_backward_op().call(
        grad_values, saved_indices, c10::fromIntArrayRefSlow(k->input_shape), c10::fromIntArrayRefSlow(k->h_bounds),
        c10::fromIntArrayRefSlow(k->w_bounds), k->level_bins, k->mode, k->channels_last_levels,
        k->channels_last_input, /*addend=*/std::nullopt);
    return {grad_x};
  }
};

// The levels of x (which requires grad, in grad mode), each an output of one
// PoolLevelsBackward node; for max the packed indices in *indices.
std::vector<at::Tensor> pool_levels_recorded(const at::Tensor& x, const c10::intrusive_ptr<PoolConstants>& k,
                                             at::Tensor* indices) {
  at::Tensor values;
  std::vector<at::Tensor> levels;
  levels.reserve(k->views.size());
  {
    at::AutoDispatchBelowADInplaceOrView below;
    std::tie(values, *indices) = call_pool(x, *k);
    for (const LevelView& v : k->views) levels.push_back(level_view(values, v));
  }
  auto node = make_autograd_node<PoolLevelsBackward>();
  node->set_next_edges(torch::autograd::collect_next_edges(x));
  node->k = k;
  if (k->mode == kPoolMax) node->indices = torch::autograd::SavedVariable(*indices, /*is_output=*/false);
  for (const at::Tensor& level : levels) torch::autograd::set_history(level, node);
  return levels;
}

// (*levels, x) = (multi_pool2d(x, avg) per level, x); the backward of all in
// one multi_pool2d_backward(grad_values, ..., addend=grad_x) call. The formulas
// of _pool_through._AvgPoolHandingOnX (the path of the other backends): the
// levels are outputs of this node (detached aliases of the packed buffer, not
// autograd views, whose backward would each write a packed-sized zero-filled
// gradient for autograd to add up); their gradients are packed once
// (pack_level_grads).
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
    ctx->saved_data["constants"] = c10::IValue::make_capsule(k);
    // x itself: Function::apply returns an input as a view of it whose
    // gradient comes to this node.
    out.push_back(x);
    return out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const at::Tensor grad_x_through = grads.back();
    const at::Tensor* some = first_defined(grads, grads.size() - 1);  // a level's gradient
    if (!some) return {grad_x_through, at::Tensor()};
    const auto k =
        c10::static_intrusive_pointer_cast<PoolConstants>(ctx->saved_data.at("constants").toCapsule());
    std::optional<at::Tensor> addend;
    if (grad_x_through.defined()) addend = grad_x_through;
    const at::Tensor grad_values = pack_level_grads(*k, grads, k->input_shape[0], k->row, some->options());
    at::Tensor grad_x = pool_backward_op().call(
        grad_values, std::nullopt, c10::fromIntArrayRefSlow(k->input_shape), c10::fromIntArrayRefSlow(k->h_bounds),
        c10::fromIntArrayRefSlow(k->w_bounds), k->level_bins, k->mode, k->channels_last_levels,
        k->channels_last_input, addend);
    return {grad_x, at::Tensor()};
  }
};

class PoolCall {
 public:
  PoolCall(std::vector<int64_t> h_bounds, std::vector<int64_t> w_bounds, std::vector<int64_t> level_bins,
           int64_t mode, bool channels_last_levels, bool unbatched,
           std::vector<std::tuple<std::vector<int64_t>, std::vector<int64_t>, int64_t>> views,
           std::vector<int64_t> input_shape, bool channels_last_input)
      : k_(c10::make_intrusive<PoolConstants>()), unbatched_(unbatched) {
    TORCH_CHECK(input_shape.size() == 4 && level_bins.size() == 2 * views.size(),
                "_PoolCall: input_shape (N, C, H, W) and one view per level");
    k_->h_bounds = std::move(h_bounds);
    k_->w_bounds = std::move(w_bounds);
    k_->level_bins = std::move(level_bins);
    k_->mode = mode;
    k_->channels_last_levels = channels_last_levels;
    for (auto& [size, stride, offset] : views) k_->views.push_back({std::move(size), std::move(stride), offset});
    k_->input_shape = std::move(input_shape);
    k_->channels_last_input = channels_last_input;
    for (size_t i = 0; i < k_->views.size(); ++i)
      k_->row += k_->input_shape[1] * k_->level_bins[2 * i] * k_->level_bins[2 * i + 1];
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

  std::vector<at::Tensor> levels(const at::Tensor& x) const {
    if (records(x)) return levels_node(x, nullptr);
    return views(std::get<0>(packed(x, false)));
  }

  std::pair<std::vector<at::Tensor>, std::vector<at::Tensor>> levels_with_indices(const at::Tensor& x) const {
    if (records(x)) {
      at::Tensor indices;
      std::vector<at::Tensor> levels = levels_node(x, &indices);
      pybind11::gil_scoped_release no_gil;
      return {std::move(levels), index_aliases(indices)};
    }
    auto [values, indices] = packed(x, true);
    return {views(values), views(indices)};
  }

 private:
  // Whether a call records a PoolLevelsBackward node: grad mode on, x
  // requires grad, no functorch transform and no forward-mode tangent on x
  // (what the node does not handle; there the op's own autograd kernel runs,
  // through packed(), and raises or records as before).
  static bool records(const at::Tensor& x) {
    if (!at::GradMode::is_enabled() || !x.requires_grad() || x._fw_grad(/*level=*/0).defined()) return false;
    return !functorch_transform_active();
  }

  // The levels as the outputs of one PoolLevels node; for max the packed
  // indices in *indices (which the node saves).
  std::vector<at::Tensor> levels_node(const at::Tensor& x, at::Tensor* indices) const {
    pybind11::gil_scoped_release no_gil;
    at::Tensor unused;
    return pool_levels_recorded(unbatched_ ? x.unsqueeze(0) : x, k_, indices ? indices : &unused);
  }

  // Each level's alias of the saved packed indices, made below autograd,
  // sharing their version counter (an index level modified in place makes
  // the backward raise, as an autograd view would, without a view's
  // bookkeeping, which tiny inputs pay per level).
  std::vector<at::Tensor> index_aliases(const at::Tensor& indices) const {
    std::vector<at::Tensor> out;
    out.reserve(k_->views.size());
    at::AutoDispatchBelowADInplaceOrView below;
    for (const LevelView& v : k_->views) {
      out.push_back(level_view(indices, v));
      torch::autograd::impl::set_version_counter(out.back(), torch::autograd::impl::version_counter(indices));
    }
    return out;
  }

  // Each level's view of a packed output. One that requires no grad (outside
  // a functorch transform) gets aliases made below autograd: plain tensors,
  // as eager pooling returns, without the view bookkeeping of the
  // ADInplaceOrView kernel (a tenth of a tiny input's call; and a view made in
  // no_grad mode could not be modified in place under grad mode later, an
  // eager output can). One that requires grad keeps autograd views (their
  // gradients flow to the packed output's node).
  std::vector<at::Tensor> views(const at::Tensor& packed) const {
    std::vector<at::Tensor> out;
    out.reserve(k_->views.size());
    // (a tangent on the packed values: autograd views, which carry it to the levels)
    if (!packed.requires_grad() && !packed._fw_grad(/*level=*/0).defined() && !functorch_transform_active()) {
      at::AutoDispatchBelowADInplaceOrView below;
      for (const LevelView& v : k_->views) out.push_back(level_view(packed, v));
      return out;
    }
    for (const LevelView& v : k_->views) out.push_back(level_view(packed, v));
    return out;
  }

  c10::intrusive_ptr<PoolConstants> k_;
  bool unbatched_;
};

// upsample_concat's eager fast path whole (pyramid_ext/functional.py,
// `_fast_upsample_concat`): the checks that the call is the common one, then
// the op, in one call from Python. The checks had been Python attribute reads
// (shape, dtype, device, contiguity, storage of every input): about 9 us warm
// but 45 us right after a kernel that swept L1 and L2 (12 MiB on (16, 256,
// 16, 16)), a tenth of that op at one thread. Returns None wherever the call
// differs (a Tensor subclass, a torch-function mode, a copy or promotion
// needed, out= that is not dense, of the result's dtype, device and shape, or
// shares storage with an input, or requires grad in grad mode, a call the
// gate does not send to the compiled op: another backend, an ONNX export),
// and the general path runs, raising its errors. Never called under
// torch.compile.
pybind11::object upsample_concat_fast(pybind11::handle x_obj, pybind11::handle branches_obj,
                                      pybind11::handle size_obj, bool align_corners, bool x_first,
                                      pybind11::handle out_obj, pybind11::handle backend) {
  const pybind11::object declined = pybind11::none();
  PyObject* seq = branches_obj.ptr();
  if (!(PyList_CheckExact(seq) || PyTuple_CheckExact(seq)) || PySequence_Fast_GET_SIZE(seq) == 0 ||
      at::impl::torch_function_mode_enabled())
    return declined;
  std::optional<at::Tensor> x;
  if (!x_obj.is_none()) {
    const at::Tensor* t = plain_tensor(x_obj.ptr());
    if (t == nullptr) return declined;
    x = *t;
  }
  std::vector<at::Tensor> branches;
  const Py_ssize_t count = PySequence_Fast_GET_SIZE(seq);
  PyObject** items = PySequence_Fast_ITEMS(seq);
  branches.reserve(static_cast<size_t>(count));
  for (Py_ssize_t i = 0; i < count; ++i) {
    const at::Tensor* t = plain_tensor(items[i]);
    if (t == nullptr) return declined;
    branches.push_back(*t);
  }
  const at::Tensor& ref = x ? *x : branches[0];
  if (ref.dim() != 4 || !float_dtype(ref.scalar_type())) return declined;
  const int64_t N = ref.size(0);
  int64_t height = x ? ref.size(2) : kUnset, width = x ? ref.size(3) : kUnset;
  if (!size_obj.is_none() || !x) {
    // x given: size None or a tuple (torch.Size too) of x's H and W as ints;
    // x None: a tuple of two positive ints
    PyObject* size = size_obj.ptr();
    if (!(x ? PyTuple_Check(size) : PyTuple_CheckExact(size)) || PyTuple_GET_SIZE(size) != 2) return declined;
    const int64_t h = exact_int(PyTuple_GET_ITEM(size, 0)), w = exact_int(PyTuple_GET_ITEM(size, 1));
    if (h == kUnset || w == kUnset) return declined;
    if (x ? (h != height || w != width) : (h == 0 || w == 0)) return declined;
    height = h;
    width = w;
  }
  if (height == 0 || width == 0 || (x && !dense(*x))) return declined;
  int64_t channels = x ? x->size(1) : 0;
  for (const at::Tensor& b : branches) {
    if (b.dim() != 4 || b.scalar_type() != ref.scalar_type() || b.device() != ref.device() || b.size(0) != N ||
        b.size(2) == 0 || b.size(3) == 0 || !dense(b))
      return declined;
    channels += b.size(1);
  }
  static const auto concat_op =
      c10::Dispatcher::singleton().findSchemaOrThrow("pyramid_ext::upsample_concat", "").typed<UpsampleSig>();
  if (!compiled_serves(backend.ptr(), ref.device().type(), concat_op)) return declined;
  if (out_obj.is_none()) {
    const bool channels_last = !ref.is_contiguous() && ref.is_contiguous(at::MemoryFormat::ChannelsLast);
    at::Tensor result;
    {
      pybind11::gil_scoped_release no_gil;
      const c10::SymInt size[2] = {c10::SymInt(height), c10::SymInt(width)};
      result = concat_op.call(x, branches, size, align_corners, x_first, channels_last);
    }
    return pybind11::reinterpret_steal<pybind11::object>(THPVariable_Wrap(std::move(result)));
  }
  const at::Tensor* out = plain_tensor(out_obj.ptr());
  if (out == nullptr || out->scalar_type() != ref.scalar_type() || out->device() != ref.device() ||
      out->sizes() != at::IntArrayRef({N, channels, height, width}) || !dense(*out))
    return declined;
  const bool grad = at::GradMode::is_enabled();
  const void* storage = out->storage().data();
  if (grad && out->requires_grad()) return declined;
  const auto refused = [&](const at::Tensor& t) {
    return (grad && t.requires_grad()) || t.storage().data() == storage;
  };
  if (x && refused(*x)) return declined;
  for (const at::Tensor& b : branches)
    if (refused(b)) return declined;
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("pyramid_ext::upsample_concat_out", "").typed<UpsampleOutSig>();
  {
    pybind11::gil_scoped_release no_gil;
    op.call(x, branches, align_corners, x_first, *out);
  }
  return pybind11::reinterpret_borrow<pybind11::object>(out_obj);
}

// The pooling fast path's cache key: x's sizes, dtype, device, layout, the
// call's mode, channels_last_levels, bins and window, which determine its
// _PoolCall. Holds no tensor (the cache keeps no memory alive).
struct PoolKey {
  std::vector<int64_t> values;
  std::string window;
  bool operator==(const PoolKey& o) const { return values == o.values && window == o.window; }
};

struct PoolKeyHash {
  size_t operator()(const PoolKey& k) const {
    size_t h = std::hash<std::string>()(k.window);
    for (int64_t v : k.values) h = h * 1000003 ^ std::hash<int64_t>()(v);
    return h;
  }
};

// The key of a common eager pooling call, or nothing where the call is not
// the common one: x not a plain dense tensor (NCHW- or channels_last-
// contiguous), a torch-function mode, bins that are not an exact int or a
// list / tuple of exact ints and pairs of exact ints (True is no 1), a window
// that is not a str, channels_last_levels not None or a bool.
std::optional<PoolKey> pool_key(const at::Tensor& x, PyObject* b, int64_t mode, PyObject* cll, PyObject* window) {
  if (at::impl::torch_function_mode_enabled() || !PyUnicode_CheckExact(window)) return std::nullopt;
  if (cll != Py_None && cll != Py_True && cll != Py_False) return std::nullopt;
  if (x.layout() != at::kStrided || !x.has_storage()) return std::nullopt;  // (sparse: no is_contiguous)
  int64_t layout;
  if (x.is_contiguous()) layout = 0;
  else if (x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast)) layout = 1;
  else return std::nullopt;  // needs a copy: the general path
  PoolKey key;
  std::vector<int64_t>& v = key.values;
  v.reserve(24);
  for (int64_t d : x.sizes()) v.push_back(d);
  v.push_back(x.dim());
  v.push_back(static_cast<int64_t>(x.scalar_type()));
  v.push_back(static_cast<int64_t>(x.device().type()));
  v.push_back(x.device().index());
  v.push_back(layout);
  v.push_back(mode);
  v.push_back(cll == Py_None ? -1 : cll == Py_True);
  // bins: an int b -> (b), a sequence -> (-1, then per bin b, or -2, h, w);
  // a negative or too large bin declines (the general path raises its error)
  auto add_int = [&](PyObject* item) {
    const int64_t bin = exact_int(item);
    v.push_back(bin);
    return bin != kUnset;
  };
  if (PyLong_CheckExact(b)) {
    if (!add_int(b)) return std::nullopt;
  } else if (PyList_CheckExact(b) || PyTuple_CheckExact(b)) {
    v.push_back(-1);
    const Py_ssize_t count = PySequence_Fast_GET_SIZE(b);
    PyObject** items = PySequence_Fast_ITEMS(b);
    for (Py_ssize_t i = 0; i < count; ++i) {
      PyObject* item = items[i];
      if (PyLong_CheckExact(item)) {
        if (!add_int(item)) return std::nullopt;
      } else if (PyTuple_CheckExact(item) && PyTuple_GET_SIZE(item) == 2 &&
                 PyLong_CheckExact(PyTuple_GET_ITEM(item, 0)) && PyLong_CheckExact(PyTuple_GET_ITEM(item, 1))) {
        v.push_back(-2);
        if (!add_int(PyTuple_GET_ITEM(item, 0)) || !add_int(PyTuple_GET_ITEM(item, 1))) return std::nullopt;
      } else {
        return std::nullopt;
      }
    }
  } else {
    return std::nullopt;
  }
  Py_ssize_t length = 0;
  const char* text = PyUnicode_AsUTF8AndSize(window, &length);
  if (text == nullptr) {
    PyErr_Clear();
    return std::nullopt;
  }
  key.window.assign(text, static_cast<size_t>(length));
  return key;
}

// The _PoolCalls of the calls seen, a bounded LRU (1024 entries by default:
// a model sees few shapes). Read and written with the GIL held; leaked at
// exit, so no Python object is released after the interpreter is gone.
class PoolCallCache {
 public:
  struct Entry {
    pybind11::object object;  // the _PoolCall
    const PoolCall* call;     // the C++ object it holds
  };

  const Entry* find(const PoolKey& key) {
    auto it = index_.find(key);
    if (it == index_.end()) return nullptr;
    order_.splice(order_.begin(), order_, it->second);  // most recently used
    return &it->second->second;
  }

  // The entry for `key`: the one another thread may have put there while
  // `object` was built, else `object`'s; then evicts beyond the bound.
  const Entry* insert(const PoolKey& key, pybind11::object object) {
    if (const Entry* e = find(key)) return e;
    const PoolCall* call = object.cast<const PoolCall*>();
    order_.emplace_front(key, Entry{std::move(object), call});
    index_.emplace(key, order_.begin());
    trim();
    return &order_.front().second;
  }

  size_t size() const { return index_.size(); }
  size_t set_max(size_t max) {
    std::swap(max, max_);
    trim();
    return max;
  }
  void clear() {
    index_.clear();
    order_.clear();
  }

 private:
  void trim() {
    while (index_.size() > max_ && !order_.empty()) {
      index_.erase(order_.back().first);
      order_.pop_back();
    }
  }

  std::list<std::pair<PoolKey, Entry>> order_;  // most recently used first
  std::unordered_map<PoolKey, std::list<std::pair<PoolKey, Entry>>::iterator, PoolKeyHash> index_;
  size_t max_ = 1024;
};

PoolCallCache& pool_cache() {
  static auto* cache = new PoolCallCache;
  return *cache;
}

// Builds a call's _PoolCall on a miss (pyramid_ext.functional._fast_pool_entry,
// which runs the general path's checks and raises its errors).
PyObject* pool_call_builder = nullptr;

// What pool_fast returns.
enum PoolWant : int64_t { kWantCall = 0, kWantLevels = 1, kWantLevelsWithIndices = 2, kWantSpp = 3 };

// The pooling fast path whole (pyramid_ext/functional.py): the gate, the key,
// the cache and the call, in one call from Python. Returns what `want` asks
// of the call's _PoolCall (itself, its levels, levels and indices, the SPP
// vector), or None where the call is not the common one, the gate declines
// (another backend, an ONNX export) or no builder is registered: the general
// path runs and raises its errors. As separate Python steps (the exporters'
// flags, the backend, the key, a Python LRU) these took 40 us of a 160 us
// channels_last average pooling of (16, 256, 16, 16) right after the eager
// code ran (two threads). Never called under torch.compile.
pybind11::object pool_fast(pybind11::handle x_obj, pybind11::handle bins, int64_t mode,
                           pybind11::handle channels_last_levels, pybind11::handle window, pybind11::handle backend,
                           pybind11::handle fn, int64_t want) {
  const at::Tensor* x = plain_tensor(x_obj.ptr());
  if (x == nullptr || pool_call_builder == nullptr) return pybind11::none();
  const std::optional<PoolKey> key = pool_key(*x, bins.ptr(), mode, channels_last_levels.ptr(), window.ptr());
  if (!key || !compiled_serves(backend.ptr(), x->device().type(), pool_op())) return pybind11::none();
  PoolCallCache& cache = pool_cache();
  const PoolCallCache::Entry* entry = cache.find(*key);
  if (entry == nullptr) {
    pybind11::object built = pybind11::reinterpret_borrow<pybind11::object>(pool_call_builder)(
        x_obj, bins, mode, channels_last_levels, window, fn);
    entry = cache.insert(*key, std::move(built));
  }
  // (the call's own reference: a thread that runs while this one waits on
  // the kernel without the GIL may evict the entry)
  const pybind11::object held = entry->object;
  const PoolCall& call = *entry->call;
  switch (want) {
    case kWantLevels:
      return pybind11::cast(call.levels(*x));
    case kWantLevelsWithIndices:
      return pybind11::cast(call.levels_with_indices(*x));
    case kWantSpp:
      return pybind11::cast(call.spp(*x));
    default:
      return held;
  }
}

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
                                          const std::optional<at::Tensor>& bn_var, double eps, int64_t relu) {
  auto ptr = [](const std::optional<at::Tensor>& t) { return t ? t->const_data_ptr<float>() : nullptr; };
  return cpu::pointwise_product::make_plan(weight.const_data_ptr<float>(), weight.size(0), weight.size(1),
                                           weight.stride(0), weight.stride(1), ptr(bias), ptr(bn_w), ptr(bn_b),
                                           ptr(bn_mean), ptr(bn_var), eps, relu != 0);
}

cpu::pointwise_product::Layout product_layout(const at::Tensor& t) {
  return {t.size(2), t.size(3), t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
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
  const auto plan = product_plan(weight, bias, bn_weight, bn_bias, bn_mean, bn_var, bn_eps, relu);
  at::Tensor result = empty_tail_result(x, weight.size(0), bn_mean.has_value() || relu == 1);
  const int64_t pixels = x.size(2) * x.size(3);
  // planar maps cut at whole units (the plane kernel's vectors)
  const auto src = product_layout(x), dst = product_layout(result);
  const int64_t unit =
      cpu::pointwise_product::planar(src) && cpu::pointwise_product::planar(dst) ? cpu::pointwise_product::kPlaneUnit
                                                                                 : 1;
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
    if (product_kernel_takes(x, w, bias, bn_w, bn_b, bn_mean, bn_var))
      plans[static_cast<size_t>(b)] = product_plan(w, bias, bn_w, bn_b, bn_mean, bn_var, eps, relu);
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

}  // namespace

at::Tensor fast_calls::tail_without_autograd(const at::Tensor& x, const at::Tensor& weight,
                                             const std::optional<at::Tensor>& bias) {
  return unrecorded_tail(x, weight, bias, std::nullopt, std::nullopt, std::nullopt, std::nullopt, 0.0, 0);
}

std::vector<at::Tensor> fast_calls::tails_without_autograd(const std::vector<TailArgs>& args) {
  return unrecorded_tails(args);
}

void register_fast_calls(pybind11::module_& m) {
  pybind11::class_<PoolCall>(m, "_PoolCall",
                             "The eager fast path's multi_pool2d call with its constants (pyramid_ext.functional).")
      .def(pybind11::init<std::vector<int64_t>, std::vector<int64_t>, std::vector<int64_t>, int64_t, bool, bool,
                          std::vector<std::tuple<std::vector<int64_t>, std::vector<int64_t>, int64_t>>,
                          std::vector<int64_t>, bool>())
      .def("packed", &PoolCall::packed, pybind11::arg("x"), pybind11::arg("want_indices") = true)
      .def("spp", &PoolCall::spp)
      .def("levels", &PoolCall::levels)
      .def("levels_with_indices", &PoolCall::levels_with_indices)
      .def("levels_handing_on_x", &PoolCall::levels_handing_on_x);
  m.def("_pool_fast", &pool_fast,
        "The pooling fast path (pyramid_ext.functional): of a common eager call, its _PoolCall (want 0), levels "
        "(1), levels and indices (2) or SPP vector (3); None where the general path must run.");
  m.def(
      "_pool_fast_init", [](pybind11::handle builder) { pool_call_builder = builder.inc_ref().ptr(); },
      "Registers the function that builds a call's _PoolCall on a cache miss (pyramid_ext.functional).");
  m.def(
      "_pool_cache_size", [] { return pool_cache().size(); }, "Entries in the pooling fast path's cache.");
  m.def(
      "_pool_cache_set_max", [](size_t max) { return pool_cache().set_max(max); },
      "Sets the pooling fast path's cache bound; returns the previous one (for the tests).");
  m.def(
      "_pool_cache_clear", [] { pool_cache().clear(); }, "Empties the pooling fast path's cache.");
  register_fast_gate(m);  // csrc/fast_call_gate.cpp
  m.def("_upsample_concat_fast", &upsample_concat_fast,
        "upsample_concat's eager fast path (pyramid_ext.functional): checks that the call is the common one and "
        "calls the op (out if given, else a new output), or returns None.");
  fast_calls::register_uc_conv_fast(m);  // csrc/uc_conv_fast.cpp
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

}  // namespace pyramid_ext
