// The CUDA emulator's runtime: fibers, the block scheduler and its strict
// checks, shared memory, launch statistics (see emu.h).
#include "cuda_emu/emu.h"

#include <sys/mman.h>
#if !defined(__x86_64__)
#include <ucontext.h>
#endif

#include <algorithm>
#include <map>
#include <mutex>
#include <numeric>
#include <random>
#include <sstream>
#include <stdexcept>
#include <vector>

#include "cuda_emu/emu_runtime.h"

namespace pe_emu {

uint3 g_thread_idx;
uint3 g_block_idx;
dim3 g_block_dim;
dim3 g_grid_dim;

namespace {

constexpr size_t kStack = 64 * 1024;  // per fiber; kernels keep little on the stack
constexpr size_t kGuard = 4096;       // a PROT_NONE page below each stack
constexpr size_t kCanary = 256;       // bytes after the dynamic shared memory
constexpr unsigned char kFill = 0xff;    // NaN in every floating type, -1 in integers
constexpr unsigned char kCanaryByte = 0xa5;

// ---------------------------------------------------------------------------
// Fiber contexts. x86-64: a minimal switch (callee-saved registers, MXCSR and
// the x87 control word; no signal-mask system call as in swapcontext).
// Elsewhere: ucontext.
// ---------------------------------------------------------------------------

#if defined(__x86_64__)

extern "C" void pe_emu_switch(void** save_sp, void* load_sp);
asm(R"(
.text
.p2align 4
.globl pe_emu_switch
.hidden pe_emu_switch
.type pe_emu_switch,@function
pe_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size pe_emu_switch,.-pe_emu_switch
)");

struct Context {
  void* sp = nullptr;
};

// A stack that pe_emu_switch "returns" into `entry` (which never returns).
void make_context(Context& c, unsigned char* stack, size_t size, void (*entry)()) {
  uint64_t* top = reinterpret_cast<uint64_t*>(reinterpret_cast<uintptr_t>(stack + size) & ~uintptr_t{15});
  top[-1] = 0;                                   // entry's return address: none
  top[-2] = reinterpret_cast<uint64_t>(entry);   // popped by ret (16-byte aligned slot)
  for (int k = 3; k <= 8; ++k) top[-k] = 0;      // rbp, rbx, r12..r15
  uint32_t csr[2];
  asm volatile("stmxcsr %0" : "=m"(csr[0]));
  asm volatile("fnstcw %0" : "=m"(csr[1]));
  std::memcpy(&top[-9], csr, 8);
  c.sp = &top[-9];
}

inline void switch_context(Context& from, Context& to) { pe_emu_switch(&from.sp, to.sp); }

#else

struct Context {
  ucontext_t uc;
};

__attribute__((noinline)) void make_context(Context& c, unsigned char* stack, size_t size, void (*entry)()) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = size;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
}

inline void switch_context(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }

#endif

enum class St : uint8_t { Runnable, Barrier, Warp, Done, Failed };

struct Fiber {
  Context ctx;
  St st = St::Runnable;
  int line = 0;               // of the barrier / shuffle it waits at
  const char* what = nullptr;  // the shuffle's name
  unsigned mask = 0;
  uint32_t warp_seq = 0;  // warp operations completed
  uint3 tid{0, 0, 0};
  int linear = 0;
};

struct Block {
  std::vector<Fiber> fibers;
  std::vector<uint64_t> warp_vals;  // [warp][2][32]: a double buffer per warp
  std::vector<unsigned char> smem;  // dynamic, then the canary, then static arrays
  size_t dynamic = 0;
  size_t limit = 0;                 // static + dynamic bytes allowed
  size_t static_used = 0;
  std::map<int, size_t> static_at;  // declaration line -> offset after the canary
  std::string error;
};

struct Runtime {
  std::mutex mu;
  Device dev;
  std::map<std::string, int64_t> counts;
  std::map<const void*, int64_t> max_dynamic;  // cudaFuncSetAttribute requests
  uint64_t launches = 0;
  // Stacks: one mapping, reused by every block.
  unsigned char* stacks = nullptr;
  size_t nstacks = 0;
  Context sched;
  Fiber* cur = nullptr;
  Block* blk = nullptr;
  const std::function<void()>* body = nullptr;
};

Runtime& rt() {
  static Runtime* r = new Runtime();
  return *r;
}

void ensure_stacks(size_t n) {
  Runtime& r = rt();
  if (n <= r.nstacks) return;
  if (r.stacks != nullptr) munmap(r.stacks, r.nstacks * (kStack + kGuard));
  const size_t bytes = n * (kStack + kGuard);
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) throw std::runtime_error("cuda_emu: cannot map fiber stacks");
  r.stacks = static_cast<unsigned char*>(p);
  r.nstacks = n;
  for (size_t i = 0; i < n; ++i) mprotect(r.stacks + i * (kStack + kGuard), kGuard, PROT_NONE);
}

