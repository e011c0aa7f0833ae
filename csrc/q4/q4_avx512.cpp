// q4 tile kernels for AVX-512 (F/BW/VL/DQ + VNNI; Isa::Avx512 requires all of them).
//
// One 64-byte octet row of a tile is one zmm: 16 int32 lanes = the 16 columns, each lane the 8 codes of its
// column for 8 consecutive layout rows (byte b: row b low nibble, row 4+b high nibble; FORMAT.md).
//
// INT8: lo = v & 0x0F gives, per lane, the four u8 codes of rows 0..3; hi = (v >> 4) & 0x0F those of rows 4..7.
//   vpdpbusd(acc, lo, broadcast(xq[r0..r0+3])) adds sum_i q * xi for 4 rows x 16 columns = 64 MACs per
//   instruction, exact in int32. Per 32-row block: acc += d_block * (float)isum; per group segment:
//   y += s * (acc - z * sum_b d_b * sum(xi_b)) (the zero point folded through the activation sums).
// EXACT, 3+ rows: nibble j is moved to the lane's low bits and turned into the float 2^23 + q with one
//   vpternlogd ((v >> 4j) & 0xF | 0x4B000000); subtracting 2^23 + z gives q - z exactly, then one FMA per 16
//   weights and row. Per group segment: y += s * acc. Several accumulators per row hide the FMA latency.
// EXACT, 1-2 rows (decode): tile_exact_masked below, masking nibbles in place (3 instructions per 16 weights).
#include <immintrin.h>

// GCC 12 reports -Wmaybe-uninitialized inside its own AVX-512 intrinsic headers (the _mm512_undefined_*
// placeholders of masked conversions and reductions); the values are fully defined.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#include <cstring>

#include "q4/q4.h"

namespace oe {
namespace q4 {
namespace {


inline __m512i bcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

template <int MR>
void tile_int8(const oe_q4_weight& w, int64_t t, const Prep& p, int64_t m0, float* out) {
  constexpr int NI = MR == 1 ? 4 : 2;
  const int64_t octets = w.Kp / kOctet, nb = w.Kp / kBlockK;
  const char* c = reinterpret_cast<const char*>(w.codes + t * octets * kTileN);
  const uint16_t* sc = w.scales + t * w.G * kTileN;
  const uint8_t* zp = w.zeros + t * w.G * kTileN;
  const int8_t* xq[MR];
  const float* xd[MR];
  const float* xds[MR];
  for (int m = 0; m < MR; ++m) {
    xq[m] = p.xq + (m0 + m) * w.Kp;
    xd[m] = p.xd + (m0 + m) * nb;
    xds[m] = p.xds + (m0 + m) * nb;
  }
  const __m512i mask = _mm512_set1_epi8(0x0F);
  __m512 y[MR];
  for (int m = 0; m < MR; ++m) y[m] = _mm512_setzero_ps();
  int64_t b = 0;
  while (b < nb) {
    const int32_t g = w.block_group[b];
    __m512 acc[MR];
    float zsum[MR];
    for (int m = 0; m < MR; ++m) {
      acc[m] = _mm512_setzero_ps();
      zsum[m] = 0.0f;
    }
    do {
      const char* cb = c + b * (kOctetsPerBlock * kTileOctetBytes);
      // NI independent int32 accumulators per row: vpdpbusd's latency, not its throughput, would bound a
      // single dependency chain.
      __m512i is[MR][NI];
      for (int m = 0; m < MR; ++m)
        for (int i = 0; i < NI; ++i) is[m][i] = _mm512_setzero_si512();
#pragma GCC unroll 4
      for (int o = 0; o < kOctetsPerBlock; ++o) {
        const __m512i v = _mm512_loadu_si512(cb + o * kTileOctetBytes);
        const __m512i lo = _mm512_and_si512(v, mask);
        const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), mask);
        for (int m = 0; m < MR; ++m) {
          const int8_t* xo = xq[m] + b * kBlockK + o * kOctet;
          is[m][(2 * o) % NI] = _mm512_dpbusd_epi32(is[m][(2 * o) % NI], lo, bcast4(xo));
          is[m][(2 * o + 1) % NI] = _mm512_dpbusd_epi32(is[m][(2 * o + 1) % NI], hi, bcast4(xo + 4));
        }
      }
      for (int m = 0; m < MR; ++m) {
        __m512i isum = _mm512_add_epi32(is[m][0], is[m][1]);
        if (NI == 4) isum = _mm512_add_epi32(isum, _mm512_add_epi32(is[m][2 % NI], is[m][3 % NI]));
        acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_set1_ps(xd[m][b]), acc[m]);
        zsum[m] += xds[m][b];
      }
      ++b;
    } while (b < nb && w.block_group[b] == g);
    const __m512 s = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sc + g * kTileN)));
    const __m512 z = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(zp + g * kTileN))));
    for (int m = 0; m < MR; ++m) y[m] = _mm512_fmadd_ps(s, _mm512_fnmadd_ps(z, _mm512_set1_ps(zsum[m]), acc[m]), y[m]);
  }
  for (int m = 0; m < MR; ++m) _mm512_storeu_ps(out + m * kTileN, y[m]);
}

