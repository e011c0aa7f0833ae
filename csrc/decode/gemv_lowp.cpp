// Low-precision-weight GEMV (gemv_lowp.h): the scalar reference rows kernel (the Isa::Scalar level and the test
// oracle beside torch) and the driver that splits rows over the q4 thread pool.
#include "decode/gemv_lowp.h"

#include "common/cpu_features.h"
#include "common/half.h"
#include "decode/decode.h"
#include "q4/q4.h"

namespace oe {
namespace decode {
namespace {

struct F16 {
  using T = uint16_t;
  static float get(const T* p) { return f16_to_f32(*p); }
};
struct BF16 {
  using T = uint16_t;
  static float get(const T* p) { return bf16_to_f32(*p); }
};
struct Q8 {
  using T = int8_t;
  static float get(const T* p) { return static_cast<float>(*p); }
};

// Same block structure as the vector kernels: per block an fp32 sum of w * x, scaled once (Q8) and added.
template <class L>
void rows_scalar(const void* Wv, const uint16_t* scales, int64_t G, int64_t B, const float* x, int64_t K, int64_t n0,
                 int64_t n1, float* y) {
  const typename L::T* W = static_cast<const typename L::T*>(Wv);
  for (int64_t n = n0; n < n1; ++n) {
    const typename L::T* w = W + n * K;
    float acc = 0.0f;
    int64_t g = 0;
    for (int64_t k0 = 0; k0 < K; k0 += B, ++g) {
      const int64_t k1 = k0 + B < K ? k0 + B : K;
      float part[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      int64_t k = k0;
      for (; k + 4 <= k1; k += 4)
        for (int j = 0; j < 4; ++j) part[j] += L::get(w + k + j) * x[k + j];
      float s = (part[0] + part[1]) + (part[2] + part[3]);
      for (; k < k1; ++k) s += L::get(w + k) * x[k];
      acc += scales ? s * f16_to_f32(scales[n * G + g]) : s;
    }
    y[n] = acc;
  }
}

LowpRowsFn pick(WKind kind) {
  const Isa isa = isa_active();
  LowpRowsFn f = nullptr;
  if (isa == Isa::Avx512) f = lowp_rows_avx512(kind);
  if (!f && isa >= Isa::Avx2) f = lowp_rows_avx2(kind);
  return f ? f : lowp_rows_scalar(kind);
}

struct Call {
  LowpRowsFn fn;
  const void* W;
  const uint16_t* scales;
  int64_t G, B;
  const float* x;
  const float* bias;
  float* y;
  int64_t N, K, rows;
};

void chunk(void* ctx, int64_t c) {
  const Call& g = *static_cast<const Call*>(ctx);
  const int64_t n0 = c * g.rows;
  const int64_t n1 = n0 + g.rows < g.N ? n0 + g.rows : g.N;
  g.fn(g.W, g.scales, g.G, g.B, g.x, g.K, n0, n1, g.y);
  if (g.bias)
    for (int64_t n = n0; n < n1; ++n) g.y[n] += g.bias[n];
}

// Chunks of whole 4-row groups, about eight per thread (a vocabulary-sized GEMV is long enough for the pool's
// dynamic hand-out to even out a core that another process slows), at least 64 rows each.
void run(Call& c) {
  const int64_t threads = num_threads();
  int64_t rows = (c.N + 8 * threads - 1) / (8 * threads);
  rows = (rows + 3) / 4 * 4;
  if (rows < 64) rows = 64;
  c.rows = rows;
  q4::parallel_chunks((c.N + rows - 1) / rows, chunk, &c);
}

}  // namespace

LowpRowsFn lowp_rows_scalar(WKind kind) {
  switch (kind) {
    case WKind::F16: return rows_scalar<F16>;
    case WKind::BF16: return rows_scalar<BF16>;
    default: return rows_scalar<Q8>;
  }
}

#if !defined(OE_ARCH_X86)
LowpRowsFn lowp_rows_avx2(WKind) { return nullptr; }
LowpRowsFn lowp_rows_avx512(WKind) { return nullptr; }
#endif

}  // namespace decode
}  // namespace oe

using namespace oe;
using namespace oe::decode;

extern "C" oe_status oe_gemv_cpu(const void* W, int wdtype, const float* x, const float* bias, int64_t N, int64_t K,
                                 float* y) {
  OE_CHECK(dtype_valid(wdtype), OE_ERR_INVALID_ARG, "gemv: weight dtype must be 0 (f32), 1 (f16) or 2 (bf16), got %d",
           wdtype);
  if (wdtype == OE_F32) return oe_gemv_f32_cpu(static_cast<const float*>(W), x, bias, N, K, y);
  OE_CHECK(N >= 0 && K >= 0, OE_ERR_INVALID_ARG, "gemv: N and K must be >= 0, got N=%lld K=%lld", (long long)N,
           (long long)K);
  if (N == 0) return OE_OK;
  OE_CHECK(y && (K == 0 || (W && x)), OE_ERR_INVALID_ARG, "gemv: W, x and y must not be NULL");
  Call c{pick(wdtype == OE_F16 ? WKind::F16 : WKind::BF16), W, nullptr, 1, K > 0 ? K : 1, x, bias, y, N, K, 0};
  run(c);
  return OE_OK;
}

extern "C" oe_status oe_gemv_q8_cpu(const int8_t* q, const uint16_t* scales, int64_t block, const float* x,
                                    const float* bias, int64_t N, int64_t K, float* y) {
  OE_CHECK(N >= 0 && K >= 0, OE_ERR_INVALID_ARG, "gemv q8: N and K must be >= 0, got N=%lld K=%lld", (long long)N,
           (long long)K);
  OE_CHECK(block >= 1, OE_ERR_INVALID_ARG, "gemv q8: block must be >= 1, got %lld", (long long)block);
  if (N == 0) return OE_OK;
  OE_CHECK(y && (K == 0 || (q && scales && x)), OE_ERR_INVALID_ARG, "gemv q8: q, scales, x and y must not be NULL");
  const int64_t G = K > 0 ? (K + block - 1) / block : 1;
  Call c{pick(WKind::Q8), q, scales, G, block, x, bias, y, N, K, 0};
  run(c);
  return OE_OK;
}
