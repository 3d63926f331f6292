// CPU kernels of multi_pool2d and its backward.
//
// Forward: every level's windows in one pass over x. The window boundaries
// cut each axis into segments (pyramid_index.h). NCHW: the rows of one
// H-segment are summed (or maxed) into a row accumulator with contiguous
// vector operations, the accumulator is reduced into segment cells, and the
// cells are combined into the windows of every level. channels_last: the same
// with a vector of channels in place of each element. Average pooling sums
// float elements in runs of at most simd::kRunLength rows (pixels) in float
// and everything after the runs (cells, bins) in double, but for the bins of
// small channels_last float maps, which are trees of float additions no
// deeper than the runs allow (build_sum_trees): the error bound of a mean
// over up to 2^31 elements is in simd_loops.h.
// Backward: avg gradients are constant over a segment cell, so each cell's
// value is computed once and then written; max gradients are summed per plane
// in a fixed order (level, then bin), the order a gather would use.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <type_traits>
#include <utility>
#include <vector>

#include "cpu/block_cells.h"
#include "cpu/max_pool.h"
#include "cpu/output_buffers.h"
#include "cpu/scratch.h"
#include "cpu/simd_loops.h"
#include "cpu/test_overrides.h"
#include "pool_plan.h"
#include "pyramid_index.h"

namespace pyramid_ext {
namespace {

// One bin: its level and position, the cells it covers, and its area.
struct BinRect {
  int64_t l, i, j, a0, a1, b0, b1, area;
  int64_t out_offset;  // packed index of channel 0 within a sample
  int64_t c_stride;    // packed index step per channel
};

struct SumTrees;

// The window plan of one call (pool_plan.h: segment tables per axis and, per
// level, its bin counts, first windows and offset in a sample), with every
// bin's cell rectangle, in packed order, and the level layout.
struct PoolPlan : WindowPlan {
  std::vector<BinRect> rects;  // every bin, in packed order
  bool channels_last_levels = false;

  int64_t out_index(int64_t l, int64_t c, int64_t i, int64_t j) const {
    return packed_index(offset[l], channels, bh[l], bw[l], c, i, j,
                        channels_last_levels);
  }
  // Window extents in segments and in elements.
  int64_t a0(int64_t l, int64_t i) const { return h.seg_begin[win_h0[l] + i]; }
  int64_t a1(int64_t l, int64_t i) const { return h.seg_end[win_h0[l] + i]; }
  int64_t b0(int64_t l, int64_t j) const { return w.seg_begin[win_w0[l] + j]; }
  int64_t b1(int64_t l, int64_t j) const { return w.seg_end[win_w0[l] + j]; }
  int64_t area(int64_t l, int64_t i, int64_t j) const {
    return (h.cuts[a1(l, i)] - h.cuts[a0(l, i)]) *
           (w.cuts[b1(l, j)] - w.cuts[b0(l, j)]);
  }
  // The float max kernels' bins (max_pool.h), built by the first call that
  // needs them.
  const max_pool::Bins& max_bins() const;
  // channels_last average pooling's tables (SumTrees, below), built by the
  // first call that needs them (not for max or NCHW calls).
  const SumTrees& sum_trees() const;

