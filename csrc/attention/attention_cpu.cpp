// CPU attention: argument checks, work decomposition over the CPU pool, ISA dispatch and the portable
// micro-kernel policy. The tile loop itself is attention_cpu_impl.h.
#include <cmath>
#include <cstring>
#include <vector>

#include "attention/attention.h"
#include "attention/attention_cpu.h"
#include "attention/attention_internal.h"
#include "common/cpu_features.h"
#include "common/half.h"

namespace oe {
namespace attn {
namespace {

// Portable policy: one lane. Used when the CPU (or the ISA cap) offers no vector level.
struct VecScalar {
  using reg = float;
  static constexpr int W = 1, MG = 4, DG = 4;
  static constexpr int kRegs = 16;
  static constexpr bool kBf16Dot = false;
  static reg zero() { return 0.0f; }
  static reg set1(float x) { return x; }
  static reg load(const float* p) { return *p; }
  static void store(float* p, reg x) { *p = x; }
  static reg fmadd(reg a, reg b, reg c) { return a * b + c; }
  static reg mul(reg a, reg b) { return a * b; }
  static reg sub(reg a, reg b) { return a - b; }
  static reg exp(reg x) { return std::exp(x); }
  static reg keep_first(reg x, int n) { return n > 0 ? x : 0.0f; }
  static void reduce_w(const reg* acc, float* out) { out[0] = acc[0]; }
  static void load_row(const void* src, oe_dtype dt, int n, float* dst) {
    if (dt == OE_F32) {
      std::memcpy(dst, src, static_cast<size_t>(n) * 4);
    } else if (dt == OE_BF16) {
      const uint16_t* s = static_cast<const uint16_t*>(src);
      for (int i = 0; i < n; ++i) dst[i] = bf16_to_f32(s[i]);
    } else {
      const uint16_t* s = static_cast<const uint16_t*>(src);
      for (int i = 0; i < n; ++i) dst[i] = f16_to_f32(s[i]);
    }
  }
  static void store_row(const float* src, float m, oe_dtype dt, int n, void* dst) {
    store_f32_row(src, m, dt, n, dst);
  }
};

#include "attention/attention_cpu_impl.h"

}  // namespace

void run_group_scalar(const GroupTask& t, float* scratch) { run_group_impl<VecScalar>(t, scratch); }

void store_f32_row(const float* src, float m, oe_dtype dt, int n, void* dst) {
  if (dt == OE_F32) {
    float* d = static_cast<float*>(dst);
    for (int i = 0; i < n; ++i) d[i] = src[i] * m;
  } else if (dt == OE_BF16) {
    uint16_t* d = static_cast<uint16_t*>(dst);
    for (int i = 0; i < n; ++i) d[i] = f32_to_bf16(src[i] * m);
  } else {
    uint16_t* d = static_cast<uint16_t*>(dst);
    for (int i = 0; i < n; ++i) d[i] = f32_to_f16(src[i] * m);
  }
}

// ---- argument checks shared by the fast path and the reference --------------------------------------

// `empty`: the call has no query rows; its tensors may then be empty, with null data pointers.
oe_status check_common(const void* q, const void* k, const void* v, const void* out, int dtype, int64_t D,
                       bool empty) {
  OE_CHECK(dtype_valid(dtype), OE_ERR_INVALID_ARG, "attention: dtype code %d is not one of 0 (f32), 1 (f16), 2 (bf16)",
           dtype);
  OE_CHECK(empty || (q && k && v && out), OE_ERR_INVALID_ARG, "attention: null tensor pointer");
  OE_CHECK(D >= 1 && D <= OE_ATTN_MAX_HEAD_DIM, OE_ERR_INVALID_ARG,
           "attention: head_dim must be in [1, %d], got %lld", OE_ATTN_MAX_HEAD_DIM, static_cast<long long>(D));
  return OE_OK;
}

oe_status check_cache(int64_t B, int64_t Hq, int64_t Hkv, int64_t S) {
  OE_CHECK(B >= 0, OE_ERR_INVALID_ARG, "attention: batch must be >= 0, got %lld", static_cast<long long>(B));
  OE_CHECK(Hq >= 1 && Hkv >= 1 && Hq % Hkv == 0, OE_ERR_INVALID_ARG,
           "attention: query heads (%lld) must be a positive multiple of kv heads (%lld)",
           static_cast<long long>(Hq), static_cast<long long>(Hkv));
  OE_CHECK(S >= 0 && S <= (int64_t{1} << 31) - 1, OE_ERR_INVALID_ARG,
           "attention: cache capacity must be in [0, 2^31), got %lld", static_cast<long long>(S));
  return OE_OK;
}

oe_status check_lengths(const int32_t* lengths, int64_t B, int64_t S, bool required) {
  if (!lengths) {
    OE_CHECK(!required, OE_ERR_INVALID_ARG, "attention: lengths pointer is null");
    return OE_OK;
  }
  for (int64_t b = 0; b < B; ++b)
    OE_CHECK(lengths[b] >= 0 && lengths[b] <= S, OE_ERR_OUT_OF_RANGE,
             "attention: lengths[%lld] = %d is outside [0, %lld] (the cache capacity)", static_cast<long long>(b),
             lengths[b], static_cast<long long>(S));
  return OE_OK;
}

oe_status check_prefill(const void* q, const void* k, const void* v, const void* out, int64_t B, int64_t T,
                        int64_t Hq, int64_t Hkv, int64_t S, int64_t D, int64_t start, const int32_t* lengths,
                        int dtype) {
  oe_status st = check_common(q, k, v, out, dtype, D, B == 0 || T == 0);
  if (st != OE_OK) return st;
  if ((st = check_cache(B, Hq, Hkv, S)) != OE_OK) return st;
  OE_CHECK(T >= 0, OE_ERR_INVALID_ARG, "attention_prefill: T must be >= 0, got %lld", static_cast<long long>(T));
  OE_CHECK(start >= 0 && start + T <= S, OE_ERR_OUT_OF_RANGE,
           "attention_prefill: positions %lld..%lld exceed the cache capacity %lld", static_cast<long long>(start),
           static_cast<long long>(start + T - 1), static_cast<long long>(S));
  return check_lengths(lengths, B, S, false);
}

oe_status check_decode(const void* q, const void* k, const void* v, const void* out, int64_t B, int64_t Hq,
                       int64_t Hkv, int64_t S, int64_t D, const int32_t* lengths, int dtype) {
  oe_status st = check_common(q, k, v, out, dtype, D, B == 0);
  if (st != OE_OK) return st;
  if ((st = check_cache(B, Hq, Hkv, S)) != OE_OK) return st;
  return check_lengths(lengths, B, S, B > 0);
}

oe_status check_varlen(const void* q, const void* k, const void* v, const void* out, int64_t N, int64_t H,
                       int64_t D, const int32_t* cu, int64_t nseg, int dtype) {
  oe_status st = check_common(q, k, v, out, dtype, D, N == 0);
  if (st != OE_OK) return st;
  OE_CHECK(N >= 0 && N <= (int64_t{1} << 31) - 1, OE_ERR_INVALID_ARG, "attention_varlen: rows must be in [0, 2^31), got %lld",
           static_cast<long long>(N));
  OE_CHECK(H >= 1, OE_ERR_INVALID_ARG, "attention_varlen: heads must be >= 1, got %lld", static_cast<long long>(H));
  OE_CHECK(nseg >= 0, OE_ERR_INVALID_ARG, "attention_varlen: segment count must be >= 0");
  OE_CHECK(cu != nullptr, OE_ERR_INVALID_ARG, "attention_varlen: cu_seqlens pointer is null");
  OE_CHECK(cu[0] == 0, OE_ERR_OUT_OF_RANGE, "attention_varlen: cu_seqlens[0] must be 0, got %d", cu[0]);
  for (int64_t i = 0; i < nseg; ++i)
    OE_CHECK(cu[i + 1] >= cu[i], OE_ERR_OUT_OF_RANGE, "attention_varlen: cu_seqlens decreases at %lld (%d -> %d)",
             static_cast<long long>(i), cu[i], cu[i + 1]);
  OE_CHECK(cu[nseg] == N, OE_ERR_OUT_OF_RANGE, "attention_varlen: cu_seqlens must end at %lld (rows of q), got %d",
           static_cast<long long>(N), cu[nseg]);
  return OE_OK;
}

namespace {

using GroupFn = void (*)(const GroupTask&, float*);

GroupFn pick_kernel() {
#if defined(OE_ARCH_X86)
  switch (isa_active()) {
    case Isa::Avx512: return run_group_avx512;
    case Isa::Avx2: return run_group_avx2;
    default: break;
  }
#endif
  return run_group_scalar;
}

float* thread_scratch(int64_t n) {
  thread_local std::vector<float> buf;
  if (static_cast<int64_t>(buf.size()) < n) buf.resize(static_cast<size_t>(n));
  return buf.data();
}

void run_tasks(const std::vector<GroupTask>& tasks, int D) {
  const GroupFn fn = pick_kernel();
  const int64_t need = scratch_floats(D);
  // One task per chunk, claimed in order by whichever thread is free (tasks differ in length: causal rows).
  parallel_for(static_cast<int64_t>(tasks.size()),
               [&](int64_t i) { fn(tasks[static_cast<size_t>(i)], thread_scratch(need)); });
}

GroupTask base_task(oe_dtype dt, int D, float scale) {
  GroupTask t;
  std::memset(&t, 0, sizeof(t));
  t.dtype = dt;
  t.D = D;
  t.scale = scale;
  return t;
}

}  // namespace
}  // namespace attn
}  // namespace oe

