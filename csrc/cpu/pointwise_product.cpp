// See pointwise_product.h. Two copies of the kernel (AVX-512; AVX2 with
// FMA), each compiled under its own `#pragma GCC target`, as simd_loops.cpp
// compiles its loops, and picked per call from the CPU and the simd_isa
// test switch.
#include "cpu/pointwise_product.h"

#include <cmath>
#include <algorithm>
#include <cstring>
#include <stdexcept>

#include "cpu/avx2_tile.h"
#include "cpu/simd_loops.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PE_PP_X86 1
#include <immintrin.h>
#else
#define PE_PP_X86 0
#endif

#define PE_PP_INLINE inline __attribute__((always_inline))

namespace pyramid_ext::cpu::pointwise_product {

#if PE_PP_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace isa_avx2 {
using V = __m256;
constexpr int64_t kLanes = 8;
constexpr int kVectors = 2;
PE_PP_INLINE V zero() { return _mm256_setzero_ps(); }
PE_PP_INLINE V load(const float* p) { return _mm256_loadu_ps(p); }
PE_PP_INLINE void store(float* p, V v) { _mm256_storeu_ps(p, v); }
PE_PP_INLINE V set1(float x) { return _mm256_set1_ps(x); }
PE_PP_INLINE V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
PE_PP_INLINE V add(V a, V b) { return _mm256_add_ps(a, b); }
PE_PP_INLINE V mul(V a, V b) { return _mm256_mul_ps(a, b); }
// 0 where v < 0: a NaN (and -0.0) kept, as ATen's relu
PE_PP_INLINE V relu(V v) {
  return _mm256_blendv_ps(v, _mm256_setzero_ps(), _mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_LT_OQ));
}
#include "cpu/pointwise_product_body.inc"

// Plan::wt from a weight whose rows are contiguous (col_stride 1): 8 x 8
// blocks transposed in registers, blocks of 8 rows outermost (each row read
// in order). Made per call and before the products start, the scalar
// transposition of a PPM's four (64, 256) weights had been 12% of its tails'
// time on two threads ((16, 256, 16, 16), AMD EPYC): each element a scalar
// load and a scalar store 256 bytes from the last.
void transpose_weight(const float* weight, int64_t cout, int64_t cin, int64_t row_stride, float* wt) {
  constexpr int64_t kB = 8;  // kBlock is whole blocks of 8: a block never crosses two
  for (int64_t co0 = 0; co0 < cout; co0 += kB) {
    const int64_t co1 = co0 + kB < cout ? co0 + kB : cout;
    float* to = wt + co0 / kBlock * cin * kBlock + co0 % kBlock;
    for (int64_t ci0 = 0; ci0 < cin; ci0 += kB) {
      const int64_t ci1 = ci0 + kB < cin ? ci0 + kB : cin;
      if (co1 - co0 == kB && ci1 - ci0 == kB) {
        __m256 rows[8], cols[8];
#pragma GCC unroll 8
        for (int k = 0; k < 8; ++k) rows[k] = _mm256_loadu_ps(weight + (co0 + k) * row_stride + ci0);
        simd::avx2::transpose8(rows, cols);
#pragma GCC unroll 8
        for (int k = 0; k < 8; ++k) _mm256_storeu_ps(to + (ci0 + k) * kBlock, cols[k]);
        continue;
      }
      for (int64_t co = co0; co < co1; ++co)
        for (int64_t ci = ci0; ci < ci1; ++ci) to[ci * kBlock + co - co0] = weight[co * row_stride + ci];
    }
  }
}
}  // namespace isa_avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f")
namespace isa_avx512 {
using V = __m512;
constexpr int64_t kLanes = 16;
constexpr int kVectors = 4;
PE_PP_INLINE V zero() { return _mm512_setzero_ps(); }
PE_PP_INLINE V load(const float* p) { return _mm512_loadu_ps(p); }
PE_PP_INLINE void store(float* p, V v) { _mm512_storeu_ps(p, v); }
PE_PP_INLINE V set1(float x) { return _mm512_set1_ps(x); }
PE_PP_INLINE V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
PE_PP_INLINE V add(V a, V b) { return _mm512_add_ps(a, b); }
PE_PP_INLINE V mul(V a, V b) { return _mm512_mul_ps(a, b); }
PE_PP_INLINE V relu(V v) {
  return _mm512_mask_mov_ps(v, _mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_LT_OQ), _mm512_setzero_ps());
}
#include "cpu/pointwise_product_body.inc"
}  // namespace isa_avx512
#pragma GCC pop_options
#endif

