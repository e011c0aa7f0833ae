// AVX-512 inner loops of the CPU RVQ (rvq_kernels_impl.h). Built with -mavx512f/bw/vl/dq and called only
// when oe::isa_active() says the CPU has them.
#include <immintrin.h>

#include "rvq/rvq_internal.h"

namespace oe {
namespace rvq {
namespace {

inline __mmask16 first(int n) { return n >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << n) - 1u); }

struct VecAvx512 {
  using reg = __m512;
  static constexpr int W = 16;
  static reg zero() { return _mm512_setzero_ps(); }
  static reg load(const float* p) { return _mm512_loadu_ps(p); }
  static reg broadcast(const float* p) { return _mm512_set1_ps(*p); }
  static void store(float* p, reg x) { _mm512_storeu_ps(p, x); }
  static reg load_part(const float* p, int n) { return _mm512_maskz_loadu_ps(first(n), p); }
  static reg fmadd(reg a, reg b, reg c) { return _mm512_fmadd_ps(a, b, c); }
  static float hsum(reg x) { return _mm512_reduce_add_ps(x); }
  static reg cvt16(__m256i h, oe_dtype dt) {
    return dt == OE_BF16 ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)) : _mm512_cvtph_ps(h);
  }
  static reg load_row(const char* p, oe_dtype dt) {
    if (dt == OE_F32) return _mm512_loadu_ps(reinterpret_cast<const float*>(p));
    return cvt16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)), dt);
  }
  static reg load_row_part(const char* p, oe_dtype dt, int n) {
    if (dt == OE_F32) return _mm512_maskz_loadu_ps(first(n), reinterpret_cast<const float*>(p));
    return cvt16(_mm256_maskz_loadu_epi16(first(n), p), dt);
  }
};

#include "rvq/rvq_kernels_impl.h"

void dots(const float* r, int nt, const void* rows, oe_dtype dt, int64_t nrows, int64_t D, float* out, int64_t ldd) {
  dots_impl<VecAvx512>(r, nt, rows, dt, nrows, D, out, ldd);
}

double exact_dist(const float* r, const void* row, oe_dtype dt, int64_t D) {
  const char* p = static_cast<const char*>(row);
  const int64_t es = dt == OE_F32 ? 4 : 2;
  __m512d acc0 = _mm512_setzero_pd(), acc1 = _mm512_setzero_pd();
  int64_t d = 0;
  for (; d < D; d += 16) {
    const int n = static_cast<int>(D - d < 16 ? D - d : 16);
    const __m512 x = _mm512_maskz_loadu_ps(first(n), r + d);
    const __m512 c = VecAvx512::load_row_part(p + d * es, dt, n);
    const __m512d lo = _mm512_sub_pd(_mm512_cvtps_pd(_mm512_castps512_ps256(x)),
                                     _mm512_cvtps_pd(_mm512_castps512_ps256(c)));
    const __m512d hi = _mm512_sub_pd(_mm512_cvtps_pd(_mm512_extractf32x8_ps(x, 1)),
                                     _mm512_cvtps_pd(_mm512_extractf32x8_ps(c, 1)));
    acc0 = _mm512_fmadd_pd(lo, lo, acc0);
    acc1 = _mm512_fmadd_pd(hi, hi, acc1);
  }
  return _mm512_reduce_add_pd(_mm512_add_pd(acc0, acc1));
}

void add_row(float* acc, const void* row, oe_dtype dt, int64_t n) {
  const char* p = static_cast<const char*>(row);
  const int64_t es = dt == OE_F32 ? 4 : 2;
  for (int64_t d = 0; d < n; d += 16) {
    const int m = static_cast<int>(n - d < 16 ? n - d : 16);
    const __mmask16 k = first(m);
    const __m512 c = VecAvx512::load_row_part(p + d * es, dt, m);
    _mm512_mask_storeu_ps(acc + d, k, _mm512_add_ps(_mm512_maskz_loadu_ps(k, acc + d), c));
  }
}

void gemm_tile(const float* r, int64_t ldr, int mt, const float* pc, int kc, float* s, int64_t lds, int accumulate) {
  gemm_tile_impl<VecAvx512>(r, ldr, mt, pc, kc, s, lds, accumulate);
}

}  // namespace

const Kernels& kernels_avx512() {
  static const Kernels k = {16, &dots, &exact_dist, &add_row, &gemm_tile, 32};
  return k;
}

}  // namespace rvq
}  // namespace oe