 private:
  mutable std::once_flag max_bins_once_;
  mutable std::shared_ptr<const max_pool::Bins> max_bins_;
  mutable std::once_flag sum_trees_once_;
  mutable std::shared_ptr<const SumTrees> sum_trees_;
};

// channels_last average pooling: whether cell (a, b) (at a * SW + b) is one
// float run (avg_forward_channels_last), and, for float, the bins as trees
// of float additions (simd::tree_means; empty where some element would pass
// more than simd::kRunLength - 1 float roundings).
struct SumTrees {
  std::vector<char> one_run_cells;
  std::vector<int32_t> ops;  // simd::tree_means' program
  int64_t num_sums = 0;      // the sums it stores
  std::vector<simd::TreeOut> outs;
};

// Nodes of simd::tree_means (cells and sums) at most: their 16-channel
// scratch (64 bytes a node, 32 KB here) stays in L1.
constexpr int64_t kTreeMaxNodes = 512;

// The float roundings an element of a one-run cell of w pixels by h rows
// has passed: its row's group sums, then the h - 1 row sums added to the run.
int64_t one_run_depth(int64_t h, int64_t w) { return simd::row_sum_depth(w) + h - 1; }

// one_run_cells, and the bins' sum trees: each bin (a0, a1, b0, b1) a sum
// of two rectangles split along a row or column cut, each node built once
// and shared by every bin that contains it. The bins are built smallest
// first; each takes, among the splits at its middle row or column and those
// that leave a node already built as one part, the split with the fewest
// new sums (ties: the shallower), recursively, so a pyramid's coarse bins
// reuse its fine ones: 202 sums for bins (1, 2, 3, 6) over a 16 x 16 map
// against 270 for halves only (rows first, then cells), about a quarter
// less of simd::tree_means' work. A split is taken only where every element
// of the node passes at most kRunLength - 1 float roundings in all (its
// cell's, cells that are not one run counting as that many already, and
// the tree's: simd_loops.h, the error bound); a bin with no such split is
// built from its halves, and the trees are dropped (double sums instead)
// where that is too deep.
SumTrees build_sum_trees(const PoolPlan& p) {
  SumTrees t;
  constexpr int64_t kWide = simd::kRunLength - 1;
  const int64_t SH = p.h.num_segments(), SW = p.w.num_segments(), num_cells = SH * SW;
  t.one_run_cells.assign(static_cast<size_t>(num_cells), 0);
  std::vector<int64_t> depth(static_cast<size_t>(num_cells));
  for (int64_t a = 0; a < SH; ++a)
    for (int64_t b = 0; b < SW; ++b) {
      const int64_t h = p.h.cuts[a + 1] - p.h.cuts[a], w = p.w.cuts[b + 1] - p.w.cuts[b];
      const bool one_run = w <= kWide && h <= kWide - simd::row_sum_depth(w);
      t.one_run_cells[a * SW + b] = one_run;
      depth[a * SW + b] = one_run ? one_run_depth(h, w) : kWide;
    }
  if (num_cells > kTreeMaxNodes) return t;
  using Rect = std::array<int64_t, 4>;  // a0, a1, b0, b1 (cells)
  std::map<Rect, int32_t> built;
  // Built nodes by their span of columns (b0, b1) -> rows (a0, a1), and by
  // rows -> columns: the splits that leave one of them whole.
  std::map<std::pair<int64_t, int64_t>, std::vector<std::pair<int64_t, int64_t>>> by_cols, by_rows;
  std::vector<int32_t> ops;
  bool fits = true;
  auto node_of = [&](const Rect& r) -> int32_t {
    if (r[1] - r[0] == 1 && r[3] - r[2] == 1) return static_cast<int32_t>(r[0] * SW + r[2]);
    const auto it = built.find(r);
    return it == built.end() ? -1 : it->second;
  };
  auto middle = [](const Rect& r, bool rows) {
    return rows ? r[0] + (r[1] - r[0] + 1) / 2 : r[2] + (r[3] - r[2] + 1) / 2;
  };
  auto parts = [](const Rect& r, bool rows, int64_t at) -> std::array<Rect, 2> {
    if (rows) return {Rect{r[0], at, r[2], r[3]}, Rect{at, r[1], r[2], r[3]}};
    return {Rect{r[0], r[1], r[2], at}, Rect{r[0], r[1], at, r[3]}};
  };
  auto add = [&](const Rect& r, int32_t l, int32_t rr) -> int32_t {
    ops.push_back(l);
    ops.push_back(rr);
    depth.push_back(std::max(depth[l], depth[rr]) + 1);
    fits = fits && depth.back() <= kWide;
    const int32_t id = static_cast<int32_t>(depth.size() - 1);
    built[r] = id;
    by_cols[{r[2], r[3]}].push_back({r[0], r[1]});
    by_rows[{r[0], r[1]}].push_back({r[2], r[3]});
    return id;
  };
  // The fewest new sums that make r (and their depth), by the splits above.
  struct Choice {
    int64_t sums = 0, depth = 0;
    bool rows = false;
    int64_t at = -1;  // -1: r exists already; -2: no split fits
  };
  std::function<Choice(const Rect&, std::map<Rect, Choice>&)> best = [&](const Rect& r,
                                                                           std::map<Rect, Choice>& memo) -> Choice {
    if (const int32_t id = node_of(r); id >= 0) return Choice{0, depth[id], false, -1};
    if (const auto it = memo.find(r); it != memo.end()) return it->second;
    std::vector<std::pair<bool, int64_t>> splits;
    if (r[1] - r[0] > 1) splits.push_back({true, middle(r, true)});
    if (r[3] - r[2] > 1) splits.push_back({false, middle(r, false)});
    if (const auto it = by_cols.find({r[2], r[3]}); it != by_cols.end())
      for (const auto& [a0, a1] : it->second) {
        if (a0 == r[0] && a1 < r[1]) splits.push_back({true, a1});
        if (a1 == r[1] && a0 > r[0]) splits.push_back({true, a0});
      }
    if (const auto it = by_rows.find({r[0], r[1]}); it != by_rows.end())
      for (const auto& [b0, b1] : it->second) {
        if (b0 == r[2] && b1 < r[3]) splits.push_back({false, b1});
        if (b1 == r[3] && b0 > r[2]) splits.push_back({false, b0});
      }
    Choice c{0, 0, false, -2};
    for (const auto& [rows, at] : splits) {
      const auto [x, y] = parts(r, rows, at);
      const Choice l = best(x, memo), rr = best(y, memo);
      if (l.at == -2 || rr.at == -2) continue;
      const Choice e{1 + l.sums + rr.sums, std::max(l.depth, rr.depth) + 1, rows, at};
      if (e.depth > kWide) continue;
      if (c.at == -2 || e.sums < c.sums || (e.sums == c.sums && e.depth < c.depth)) c = e;
    }
    return memo[r] = c;
  };
  // r built by best's choices, or, memo null, from its halves (rows first,
  // then cells: the fallback).
  std::function<int32_t(const Rect&, std::map<Rect, Choice>*)> make = [&](const Rect& r,
                                                                            std::map<Rect, Choice>* memo) -> int32_t {
    if (const int32_t id = node_of(r); id >= 0) return id;
    const bool halves = memo == nullptr;
    const Choice c = halves ? Choice{0, 0, r[1] - r[0] > 1, middle(r, r[1] - r[0] > 1)} : best(r, *memo);
    const auto [x, y] = parts(r, c.rows, c.at);
    const int32_t l = make(x, memo), rr = make(y, memo);
    return add(r, l, rr);
  };
  std::vector<size_t> by_size(p.rects.size());
  for (size_t i = 0; i < by_size.size(); ++i) by_size[i] = i;
  auto cells_of = [&](size_t i) { return (p.rects[i].a1 - p.rects[i].a0) * (p.rects[i].b1 - p.rects[i].b0); };
  std::stable_sort(by_size.begin(), by_size.end(), [&](size_t u, size_t v) { return cells_of(u) < cells_of(v); });
  for (const size_t i : by_size) {
    const BinRect& b = p.rects[i];
    const Rect r{b.a0, b.a1, b.b0, b.b1};
    std::map<Rect, Choice> memo;  // (the built nodes change between bins)
    make(r, best(r, memo).at == -2 ? nullptr : &memo);
    if (!fits || static_cast<int64_t>(depth.size()) > kTreeMaxNodes || b.area >= (int64_t{1} << 27)) return t;
  }
  std::vector<simd::TreeOut> outs;
  for (const BinRect& r : p.rects) {
    simd::TreeOut o{node_of(Rect{r.a0, r.a1, r.b0, r.b1}), 1.0 / static_cast<double>(r.area), r.out_offset,
                    r.c_stride};
    if (r.area < (int64_t{1} << 24)) {
      o.area = static_cast<float>(r.area);
      o.inv_area_f = 1.0f / o.area;
    }
    outs.push_back(o);
  }
  for (size_t r = 0; r < outs.size();) {
    const int64_t g = outs[r].stride;
    bool block = g > 1 && g <= simd::kTreeMaxBlock && r + static_cast<size_t>(g) <= outs.size();
    for (int64_t k = 0; block && k < g; ++k)
      block = outs[r + k].stride == g && outs[r + k].offset == outs[r].offset + k;
    outs[r].block = block ? g : 1;
    r += block ? static_cast<size_t>(g) : 1;
  }
  // The program simd::tree_means runs. A sum used by one other sum and by no
  // bin is not stored: its user adds it from registers, in the same order
  // (x + y and y + x are the same float), one of four shapes: a + b,
  // (a + b) + c, ((a + b) + c) + d, (a + b) + (c + d). A sum that fits none
  // of them stores its two operands instead. The stores bound the loop.
  const int64_t num_ops = static_cast<int64_t>(ops.size()) / 2;
  const int64_t num_nodes = num_cells + num_ops;
  std::vector<int64_t> users(static_cast<size_t>(num_nodes), 0);  // the sums that add each node
  for (const int32_t v : ops) ++users[v];
  std::vector<char> is_bin(static_cast<size_t>(num_nodes), 0);
  for (const simd::TreeOut& o : outs) is_bin[o.node] = 1;
  std::vector<char> stored(static_cast<size_t>(num_nodes), 1);
  for (int64_t j = num_cells; j < num_nodes; ++j) stored[j] = is_bin[j] || users[j] != 1;
  auto kid = [&](int32_t id, int k) { return ops[2 * (id - num_cells) + k]; };
  // Node n's shape (2, 3, 4: a + b, then each further operand added; 5:
  // (a + b) + (c + d)) and operands, or 0 where n fits none.
  auto shape_of = [&](int32_t n, std::vector<int32_t>& operands) -> int {
    operands.clear();
    int32_t a = kid(n, 0), b = kid(n, 1);
    if (stored[a] && stored[b]) {
      operands = {a, b};
      return 2;
    }
    if (!stored[a] && !stored[b]) {
      if (!stored[kid(a, 0)] || !stored[kid(a, 1)] || !stored[kid(b, 0)] || !stored[kid(b, 1)]) return 0;
      operands = {kid(a, 0), kid(a, 1), kid(b, 0), kid(b, 1)};
      return 5;
    }
    if (stored[a]) std::swap(a, b);  // a: the sum added from registers
    int32_t p = kid(a, 0), q = kid(a, 1);
    if (stored[p] && stored[q]) {
      operands = {p, q, b};
      return 3;
    }
    if (stored[p]) std::swap(p, q);  // p: the inner sum
    if (stored[p] || !stored[q] || !stored[kid(p, 0)] || !stored[kid(p, 1)]) return 0;
    operands = {kid(p, 0), kid(p, 1), q, b};
    return 4;
  };
  // Each stored sum's shape and operands. A sum that fits no shape stores
  // its two operands (then a + b), each settled in turn. That changes no
  // other sum's shape: a shape looks through unstored nodes only, and an
  // unstored node's one user is the sum being settled.
  std::vector<int> shape(static_cast<size_t>(num_nodes), 0);
  std::vector<std::vector<int32_t>> args(static_cast<size_t>(num_nodes));
  std::function<void(int32_t)> settle = [&](int32_t n) {
    shape[n] = shape_of(n, args[n]);
    if (shape[n] != 0) return;
    for (int k = 0; k < 2; ++k) {
      const int32_t v = kid(n, k);
      if (stored[v]) continue;
      stored[v] = 1;
      settle(v);
    }
    shape[n] = shape_of(n, args[n]);
  };
  for (int32_t n = static_cast<int32_t>(num_cells); n < num_nodes; ++n)
    if (stored[n]) settle(n);
  // The stored sums in order of their height in the program (cells 0),
  // then of shape: by height, neighbouring sums are independent (built
  // depth first, each sum had needed the one just before it, a chain of
  // store-to-load latencies); by shape, one loop runs a stretch of them.
  std::vector<int64_t> height(static_cast<size_t>(num_nodes), 0);
  std::vector<int32_t> order;
  for (int32_t n = static_cast<int32_t>(num_cells); n < num_nodes; ++n) {
    if (!stored[n]) continue;
    TORCH_INTERNAL_ASSERT(shape[n] != 0, "build_sum_trees: a stored sum without a shape");
    for (const int32_t v : args[n]) height[n] = std::max(height[n], height[v] + 1);
    order.push_back(n);
  }
  std::stable_sort(order.begin(), order.end(), [&](int32_t u, int32_t v) {
    return height[u] != height[v] ? height[u] < height[v] : shape[u] < shape[v];
  });
  std::vector<int32_t> id_of(static_cast<size_t>(num_nodes), -1);
  for (int64_t q = 0; q < num_cells; ++q) id_of[q] = static_cast<int32_t>(q);
  for (size_t k = 0; k < order.size(); ++k) id_of[order[k]] = static_cast<int32_t>(num_cells + k);
  constexpr int32_t kNodeBytes = simd::kTreeChannels * sizeof(float);  // operands: byte offsets in a pass
  for (size_t k = 0; k < order.size();) {
    size_t e = k;
    while (e < order.size() && shape[order[e]] == shape[order[k]]) ++e;
    t.ops.push_back(shape[order[k]]);
    t.ops.push_back(static_cast<int32_t>(e - k));
    for (; k < e; ++k)
      for (const int32_t v : args[order[k]]) t.ops.push_back(id_of[v] * kNodeBytes);
  }
  t.num_sums = static_cast<int64_t>(order.size());
  for (simd::TreeOut& o : outs) o.node = id_of[o.node];
  t.outs = std::move(outs);
  return t;
}

const SumTrees& PoolPlan::sum_trees() const {
  std::call_once(sum_trees_once_,
                 [this] { sum_trees_ = std::make_shared<const SumTrees>(build_sum_trees(*this)); });
  return *sum_trees_;
}

std::shared_ptr<const PoolPlan> make_plan(WindowPlan windows, bool channels_last_levels) {
  auto plan = std::make_shared<PoolPlan>();
  PoolPlan& p = *plan;
  static_cast<WindowPlan&>(p) = std::move(windows);
  p.channels_last_levels = channels_last_levels;
  for (int64_t l = 0; l < p.levels(); ++l)
    for (int64_t i = 0; i < p.bh[l]; ++i)
      for (int64_t j = 0; j < p.bw[l]; ++j)
        p.rects.push_back({l, i, j, p.a0(l, i), p.a1(l, i), p.b0(l, j),
                           p.b1(l, j), p.area(l, i, j), p.out_index(l, 0, i, j),
                           p.out_index(l, 1, i, j) - p.out_index(l, 0, i, j)});
  return plan;
}

// The plans of a thread's recent calls, keyed on all they are built from
// (windows, level_bins, H, W, C, level layout), most recent first: built
// per call, plan and bins made a (1, 8, 8, 8) channels_last max call 14
// instead of 9 us (eager: 10). A hit skips the
// window checks too: its arguments passed them for the same H and W. One
// cache per thread: no lock (a fork child keeps the forking thread's).
std::shared_ptr<const PoolPlan> cached_plan(const char* op, c10::IntArrayRef h_bounds, c10::IntArrayRef w_bounds,
                                            c10::IntArrayRef level_bins, int64_t H, int64_t W, int64_t C,
                                            bool channels_last_levels) {
  struct Entry {
    std::vector<int64_t> h_bounds, w_bounds, level_bins;
    int64_t H, W, C;
    bool channels_last_levels;
    std::shared_ptr<const PoolPlan> plan;
  };
  constexpr size_t kEntries = 16;
  thread_local std::vector<Entry> entries;
  for (size_t e = 0; e < entries.size(); ++e) {
    const Entry& k = entries[e];
    if (k.H == H && k.W == W && k.C == C && k.channels_last_levels == channels_last_levels &&
        c10::IntArrayRef(k.level_bins) == level_bins && c10::IntArrayRef(k.h_bounds) == h_bounds &&
        c10::IntArrayRef(k.w_bounds) == w_bounds) {
      std::rotate(entries.begin(), entries.begin() + e, entries.begin() + e + 1);
      return entries.front().plan;
    }
  }
  auto plan = make_plan(make_window_plan(op, h_bounds, w_bounds, level_bins, H, W, C), channels_last_levels);
  if (entries.size() == kEntries) entries.pop_back();
  entries.insert(entries.begin(), Entry{h_bounds.vec(), w_bounds.vec(), level_bins.vec(), H, W, C,
                                        channels_last_levels, plan});
  return plan;
}

// Planes per task on NCHW tensors: about 32K elements each.
int64_t plane_grain(int64_t H, int64_t W) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, H * W));
}

