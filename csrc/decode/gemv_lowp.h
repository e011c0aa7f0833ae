// Dense GEMV with low-precision weights and fp32 activations: y (N) = W (N, K) x (K) [+ bias], where W is stored
// as fp16, bf16 (the dtypes checkpoints and bundles hold the embedding / lm_head in) or int8 with fp16 scales
// per block of B consecutive inputs of a row (the `--lm-head q8` format, quantize/FORMAT.md §4):
//
//   fp16 / bf16:  W[n, k] = float(w[n, k])
//   q8:           W[n, k] = float(scales[n, k / B]) * q[n, k]      q int8 in [-127, 127], G = ceil(K / B) scales a row
//
// One generic rows kernel per ISA (scalar reference here in gemv_lowp.cpp, AVX2 + F16C, AVX-512): four rows share
// each vector of x, a block's products are summed in fp32 and scaled once per block; the K tail is scalar.
// B = K is one scale per row. The driver splits rows over the q4 thread pool (q4::parallel_chunks).
#pragma once
#include <cstdint>

#include "common/oe.h"
#include "common/pool.h"

extern "C" {

// W (N, K) row-major in dtype `wdtype` (OE_F32, OE_F16 or OE_BF16), x (K) fp32, bias (N) fp32 or NULL.
oe_status oe_gemv_cpu(const void* W, int wdtype, const float* x, const float* bias, int64_t N, int64_t K, float* y);

// q (N, K) int8 row-major, scales (N, G) fp16 bits with G = ceil(K / block), 1 <= block; x (K) fp32.
// act_mode OE_Q4_EXACT (0): fp32 activations, y = sum_b s[n, b] * (sum_{k in b} q[n, k] * x[k]) in fp32.
// OE_Q4_INT8 (1), used when K and block are multiples of 32 (else the fp32 path runs): x is first quantized per
// 32-input block exactly as the q4 INT8 mode does (q4::quantize_blocks_scalar: d_j = max |x| / 127, xi =
// round-half-even(x / d_j)), and y = sum_b s[n, b] * sum_{j in b} d_j * isum_j with isum_j = sum q * xi exact in
// int32 (ggml's Q8_0 x Q8_0): the product of the quantized activations with the weight up to fp32 rounding.
oe_status oe_gemv_q8_cpu(const int8_t* q, const uint16_t* scales, int64_t block, const float* x, const float* bias,
                         int64_t N, int64_t K, float* y, int act_mode);

}  // extern "C"

namespace oe {
namespace decode {

// The rows of a GEMV y = W x (+ bias) split over the shared pool: chunks of whole 4-row groups, about
// `per_thread` chunks per thread and at least `min_rows` rows each; rows_fn(n0, n1) writes y[n0, n1), then the
// bias is added to those rows.
template <class F>
void parallel_rows(int64_t N, int64_t per_thread, int64_t min_rows, const float* bias, float* y, const F& rows_fn) {
  const int64_t parts = per_thread * num_threads();
  int64_t rows = (N + parts - 1) / parts;
  rows = (rows + 3) / 4 * 4;
  if (rows < min_rows) rows = min_rows;
  parallel_for((N + rows - 1) / rows, [&](int64_t c) {
    const int64_t n0 = c * rows, n1 = n0 + rows < N ? n0 + rows : N;
    rows_fn(n0, n1);
    if (bias)
      for (int64_t n = n0; n < n1; ++n) y[n] += bias[n];
  });
}

// Weight element kinds of the generic rows kernels.
enum class WKind : int { F16 = 0, BF16 = 1, Q8 = 2 };

// Rows [n0, n1) of y = W x (no bias). `scales`/`G`/`B` only for Q8 (else nullptr, 1, K).
using LowpRowsFn = void (*)(const void* W, const uint16_t* scales, int64_t G, int64_t B, const float* x, int64_t K,
                            int64_t n0, int64_t n1, float* y);
LowpRowsFn lowp_rows_scalar(WKind kind);
LowpRowsFn lowp_rows_avx2(WKind kind);    // nullptr where not compiled
LowpRowsFn lowp_rows_avx512(WKind kind);  // nullptr where not compiled

// Rows [n0, n1) of the q8 x int8-activation product (act_mode OE_Q4_INT8): xq (K) int8, xd (K / 32) block scales;
// K and B multiples of 32.
using Q8I8RowsFn = void (*)(const int8_t* W, const uint16_t* scales, int64_t G, int64_t B, const int8_t* xq,
                            const float* xd, int64_t K, int64_t n0, int64_t n1, float* y);
void q8i8_rows_scalar(const int8_t* W, const uint16_t* scales, int64_t G, int64_t B, const int8_t* xq,
                      const float* xd, int64_t K, int64_t n0, int64_t n1, float* y);
Q8I8RowsFn q8i8_rows_avx2();  // nullptr where not compiled (AVX-512 machines run the AVX2 kernel)

}  // namespace decode
}  // namespace oe
