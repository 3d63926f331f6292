// The eager fast paths' gate (fast_call_checks.h `compiled_serves`): whether
// a call goes to the compiled op, answered in C++. As Python it was three
// calls (the ONNX exporters' flags, the backend in force, the device types
// the compiled op serves), 20-30 us right after the eager code of a
// (16, 256, 16, 16) pooling had swept the caches: a sixth of that call
// (issue 12). The state it reads is Python's own, registered once by
// pyramid_ext.functional (`_fast_gate_init`): use_backend's per-thread stack
// (backends._local), os.environ's mapping, and the two exporters' flags, so
// there is no second copy to keep in step.
#include <torch/csrc/jit/frontend/tracer.h>

#include <string>
#include <unordered_map>

#include "fast_call_checks.h"

namespace pyramid_ext::fast_calls {
namespace {

// An attribute name, interned once (no string built per call).
PyObject* interned(const char* name) {
  PyObject* s = PyUnicode_InternFromString(name);
  TORCH_CHECK(s != nullptr, "interning ", name);
  return s;
}

struct GateState {
  PyObject* local = nullptr;         // backends._local: a threading.local whose `stack` is use_backend's names
  PyObject* environ_data = nullptr;  // os.environ's dict (what os.environ reads and writes)
  PyObject* env_key = nullptr;       // PYRAMID_EXT_BACKEND as that dict's keys are encoded
  PyObject* env_compiled = nullptr;  // the encoded values that select the compiled ops: "", "auto", "cpp"
  PyObject* onnx_probe = nullptr;    // returns (exporter flags module, TorchScript exporter globals) or ()
  PyObject* onnx_flags = nullptr;    // the probe's answer, once asked
  PyObject* onnx_fallback = nullptr; // torch.onnx.is_in_onnx_export, where the flags were not found
  PyObject* stack_name = interned("stack");
  PyObject* onnx_flag_names[2] = {interned("_is_onnx_exporting"), interned("in_onnx_export")};
};

// Set once, read with the GIL held; its references live as long as the process.
GateState* gate = nullptr;

// Whether a backend name selects the compiled ops: "cpp", or "auto" (whose
// first choice is cpp wherever the op has a kernel for the device). Anything
// else, an invalid name included, declines: the Python path raises for it.
bool names_compiled(PyObject* name) {
  return PyUnicode_CheckExact(name) && (PyUnicode_CompareWithASCIIString(name, "cpp") == 0 ||
                                        PyUnicode_CompareWithASCIIString(name, "auto") == 0);
}

// backends.requested_backend(backend) in ("cpp", "auto"), without raising.
bool backend_names_compiled(PyObject* backend) {
  if (backend != Py_None) return names_compiled(backend);
  // the innermost use_backend name that is not None (the class gives
  // `stack` a default, so a thread that never entered one reads None here)
  PyObject* stack = PyObject_GetAttr(gate->local, gate->stack_name);
  if (stack == nullptr) {
    PyErr_Clear();
    return false;
  }
  int named = -1;  // -1: no name on the stack
  if (PyList_CheckExact(stack)) {
    for (Py_ssize_t i = PyList_GET_SIZE(stack) - 1; i >= 0 && named < 0; --i) {
      PyObject* name = PyList_GET_ITEM(stack, i);
      if (name != Py_None) named = names_compiled(name) ? 1 : 0;
    }
  } else if (stack != Py_None) {
    named = 0;  // not the list use_backend keeps: let Python read it
  }
  Py_DECREF(stack);
  if (named >= 0) return named == 1;
  PyObject* value = PyDict_GetItemWithError(gate->environ_data, gate->env_key);  // borrowed
  if (value == nullptr) {
    if (!PyErr_Occurred()) return true;  // unset: "auto"
    PyErr_Clear();
    return false;
  }
  const int selects = PySequence_Contains(gate->env_compiled, value);
  if (selects < 0) PyErr_Clear();
  return selects == 1;
}

// export.onnx_flags_set(): either exporter is running.
bool onnx_export_running() {
  if (gate->onnx_flags == nullptr) {
    PyObject* flags = PyObject_CallNoArgs(gate->onnx_probe);
    if (flags == nullptr || !PyTuple_Check(flags)) {
      PyErr_Clear();
      Py_XDECREF(flags);
      return true;  // cannot tell: the Python path asks again
    }
    gate->onnx_flags = flags;
  }
  PyObject* flags = gate->onnx_flags;
  if (PyTuple_GET_SIZE(flags) != 2) {  // the flags were not found: torch.onnx's own question
    PyObject* answer = PyObject_CallNoArgs(gate->onnx_fallback);
    const int running = answer == nullptr ? -1 : PyObject_IsTrue(answer);
    Py_XDECREF(answer);
    if (running < 0) PyErr_Clear();
    return running != 0;
  }
  for (int i = 0; i < 2; ++i) {
    PyObject* v = PyObject_GetAttr(PyTuple_GET_ITEM(flags, i), gate->onnx_flag_names[i]);
    const int set = v == nullptr ? -1 : PyObject_IsTrue(v);
    Py_XDECREF(v);
    if (set != 0) {
      if (set < 0) PyErr_Clear();
      return true;
    }
  }
  return false;
}

void gate_init(pybind11::handle local, pybind11::handle environ_data, pybind11::handle env_key,
               pybind11::handle env_compiled, pybind11::handle onnx_probe, pybind11::handle onnx_fallback) {
  TORCH_CHECK(PyDict_Check(environ_data.ptr()) && PyTuple_Check(env_compiled.ptr()) &&
                  PyCallable_Check(onnx_probe.ptr()) && PyCallable_Check(onnx_fallback.ptr()),
              "_fast_gate_init: a dict, a tuple and two callables");
  auto* state = new GateState;
  for (auto [slot, obj] : {std::pair{&state->local, local}, {&state->environ_data, environ_data},
                           {&state->env_key, env_key}, {&state->env_compiled, env_compiled},
                           {&state->onnx_probe, onnx_probe}, {&state->onnx_fallback, onnx_fallback}}) {
    *slot = obj.inc_ref().ptr();
  }
  gate = state;  // (a second call replaces the state; the first one's references stay alive)
}

}  // namespace

bool compiled_serves(PyObject* backend, c10::DeviceType device, const c10::OperatorHandle& op) {
  if (gate == nullptr || !backend_names_compiled(backend)) return false;
  c10::DispatchKey key;
  if (device == c10::DeviceType::CPU) key = c10::DispatchKey::CPU;
  else if (device == c10::DeviceType::CUDA) key = c10::DispatchKey::CUDA;
  else return false;
  return op.hasKernelForDispatchKey(key) && !onnx_export_running();
}

bool jit_tracing() { return torch::jit::tracer::isTracing(); }

void register_fast_gate(pybind11::module_& m) {
  m.def("_fast_gate_init", &gate_init,
        "Registers the state the eager fast paths' gate reads (pyramid_ext.functional, once): use_backend's "
        "thread-local stack, os.environ's dict, the encoded PYRAMID_EXT_BACKEND and the values of it that select "
        "the compiled ops, a probe for the ONNX exporters' flags and torch.onnx.is_in_onnx_export.");
  m.def(
      "_compiled_serves",
      [](pybind11::handle backend, const std::string& device_type, const std::string& op) {
        // each op's handle looked up once (the GIL is held: no lock needed)
        static auto* handles = new std::unordered_map<std::string, c10::OperatorHandle>;
        auto it = handles->find(op);
        if (it == handles->end())
          it = handles->emplace(op, c10::Dispatcher::singleton().findSchemaOrThrow(("pyramid_ext::" + op).c_str(), ""))
                   .first;
        return compiled_serves(backend.ptr(), c10::Device(device_type).type(), it->second);
      },
      "The gate's answer for a call with `backend` on a `device_type` tensor to op `op` (upsample_concat_conv2d's "
      "cached general path, pyramid_ext.functional, and the tests).");
}

}  // namespace pyramid_ext::fast_calls