// ------------------------------- forward -----------------------------------
//
// Cells are laid out [cell][k] with k a small vector dimension (a block of
// NCHW planes, or channels), so combining cells into bins vectorizes over k
// and its cost is shared by the whole block.

constexpr int64_t kPlaneBlock = simd::kCellBlock;  // NCHW planes reduced together
constexpr size_t kCellBudget = 16 << 20;   // bytes of channels_last cells
// Segment cells up to which channels_last average bins are summed by
// simd::bin_means (its 32-channel scratch: 256 bytes a cell, 32 KB here).
constexpr int64_t kBinMeansMaxCells = 128;

// Float one-run cells of more bytes than this (L1) are summed by rows
// (avg_forward_channels_last's reduce_rows).
constexpr int64_t kCellSumMaxBytes = 32 << 10;

// Blocks of kPlaneBlock NCHW planes, about 32K elements per task.
int64_t block_grain(int64_t H, int64_t W) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, H * W * kPlaneBlock));
}

// Sample offset (in the packed output) and channel of each plane of the
// block starting at plane p0; a partial block repeats its last plane, so
// fixed-width loops over the block read valid entries.
void block_planes(int64_t p0, int64_t pn, int64_t C, int64_t total,
                  int64_t* sample_base, int64_t* channel) {
  for (int64_t k = 0; k < kPlaneBlock; ++k) {
    const int64_t plane = p0 + std::min(k, pn - 1);
    sample_base[k] = (plane / C) * C * total;
    channel[k] = plane % C;
  }
}

// Sums cells into every bin in double, vector over k < kn, a-major as
// simd::rect_means and the block kernel's bin step; put(rect, means) with
// means[k] for k < kn.
template <typename cell_t, typename Put>
void avg_cells_to_bins(const PoolPlan& p, const cell_t* cells, int64_t stride,
                       int64_t kn, double* sum, Put put) {
  const int64_t SW = p.w.num_segments();
  for (const BinRect& r : p.rects) {
    const double area = static_cast<double>(r.area);
    if (kn == kPlaneBlock) {
      // A block of planes: the partial sums stay in registers.
      double s[kPlaneBlock] = {};
      for (int64_t a = r.a0; a < r.a1; ++a)
        for (int64_t b = r.b0; b < r.b1; ++b) {
          const cell_t* cell = cells + (a * SW + b) * stride;
          for (int64_t k = 0; k < kPlaneBlock; ++k) s[k] += static_cast<double>(cell[k]);
        }
      for (int64_t k = 0; k < kPlaneBlock; ++k) s[k] /= area;
      put(r, s);
      continue;
    }
    std::fill(sum, sum + kn, 0.0);
    for (int64_t a = r.a0; a < r.a1; ++a)
      for (int64_t b = r.b0; b < r.b1; ++b) {
        const cell_t* cell = cells + (a * SW + b) * stride;
#pragma omp simd
        for (int64_t k = 0; k < kn; ++k) sum[k] += static_cast<double>(cell[k]);
      }
#pragma omp simd
    for (int64_t k = 0; k < kn; ++k) sum[k] = sum[k] / area;
    put(r, sum);
  }
}

// The rows of every H-segment some window reads, cut into runs of at most
// simd::kRunLength rows (top to bottom): rows are summed in float within a
// run, runs are added in double (the error bound in simd_loops.h).
struct RowRuns {
  std::vector<int64_t> h0, rows, seg;
  std::vector<char> first;  // the first run of its segment
  int64_t size() const { return static_cast<int64_t>(h0.size()); }
};

RowRuns row_runs(const PoolPlan& p) {
  RowRuns runs;
  for (int64_t a = 0; a < p.h.num_segments(); ++a) {
    const int64_t h0 = p.h.cuts[a], h1 = p.h.cuts[a + 1];
    if (p.h.seg_of[h0] < 0) continue;  // no window reads these rows
    for (int64_t h = h0; h < h1; h += simd::kRunLength) {
      runs.h0.push_back(h);
      runs.rows.push_back(std::min(simd::kRunLength, h1 - h));
      runs.seg.push_back(a);
      runs.first.push_back(h == h0);
    }
  }
  return runs;
}

// Max over cells into every bin; put(rect, k, value, index).
template <typename scalar_t, typename Put>
void max_cells_to_bins(const PoolPlan& p, const scalar_t* vals,
                       const int64_t* idxs, int64_t stride, int64_t kn,
                       Put put) {
  const int64_t SW = p.w.num_segments();
  for (const BinRect& r : p.rects) {
    for (int64_t k = 0; k < kn; ++k) {
      const int64_t first = (r.a0 * SW + r.b0) * stride + k;
      scalar_t v = vals[first];
      int64_t idx = idxs[first];
      for (int64_t a = r.a0; a < r.a1; ++a)
        for (int64_t b = r.b0; b < r.b1; ++b) {
          const int64_t at = (a * SW + b) * stride + k;
          max_pool_combine(v, idx, vals[at], idxs[at]);
        }
      put(r, k, v, idx);
    }
  }
}

