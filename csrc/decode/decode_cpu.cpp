// The native CPU decode step (decode.h): plan validation, the per-token layer loop, and the dense GEMV driver
// with its portable scalar rows kernel (the Isa::Scalar level, also the reference the tests compare with torch).
#include <cmath>
#include <cstring>
#include <new>
#include <vector>

#include "attention/attention.h"
#include "common/cpu_features.h"
#include "decode/decode.h"
#include "decode/gemv_lowp.h"

namespace oe {
namespace decode {

void gemv_rows_scalar(const float* W, const float* x, int64_t K, int64_t n0, int64_t n1, float* y) {
  for (int64_t n = n0; n < n1; ++n) {
    const float* w = W + n * K;
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};  // four partial sums: the compiler may vectorise this
    int64_t k = 0;
    for (; k + 4 <= K; k += 4)
      for (int j = 0; j < 4; ++j) acc[j] += w[k + j] * x[k + j];
    float s = (acc[0] + acc[1]) + (acc[2] + acc[3]);
    for (; k < K; ++k) s += w[k] * x[k];
    y[n] = s;
  }
}

#if !defined(OE_ARCH_X86)
GemvRowsFn gemv_rows_avx2() { return nullptr; }
GemvRowsFn gemv_rows_avx512() { return nullptr; }
#endif

namespace {

GemvRowsFn pick_gemv() {
  const Isa isa = isa_active();
  GemvRowsFn f = nullptr;
  if (isa == Isa::Avx512) f = gemv_rows_avx512();
  if (!f && isa >= Isa::Avx2) f = gemv_rows_avx2();
  return f ? f : gemv_rows_scalar;
}

// y = W x + bias over the pool: chunks of whole 4-row groups, about four per thread, at least 16 rows.
void gemv(const float* W, const float* x, const float* bias, int64_t N, int64_t K, float* y) {
  const GemvRowsFn fn = pick_gemv();
  parallel_rows(N, 4, 16, bias, y, [&](int64_t n0, int64_t n1) { fn(W, x, K, n0, n1, y); });
}

}  // namespace
}  // namespace decode
}  // namespace oe

using namespace oe;
using namespace oe::decode;

extern "C" oe_status oe_gemv_f32_cpu(const float* W, const float* x, const float* bias, int64_t N, int64_t K,
                                     float* y) {
  OE_CHECK(N >= 0 && K >= 0, OE_ERR_INVALID_ARG, "gemv: N and K must be >= 0, got N=%lld K=%lld", (long long)N,
           (long long)K);
  if (N == 0) return OE_OK;
  OE_CHECK(y && (K == 0 || (W && x)), OE_ERR_INVALID_ARG, "gemv: W, x and y must not be NULL");
  gemv(W, x, bias, N, K, y);
  return OE_OK;
}

// ---- the plan -------------------------------------------------------------------------------------

struct oe_decode_plan {
  oe_decode_config cfg;
  std::vector<oe_decode_layer> layers;
  // fp32 scratch, one block each: h (C), x (C), t (C), qkv (Hq*D + 2*Hkv*D), attn (Hq*D), gate (I), up (I)
  std::vector<float> scratch;
  float *h, *x, *t, *qkv, *attn, *gate, *up;
  std::vector<unsigned char> q4_ws;  // oe_q4_matmul_cpu workspace, sized for the largest Kp in either mode
  int32_t length;                    // the attention kernel's lengths[0]
};

