// q4 tile kernels for AArch64 Advanced SIMD (baseline ARMv8-A NEON: no dot-product extension required, so
// the same binary runs on every AArch64 core). A 64-byte octet row of a tile is four 128-bit registers, each
// holding 4 columns x 8 codes (FORMAT.md: byte b = row b low nibble, row 4+b high nibble).
//
// INT8: lo = v & 0x0F, hi = v >> 4 are u8 codes <= 15, so they are also valid s8; vmull_s8 multiplies 8 of
//   them with the broadcast activations into int16 and vpadalq_s16 adds adjacent pairs into int32 slots
//   [col c rows 0+1, col c rows 2+3, col c+1 rows 0+1, ...]. Per block, vpaddq_s32 folds the slot pairs into
//   one int32 per column. Exact: |slot| <= 32 rows * 15 * 127.
// EXACT: ((v >> 4j) & 0xF) converted to fp32, minus z, one fused multiply-add per 4 weights.
#include <arm_neon.h>

#include <cstring>

#include "q4/q4.h"

namespace oe {
namespace q4 {
namespace {

inline int8x16_t bcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return vreinterpretq_s8_s32(vdupq_n_s32(v));
}

inline float32x4_t load_scales4(const uint16_t* s) {
  return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(s)));
}

inline float32x4_t load_zeros4(const uint8_t* z) {
  return vcvtq_f32_u32(vmovl_u16(vget_low_u16(vmovl_u8(vcreate_u8(
      static_cast<uint64_t>(z[0]) | static_cast<uint64_t>(z[1]) << 8 | static_cast<uint64_t>(z[2]) << 16 |
      static_cast<uint64_t>(z[3]) << 24)))));
}