// NCHW float on AVX2 CPUs (block_cells.cpp): groups of 32 planes, each
// reduced to cells as four transposed blocks of 8, then every bin of the
// group summed at once.
void avg_forward_nchw_groups(const float* x, float* out, const PoolPlan& p, int64_t N, int64_t C,
                             int64_t H, int64_t W) {
  constexpr int64_t G = simd::kGroupPlanes, B = simd::kCellBlock;
  const int64_t SH = p.h.num_segments(), SW = p.w.num_segments();
  const int64_t planes = N * C, groups = (planes + G - 1) / G;
  std::vector<char> col_last(static_cast<size_t>(W));
  for (int64_t w = 0; w < W; ++w) col_last[w] = w + 1 == W || p.w.seg_of[w + 1] != p.w.seg_of[w];
  const RowRuns runs = row_runs(p);
  // The float row sums of as many runs as fit 256 KB are kept at once, so a
  // small plane is still read front to back in one go.
  const int64_t Wp = (W + 7) / 8 * 8;
  const int64_t per_pass = std::max<int64_t>(1, std::min<int64_t>(runs.size(), (int64_t{1} << 16) / (B * Wp)));
  // The next block's planes are prefetched while this one is reduced.
  const simd::CellBlock cb{W, SW, runs.size(), runs.h0.data(), runs.rows.data(), runs.seg.data(),
                           runs.first.data(), per_pass, p.w.seg_of.data(), col_last.data(), B * H * W};
  std::vector<simd::CellRect> rects;
  for (const BinRect& r : p.rects) rects.push_back({r.a0, r.a1, r.b0, r.b1, static_cast<double>(r.area)});
  const int64_t num_rects = static_cast<int64_t>(rects.size());
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, H * W * G));
  at::parallel_for(0, groups, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> rows(static_cast<size_t>(simd::cell_sums_scratch(cb)));
    // Zeroed once: blocks past the last plane keep finite stale values.
    std::vector<double> cells(static_cast<size_t>(SH * SW * G));
    std::vector<float> means(static_cast<size_t>(num_rects * G));
    for (int64_t grp = begin; grp < end; ++grp) {
      const int64_t p0 = grp * G, pn = std::min(G, planes - p0);
      for (int64_t q = 0; q * B < pn; ++q) {
        const float* plane_ptrs[B];
        for (int64_t k = 0; k < B; ++k) plane_ptrs[k] = x + (p0 + std::min(q * B + k, pn - 1)) * H * W;
        simd::cell_sums_8planes(cb, plane_ptrs, cells.data() + q * B, G, rows.data());
      }
      simd::bin_means_32planes(cells.data(), SW, rects.data(), num_rects, means.data());
      // Each plane's bins of a level are one run of the output (strided by
      // C for channels_last levels).
      const int64_t step = p.channels_last_levels ? C : 1;
      for (int64_t k = 0; k < pn; ++k) {
        const int64_t plane = p0 + k, n = plane / C, c = plane % C;
        const float* m = means.data() + k;
        for (int64_t l = 0, r0 = 0; l < p.levels(); r0 += p.bh[l] * p.bw[l], ++l) {
          const int64_t bins = p.bh[l] * p.bw[l];
          float* d = out + n * C * p.total + p.out_index(l, c, 0, 0);
          for (int64_t i = 0; i < bins; ++i) d[i * step] = m[(r0 + i) * G];
        }
      }
    }
  });
}

// NCHW: a block of planes; each run of rows (RowRuns) of each plane is
// summed (vector over W) in acc_t, then its columns into the W-segments'
// cells (chunks of columns in acc_t, the chunks in double), in the block
// kernel's order.
template <typename scalar_t>
void avg_forward_nchw(const scalar_t* x, scalar_t* out, const PoolPlan& p,
                      int64_t N, int64_t C, int64_t H, int64_t W) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t SH = p.h.num_segments(), SW = p.w.num_segments();
  const int64_t planes = N * C, B = kPlaneBlock;
  const int64_t blocks = (planes + B - 1) / B;
  const int64_t grain = block_grain(H, W);
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (simd::cell_sums_8planes_available()) return avg_forward_nchw_groups(x, out, p, N, C, H, W);
  }
  const RowRuns runs = row_runs(p);
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    // One run's row sums, [w][plane]: W-segments then reduce vector over
    // the block's planes.
    std::vector<acc_t> rows(static_cast<size_t>(W * B));
    std::vector<double> cells(static_cast<size_t>(SH * SW * B));
    std::vector<double> sum(static_cast<size_t>(B));
    int64_t sample_base[kPlaneBlock], channel[kPlaneBlock];
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t p0 = blk * B, pn = std::min(B, planes - p0);
      block_planes(p0, pn, C, p.total, sample_base, channel);
      if (pn < B) std::fill(rows.begin(), rows.end(), acc_t(0));
      for (int64_t run = 0; run < runs.size(); ++run) {
        const int64_t h0 = runs.h0[run], nrows = runs.rows[run], a = runs.seg[run];
        for (int64_t k = 0; k < pn; ++k) {
          const scalar_t* src = x + (p0 + k) * H * W + h0 * W;
          acc_t* acc = rows.data() + k;
          if constexpr (std::is_same_v<scalar_t, float>) {
            simd::sum_rows(acc, B, src, nrows, W, W);
          } else {
            for (int64_t w = 0; w < W; ++w) {
              acc_t v = 0;
              for (int64_t h = 0; h < nrows; ++h) v += static_cast<acc_t>(src[h * W + w]);
              acc[w * B] = v;
            }
          }
        }
        // Columns in acc_t, `chunk` at a time (an element's additions, rows
        // then columns, stay under kRunLength), the chunks in double.
        const int64_t chunk = simd::kRunLength + 1 - nrows;
        for (int64_t b = 0; b < SW; ++b) {
          if (p.w.seg_of[p.w.cuts[b]] < 0) continue;  // no window reads these columns
          double s[kPlaneBlock] = {};
          acc_t f[kPlaneBlock] = {};
          int64_t in_chunk = 0;
          for (int64_t w = p.w.cuts[b]; w < p.w.cuts[b + 1]; ++w) {
            const acc_t* col = rows.data() + w * B;
            for (int64_t k = 0; k < kPlaneBlock; ++k) f[k] += col[k];
            if (++in_chunk == chunk || w + 1 == p.w.cuts[b + 1]) {
              for (int64_t k = 0; k < kPlaneBlock; ++k) {
                s[k] += static_cast<double>(f[k]);
                f[k] = acc_t(0);
              }
              in_chunk = 0;
            }
          }
          double* cell = cells.data() + (a * SW + b) * B;
          if (runs.first[run]) {
            for (int64_t k = 0; k < kPlaneBlock; ++k) cell[k] = s[k];
          } else {
            for (int64_t k = 0; k < kPlaneBlock; ++k) cell[k] += s[k];
          }
        }
      }
      avg_cells_to_bins(p, cells.data(), B, pn, sum.data(),
                        [&](const BinRect& r, const double* means) {
                          for (int64_t k = 0; k < pn; ++k)
                            out[sample_base[k] + r.out_offset + channel[k] * r.c_stride] =
                                static_cast<scalar_t>(means[k]);
                        });
    }
  });
}

// The plan as the float max kernels (max_pool.h) read it.
max_pool::Levels max_levels(const PoolPlan& p) {
  return {p.h, p.w, p.bh, p.bw, p.win_h0, p.win_w0, p.offset, p.channels, p.total, p.channels_last_levels};
}

const max_pool::Bins& PoolPlan::max_bins() const {
  std::call_once(max_bins_once_, [this] { max_bins_ = max_pool::make_bins(max_levels(*this)); });
  return *max_bins_;
}

// Max, NCHW: each column's running maximum over the rows of an H-segment
// (ATen's scan rule), then cells and bins by max_pool_combine on flat
// indices, which reproduces a row-major scan over each window.
template <typename scalar_t>
void max_forward_nchw(const scalar_t* x, scalar_t* out, int64_t* out_idx,
                      const PoolPlan& p, int64_t N, int64_t C, int64_t H,
                      int64_t W) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (max_pool::nchw_blocks_available(H, W)) return max_pool::forward_nchw_blocks(x, out, out_idx, max_levels(p), N, H, W);
  }
  const int64_t SH = p.h.num_segments(), SW = p.w.num_segments();
  const int64_t planes = N * C, B = kPlaneBlock;
  const int64_t blocks = (planes + B - 1) / B;
  const int64_t grain = block_grain(H, W);
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> col_max(static_cast<size_t>(W));
    std::vector<int32_t> col_row(static_cast<size_t>(W));
    std::vector<scalar_t> cell_max(static_cast<size_t>(SH * SW * B));
    std::vector<int64_t> cell_idx(static_cast<size_t>(SH * SW * B));
    int64_t sample_base[kPlaneBlock], channel[kPlaneBlock];
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t p0 = blk * B, pn = std::min(B, planes - p0);
      for (int64_t k = 0; k < pn; ++k) {
        const scalar_t* src = x + (p0 + k) * H * W;
        for (int64_t a = 0; a < SH; ++a) {
          const int64_t h0 = p.h.cuts[a], h1 = p.h.cuts[a + 1];
          if (p.h.seg_of[h0] < 0) continue;
          if constexpr (std::is_same_v<scalar_t, float>) {
            simd::max_rows(col_max.data(), col_row.data(), src + h0 * W, h1 - h0, W, W,
                           static_cast<int32_t>(h0));
          } else {
            std::copy(src + h0 * W, src + (h0 + 1) * W, col_max.begin());
            std::fill(col_row.begin(), col_row.end(), static_cast<int32_t>(h0));
            for (int64_t h = h0 + 1; h < h1; ++h) {
              const scalar_t* row = src + h * W;
              for (int64_t w = 0; w < W; ++w) {
                if (max_pool_takes(row[w], col_max[w])) {
                  col_max[w] = row[w];
                  col_row[w] = static_cast<int32_t>(h);
                }
              }
            }
          }
          for (int64_t b = 0; b < SW; ++b) {
            const int64_t w0 = p.w.cuts[b];
            scalar_t v = col_max[w0];
            int64_t idx = static_cast<int64_t>(col_row[w0]) * W + w0;
            for (int64_t w = w0 + 1; w < p.w.cuts[b + 1]; ++w)
              max_pool_combine(v, idx, col_max[w], static_cast<int64_t>(col_row[w]) * W + w);
            cell_max[(a * SW + b) * B + k] = v;
            cell_idx[(a * SW + b) * B + k] = idx;
          }
        }
      }
      block_planes(p0, pn, C, p.total, sample_base, channel);
      max_cells_to_bins(p, cell_max.data(), cell_idx.data(), B, pn,
                        [&](const BinRect& r, int64_t k, scalar_t v, int64_t idx) {
                          const int64_t o = sample_base[k] + p.out_index(r.l, channel[k], r.i, r.j);
                          out[o] = v;
                          out_idx[o] = idx;
                        });
    }
  });
}

