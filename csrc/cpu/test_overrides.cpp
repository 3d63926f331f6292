#include "cpu/test_overrides.h"

#include <atomic>
#include <stdexcept>

#include "cpu/simd_loops.h"

namespace pyramid_ext {
namespace test_overrides {
namespace {

constexpr const char* kNames[kNumSwitches] = {"simd_isa", "no_block_kernel", "channels_last_avg_tasks",
                                               "channels_last_max_tasks", "channels_last_max_direct", "no_sum_trees",
                                               "no_cell_rows", "general_cell_loop", "max_cell_rows", "no_streaming_stores"};
std::atomic<int64_t> g_values[kNumSwitches];

}  // namespace

int64_t get(Switch s) { return g_values[s].load(std::memory_order_relaxed); }

void set(const std::string& name, int64_t value) {
  for (int s = 0; s < kNumSwitches; ++s) {
    if (name != kNames[s]) continue;
    const bool ok = s == kSimdIsa ? value == 0 || simd::isa_available(static_cast<simd::Isa>(value))
                                  : value >= 0 && value <= (s == kNoBlockKernel || s == kNoSumTrees || s == kNoCellRows ||
                                                                      s == kGeneralCellLoop || s == kNoStreamingStores
                                                                  ? 1
                                                                  : 2);
    if (!ok) throw std::invalid_argument("test override " + name + "=" + std::to_string(value) +
                                         " is not valid on this CPU");
    g_values[s].store(value, std::memory_order_relaxed);
    return;
  }
  throw std::invalid_argument("unknown test override: " + name);
}

std::string describe() {
  std::string out;
  for (int s = 0; s < kNumSwitches; ++s)
    out += std::string(s ? "," : "") + kNames[s] + "=" + std::to_string(get(static_cast<Switch>(s)));
  return out;
}

}  // namespace test_overrides
}  // namespace pyramid_ext
