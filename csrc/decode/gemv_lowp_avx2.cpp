// Low-precision-weight GEMV rows (gemv_lowp.h), AVX2 + FMA + F16C: eight weights per load converted to fp32
// (vcvtph2ps for fp16, a 16-bit shift for bf16, sign extension for int8), four rows per x vector.
#include <immintrin.h>

#include "common/half.h"
#include "decode/gemv_lowp.h"

namespace oe {
namespace decode {
namespace {

struct F16 {
  using T = uint16_t;
  static __m256 load(const T* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static float get(const T* p) { return f16_to_f32(*p); }
};
struct BF16 {
  using T = uint16_t;
  static __m256 load(const T* p) {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
  }
  static float get(const T* p) { return bf16_to_f32(*p); }
};
struct Q8 {
  using T = int8_t;
  static __m256 load(const T* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
  static float get(const T* p) { return static_cast<float>(*p); }
};

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// R rows starting at n: per block of B inputs an fp32 vector sum, scaled (Q8) into the row's accumulator.
template <class L, int R>
inline void row_group(const typename L::T* W, const uint16_t* scales, int64_t G, int64_t B, const float* x, int64_t K,
                      int64_t n, float* y) {
  __m256 acc[R];
  float tail[R];
  for (int r = 0; r < R; ++r) {
    acc[r] = _mm256_setzero_ps();
    tail[r] = 0.0f;
  }
  int64_t g = 0;
  for (int64_t k0 = 0; k0 < K; k0 += B, ++g) {
    const int64_t k1 = k0 + B < K ? k0 + B : K;
    const int64_t kv = k0 + (k1 - k0) / 8 * 8;
    __m256 blk[R];
    float bt[R];
    for (int r = 0; r < R; ++r) {
      blk[r] = _mm256_setzero_ps();
      bt[r] = 0.0f;
    }
    for (int64_t k = k0; k < kv; k += 8) {
      const __m256 xv = _mm256_loadu_ps(x + k);
      for (int r = 0; r < R; ++r) blk[r] = _mm256_fmadd_ps(L::load(W + (n + r) * K + k), xv, blk[r]);
    }
    for (int64_t k = kv; k < k1; ++k)
      for (int r = 0; r < R; ++r) bt[r] += L::get(W + (n + r) * K + k) * x[k];
    if (scales) {
      for (int r = 0; r < R; ++r) {
        const float s = _cvtsh_ss(scales[(n + r) * G + g]);  // F16C
        acc[r] = _mm256_fmadd_ps(blk[r], _mm256_set1_ps(s), acc[r]);
        tail[r] += bt[r] * s;
      }
    } else {
      for (int r = 0; r < R; ++r) {
        acc[r] = _mm256_add_ps(acc[r], blk[r]);
        tail[r] += bt[r];
      }
    }
  }
  for (int r = 0; r < R; ++r) y[n + r] = hsum(acc[r]) + tail[r];
}

template <class L>
void rows(const void* Wv, const uint16_t* scales, int64_t G, int64_t B, const float* x, int64_t K, int64_t n0,
          int64_t n1, float* y) {
  const typename L::T* W = static_cast<const typename L::T*>(Wv);
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) row_group<L, 4>(W, scales, G, B, x, K, n, y);
  for (; n < n1; ++n) row_group<L, 1>(W, scales, G, B, x, K, n, y);
}

// q8 weights x int8 activations (ggml's Q8_0 x Q8_0 on AVX2): per 32 inputs |q| * (xi * sign q) in
// vpmaddubsw (|products| <= 2 * 127 * 127 < 2^15), pairs summed to int32 by vpmaddwd, converted and scaled by the
// activation block's d; at the end of a weight block by its scale.
template <int R>
inline void q8i8_group(const int8_t* W, const uint16_t* scales, int64_t G, int64_t B, const int8_t* xq,
                       const float* xd, int64_t K, int64_t n, float* y) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  int64_t g = 0;
  for (int64_t k0 = 0; k0 < K; k0 += B, ++g) {
    __m256 blk[R];
    for (int r = 0; r < R; ++r) blk[r] = _mm256_setzero_ps();
    for (int64_t j = k0; j < k0 + B; j += 32) {
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + j));
      const __m256 dv = _mm256_set1_ps(xd[j / 32]);
      for (int r = 0; r < R; ++r) {
        const __m256i qv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(W + (n + r) * K + j));
        const __m256i p16 = _mm256_maddubs_epi16(_mm256_sign_epi8(qv, qv), _mm256_sign_epi8(xv, qv));
        const __m256 pf = _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, ones));
        blk[r] = _mm256_fmadd_ps(pf, dv, blk[r]);
      }
    }
    for (int r = 0; r < R; ++r)
      acc[r] = _mm256_fmadd_ps(blk[r], _mm256_set1_ps(_cvtsh_ss(scales[(n + r) * G + g])), acc[r]);
  }
  for (int r = 0; r < R; ++r) y[n + r] = hsum(acc[r]);
}

void q8i8_rows(const int8_t* W, const uint16_t* scales, int64_t G, int64_t B, const int8_t* xq, const float* xd,
               int64_t K, int64_t n0, int64_t n1, float* y) {
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) q8i8_group<4>(W, scales, G, B, xq, xd, K, n, y);
  for (; n < n1; ++n) q8i8_group<1>(W, scales, G, B, xq, xd, K, n, y);
}

}  // namespace

Q8I8RowsFn q8i8_rows_avx2() { return q8i8_rows; }

LowpRowsFn lowp_rows_avx2(WKind kind) {
  switch (kind) {
    case WKind::F16: return rows<F16>;
    case WKind::BF16: return rows<BF16>;
    default: return rows<Q8>;
  }
}

}  // namespace decode
}  // namespace oe
