// Control of the CUDA emulator from its Python module (csrc/cuda_emu/module.cpp).
#pragma once

#include <cstdint>
#include <map>
#include <string>

namespace pe_emu {

// Sets the emulated device's properties and the scheduler seed; clears the
// kernels' cudaFuncSetAttribute requests.
void configure(int sm_count, int64_t smem_per_block, int64_t smem_per_block_optin, int max_threads_per_block,
               int max_threads_per_sm, uint64_t seed);
// Launches per __global__ kernel (by name) since the last reset.
std::map<std::string, int64_t> launch_counts();
void reset_launch_counts();

}  // namespace pe_emu
