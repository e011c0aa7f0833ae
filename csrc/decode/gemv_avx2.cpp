// Dense fp32 GEMV rows, AVX2 + FMA: four rows share each 8-wide load of x; the K tail is scalar.
#include <immintrin.h>

#include "decode/decode.h"

namespace oe {
namespace decode {
namespace {

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

void rows_avx2(const float* W, const float* x, int64_t K, int64_t n0, int64_t n1, float* y) {
  const int64_t kv = K / 8 * 8;
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) {
    const float* w0 = W + n * K;
    const float* w1 = w0 + K;
    const float* w2 = w1 + K;
    const float* w3 = w2 + K;
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    for (int64_t k = 0; k < kv; k += 8) {
      const __m256 xv = _mm256_loadu_ps(x + k);
      a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w0 + k), xv, a0);
      a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w1 + k), xv, a1);
      a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w2 + k), xv, a2);
      a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w3 + k), xv, a3);
    }
    float s0 = hsum(a0), s1 = hsum(a1), s2 = hsum(a2), s3 = hsum(a3);
    for (int64_t k = kv; k < K; ++k) {
      s0 += w0[k] * x[k];
      s1 += w1[k] * x[k];
      s2 += w2[k] * x[k];
      s3 += w3[k] * x[k];
    }
    y[n] = s0;
    y[n + 1] = s1;
    y[n + 2] = s2;
    y[n + 3] = s3;
  }
  for (; n < n1; ++n) {
    const float* w0 = W + n * K;
    __m256 a0 = _mm256_setzero_ps();
    for (int64_t k = 0; k < kv; k += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w0 + k), _mm256_loadu_ps(x + k), a0);
    float s0 = hsum(a0);
    for (int64_t k = kv; k < K; ++k) s0 += w0[k] * x[k];
    y[n] = s0;
  }
}

}  // namespace

GemvRowsFn gemv_rows_avx2() { return rows_avx2; }

}  // namespace decode
}  // namespace oe