void fiber_main() {
  Runtime& r = rt();
  (*r.body)();
  r.cur->st = St::Done;
  switch_context(r.cur->ctx, r.sched);
}

void yield_to_scheduler() {
  Runtime& r = rt();
  switch_context(r.cur->ctx, r.sched);
}

// Records an error detected inside a fiber and never returns.
[[noreturn]] void fail_in_fiber(const std::string& msg) {
  Runtime& r = rt();
  r.blk->error = msg;
  r.cur->st = St::Failed;
  yield_to_scheduler();
  __builtin_unreachable();
}

std::string where(const LaunchSpec& s) {
  std::ostringstream o;
  o << "cuda_emu: kernel " << s.name << " <<<(" << s.grid.x << "," << s.grid.y << "," << s.grid.z << "), ("
    << s.block.x << "," << s.block.y << "," << s.block.z << "), " << s.dynamic_smem << ">>>";
  return o.str();
}

std::string thread_name(const Fiber& f) {
  std::ostringstream o;
  o << "thread (" << f.tid.x << "," << f.tid.y << "," << f.tid.z << ")";
  return o.str();
}

std::string state_name(const Fiber& f) {
  switch (f.st) {
    case St::Done: return "it has exited";
    case St::Barrier: return "it waits at __syncthreads on line " + std::to_string(f.line);
    case St::Warp:
      return std::string("it waits at ") + f.what + " on line " + std::to_string(f.line);
    default: return "it is running";
  }
}

// Releases the warps whose shuffle every named lane has reached; an error
// when a named lane cannot arrive. Returns whether any warp was released.
bool resolve_warps(Block& b, int nthreads) {
  bool released = false;
  for (int i = 0; i < nthreads; ++i) {
    Fiber& f = b.fibers[i];
    if (f.st != St::Warp) continue;
    const int base = i / 32 * 32;
    const int lane = i % 32;
    auto named = [&](int l) {
      std::ostringstream o;
      o << f.what << " on line " << f.line << " by lane " << lane << " (" << thread_name(f) << ") has mask 0x"
        << std::hex << f.mask << std::dec << ", which names lane " << l;
      return o.str();
    };
    for (int l = 0; l < 32; ++l) {
      if (!((f.mask >> l) & 1u)) continue;
      const int j = base + l;
      if (j >= nthreads) throw std::runtime_error(named(l) + ", but the block has no such thread");
      const Fiber& g = b.fibers[j];
      if (g.st != St::Warp) throw std::runtime_error(named(l) + ", which never arrives: " + state_name(g));
      if (g.warp_seq != f.warp_seq || g.mask != f.mask || g.line != f.line) {
        std::ostringstream o;
        o << named(l) << ", which waits at " << g.what << " on line " << g.line << " with mask 0x" << std::hex
          << g.mask << std::dec << " (a different warp operation)";
        throw std::runtime_error(o.str());
      }
    }
    for (int l = 0; l < 32; ++l) {
      if ((f.mask >> l) & 1u) b.fibers[base + l].st = St::Runnable;
    }
    released = true;
  }
  return released;
}

void release_barrier(Block& b, int nthreads) {
  int waiting = -1;
  std::vector<int> exited;
  for (int i = 0; i < nthreads; ++i) {
    const Fiber& f = b.fibers[i];
    if (f.st == St::Done) {
      exited.push_back(i);
    } else if (waiting < 0) {
      waiting = i;
    } else if (f.line != b.fibers[waiting].line) {
      std::ostringstream o;
      o << "divergent barrier: " << thread_name(b.fibers[waiting]) << " waits at __syncthreads on line "
        << b.fibers[waiting].line << " but " << thread_name(f) << " at __syncthreads on line " << f.line;
      throw std::runtime_error(o.str());
    }
  }
  if (!exited.empty()) {
    std::ostringstream o;
    o << "__syncthreads on line " << b.fibers[waiting].line << " is not reached by every thread of the block: "
      << exited.size() << " of " << nthreads << " threads exited without it (first: "
      << thread_name(b.fibers[exited.front()]) << "); the waiting threads would deadlock";
    throw std::runtime_error(o.str());
  }
  for (int i = 0; i < nthreads; ++i) b.fibers[i].st = St::Runnable;
}

// Static arrays: past the dynamic part and its canary, 16-byte aligned.
size_t static_offset(size_t dynamic) { return (dynamic + kCanary + 15) / 16 * 16; }
unsigned char* static_base(Block& b) { return b.smem.data() + static_offset(b.dynamic); }