// EXACT for one or two rows (decode): three instructions per 16 weights instead of four. Nibble j is masked in
// place, (v & 0xF << 4j) = q * 16^j, and converted exactly (at most 4 significant bits; vcvtudq2ps for the top
// nibble); each j has its own accumulator, in units of 16^j, so the products x * (q * 16^j) carry exactly the
// rounding of x * q. Per group segment: sum_j acc_j * 16^-j (exact power-of-two scaling) - z * sum(x), times s.
// Eight accumulators per row also hide the FMA latency. The zero point is folded through the block sums xs,
// which costs a few ulps of cancellation against sum |x| * 15 (well inside the EXACT tolerance).
template <int MR>
void tile_exact_masked(const oe_q4_weight& w, int64_t t, const Prep& p, int64_t m0, float* out) {
  static_assert(MR <= 2, "8 accumulators per row: at most two rows fit the 32 zmm registers");
  const int64_t octets = w.Kp / kOctet, nb = w.Kp / kBlockK;
  const char* c = reinterpret_cast<const char*>(w.codes + t * octets * kTileN);
  const uint16_t* sc = w.scales + t * w.G * kTileN;
  const uint8_t* zp = w.zeros + t * w.G * kTileN;
  const float* xf[MR];
  const float* xs[MR];
  for (int m = 0; m < MR; ++m) {
    xf[m] = p.xf + (m0 + m) * w.Kp;
    xs[m] = p.xs + (m0 + m) * nb;
  }
  __m512 y[MR];
  for (int m = 0; m < MR; ++m) y[m] = _mm512_setzero_ps();
  int64_t b = 0;
  while (b < nb) {
    const int32_t g = w.block_group[b];
    __m512 acc[MR][8];
    float xsum[MR];
    for (int m = 0; m < MR; ++m) {
      for (int j = 0; j < 8; ++j) acc[m][j] = _mm512_setzero_ps();
      xsum[m] = 0.0f;
    }
    do {
      const char* cb = c + b * (kOctetsPerBlock * kTileOctetBytes);
      for (int o = 0; o < kOctetsPerBlock; ++o) {
        const __m512i v = _mm512_loadu_si512(cb + o * kTileOctetBytes);
        const int64_t r0 = (b * kOctetsPerBlock + o) * kOctet;
#pragma GCC unroll 8
        for (int j = 0; j < 8; ++j) {
          const __m512i qj = _mm512_and_si512(v, _mm512_set1_epi32(static_cast<int>(0xFu << (4 * j))));
          const __m512 wv = j == 7 ? _mm512_cvtepu32_ps(qj) : _mm512_cvtepi32_ps(qj);
          for (int m = 0; m < MR; ++m)
            acc[m][j] = _mm512_fmadd_ps(wv, _mm512_set1_ps(xf[m][r0 + kNibbleRow[j]]), acc[m][j]);
        }
      }
      for (int m = 0; m < MR; ++m) xsum[m] += xs[m][b];
      ++b;
    } while (b < nb && w.block_group[b] == g);
    const __m512 s = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sc + g * kTileN)));
    const __m512 z = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(zp + g * kTileN))));
    for (int m = 0; m < MR; ++m) {
      __m512 a = acc[m][0];
      for (int j = 1; j < 8; ++j) a = _mm512_fmadd_ps(acc[m][j], _mm512_set1_ps(1.0f / static_cast<float>(1u << (4 * j))), a);
      y[m] = _mm512_fmadd_ps(s, _mm512_fnmadd_ps(z, _mm512_set1_ps(xsum[m]), a), y[m]);
    }
  }
  for (int m = 0; m < MR; ++m) _mm512_storeu_ps(out + m * kTileN, y[m]);
}

