// Scalar fp16 / bf16 <-> fp32 conversions (round-to-nearest-even), usable from any translation unit.
// Vector paths use the ISA's own conversion instructions; these are the reference.
#pragma once
#include <cstdint>
#include <cstring>

namespace oe {

inline float bf16_to_f32(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  uint32_t u;
  if (exp == 0) {
    if (man == 0) {
      u = sign;
    } else {  // subnormal: normalise
      exp = 127 - 15 + 1;
      while ((man & 0x400u) == 0) {
        man <<= 1;
        --exp;
      }
      man &= 0x3ffu;
      u = sign | (exp << 23) | (man << 13);
    }
  } else if (exp == 31) {
    u = sign | 0x7f800000u | (man << 13);
  } else {
    u = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t f32_to_f16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t absu = u & 0x7fffffffu;
  if (absu > 0x7f800000u) return sign | 0x7e00u;               // NaN
  if (absu >= 0x477ff000u) return sign | 0x7c00u;              // overflow -> inf
  if (absu < 0x38800000u) {                                    // subnormal or zero in fp16
    if (absu < 0x33000000u) return sign;                       // underflow to zero
    const uint32_t exp = absu >> 23;
    const uint32_t man = (absu & 0x7fffffu) | 0x800000u;
    // Exact form: value = man * 2^(exp-150); fp16 subnormal unit = 2^-24 -> q = man * 2^(exp-126)
    const uint32_t sh = 126 - exp;  // q = man >> sh with RNE
    uint32_t q = man >> sh;
    const uint32_t rem = man & ((1u << sh) - 1u);
    const uint32_t halfway = 1u << (sh - 1);
    if (rem > halfway || (rem == halfway && (q & 1u))) ++q;
    return sign | static_cast<uint16_t>(q);
  }
  uint32_t v = absu - 0x38000000u;  // rebias exponent 127 -> 15
  v += 0xfffu + ((v >> 13) & 1u);   // RNE on the 13 dropped bits
  return sign | static_cast<uint16_t>(v >> 13);
}

}  // namespace oe
