// decode: one new token of one sequence (B = 1, T = 1) through every decoder layer on the CPU, natively.
//
// The Python layer loop (omni_edge/backbone.py) dispatches ~20 small ops per layer; at decode a layer of a
// small model costs far less arithmetic than that dispatch. Here the whole loop runs in C++ over a "plan"
// built once when the KV cache is allocated: per-layer pointers and sizes, validated then, plus a scratch
// workspace, so a step allocates nothing and checks only the position.
//
// One layer (Qwen2 / Llama semantics, the same kernels as the Python path; docs/MODEL.md §1.5):
//   x = rms_norm(h, input_layernorm)                        fp32 math, then cast to the activation dtype, times w
//   q, k, v = W_pack(x) split [Hq*D | Hkv*D | Hkv*D]        or q_proj / k_proj / v_proj (each with its bias)
//   q, k = rope(q), rope(k) at position `pos`               rotate-half, cos/sin rows of the Backbone's tables
//   k_cache[:, pos], v_cache[:, pos] = k, v                 caches (1, Hkv, S, D)
//   o = attention over cache positions [0, pos]             oe_attention_decode_cpu (GQA)
//   h = h + o_proj(o)
//   x = rms_norm(h, post_attention_layernorm)
//   h = h + down_proj(silu(gate_proj(x)) * up_proj(x))
// and after the last layer out = rms_norm(h, model.norm).
//
// and, when the plan has an lm_head and the caller asks for them, logits (V) = lm_head(out) in fp32.
//
// Linears are 4-bit (oe_q4_weight, oe_q4_matmul_cpu in the mode the caller passes per step), dense (N, K)
// row-major fp32 / fp16 / bf16 with an optional fp32 bias (oe_gemv_f32_cpu below, oe_gemv_cpu in gemv_lowp.h), or
// int8 per row with fp16 scales per block of inputs (oe_gemv_q8_cpu, the `--lm-head q8` format). Activations
// are fp32 whatever the weights' dtype: a 16-bit embedding / lm_head is read as stored, never copied to fp32.
#pragma once
#include <cstddef>
#include <cstdint>

#include "common/oe.h"
#include "decode/gemv_lowp.h"
#include "q4/q4.h"

extern "C" {

typedef enum oe_decode_linear_kind {
  OE_DECODE_NONE = 0,   // only for the config's lm_head: the plan computes no logits
  OE_DECODE_DENSE = 1,
  OE_DECODE_Q4 = 2,
  OE_DECODE_Q8 = 3,
} oe_decode_linear_kind;

// One linear y (N) = W x (K) + b.
typedef struct oe_decode_linear {
  int kind;                  // oe_decode_linear_kind
  oe_q4_weight q4;           // OE_DECODE_Q4: the tiled 4-bit weight (its bias inside)
  const void* weight;        // OE_DECODE_DENSE: (N, K) row-major in `wdtype` (torch Linear layout);
                             // OE_DECODE_Q8: (N, K) int8 codes
  int wdtype;                // OE_DECODE_DENSE: OE_F32, OE_F16 or OE_BF16
  const uint16_t* q8_scales; // OE_DECODE_Q8: (N, ceil(K / q8_block)) fp16 bits
  int64_t q8_block;          // OE_DECODE_Q8: inputs per scale (K: one scale per row)
  const float* bias;         // OE_DECODE_DENSE / Q8: (N,) fp32 or NULL
  int64_t N, K;              // out / in features (for q4: equal to q4.N / q4.K)
} oe_decode_linear;

// Pointers of one decoder layer `model.layers.N`. Either qkv (packed W_pack) or q, k, v (split) is used.
typedef struct oe_decode_layer {
  const float* input_norm;  // (C,) input_layernorm.weight
  const float* post_norm;   // (C,) post_attention_layernorm.weight
  oe_decode_linear qkv;     // (Hq*D + 2*Hkv*D, C) self_attn.W_pack, when packed
  oe_decode_linear q, k, v; // (Hq*D, C), (Hkv*D, C), (Hkv*D, C) q_proj / k_proj / v_proj, when split
  oe_decode_linear o;       // (C, Hq*D) self_attn.o_proj
  oe_decode_linear gate, up;// (I, C) mlp.gate_proj / up_proj
  oe_decode_linear down;    // (C, I) mlp.down_proj
  float* k_cache;           // (1, Hkv, S, D) this layer's keys
  float* v_cache;           // (1, Hkv, S, D) this layer's values
} oe_decode_layer;

typedef struct oe_decode_config {
  int64_t hidden;         // C
  int64_t heads;          // Hq
  int64_t kv_heads;       // Hkv
  int64_t head_dim;       // D (even, <= OE_ATTN_MAX_HEAD_DIM)
  int64_t intermediate;   // I
  int64_t layers;         // L
  int64_t max_len;        // S: cache capacity = rows of cos / sin
  float eps;              // rms_norm_eps
  int packed_qkv;         // 1: layer.qkv is used; 0: layer.q / k / v
  int dtype;              // activation dtype; OE_F32 only
  const float* cos;       // (S, D) rope table, fp32
  const float* sin;       // (S, D)
  const float* final_norm;// (C,) model.norm.weight
  oe_decode_linear lm_head;// (V, C) lm_head.weight (or the tied embedding, or its q8 / q4 copy); kind 0: none
} oe_decode_config;

typedef struct oe_decode_plan oe_decode_plan;

// Validates every pointer and size (each q4 weight's block_group values too) and allocates the scratch
// workspace. The plan copies the descriptors; the tensors they point to must outlive it.
oe_status oe_decode_plan_create(const oe_decode_config* cfg, const oe_decode_layer* layers, int64_t n_layers,
                                oe_decode_plan** out);
void oe_decode_plan_destroy(oe_decode_plan* plan);

// One token: h_in (C,) fp32 embedding of the token at position `pos` -> h_out (C,) fp32 hidden state after
// the final norm. Writes K/V of every layer at `pos` and attends over [0, pos]. pos must be in [0, S)
// (OE_ERR_OUT_OF_RANGE otherwise, nothing written). q4_mode: OE_Q4_EXACT or OE_Q4_INT8. h_in and h_out may
// be the same buffer.
oe_status oe_decode_step_cpu(oe_decode_plan* plan, const float* h_in, float* h_out, int64_t pos, int q4_mode);

// The same step, then logits (V,) fp32 = lm_head(h_out) when `logits` is not NULL (the plan must have an lm_head:
// OE_ERR_INVALID_ARG otherwise). h_out may be NULL when only the logits are wanted.
oe_status oe_decode_step_logits_cpu(oe_decode_plan* plan, const float* h_in, float* h_out, float* logits, int64_t pos,
                                    int q4_mode);

// Dense GEMV y (N) = W (N, K) row-major . x (K) + bias (N, or NULL), fp32, over the q4 thread pool, AVX-512 /
// AVX2 / scalar by oe::isa_active().
oe_status oe_gemv_f32_cpu(const float* W, const float* x, const float* bias, int64_t N, int64_t K, float* y);

}  // extern "C"

namespace oe {
namespace decode {

// Rows [n0, n1) of y = W x (no bias), per ISA. nullptr where the ISA is not compiled.
using GemvRowsFn = void (*)(const float* W, const float* x, int64_t K, int64_t n0, int64_t n1, float* y);
void gemv_rows_scalar(const float* W, const float* x, int64_t K, int64_t n0, int64_t n1, float* y);
GemvRowsFn gemv_rows_avx2();
GemvRowsFn gemv_rows_avx512();

}  // namespace decode
}  // namespace oe
