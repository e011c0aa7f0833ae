// AVX2 + FMA + F16C micro-kernels for the CPU attention tile loop (attention_cpu_impl.h). Built with
// -mavx2 -mfma -mf16c and called only when oe::isa_active() says the CPU has them.
#include <immintrin.h>

#include <cstring>

#include "attention/attention_cpu.h"

namespace oe {
namespace attn {
namespace {

inline uint16_t f32_to_bf16_s(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
inline float bf16_to_f32_s(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

struct VecAvx2 {
  using reg = __m256;
  static constexpr int W = 8, MG = 2, DG = 4;
  static constexpr int kRegs = 16;
  static constexpr bool kBf16Dot = false;
  static reg zero() { return _mm256_setzero_ps(); }
  static reg set1(float x) { return _mm256_set1_ps(x); }
  static reg load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, reg x) { _mm256_storeu_ps(p, x); }
  static reg fmadd(reg a, reg b, reg c) { return _mm256_fmadd_ps(a, b, c); }
  static reg mul(reg a, reg b) { return _mm256_mul_ps(a, b); }
  static reg sub(reg a, reg b) { return _mm256_sub_ps(a, b); }

  static reg exp(reg x) {
    // As the AVX-512 version; 2^n is built in the exponent field, so x is clamped at -87.3 (n >= -126):
    // e^x below 1.2e-38 comes out as about 1.2e-38, and -inf is masked by the caller.
    const __m256 ninf = _mm256_set1_ps(-__builtin_inff());
    const __m256 is_ninf = _mm256_cmp_ps(x, ninf, _CMP_EQ_OQ);
    const reg xc = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.0f));
    const reg n = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(1.44269504088896341f)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    reg r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), xc);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    reg p = _mm256_set1_ps(1.0f / 5040.0f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 720.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(is_ninf, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
  }

  static reg keep_first(reg x, int n) {
    const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i keep = _mm256_cmpgt_epi32(_mm256_set1_epi32(n), idx);
    return _mm256_and_ps(x, _mm256_castsi256_ps(keep));
  }

  static void reduce_w(const reg* a, float* out) {
    const __m256 t0 = _mm256_hadd_ps(a[0], a[1]);
    const __m256 t1 = _mm256_hadd_ps(a[2], a[3]);
    const __m256 t2 = _mm256_hadd_ps(a[4], a[5]);
    const __m256 t3 = _mm256_hadd_ps(a[6], a[7]);
    const __m256 u0 = _mm256_hadd_ps(t0, t1);  // keys 0-3: lanes 0-3 low half, 4-7 high half
    const __m256 u1 = _mm256_hadd_ps(t2, t3);  // keys 4-7
    const __m256 lo = _mm256_permute2f128_ps(u0, u1, 0x20);
    const __m256 hi = _mm256_permute2f128_ps(u0, u1, 0x31);
    _mm256_storeu_ps(out, _mm256_add_ps(lo, hi));
  }

  static void load_row(const void* src, oe_dtype dt, int n, float* dst) {
    int i = 0;
    if (dt == OE_F32) {
      std::memcpy(dst, src, static_cast<size_t>(n) * 4);
      return;
    }
    const uint16_t* s = static_cast<const uint16_t*>(src);
    if (dt == OE_BF16) {
      for (; i + 8 <= n; i += 8) {
        const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i));
        _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)));
      }
      for (; i < n; ++i) dst[i] = bf16_to_f32_s(s[i]);
    } else {
      for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i))));
      for (; i < n; ++i) dst[i] = _cvtsh_ss(s[i]);
    }
  }

  static void store_row(const float* src, float m, oe_dtype dt, int n, void* dst) {
    if (dt == OE_F32) {
      float* d = static_cast<float*>(dst);
      for (int i = 0; i < n; ++i) d[i] = src[i] * m;
    } else if (dt == OE_BF16) {
      uint16_t* d = static_cast<uint16_t*>(dst);
      for (int i = 0; i < n; ++i) d[i] = f32_to_bf16_s(src[i] * m);
    } else {
      uint16_t* d = static_cast<uint16_t*>(dst);
      for (int i = 0; i < n; ++i) d[i] = _cvtss_sh(src[i] * m, _MM_FROUND_TO_NEAREST_INT);
    }
  }
};

#include "attention/attention_cpu_impl.h"

}  // namespace

void run_group_avx2(const GroupTask& t, float* scratch) { run_group_impl<VecAvx2>(t, scratch); }

}  // namespace attn
}  // namespace oe
