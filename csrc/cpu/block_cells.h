// Segment-cell sums of a block of NCHW float planes, vector over the block
// (see block_cells.cpp). Used by the average-pooling forward when the CPU
// has AVX2; the portable loops in multi_pool2d.cpp serve every other case.
#pragma once

#include <cstdint>

namespace pyramid_ext {
namespace simd {

constexpr int64_t kCellBlock = 8;    // planes per block (one transposed 8x8 tile)
constexpr int64_t kGroupPlanes = 32;  // planes per group: four blocks share the bin step

// The segment tables of one call, as the block kernel reads them. Rows are
// summed in runs of at most kRunLength rows, each within one H-segment
// (simd_loops.h: runs in float, everything after them in double).
struct CellBlock {
  int64_t W;
  int64_t SW;                // W-segments
  int64_t num_runs;          // runs of every H-segment some window reads, top to bottom
  const int64_t* run_h0;     // first row of each run
  const int64_t* run_rows;   // its rows (1 .. kRunLength)
  const int64_t* run_seg;    // its H-segment
  const char* run_first;     // is it the first run of its H-segment
  int64_t runs_per_pass;     // runs whose row sums the scratch holds at once
  const int64_t* col_seg;    // W: W-segment of each column, -1 if no window reads it
  const char* col_last;      // W: is the column the last of its W-segment
  int64_t prefetch_ahead;    // floats from a plane to the one to prefetch (0: none)
};

// Scratch floats cell_sums_8planes needs for its row sums.
inline int64_t cell_sums_scratch(const CellBlock& blk) {
  return kCellBlock * blk.runs_per_pass * ((blk.W + 7) / 8 * 8);
}

// One bin as a rectangle of cells: H-segments [a0, a1), W-segments [b0, b1).
struct CellRect {
  int64_t a0, a1, b0, b1;
  double area;  // elements in the bin
};

bool cell_sums_8planes_available();

// cells[(a * SW + b) * cell_stride + k] = sum of plane k over H-segment a
// and W-segment b (double), for k < 8 and every segment pair some window
// reads (others are left as they are). Per run, each column's rows are
// summed in float, then the run's columns of the W-segment left to right in
// float, kRunLength + 1 - (run rows) columns at a time, those chunks in
// double (from 0), and the result is added to the cell (the first run of a
// segment sets it). planes[k] points at plane k (H x W, row stride W);
// rows is scratch of cell_sums_scratch(blk) floats. Only call when
// cell_sums_8planes_available().
void cell_sums_8planes(const CellBlock& blk, const float* const planes[kCellBlock], double* cells,
                       int64_t cell_stride, float* rows);

// means[r * 32 + k] = (sum over the cells of rects[r], plane k, a-major,
// in double) / area, rounded to float, for the 32 planes of a group whose
// cells (cell stride 32, SW W-segments) cell_sums_8planes wrote. Same
// availability.
void bin_means_32planes(const double* cells, int64_t SW, const CellRect* rects, int64_t num_rects,
                        float* means);

}  // namespace simd
}  // namespace pyramid_ext
