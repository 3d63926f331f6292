#include "cpu/output_buffers.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/CPUAllocator.h>

#include <cstdlib>
#include <deque>
#include <mutex>
#include <new>
#include <string>
#include <vector>

#include "cpu/test_overrides.h"

#if defined(__linux__)
#include <pthread.h>
#include <sys/mman.h>
#endif

namespace pyramid_ext::output_buffers {
namespace {

constexpr size_t kHugePage = size_t(2) << 20;
// Below this glibc keeps freed memory in its heap (its mmap threshold grows
// to 32 MiB), and faulting a few MiB costs little: plain at::empty.
constexpr size_t kPooledBytes = size_t(8) << 20;
constexpr int64_t kDefaultLimitMiB = 1024;

struct Buffer {
  void* data;
  size_t bytes;  // a multiple of kHugePage
};

int64_t limit_from_env() {
  const char* text = std::getenv("PYRAMID_EXT_CPU_CACHE_LIMIT_MB");
  if (text == nullptr || *text == '\0') return kDefaultLimitMiB << 20;
  char* end = nullptr;
  const long long mib = std::strtoll(text, &end, 10);
  TORCH_CHECK_VALUE(end != text && *end == '\0' && mib >= 0,
                    "PYRAMID_EXT_CPU_CACHE_LIMIT_MB must be a number of MiB >= 0, got '", text, "'");
  return static_cast<int64_t>(mib) << 20;
}

// Freed buffers, oldest first; allocation takes the newest of the right size.
class Cache {
 public:
  Cache() : limit_(limit_from_env()) {}

  Buffer take(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (auto it = free_.rbegin(); it != free_.rend(); ++it) {
        if (it->bytes != bytes) continue;
        const Buffer found = *it;
        free_.erase(std::next(it).base());
        cached_bytes_ -= static_cast<int64_t>(bytes);
        ++hits_;
        return found;
      }
      ++misses_;
    }
    return map_new(bytes);
  }

  void give_back(Buffer buffer) {
    std::vector<Buffer> evicted;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (static_cast<int64_t>(buffer.bytes) > limit_) {
        evicted.push_back(buffer);
      } else {
        free_.push_back(buffer);
        cached_bytes_ += static_cast<int64_t>(buffer.bytes);
        evict_over_limit(evicted);
      }
    }
    for (const Buffer& b : evicted) std::free(b.data);
  }

  Stats stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    return {limit_, cached_bytes_, static_cast<int64_t>(free_.size()), hits_, misses_};
  }

  int64_t set_limit(int64_t bytes) {
    TORCH_CHECK_VALUE(bytes >= 0, "set_cpu_cache_limit: limit_bytes must be >= 0, got ", bytes);
    std::vector<Buffer> evicted;
    int64_t previous;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      previous = limit_;
      limit_ = bytes;
      evict_over_limit(evicted);
    }
    for (const Buffer& b : evicted) std::free(b.data);
    return previous;
  }

  int64_t release_all() {
    std::deque<Buffer> released;
    int64_t bytes;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      released.swap(free_);
      bytes = cached_bytes_;
      cached_bytes_ = 0;
    }
    for (const Buffer& b : released) std::free(b.data);
    return bytes;
  }

  // A child of fork() may inherit the lock held by a thread that no longer
  // exists there: start it with a fresh lock and the inherited buffers.
  void reset_lock_after_fork() { new (&mutex_) std::mutex(); }

 private:
  static Buffer map_new(size_t bytes) {
    void* data = nullptr;
    if (posix_memalign(&data, kHugePage, bytes) != 0 || data == nullptr) {
      c10::profiledCPUMemoryReporter().OutOfMemory(bytes);
      TORCH_CHECK_WITH(OutOfMemoryError, false, "pyramid_ext: CPU out of memory: tried to allocate ", bytes,
                       " bytes for an output");
    }
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    // Advice only: without THP support nothing changes.
    (void)madvise(data, bytes, MADV_HUGEPAGE);
#endif
    return {data, bytes};
  }

  void evict_over_limit(std::vector<Buffer>& evicted) {
    while (cached_bytes_ > limit_ && !free_.empty()) {
      evicted.push_back(free_.front());
      cached_bytes_ -= static_cast<int64_t>(free_.front().bytes);
      free_.pop_front();
    }
  }

  std::mutex mutex_;
  std::deque<Buffer> free_;
  int64_t limit_;
  int64_t cached_bytes_ = 0;
  int64_t hits_ = 0;
  int64_t misses_ = 0;
};

// Never destroyed: tensors may be freed during interpreter shutdown, after
// static destructors would have run.
Cache& cache() {
  static Cache* instance = [] {
    auto* c = new Cache();
#if defined(__linux__)
    pthread_atfork(nullptr, nullptr, [] { cache().reset_lock_after_fork(); });
#endif
    return c;
  }();
  return *instance;
}

void delete_buffer(void* ctx) {
  auto* buffer = static_cast<Buffer*>(ctx);
  c10::profiledCPUMemoryReporter().Delete(buffer->data);
  cache().give_back(*buffer);
  delete buffer;
}

// Storage of our outputs keeps this allocator, so resizing one still works.
class CachingAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    if (n < kPooledBytes) return c10::GetCPUAllocator()->allocate(n);
    const size_t bytes = (n + kHugePage - 1) / kHugePage * kHugePage;
    auto* buffer = new Buffer(cache().take(bytes));
    c10::profiledCPUMemoryReporter().New(buffer->data, n);
    return {buffer->data, buffer, &delete_buffer, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

CachingAllocator g_allocator;

}  // namespace

at::Tensor empty(c10::IntArrayRef sizes, const at::TensorOptions& options, at::MemoryFormat fmt) {
  TORCH_INTERNAL_ASSERT(options.device().is_cpu());
  return at::detail::empty_generic(sizes, &g_allocator, c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   c10::typeMetaToScalarType(options.dtype()), fmt);
}

at::Tensor empty_like_dense(const at::Tensor& like) {
  TORCH_INTERNAL_ASSERT(like.device().is_cpu() && like.is_non_overlapping_and_dense());
  return at::detail::empty_strided_generic(like.sizes(), like.strides(), &g_allocator,
                                           c10::DispatchKeySet(c10::DispatchKey::CPU), like.scalar_type());
}

bool streamed(const at::Tensor& t, int64_t run, size_t min_bytes) {
  return t.nbytes() >= min_bytes && t.has_storage() && t.storage().data_ptr().get_deleter() == &delete_buffer &&
         reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 64 == 0 && run * t.element_size() % 64 == 0 &&
         !test_overrides::get(test_overrides::kNoStreamingStores);
}

Stats stats() { return cache().stats(); }

int64_t set_limit(int64_t bytes) { return cache().set_limit(bytes); }

int64_t release_cached() { return cache().release_all(); }

}  // namespace pyramid_ext::output_buffers
