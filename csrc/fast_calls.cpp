// The eager fast paths' C++ half (pyramid_ext/functional.py): pooling
// (`_C._pool_fast`, `_PoolCall`) and upsample_concat (`_C._upsample_concat_fast`);
// their gate is fast_call_gate.cpp, upsample_concat_conv2d's path
// uc_conv_fast.cpp, the branch tails branch_tails.cpp.
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
// conversion is skipped. Never used under torch.compile (the Python layer
// takes the op's ordinary path there).
//
// `levels_handing_on_x` is the same call for the pyramid modules' training
// step (pyramid_ext/_pool_through.py): one autograd node that pools x and
// also returns x itself, whose backward is one multi_pool2d_backward call
// with x's other gradient as the addend. In C++ for the same reason as the
// rest of this file: the Python autograd.Function, the window lists converted
// per call and the level views built in Python cost more than a small
// input's pooling (issue 12: PPM with grad at 0.67x eager on (1, 8, 8, 8)).
#include <ATen/PythonTorchFunctionTLS.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/extension.h>

#include <algorithm>
#include <list>
#include <memory>
#include <mutex>
#include <string>

#include <tuple>
#include <unordered_map>
#include <utility>
#include <vector>

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

}  // namespace

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
  fast_calls::register_branch_tails(m);  // csrc/branch_tails.cpp
}

}  // namespace pyramid_ext
