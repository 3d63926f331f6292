// Small kernels that break CUDA's rules on purpose, one rule each, so the
// tests can check that the emulator rejects every one (tests/test_cuda_emu.py).
#include <stdexcept>
#include <string>
#include <vector>

#include "cuda/compat.cuh"
#include "cuda_emu/selftest.h"

namespace pe_emu_selftest {
namespace {

using pyramid_ext::cuda::Stream;

__global__ void barrier_skipped_by_some(float* out) {
  if (threadIdx.x < 16) __syncthreads();
  out[threadIdx.x] = 1.0f;
}

__global__ void two_different_barriers(float* out) {
  if (threadIdx.x % 2 == 0) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1.0f;
}

__global__ void shuffle_lane_missing(float* out) {
  float v = static_cast<float>(threadIdx.x);
  if (threadIdx.x != 31) v += __shfl_xor_sync(0xffffffffu, v, 1);
  out[threadIdx.x] = v;
}

__global__ void shuffle_reads_unnamed_lane(float* out) {
  float v = static_cast<float>(threadIdx.x);
  if (threadIdx.x < 16) v = __shfl_down_sync(0x0000ffffu, v, 8);  // lanes 8..15 read 16..23
  out[threadIdx.x] = v;
}

__global__ void warp_sum_ok(float* out) {
  float v = static_cast<float>(threadIdx.x);
  for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
  out[threadIdx.x] = v;
}

// Thread 0 writes, the others read without a barrier: a race that a shuffled
// schedule exposes (the readers see the NaN fill or the value, by seed).
__global__ void smem_race(float* out) {
  PE_SHARED_ARRAY(float, cell, [1]);
  if (threadIdx.x == 0) cell[0] = 5.0f;
  out[threadIdx.x] = cell[0];
}

__global__ void smem_reads_unwritten(float* out) {
  PE_SHARED_ARRAY(float, part, [64]);
  part[threadIdx.x] = 1.0f;  // 32 threads write half the array
  __syncthreads();
  out[threadIdx.x] = part[threadIdx.x + 32];
}

__global__ void dynamic_smem_user(float* out, int n) {
  PE_DYNAMIC_SHARED(smem);
  float* buf = reinterpret_cast<float*>(smem);
  for (int i = threadIdx.x; i < n; i += blockDim.x) buf[i] = 2.0f;
  __syncthreads();
  out[threadIdx.x] = buf[threadIdx.x];
}

struct BigArg {
  char bytes[4100];
};

__global__ void big_argument(const BigArg a, float* out) { out[threadIdx.x] = a.bytes[0]; }

}  // namespace

std::vector<float> run(const std::string& name) {
  std::vector<float> out(2048, 0.0f);
  float* o = out.data();
  const Stream stream = 0;
  if (name == "barrier_skipped_by_some") {
    PE_LAUNCH(barrier_skipped_by_some, 1, 32, 0, stream)(o);
  } else if (name == "two_different_barriers") {
    PE_LAUNCH(two_different_barriers, 1, 32, 0, stream)(o);
  } else if (name == "shuffle_lane_missing") {
    PE_LAUNCH(shuffle_lane_missing, 1, 32, 0, stream)(o);
  } else if (name == "shuffle_reads_unnamed_lane") {
    PE_LAUNCH(shuffle_reads_unnamed_lane, 1, 32, 0, stream)(o);
  } else if (name == "shuffle_partial_warp") {
    PE_LAUNCH(warp_sum_ok, 1, 48, 0, stream)(o);  // the second warp has 16 lanes
  } else if (name == "warp_sum_ok") {
    PE_LAUNCH(warp_sum_ok, 1, 64, 0, stream)(o);
  } else if (name == "smem_race") {
    PE_LAUNCH(smem_race, 1, 32, 0, stream)(o);
  } else if (name == "smem_reads_unwritten") {
    PE_LAUNCH(smem_reads_unwritten, 1, 32, 0, stream)(o);
  } else if (name == "block_too_large") {
    PE_LAUNCH(warp_sum_ok, 1, 1056, 0, stream)(o);
  } else if (name == "smem_over_limit") {
    PE_LAUNCH(dynamic_smem_user, 1, 32, 48 * 1024 + 4, stream)(o, 32);
  } else if (name == "smem_opt_in") {
    ::pe_emu::set_max_dynamic_smem(reinterpret_cast<const void*>(&dynamic_smem_user), 96 * 1024);
    PE_LAUNCH(dynamic_smem_user, 1, 32, 96 * 1024, stream)(o, 96 * 256);
  } else if (name == "smem_opt_in_over_device") {
    ::pe_emu::set_max_dynamic_smem(reinterpret_cast<const void*>(&dynamic_smem_user), 300 * 1024);
  } else if (name == "smem_overflow") {
    PE_LAUNCH(dynamic_smem_user, 1, 32, 31 * sizeof(float), stream)(o, 32);  // writes 32 floats
  } else if (name == "argument_too_large") {
    static BigArg big{};
    PE_LAUNCH(big_argument, 1, 32, 0, stream)(big, o);
  } else {
    throw std::invalid_argument("unknown self-test " + name);
  }
  return out;
}

}  // namespace pe_emu_selftest