namespace {

constexpr int64_t kSerialAttnBytes = int64_t{1} << 20;

oe_status check_linear(const oe_decode_linear& l, int64_t layer, const char* name, int64_t N, int64_t K,
                       size_t* ws) {
  OE_CHECK(l.N == N && l.K == K, OE_ERR_INVALID_ARG, "decode plan: layer %lld %s: expected shape (%lld, %lld), got (%lld, %lld)",
           (long long)layer, name, (long long)N, (long long)K, (long long)l.N, (long long)l.K);
  if (l.kind == OE_DECODE_DENSE) {
    OE_CHECK(l.weight != nullptr, OE_ERR_INVALID_ARG, "decode plan: layer %lld %s: dense weight pointer is NULL",
             (long long)layer, name);
    OE_CHECK(dtype_valid(l.wdtype), OE_ERR_INVALID_ARG,
             "decode plan: layer %lld %s: dense weight dtype must be 0 (f32), 1 (f16) or 2 (bf16), got %d",
             (long long)layer, name, l.wdtype);
    return OE_OK;
  }
  if (l.kind == OE_DECODE_Q8) {
    OE_CHECK(l.weight != nullptr && l.q8_scales != nullptr, OE_ERR_INVALID_ARG,
             "decode plan: layer %lld %s: q8 codes and scales must not be NULL", (long long)layer, name);
    OE_CHECK(l.q8_block >= 1, OE_ERR_INVALID_ARG, "decode plan: layer %lld %s: q8 block must be >= 1, got %lld",
             (long long)layer, name, (long long)l.q8_block);
    return OE_OK;
  }
  OE_CHECK(l.kind == OE_DECODE_Q4, OE_ERR_INVALID_ARG,
           "decode plan: layer %lld %s: kind must be %d (dense), %d (q4) or %d (q8), got %d", (long long)layer, name,
           OE_DECODE_DENSE, OE_DECODE_Q4, OE_DECODE_Q8, l.kind);
  OE_CHECK(l.q4.N == N && l.q4.K == K, OE_ERR_INVALID_ARG,
           "decode plan: layer %lld %s: q4 weight is (K=%lld, N=%lld), expected (K=%lld, N=%lld)", (long long)layer,
           name, (long long)l.q4.K, (long long)l.q4.N, (long long)K, (long long)N);
  oe_status st = q4::validate(&l.q4, nullptr, OE_F32, 0, nullptr, true);
  if (st != OE_OK) return st;
  for (int mode : {OE_Q4_EXACT, OE_Q4_INT8}) {
    const size_t need = oe_q4_cpu_workspace_bytes(1, l.q4.Kp, mode);
    if (need > *ws) *ws = need;
  }
  return OE_OK;
}

inline void rms_norm(const float* h, const float* w, int64_t C, float eps, float* out) {
  double ss = 0.0;
  for (int64_t i = 0; i < C; ++i) ss += static_cast<double>(h[i]) * h[i];
  const float r = 1.0f / std::sqrt(static_cast<float>(ss / static_cast<double>(C)) + eps);
  for (int64_t i = 0; i < C; ++i) out[i] = w[i] * (h[i] * r);
}

// Rotate-half RoPE of `heads` vectors of D (even) in place with one position's cos / sin rows (fp32).
inline void rope(float* v, int64_t heads, int64_t D, const float* c, const float* s) {
  const int64_t half = D / 2;
  float tmp[OE_ATTN_MAX_HEAD_DIM];
  for (int64_t hh = 0; hh < heads; ++hh) {
    float* x = v + hh * D;
    for (int64_t i = 0; i < half; ++i) tmp[i] = x[i] * c[i] + (-x[i + half]) * s[i];
    for (int64_t i = half; i < D; ++i) tmp[i] = x[i] * c[i] + x[i - half] * s[i];
    std::memcpy(x, tmp, static_cast<size_t>(D) * sizeof(float));
  }
}

inline oe_status linear_run(const oe_decode_linear& l, const float* x, float* y, int mode, oe_decode_plan* p) {
  if (l.kind == OE_DECODE_Q4) return oe_q4_matmul_cpu(&l.q4, x, OE_F32, 1, y, mode, p->q4_ws.data(), p->q4_ws.size());
  if (l.kind == OE_DECODE_Q8)
    return oe_gemv_q8_cpu(static_cast<const int8_t*>(l.weight), l.q8_scales, l.q8_block, x, l.bias, l.N, l.K, y,
                          mode);
  if (l.wdtype != OE_F32) return oe_gemv_cpu(l.weight, l.wdtype, x, l.bias, l.N, l.K, y);
  gemv(static_cast<const float*>(l.weight), x, l.bias, l.N, l.K, y);
  return OE_OK;
}

// Small weights (under kSerialLinearBytes streamed) run on the calling thread: splitting a ~0.2 MB GEMV over
// the pool costs more in hand-offs than it saves. Larger ones use every thread. At 1 MB (chosen when the pool
// was one job at a time) every SmolLM2-135M linear ran on one thread; at 256 KB its 0.44 MB gate / up / down
// use both: rtn4 + q8 lm_head decode 69-70 -> 73-76 tok/s, 2 threads, quiet 2-core AVX2 machine, interleaved
// runs of `omni-edge bench`.
constexpr int64_t kSerialLinearBytes = int64_t{1} << 18;

inline oe_status linear(const oe_decode_linear& l, const float* x, float* y, int mode, oe_decode_plan* p) {
  const int threads = num_threads();
  const int64_t bytes = l.kind == OE_DECODE_Q4   ? l.q4.Kp * l.q4.N / 2
                        : l.kind == OE_DECODE_Q8 ? l.N * l.K
                                                 : l.N * l.K * int64_t(dtype_size(static_cast<oe_dtype>(l.wdtype)));
  if (threads <= 1 || bytes >= kSerialLinearBytes) return linear_run(l, x, y, mode, p);
  ScopedMaxThreads one(1);  // this call only: a concurrent caller keeps its threads
  return linear_run(l, x, y, mode, p);
}

}  // namespace