template <int MR>
void tile_exact(const oe_q4_weight& w, int64_t t, const Prep& p, int64_t m0, float* out) {
  constexpr int NA = MR == 1 ? 4 : 2;  // accumulators per row
  const int64_t octets = w.Kp / kOctet, nb = w.Kp / kBlockK;
  const char* c = reinterpret_cast<const char*>(w.codes + t * octets * kTileN);
  const uint16_t* sc = w.scales + t * w.G * kTileN;
  const uint8_t* zp = w.zeros + t * w.G * kTileN;
  const float* xf[MR];
  for (int m = 0; m < MR; ++m) xf[m] = p.xf + (m0 + m) * w.Kp;
  const __m512i mask = _mm512_set1_epi32(0xF);
  const __m512i magic = _mm512_set1_epi32(0x4B000000);  // bits of 2^23
  __m512 y[MR];
  for (int m = 0; m < MR; ++m) y[m] = _mm512_setzero_ps();
  int64_t b = 0;
  while (b < nb) {
    const int32_t g = w.block_group[b];
    const __m512 zm = _mm512_add_ps(
        _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(zp + g * kTileN)))),
        _mm512_set1_ps(8388608.0f));
    __m512 acc[MR][NA];
    for (int m = 0; m < MR; ++m)
      for (int a = 0; a < NA; ++a) acc[m][a] = _mm512_setzero_ps();
    do {
      const char* cb = c + b * (kOctetsPerBlock * kTileOctetBytes);
      for (int o = 0; o < kOctetsPerBlock; ++o) {
        const __m512i v = _mm512_loadu_si512(cb + o * kTileOctetBytes);
        const int64_t r0 = (b * kOctetsPerBlock + o) * kOctet;
#pragma GCC unroll 8
        for (int j = 0; j < 8; ++j) {
          const __m512i sh = j == 0 ? v : _mm512_srli_epi32(v, 4 * j);
          // (sh & 0xF) | 2^23 bits, as a float: 2^23 + q; minus (2^23 + z): q - z exactly
          const __m512 wv = _mm512_sub_ps(_mm512_castsi512_ps(_mm512_ternarylogic_epi32(sh, mask, magic, 0xEA)), zm);
          for (int m = 0; m < MR; ++m)
            acc[m][j % NA] = _mm512_fmadd_ps(wv, _mm512_set1_ps(xf[m][r0 + kNibbleRow[j]]), acc[m][j % NA]);
        }
      }
      ++b;
    } while (b < nb && w.block_group[b] == g);
    const __m512 s = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sc + g * kTileN)));
    for (int m = 0; m < MR; ++m) {
      __m512 a = acc[m][0];
      for (int k = 1; k < NA; ++k) a = _mm512_add_ps(a, acc[m][k]);
      y[m] = _mm512_fmadd_ps(s, a, y[m]);
    }
  }
  for (int m = 0; m < MR; ++m) _mm512_storeu_ps(out + m * kTileN, y[m]);
}

// Bit-for-bit the scalar contract (quantize_blocks_scalar): same amax, same product x * (127 / amax), and
// vcvtps2dq rounds half to even like nearbyint in the default rounding mode.
void quantize(const float* xf, int64_t nblocks, int8_t* xq, float* xd, float* xds) {
  const __m512 signmask = _mm512_set1_ps(-0.0f);
  const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
  for (int64_t b = 0; b < nblocks; ++b) {
    const __m512 a0 = _mm512_loadu_ps(xf + b * kBlockK), a1 = _mm512_loadu_ps(xf + b * kBlockK + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_andnot_ps(signmask, a0), _mm512_andnot_ps(signmask, a1)));
    const float d = amax / 127.0f;
    const __m512 id = _mm512_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
    __m512i q0 = _mm512_cvt_roundps_epi32(_mm512_mul_ps(a0, id), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512i q1 = _mm512_cvt_roundps_epi32(_mm512_mul_ps(a1, id), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    q0 = _mm512_min_epi32(_mm512_max_epi32(q0, lo), hi);
    q1 = _mm512_min_epi32(_mm512_max_epi32(q1, lo), hi);
    const int32_t sum = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(xq + b * kBlockK), _mm512_cvtepi32_epi8(q0));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(xq + b * kBlockK + 16), _mm512_cvtepi32_epi8(q1));
    xd[b] = d;
    xds[b] = d * static_cast<float>(sum);
  }
}

const TileKernels kAvx512 = {
    {tile_exact_masked<1>, tile_exact_masked<2>, tile_exact<3>, tile_exact<4>},
    {tile_int8<1>, tile_int8<2>, tile_int8<3>, tile_int8<4>},
    quantize,
};

}  // namespace

const TileKernels* kernels_avx512() { return &kAvx512; }

}  // namespace q4
}  // namespace oe
