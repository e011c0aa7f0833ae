// GPTQ qweight (K/8, N) int32 -> tiled codes (nt, Kp/8, 16), the load-time repack of FORMAT.md §2 on the CPU.
// Bit-identical to omni_edge.ops.q4._tile_codes / _tile_gptq_words (the torch spec, used for GPU tensors);
// tests compare the two. The CPU pool splits the column tiles.
#include "common/pool.h"
#include "q4/q4.h"

namespace oe {
namespace q4 {
namespace {

// Tiled word from the 8 codes c[0..7] of layout rows 8o..8o+7: byte b = c[b] | c[4+b] << 4.
inline uint32_t tile_word(const uint32_t* c) {
  uint32_t w = 0;
  for (int b = 0; b < 4; ++b) w |= (c[b] | (c[4 + b] << 4)) << (8 * b);
  return w;
}

}  // namespace
}  // namespace q4
}  // namespace oe

using namespace oe;
using namespace oe::q4;

extern "C" oe_status oe_q4_repack_gptq_cpu(const int32_t* qweight, int64_t K, int64_t N, const int32_t* perm,
                                           int64_t Kp, int32_t* codes) {
  OE_CHECK(qweight && codes, OE_ERR_INVALID_ARG, "q4 repack: NULL tensor");
  OE_CHECK(K > 0 && K % kOctet == 0 && N > 0 && N % 8 == 0, OE_ERR_INVALID_ARG,
           "q4 repack: K must be a positive multiple of 8 and N of 8, got K=%lld N=%lld", (long long)K, (long long)N);
  OE_CHECK(Kp % kBlockK == 0 && Kp >= K, OE_ERR_INVALID_ARG, "q4 repack: Kp must be a multiple of %d and >= K, got %lld",
           kBlockK, (long long)Kp);
  if (perm) {
    for (int64_t r = 0; r < Kp; ++r)
      OE_CHECK(perm[r] >= -1 && perm[r] < K, OE_ERR_OUT_OF_RANGE, "q4 repack: perm[%lld] = %d outside [-1, K=%lld)",
               (long long)r, perm[r], (long long)K);
  }
  const int64_t nt = (N + kTileN - 1) / kTileN, octets = Kp / kOctet;
  const uint32_t* src = reinterpret_cast<const uint32_t*>(qweight);
  uint32_t* dst = reinterpret_cast<uint32_t*>(codes);
  parallel_for(nt, [&](int64_t t) {
    for (int64_t o = 0; o < octets; ++o) {
      for (int l = 0; l < kTileN; ++l) {
        const int64_t n = t * kTileN + l;
        uint32_t c[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        if (n < N) {
          for (int i = 0; i < 8; ++i) {
            const int64_t r = o * kOctet + i;
            const int64_t k = perm ? perm[r] : (r < K ? r : -1);
            if (k >= 0) c[i] = (src[(k / 8) * N + n] >> (4 * (k % 8))) & 0xFu;
          }
        }
        dst[(t * octets + o) * kTileN + l] = tile_word(c);
      }
    }
  });
  return OE_OK;
}
