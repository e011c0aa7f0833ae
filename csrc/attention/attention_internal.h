// Internal to csrc/attention: argument checks shared by the fast CPU path and the scalar reference.
#pragma once
#include <cstdint>

#include "common/oe.h"

namespace oe {
namespace attn {

oe_status check_prefill(const void* q, const void* k, const void* v, const void* out, int64_t B, int64_t T,
                        int64_t Hq, int64_t Hkv, int64_t S, int64_t D, int64_t start, const int32_t* lengths,
                        int dtype);
oe_status check_decode(const void* q, const void* k, const void* v, const void* out, int64_t B, int64_t Hq,
                       int64_t Hkv, int64_t S, int64_t D, const int32_t* lengths, int dtype);
oe_status check_varlen(const void* q, const void* k, const void* v, const void* out, int64_t N, int64_t H,
                       int64_t D, const int32_t* cu, int64_t nseg, int dtype);

// dst[i] = src[i] * m converted to dtype (round to nearest even), i < n.
void store_f32_row(const float* src, float m, oe_dtype dt, int n, void* dst);

}  // namespace attn
}  // namespace oe