using namespace oe;
using namespace oe::attn;

extern "C" oe_status oe_attention_prefill_cpu(const void* q, const void* k_cache, const void* v_cache, void* out,
                                              int64_t B, int64_t T, int64_t Hq, int64_t Hkv, int64_t S, int64_t D,
                                              int64_t start, const int32_t* lengths, float scale, int dtype) {
  oe_status st = check_prefill(q, k_cache, v_cache, out, B, T, Hq, Hkv, S, D, start, lengths, dtype);
  if (st != OE_OK) return st;
  const oe_dtype dt = static_cast<oe_dtype>(dtype);
  const int64_t es = static_cast<int64_t>(dtype_size(dt));
  const int64_t rep = Hq / Hkv;
  const int hc_size = static_cast<int>(rep < kMaxTaskRows ? rep : kMaxTaskRows);
  const int64_t n_hc = (rep + hc_size - 1) / hc_size;
  int rows = kMaxTaskRows / hc_size;
  if (rows > T) rows = static_cast<int>(T > 0 ? T : 1);
  std::vector<GroupTask> tasks;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t kvh = 0; kvh < Hkv; ++kvh)
      for (int64_t hc = 0; hc < n_hc; ++hc)
        for (int64_t r0 = 0; r0 < T; r0 += rows) {
          GroupTask t = base_task(dt, static_cast<int>(D), scale);
          const int64_t h0 = kvh * rep + hc * hc_size;
          t.n_heads = static_cast<int>(rep - hc * hc_size < hc_size ? rep - hc * hc_size : hc_size);
          t.n_rows = static_cast<int>(T - r0 < rows ? T - r0 : rows);
          t.q = static_cast<const char*>(q) + (((b * T + r0) * Hq + h0) * D) * es;
          t.q_row_stride = Hq * D;
          t.q_head_stride = D;
          t.out = static_cast<char*>(out) + (((b * T + r0) * Hq + h0) * D) * es;
          t.o_row_stride = Hq * D;
          t.o_head_stride = D;
          t.k = static_cast<const char*>(k_cache) + ((b * Hkv + kvh) * S * D) * es;
          t.v = static_cast<const char*>(v_cache) + ((b * Hkv + kvh) * S * D) * es;
          t.kv_row_stride = D;
          t.kbeg = 0;
          t.kstop = S;
          t.causal = 1;
          t.pos0 = start + r0;
          t.klimit = lengths ? lengths[b] : S;
          tasks.push_back(t);
        }
  run_tasks(tasks, static_cast<int>(D));
  return OE_OK;
}

