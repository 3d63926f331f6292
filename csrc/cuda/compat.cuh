// What the CUDA sources need from CUDA and c10's CUDA layer, in one place, so
// that the same files compile two ways:
//  - with nvcc (the shipped extension): the real thing, kernels launched
//    with <<<grid, block, smem, stream>>>;
//  - with the host compiler and PYRAMID_EXT_CUDA_EMU defined (the test-only
//    emulated build, csrc/cuda_emu/): the emulator of csrc/cuda_emu/emu.h,
//    tensors on the CPU, ops registered in torch.ops.pyramid_ext_emu.
// Kernel bodies and launch configuration code are the same text in both.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>

#ifdef PYRAMID_EXT_CUDA_EMU

#include "cuda_emu/emu.h"

namespace pyramid_ext {
namespace cuda {

using Stream = int;
inline Stream current_stream() { return 0; }
struct DeviceGuard {
  explicit DeviceGuard(const at::Device&) {}
};
// The emulated device's tensors are CPU tensors.
inline bool on_device(const at::Tensor& t) { return t.is_cpu(); }
inline int sm_count() { return ::pe_emu::device().sm_count; }
inline int max_threads_per_sm() { return ::pe_emu::device().max_threads_per_sm; }
inline int64_t max_dynamic_smem() { return ::pe_emu::device().smem_per_block; }

}  // namespace cuda
}  // namespace pyramid_ext

// PE_LAUNCH((kernel<T...>), grid, block, smem, stream)(args...);
#define PE_LAUNCH(kernel, grid, block, smem, stream) ::pe_emu::Launch(#kernel, kernel, grid, block, smem, stream)
#define PE_KERNEL_LAUNCH_CHECK() static_cast<void>(0)
// extern __shared__ __align__(16) unsigned char name[];
#define PE_DYNAMIC_SHARED(name) unsigned char* const name = ::pe_emu::dynamic_smem()
// __shared__ type name dims;  (dims: e.g. [8][32])
#define PE_SHARED_ARRAY(type, name, dims)                                                 \
  using name##_pe_shared_t = type dims;                                                   \
  name##_pe_shared_t& name = *static_cast<name##_pe_shared_t*>(::pe_emu::static_smem( \
      sizeof(name##_pe_shared_t), alignof(name##_pe_shared_t), __LINE__))
#define PE_CUDA_LIBRARY_IMPL(m) TORCH_LIBRARY_IMPL(pyramid_ext_emu, CPU, m)

#else  // nvcc

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

namespace pyramid_ext {
namespace cuda {

using Stream = cudaStream_t;
inline Stream current_stream() { return at::cuda::getCurrentCUDAStream(); }
using DeviceGuard = c10::cuda::CUDAGuard;
inline bool on_device(const at::Tensor& t) { return t.is_cuda(); }
inline int sm_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }
inline int max_threads_per_sm() { return at::cuda::getCurrentDeviceProperties()->maxThreadsPerMultiProcessor; }
// Dynamic shared memory a kernel may use without an opt-in attribute (48 KB).
inline int64_t max_dynamic_smem() {
  return static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->sharedMemPerBlock);
}

}  // namespace cuda
}  // namespace pyramid_ext

#define PE_LAUNCH(kernel, grid, block, smem, stream) kernel<<<grid, block, smem, stream>>>
#define PE_KERNEL_LAUNCH_CHECK() C10_CUDA_KERNEL_LAUNCH_CHECK()
#define PE_DYNAMIC_SHARED(name) extern __shared__ __align__(16) unsigned char name[]
#define PE_SHARED_ARRAY(type, name, dims) __shared__ type name dims
#define PE_CUDA_LIBRARY_IMPL(m) TORCH_LIBRARY_IMPL(pyramid_ext, CUDA, m)

#endif