void run_block(Block& b, int nthreads, std::mt19937_64& rng) {
  Runtime& r = rt();
  std::fill(b.smem.begin(), b.smem.begin() + b.dynamic, kFill);
  std::fill(b.smem.begin() + b.dynamic, b.smem.begin() + b.dynamic + kCanary, kCanaryByte);
  b.static_at.clear();
  b.static_used = 0;
  const dim3 bd = g_block_dim;
  for (int i = 0; i < nthreads; ++i) {
    Fiber& f = b.fibers[i];
    f.st = St::Runnable;
    f.warp_seq = 0;
    f.linear = i;
    f.tid = uint3{i % bd.x, i / bd.x % bd.y, i / (bd.x * bd.y)};
    make_context(f.ctx, r.stacks + i * (kStack + kGuard) + kGuard, kStack, fiber_main);
  }
  std::vector<int> order;
  order.reserve(nthreads);
  for (;;) {
    order.clear();
    for (int i = 0; i < nthreads; ++i) {
      if (b.fibers[i].st == St::Runnable) order.push_back(i);
    }
    if (!order.empty()) {
      std::shuffle(order.begin(), order.end(), rng);
      for (int i : order) {
        Fiber& f = b.fibers[i];
        r.cur = &f;
        g_thread_idx = f.tid;
        switch_context(r.sched, f.ctx);
        if (f.st == St::Failed) throw std::runtime_error(thread_name(f) + ": " + b.error);
      }
      continue;
    }
    bool all_done = true;
    for (int i = 0; i < nthreads && all_done; ++i) all_done = b.fibers[i].st == St::Done;
    if (all_done) break;
    if (resolve_warps(b, nthreads)) continue;
    release_barrier(b, nthreads);
  }
  for (size_t k = 0; k < kCanary; ++k) {
    if (b.smem[b.dynamic + k] != kCanaryByte) {
      throw std::runtime_error("wrote past the end of its " + std::to_string(b.dynamic) +
                               " bytes of dynamic shared memory (byte " + std::to_string(b.dynamic + k) + ")");
    }
  }
}

}  // namespace

Device& device() { return rt().dev; }

int lane_id() { return rt().cur->linear % 32; }

void syncthreads(int line) {
  Runtime& r = rt();
  r.cur->st = St::Barrier;
  r.cur->line = line;
  yield_to_scheduler();
}

void warp_exchange(unsigned mask, const void* value, size_t size, int src_lane, void* out, int line,
                   const char* what) {
  Runtime& r = rt();
  Fiber& f = *r.cur;
  const int lane = f.linear % 32;
  const int warp = f.linear / 32;
  if (!((mask >> lane) & 1u)) {
    std::ostringstream o;
    o << what << " on line " << line << ": lane " << lane << " calls it with mask 0x" << std::hex << mask
      << ", which does not name the lane itself";
    fail_in_fiber(o.str());
  }
  uint64_t* vals = r.blk->warp_vals.data() + warp * 64;
  const uint32_t slot = f.warp_seq & 1u;
  uint64_t word = 0;
  std::memcpy(&word, value, size);
  vals[slot * 32 + lane] = word;
  f.st = St::Warp;
  f.mask = mask;
  f.line = line;
  f.what = what;
  yield_to_scheduler();
  // Every lane of the mask has deposited its value for this operation.
  if (!((mask >> src_lane) & 1u)) {
    std::ostringstream o;
    o << what << " on line " << line << ": lane " << lane << " reads lane " << src_lane << ", which mask 0x"
      << std::hex << mask << " does not name (undefined on a GPU)";
    fail_in_fiber(o.str());
  }
  word = vals[slot * 32 + src_lane];
  std::memcpy(out, &word, size);
  ++f.warp_seq;
}

unsigned char* dynamic_smem() { return rt().blk->smem.data(); }

void* static_smem(size_t size, size_t align, int key) {
  Block& b = *rt().blk;
  auto it = b.static_at.find(key);
  if (it == b.static_at.end()) {
    const size_t off = (b.static_used + align - 1) / align * align;
    if (off + size + b.dynamic > b.limit) {
      fail_in_fiber("static shared memory (" + std::to_string(off + size) + " bytes) plus dynamic (" +
                    std::to_string(b.dynamic) + ") exceeds the block's limit of " + std::to_string(b.limit) +
                    " bytes");
    }
    b.static_used = off + size;
    it = b.static_at.emplace(key, off).first;
    std::memset(static_base(b) + off, kFill, size);
  }
  return static_base(b) + it->second;
}

void set_max_dynamic_smem(const void* kernel, int64_t bytes) {
  Runtime& r = rt();
  const int64_t optin = r.dev.smem_per_block_optin;
  if (bytes < 0 || bytes > optin) {
    throw std::runtime_error("cuda_emu: cudaFuncSetAttribute(MaxDynamicSharedMemorySize, " + std::to_string(bytes) +
                             ") exceeds the device's opt-in limit of " + std::to_string(optin) + " bytes");
  }
  r.max_dynamic[kernel] = bytes;
}

