// q4 tile kernels for AVX2 + FMA + F16C. Same structure as q4_avx512.cpp, on two ymm halves per octet row
// (columns 0..7 and 8..15 of the tile).
//
// INT8 without VNNI: vpmaddubsw multiplies the u8 codes with the s8 activations and adds adjacent pairs into
//   int16 (|pair| <= 2 * 15 * 127 = 3810, no saturation); the low- and high-nibble products of the four octets
//   of a block are added in int16 (<= 30480, see q4.h) and widened once per block with vpmaddwd(., 1).
// EXACT: (v >> 4j) & 0xF | 0x4B000000 is the float 2^23 + q; minus (2^23 + z) gives q - z exactly.
#include <immintrin.h>

#include <cstring>

#include "q4/q4.h"

namespace oe {
namespace q4 {
namespace {


inline __m256i bcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

inline __m256 load_scales8(const uint16_t* s) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s)));
}

inline __m256 load_zeros8(const uint8_t* z) {
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(z))));
}

template <int MR>
void tile_int8(const oe_q4_weight& w, int64_t t, const Prep& p, int64_t m0, float* out) {
  const int64_t octets = w.Kp / kOctet, nb = w.Kp / kBlockK;
  const char* c = reinterpret_cast<const char*>(w.codes + t * octets * kTileN);
  const uint16_t* sc = w.scales + t * w.G * kTileN;
  const uint8_t* zp = w.zeros + t * w.G * kTileN;
  const __m256i mask = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  __m256 y[MR][2];
  for (int m = 0; m < MR; ++m) y[m][0] = y[m][1] = _mm256_setzero_ps();
  int64_t b = 0;
  while (b < nb) {
    const int32_t g = w.block_group[b];
    __m256 acc[MR][2];
    float zsum[MR];
    for (int m = 0; m < MR; ++m) {
      acc[m][0] = acc[m][1] = _mm256_setzero_ps();
      zsum[m] = 0.0f;
    }
    do {
      const char* cb = c + b * (kOctetsPerBlock * kTileOctetBytes);
      __m256i s16[MR][2];
      for (int m = 0; m < MR; ++m) s16[m][0] = s16[m][1] = _mm256_setzero_si256();
#pragma GCC unroll 4
      for (int o = 0; o < kOctetsPerBlock; ++o) {
        const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(cb + o * kTileOctetBytes));
        const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(cb + o * kTileOctetBytes + 32));
        const __m256i lo0 = _mm256_and_si256(v0, mask), hi0 = _mm256_and_si256(_mm256_srli_epi16(v0, 4), mask);
        const __m256i lo1 = _mm256_and_si256(v1, mask), hi1 = _mm256_and_si256(_mm256_srli_epi16(v1, 4), mask);
        for (int m = 0; m < MR; ++m) {
          const int8_t* xo = p.xq + (m0 + m) * w.Kp + b * kBlockK + o * kOctet;
          const __m256i xa = bcast4(xo), xb = bcast4(xo + 4);
          s16[m][0] = _mm256_add_epi16(s16[m][0],
                                       _mm256_add_epi16(_mm256_maddubs_epi16(lo0, xa), _mm256_maddubs_epi16(hi0, xb)));
          s16[m][1] = _mm256_add_epi16(s16[m][1],
                                       _mm256_add_epi16(_mm256_maddubs_epi16(lo1, xa), _mm256_maddubs_epi16(hi1, xb)));
        }
      }
      for (int m = 0; m < MR; ++m) {
        const __m256 d = _mm256_set1_ps(p.xd[(m0 + m) * nb + b]);
        acc[m][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(s16[m][0], ones)), d, acc[m][0]);
        acc[m][1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(s16[m][1], ones)), d, acc[m][1]);
        zsum[m] += p.xds[(m0 + m) * nb + b];
      }
      ++b;
    } while (b < nb && w.block_group[b] == g);
    for (int h = 0; h < 2; ++h) {
      const __m256 s = load_scales8(sc + g * kTileN + 8 * h), z = load_zeros8(zp + g * kTileN + 8 * h);
      for (int m = 0; m < MR; ++m)
        y[m][h] = _mm256_fmadd_ps(s, _mm256_fnmadd_ps(z, _mm256_set1_ps(zsum[m]), acc[m][h]), y[m][h]);
    }
  }
  for (int m = 0; m < MR; ++m) {
    _mm256_storeu_ps(out + m * kTileN, y[m][0]);
    _mm256_storeu_ps(out + m * kTileN + 8, y[m][1]);
  }
}

