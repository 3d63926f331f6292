// The op schemas (declared once, in op_schemas.h) and the extension's Python module.
//
// Kernels register per backend: csrc/cpu/*.cpp for CPU, csrc/cuda/*.cu for
// CUDA. Fake (meta) kernels and autograd are registered from Python
// (pyramid_ext/_ops.py), as in pytorch/extension-cpp.
#include <Python.h>
#include <torch/library.h>

#include <pybind11/pybind11.h>

#include "op_schemas.h"

#include <string>

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
#ifdef PYRAMID_EXT_VERSION
  m.attr("__version__") = PYRAMID_EXT_VERSION;
#endif
}
