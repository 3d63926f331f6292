// The float hot loops, compiled once per instruction set and dispatched at
// run time. Each copy of simd_loops_body.inc sits in its own namespace under
// `#pragma GCC target(...)` (what GCC's target_clones does per clone); the
// copy is picked once, from __builtin_cpu_supports, or from the test-only
// switch test_overrides::kSimdIsa, so the tests can run every copy the CPU
// supports (the baseline one included) on an AVX-512 machine.
#include "cpu/simd_loops.h"

#include <cstring>
#include <type_traits>
#include <utility>

#include "cpu/avx2_tile.h"
#include "cpu/test_overrides.h"
#include "pyramid_index.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define PE_X86_MULTIVERSION 1
#else
#define PE_X86_MULTIVERSION 0
#endif
// Streaming (non-temporal) stores: x86-64's SSE/AVX stream intrinsics (SSE2 is baseline there).
#if defined(__x86_64__)
#include <immintrin.h>
#define PE_STREAM_STORES 1
#else
#define PE_STREAM_STORES 0
#endif
#define PE_INLINE inline __attribute__((always_inline))

namespace pyramid_ext {
namespace simd {

// PE_MAX_LANES: the float lanes of the copy's native vector, which the max
// loops compare and select in (simd_loops_body.inc). Set here, per copy:
// GCC does not define __AVX2__ / __AVX512F__ under `#pragma GCC target` in
// C++, so testing those macros in the body gave every copy 4 lanes.
#define PE_MAX_LANES 4
namespace isa_baseline {
#include "cpu/simd_loops_body.inc"
}  // namespace isa_baseline
#undef PE_MAX_LANES

#if PE_X86_MULTIVERSION
#pragma GCC push_options
#pragma GCC target("avx2,fma")  // (FMA: tree_means' quotients; every AVX2 CPU has it)
#define PE_MAX_LANES 8
namespace isa_avx2 {
#include "cpu/simd_loops_body.inc"
}  // namespace isa_avx2
#undef PE_MAX_LANES
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f")
#define PE_MAX_LANES 16
namespace isa_avx512 {
#include "cpu/simd_loops_body.inc"
}  // namespace isa_avx512
#undef PE_MAX_LANES
#pragma GCC pop_options
#endif

namespace {

struct Loops {
  decltype(&isa_baseline::sum_rows) sum_rows;
  decltype(&isa_baseline::add_row_sum) add_row_sum;
  decltype(&isa_baseline::set_row_sum) set_row_sum;
  decltype(&isa_baseline::add_row_sum_f64) add_row_sum_f64;
  decltype(&isa_baseline::cell_sum) cell_sum;
  decltype(&isa_baseline::add_run_f64) add_run_f64;
  decltype(&isa_baseline::rect_means) rect_means;
  decltype(&isa_baseline::bin_means) bin_means;
  decltype(&isa_baseline::tree_means) tree_means;
  decltype(&isa_baseline::max_rows) max_rows;
  decltype(&isa_baseline::blend) blend;
  decltype(&isa_baseline::axpy) axpy;
  decltype(&isa_baseline::shift_add_planes) shift_add_planes;
  decltype(&isa_baseline::shift_add_pixels) shift_add_pixels;
  decltype(&isa_baseline::axpy_pixels) axpy_pixels;
  decltype(&isa_baseline::resize_row) resize_row;
  decltype(&isa_baseline::resize_rows) resize_rows;
  decltype(&isa_baseline::bilinear) bilinear;
  decltype(&isa_baseline::resize_planes) resize_planes;
  decltype(&isa_baseline::concat_pixels) concat_pixels;
  decltype(&isa_baseline::copy_streaming) copy_streaming;
  decltype(&isa_baseline::max_pixels) max_pixels;
  decltype(&isa_baseline::max_rect) max_rect;
  decltype(&isa_baseline::max_cell_keys) max_cell_keys;
  decltype(&isa_baseline::max_keys) max_keys;
  decltype(&isa_baseline::max_rect_keys) max_rect_keys;
  decltype(&isa_baseline::max_pixels_values) max_pixels_values;
  decltype(&isa_baseline::max_rect_values) max_rect_values;
};

#define PE_LOOPS(ns)                                                                                   \
  Loops {                                                                                              \
    ns::sum_rows, ns::add_row_sum, ns::set_row_sum, ns::add_row_sum_f64, ns::cell_sum, ns::add_run_f64, ns::rect_means, ns::bin_means,  \
        ns::tree_means, ns::max_rows,                                                                          \
        ns::blend, ns::axpy, ns::shift_add_planes, ns::shift_add_pixels, ns::axpy_pixels, ns::resize_row, ns::resize_rows, ns::bilinear,   \
        ns::resize_planes,                                                                          \
        ns::concat_pixels, ns::copy_streaming, ns::max_pixels, ns::max_rect, ns::max_cell_keys, ns::max_keys, ns::max_rect_keys,\
        ns::max_pixels_values, ns::max_rect_values                                                  \
  }
constexpr Loops kBaseline = PE_LOOPS(isa_baseline);
#if PE_X86_MULTIVERSION
constexpr Loops kAvx2 = PE_LOOPS(isa_avx2);
constexpr Loops kAvx512 = PE_LOOPS(isa_avx512);
#endif
#undef PE_LOOPS

Isa best_isa() {
#if PE_X86_MULTIVERSION
  if (__builtin_cpu_supports("avx512f")) return Isa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
#endif
  return Isa::kBaseline;
}

const Loops& loops_for(Isa isa) {
#if PE_X86_MULTIVERSION
  if (isa == Isa::kAvx512) return kAvx512;
  if (isa == Isa::kAvx2) return kAvx2;
#endif
  return kBaseline;
}

// One relaxed load and a compare per call, as cheap as the PLT jump the
// target_clones resolver left.
const Loops& loops() {
  static const Isa best = best_isa();
  const int64_t forced = test_overrides::get(test_overrides::kSimdIsa);
  return loops_for(forced ? static_cast<Isa>(forced) : best);
}

}  // namespace

bool isa_available(Isa isa) {
  switch (isa) {
    case Isa::kBaseline:
      return true;
#if PE_X86_MULTIVERSION
    case Isa::kAvx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case Isa::kAvx512:
      return __builtin_cpu_supports("avx512f");
#endif
    default:
      return false;
  }
}

Isa active_isa() {
  const int64_t forced = test_overrides::get(test_overrides::kSimdIsa);
  return forced ? static_cast<Isa>(forced) : best_isa();
}

void sum_rows(float* acc, int64_t acc_stride, const float* src, int64_t rows, int64_t stride, int64_t n) {
  loops().sum_rows(acc, acc_stride, src, rows, stride, n);
}
void add_row_sum(float* acc, const float* src, int64_t rows, int64_t stride, int64_t n) {
  loops().add_row_sum(acc, src, rows, stride, n);
}
void set_row_sum(float* run, const float* src, int64_t rows, int64_t stride, int64_t n) {
  loops().set_row_sum(run, src, rows, stride, n);
}
void cell_sum(float* cell, int64_t vec_stride, const float* src, int64_t rows, int64_t row_stride, int64_t w,
              int64_t pixel_stride, int64_t n, bool general_loop) {
  loops().cell_sum(cell, vec_stride, src, rows, row_stride, w, pixel_stride, n, general_loop);
}
void add_row_sum_f64(double* acc, float* run, const float* src, int64_t rows, int64_t stride, int64_t n,
                     bool first) {
  loops().add_row_sum_f64(acc, run, src, rows, stride, n, first);
}
void add_run_f64(double* acc, const float* src, int64_t rows, int64_t stride, int64_t n) {
  loops().add_run_f64(acc, src, rows, stride, n);
}
void rect_means(float* dst, int64_t dst_stride, const float* cells, int64_t row_stride, int64_t cell_stride,
                int64_t a0, int64_t a1, int64_t b0, int64_t b1, double area, int64_t n) {
  loops().rect_means(dst, dst_stride, cells, row_stride, cell_stride, a0, a1, b0, b1, area, n);
}
void bin_means(float* dst, const BinOut* bins, int64_t num_bins, const float* cells, int64_t SH, int64_t SW,
               int64_t C, int64_t c0, int64_t n, double* scratch, const void* prefetch, int64_t prefetch_bytes) {
  loops().bin_means(dst, bins, num_bins, cells, SH, SW, C, c0, n, scratch, prefetch, prefetch_bytes);
}
void tree_means(float* dst, const int32_t* program, int64_t program_size, int64_t num_sums, const TreeOut* outs,
                int64_t num_outs, float* cells, int64_t num_cells, int64_t vec_stride, int64_t c0, int64_t n,
                float* sums, const void* prefetch, int64_t prefetch_bytes) {
  loops().tree_means(dst, program, program_size, num_sums, outs, num_outs, cells, num_cells, vec_stride, c0, n,
                     sums, prefetch, prefetch_bytes);
}
void max_rows(float* m, int32_t* r, const float* src, int64_t rows, int64_t stride, int64_t n, int32_t h0) {
  loops().max_rows(m, r, src, rows, stride, n, h0);
}
void blend(float* d, const float* r0, const float* r1, float w0, float w1, int64_t n) {
  loops().blend(d, r0, r1, w0, w1, n);
}
void axpy(float* acc, const float* src, float a, int64_t n) { loops().axpy(acc, src, a, n); }
AxpyLoop axpy_loop() { return loops().axpy; }
void shift_add_planes(float* const* d, int64_t d_stride, const float* const* base, int64_t base_stride,
                      const float* rows, int64_t rows_plane, const int64_t* off, const float* w,
                      const int64_t* first, int64_t h, int64_t width, int64_t planes) {
  loops().shift_add_planes(d, d_stride, base, base_stride, rows, rows_plane, off, w, first, h, width, planes);
}
void shift_add_pixels(float* d, int64_t d_stride, const float* base, int64_t base_stride, const float* u,
                      const PixelTerm* terms, const int64_t* first, int64_t count, int64_t n) {
  loops().shift_add_pixels(d, d_stride, base, base_stride, u, terms, first, count, n);
}
void axpy_pixels(float* u, int64_t u_stride, const float* s, int64_t s_stride, float w, int64_t count, int64_t n) {
  loops().axpy_pixels(u, u_stride, s, s_stride, w, count, n);
}
void resize_row(float* d, const float* s, int64_t len, ResizeTable t, int64_t n, bool accumulate) {
  loops().resize_row(d, s, len, t, n, accumulate);
}
void resize_rows(float* d, int64_t d_stride, const float* s, int64_t s_stride, int64_t rows, int64_t len,
                 int64_t readable, ResizeTable t, int64_t n, bool accumulate) {
  loops().resize_rows(d, d_stride, s, s_stride, rows, len, readable, t, n, accumulate);
}
void bilinear(float* d, const float* p00, const float* p01, const float* p10, const float* p11, float wy0,
              float wy1, float wx0, float wx1, int64_t n) {
  loops().bilinear(d, p00, p01, p10, p11, wy0, wy1, wx0, wx1, n);
}

void resize_planes(float* d, int64_t d_plane, int64_t d_row, const float* s, int64_t s_plane, int64_t s_row,
                   const PlaneResize& r, int64_t planes, float* rows) {
  loops().resize_planes(d, d_plane, d_row, s, s_plane, s_row, r, planes, rows);
}
void copy_streaming(float* d, const float* s, int64_t n) { loops().copy_streaming(d, s, n); }
void stream_fence() {
#if PE_STREAM_STORES
  _mm_sfence();
#endif
}
void concat_pixels(float* d, int64_t d_stride, const PixelPart* parts, int64_t num_parts, int64_t w, bool stream) {
  loops().concat_pixels(d, d_stride, parts, num_parts, w, stream);
}

void max_pixels(float* m, int32_t* r, const float* src, int64_t pixels, int64_t stride, int64_t n, int32_t idx0,
                bool start) {
  loops().max_pixels(m, r, src, pixels, stride, n, idx0, start);
}
void max_rect(float* dst, int64_t* dst_idx, int64_t dst_stride, const float* cells_v, const int32_t* cells_i,
              int64_t row_stride, int64_t cell_stride, int64_t a0, int64_t a1, int64_t b0, int64_t b1, int64_t n,
              bool may_nan) {
  loops().max_rect(dst, dst_idx, dst_stride, cells_v, cells_i, row_stride, cell_stride, a0, a1, b0, b1, n, may_nan);
}
bool max_cell_keys(int64_t* keys, float* dst, int64_t* dst_idx, int64_t dst_stride, const float* src, int64_t rows,
                   int64_t row_stride, int64_t pixels, int64_t stride, int64_t n, int32_t idx0, int32_t W) {
  return loops().max_cell_keys(keys, dst, dst_idx, dst_stride, src, rows, row_stride, pixels, stride, n, idx0, W);
}
bool max_keys(int64_t* keys, float* dst, int64_t* dst_idx, int64_t dst_stride, const float* m, const int32_t* r,
              int64_t n) {
  return loops().max_keys(keys, dst, dst_idx, dst_stride, m, r, n);
}
void max_rect_keys(float* dst, int64_t* dst_idx, int64_t dst_stride, const int64_t* cells, int64_t row_stride,
                   int64_t cell_stride, int64_t a0, int64_t a1, int64_t b0, int64_t b1, int64_t n,
                   int64_t* keys_out) {
  loops().max_rect_keys(dst, dst_idx, dst_stride, cells, row_stride, cell_stride, a0, a1, b0, b1, n, keys_out);
}

void max_pixels_values(float* m, const float* src, int64_t pixels, int64_t stride, int64_t n, bool start) {
  loops().max_pixels_values(m, src, pixels, stride, n, start);
}
bool max_rect_values(float* dst, int64_t dst_stride, const float* cells, int64_t row_stride, int64_t cell_stride,
                     int64_t a0, int64_t a1, int64_t b0, int64_t b1, int64_t n) {
  return loops().max_rect_values(dst, dst_stride, cells, row_stride, cell_stride, a0, a1, b0, b1, n);
}

}  // namespace simd
}  // namespace pyramid_ext