// Max, channels_last, runs in two phases over groups of samples. Phase 1: one task
// per (sample, H-segment[, channel chunk]) reduces the segment's rows into its
// row of cells, reading whole pixels (all channels) contiguously. Phase 2:
// one task per (sample, channel chunk) combines cells into bins.
struct ChannelsLastTiling {
  int64_t group;    // samples per group
  int64_t chunks;   // channel chunks per phase-1 task
  int64_t chunk;
};

ChannelsLastTiling channels_last_tiling(const PoolPlan& p, int64_t N, int64_t C,
                                        size_t cell_bytes) {
  const int64_t cells = p.h.num_segments() * p.w.num_segments();
  const size_t per_sample = static_cast<size_t>(cells * C) * cell_bytes;
  ChannelsLastTiling t;
  t.group = std::max<int64_t>(1, std::min<int64_t>(N, kCellBudget / std::max<size_t>(per_sample, 1)));
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t rows = t.group * p.h.num_segments();
  t.chunks = std::max<int64_t>(1, (2 * threads + rows - 1) / rows);
  t.chunks = std::min<int64_t>(t.chunks, std::max<int64_t>(1, C / 16));
  t.chunk = (C + t.chunks - 1) / t.chunks;
  return t;
}

// Average, channels_last. Phase 1 reduces one H-segment's rows of a sample
// into its row of cells ([cell][channel], pixels added in order, whole
// pixels read contiguously; float cells that are one run are summed a cell
// at a time, simd::cell_sum); phase 2 combines a sample's cells into every
// bin, vector over channels (float on small maps: the plan's sum trees,
// simd::tree_means). With enough samples to share evenly among the
// threads, one task runs both phases for a sample (its cells stay in cache);
// otherwise phase 1 is split over H-segments and phase 2 over channels.
template <typename scalar_t>
void avg_forward_channels_last(const scalar_t* x, scalar_t* out,
                               const PoolPlan& p, int64_t N, int64_t C,
                               int64_t H, int64_t W) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t SH = p.h.num_segments(), SW = p.w.num_segments();
  // float on small maps: the bins' sum trees (simd::tree_means), which read
  // the cells 16 channels at a time: cell q's channel c at (c / 16) *
  // vec_stride + q * 16 + c % 16 (a pass's cells contiguous, in L1), the
  // last partial 16 zero-padded. Otherwise cell q's channels at q * C.
  const SumTrees& st = p.sum_trees();
  const bool trees = std::is_same_v<scalar_t, float> && !st.outs.empty() &&
                     !test_overrides::get(test_overrides::kNoSumTrees);
  const int64_t num_sums = st.num_sums;  // the tree program's stored sums
  const bool no_cell_rows = test_overrides::get(test_overrides::kNoCellRows) != 0;
  const bool general_cell_loop = test_overrides::get(test_overrides::kGeneralCellLoop) != 0;
  constexpr int64_t kTW = simd::kTreeChannels;
  const int64_t cell_step = trees ? kTW : C, vec_stride = trees ? SH * SW * kTW : kTW;
  const int64_t CS = trees ? (C + kTW - 1) / kTW * kTW : C;  // channels a cell takes
  auto channel = [&](int64_t c) { return c / kTW * vec_stride + c % kTW; };
  // Zeros in the last partial 16 of a sample's cells (no NaN or denormal
  // garbage in the unused lanes' additions); nothing else writes them.
  auto zero_padding = [&](acc_t* sample_cells) {
    if (trees && C % kTW != 0) std::fill_n(sample_cells + (CS / kTW - 1) * vec_stride, vec_stride, acc_t(0));
  };
  const int64_t cells_per_sample = SH * SW * CS;
  // A W-segment of w <= simd::kRunLength pixels keeps a float run of its
  // cell (in `run`, SW x C): each row's w pixels summed in groups of four
  // (simd::add_row_sum's order), the row sums of up to kRunLength - 1 -
  // row_sum_depth(w) rows added; the run ends with the row that fills it or
  // with the H-segment, added in double to the segment's cell sums
  // (`seg_sums`, SW x C; the first run sets them). A wider segment sums each
  // row in runs of kRunLength - 1 pixels, each added in double. At the end of
  // the H-segment the double sums are rounded once to the acc_t cells: an
  // element passes at most kRunLength - 1 float roundings (the bound in
  // simd_loops.h). A cell that is one run (a small map) is summed straight
  // into its acc_t cell, as a run, which its first row sets (for float, by
  // simd::cell_sum with the sums in registers; not zeroed first: 0 + v is v,
  // and a -0.0 cell only enters bin sums that start at +0.0 or is a bin of
  // its own, whose mean is -0.0 as the division gives). `run` is zero on entry and on return. `state`: 2 *
  // SW entries of the task's scratch (each cell's rows in its run, whether
  // its sums hold a run).
  constexpr int64_t kWide = simd::kRunLength - 1;
  // A float one-run cell wider than L1 (no trees: their cells are small) is
  // summed by rows instead, all channels of four pixels at a time
  // (set_row_sum, then add_row_sum: cell_sum's additions in its order):
  // cell_sum walks the cell's pixels once per chunk of channels, C floats
  // apart, which the next chunk finds evicted.
  auto by_rows = [&](int64_t a, int64_t b) {
    return !trees && !no_cell_rows &&
           (p.h.cuts[a + 1] - p.h.cuts[a]) * (p.w.cuts[b + 1] - p.w.cuts[b]) * C * int64_t{sizeof(float)} >
               kCellSumMaxBytes;
  };
  // Whether simd::cell_sum sums cell (a, b) whole (float, one run, not by
  // rows), before the walk of its H-segment's rows, which then skips it.
  auto summed_whole = [&](int64_t a, int64_t b) {
    return std::is_same_v<scalar_t, float> && st.one_run_cells[a * SW + b] && !by_rows(a, b);
  };
  // Whether H-segment a's rows are walked one by one: not where every cell
  // is summed whole (small maps), where the walk only found each cell done,
  // and its checks per row and cell took ~1 us a sample of (16, 256, 16, 16)
  // with bins 1, 2, 3, 6.
  std::vector<char> walk_rows(static_cast<size_t>(SH), 0);
  for (int64_t a = 0; a < SH; ++a)
    for (int64_t b = 0; b < SW; ++b)
      if (p.w.seg_of[p.w.cuts[b]] >= 0 && !summed_whole(a, b)) walk_rows[a] = 1;
  auto reduce_rows = [&](int64_t n, int64_t a, acc_t* cells, acc_t* run, double* seg_sums, int64_t* state) {
    const int64_t h0 = p.h.cuts[a], h1 = p.h.cuts[a + 1];
    if (p.h.seg_of[h0] < 0) return;  // no window reads these rows
    acc_t* row_cells = cells + a * SW * cell_step;
    int64_t* rows_in_run = state;
    int64_t* started = state + SW;  // the cell's sums hold a run
    const char* one_run = st.one_run_cells.data() + a * SW;  // the whole cell is one run
    if constexpr (std::is_same_v<scalar_t, float>) {
      for (int64_t b = 0; b < SW; ++b) {
        const int64_t w0 = p.w.cuts[b];
        if (p.w.seg_of[w0] >= 0 && summed_whole(a, b))
          simd::cell_sum(row_cells + b * cell_step, vec_stride, x + ((n * H + h0) * W + w0) * C, h1 - h0, W * C,
                         p.w.cuts[b + 1] - w0, C, C, general_cell_loop);
      }
      if (!walk_rows[a]) return;
    } else {
      for (int64_t b = 0; b < SW; ++b)
        if (one_run[b]) std::fill(row_cells + b * C, row_cells + (b + 1) * C, acc_t(0));
    }
    std::fill(state, state + 2 * SW, int64_t{0});
    for (int64_t h = h0; h < h1; ++h) {
      const scalar_t* row = x + ((n * H + h) * W) * C;
      for (int64_t b = 0; b < SW; ++b) {
        const int64_t w0 = p.w.cuts[b], w1 = p.w.cuts[b + 1];
        if (p.w.seg_of[w0] < 0) continue;
        double* acc = seg_sums + b * C;
        acc_t* q = one_run[b] ? row_cells + b * C : run + b * C;  // (float: not one run)
        if (w1 - w0 > kWide) {
          if (h == h0) std::fill(acc, acc + C, 0.0);
          for (int64_t w = w0; w < w1; w += kWide) {
            const int64_t pixels = std::min(kWide, w1 - w);
            if constexpr (std::is_same_v<scalar_t, float>) {
              simd::add_run_f64(acc, row + w * C, pixels, C, C);  // pixels in order
            } else {
              for (int64_t c = 0; c < C; ++c) {
                acc_t v = static_cast<acc_t>(row[w * C + c]);
                for (int64_t k = w + 1; k < w + pixels; ++k) v += static_cast<acc_t>(row[k * C + c]);
                acc[c] += static_cast<double>(v);
              }
            }
          }
          continue;
        }
        if constexpr (std::is_same_v<scalar_t, float>) {
          if (one_run[b]) {
            if (by_rows(a, b)) {
              if (h == h0) {
                simd::set_row_sum(q, row + w0 * C, w1 - w0, C, C);
              } else {
                simd::add_row_sum(q, row + w0 * C, w1 - w0, C, C);
              }
            }
            continue;  // else summed above
          }
        }
        const bool ends =
            !one_run[b] && (++rows_in_run[b] == kWide - simd::row_sum_depth(w1 - w0) || h + 1 == h1);
        if constexpr (std::is_same_v<scalar_t, float>) {
          if (ends) {
            simd::add_row_sum_f64(acc, q, row + w0 * C, w1 - w0, C, C, !started[b]);
          } else {
            simd::add_row_sum(q, row + w0 * C, w1 - w0, C, C);  // pixels in order
          }
        } else {
          for (int64_t c = 0; c < C; ++c) {
            // simd::add_row_sum's order: groups of four, (p0 + p1) + (p2 + p3)
            auto px = [&](int64_t w) { return static_cast<acc_t>(row[w * C + c]); };
            acc_t v = acc_t(0);
            for (int64_t w = w0; w < w1; w += 4) {
              const int64_t k = std::min<int64_t>(4, w1 - w);
              const acc_t g = k == 4   ? (px(w) + px(w + 1)) + (px(w + 2) + px(w + 3))
                              : k == 3 ? (px(w) + px(w + 1)) + px(w + 2)
                              : k == 2 ? px(w) + px(w + 1)
                                       : px(w);
              v = w == w0 ? g : v + g;
            }
            q[c] += v;
            if (ends) {
              acc[c] = started[b] ? acc[c] + static_cast<double>(q[c]) : static_cast<double>(q[c]);
              q[c] = acc_t(0);
            }
          }
        }
        if (ends) {
          rows_in_run[b] = 0;
          started[b] = 1;
        }
      }
    }
    for (int64_t b = 0; b < SW; ++b) {
      if (p.w.seg_of[p.w.cuts[b]] < 0 || one_run[b]) continue;
      const double* acc = seg_sums + b * C;
      acc_t* cell = row_cells + b * cell_step;
      if (trees) {
        for (int64_t c = 0; c < C; ++c) cell[channel(c)] = static_cast<acc_t>(acc[c]);
      } else {
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) cell[c] = static_cast<acc_t>(acc[c]);
      }
    }
  };
  // float: the bins as simd::bin_means reads them, when a 32-channel chunk of
  // the cells (its `scratch`) stays small; else one simd::rect_means per bin.
  std::vector<simd::BinOut> bin_outs;
  if (std::is_same_v<scalar_t, float> && SH * SW <= kBinMeansMaxCells) {
    for (const BinRect& r : p.rects)
      bin_outs.push_back({r.a0, r.a1, r.b0, r.b1, static_cast<double>(r.area), r.out_offset, r.c_stride});
  }
  const int64_t scratch_size = bin_outs.empty() ? 0 : SH * SW * 32;
  const int64_t tree_scratch_size = trees ? (SH * SW + num_sums) * kTW : 0;  // a pass's cells and sums
  // `sum`: C (or a chunk's) doubles for other dtypes, bin_means' scratch for float.
  // `tree_scratch`: a pass's nodes, or null: a whole sample's trees summed
  // over its cells (tree_means in place; the cells need num_sums * kTW more
  // floats). `next`: the sample to prefetch while the bins are summed, or -1.
  auto cells_to_bins = [&](int64_t n, int64_t c0, int64_t cn, acc_t* cells, double* sum, float* tree_scratch,
                           int64_t next) {
    scalar_t* dst = out + n * C * p.total;
    if constexpr (std::is_same_v<scalar_t, float>) {
      // At most the next sample's first 256 KB: more would evict the lines
      // prefetched first (and this sample's cells) from a 1 MB L2.
      const scalar_t* ahead = next >= 0 ? x + next * H * W * C : nullptr;
      const int64_t ahead_bytes = std::min<int64_t>(H * W * C * sizeof(scalar_t), int64_t{256} << 10);
      if (trees) {
        // At most 128 KB under the trees (a line every two sums on (16, 256,
        // 16, 16), bins 1, 2, 3, 6): a line every sum (202 KB) was 5-6%
        // slower there, none at all 2% (x from L3, two threads, after
        // eager, in one process); the prefetches contend with the sums'
        // own misses (each pass's cells come from L2).
        simd::tree_means(dst, st.ops.data(), static_cast<int64_t>(st.ops.size()), num_sums, st.outs.data(),
                         static_cast<int64_t>(st.outs.size()), cells,
                         SH * SW, vec_stride, c0, cn, tree_scratch, ahead,
                         std::min<int64_t>(ahead_bytes, int64_t{128} << 10));
        return;
      }
      if (!bin_outs.empty()) {
        simd::bin_means(dst, bin_outs.data(), static_cast<int64_t>(bin_outs.size()), cells, SH, SW, C, c0, cn, sum,
                        ahead, ahead_bytes);
        return;
      }
      for (const BinRect& r : p.rects)
        simd::rect_means(dst + r.out_offset + c0 * r.c_stride, r.c_stride, cells + c0, SW * C, C,
                         r.a0, r.a1, r.b0, r.b1, static_cast<double>(r.area), cn);
    } else {
      avg_cells_to_bins(p, cells + c0, C, cn, sum, [&](const BinRect& r, const double* means) {
        scalar_t* d = dst + r.out_offset + c0 * r.c_stride;
        for (int64_t k = 0; k < cn; ++k) d[k * r.c_stride] = static_cast<scalar_t>(means[k]);
      });
    }
  };
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t forced = test_overrides::get(test_overrides::kChannelsLastAvgTasks);
  if (forced == 1 || (forced == 0 && (N % threads == 0 || N >= 4 * threads))) {
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      // Uninitialized but `run` (reduce_rows writes before it reads). The
      // trees' sums in place, after the cells: copying each pass's cells
      // to a buffer of its own took 7% of (16, 256, 16, 16) (AMD EPYC).
      auto cells = cpu::scratch<acc_t>(cells_per_sample + (trees ? num_sums * kTW : 0));
      auto sum = cpu::scratch<double>(std::max(C, scratch_size));
      auto seg_sums = cpu::scratch<double>(SW * C);
      auto state = cpu::scratch<int64_t>(2 * SW);
      std::vector<acc_t> run(static_cast<size_t>(SW * C));
      for (int64_t n = begin; n < end; ++n) {
        zero_padding(cells.get());  // every sample: the sums in place overwrite it
        for (int64_t a = 0; a < SH; ++a) reduce_rows(n, a, cells.get(), run.data(), seg_sums.get(), state.get());
        cells_to_bins(n, 0, C, cells.get(), sum.get(), nullptr, n + 1 < end ? n + 1 : -1);
      }
    });
    return;
  }
  auto cells = cpu::scratch<acc_t>(N * cells_per_sample);
  for (int64_t n = 0; n < N; ++n) zero_padding(cells.get() + n * cells_per_sample);
  at::parallel_for(0, N * SH, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> run(static_cast<size_t>(SW * C));
    auto seg_sums = cpu::scratch<double>(SW * C);
    auto state = cpu::scratch<int64_t>(2 * SW);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / SH;
      reduce_rows(n, task % SH, cells.get() + n * cells_per_sample, run.data(), seg_sums.get(), state.get());
    }
  });
  const int64_t chunk = std::min<int64_t>(C, 256);
  const int64_t chunks = (C + chunk - 1) / chunk;
  at::parallel_for(0, N * chunks, 1, [&](int64_t begin, int64_t end) {
    auto sum = cpu::scratch<double>(std::max(chunk, scratch_size));
    auto tree_scratch = cpu::scratch<float>(tree_scratch_size);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / chunks, c0 = (task % chunks) * chunk;
      cells_to_bins(n, c0, std::min(chunk, C - c0), cells.get() + n * cells_per_sample, sum.get(), tree_scratch.get(),
                    -1);
    }
  });
}

