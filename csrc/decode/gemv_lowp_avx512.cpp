// Low-precision-weight GEMV rows (gemv_lowp.h), AVX-512: sixteen weights per load converted to fp32 (vcvtph2ps
// for fp16, a 16-bit shift for bf16, sign extension for int8), four rows per x vector; same blocks as AVX2.
#if defined(__GNUC__) && !defined(__clang__)
// GCC 12 reports its own AVX-512 conversion intrinsics' undefined-vector idiom as maybe-uninitialized.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
#include <immintrin.h>

#include "common/half.h"
#include "decode/gemv_lowp.h"

namespace oe {
namespace decode {
namespace {

struct F16 {
  using T = uint16_t;
  static __m512 load(const T* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static float get(const T* p) { return f16_to_f32(*p); }
};
struct BF16 {
  using T = uint16_t;
  static __m512 load(const T* p) {
    const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
  }
  static float get(const T* p) { return bf16_to_f32(*p); }
};
struct Q8 {
  using T = int8_t;
  static __m512 load(const T* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  static float get(const T* p) { return static_cast<float>(*p); }
};

template <class L, int R>
inline void row_group(const typename L::T* W, const uint16_t* scales, int64_t G, int64_t B, const float* x, int64_t K,
                      int64_t n, float* y) {
  __m512 acc[R];
  float tail[R];
  for (int r = 0; r < R; ++r) {
    acc[r] = _mm512_setzero_ps();
    tail[r] = 0.0f;
  }
  int64_t g = 0;
  for (int64_t k0 = 0; k0 < K; k0 += B, ++g) {
    const int64_t k1 = k0 + B < K ? k0 + B : K;
    const int64_t kv = k0 + (k1 - k0) / 16 * 16;
    __m512 blk[R];
    float bt[R];
    for (int r = 0; r < R; ++r) {
      blk[r] = _mm512_setzero_ps();
      bt[r] = 0.0f;
    }
    for (int64_t k = k0; k < kv; k += 16) {
      const __m512 xv = _mm512_loadu_ps(x + k);
      for (int r = 0; r < R; ++r) blk[r] = _mm512_fmadd_ps(L::load(W + (n + r) * K + k), xv, blk[r]);
    }
    for (int64_t k = kv; k < k1; ++k)
      for (int r = 0; r < R; ++r) bt[r] += L::get(W + (n + r) * K + k) * x[k];
    if (scales) {
      for (int r = 0; r < R; ++r) {
        const float s = _cvtsh_ss(scales[(n + r) * G + g]);  // F16C
        acc[r] = _mm512_fmadd_ps(blk[r], _mm512_set1_ps(s), acc[r]);
        tail[r] += bt[r] * s;
      }
    } else {
      for (int r = 0; r < R; ++r) {
        acc[r] = _mm512_add_ps(acc[r], blk[r]);
        tail[r] += bt[r];
      }
    }
  }
  for (int r = 0; r < R; ++r) y[n + r] = _mm512_reduce_add_ps(acc[r]) + tail[r];
}

template <class L>
void rows(const void* Wv, const uint16_t* scales, int64_t G, int64_t B, const float* x, int64_t K, int64_t n0,
          int64_t n1, float* y) {
  const typename L::T* W = static_cast<const typename L::T*>(Wv);
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) row_group<L, 4>(W, scales, G, B, x, K, n, y);
  for (; n < n1; ++n) row_group<L, 1>(W, scales, G, B, x, K, n, y);
}

}  // namespace

LowpRowsFn lowp_rows_avx512(WKind kind) {
  switch (kind) {
    case WKind::F16: return rows<F16>;
    case WKind::BF16: return rows<BF16>;
    default: return rows<Q8>;
  }
}

}  // namespace decode
}  // namespace oe
