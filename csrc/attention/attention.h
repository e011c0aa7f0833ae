// Attention kernels: causal prefill and single-query decode over a preallocated KV cache (grouped-query),
// and block-diagonal (variable-length segments) attention for the encoders.
//
// Layouts (all row-major, contiguous; B batch, T new tokens, S cache capacity, Hq / Hkv query / kv heads,
// D head dim; query head h reads kv head h / (Hq / Hkv)):
//   prefill  q, out (B, T, Hq, D)    k_cache, v_cache (B, Hkv, S, D)   lengths (B,) int32 or null
//            query t sits at position start + t and sees cache positions [0, start + t]; with lengths,
//            positions >= lengths[b] are ignored and their queries' outputs are zero.
//   decode   q, out (B, Hq, D)       k_cache, v_cache (B, Hkv, S, D)   lengths (B,) int32
//            sequence b attends to cache positions [0, lengths[b]); lengths[b] == 0 gives zeros.
//   varlen   q, k, v, out (N, H, D)  cu_seqlens (num_segments + 1,) int32: 0 = c0 <= c1 <= ... = N;
//            rows c_i .. c_{i+1}-1 attend (non-causally) to each other only.
// Elements are `dtype` (oe_dtype); scores, softmax and accumulation are fp32 whatever the dtype. `scale`
// multiplies q.k (callers pass 1/sqrt(D) for the usual attention). 1 <= D <= OE_ATTN_MAX_HEAD_DIM.
//
// Every CPU entry point has a scalar reference (`*_ref`), a plain two-pass softmax loop that the tests
// compare the fast path against. The fast path (`*_cpu`) runs an online-softmax tile loop with AVX-512 /
// AVX2 / portable micro-kernels chosen by oe::isa_active(), threaded on the CPU pool over (batch, kv head,
// query block) and, for decode, over splits of the key sequence.
#pragma once
#include <cstdint>

#include "common/oe.h"

#define OE_ATTN_MAX_HEAD_DIM 256

extern "C" {

// ---- CPU ------------------------------------------------------------------------------------------
oe_status oe_attention_prefill_cpu(const void* q, const void* k_cache, const void* v_cache, void* out,
                                   int64_t B, int64_t T, int64_t Hq, int64_t Hkv, int64_t S, int64_t D,
                                   int64_t start, const int32_t* lengths, float scale, int dtype);
// num_splits: 0 = choose from the thread count; n > 0 forces n splits of each sequence's keys (tests).
oe_status oe_attention_decode_cpu(const void* q, const void* k_cache, const void* v_cache, void* out,
                                  int64_t B, int64_t Hq, int64_t Hkv, int64_t S, int64_t D,
                                  const int32_t* lengths, float scale, int dtype, int64_t num_splits);
oe_status oe_attention_varlen_cpu(const void* q, const void* k, const void* v, void* out, int64_t N,
                                  int64_t H, int64_t D, const int32_t* cu_seqlens, int64_t num_segments,
                                  float scale, int dtype);

// Scalar references (same contracts, slow, obviously correct).
oe_status oe_attention_prefill_ref(const void* q, const void* k_cache, const void* v_cache, void* out,
                                   int64_t B, int64_t T, int64_t Hq, int64_t Hkv, int64_t S, int64_t D,
                                   int64_t start, const int32_t* lengths, float scale, int dtype);
oe_status oe_attention_decode_ref(const void* q, const void* k_cache, const void* v_cache, void* out,
                                  int64_t B, int64_t Hq, int64_t Hkv, int64_t S, int64_t D,
                                  const int32_t* lengths, float scale, int dtype);
oe_status oe_attention_varlen_ref(const void* q, const void* k, const void* v, void* out, int64_t N,
                                  int64_t H, int64_t D, const int32_t* cu_seqlens, int64_t num_segments,
                                  float scale, int dtype);

// ---- CUDA -----------------------------------------------------------------------------------------
// All pointers are device pointers; `stream` is a cudaStream_t as an integer. lengths / cu_seqlens live on
// the device, so the kernels cannot report bad values: they clamp lengths to [0, S] and treat a decreasing
// or out-of-range cu_seqlens pair as an empty segment, so user data never causes an out-of-bounds access.
// The Python ops check the values before the launch.
//
// Decode splits each sequence's keys over `num_splits` blocks (flash-decoding) and combines the partial
// softmax states in a second kernel. oe_attention_decode_cuda_plan picks num_splits for the device (or
// takes `requested` > 0) and says how many bytes of fp32 workspace the call needs (0 when num_splits is 1).
oe_status oe_attention_decode_cuda_plan(int64_t B, int64_t Hq, int64_t Hkv, int64_t S, int64_t D, int device,
                                        int64_t requested, int64_t* num_splits, int64_t* workspace_bytes);
oe_status oe_attention_decode_cuda(const void* q, const void* k_cache, const void* v_cache, void* out,
                                   int64_t B, int64_t Hq, int64_t Hkv, int64_t S, int64_t D,
                                   const int32_t* lengths, float scale, int dtype, int64_t num_splits,
                                   void* workspace, int64_t workspace_bytes, uintptr_t stream);
oe_status oe_attention_prefill_cuda(const void* q, const void* k_cache, const void* v_cache, void* out,
                                    int64_t B, int64_t T, int64_t Hq, int64_t Hkv, int64_t S, int64_t D,
                                    int64_t start, const int32_t* lengths, float scale, int dtype,
                                    uintptr_t stream);
// max_seqlen: the longest segment (host value; sizes the grid).
oe_status oe_attention_varlen_cuda(const void* q, const void* k, const void* v, void* out, int64_t N,
                                   int64_t H, int64_t D, const int32_t* cu_seqlens, int64_t num_segments,
                                   int64_t max_seqlen, float scale, int dtype, uintptr_t stream);

}  // extern "C"
