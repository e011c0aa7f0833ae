// AVX-512 micro-kernels for the CPU attention tile loop (attention_cpu_impl.h). Built with -mavx512f/bw/vl/dq
// and called only when oe::isa_active() says the CPU has them.
#include <immintrin.h>

#include <cstring>

#include "attention/attention_cpu.h"

namespace oe {
namespace attn {
namespace {

// Lane-index tables for reduce_w: level L merges two vectors whose lanes hold 16 >> L partial sums per key
// into one vector holding half as many partials per key, keys of the first vector first.
// constexpr so that it is constant-initialised: no code of this AVX-512 translation unit may run at load time.
struct ReduceTables {
  int lo[4][16];
  int hi[4][16];
  constexpr ReduceTables() : lo(), hi() {
    for (int level = 0; level < 4; ++level) {
      const int p = 16 >> level, half = p / 2, keys = 16 / p;
      for (int i = 0; i < 16; ++i) {
        const int kk = i / half, w = i % half;
        const int idx = kk < keys ? kk * p + w : 16 + (kk - keys) * p + w;
        lo[level][i] = idx;
        hi[level][i] = idx + half;
      }
    }
  }
};
constexpr ReduceTables kReduce{};

inline uint16_t f32_to_bf16_s(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

struct VecAvx512 {
  using reg = __m512;
  static constexpr int W = 16, MG = 4, DG = 4;
  // bf16 pair dot products (AVX512_BF16, part of this build's AVX-512 level): see scores_row_bf16.
  static constexpr int kRegs = 32;
  static constexpr bool kBf16Dot = true;
  using breg = __m512i;
  static breg load_bf16(const uint16_t* p, int n) {
    if (n >= 32) return _mm512_loadu_si512(p);
    return _mm512_maskz_loadu_epi16(static_cast<__mmask32>((1u << n) - 1u), p);
  }
  static reg dot_bf16(reg acc, breg a, breg b) { return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b); }
  static reg zero() { return _mm512_setzero_ps(); }
  static reg set1(float x) { return _mm512_set1_ps(x); }
  static reg load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, reg x) { _mm512_storeu_ps(p, x); }
  static reg fmadd(reg a, reg b, reg c) { return _mm512_fmadd_ps(a, b, c); }
  static reg mul(reg a, reg b) { return _mm512_mul_ps(a, b); }
  static reg sub(reg a, reg b) { return _mm512_sub_ps(a, b); }

  static reg exp(reg x) {
    // e^x = 2^n * e^r, n = round(x / ln 2), |r| <= ln2 / 2, e^r by its degree-7 Taylor polynomial
    // (truncation < 6e-9 relative). Inputs below -104 give 0 after scalef; -inf gives 0.
    const reg xc = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-104.0f)), _mm512_set1_ps(88.0f));
    const reg n = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(1.44269504088896341f)),
                                       _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    reg r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), xc);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    reg p = _mm512_set1_ps(1.0f / 5040.0f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
  }

  static reg keep_first(reg x, int n) {
    const __mmask16 k = n >= 16 ? static_cast<__mmask16>(0xffff)
                                : (n <= 0 ? static_cast<__mmask16>(0) : static_cast<__mmask16>((1u << n) - 1u));
    return _mm512_maskz_mov_ps(k, x);
  }

  static reg merge(reg a, reg b, int level) {
    const __m512i lo = _mm512_loadu_si512(kReduce.lo[level]);
    const __m512i hi = _mm512_loadu_si512(kReduce.hi[level]);
    return _mm512_add_ps(_mm512_permutex2var_ps(a, lo, b), _mm512_permutex2var_ps(a, hi, b));
  }

  static void reduce_w(const reg* acc, float* out) {
    reg t[8], u[4], v[2];
    for (int i = 0; i < 8; ++i) t[i] = merge(acc[2 * i], acc[2 * i + 1], 0);
    for (int i = 0; i < 4; ++i) u[i] = merge(t[2 * i], t[2 * i + 1], 1);
    for (int i = 0; i < 2; ++i) v[i] = merge(u[2 * i], u[2 * i + 1], 2);
    _mm512_storeu_ps(out, merge(v[0], v[1], 3));
  }

  static void load_row(const void* src, oe_dtype dt, int n, float* dst) {
    int i = 0;
    if (dt == OE_F32) {
      const float* s = static_cast<const float*>(src);
      for (; i + 16 <= n; i += 16) _mm512_storeu_ps(dst + i, _mm512_loadu_ps(s + i));
      if (i < n) {
        const __mmask16 k = static_cast<__mmask16>((1u << (n - i)) - 1u);
        _mm512_mask_storeu_ps(dst + i, k, _mm512_maskz_loadu_ps(k, s + i));
      }
      return;
    }
    const uint16_t* s = static_cast<const uint16_t*>(src);
    for (; i < n; i += 16) {
      const int left = n - i;
      const __mmask16 k = left >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << left) - 1u);
      const __m256i h = _mm256_maskz_loadu_epi16(k, s + i);
      reg f;
      if (dt == OE_BF16)
        f = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
      else
        f = _mm512_cvtph_ps(h);
      _mm512_mask_storeu_ps(dst + i, k, f);
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

void run_group_avx512(const GroupTask& t, float* scratch) { run_group_impl<VecAvx512>(t, scratch); }

}  // namespace attn
}  // namespace oe