template <int MR>
void tile_int8(const oe_q4_weight& w, int64_t t, const Prep& p, int64_t m0, float* out) {
  const int64_t octets = w.Kp / kOctet, nb = w.Kp / kBlockK;
  const uint8_t* c = reinterpret_cast<const uint8_t*>(w.codes + t * octets * kTileN);
  const uint16_t* sc = w.scales + t * w.G * kTileN;
  const uint8_t* zp = w.zeros + t * w.G * kTileN;
  const uint8x16_t mask = vdupq_n_u8(0x0F);
  float32x4_t y[MR][4];
  for (int m = 0; m < MR; ++m)
    for (int q = 0; q < 4; ++q) y[m][q] = vdupq_n_f32(0.0f);
  int64_t b = 0;
  while (b < nb) {
    const int32_t g = w.block_group[b];
    float32x4_t acc[MR][4];
    float zsum[MR];
    for (int m = 0; m < MR; ++m) {
      for (int q = 0; q < 4; ++q) acc[m][q] = vdupq_n_f32(0.0f);
      zsum[m] = 0.0f;
    }
    do {
      int32x4_t slots[MR][4][2];  // [row][register][column pair]
      for (int m = 0; m < MR; ++m)
        for (int q = 0; q < 4; ++q) slots[m][q][0] = slots[m][q][1] = vdupq_n_s32(0);
      for (int o = 0; o < kOctetsPerBlock; ++o) {
        const uint8_t* co = c + (b * kOctetsPerBlock + o) * kTileOctetBytes;
        for (int q = 0; q < 4; ++q) {
          const uint8x16_t v = vld1q_u8(co + 16 * q);
          const int8x16_t lo = vreinterpretq_s8_u8(vandq_u8(v, mask));
          const int8x16_t hi = vreinterpretq_s8_u8(vshrq_n_u8(v, 4));
          for (int m = 0; m < MR; ++m) {
            const int8_t* xo = p.xq + (m0 + m) * w.Kp + b * kBlockK + o * kOctet;
            const int8x16_t xa = bcast4(xo), xb = bcast4(xo + 4);
            slots[m][q][0] = vpadalq_s16(slots[m][q][0], vmull_s8(vget_low_s8(lo), vget_low_s8(xa)));
            slots[m][q][1] = vpadalq_s16(slots[m][q][1], vmull_s8(vget_high_s8(lo), vget_high_s8(xa)));
            slots[m][q][0] = vpadalq_s16(slots[m][q][0], vmull_s8(vget_low_s8(hi), vget_low_s8(xb)));
            slots[m][q][1] = vpadalq_s16(slots[m][q][1], vmull_s8(vget_high_s8(hi), vget_high_s8(xb)));
          }
        }
      }
      for (int m = 0; m < MR; ++m) {
        const float d = p.xd[(m0 + m) * nb + b];
        for (int q = 0; q < 4; ++q) {
          const int32x4_t isum = vpaddq_s32(slots[m][q][0], slots[m][q][1]);  // columns 4q .. 4q+3
          acc[m][q] = vfmaq_n_f32(acc[m][q], vcvtq_f32_s32(isum), d);
        }
        zsum[m] += p.xds[(m0 + m) * nb + b];
      }
      ++b;
    } while (b < nb && w.block_group[b] == g);
    for (int q = 0; q < 4; ++q) {
      const float32x4_t s = load_scales4(sc + g * kTileN + 4 * q), z = load_zeros4(zp + g * kTileN + 4 * q);
      for (int m = 0; m < MR; ++m) y[m][q] = vfmaq_f32(y[m][q], s, vfmsq_n_f32(acc[m][q], z, zsum[m]));
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int q = 0; q < 4; ++q) vst1q_f32(out + m * kTileN + 4 * q, y[m][q]);
}

template <int MR>
void tile_exact(const oe_q4_weight& w, int64_t t, const Prep& p, int64_t m0, float* out) {
  const int64_t octets = w.Kp / kOctet, nb = w.Kp / kBlockK;
  const uint32_t* c = w.codes + t * octets * kTileN;
  const uint16_t* sc = w.scales + t * w.G * kTileN;
  const uint8_t* zp = w.zeros + t * w.G * kTileN;
  const uint32x4_t mask = vdupq_n_u32(0xF);
  float32x4_t y[MR][4];
  for (int m = 0; m < MR; ++m)
    for (int q = 0; q < 4; ++q) y[m][q] = vdupq_n_f32(0.0f);
  int64_t b = 0;
  while (b < nb) {
    const int32_t g = w.block_group[b];
    float32x4_t z[4];
    for (int q = 0; q < 4; ++q) z[q] = load_zeros4(zp + g * kTileN + 4 * q);
    float32x4_t acc[MR][4][2];
    for (int m = 0; m < MR; ++m)
      for (int q = 0; q < 4; ++q) acc[m][q][0] = acc[m][q][1] = vdupq_n_f32(0.0f);
    do {
      for (int o = 0; o < kOctetsPerBlock; ++o) {
        const int64_t oct = b * kOctetsPerBlock + o;
        const int64_t r0 = oct * kOctet;
        for (int q = 0; q < 4; ++q) {
          const uint32x4_t v = vld1q_u32(c + oct * kTileN + 4 * q);
          for (int j = 0; j < 8; ++j) {
            const uint32x4_t nib = vandq_u32(vshlq_u32(v, vdupq_n_s32(-4 * j)), mask);
            const float32x4_t wv = vsubq_f32(vcvtq_f32_u32(nib), z[q]);
            for (int m = 0; m < MR; ++m)
              acc[m][q][j & 1] = vfmaq_n_f32(acc[m][q][j & 1], wv, p.xf[(m0 + m) * w.Kp + r0 + kNibbleRow[j]]);
          }
        }
      }
      ++b;
    } while (b < nb && w.block_group[b] == g);
    for (int q = 0; q < 4; ++q) {
      const float32x4_t s = load_scales4(sc + g * kTileN + 4 * q);
      for (int m = 0; m < MR; ++m) y[m][q] = vfmaq_f32(y[m][q], s, vaddq_f32(acc[m][q][0], acc[m][q][1]));
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int q = 0; q < 4; ++q) vst1q_f32(out + m * kTileN + 4 * q, y[m][q]);
}

const TileKernels kNeon = {
    {tile_exact<1>, tile_exact<2>, tile_exact<3>, tile_exact<4>},
    {tile_int8<1>, tile_int8<2>, tile_int8<3>, tile_int8<4>},
    quantize_blocks_scalar,  // the per-block quantization is a small share of a call; the scalar one is the contract
};

}  // namespace

const TileKernels* kernels_neon() { return &kNeon; }

}  // namespace q4
}  // namespace oe
