// The op schemas (declared once, in op_schemas.h) and the extension's Python module.
//
// Kernels register per backend: csrc/cpu/*.cpp for CPU, csrc/cuda/*.cu for
// CUDA. Fake (meta) kernels and autograd are registered from Python
// (pyramid_ext/_ops.py), as in pytorch/extension-cpp.
#include <Python.h>
#include <torch/library.h>

#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "op_schemas.h"

#include "cpu/simd_loops.h"
#include "cpu/test_overrides.h"

namespace pyramid_ext {

TORCH_LIBRARY(pyramid_ext, m) { define_ops(m); }

}  // namespace pyramid_ext

namespace {

bool built_with_openmp() {
#ifdef _OPENMP
  return true;
#else
  return false;
#endif
}

std::string cuda_archs() {
#ifdef PYRAMID_EXT_CUDA_ARCHS
  return PYRAMID_EXT_CUDA_ARCHS;
#else
  return "";
#endif
}

bool built_with_cuda() {
#ifdef PYRAMID_EXT_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "pyramid_ext compiled kernels (ops live in torch.ops.pyramid_ext)";
  m.def("with_cuda", &built_with_cuda,
        "Whether the CUDA kernels were compiled in.");
  m.def("with_openmp", &built_with_openmp,
        "Whether the CPU kernels were compiled with OpenMP.");
  m.def("cuda_archs", &cuda_archs,
        "The TORCH_CUDA_ARCH_LIST the CUDA kernels were compiled for.");
  // Test-only (tests/test_cpu_paths.py): force a CPU code path.
  m.def(
      "_set_test_override",
      [](const std::string& name, int64_t value) {
        try {
          pyramid_ext::test_overrides::set(name, value);
        } catch (const std::invalid_argument& e) {
          throw pybind11::value_error(e.what());
        }
      },
      "Test only: sets a CPU code-path switch (0 = automatic).");
  m.def("_test_overrides", &pyramid_ext::test_overrides::describe,
        "Test only: the CPU code-path switches, 'name=value,...'.");
  m.def(
      "_simd_isa",
      []() -> std::string {
        switch (pyramid_ext::simd::active_isa()) {
          case pyramid_ext::simd::Isa::kAvx512:
            return "avx512";
          case pyramid_ext::simd::Isa::kAvx2:
            return "avx2";
          default:
            return "baseline";
        }
      },
      "The instruction set the CPU float loops run with now.");
  m.def("_simd_isa_available", [](int64_t isa) {
    return pyramid_ext::simd::isa_available(static_cast<pyramid_ext::simd::Isa>(isa));
  }, "Whether this CPU runs the loops compiled for ISA 1 (baseline), 2 (AVX2), 3 (AVX-512).");
#ifdef PYRAMID_EXT_VERSION
  m.attr("__version__") = PYRAMID_EXT_VERSION;
#endif
}
