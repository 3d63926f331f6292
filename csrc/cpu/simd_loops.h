// Hot inner loops of the CPU kernels for float, compiled for several
// instruction sets (AVX-512, AVX2, baseline) and picked at run time from the
// CPU's features (simd_loops.cpp), so a source build runs at the width the
// machine has without -march flags. Other dtypes use the generic loops in
// the kernels.
#pragma once

#include <cstdint>

namespace pyramid_ext {
namespace simd {

// The instruction sets the loops are compiled for (values of the test-only
// switch test_overrides::kSimdIsa; 0 there means "the best available").
enum class Isa : int64_t { kBaseline = 1, kAvx2 = 2, kAvx512 = 3 };
bool isa_available(Isa isa);
// The ISA the loops run now (the best available, unless a test forced one).
Isa active_isa();

// Average pooling sums float elements in short runs in float (the fast
// vector loops) and adds the runs' sums in double (cells, bins); the error
// bound rests on one rule: an element passes through at most kRunLength - 1
// float roundings. NCHW: a run is r <= kRunLength rows summed per column,
// then c of those column sums, (r - 1) + (c - 1) <= kRunLength - 1.
// channels_last: k rows of w <= kRunLength - 1 pixels, each row summed in
// groups of four as (p0 + p1) + (p2 + p3), the groups left to right
// (row_sum_depth(w) <= 4 additions), then the k row sums, with
// row_sum_depth(w) + k - 1 <= kRunLength - 2, or kRunLength - 1 pixels of a
// wider row; its cells are rounded once to float (one more rounding), or
// are a single run. A run starts from its first element or from an exact
// 0 + x. Error bound of a mean of n <= 2^31 elements (u32 = 2^-24,
// u64 = 2^-53): with the runs' sums converted exactly, an element then
// passes at most n - 1 double additions (every summation tree of m <= n
// terms), one double division by the exact area and one rounding to float:
//   |mean - exact| <= ((kRunLength - 1) u32 + n u64 + u32) mean(|x|)
//                  <= (11 * 2^-24 + 2^-22 + 2^-24) mean(|x|) < 9.6e-7 mean(|x|)
// (second-order terms below 1e-12): 1e-6 relative to the mean for
// non-negative data, to the mean of |x| for mixed signs. Plain float
// accumulation over a long window drifts by up to n u32 instead. Small
// channels_last maps may sum their bins in float instead (tree_means):
// balanced trees of float additions over the cells, kept only where every
// element passes at most kRunLength - 1 float roundings in all (its cell's
// and the tree's); the mean is then the correctly rounded quotient, so
//   |mean - exact| <= ((kRunLength - 1) u32 + u32) mean(|x|) < 7.2e-7 mean(|x|).
constexpr int64_t kRunLength = 12;

// Float additions an element of a w-pixel row sum (add_row_sum) passes.
constexpr int64_t row_sum_depth(int64_t w) {
  return (w >= 3 ? 2 : w - 1) + (w + 3) / 4 - 1;
}

// acc[w * acc_stride] = sum over r < rows of src[r * stride + w], for w < n.
void sum_rows(float* acc, int64_t acc_stride, const float* src, int64_t rows, int64_t stride, int64_t n);
// run[i] += (src[i] + src[stride + i] + ...) for i < n: the `rows` rows
// summed in float in groups of four, (p0 + p1) + (p2 + p3), the groups left
// to right, then added to the float run.
void add_row_sum(float* run, const float* src, int64_t rows, int64_t stride, int64_t n);
// The same row sum starting a run: run[i] = (src[i] + src[stride + i] + ...)
// (add_row_sum onto a zero run, but for the sign of a zero sum).
void set_row_sum(float* run, const float* src, int64_t rows, int64_t stride, int64_t n);
// The same, then the run ends: acc[i] += (double)run[i] (acc[i] = when
// `first`) and run[i] = 0.
// The sum of a block of `rows` rows of w pixels (pixel p of row r at src +
// r * row_stride + p * pixel_stride), channel i < n, to cell[i / 16 *
// vec_stride + i % 16] (vec_stride 16: contiguous): each row's pixels summed
// as add_row_sum sums them, the row sums added top to bottom (set_row_sum's
// first row, then add_row_sum's: the same bits), the sums in registers, 64
// channels at a time (a run through memory cost a load and a store per row,
// and a call per row). Cells of at most 2 x 2 pixels take a loop without
// branches on the pixels left, unless general_loop (a test switch): the
// same additions.
void cell_sum(float* cell, int64_t vec_stride, const float* src, int64_t rows, int64_t row_stride, int64_t w,
              int64_t pixel_stride, int64_t n, bool general_loop = false);
void add_row_sum_f64(double* acc, float* run, const float* src, int64_t rows, int64_t stride, int64_t n,
                     bool first);
// acc[i] += (double)(src[i] + src[stride + i] + ...) for i < n: the `rows`
// (<= kRunLength) rows summed in float, in order, then added in double.
void add_run_f64(double* acc, const float* src, int64_t rows, int64_t stride, int64_t n);
// One bin's means over a vector of n channels: dst[k * dst_stride] = (sum
// over a0 <= a < a1, b0 <= b < b1 of cells[a * row_stride + b * cell_stride
// + k]) / area, the float cells summed in double (a-major, in registers),
// the mean rounded to float.
void rect_means(float* dst, int64_t dst_stride, const float* cells, int64_t row_stride, int64_t cell_stride,
                int64_t a0, int64_t a1, int64_t b0, int64_t b1, double area, int64_t n);
// One bin of a channels_last average pooling for bin_means: its rectangle of
// cells (H-segments [a0, a1), W-segments [b0, b1)), its area, and where its
// mean of channel c goes (dst + offset + c * stride).
struct BinOut {
  int64_t a0, a1, b0, b1;
  double area;
  int64_t offset, stride;
};
// Every bin's means over channels [c0, c0 + n) of one sample's float cells
// (channel c of cell (a, b) at cells[(a * SW + b) * C + c], SH x SW cells):
// for each bin and channel rect_means' arithmetic in rect_means' order, so
// the same bits. 32 channels at a time: the chunk's cells are widened to
// double once into `scratch` (SH * SW * 32 doubles, in L1 for the few
// segments of a pyramid) and every bin is summed from there, where
// rect_means per bin widens each cell again and reads all channels of its
// cells (from L2 when C is large) per bin. The bytes [prefetch, prefetch +
// prefetch_bytes) (the next sample's input, or none) are prefetched into L2
// meanwhile, a few lines per bin: the bins are arithmetic on cells in cache,
// and reading x was half the time of a small map's sample when x came from L3.
void bin_means(float* dst, const BinOut* bins, int64_t num_bins, const float* cells, int64_t SH, int64_t SW,
               int64_t C, int64_t c0, int64_t n, double* scratch, const void* prefetch = nullptr,
               int64_t prefetch_bytes = 0);
// Float channels_last average pooling of a small map: every bin's sum as a
// balanced tree of float additions over its cells, a subtree shared by
// several bins summed once (the plan builds the trees, multi_pool2d.cpp).
// Nodes [0, num_cells) are the cells (a * SW + b); node num_cells + j is
// the j-th sum the program stores. The program (program_size int32s):
// stretches [shape, count, count x operands], each operand a node's byte
// offset (node id * kTreeChannels * 4) in a pass's nodes; shape 2: a + b,
// 3: (a + b) + c, 4: ((a + b) + c) + d, 5: (a + b) + (c + d) (a sum used
// once, by another sum, is not stored). Bin `out` of channel c: its node's sum s,
// mean s / area correctly rounded (what a float division gives), written to
// dst[offset + c * stride]: on AVX2 and AVX-512 in float with FMA (Markstein's
// correction, simd_loops_body.inc's quotients16) where every sum of the 16
// is zero or at least 2^-100 in magnitude; else (float)((double)s *
// inv_area), which with area < 2^27 is closer to s / area than s / area is
// to any float rounding boundary, but for a mean that lies exactly halfway
// between two subnormal floats, which it may round either way (one
// rounding all the same). kTreeChannels channels per
// pass: cell q's channels [c, c + 16) at cells + c / 16 * vec_stride + q *
// 16 (c0 a multiple of 16; lanes past the last channel zero), a pass's
// cells copied and its sums written to `sums` ((num_cells + num_sums) * 16
// floats, in L1 for a pyramid's few segments). sums == nullptr: in place,
// for a whole sample (c0 == 0, vec_stride == num_cells * 16, num_sums * 16
// writable floats after the last pass's cells): the passes run last to
// first, each pass's sums written after its cells, over those of the passes
// already done (no copy; they were in L1 from the pass before). The cells
// are overwritten, padding lanes included. The
// bytes [prefetch, prefetch + prefetch_bytes) (the next sample's input) are
// prefetched into L2 meanwhile, a line every few sums.
struct TreeOut {
  int64_t node;
  double inv_area;
  int64_t offset, stride;
  // The area as a float and the float nearest its reciprocal, where the
  // area is below 2^24 (exact in float); else 0: the double product only.
  float area = 0, inv_area_f = 0;
  // > 1 at the first of `block` outs whose offsets are offset + k and whose
  // stride is `block` (a level of a flattened SPP output, [c][bin]): channel
  // c's means of those outs are contiguous, written a channel at a time.
  int64_t block = 1;
};
constexpr int64_t kTreeMaxBlock = 64;  // outs in one such block at most
constexpr int64_t kTreeChannels = 16;
void tree_means(float* dst, const int32_t* program, int64_t program_size, int64_t num_sums, const TreeOut* outs,
                int64_t num_outs,
                float* cells, int64_t num_cells, int64_t vec_stride, int64_t c0, int64_t n, float* sums,
                const void* prefetch = nullptr, int64_t prefetch_bytes = 0);
// Column-wise running max over rows, ATen's rule (larger, or NaN): m/r hold
// the current maximum and its row; rows h0 + 1 .. h0 + rows - 1 are scanned
// after m is seeded with row h0.
void max_rows(float* m, int32_t* r, const float* src, int64_t rows, int64_t stride, int64_t n, int32_t h0);
// d[i] = w0 * r0[i] + w1 * r1[i]
void blend(float* d, const float* r0, const float* r1, float w0, float w1, int64_t n);
// acc[i] += a * src[i]
void axpy(float* acc, const float* src, float a, int64_t n);
// axpy's loop for this call's instruction set, to call directly where rows
// are a vector or two long (the dispatch per call was a tenth of
// upsample_concat's planar backward on 16-wide rows). Read once per call.
using AxpyLoop = void (*)(float* acc, const float* src, float a, int64_t n);
AxpyLoop axpy_loop();
// Planes p < planes of upsample_shift_add's output (planar float), from
// base[p] and plane p's G rows at rows + p * rows_plane: d[p][y * d_stride
// + x] = base[p][y * base_stride + x] + w[t] * rows[p * rows_plane + off[t]
// + x], the terms t of [first[y], first[y + 1]) added one after another
// (axpy's arithmetic: each term multiplied, then added; a weight of 1 not
// multiplied, the same bits), for y < h, x < width. The planes' sums are
// independent chains in registers, 4 planes at a time: one plane's 16-wide
// row alone is a chain of dependent additions, bound by their latency (and
// two axpy calls per output row and tap, before a call per plane, were
// about 40% of the op's CPU time on 16-wide rows).
void shift_add_planes(float* const* d, int64_t d_stride, const float* const* base, int64_t base_stride,
                      const float* rows, int64_t rows_plane, const int64_t* off, const float* w,
                      const int64_t* first, int64_t h, int64_t width, int64_t planes);
// One term of a channels_last output pixel: w0 * u[off0 + k] + w1 * u[off1 + k].
struct PixelTerm {
  int64_t off0, off1;
  float w0, w1;
};
// A channels_last output row of upsample_shift_add: pixel x < count,
// channel k < n: acc = base[x * base_stride + k], then for each term t of
// [first[x], first[x + 1]) in order acc = (acc + w0 * u[off0 + k]) + w1 *
// u[off1 + k] (the second product skipped where w1 is zero), written to d[x
// * d_stride + k]; the sums in registers across the terms (64 channels at a
// time), base read and the result written once.
void shift_add_pixels(float* d, int64_t d_stride, const float* base, int64_t base_stride, const float* u,
                      const PixelTerm* terms, const int64_t* first, int64_t count, int64_t n);
// u[j * u_stride + k] += w * s[j * s_stride + k] for j < count, k < n
// (axpy's arithmetic over `count` pixels in one call).
void axpy_pixels(float* u, int64_t u_stride, const float* s, int64_t s_stride, float w, int64_t count, int64_t n);
// A row resized along its length: t = w0[k] * s[i0[k]] + w1[k] * s[i1[k]],
// d[k] = d[k] + t (accumulate) or t, for k < n; s holds `len` floats and the
// tables are nondecreasing (bilinear taps). Eight outputs whose sources lie
// within eight consecutive floats (upsampling) take one load and two
// in-register permutes; the others are gathered one by one. The same
// roundings, in the same order, on every path.
struct ResizeTable {
  const int32_t* i0;
  const int32_t* i1;
  const float* w0;
  const float* w1;
};
void resize_row(float* d, const float* s, int64_t len, ResizeTable t, int64_t n, bool accumulate);
// resize_row for `rows` rows (d + r * d_stride from s + r * s_stride): a
// plane's rows in one call. `readable`: the floats readable from s on (at
// least (rows - 1) * s_stride + len; more where the source tensor goes on:
// a row narrower than a vector is then read in place, not copied first).
void resize_rows(float* d, int64_t d_stride, const float* s, int64_t s_stride, int64_t rows, int64_t len,
                 int64_t readable, ResizeTable t, int64_t n, bool accumulate);
// d[i] = wy0 * (wx0 * p00[i] + wx1 * p01[i]) + wy1 * (wx0 * p10[i] + wx1 * p11[i])
void bilinear(float* d, const float* p00, const float* p01, const float* p10, const float* p11, float wy0,
              float wy1, float wx0, float wx1, int64_t n);
// Planes of a planar source resized, one call for a task's run of planes of
// one branch (a call per short row, then per plane, cost as much as the row,
// the plane): plane p < planes of s (s + p * s_plane: r.hb rows of r.len
// floats, s_row apart) is resized along W into `rows` (r.hb rows of r.w
// floats; resize_row's arithmetic), then each of its r.h output rows y is
// blended from two of those (blend's arithmetic): d[p * d_plane + y * d_row
// + i] = r.th.w0[y] * rows[r.th.i0[y] * r.w + i] + r.th.w1[y] *
// rows[r.th.i1[y] * r.w + i] for i < r.w.
struct PlaneResize {
  ResizeTable tw, th;
  int64_t len, hb, w, h;
};
void resize_planes(float* d, int64_t d_plane, int64_t d_row, const float* s, int64_t s_plane, int64_t s_row,
                   const PlaneResize& r, int64_t planes, float* rows);
// d[i] = s[i] for i < n, d's vectors written with streaming stores (x86;
// store_or_stream in simd_loops_body.inc), for an output not expected in
// cache (output_buffers::streamed); the caller ends its task with
// stream_fence().
void copy_streaming(float* d, const float* s, int64_t n);
// Orders the calling thread's streaming stores before its later stores
// (theirs are weakly ordered): once at the end of a task that streamed,
// before another thread reads what they wrote.
void stream_fence();
// One output row of a channels_last concatenation, pixel by pixel: pixel x <
// w gets, for each part in turn, channels [offset, offset + n) of d + x *
// d_stride: copied from s0 + x * s_stride (copy), else bilinear (bilinear's
// arithmetic): source pixels t.i0[x] and t.i1[x] (s_stride floats apart) of
// the source rows s0 and s1, weights t.w0[x], t.w1[x] and wy0, wy1; 16 and 8
// channels at a time as vector values. Parts in channel order write each
// output pixel front to back: one stream. stream: the vectors stored
// non-temporally where aligned (x86; see store_or_stream), for an output
// that is not expected in cache (output_buffers::streamed); the caller ends
// its task with stream_fence().
struct PixelPart {
  const float* s0;
  const float* s1;
  int64_t s_stride;
  float wy0, wy1;
  ResizeTable t;
  int64_t offset, n;
  bool copy;
};
void concat_pixels(float* d, int64_t d_stride, const PixelPart* parts, int64_t num_parts, int64_t w,
                   bool stream);
// Max pooling over a vector of n channels, continuing a scan: pixel p < pixels
// (at src + p * stride) updates m[k] and its flat index r[k] = idx0 + p by
// ATen's rule (larger, or NaN), pixels in order. start: the scan starts
// here, the first pixel is copied (m[k] = src[k], r[k] = idx0): what a
// state of (-inf, idx0) becomes after it, without writing that state first.
void max_pixels(float* m, int32_t* r, const float* src, int64_t pixels, int64_t stride, int64_t n, int32_t idx0,
                bool start);
// One bin's maxima over a vector of n channels: the cells a0 <= a < a1,
// b0 <= b < b1 (values cells_v, flat indices cells_i at a * row_stride + b *
// cell_stride + k) combined by max_pool_combine's rule; dst[k * dst_stride]
// and dst_idx[k * dst_stride] receive value and index. may_nan false: the
// caller knows no cell is NaN (a combine of half the instructions).
void max_rect(float* dst, int64_t* dst_idx, int64_t dst_stride, const float* cells_v, const int32_t* cells_i,
              int64_t row_stride, int64_t cell_stride, int64_t a0, int64_t a1, int64_t b0, int64_t b1, int64_t n,
              bool may_nan);
// One cell of a channels_last max pooling, channels k < n: its pixels p <
// pixels of rows i < rows (at src + i * row_stride + p * stride, flat index
// idx0 + i * W + p) scanned row-major by ATen's rule from the first pixel,
// the state in registers across the pixels (a few vectors of channels at a
// time; a state load and store per pixel had been the scan's cost), written
// as int64 keys whose integer order is max_pool_combine's for NaN-free
// pieces (larger value, then earlier index; -0.0 equal to +0.0 but kept):
// keys[k]; dst not null: also as value dst[k * dst_stride] and int64 index
// dst_idx[k * dst_stride] (a bin scanned whole from its pixels). Each load
// also prefetches the same pixel's next vectors of channels. Returns
// whether some channel's maximum is NaN (then the keys, and the values and
// indices, are not to be used).
bool max_cell_keys(int64_t* keys, float* dst, int64_t* dst_idx, int64_t dst_stride, const float* src, int64_t rows,
                   int64_t row_stride, int64_t pixels, int64_t stride, int64_t n, int32_t idx0, int32_t W);
// max_pixels' state (m, r: n channels' values and flat indices) as such
// keys, and, dst not null, as values and int64 indices as max_cell_keys
// writes them; returns whether some m[k] is NaN (then none is to be used).
bool max_keys(int64_t* keys, float* dst, int64_t* dst_idx, int64_t dst_stride, const float* m, const int32_t* r,
              int64_t n);
// max_rect over such keys (a bin is their integer maximum per lane):
// dst[k * dst_stride], dst_idx[k * dst_stride] = the value and index of the
// largest key of channel k over the cells a0 <= a < a1, b0 <= b < b1 (at
// cells[a * row_stride + b * cell_stride + k]), k < n; and keys_out[k] =
// that key (for bins combined from bins).
void max_rect_keys(float* dst, int64_t* dst_idx, int64_t dst_stride, const int64_t* cells, int64_t row_stride,
                   int64_t cell_stride, int64_t a0, int64_t a1, int64_t b0, int64_t b1, int64_t n,
                   int64_t* keys_out);

// Values-only max pooling (multi_pool2d's mode kPoolMaxValues): max_pixels
// without the indices, m[k] taking src[k] by ATen's rule (larger, or NaN).
// start: as max_pixels' (the first pixel copied).
void max_pixels_values(float* m, const float* src, int64_t pixels, int64_t stride, int64_t n, bool start);
// One bin's values over n channels from such cells (a0 <= a < a1, b0 <= b <
// b1 at cells[a * row_stride + b * cell_stride + k]) into dst[k *
// dst_stride]: the maximum, exact for every lane whose maximum is neither
// NaN nor a zero with a -0.0 among the cells. Returns whether some lane is
// such a one: then the caller computes the bin with indices (which NaN, and
// which zero's sign, ATen returns depends on the elements' positions).
bool max_rect_values(float* dst, int64_t dst_stride, const float* cells, int64_t row_stride, int64_t cell_stride,
                     int64_t a0, int64_t a1, int64_t b0, int64_t b1, int64_t n);

}  // namespace simd
}  // namespace pyramid_ext