extern "C" oe_status oe_attention_decode_cpu(const void* q, const void* k_cache, const void* v_cache, void* out,
                                             int64_t B, int64_t Hq, int64_t Hkv, int64_t S, int64_t D,
                                             const int32_t* lengths, float scale, int dtype, int64_t num_splits) {
  oe_status st = check_decode(q, k_cache, v_cache, out, B, Hq, Hkv, S, D, lengths, dtype);
  if (st != OE_OK) return st;
  OE_CHECK(num_splits >= 0, OE_ERR_INVALID_ARG, "attention_decode: num_splits must be >= 0, got %lld",
           static_cast<long long>(num_splits));
  const oe_dtype dt = static_cast<oe_dtype>(dtype);
  const int64_t es = static_cast<int64_t>(dtype_size(dt));
  const int64_t rep = Hq / Hkv;
  const int hc_size = static_cast<int>(rep < kMaxTaskRows ? rep : kMaxTaskRows);
  const int64_t n_hc = (rep + hc_size - 1) / hc_size;
  const int dp = padded_dim(static_cast<int>(D));

  int64_t max_len = 0;
  for (int64_t b = 0; b < B; ++b) max_len = lengths[b] > max_len ? lengths[b] : max_len;
  int64_t splits = num_splits;
  if (splits == 0) {
    // Enough work items for every thread (twice over, for balance), but no split shorter than 256 keys.
    const int64_t units = B * Hkv * n_hc;
    const int64_t want = 2 * static_cast<int64_t>(num_threads());
    splits = units >= want || units == 0 ? 1 : (want + units - 1) / units;
    const int64_t cap = (max_len + 255) / 256;
    if (splits > cap) splits = cap;
    if (splits < 1) splits = 1;
  }
  if (splits > 1024) splits = 1024;

  const int64_t part_stride = static_cast<int64_t>(kMaxTaskRows) * (2 + dp);
  // Partial states of the splits; a pointer is taken here because inside the parallel regions the name
  // would denote each worker thread's own (empty) thread_local vector.
  thread_local std::vector<float> partial_buf;
  float* partials = nullptr;
  if (splits > 1) {
    const size_t need = static_cast<size_t>(B * Hkv * n_hc * splits * part_stride);
    if (partial_buf.size() < need) partial_buf.resize(need);
    partials = partial_buf.data();
  }

  std::vector<GroupTask> tasks;
  tasks.reserve(static_cast<size_t>(B * Hkv * n_hc * splits));
  for (int64_t b = 0; b < B; ++b) {
    const int64_t len = lengths[b];
    int64_t chunk = (len + splits - 1) / splits;
    chunk = (chunk + kBlockKeys - 1) / kBlockKeys * kBlockKeys;
    for (int64_t kvh = 0; kvh < Hkv; ++kvh)
      for (int64_t hc = 0; hc < n_hc; ++hc)
        for (int64_t s = 0; s < splits; ++s) {
          GroupTask t = base_task(dt, static_cast<int>(D), scale);
          const int64_t h0 = kvh * rep + hc * hc_size;
          t.n_heads = static_cast<int>(rep - hc * hc_size < hc_size ? rep - hc * hc_size : hc_size);
          t.n_rows = 1;
          t.q = static_cast<const char*>(q) + ((b * Hq + h0) * D) * es;
          t.q_row_stride = Hq * D;
          t.q_head_stride = D;
          t.out = static_cast<char*>(out) + ((b * Hq + h0) * D) * es;
          t.o_row_stride = Hq * D;
          t.o_head_stride = D;
          t.k = static_cast<const char*>(k_cache) + ((b * Hkv + kvh) * S * D) * es;
          t.v = static_cast<const char*>(v_cache) + ((b * Hkv + kvh) * S * D) * es;
          t.kv_row_stride = D;
          t.causal = 0;
          t.klimit = len;
          t.kbeg = s * chunk;
          t.kstop = t.kbeg + chunk < len ? t.kbeg + chunk : len;
          if (splits > 1) t.part = partials + static_cast<int64_t>(tasks.size()) * part_stride;
          tasks.push_back(t);
        }
  }
  run_tasks(tasks, static_cast<int>(D));
  if (splits == 1) return OE_OK;

  // Combine the splits: out = sum_s e^(m_s - M) o_s / sum_s e^(m_s - M) l_s, M = max_s m_s.
  const int64_t total = B * Hq;
  // Small combines (under 64K partial floats) run here alone: handing them out costs more than they take.
  const int combine_threads = total * splits * D > 65536 ? 0 : 1;
  parallel_for(total, [&](int64_t bh) {
    const int64_t b = bh / Hq, h = bh % Hq;
    const int64_t kvh = h / rep, g = h % rep, hc = g / hc_size, mi = g % hc_size;
    const int64_t task0 = ((b * Hkv + kvh) * n_hc + hc) * splits;
    float acc[OE_ATTN_MAX_HEAD_DIM];
    for (int64_t d = 0; d < D; ++d) acc[d] = 0.0f;
    float mmax = -INFINITY;
    for (int64_t s = 0; s < splits; ++s) {
      const float* p = partials + (task0 + s) * part_stride + mi * (2 + dp);
      if (p[1] > 0.0f && p[0] > mmax) mmax = p[0];
    }
    float l = 0.0f;
    if (mmax != -INFINITY) {
      for (int64_t s = 0; s < splits; ++s) {
        const float* p = partials + (task0 + s) * part_stride + mi * (2 + dp);
        if (!(p[1] > 0.0f)) continue;
        const float w = std::exp(p[0] - mmax);
        l += w * p[1];
        for (int64_t d = 0; d < D; ++d) acc[d] += w * p[2 + d];
      }
    }
    store_f32_row(acc, l > 0.0f ? 1.0f / l : 0.0f, dt, static_cast<int>(D),
                  static_cast<char*>(out) + (bh * D) * es);
  }, combine_threads);
  return OE_OK;
}

