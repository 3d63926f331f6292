// The emulated build's Python module (test-only, built by tests/cuda_emu_build.py):
// the ops of op_schemas.h in torch.ops.pyramid_ext_emu on CPU tensors, run by the CUDA
// kernels of csrc/cuda/ under the emulator; and the emulator's controls.
#include <torch/extension.h>

#include "cuda/common.cuh"
#include "cuda_emu/emu_runtime.h"
#include "cuda_emu/selftest.h"
#include "op_schemas.h"

#ifndef PE_EMU_PLANT_BUG
#define PE_EMU_PLANT_BUG 0
#endif

TORCH_LIBRARY(pyramid_ext_emu, m) { pyramid_ext::define_ops(m); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "pyramid_ext's CUDA kernels under the CUDA emulator (ops in torch.ops.pyramid_ext_emu)";
  m.def("configure", &pe_emu::configure, "Sets the emulated device and the scheduler seed", py::arg("sm_count"),
        py::arg("smem_per_block"), py::arg("smem_per_block_optin"), py::arg("max_threads_per_block"),
        py::arg("max_threads_per_sm"), py::arg("seed"));
  m.def("launch_counts", &pe_emu::launch_counts, "Launches per __global__ kernel since the last reset");
  m.def("reset_launch_counts", &pe_emu::reset_launch_counts);
  m.def("selftest", &pe_emu_selftest::run, "Runs one of the emulator's rule-breaking test kernels");
  m.def(
      "fast_div",
      [](int64_t d, const std::vector<int64_t>& ns) {
        const pyramid_ext::cuda::FastDiv f(d);
        std::vector<int64_t> q;
        q.reserve(ns.size());
        for (int64_t n : ns) q.push_back(f.div(static_cast<uint32_t>(n)));
        return q;
      },
      "FastDiv(d).div(n) for each n (common.cuh), the host side of the kernels' divisions");
  m.attr("planted_bug") = PE_EMU_PLANT_BUG;
}
