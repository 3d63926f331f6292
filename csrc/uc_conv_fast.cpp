// upsample_concat_conv2d's eager fast path whole (pyramid_ext/functional.py,
// `_fast_uc_conv`), for its common no-grad call: a 1x1 kernel, x given, every
// branch smaller than x and convolved as tap products (the plan the Python
// layer chose for this call's sizes and registered, `_uc_conv_remember`),
// float32 on the product kernel. The Python version's steps, the same
// functions in the same order, so the same bits: x's product with the bias
// (tail_without_autograd), the branches' products in one call
// (tails_without_autograd: branch_tails.cpp's no-grad tails),
// then upsample_shift_add's sum added into x's product in place (the op
// would read it and write a second output: one pass and one buffer fewer).
// Why C++: after the eager code a benchmark runs between calls, the Python
// of the general path's key, plan and slicing took about 300 us of a 1.5 ms
// call on (16, 256, 16, 16) (two threads); checks as attribute reads from
// Python are slow there (fast_calls.cpp, upsample_concat_fast). Returns None
// wherever the call differs (grad to record, a forward-mode tangent, a subclass, a
// mode, functorch, autocast, another dtype or device, sizes or layouts not
// registered, the kernel unavailable, JIT tracing, or the gate declines: a
// backend other than the compiled ops, an ONNX export), and the Python path
// runs.
#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/autocast_mode.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>

#include <functional>
#include <mutex>
#include <unordered_set>
#include <utility>
#include <vector>

#include "cpu/pointwise_product.h"
#include "cpu/upsample_shift_add.h"
#include "fast_call_checks.h"

