// The op schemas (declared once, in op_schemas.h) and the extension's Python module.
//
// Kernels register per backend: csrc/cpu/*.cpp for CPU, csrc/cuda/*.cu for
// CUDA. Fake (meta) kernels and autograd are registered from Python
// (pyramid_ext/_ops.py), as in pytorch/extension-cpp.
#include <Python.h>
#include <torch/library.h>

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "op_schemas.h"
#include "pool_plan.h"

#include "cpu/output_buffers.h"
#include "cpu/simd_loops.h"
#include "cpu/test_overrides.h"

namespace pyramid_ext {

TORCH_LIBRARY(pyramid_ext, m) { define_ops(m); }

void register_fast_calls(pybind11::module_& m);  // csrc/fast_calls.cpp

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

// Test only (tests/test_plan.py): the window plan every device builds for a
// multi_pool2d call, as lists of ints: (h_cuts, h_seg_begin, h_seg_end,
// h_seg_of, w_cuts, w_seg_begin, w_seg_end, w_seg_of, level_offsets, total);
// level_offsets[l] is the offset of level l's block in a sample's packed
// output, total = channels * sum(bh * bw) the sample's length. Bad arguments
// raise RuntimeError with the ops' messages.
pybind11::tuple pool_plan(const std::vector<int64_t>& h_bounds, const std::vector<int64_t>& w_bounds,
                          const std::vector<int64_t>& level_bins, int64_t height, int64_t width,
                          int64_t channels) {
  const pyramid_ext::WindowPlan p =
      pyramid_ext::make_window_plan("pyramid_ext._C._pool_plan", h_bounds, w_bounds, level_bins, height, width,
                                    channels);
  // std::vector -> list by pybind11/stl.h
  return pybind11::make_tuple(p.h.cuts, p.h.seg_begin, p.h.seg_end, p.h.seg_of, p.w.cuts, p.w.seg_begin,
                              p.w.seg_end, p.w.seg_of, p.offset, channels * p.total);
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
  m.def("_pool_plan", &pool_plan, pybind11::arg("h_bounds"), pybind11::arg("w_bounds"),
        pybind11::arg("level_bins"), pybind11::arg("height"), pybind11::arg("width"), pybind11::arg("channels"),
        "Test only: multi_pool2d's window plan (segments per axis, level offsets, total), as lists of ints.");
  m.def("_simd_isa_available", [](int64_t isa) {
    return pyramid_ext::simd::isa_available(static_cast<pyramid_ext::simd::Isa>(isa));
  }, "Whether this CPU runs the loops compiled for ISA 1 (baseline), 2 (AVX2), 3 (AVX-512).");
  m.def("_cpu_cache_stats", [] {
    const auto s = pyramid_ext::output_buffers::stats();
    pybind11::dict d;
    d["limit_bytes"] = s.limit_bytes;
    d["cached_bytes"] = s.cached_bytes;
    d["cached_buffers"] = s.cached_buffers;
    d["hits"] = s.hits;
    d["misses"] = s.misses;
    return d;
  }, "The CPU output-buffer cache's counters (csrc/cpu/output_buffers.h).");
  m.def("_set_cpu_cache_limit", &pyramid_ext::output_buffers::set_limit, pybind11::arg("limit_bytes"),
        "Sets the most bytes of freed CPU output buffers kept for reuse; returns the previous limit.");
  m.def("_empty_cpu_cache", &pyramid_ext::output_buffers::release_cached,
        "Frees the cached CPU output buffers; returns the bytes freed.");
  pyramid_ext::register_fast_calls(m);
#ifdef PYRAMID_EXT_VERSION
  m.attr("__version__") = PYRAMID_EXT_VERSION;
#endif
}