template <typename scalar_t>
void max_forward_channels_last(const scalar_t* x, scalar_t* out,
                               int64_t* out_idx, const PoolPlan& p, int64_t N,
                               int64_t C, int64_t H, int64_t W) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (max_pool::fits_int32_index(H, W)) return max_pool::forward_channels_last(x, out, out_idx, max_levels(p), p.max_bins(), N, H, W);
  }
  const int64_t SH = p.h.num_segments(), SW = p.w.num_segments();
  const ChannelsLastTiling t =
      channels_last_tiling(p, N, C, sizeof(scalar_t) + sizeof(int64_t));
  auto cell_max = cpu::scratch<scalar_t>(t.group * SH * SW * C);
  auto cell_idx = cpu::scratch<int64_t>(t.group * SH * SW * C);
  for (int64_t n0 = 0; n0 < N; n0 += t.group) {
    const int64_t gn = std::min(t.group, N - n0);
    at::parallel_for(0, gn * SH * t.chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t g = task / (SH * t.chunks);
        const int64_t a = (task / t.chunks) % SH;
        const int64_t c0 = (task % t.chunks) * t.chunk;
        const int64_t cn = std::min(t.chunk, C - c0);
        const int64_t h0 = p.h.cuts[a], h1 = p.h.cuts[a + 1];
        if (cn <= 0 || p.h.seg_of[h0] < 0) continue;
        const int64_t base = ((g * SH + a) * SW) * C + c0;
        for (int64_t b = 0; b < SW; ++b)
          std::fill(cell_idx.get() + base + b * C, cell_idx.get() + base + b * C + cn, -1);
        // Row-major scan: each cell sees its elements in row-major order.
        for (int64_t h = h0; h < h1; ++h) {
          const scalar_t* row = x + (((n0 + g) * H + h) * W) * C + c0;
          for (int64_t w = 0; w < W; ++w) {
            const int64_t b = p.w.seg_of[w];
            if (b < 0) continue;
            scalar_t* m = cell_max.get() + base + b * C;
            int64_t* r = cell_idx.get() + base + b * C;
            const scalar_t* px = row + w * C;
            const int64_t flat = h * W + w;
            for (int64_t c = 0; c < cn; ++c) {
              if (r[c] < 0 || max_pool_takes(px[c], m[c])) {
                m[c] = px[c];
                r[c] = flat;
              }
            }
          }
        }
      }
    });
    const int64_t chunk = std::min<int64_t>(C, 256);
    const int64_t chunks = (C + chunk - 1) / chunk;
    at::parallel_for(0, gn * chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t g = task / chunks, c0 = (task % chunks) * chunk;
        const int64_t cn = std::min(chunk, C - c0);
        const int64_t base = (n0 + g) * C * p.total;
        const int64_t cells = g * SH * SW * C + c0;
        max_cells_to_bins(p, cell_max.get() + cells, cell_idx.get() + cells, C, cn,
                          [&](const BinRect& r, int64_t k, scalar_t v, int64_t idx) {
                            const int64_t o = base + p.out_index(r.l, c0 + k, r.i, r.j);
                            out[o] = v;
                            out_idx[o] = idx;
                          });
      }
    });
  }
}

