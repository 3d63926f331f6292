// Large CPU outputs (the concatenated output, the gradient of x) come from a
// cache of buffers that earlier outputs of the same size freed.
//
// Why: a fresh large tensor pays one page fault per 4 KiB page on first touch
// (about 0.75 ms per MiB here), more than the kernels that fill it, and on a
// virtual machine even huge-page faults stall for 100+ ms when the host has
// reclaimed the memory a previous step freed. A training loop allocates the
// same output sizes every step, so a buffer freed by step k is the right
// buffer for step k+1, still mapped and resident: what the CUDA caching
// allocator does for GPU memory, limited here to our own large outputs.
//
// The cache holds at most `limit` bytes of freed buffers (default 1 GiB,
// PYRAMID_EXT_CPU_CACHE_LIMIT_MB, pyramid_ext.set_cpu_cache_limit); a buffer is
// only handed out again after its storage was freed, so no two live tensors
// share one. New buffers are 2 MiB aligned and advised as transparent huge
// pages (what c10 does for every tensor under THP_MEM_ALLOC_ENABLE=1).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace pyramid_ext::output_buffers {

// An uninitialized CPU tensor in `fmt`; from the cache when it is large.
at::Tensor empty(c10::IntArrayRef sizes, const at::TensorOptions& options,
                 at::MemoryFormat fmt);

// An uninitialized CPU tensor with `like`'s sizes and strides (`like` dense).
at::Tensor empty_like_dense(const at::Tensor& like);

// Whether the kernels write t with streaming stores (simd_loops_body.inc
// store_or_stream) in contiguous runs of `run` elements from its start: t's
// memory is one of the cache's buffers (a large output of ours, fresh this
// call, which a buffer freed a step ago is not expected to be in the CPU
// caches), 64-byte aligned, and every run is whole 64-byte lines (a line
// streamed in pieces is written to memory in pieces); unless the test switch
// no_streaming_stores is set; and t is min_bytes or larger (the caller's
// measured floor: below it the output may still be in L3 when written).
bool streamed(const at::Tensor& t, int64_t run, size_t min_bytes = 0);

struct Stats {
  int64_t limit_bytes;     // most bytes of freed buffers kept
  int64_t cached_bytes;    // bytes of freed buffers kept now
  int64_t cached_buffers;  // how many
  int64_t hits;            // large allocations served from the cache
  int64_t misses;          // large allocations that mapped new memory
};

Stats stats();
// Sets the limit (0 disables the cache) and returns the previous one.
int64_t set_limit(int64_t bytes);
// Frees every cached buffer; returns the bytes freed.
int64_t release_cached();

}  // namespace pyramid_ext::output_buffers
