// Uninitialized scratch arrays for the CPU kernels, 64-byte aligned.
//
// Why aligned: the kernels load and store whole native vectors in their
// scratch (simd::tree_means's 64-byte nodes, simd::cell_sum's cells), and
// `new T[]` gives 16-byte alignment, so on AVX-512 most 64-byte accesses
// split across two cache lines. Measured (Intel Xeon, AVX-512, channels_last
// average pooling, bins 1, 2, 3, 6, in-process interleaved A/B):
// (16, 256, 16, 16) 0.151 -> 0.140 ms on two threads, 0.307 -> 0.277 ms on one.
// Uninitialized: their users write every entry they read, and zeroing would
// be one more pass over memory.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <memory>
#include <new>
#include <type_traits>

namespace pyramid_ext::cpu {

struct FreeScratch {
  void operator()(void* p) const { std::free(p); }
};

template <typename T>
using Scratch = std::unique_ptr<T[], FreeScratch>;

// n elements of T (trivial types only), at a 64-byte boundary.
template <typename T>
Scratch<T> scratch(int64_t n) {
  static_assert(std::is_trivially_default_constructible_v<T> && std::is_trivially_destructible_v<T>);
  constexpr size_t kAlign = 64;
  const size_t bytes = (static_cast<size_t>(n > 0 ? n : 1) * sizeof(T) + kAlign - 1) / kAlign * kAlign;
  void* p = std::aligned_alloc(kAlign, bytes);
  if (p == nullptr) throw std::bad_alloc();
  return Scratch<T>(static_cast<T*>(p));
}

}  // namespace pyramid_ext::cpu