// Max values only (kPoolMaxValues), channels_last float: the kernel without
// indices (max_pool.h). Only called for float.
template <typename scalar_t>
void max_values_forward_channels_last(const scalar_t* x, scalar_t* out, const PoolPlan& p, int64_t N, int64_t H,
                                      int64_t W) {
  if constexpr (std::is_same_v<scalar_t, float>) max_pool::forward_channels_last(x, out, nullptr, max_levels(p), p.max_bins(), N, H, W);
}

std::tuple<at::Tensor, at::Tensor> multi_pool2d_cpu(
    const at::Tensor& x, c10::IntArrayRef h_bounds,
    c10::IntArrayRef w_bounds, c10::IntArrayRef level_bins, int64_t mode,
    bool channels_last_levels) {
  const char* name = "pyramid_ext::multi_pool2d";
  const PoolCall call = check_pool_input(name, x, mode);
  const bool cl = call.channels_last;
  const int64_t N = call.N, C = call.C, H = call.H, W = call.W;
  const auto plan = cached_plan(name, h_bounds, w_bounds, level_bins, H, W, C, channels_last_levels);
  const PoolPlan& p = *plan;
  at::Tensor out = at::empty({N, C * p.total}, x.options());
  at::Tensor idx = mode == kPoolMax
                       ? at::empty({N, C * p.total}, x.options().dtype(at::kLong))
                       : at::empty({0}, x.options().dtype(at::kLong));
  if (out.numel() == 0) return {out, idx};
  // Values-only max: float channels_last has its own kernel; the other paths
  // compute indices into scratch and drop them.
  const bool values_kernel = mode == kPoolMaxValues && cl && x.scalar_type() == at::kFloat &&
                             max_pool::fits_int32_index(H, W);
  at::Tensor idx_scratch;
  if (mode == kPoolMaxValues && !values_kernel) idx_scratch = at::empty({N, C * p.total}, idx.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "multi_pool2d_cpu", [&] {
        const scalar_t* xp = x.const_data_ptr<scalar_t>();
        scalar_t* op = out.mutable_data_ptr<scalar_t>();
        if (mode == kPoolAvg) {
          if (cl) avg_forward_channels_last(xp, op, p, N, C, H, W);
          else avg_forward_nchw(xp, op, p, N, C, H, W);
        } else if (values_kernel) {
          max_values_forward_channels_last(xp, op, p, N, H, W);
        } else {
          int64_t* ip = (mode == kPoolMax ? idx : idx_scratch).mutable_data_ptr<int64_t>();
          if (cl) max_forward_channels_last(xp, op, ip, p, N, C, H, W);
          else max_forward_nchw(xp, op, ip, p, N, C, H, W);
        }
      });
  return {out, idx};
}

// ------------------------------- backward ----------------------------------

// The optional addend: Addend (max_pool.h), read through its strides.
template <typename scalar_t>
Addend<scalar_t> addend_view(const std::optional<at::Tensor>& addend) {
  Addend<scalar_t> a;
  if (!addend.has_value() || !addend->defined()) return a;
  a.data = addend->const_data_ptr<scalar_t>();
  a.sn = addend->stride(0);
  a.sc = addend->stride(1);
  a.sh = addend->stride(2);
  a.sw = addend->stride(3);
  return a;
}

template <typename scalar_t>
void avg_backward_nchw(const scalar_t* grad, scalar_t* gx, const PoolPlan& p,
                       int64_t N, int64_t C, int64_t H, int64_t W, const Addend<scalar_t>& add, bool stream) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t SH = p.h.num_segments(), SW = p.w.num_segments();
  // float, stream (output_buffers::streamed in planes): each plane written
  // into `plane_buf`, then copied out with streaming stores
  const bool stream_planes = std::is_same_v<scalar_t, float> && stream;
  // Blocks of planes, as in the forward: the cell gradients of the block
  // are summed vector over its planes, then each plane's rows are written.
  const int64_t planes = N * C, B = kPlaneBlock;
  const int64_t blocks = (planes + B - 1) / B;
  const int64_t grain = block_grain(H, W);
  // Column w's cell within a row of cells (b * B), or -1 where no window
  // reads it: the row templates' lookups, in locals (read through the plan
  // and the lambda's captures, every element reloaded them: most of this
  // kernel's time on (16, 256, 16, 16)).
  std::vector<int64_t> col_cell(static_cast<size_t>(W));
  for (int64_t w = 0; w < W; ++w) col_cell[w] = p.w.seg_of[w] >= 0 ? p.w.seg_of[w] * B : -1;
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> cells(static_cast<size_t>(SH * SW * B));
    std::vector<scalar_t> rows(static_cast<size_t>((SH + 1) * W));
    const int64_t* const cols = col_cell.data();
    const int64_t row_cells = SW * B, width = W, segments = SH;
    auto plane_buf = cpu::scratch<scalar_t>(stream_planes ? H * W : 0);
    int64_t sample_base[kPlaneBlock], channel[kPlaneBlock];
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t p0 = blk * B, pn = std::min(B, planes - p0);
      block_planes(p0, pn, C, p.total, sample_base, channel);
      std::fill(cells.begin(), cells.end(), acc_t(0));
      for (const BinRect& r : p.rects) {
        acc_t v[kPlaneBlock];
        const acc_t area = static_cast<acc_t>(r.area);
        for (int64_t k = 0; k < B; ++k)
          v[k] = static_cast<acc_t>(grad[sample_base[k] + r.out_offset + channel[k] * r.c_stride]) / area;
        for (int64_t a = r.a0; a < r.a1; ++a)
          for (int64_t b = r.b0; b < r.b1; ++b) {
            acc_t* cell = cells.data() + (a * SW + b) * B;
            for (int64_t k = 0; k < kPlaneBlock; ++k) cell[k] += v[k];
          }
      }
      for (int64_t k = 0; k < pn; ++k) {
        // Row template per H-segment (the last one: rows no window reads).
        for (int64_t a = 0; a < segments; ++a) {
          scalar_t* r = rows.data() + a * width;
          const acc_t* cell_row = cells.data() + a * row_cells + k;
          for (int64_t w = 0; w < width; ++w)
            r[w] = cols[w] >= 0 ? static_cast<scalar_t>(cell_row[cols[w]]) : scalar_t(0);
        }
        std::fill(rows.data() + segments * width, rows.data() + (segments + 1) * width, scalar_t(0));
        scalar_t* dst = stream_planes ? plane_buf.get() : gx + (p0 + k) * H * W;
        if (add.data) {
          // The addend's plane, added while the rows are written (one pass).
          const int64_t plane = p0 + k;
          for (int64_t h = 0; h < H; ++h) {
            const int64_t a = p.h.seg_of[h] < 0 ? SH : p.h.seg_of[h];
            add.add_row(dst + h * W, rows.data() + a * W, plane / C, plane % C, h, W);
          }
        } else {
          for (int64_t h = 0; h < H; ++h) {
            const int64_t a = p.h.seg_of[h] < 0 ? SH : p.h.seg_of[h];
            const scalar_t* r = rows.data() + a * W;
            scalar_t* d = dst + h * W;
#pragma omp simd
            for (int64_t w = 0; w < W; ++w) d[w] = r[w];  // short rows: no memmove call
          }
        }
        if constexpr (std::is_same_v<scalar_t, float>) {
          if (stream_planes) simd::copy_streaming(gx + (p0 + k) * H * W, dst, H * W);
        }
      }
    }
    if (stream_planes) simd::stream_fence();
  });
}

