// Low-precision-weight GEMV (gemv_lowp.h): the scalar reference rows kernel (the Isa::Scalar level and the test
// oracle beside torch) and the driver that splits rows over the q4 thread pool.
#include "decode/gemv_lowp.h"

#include <new>
#include <vector>

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

Q8I8RowsFn pick_q8i8() {
  Q8I8RowsFn f = isa_active() >= Isa::Avx2 ? q8i8_rows_avx2() : nullptr;
  return f ? f : q8i8_rows_scalar;
}

LowpRowsFn pick(WKind kind) {
  const Isa isa = isa_active();
  LowpRowsFn f = nullptr;
  if (isa == Isa::Avx512) f = lowp_rows_avx512(kind);
  if (!f && isa >= Isa::Avx2) f = lowp_rows_avx2(kind);
  return f ? f : lowp_rows_scalar(kind);
}

// The quantized activations of the calling thread (grown once to the largest K seen; a step allocates nothing).
struct ActBuffer {
  std::vector<int8_t> xq;
  std::vector<float> xd, xds;
};
thread_local ActBuffer t_act;

// Chunks of about eight per thread (a vocabulary-sized GEMV is long enough for the pool's dynamic hand-out to
// even out a core that another process slows), at least 64 rows each.
void run(LowpRowsFn fn, const void* W, const uint16_t* scales, int64_t G, int64_t B, const float* x,
         const float* bias, float* y, int64_t N, int64_t K) {
  parallel_rows(N, 8, 64, bias, y, [&](int64_t n0, int64_t n1) { fn(W, scales, G, B, x, K, n0, n1, y); });
}

}  // namespace

void q8i8_rows_scalar(const int8_t* W, const uint16_t* scales, int64_t G, int64_t B, const int8_t* xq,
                      const float* xd, int64_t K, int64_t n0, int64_t n1, float* y) {
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* w = W + n * K;
    float acc = 0.0f;
    for (int64_t g = 0, k0 = 0; k0 < K; k0 += B, ++g) {
      float blk = 0.0f;
      for (int64_t j = k0; j < k0 + B; j += 32) {
        int32_t isum = 0;
        for (int64_t k = j; k < j + 32; ++k) isum += int32_t(w[k]) * int32_t(xq[k]);
        blk += static_cast<float>(isum) * xd[j / 32];
      }
      acc += blk * f16_to_f32(scales[n * G + g]);
    }
    y[n] = acc;
  }
}

LowpRowsFn lowp_rows_scalar(WKind kind) {
  switch (kind) {
    case WKind::F16: return rows_scalar<F16>;
    case WKind::BF16: return rows_scalar<BF16>;
    default: return rows_scalar<Q8>;
  }
}

#if !defined(OE_ARCH_X86)
Q8I8RowsFn q8i8_rows_avx2() { return nullptr; }
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
  run(pick(wdtype == OE_F16 ? WKind::F16 : WKind::BF16), W, nullptr, 1, K > 0 ? K : 1, x, bias, y, N, K);
  return OE_OK;
}

extern "C" oe_status oe_gemv_q8_cpu(const int8_t* q, const uint16_t* scales, int64_t block, const float* x,
                                    const float* bias, int64_t N, int64_t K, float* y, int act_mode) {
  OE_CHECK(act_mode == OE_Q4_EXACT || act_mode == OE_Q4_INT8, OE_ERR_INVALID_ARG,
           "gemv q8: activation mode must be 0 (exact) or 1 (int8), got %d", act_mode);
  OE_CHECK(N >= 0 && K >= 0, OE_ERR_INVALID_ARG, "gemv q8: N and K must be >= 0, got N=%lld K=%lld", (long long)N,
           (long long)K);
  OE_CHECK(block >= 1, OE_ERR_INVALID_ARG, "gemv q8: block must be >= 1, got %lld", (long long)block);
  if (N == 0) return OE_OK;
  OE_CHECK(y && (K == 0 || (q && scales && x)), OE_ERR_INVALID_ARG, "gemv q8: q, scales, x and y must not be NULL");
  const int64_t G = K > 0 ? (K + block - 1) / block : 1;
  if (act_mode == OE_Q4_INT8 && K > 0 && K % q4::kBlockK == 0 && block % q4::kBlockK == 0) {
    ActBuffer& a = t_act;
    const int64_t nb = K / q4::kBlockK;
    try {
      if (static_cast<int64_t>(a.xq.size()) < K) a.xq.resize(static_cast<size_t>(K));
      if (static_cast<int64_t>(a.xd.size()) < nb) {
        a.xd.resize(static_cast<size_t>(nb));
        a.xds.resize(static_cast<size_t>(nb));
      }
    } catch (const std::bad_alloc&) {
      return fail(OE_ERR_NO_MEMORY, "gemv q8: out of memory for %lld quantized activations", (long long)K);
    }
    q4::quantize_blocks_scalar(x, nb, a.xq.data(), a.xd.data(), a.xds.data());
    const Q8I8RowsFn fn = pick_q8i8();
    parallel_rows(N, 8, 64, bias, y, [&](int64_t n0, int64_t n1) {
      fn(q, scales, G, block, a.xq.data(), a.xd.data(), K, n0, n1, y);
    });
    return OE_OK;
  }
  run(pick(WKind::Q8), q, scales, G, block, x, bias, y, N, K);
  return OE_OK;
}
