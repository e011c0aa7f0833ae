// AVX2 + FMA + F16C inner loops of the CPU RVQ (rvq_kernels_impl.h). Built with -mavx2 -mfma -mf16c and
// called only when oe::isa_active() says the CPU has them.
#include <immintrin.h>

#include <cstring>

#include "rvq/rvq_internal.h"

namespace oe {
namespace rvq {
namespace {

inline float elem(const char* p, oe_dtype dt) {
  uint16_t h;
  switch (dt) {
    case OE_F32: {
      float f;
      std::memcpy(&f, p, 4);
      return f;
    }
    case OE_BF16: {
      std::memcpy(&h, p, 2);
      const uint32_t u = static_cast<uint32_t>(h) << 16;
      float f;
      std::memcpy(&f, &u, 4);
      return f;
    }
    default:
      std::memcpy(&h, p, 2);
      return _cvtsh_ss(h);
  }
}

struct VecAvx2 {
  using reg = __m256;
  static constexpr int W = 8;
  static reg zero() { return _mm256_setzero_ps(); }
  static reg load(const float* p) { return _mm256_loadu_ps(p); }
  static reg broadcast(const float* p) { return _mm256_broadcast_ss(p); }
  static void store(float* p, reg x) { _mm256_storeu_ps(p, x); }
  static reg load_part(const float* p, int n) {
    alignas(32) float tmp[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int i = 0; i < n; ++i) tmp[i] = p[i];
    return _mm256_load_ps(tmp);
  }
  static reg fmadd(reg a, reg b, reg c) { return _mm256_fmadd_ps(a, b, c); }
  static float hsum(reg x) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  static reg load_row(const char* p, oe_dtype dt) {
    if (dt == OE_F32) return _mm256_loadu_ps(reinterpret_cast<const float*>(p));
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    if (dt == OE_BF16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    return _mm256_cvtph_ps(h);
  }
  static reg load_row_part(const char* p, oe_dtype dt, int n) {
    alignas(32) float tmp[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    const int es = dt == OE_F32 ? 4 : 2;
    for (int i = 0; i < n; ++i) tmp[i] = elem(p + i * es, dt);
    return _mm256_load_ps(tmp);
  }
};

#include "rvq/rvq_kernels_impl.h"

void dots(const float* r, int nt, const void* rows, oe_dtype dt, int64_t nrows, int64_t D, float* out, int64_t ldd) {
  dots_impl<VecAvx2>(r, nt, rows, dt, nrows, D, out, ldd);
}

double exact_dist(const float* r, const void* row, oe_dtype dt, int64_t D) {
  const char* p = static_cast<const char*>(row);
  const int64_t es = dt == OE_F32 ? 4 : 2;
  __m256d acc0 = _mm256_setzero_pd(), acc1 = _mm256_setzero_pd();
  int64_t d = 0;
  for (; d + 8 <= D; d += 8) {
    const __m256 x = _mm256_loadu_ps(r + d);
    const __m256 c = VecAvx2::load_row(p + d * es, dt);
    const __m256d lo = _mm256_sub_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(x)), _mm256_cvtps_pd(_mm256_castps256_ps128(c)));
    const __m256d hi = _mm256_sub_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(x, 1)), _mm256_cvtps_pd(_mm256_extractf128_ps(c, 1)));
    acc0 = _mm256_fmadd_pd(lo, lo, acc0);
    acc1 = _mm256_fmadd_pd(hi, hi, acc1);
  }
  alignas(32) double t[4];
  _mm256_store_pd(t, _mm256_add_pd(acc0, acc1));
  double s = (t[0] + t[1]) + (t[2] + t[3]);
  for (; d < D; ++d) {
    const double diff = static_cast<double>(r[d]) - static_cast<double>(elem(p + d * es, dt));
    s += diff * diff;
  }
  return s;
}

void add_row(float* acc, const void* row, oe_dtype dt, int64_t n) {
  const char* p = static_cast<const char*>(row);
  const int64_t es = dt == OE_F32 ? 4 : 2;
  int64_t d = 0;
  for (; d + 8 <= n; d += 8) _mm256_storeu_ps(acc + d, _mm256_add_ps(_mm256_loadu_ps(acc + d), VecAvx2::load_row(p + d * es, dt)));
  for (; d < n; ++d) acc[d] += elem(p + d * es, dt);
}

void gemm_tile(const float* r, int64_t ldr, int mt, const float* pc, int kc, float* s, int64_t lds, int accumulate) {
  gemm_tile_impl<VecAvx2>(r, ldr, mt, pc, kc, s, lds, accumulate);
}

}  // namespace

const Kernels& kernels_avx2() {
  static const Kernels k = {8, &dots, &exact_dist, &add_row, &gemm_tile, 16};
  return k;
}

}  // namespace rvq
}  // namespace oe
