// Test-only switches that force a CPU code path the machine or the thread
// count would not pick on its own (tests/test_cpu_paths.py sets them through
// pyramid_ext._C._set_test_override). All are 0 (automatic choice) unless a
// test sets them; kernels read each once per call, never in inner loops.
#pragma once

#include <cstdint>
#include <string>

namespace pyramid_ext {
namespace test_overrides {

enum Switch : int {
  // simd_loops: 0 the best ISA the CPU has; else a simd::Isa value.
  kSimdIsa = 0,
  // 1: the AVX2 block kernels (block_cells.cpp, max_pool_nchw.cpp) are not
  // used, so float NCHW average pooling runs the portable simd::sum_rows
  // loops and max pooling simd::max_rows.
  kNoBlockKernel,
  // Average pooling, channels_last: 0 chosen from N and the thread count,
  // 1 one task per sample, 2 phases split over H-segments and channels.
  kChannelsLastAvgTasks,
  // Max pooling, channels_last float, forward and backward: the same choice
  // (max_pool.cpp; 2 splits the backward into zeroing by rows and adding by
  // channel chunks).
  kChannelsLastMaxTasks,
  // Max pooling with indices, channels_last float, one task per sample: 0
  // chosen from the plan (max_pool.cpp, Bins::direct), 1 bins always
  // combined from cells, 2 bins built from cells always scanned from their
  // windows' pixels instead.
  kChannelsLastMaxDirect,
  // 1: float channels_last average pooling sums its bins in double
  // (simd::bin_means / rect_means) even where the plan has float sum trees
  // (simd::tree_means).
  kNoSumTrees,
  // 1: float channels_last average pooling sums every one-run cell with
  // simd::cell_sum, also those it would sum by rows (wider than L1).
  kNoCellRows,
  // 1: simd::cell_sum sums cells of at most 2 x 2 pixels with its general
  // loop too (the same additions).
  kGeneralCellLoop,
  // Max pooling with indices, channels_last float: 0 cells and windows
  // scanned by rows where they are wide (max_pool.cpp, IndexedPhases::wide),
  // 1 never, 2 always (every cell and window, whatever its size).
  kMaxCellRows,
  // 1: large fresh outputs are written with plain stores, not streaming
  // ones (output_buffers::streamed is false).
  kNoStreamingStores,
  kNumSwitches
};

int64_t get(Switch s);
// Sets a switch by its name ("simd_isa", "no_block_kernel",
// "channels_last_avg_tasks", "channels_last_max_tasks",
// "channels_last_max_direct", "no_sum_trees", "no_cell_rows", "general_cell_loop", "max_cell_rows",
// "no_streaming_stores"); throws
// std::invalid_argument for an unknown name or a value this CPU cannot run.
void set(const std::string& name, int64_t value);
// "name=value" for every switch, comma separated.
std::string describe();

}  // namespace test_overrides
}  // namespace pyramid_ext
