// Scalar reference attention: for every query, all scores, their max, the exponentials, their sum and the
// weighted sum of values, in fp32, one query and one key at a time. Slow and plain on purpose: the fast
// paths are tested against it.
#include <cmath>
#include <vector>

#include "attention/attention.h"
#include "attention/attention_internal.h"
#include "common/half.h"

namespace {

float load_elem(const void* base, int64_t i, oe_dtype dt) {
  switch (dt) {
    case OE_F32: return static_cast<const float*>(base)[i];
    case OE_BF16: return oe::bf16_to_f32(static_cast<const uint16_t*>(base)[i]);
    default: return oe::f16_to_f32(static_cast<const uint16_t*>(base)[i]);
  }
}

// One query (element offset q_off) against keys/values j = 0..n_keys-1 at kv_off + j * kv_stride.
void attend_one(const void* q, int64_t q_off, const void* k, const void* v, int64_t kv_off, int64_t kv_stride,
                int64_t n_keys, int64_t D, float scale, oe_dtype dt, void* out, int64_t o_off,
                std::vector<float>& scores, std::vector<float>& acc) {
  acc.assign(static_cast<size_t>(D), 0.0f);
  if (n_keys > 0) {
    scores.resize(static_cast<size_t>(n_keys));
    float mx = -INFINITY;
    for (int64_t j = 0; j < n_keys; ++j) {
      float s = 0.0f;
      for (int64_t d = 0; d < D; ++d)
        s += load_elem(q, q_off + d, dt) * load_elem(k, kv_off + j * kv_stride + d, dt);
      s *= scale;
      scores[static_cast<size_t>(j)] = s;
      mx = s > mx ? s : mx;
    }
    float sum = 0.0f;
    for (int64_t j = 0; j < n_keys; ++j) {
      const float p = std::exp(scores[static_cast<size_t>(j)] - mx);
      scores[static_cast<size_t>(j)] = p;
      sum += p;
    }
    for (int64_t j = 0; j < n_keys; ++j) {
      const float p = scores[static_cast<size_t>(j)] / sum;
      for (int64_t d = 0; d < D; ++d) acc[static_cast<size_t>(d)] += p * load_elem(v, kv_off + j * kv_stride + d, dt);
    }
  }
  char* dst = static_cast<char*>(out) + o_off * static_cast<int64_t>(oe::dtype_size(dt));
  oe::attn::store_f32_row(acc.data(), 1.0f, dt, static_cast<int>(D), dst);
}

}  // namespace

extern "C" oe_status oe_attention_prefill_ref(const void* q, const void* k_cache, const void* v_cache, void* out,
                                              int64_t B, int64_t T, int64_t Hq, int64_t Hkv, int64_t S, int64_t D,
                                              int64_t start, const int32_t* lengths, float scale, int dtype) {
  oe_status st = oe::attn::check_prefill(q, k_cache, v_cache, out, B, T, Hq, Hkv, S, D, start, lengths, dtype);
  if (st != OE_OK) return st;
  const oe_dtype dt = static_cast<oe_dtype>(dtype);
  std::vector<float> scores, acc;
  const int64_t rep = Hq / Hkv;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t h = 0; h < Hq; ++h) {
        const int64_t pos = start + t;
        const int64_t len = lengths ? lengths[b] : S;
        const int64_t n_keys = pos < len ? pos + 1 : 0;
        const int64_t qo = ((b * T + t) * Hq + h) * D;
        attend_one(q, qo, k_cache, v_cache, (b * Hkv + h / rep) * S * D, D, n_keys, D, scale, dt, out, qo, scores,
                   acc);
      }
  return OE_OK;
}

extern "C" oe_status oe_attention_decode_ref(const void* q, const void* k_cache, const void* v_cache, void* out,
                                             int64_t B, int64_t Hq, int64_t Hkv, int64_t S, int64_t D,
                                             const int32_t* lengths, float scale, int dtype) {
  oe_status st = oe::attn::check_decode(q, k_cache, v_cache, out, B, Hq, Hkv, S, D, lengths, dtype);
  if (st != OE_OK) return st;
  const oe_dtype dt = static_cast<oe_dtype>(dtype);
  std::vector<float> scores, acc;
  const int64_t rep = Hq / Hkv;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < Hq; ++h) {
      const int64_t qo = (b * Hq + h) * D;
      attend_one(q, qo, k_cache, v_cache, (b * Hkv + h / rep) * S * D, D, lengths[b], D, scale, dt, out, qo, scores,
                 acc);
    }
  return OE_OK;
}

extern "C" oe_status oe_attention_varlen_ref(const void* q, const void* k, const void* v, void* out, int64_t N,
                                             int64_t H, int64_t D, const int32_t* cu_seqlens, int64_t num_segments,
                                             float scale, int dtype) {
  oe_status st = oe::attn::check_varlen(q, k, v, out, N, H, D, cu_seqlens, num_segments, dtype);
  if (st != OE_OK) return st;
  const oe_dtype dt = static_cast<oe_dtype>(dtype);
  std::vector<float> scores, acc;
  for (int64_t i = 0; i < num_segments; ++i) {
    const int64_t a = cu_seqlens[i], len = cu_seqlens[i + 1] - a;
    for (int64_t r = 0; r < len; ++r)
      for (int64_t h = 0; h < H; ++h) {
        const int64_t qo = ((a + r) * H + h) * D;
        attend_one(q, qo, k, v, a * H * D + h * D, H * D, len, D, scale, dt, out, qo, scores, acc);
      }
  }
  return OE_OK;
}