namespace pyramid_ext::fast_calls {
namespace {

namespace uc_conv_fast {

// The sizes and layouts a registered plan depends on.
std::vector<int64_t> signature(const at::Tensor& x, const std::vector<at::Tensor>& branches, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias, bool x_first) {
  std::vector<int64_t> sig;
  auto add = [&](const at::Tensor& t) {
    sig.push_back(t.dim());
    for (int64_t d : t.sizes()) sig.push_back(d);
    sig.push_back(t.is_contiguous() ? 0 : 1);
  };
  add(x);
  sig.push_back(static_cast<int64_t>(branches.size()));
  for (const at::Tensor& b : branches) add(b);
  add(weight);
  if (bias) add(*bias);
  else sig.push_back(-1);
  sig.push_back(x_first ? 1 : 0);
  return sig;
}

struct SignatureHash {
  size_t operator()(const std::vector<int64_t>& v) const {
    size_t h = v.size();
    for (int64_t e : v) h = h * 1000003u ^ std::hash<int64_t>()(e);
    return h;
  }
};

constexpr size_t kMaxPlans = 256;  // a model has a few such layers
std::mutex plans_mutex;
std::unordered_set<std::vector<int64_t>, SignatureHash>& plans() {
  static auto* set = new std::unordered_set<std::vector<int64_t>, SignatureHash>();
  return *set;
}

bool cpu_float(const at::Tensor& t) { return t.scalar_type() == at::kFloat && t.device().is_cpu(); }

}  // namespace uc_conv_fast

void uc_conv_remember(const at::Tensor& x, const std::vector<at::Tensor>& branches, const at::Tensor& weight,
                      const std::optional<at::Tensor>& bias, bool x_first) {
  using namespace uc_conv_fast;
  std::vector<int64_t> sig = signature(x, branches, weight, bias, x_first);
  const std::lock_guard<std::mutex> lock(plans_mutex);
  if (plans().size() >= kMaxPlans) plans().clear();
  plans().insert(std::move(sig));
}

// Forgets every registered signature (tests; a forced plan); returns how many there were.
int64_t uc_conv_forget() {
  const std::lock_guard<std::mutex> lock(uc_conv_fast::plans_mutex);
  const auto count = static_cast<int64_t>(uc_conv_fast::plans().size());
  uc_conv_fast::plans().clear();
  return count;
}

pybind11::object uc_conv_fast_call(pybind11::handle x_obj, pybind11::handle branches_obj, pybind11::handle weight_obj,
                                   pybind11::handle bias_obj, pybind11::handle size_obj, bool align_corners,
                                   bool x_first, pybind11::handle backend) {
  using namespace uc_conv_fast;
  const pybind11::object declined = pybind11::none();
  static const c10::OperatorHandle shift_add_op =
      c10::Dispatcher::singleton().findSchemaOrThrow("pyramid_ext::upsample_shift_add", "");
  PyObject* seq = branches_obj.ptr();
  if (!(PyList_CheckExact(seq) || PyTuple_CheckExact(seq)) || PySequence_Fast_GET_SIZE(seq) < 2 ||
      at::impl::torch_function_mode_enabled() || c10::impl::TorchDispatchModeTLS::stack_len() > 0 ||
      functorch_transform_active() || at::autocast::is_autocast_enabled(at::kCPU) ||
      !cpu::pointwise_product::available())
    return declined;
  const at::Tensor* x = plain_tensor(x_obj.ptr());
  const at::Tensor* weight = plain_tensor(weight_obj.ptr());
  if (x == nullptr || weight == nullptr || x->dim() != 4 || !cpu_float(*x) || !cpu_float(*weight) || !dense(*x))
    return declined;
  // (the tracer must see the ops; the gate: the backend in force, an ONNX export)
  if (jit_tracing() || !compiled_serves(backend.ptr(), c10::DeviceType::CPU, shift_add_op)) return declined;
  std::optional<at::Tensor> bias;
  if (!bias_obj.is_none()) {
    const at::Tensor* b = plain_tensor(bias_obj.ptr());
    if (b == nullptr || !cpu_float(*b)) return declined;
    bias = *b;
  }
  if (!size_obj.is_none()) {
    PyObject* size = size_obj.ptr();
    if (!PyTuple_Check(size) || PyTuple_GET_SIZE(size) != 2 || exact_int(PyTuple_GET_ITEM(size, 0)) != x->size(2) ||
        exact_int(PyTuple_GET_ITEM(size, 1)) != x->size(3))
      return declined;
  }
  const bool grad = at::GradMode::is_enabled();
  auto refused = [&](const at::Tensor& t) { return (grad && t.requires_grad()) || t._fw_grad(/*level=*/0).defined(); };
  if (refused(*x) || refused(*weight) || (bias && refused(*bias))) return declined;
  std::vector<at::Tensor> branches;
  const Py_ssize_t count = PySequence_Fast_GET_SIZE(seq);
  PyObject** items = PySequence_Fast_ITEMS(seq);
  for (Py_ssize_t i = 0; i < count; ++i) {
    const at::Tensor* t = plain_tensor(items[i]);
    if (t == nullptr || !cpu_float(*t) || !dense(*t) || refused(*t)) return declined;
    branches.push_back(*t);
  }
  {
    const std::vector<int64_t> sig = signature(*x, branches, *weight, bias, x_first);
    const std::lock_guard<std::mutex> lock(plans_mutex);
    if (plans().count(sig) == 0) return declined;
  }
  at::Tensor out;
  {
    pybind11::gil_scoped_release no_gil;
    // the registered signature fixed the channels: x's columns of the weight, then each branch's
    int64_t branch_channels = 0;
    for (const at::Tensor& b : branches) branch_channels += b.size(1);
    const int64_t cx = x->size(1), x_col = x_first ? 0 : branch_channels;
    out = tail_without_autograd(*x, weight->slice(1, x_col, x_col + cx), bias);
    std::vector<TailArgs> taps;
    int64_t col = x_first ? cx : 0;
    for (const at::Tensor& b : branches) {
      taps.push_back(TailArgs{b, weight->slice(1, col, col + b.size(1)), std::nullopt, std::nullopt, std::nullopt,
                              std::nullopt, std::nullopt, 0.0, 0});
      col += b.size(1);
    }
    cpu::upsample_shift_add_in_place(out, tails_without_autograd(taps), 1, align_corners);
  }
  return pybind11::reinterpret_steal<pybind11::object>(THPVariable_Wrap(std::move(out)));
}

}  // namespace

void register_uc_conv_fast(pybind11::module_& m) {
  m.def("_uc_conv_fast", &uc_conv_fast_call,
        "upsample_concat_conv2d's eager fast path (pyramid_ext.functional): a registered no-grad call computed "
        "in one C++ call, or None.");
  m.def("_uc_conv_remember", &uc_conv_remember,
        "Registers the sizes and layouts of a call whose plan _uc_conv_fast computes (pyramid_ext.functional).");
  m.def("_uc_conv_forget", &uc_conv_forget, "Forgets the signatures _uc_conv_remember registered; returns how many.");
}

}  // namespace pyramid_ext::fast_calls