void run_grid(const LaunchSpec& spec, const std::function<void()>& body) {
  Runtime& r = rt();
  std::lock_guard<std::mutex> lock(r.mu);
  const Device& d = r.dev;
  const uint64_t threads = uint64_t{spec.block.x} * spec.block.y * spec.block.z;
  const uint64_t blocks = uint64_t{spec.grid.x} * spec.grid.y * spec.grid.z;
  auto fail = [&](const std::string& why) { throw std::runtime_error(where(spec) + ": " + why); };
  if (threads == 0 || spec.block.x > 1024 || spec.block.y > 1024 || spec.block.z > 64 ||
      threads > static_cast<uint64_t>(d.max_threads_per_block)) {
    fail("invalid block: " + std::to_string(threads) + " threads (the device allows 1.." +
         std::to_string(d.max_threads_per_block) + ", x and y at most 1024, z at most 64)");
  }
  if (blocks == 0 || spec.grid.x > 2147483647u || spec.grid.y > 65535 || spec.grid.z > 65535) {
    fail("invalid grid (x must be 1..2^31-1, y and z 1..65535)");
  }
  if (spec.param_bytes > 4096) {
    fail("kernel parameters take " + std::to_string(spec.param_bytes) + " bytes, over the 4 KB limit");
  }
  int64_t limit = d.smem_per_block;
  auto attr = r.max_dynamic.find(spec.kernel);
  if (attr != r.max_dynamic.end()) limit = std::max(limit, attr->second);
  if (static_cast<int64_t>(spec.dynamic_smem) > limit) {
    fail(std::to_string(spec.dynamic_smem) + " bytes of dynamic shared memory, over the " +
         std::to_string(limit) + " bytes allowed" +
         (attr == r.max_dynamic.end() ? " without cudaFuncSetAttribute(MaxDynamicSharedMemorySize)"
                                      : " by the kernel's MaxDynamicSharedMemorySize attribute"));
  }
  std::string base = spec.name.substr(0, spec.name.find('<'));
  base = base.substr(base.rfind(':') == std::string::npos ? 0 : base.rfind(':') + 1);
  ++r.counts[base];
  ++r.launches;

  ensure_stacks(threads);
  Block b;
  b.fibers.resize(threads);
  b.warp_vals.assign((threads + 31) / 32 * 64, 0);
  b.dynamic = spec.dynamic_smem;
  b.limit = static_cast<size_t>(limit);
  b.smem.assign(static_offset(b.dynamic) + b.limit, 0);
  r.blk = &b;
  r.body = &body;
  g_block_dim = spec.block;
  g_grid_dim = spec.grid;

  // Blocks run one after another, in a shuffled order.
  std::mt19937_64 rng(d.seed * 0x9e3779b97f4a7c15ull + r.launches);
  std::vector<uint64_t> order(blocks);
  std::iota(order.begin(), order.end(), 0);
  std::shuffle(order.begin(), order.end(), rng);
  for (uint64_t bi : order) {
    g_block_idx = uint3{static_cast<unsigned>(bi % spec.grid.x), static_cast<unsigned>(bi / spec.grid.x % spec.grid.y),
                        static_cast<unsigned>(bi / (uint64_t{spec.grid.x} * spec.grid.y))};
    try {
      run_block(b, static_cast<int>(threads), rng);
    } catch (const std::exception& e) {
      r.blk = nullptr;
      fail("block (" + std::to_string(g_block_idx.x) + "," + std::to_string(g_block_idx.y) + "," +
           std::to_string(g_block_idx.z) + "): " + e.what());
    }
  }
  r.blk = nullptr;
}

// ---------------------------------------------------------------------------
// Control from Python (emu_runtime.h)
// ---------------------------------------------------------------------------

void configure(int sm_count, int64_t smem_per_block, int64_t smem_per_block_optin, int max_threads_per_block,
               int max_threads_per_sm, uint64_t seed) {
  Runtime& r = rt();
  std::lock_guard<std::mutex> lock(r.mu);
  r.dev.sm_count = sm_count;
  r.dev.smem_per_block = smem_per_block;
  r.dev.smem_per_block_optin = smem_per_block_optin;
  r.dev.max_threads_per_block = max_threads_per_block;
  r.dev.max_threads_per_sm = max_threads_per_sm;
  r.dev.seed = seed;
  r.max_dynamic.clear();
}

std::map<std::string, int64_t> launch_counts() {
  Runtime& r = rt();
  std::lock_guard<std::mutex> lock(r.mu);
  return r.counts;
}

void reset_launch_counts() {
  Runtime& r = rt();
  std::lock_guard<std::mutex> lock(r.mu);
  r.counts.clear();
}

}  // namespace pe_emu
