// What the eager fast paths' C++ files share (fast_calls.cpp: the pooling
// calls, upsample_concat's fast path; uc_conv_fast.cpp: upsample_concat_conv2d's
// fast path; branch_tails.cpp: the branch tails; fast_call_gate.cpp: their
// gate): the checks that a Python argument is the common case, the gate, the
// autograd node holder, and the branch tails' computation without autograd.
#pragma once

#include <torch/csrc/autograd/python_variable.h>
#include <torch/extension.h>

#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

namespace pyramid_ext::fast_calls {

// Whether a functorch transform (vmap, grad, jvp) is active on this thread:
// its layers must see the ops, so the fast paths step aside.
inline bool functorch_transform_active() {
  const c10::DispatchKeySet tls = c10::impl::tls_local_dispatch_key_set().included_;
  return tls.has(c10::DispatchKey::FuncTorchDynamicLayerFrontMode) ||
         tls.has(c10::DispatchKey::FuncTorchDynamicLayerBackMode);
}

constexpr int64_t kUnset = -1;

// The tensor `obj` holds if it is a plain torch.Tensor, else nullptr.
inline const at::Tensor* plain_tensor(PyObject* obj) {
  return THPVariable_CheckExact(obj) ? &THPVariable_Unpack(obj) : nullptr;
}

inline bool dense(const at::Tensor& t) {
  return t.layout() == at::kStrided && t.has_storage() &&
         (t.is_contiguous() || t.is_contiguous(at::MemoryFormat::ChannelsLast));
}

inline bool float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// An exact int (not a bool) that fits int64, else kUnset.
inline int64_t exact_int(PyObject* obj) {
  if (!PyLong_CheckExact(obj)) return kUnset;
  int overflow = 0;
  const long long v = PyLong_AsLongLongAndOverflow(obj, &overflow);
  return overflow != 0 || v < 0 ? kUnset : static_cast<int64_t>(v);
}

// A branch tail's arguments (x, conv weight, conv bias, BatchNorm weight,
// bias, running mean, running variance, eps, relu), as _pointwise_tails
// takes them.
using TailArgs = std::tuple<at::Tensor, at::Tensor, std::optional<at::Tensor>, std::optional<at::Tensor>,
                            std::optional<at::Tensor>, std::optional<at::Tensor>, std::optional<at::Tensor>, double,
                            int64_t>;

// A 1x1 convolution (with bias) as _pointwise_tail computes it without
// autograd: on the product kernel where it takes it, else ATen's ops.
at::Tensor tail_without_autograd(const at::Tensor& x, const at::Tensor& weight,
                                 const std::optional<at::Tensor>& bias);
// _pointwise_tails without autograd: the tails' samples cut among the threads.
std::vector<at::Tensor> tails_without_autograd(const std::vector<TailArgs>& args);

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

// upsample_concat_conv2d's fast path's Python bindings (uc_conv_fast.cpp).
void register_uc_conv_fast(pybind11::module_& m);

// The gate of every fast path (fast_call_gate.cpp): whether a call with the
// Python argument `backend` on a `device` tensor goes to `op`'s compiled
// kernel, as backends.resolve would send it: no ONNX export running, and the
// backend in force (`backend`, else the innermost use_backend name, else
// PYRAMID_EXT_BACKEND, else "auto") "cpp" or "auto" with a kernel for the
// device. False for anything else, an invalid name included (the Python path
// resolves and raises). GIL held; never called under torch.compile (the
// Python layer checks that first).
bool compiled_serves(PyObject* backend, c10::DeviceType device, const c10::OperatorHandle& op);
// torch.jit.is_tracing().
bool jit_tracing();
void register_fast_gate(pybind11::module_& m);
// The branch tails' Python bindings (branch_tails.cpp).
void register_branch_tails(pybind11::module_& m);

}  // namespace pyramid_ext::fast_calls
