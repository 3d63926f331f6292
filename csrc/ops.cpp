// The op schemas (declared once, here) and the extension's Python module.
//
// Kernels register per backend: csrc/cpu/*.cpp for CPU, csrc/cuda/*.cu for
// CUDA. Fake (meta) kernels and autograd are registered from Python
// (pyramid_ext/_ops.py), as in pytorch/extension-cpp.
#include <Python.h>
#include <torch/library.h>

#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "cpu/simd_loops.h"
#include "cpu/test_overrides.h"

namespace pyramid_ext {

TORCH_LIBRARY(pyramid_ext, m) {
  // Pools x (N, C, H, W) over every window of every level in one pass.
  // h_bounds / w_bounds: flat [start, end) pairs of every level's windows
  // along H / W; level_bins: flat (bh, bw) per level; mode: 0 avg, 1 max.
  // Returns the packed values (N, C * sum(bh * bw)), level after level, each
  // level channel-major or, with channels_last_levels, (bh, bw, C); and for
  // max the matching int64 flat indices (h * W + w), else an empty tensor.
  m.def(
      "multi_pool2d(Tensor x, SymInt[] h_bounds, SymInt[] w_bounds, "
      "int[] level_bins, int mode, bool channels_last_levels) "
      "-> (Tensor, Tensor)");
  // Gradient of multi_pool2d with respect to x: (N, C, H, W), channels_last
  // when channels_last_input. `indices` is required for max, ignored for avg.
  m.def(
      "multi_pool2d_backward(Tensor grad, Tensor? indices, SymInt[] "
      "input_shape, SymInt[] h_bounds, SymInt[] w_bounds, int[] level_bins, "
      "int mode, bool channels_last_levels, bool channels_last_input) "
      "-> Tensor");
  // Bilinearly resizes each branch to `size` and writes it, with x, into one
  // concatenated (N, C_x + sum C_k, H, W) output: x first (or last when not
  // x_first), branches in order. All tensors share one dtype and device.
  m.def(
      "upsample_concat(Tensor? x, Tensor[] branches, SymInt[] size, "
      "bool align_corners, bool x_first, bool channels_last) -> Tensor");
  // Same, written into a caller's `out` through its strides.
  m.def(
      "upsample_concat_out(Tensor? x, Tensor[] branches, bool align_corners, "
      "bool x_first, Tensor(a!) out) -> ()");
  // Gradients of the branches, from grad_out's channels [channel_offset,
  // channel_offset + sum C_k). branch_shapes: flat (C_k, h_k, w_k) per
  // branch. Results are channels_last when channels_last.
  m.def(
      "upsample_concat_backward(Tensor grad_out, SymInt[] branch_shapes, "
      "SymInt channel_offset, bool align_corners, bool channels_last) "
      "-> Tensor[]");
}

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
