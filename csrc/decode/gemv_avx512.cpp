// Dense fp32 GEMV rows, AVX-512: four rows share each 16-wide load of x; the K tail uses a masked load.
#if defined(__GNUC__) && !defined(__clang__)
// GCC 12 reports its own AVX-512 intrinsics' undefined-vector idiom as (maybe-)uninitialized.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
#include <immintrin.h>

#include "decode/decode.h"

namespace oe {
namespace decode {
namespace {

void rows_avx512(const float* W, const float* x, int64_t K, int64_t n0, int64_t n1, float* y) {
  const int64_t kv = K / 16 * 16;
  const __mmask16 tail = static_cast<__mmask16>((1u << (K - kv)) - 1u);
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) {
    const float* w0 = W + n * K;
    const float* w1 = w0 + K;
    const float* w2 = w1 + K;
    const float* w3 = w2 + K;
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    for (int64_t k = 0; k < kv; k += 16) {
      const __m512 xv = _mm512_loadu_ps(x + k);
      a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w0 + k), xv, a0);
      a1 = _mm512_fmadd_ps(_mm512_loadu_ps(w1 + k), xv, a1);
      a2 = _mm512_fmadd_ps(_mm512_loadu_ps(w2 + k), xv, a2);
      a3 = _mm512_fmadd_ps(_mm512_loadu_ps(w3 + k), xv, a3);
    }
    if (tail) {
      const __m512 xv = _mm512_maskz_loadu_ps(tail, x + kv);
      a0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, w0 + kv), xv, a0);
      a1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, w1 + kv), xv, a1);
      a2 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, w2 + kv), xv, a2);
      a3 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, w3 + kv), xv, a3);
    }
    y[n] = _mm512_reduce_add_ps(a0);
    y[n + 1] = _mm512_reduce_add_ps(a1);
    y[n + 2] = _mm512_reduce_add_ps(a2);
    y[n + 3] = _mm512_reduce_add_ps(a3);
  }
  for (; n < n1; ++n) {
    const float* w0 = W + n * K;
    __m512 a0 = _mm512_setzero_ps();
    for (int64_t k = 0; k < kv; k += 16) a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w0 + k), _mm512_loadu_ps(x + k), a0);
    if (tail) a0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, w0 + kv), _mm512_maskz_loadu_ps(tail, x + kv), a0);
    y[n] = _mm512_reduce_add_ps(a0);
  }
}

}  // namespace

GemvRowsFn gemv_rows_avx512() { return rows_avx512; }

}  // namespace decode
}  // namespace oe