template <typename scalar_t>
void avg_backward_channels_last(const scalar_t* grad, scalar_t* gx,
                                const PoolPlan& p, int64_t N, int64_t C,
                                int64_t H, int64_t W, const Addend<scalar_t>& add, bool stream) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t SH = p.h.num_segments(), SW = p.w.num_segments();
  // Phase 1: each cell's gradient, [n][cell][c] (small: cells x C per sample).
  auto vals = cpu::scratch<scalar_t>(N * SH * SW * C);
  const int64_t chunk = std::min<int64_t>(C, 64);
  const int64_t chunks = (C + chunk - 1) / chunk;
  at::parallel_for(0, N * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> cells(static_cast<size_t>(SH * SW * chunk));
    std::vector<acc_t> bin_grad(static_cast<size_t>(chunk));
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / chunks;
      const int64_t c0 = (task % chunks) * chunk;
      const int64_t cn = std::min(chunk, C - c0);
      const scalar_t* g = grad + n * C * p.total;
      std::fill(cells.begin(), cells.end(), acc_t(0));
      // Each cell's gradient: grad / area of every bin covering it, summed
      // in packed (level-then-bin) order; channels innermost, so vectorized.
      for (const BinRect& r : p.rects) {
        const acc_t area = static_cast<acc_t>(r.area);
        const scalar_t* gb = g + r.out_offset + c0 * r.c_stride;
        for (int64_t c = 0; c < cn; ++c) bin_grad[c] = static_cast<acc_t>(gb[c * r.c_stride]) / area;
        for (int64_t a = r.a0; a < r.a1; ++a)
          for (int64_t b = r.b0; b < r.b1; ++b) {
            acc_t* cell = cells.data() + (a * SW + b) * chunk;
#pragma omp simd
            for (int64_t c = 0; c < cn; ++c) cell[c] += bin_grad[c];
          }
      }
      for (int64_t cell = 0; cell < SH * SW; ++cell)
        for (int64_t c = 0; c < cn; ++c)
          vals[(n * SH * SW + cell) * C + c0 + c] = static_cast<scalar_t>(cells[cell * chunk + c]);
    }
  });
  // Phase 2: one task per output row writes whole pixels (all channels);
  // float, stream (output_buffers::streamed in rows): into `row_buf`, then
  // copied out with streaming stores.
  const bool stream_rows = std::is_same_v<scalar_t, float> && stream;
  at::parallel_for(0, N * H, 1, [&](int64_t begin, int64_t end) {
    auto row_buf = cpu::scratch<scalar_t>(stream_rows ? W * C : 0);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / H, h = task % H;
      const int64_t a = p.h.seg_of[h];
      scalar_t* row = stream_rows ? row_buf.get() : gx + ((n * H + h) * W) * C;
      for (int64_t w = 0; w < W; ++w) {
        const int64_t b = p.w.seg_of[w];
        scalar_t* px = row + w * C;
        if (add.data) {
          // The addend's pixel, added while the pixel is written (one pass).
          if (a < 0 || b < 0) {
            const scalar_t* s = add.data + n * add.sn + h * add.sh + w * add.sw;
            for (int64_t c = 0; c < C; ++c) px[c] = s[c * add.sc] + scalar_t(0);
          } else {
            add.add_pixel(px, vals.get() + (n * SH * SW + a * SW + b) * C, n, h, w, C);
          }
        } else if (a < 0 || b < 0) {
          std::fill(px, px + C, scalar_t(0));
        } else {
          const scalar_t* v = vals.get() + (n * SH * SW + a * SW + b) * C;
          std::copy(v, v + C, px);
        }
      }
      if constexpr (std::is_same_v<scalar_t, float>) {
        if (stream_rows) simd::copy_streaming(gx + ((n * H + h) * W) * C, row, W * C);
      }
    }
    if (stream_rows) simd::stream_fence();
  });
}

// Max: each bin's gradient goes to the element its index names, summed in
// level-then-bin order in acc_t (so 16-bit gradients are summed in fp32),
// then rounded to scalar_t and added to the addend, if any, as it is written.
template <typename scalar_t>
void max_backward(const scalar_t* grad, const int64_t* indices, scalar_t* gx,
                  const PoolPlan& p, int64_t N, int64_t C, int64_t H,
                  int64_t W, bool channels_last, const Addend<scalar_t>& add, bool stream) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return max_pool::backward(grad, indices, gx, max_levels(p), p.max_bins(), N, H, W, channels_last, add, stream);
  }
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t HW = H * W;
  at::parallel_for(0, N * C, plane_grain(H, W), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(static_cast<size_t>(HW));
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t n = plane / C, c = plane % C;
      const scalar_t* g = grad + n * C * p.total;
      const int64_t* ix = indices + n * C * p.total;
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t l = 0; l < p.levels(); ++l)
        for (int64_t i = 0; i < p.bh[l]; ++i)
          for (int64_t j = 0; j < p.bw[l]; ++j) {
            const int64_t o = p.out_index(l, c, i, j);
            const int64_t k = ix[o];
            TORCH_CHECK(0 <= k && k < HW,
                        "multi_pool2d_backward: index out of range");
            acc[k] += static_cast<acc_t>(g[o]);
          }
      scalar_t* dst = channels_last ? gx + n * HW * C + c : gx + plane * HW;
      const int64_t step = channels_last ? C : 1;
      if (add.data) {
        const scalar_t* src = add.data + n * add.sn + c * add.sc;
        for (int64_t k = 0; k < HW; ++k)
          dst[k * step] = src[(k / W) * add.sh + (k % W) * add.sw] + static_cast<scalar_t>(acc[k]);
      } else {
        for (int64_t k = 0; k < HW; ++k) dst[k * step] = static_cast<scalar_t>(acc[k]);
      }
    }
  });
}

at::Tensor multi_pool2d_backward_cpu(
    const at::Tensor& grad_in, const std::optional<at::Tensor>& indices_in,
    c10::IntArrayRef input_shape, c10::IntArrayRef h_bounds,
    c10::IntArrayRef w_bounds, c10::IntArrayRef level_bins, int64_t mode,
    bool channels_last_levels, bool channels_last_input,
    const std::optional<at::Tensor>& addend) {
  const char* name = "pyramid_ext::multi_pool2d_backward";
  const PoolCall call = check_pool_backward_input(name, grad_in, input_shape, mode, channels_last_input);
  const int64_t N = call.N, C = call.C, H = call.H, W = call.W;
  const auto plan = cached_plan(name, h_bounds, w_bounds, level_bins, H, W, C, channels_last_levels);
  const PoolPlan& p = *plan;
  check_pool_backward_grad(name, grad_in, indices_in, mode, call, p.total);
  check_pool_addend(name, addend, grad_in, input_shape);
  const at::Tensor grad = grad_in.contiguous();
  const auto fmt = channels_last_input ? at::MemoryFormat::ChannelsLast
                                       : at::MemoryFormat::Contiguous;
  at::Tensor gx = output_buffers::empty({N, C, H, W}, grad.options(), fmt);
  if (gx.numel() == 0) return gx;
  const at::Tensor indices = mode == kPoolMax ? indices_in->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, grad.scalar_type(), "multi_pool2d_backward_cpu",
      [&] {
        const scalar_t* gp = grad.const_data_ptr<scalar_t>();
        scalar_t* op = gx.mutable_data_ptr<scalar_t>();
        const Addend<scalar_t> add = addend_view<scalar_t>(addend);
        // streaming stores in runs of whole planes (NCHW) or rows of pixels (channels_last)
        const bool stream = output_buffers::streamed(gx, channels_last_input ? W * C : H * W);
        if (mode == kPoolAvg) {
          if (channels_last_input) avg_backward_channels_last(gp, op, p, N, C, H, W, add, stream);
          else avg_backward_nchw(gp, op, p, N, C, H, W, add, stream);
        } else {
          max_backward(gp, indices.const_data_ptr<int64_t>(), op, p, N, C, H, W, channels_last_input, add, stream);
        }
      });
  return gx;
}

}  // namespace

TORCH_LIBRARY_IMPL(pyramid_ext, CPU, m) {
  m.impl("multi_pool2d", &multi_pool2d_cpu);
  m.impl("multi_pool2d_backward", &multi_pool2d_backward_cpu);
}

}  // namespace pyramid_ext