template <int MR>
void tile_exact(const oe_q4_weight& w, int64_t t, const Prep& p, int64_t m0, float* out) {
  constexpr int NA = MR <= 2 ? 2 : 1;  // accumulators per row and half
  const int64_t octets = w.Kp / kOctet, nb = w.Kp / kBlockK;
  const char* c = reinterpret_cast<const char*>(w.codes + t * octets * kTileN);
  const uint16_t* sc = w.scales + t * w.G * kTileN;
  const uint8_t* zp = w.zeros + t * w.G * kTileN;
  const __m256i mask = _mm256_set1_epi32(0xF), magic = _mm256_set1_epi32(0x4B000000);
  const __m256 two23 = _mm256_set1_ps(8388608.0f);
  __m256 y[MR][2];
  for (int m = 0; m < MR; ++m) y[m][0] = y[m][1] = _mm256_setzero_ps();
  int64_t b = 0;
  while (b < nb) {
    const int32_t g = w.block_group[b];
    const __m256 zm0 = _mm256_add_ps(load_zeros8(zp + g * kTileN), two23);
    const __m256 zm1 = _mm256_add_ps(load_zeros8(zp + g * kTileN + 8), two23);
    __m256 acc[MR][2][NA];
    for (int m = 0; m < MR; ++m)
      for (int a = 0; a < NA; ++a) acc[m][0][a] = acc[m][1][a] = _mm256_setzero_ps();
    do {
      const char* cb = c + b * (kOctetsPerBlock * kTileOctetBytes);
      for (int o = 0; o < kOctetsPerBlock; ++o) {
        const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(cb + o * kTileOctetBytes));
        const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(cb + o * kTileOctetBytes + 32));
        const int64_t r0 = (b * kOctetsPerBlock + o) * kOctet;
#pragma GCC unroll 8
        for (int j = 0; j < 8; ++j) {
          const __m256i q0 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi32(v0, 4 * j), mask), magic);
          const __m256i q1 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi32(v1, 4 * j), mask), magic);
          const __m256 w0 = _mm256_sub_ps(_mm256_castsi256_ps(q0), zm0);
          const __m256 w1 = _mm256_sub_ps(_mm256_castsi256_ps(q1), zm1);
          for (int m = 0; m < MR; ++m) {
            const __m256 xb = _mm256_set1_ps(p.xf[(m0 + m) * w.Kp + r0 + kNibbleRow[j]]);
            acc[m][0][j % NA] = _mm256_fmadd_ps(w0, xb, acc[m][0][j % NA]);
            acc[m][1][j % NA] = _mm256_fmadd_ps(w1, xb, acc[m][1][j % NA]);
          }
        }
      }
      ++b;
    } while (b < nb && w.block_group[b] == g);
    for (int h = 0; h < 2; ++h) {
      const __m256 s = load_scales8(sc + g * kTileN + 8 * h);
      for (int m = 0; m < MR; ++m) {
        __m256 a = acc[m][h][0];
        for (int k = 1; k < NA; ++k) a = _mm256_add_ps(a, acc[m][h][k]);
        y[m][h] = _mm256_fmadd_ps(s, a, y[m][h]);
      }
    }
  }
  for (int m = 0; m < MR; ++m) {
    _mm256_storeu_ps(out + m * kTileN, y[m][0]);
    _mm256_storeu_ps(out + m * kTileN + 8, y[m][1]);
  }
}

// Bit-for-bit the scalar contract (quantize_blocks_scalar); vcvtps2dq rounds half to even.
void quantize(const float* xf, int64_t nblocks, int8_t* xq, float* xd, float* xds) {
  const __m256 signmask = _mm256_set1_ps(-0.0f);
  const __m256i lo = _mm256_set1_epi32(-127), hi = _mm256_set1_epi32(127);
  for (int64_t b = 0; b < nblocks; ++b) {
    const float* v = xf + b * kBlockK;
    __m256 a[4];
    __m256 mx = _mm256_setzero_ps();
    for (int i = 0; i < 4; ++i) {
      a[i] = _mm256_loadu_ps(v + 8 * i);
      mx = _mm256_max_ps(mx, _mm256_andnot_ps(signmask, a[i]));
    }
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, mx);
    float amax = 0.0f;
    for (int i = 0; i < 8; ++i) amax = amax < lanes[i] ? lanes[i] : amax;
    const float d = amax / 127.0f;
    const __m256 id = _mm256_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
    __m256i q[4];
    __m256i sum = _mm256_setzero_si256();
    for (int i = 0; i < 4; ++i) {
      q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(a[i], id));  // default MXCSR: round half to even
      q[i] = _mm256_min_epi32(_mm256_max_epi32(q[i], lo), hi);
      sum = _mm256_add_epi32(sum, q[i]);
    }
    alignas(32) int32_t qs[32];
    for (int i = 0; i < 4; ++i) _mm256_store_si256(reinterpret_cast<__m256i*>(qs + 8 * i), q[i]);
    alignas(32) int32_t ss[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(ss), sum);
    int32_t total = 0;
    for (int i = 0; i < 8; ++i) total += ss[i];
    for (int i = 0; i < 32; ++i) xq[b * kBlockK + i] = static_cast<int8_t>(qs[i]);
    xd[b] = d;
    xds[b] = d * static_cast<float>(total);
  }
}

const TileKernels kAvx2 = {
    {tile_exact<1>, tile_exact<2>, tile_exact<3>, tile_exact<4>},
    {tile_int8<1>, tile_int8<2>, tile_int8<3>, tile_int8<4>},
    quantize,
};

}  // namespace

const TileKernels* kernels_avx2() { return &kAvx2; }

}  // namespace q4
}  // namespace oe