namespace {

enum class Copy { kNone, kAvx2, kAvx512 };

Copy active_copy() {
#if PE_PP_X86
  static const bool fma = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  switch (simd::active_isa()) {
    case simd::Isa::kAvx512:
      return Copy::kAvx512;
    case simd::Isa::kAvx2:
      return fma ? Copy::kAvx2 : Copy::kNone;
    default:
      return Copy::kNone;
  }
#else
  return Copy::kNone;
#endif
}

static_assert(kBlock % 16 == 0, "a block is whole chunks of either copy");

Scratch<float> zeros(int64_t n) {
  Scratch<float> a = scratch<float>(n);
  std::memset(a.get(), 0, static_cast<size_t>(n) * sizeof(float));
  return a;
}

// Plan::wt: the weight transposed into blocks of kBlock output channels.
void make_wt(Plan& p, const float* weight, int64_t cout, int64_t cin, int64_t row_stride, int64_t col_stride) {
  p.wt = cout == p.cout_pad ? scratch<float>(cin * p.cout_pad) : zeros(cin * p.cout_pad);
  float* wt = p.wt.get();
#if PE_PP_X86
  if (col_stride == 1 && active_copy() != Copy::kNone) {  // (every copy's CPU has AVX2)
    isa_avx2::transpose_weight(weight, cout, cin, row_stride, wt);
    return;
  }
#endif
  // transposed in 8 x 8 blocks: a weight row's floats read in order, written
  // to 8 rows of wt at a time
  constexpr int64_t kB = 8;
  for (int64_t co0 = 0; co0 < cout; co0 += kB) {
    const int64_t co1 = co0 + kB < cout ? co0 + kB : cout;
    for (int64_t ci0 = 0; ci0 < cin; ci0 += kB) {
      const int64_t ci1 = ci0 + kB < cin ? ci0 + kB : cin;
      for (int64_t co = co0; co < co1; ++co)
        for (int64_t ci = ci0; ci < ci1; ++ci) wt[(co / kBlock * cin + ci) * kBlock + co % kBlock] = weight[co * row_stride + ci * col_stride];
    }
  }
}

}  // namespace

bool available() { return active_copy() != Copy::kNone; }

bool planar(const Layout& l) { return l.sw == 1 && l.sh == l.w && (l.h * l.w) % kPlaneUnit == 0; }

Plan make_plan(const float* weight, int64_t cout, int64_t cin, int64_t row_stride, int64_t col_stride,
               const float* bias, const float* bn_weight, const float* bn_bias, const float* bn_mean,
               const float* bn_var, double bn_eps, bool relu, bool rows) {
  Plan p;
  p.cin = cin;
  p.cout = cout;
  p.weight = weight;
  p.w_row = row_stride;
  p.w_col = col_stride;
  p.cout_pad = (cout + kBlock - 1) / kBlock * kBlock;
  if (rows) make_wt(p, weight, cout, cin, row_stride, col_stride);
  if (bias) {
    p.bias = zeros(p.cout_pad);
    std::memcpy(p.bias.get(), bias, static_cast<size_t>(cout) * sizeof(float));
  }
  if (bn_mean) {
    // ATen's eval BatchNorm in float: alpha = w / sqrt(var + eps), beta = b - mean * alpha
    p.scale = zeros(p.cout_pad);
    p.shift = zeros(p.cout_pad);
    for (int64_t co = 0; co < cout; ++co) {
      const float invstd = 1.0f / std::sqrt(bn_var[co] + static_cast<float>(bn_eps));
      const float alpha = invstd * (bn_weight ? bn_weight[co] : 1.0f);
      p.scale.get()[co] = alpha;
      p.shift.get()[co] = (bn_bias ? bn_bias[co] : 0.0f) - bn_mean[co] * alpha;
    }
  }
  p.relu = relu;
  return p;
}

void run(const Plan& plan, const float* src, const Layout& src_layout, float* dst, const Layout& dst_layout,
         int64_t p0, int64_t p1) {
  if (p1 <= p0 || plan.cout == 0) return;
#if PE_PP_X86
  const bool planes = planar(src_layout) && planar(dst_layout) && p0 % kPlaneUnit == 0 && p1 % kPlaneUnit == 0;
  if (!planes && !plan.wt) throw std::logic_error("pointwise_product::run: rows of pixels on a plan made without rows");
  switch (active_copy()) {
    case Copy::kAvx512:
      if (planes) return isa_avx512::run_planes(plan, src, src_layout, dst, dst_layout, p0, p1);
      return isa_avx512::run(plan, src, src_layout, dst, dst_layout, p0, p1);
    case Copy::kAvx2:
      if (planes) return isa_avx2::run_planes(plan, src, src_layout, dst, dst_layout, p0, p1);
      return isa_avx2::run(plan, src, src_layout, dst, dst_layout, p0, p1);
    default:
      break;
  }
#endif
  throw std::logic_error("pointwise_product::run: no copy of the kernel for this CPU (check available())");
}

}  // namespace pyramid_ext::cpu::pointwise_product