extern "C" oe_status oe_decode_plan_create(const oe_decode_config* cfg, const oe_decode_layer* layers,
                                           int64_t n_layers, oe_decode_plan** out) {
  OE_CHECK(out != nullptr, OE_ERR_INVALID_ARG, "decode plan: output pointer is NULL");
  *out = nullptr;
  OE_CHECK(cfg != nullptr, OE_ERR_INVALID_ARG, "decode plan: config is NULL");
  const oe_decode_config& c = *cfg;
  OE_CHECK(c.dtype == OE_F32, OE_ERR_UNSUPPORTED, "decode plan: activation dtype must be %d (f32), got %d", OE_F32,
           c.dtype);
  OE_CHECK(c.hidden > 0 && c.intermediate > 0 && c.max_len > 0, OE_ERR_INVALID_ARG,
           "decode plan: hidden, intermediate and max_len must be positive, got %lld, %lld, %lld", (long long)c.hidden,
           (long long)c.intermediate, (long long)c.max_len);
  OE_CHECK(c.max_len <= (int64_t{1} << 31) - 1, OE_ERR_INVALID_ARG, "decode plan: max_len must be < 2^31, got %lld",
           (long long)c.max_len);
  OE_CHECK(c.heads >= 1 && c.kv_heads >= 1 && c.heads % c.kv_heads == 0, OE_ERR_INVALID_ARG,
           "decode plan: heads (%lld) must be a positive multiple of kv_heads (%lld)", (long long)c.heads,
           (long long)c.kv_heads);
  OE_CHECK(c.head_dim >= 2 && c.head_dim % 2 == 0 && c.head_dim <= OE_ATTN_MAX_HEAD_DIM, OE_ERR_INVALID_ARG,
           "decode plan: head_dim must be even and in [2, %d], got %lld", OE_ATTN_MAX_HEAD_DIM, (long long)c.head_dim);
  OE_CHECK(c.eps >= 0.0f, OE_ERR_INVALID_ARG, "decode plan: eps must be >= 0, got %g", (double)c.eps);
  OE_CHECK(c.cos && c.sin && c.final_norm, OE_ERR_INVALID_ARG, "decode plan: cos, sin and final_norm must not be NULL");
  OE_CHECK(layers != nullptr && n_layers >= 1 && n_layers == c.layers, OE_ERR_INVALID_ARG,
           "decode plan: expected %lld layer descriptors, got %lld", (long long)c.layers, (long long)n_layers);
  const int64_t C = c.hidden, qs = c.heads * c.head_dim, kvs = c.kv_heads * c.head_dim, I = c.intermediate;
  size_t ws = 0;
  if (c.lm_head.kind != OE_DECODE_NONE) {  // reported as layer -1
    const oe_status st = check_linear(c.lm_head, -1, "lm_head", c.lm_head.N, C, &ws);
    if (st != OE_OK) return st;
    OE_CHECK(c.lm_head.N >= 1, OE_ERR_INVALID_ARG, "decode plan: lm_head must have at least one row, got %lld",
             (long long)c.lm_head.N);
  }
  for (int64_t i = 0; i < n_layers; ++i) {
    const oe_decode_layer& L = layers[i];
    OE_CHECK(L.input_norm && L.post_norm && L.k_cache && L.v_cache, OE_ERR_INVALID_ARG,
             "decode plan: layer %lld: norm weights and caches must not be NULL", (long long)i);
    oe_status st;
    if (c.packed_qkv) {
      if ((st = check_linear(L.qkv, i, "W_pack", qs + 2 * kvs, C, &ws)) != OE_OK) return st;
    } else {
      if ((st = check_linear(L.q, i, "q_proj", qs, C, &ws)) != OE_OK) return st;
      if ((st = check_linear(L.k, i, "k_proj", kvs, C, &ws)) != OE_OK) return st;
      if ((st = check_linear(L.v, i, "v_proj", kvs, C, &ws)) != OE_OK) return st;
    }
    if ((st = check_linear(L.o, i, "o_proj", C, qs, &ws)) != OE_OK) return st;
    if ((st = check_linear(L.gate, i, "gate_proj", I, C, &ws)) != OE_OK) return st;
    if ((st = check_linear(L.up, i, "up_proj", I, C, &ws)) != OE_OK) return st;
    if ((st = check_linear(L.down, i, "down_proj", C, I, &ws)) != OE_OK) return st;
  }
  oe_decode_plan* p = new (std::nothrow) oe_decode_plan();
  OE_CHECK(p != nullptr, OE_ERR_NO_MEMORY, "decode plan: out of memory");
  try {
    p->cfg = c;
    p->layers.assign(layers, layers + n_layers);
    const int64_t qkv = qs + 2 * kvs;
    p->scratch.assign(static_cast<size_t>(3 * C + qkv + qs + 2 * I), 0.0f);
    p->q4_ws.assign(ws > 0 ? ws : 64, 0);
  } catch (const std::bad_alloc&) {
    delete p;
    return fail(OE_ERR_NO_MEMORY, "decode plan: out of memory for the scratch workspace (%lld floats + %lld bytes)",
                (long long)(3 * C + qs + 2 * kvs + qs + 2 * I), (long long)(ws > 0 ? ws : 64));
  }
  float* s = p->scratch.data();
  p->h = s;
  p->x = p->h + C;
  p->t = p->x + C;
  p->qkv = p->t + C;
  p->attn = p->qkv + qs + 2 * kvs;
  p->gate = p->attn + qs;
  p->up = p->gate + I;
  p->length = 0;
  *out = p;
  return OE_OK;
}

