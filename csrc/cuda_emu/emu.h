// A strict emulation of CUDA's execution model on the host, for testing the
// kernels of csrc/cuda/ on the CPU (see docs/DESIGN.md, "CUDA emulator").
//
// The kernel sources are compiled unchanged by the host C++ compiler against
// this header. Every thread of a block is a fiber with its own small
// stack; the block's fibers run one at a time on the calling OS thread, in an
// order shuffled from a seed between synchronisation points. __syncthreads and
// the warp shuffles are rendezvous with CUDA's semantics, checked strictly:
// any violation throws an error naming the kernel. Shared memory lives in a
// per-block arena filled with 0xff bytes (NaN for every floating type) at
// each block's start.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

struct uint3 {
  unsigned int x, y, z;
};

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
};

// Qualifiers that mean nothing on the host.
#define __global__
#define __device__
#define __host__
#define __grid_constant__
#define __forceinline__ __attribute__((always_inline)) inline
#define __align__(n) alignas(n)
#define __launch_bounds__(...)
// Shared memory must be declared through PE_SHARED_ARRAY / PE_DYNAMIC_SHARED
// (csrc/cuda/compat.cuh), which give each emulated block its own copy; a bare
// __shared__ would be one static array for all blocks, so it does not compile.
#define __shared__ PE_EMU_declare_shared_memory_with_PE_SHARED_ARRAY_or_PE_DYNAMIC_SHARED

namespace pe_emu {

// The running fiber's coordinates (one OS thread runs the emulator at a time).
extern uint3 g_thread_idx;
extern uint3 g_block_idx;
extern dim3 g_block_dim;
extern dim3 g_grid_dim;

// The emulated device's properties, as the launchers read them.
struct Device {
  int sm_count = 132;                       // H100 SXM
  int64_t smem_per_block = 48 * 1024;       // cudaDevAttrMaxSharedMemoryPerBlock
  int64_t smem_per_block_optin = 232448;    // ...PerBlockOptin (227 KB)
  int max_threads_per_block = 1024;
  int max_threads_per_sm = 2048;
  uint64_t seed = 0;                        // scheduler seed
};
Device& device();

// Synchronisation points, called from inside a fiber.
void syncthreads(int line);
void warp_exchange(unsigned mask, const void* value, size_t size, int src_lane, void* out, int line,
                   const char* what);
unsigned char* dynamic_smem();
void* static_smem(size_t size, size_t align, int key);
// Lane (0..31) of the running thread within its warp.
int lane_id();

// cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes).
void set_max_dynamic_smem(const void* kernel, int64_t bytes);

struct LaunchSpec {
  std::string name;  // as written at the launch site
  const void* kernel;
  dim3 grid, block;
  size_t dynamic_smem;
  size_t param_bytes;
};

// Runs `body` (the kernel call) for every thread of every block.
void run_grid(const LaunchSpec& spec, const std::function<void()>& body);

// Byte size of a kernel's parameter buffer, laid out as CUDA lays it out.
template <typename... P>
constexpr size_t param_bytes() {
  size_t off = 0;
  ((off = (off + alignof(P) - 1) / alignof(P) * alignof(P) + sizeof(P)), ...);
  return off;
}

// kernel<<<grid, block, smem, stream>>>(args...) as
// Launch(name, kernel, grid, block, smem, stream)(args...).
template <typename... P>
class Launch {
 public:
  Launch(const char* name, void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, int /*stream*/)
      : name_(name), kernel_(kernel), grid_(grid), block_(block), smem_(smem) {}

  template <typename... A>
  void operator()(A&&... args) const {
    static_assert(sizeof...(A) == sizeof...(P), "wrong number of kernel arguments");
    // The arguments are converted and copied once, as cudaLaunchKernel copies
    // them into the parameter buffer; each thread gets them by value.
    const std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
    LaunchSpec spec{clean_name(name_), reinterpret_cast<const void*>(kernel_), grid_, block_, smem_,
                    param_bytes<std::decay_t<P>...>()};
    auto* kernel = kernel_;
    run_grid(spec, [&params, kernel]() { std::apply(kernel, params); });
  }

 private:
  static std::string clean_name(const char* s) {
    std::string n(s);
    if (n.size() >= 2 && n.front() == '(' && n.back() == ')') n = n.substr(1, n.size() - 2);
    return n;
  }
  const char* name_;
  void (*kernel_)(P...);
  dim3 grid_, block_;
  size_t smem_;
};

}  // namespace pe_emu

#define threadIdx (::pe_emu::g_thread_idx)
#define blockIdx (::pe_emu::g_block_idx)
#define blockDim (::pe_emu::g_block_dim)
#define gridDim (::pe_emu::g_grid_dim)

// The line of the call site identifies the barrier: threads waiting at two
// different __syncthreads are a divergent barrier.
inline void __syncthreads(int line = __builtin_LINE()) { ::pe_emu::syncthreads(line); }

template <typename T>
T pe_emu_shuffle(unsigned mask, T v, int src, int line, const char* what) {
  static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 8, "shuffle of an unsupported type");
  T out;
  ::pe_emu::warp_exchange(mask, &v, sizeof(T), src, &out, line, what);
  return out;
}

// A source lane outside the caller's width-segment reads the caller's own value.
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32, int line = __builtin_LINE()) {
  const int lane = ::pe_emu::lane_id();
  int src = lane ^ lane_mask;
  if (src / width != lane / width || src >= 32) src = lane;
  return pe_emu_shuffle(mask, v, src, line, "__shfl_xor_sync");
}

template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32, int line = __builtin_LINE()) {
  const int lane = ::pe_emu::lane_id();
  int src = lane + static_cast<int>(delta);
  if (lane % width + static_cast<int>(delta) >= width) src = lane;
  return pe_emu_shuffle(mask, v, src, line, "__shfl_down_sync");
}

template <typename T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32, int line = __builtin_LINE()) {
  const int lane = ::pe_emu::lane_id();
  int src = lane - static_cast<int>(delta);
  if (lane % width < static_cast<int>(delta)) src = lane;
  return pe_emu_shuffle(mask, v, src, line, "__shfl_up_sync");
}

template <typename T>
T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32, int line = __builtin_LINE()) {
  const int lane = ::pe_emu::lane_id();
  const int src = lane / width * width + ((src_lane % width) + width) % width;
  return pe_emu_shuffle(mask, v, src, line, "__shfl_sync");
}

inline void __syncwarp(unsigned mask = 0xffffffffu, int line = __builtin_LINE()) {
  pe_emu_shuffle(mask, 0, ::pe_emu::lane_id(), line, "__syncwarp");
}