extern "C" oe_status oe_attention_varlen_cpu(const void* q, const void* k, const void* v, void* out, int64_t N,
                                             int64_t H, int64_t D, const int32_t* cu_seqlens, int64_t num_segments,
                                             float scale, int dtype) {
  oe_status st = check_varlen(q, k, v, out, N, H, D, cu_seqlens, num_segments, dtype);
  if (st != OE_OK) return st;
  const oe_dtype dt = static_cast<oe_dtype>(dtype);
  const int64_t es = static_cast<int64_t>(dtype_size(dt));
  std::vector<GroupTask> tasks;
  for (int64_t i = 0; i < num_segments; ++i) {
    const int64_t a = cu_seqlens[i], len = cu_seqlens[i + 1] - cu_seqlens[i];
    for (int64_t h = 0; h < H; ++h)
      for (int64_t r0 = 0; r0 < len; r0 += kMaxTaskRows) {
        GroupTask t = base_task(dt, static_cast<int>(D), scale);
        t.n_heads = 1;
        t.n_rows = static_cast<int>(len - r0 < kMaxTaskRows ? len - r0 : kMaxTaskRows);
        t.q = static_cast<const char*>(q) + ((a + r0) * H + h) * D * es;
        t.q_row_stride = H * D;
        t.q_head_stride = D;
        t.out = static_cast<char*>(out) + ((a + r0) * H + h) * D * es;
        t.o_row_stride = H * D;
        t.o_head_stride = D;
        t.k = static_cast<const char*>(k) + (a * H + h) * D * es;
        t.v = static_cast<const char*>(v) + (a * H + h) * D * es;
        t.kv_row_stride = H * D;
        t.kbeg = 0;
        t.kstop = len;
        t.causal = 0;
        t.klimit = len;
        tasks.push_back(t);
      }
  }
  run_tasks(tasks, static_cast<int>(D));
  return OE_OK;
}