extern "C" void oe_decode_plan_destroy(oe_decode_plan* plan) { delete plan; }

extern "C" oe_status oe_decode_step_cpu(oe_decode_plan* p, const float* h_in, float* h_out, int64_t pos,
                                        int q4_mode) {
  OE_CHECK(h_out != nullptr, OE_ERR_INVALID_ARG, "decode step: h_in and h_out must not be NULL");
  return oe_decode_step_logits_cpu(p, h_in, h_out, nullptr, pos, q4_mode);
}

extern "C" oe_status oe_decode_step_logits_cpu(oe_decode_plan* p, const float* h_in, float* h_out, float* logits,
                                               int64_t pos, int q4_mode) {
  OE_CHECK(p != nullptr, OE_ERR_INVALID_ARG, "decode step: plan is NULL");
  OE_CHECK(h_in && (h_out || logits), OE_ERR_INVALID_ARG, "decode step: h_in and h_out must not be NULL");
  OE_CHECK(!logits || p->cfg.lm_head.kind != OE_DECODE_NONE, OE_ERR_INVALID_ARG,
           "decode step: logits asked for, but the plan was built without an lm_head");
  const oe_decode_config& c = p->cfg;
  OE_CHECK(pos >= 0 && pos < c.max_len, OE_ERR_OUT_OF_RANGE,
           "decode step: position %lld is outside the allocated cache [0, %lld); allocate a longer cache",
           (long long)pos, (long long)c.max_len);
  OE_CHECK(q4_mode == OE_Q4_EXACT || q4_mode == OE_Q4_INT8, OE_ERR_INVALID_ARG,
           "decode step: q4 mode must be 0 (exact) or 1 (int8), got %d", q4_mode);
  const int64_t C = c.hidden, D = c.head_dim, Hq = c.heads, Hkv = c.kv_heads, S = c.max_len, I = c.intermediate;
  const int64_t qs = Hq * D, kvs = Hkv * D;
  const float* cs = c.cos + pos * D;
  const float* sn = c.sin + pos * D;
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(D)));
  float *h = p->h, *x = p->x, *t = p->t, *q = p->qkv, *k = p->qkv + qs, *v = p->qkv + qs + kvs;
  std::memmove(h, h_in, static_cast<size_t>(C) * sizeof(float));
  p->length = static_cast<int32_t>(pos + 1);
  // Short contexts: attention reads little (under ~1 MB of K/V per layer) and runs on this thread alone; the
  // pool would otherwise hand out and collect chunks once per layer, and on cores shared with other work a
  // hand-off can wait for a scheduler slice (see csrc/common/pool.h). Longer ones use every thread.
  const int threads = num_threads();
  const bool serial_attn = threads > 1 && (pos + 1) * Hkv * D * 2 * int64_t(sizeof(float)) < kSerialAttnBytes;
  oe_status st;
  for (const oe_decode_layer& L : p->layers) {
    rms_norm(h, L.input_norm, C, c.eps, x);
    if (c.packed_qkv) {
      if ((st = linear(L.qkv, x, q, q4_mode, p)) != OE_OK) return st;
    } else {
      if ((st = linear(L.q, x, q, q4_mode, p)) != OE_OK) return st;
      if ((st = linear(L.k, x, k, q4_mode, p)) != OE_OK) return st;
      if ((st = linear(L.v, x, v, q4_mode, p)) != OE_OK) return st;
    }
    rope(q, Hq, D, cs, sn);
    rope(k, Hkv, D, cs, sn);
    for (int64_t hh = 0; hh < Hkv; ++hh) {
      std::memcpy(L.k_cache + (hh * S + pos) * D, k + hh * D, static_cast<size_t>(D) * sizeof(float));
      std::memcpy(L.v_cache + (hh * S + pos) * D, v + hh * D, static_cast<size_t>(D) * sizeof(float));
    }
    {
      ScopedMaxThreads cap(serial_attn ? 1 : 0);  // 0: no cap
      st = oe_attention_decode_cpu(q, L.k_cache, L.v_cache, p->attn, 1, Hq, Hkv, S, D, &p->length, scale, OE_F32, 0);
    }
    if (st != OE_OK) return st;
    if ((st = linear(L.o, p->attn, t, q4_mode, p)) != OE_OK) return st;
    for (int64_t i = 0; i < C; ++i) h[i] += t[i];
    rms_norm(h, L.post_norm, C, c.eps, x);
    if ((st = linear(L.gate, x, p->gate, q4_mode, p)) != OE_OK) return st;
    if ((st = linear(L.up, x, p->up, q4_mode, p)) != OE_OK) return st;
    for (int64_t i = 0; i < I; ++i) {
      const float g = p->gate[i];
      p->gate[i] = g / (1.0f + std::exp(-g)) * p->up[i];
    }
    if ((st = linear(L.down, p->gate, t, q4_mode, p)) != OE_OK) return st;
    for (int64_t i = 0; i < C; ++i) h[i] += t[i];
  }
  rms_norm(h, c.final_norm, C, c.eps, x);
  if (h_out) std::memcpy(h_out, x, static_cast<size_t>(C) * sizeof(float));
  if (logits) return linear(c.lm_head, x, logits, q4_mode, p);
  return OE_OK;
}
