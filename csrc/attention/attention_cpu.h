// Internal to the CPU attention path: one unit of work ("group task") and the per-ISA kernels that run it.
//
// A group task is M = n_rows * n_heads query vectors that read the same keys and values (the query heads
// of one kv head, for a block of consecutive query rows). Query vector m = r * n_heads + g is row r, head g:
//   q element d at  q + r * q_row_stride + g * q_head_stride + d        (elements of `dtype`)
//   key j (j = 0.. relative to this sequence) at k + j * kv_row_stride, value j likewise.
// Query row r may see keys [kbeg, min(kend_r, kstop)) where kend_r = klimit for non-causal tasks and, for
// causal ones, with pos = pos0 + r:  kend_r = pos + 1 if pos < klimit else 0 (a padded query: zero output).
// The task writes either the normalised output (out, o_row_stride, o_head_stride; `dtype`) or, for a decode
// split, its partial softmax state to part[m * (2 + Dp)]: running max, running sum, unnormalised o[0..D).
#pragma once
#include <cstdint>

#include "common/oe.h"

namespace oe {
namespace attn {

constexpr int kBlockKeys = 32;  // keys per K/V tile (converted to fp32 in scratch)
constexpr int kMaxTaskRows = 64;  // query vectors per group task

inline int padded_dim(int d) { return (d + 15) / 16 * 16; }

struct GroupTask {
  oe_dtype dtype;
  int D;
  float scale;

  const void* q;
  int64_t q_row_stride, q_head_stride;
  int n_rows, n_heads;

  const void* k;
  const void* v;
  int64_t kv_row_stride;

  int64_t kbeg, kstop;
  int causal;
  int64_t pos0, klimit;

  void* out;
  int64_t o_row_stride, o_head_stride;
  float* part;  // non-null: write the partial state instead of `out`
};

// fp32 scratch one task needs (per thread).
inline int64_t scratch_floats(int D) {
  const int64_t dp = padded_dim(D);
  return 2 * kMaxTaskRows * dp            // q (scaled fp32), o accumulators
         + kMaxTaskRows * kBlockKeys      // scores / probabilities
         + 3 * kMaxTaskRows               // running max, running sum, rescale factor
         + 2 * kBlockKeys * dp            // K tile, V tile
         + kMaxTaskRows * dp / 2          // q as bf16 (AVX512_BF16 path)
         + 64;                            // slack
}

// One kernel per instruction-set level; the scalar one is portable C++.
void run_group_scalar(const GroupTask& t, float* scratch);
#if defined(OE_ARCH_X86)
void run_group_avx2(const GroupTask& t, float* scratch);
void run_group_avx512(const GroupTask& t, float* scratch);
#endif

}  // namespace attn
}  // namespace oe
