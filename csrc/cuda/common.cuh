// Small device utilities shared by the CUDA kernels: deterministic warp
// reductions (fixed xor-butterfly trees, no atomics) and launch helpers.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "cuda/compat.cuh"
#include "pyramid_index.h"

namespace pyramid_ext {
namespace cuda {

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;

// n / d for a divisor fixed for a launch: one multiply-high, an add and a
// shift (ATen's IntDivider, after Granlund and Montgomery), exact for every d
// in [1, 2^31 - 1] and n in [0, 2^31 - 1]. A 32-bit `/` is a sequence of
// about 20 instructions on the GPU; the elementwise kernels decode every
// element's coordinates with several. Built on the host (the magic number).
struct FastDiv {
  uint32_t divisor = 1;
  uint32_t magic = 1;
  uint32_t shift = 0;

  FastDiv() = default;
  explicit FastDiv(int64_t d) : divisor(static_cast<uint32_t>(d)) {
    TORCH_CHECK(d >= 1 && d <= std::numeric_limits<int32_t>::max(), "FastDiv: divisor ", d, " out of range");
    while ((uint64_t{1} << shift) < divisor) ++shift;
    magic = static_cast<uint32_t>(((uint64_t{1} << 32) * ((uint64_t{1} << shift) - divisor)) / divisor + 1);
  }
  __host__ __device__ __forceinline__ uint32_t div(uint32_t n) const {
#if defined(__CUDA_ARCH__)
    const uint32_t t = __umulhi(n, magic);
#else
    const uint32_t t = static_cast<uint32_t>((uint64_t{n} * magic) >> 32);
#endif
    return (t + n) >> shift;
  }
};

// Sum over the 32 lanes of a warp. The xor butterfly adds the same pairs in
// the same order on every run (and every lane ends with the same value, as
// floating-point addition is commutative), so the result is bitwise
// deterministic.
template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off /= 2) {
#if PE_EMU_PLANT_BUG == 3  // test-only (tests/test_cuda_emu.py): a wrong shuffle offset
    v += __shfl_xor_sync(kFullMask, v, off == 1 ? 2 : off);
#else
    v += __shfl_xor_sync(kFullMask, v, off);
#endif
  }
  return v;
}

// (value, flat index) maximum over the 32 lanes of a warp with the ATen CPU
// rule (max_pool_combine is a selection by a total order, so any tree gives
// the row-major-scan answer).
template <typename acc_t>
__device__ __forceinline__ void warp_max(acc_t& v, int64_t& idx) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off /= 2) {
    const acc_t ov = __shfl_xor_sync(kFullMask, v, off);
    const long long oi =
        __shfl_xor_sync(kFullMask, static_cast<long long>(idx), off);
    max_pool_combine(v, idx, ov, static_cast<int64_t>(oi));
  }
}

// Long sums (average pooling, the upsample_concat backward) add float
// elements in runs of at most kRunLength per thread, and the runs' sums in
// double (thread totals, warp and block trees, cells, bins): the float error
// of an element is then at most kRunLength - 1 additions (plus its product
// roundings), so a mean over up to 2^31 elements is within 1e-6 of fp64
// relative to the mean of |x| (the bound in csrc/cpu/simd_loops.h, which
// uses the same run length). For fp64 inputs the runs are fp64 too.
constexpr int kRunLength = 12;

// A thread's long sum: `run` (acc_t) takes at most kRunLength terms, then is
// added to `total` (double).
template <typename acc_t>
struct RunSum {
  acc_t run = acc_t(0);
  int terms = 0;
  double total = 0.0;

  __host__ __device__ __forceinline__ void add(acc_t v) {
    run += v;
    if (++terms == kRunLength) {
      total += static_cast<double>(run);
      run = acc_t(0);
      terms = 0;
    }
  }
  __host__ __device__ __forceinline__ double sum() const { return total + static_cast<double>(run); }
};

// The "empty" running maximum: loses to every element, including -inf at any
// index (max_pool_combine takes an equal value with a smaller index).
constexpr int64_t kNoIndex = std::numeric_limits<int64_t>::max();

template <typename acc_t>
__host__ __device__ __forceinline__ acc_t neg_inf() {
  return -std::numeric_limits<acc_t>::infinity();
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Grid size for a 1-D grid-stride loop over `work` items, `per_block` items
// per block of `block_threads` threads: one block per `per_block` items, at
// most 8 waves of the blocks that fit an SM by thread count (the grid-stride
// loops take the rest), so the grid follows the device.
inline unsigned int grid_for(int64_t work, int64_t per_block, int block_threads) {
  const int64_t blocks = ceil_div(work, per_block);
  const int64_t resident = std::min<int64_t>(32, std::max<int64_t>(1, max_threads_per_sm() / block_threads));
  const int64_t cap = std::min<int64_t>(int64_t{sm_count()} * resident * 8, int64_t{1} << 30);
  return static_cast<unsigned int>(blocks < 1 ? 1 : (blocks > cap ? cap : blocks));
}

}  // namespace cuda
}  // namespace pyramid_ext
