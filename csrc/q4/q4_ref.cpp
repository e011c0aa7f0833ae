// Scalar reference for q4: one output at a time, straight from the layout's definition, double accumulation.
// It shares nothing with the fast kernels except the INT8 activation-quantization contract
// (quantize_blocks_scalar), which defines what the INT8 mode computes.
#include <cmath>
#include <vector>

#include "common/half.h"
#include "q4/q4.h"

namespace oe {
namespace q4 {
namespace {

// Code of layout row r, column n (FORMAT.md: word [n/16][r/8][n%16], byte (r%8)%4, high nibble if r%8 >= 4).
inline int code_at(const oe_q4_weight& w, int64_t r, int64_t n) {
  const int64_t t = n / kTileN, l = n % kTileN, o = r / kOctet, i = r % kOctet;
  const uint32_t word = w.codes[(t * (w.Kp / kOctet) + o) * kTileN + l];
  return static_cast<int>((word >> (8 * (i % 4) + 4 * (i / 4))) & 0xFu);
}

inline double weight_at(const oe_q4_weight& w, int64_t r, int64_t n) {
  const int64_t g = w.block_group[r / kBlockK], t = n / kTileN, l = n % kTileN;
  const double s = f16_to_f32(w.scales[(t * w.G + g) * kTileN + l]);
  const int z = w.zeros[(t * w.G + g) * kTileN + l];
  return s * static_cast<double>(code_at(w, r, n) - z);
}

inline float load_x(const void* x, int dt, int64_t i) {
  if (dt == OE_F16) return f16_to_f32(static_cast<const uint16_t*>(x)[i]);
  if (dt == OE_BF16) return bf16_to_f32(static_cast<const uint16_t*>(x)[i]);
  return static_cast<const float*>(x)[i];
}

}  // namespace
}  // namespace q4
}  // namespace oe

using namespace oe;
using namespace oe::q4;

extern "C" oe_status oe_q4_matmul_ref_cpu(const oe_q4_weight* w, const void* x, int dt, int64_t M, void* y,
                                          int mode) {
  oe_status st = validate(w, x, dt, M, y, true);
  if (st != OE_OK) return st;
  OE_CHECK(mode == OE_Q4_EXACT || mode == OE_Q4_INT8, OE_ERR_INVALID_ARG, "q4: mode must be 0 (exact) or 1 (int8), got %d",
           mode);
  const int64_t Kp = w->Kp, nb = Kp / kBlockK;
  std::vector<float> xr(Kp), xd(nb), xds(nb);
  std::vector<int8_t> xq(Kp);
  std::vector<double> xv(Kp);
  for (int64_t m = 0; m < M; ++m) {
    // the activation of each layout row (0 for padding rows)
    for (int64_t r = 0; r < Kp; ++r) {
      const int64_t src = w->perm ? w->perm[r] : (r < w->K ? r : -1);
      OE_CHECK(src >= -1 && src < w->K, OE_ERR_OUT_OF_RANGE, "q4: perm[%lld] = %lld outside [-1, K=%lld)",
               (long long)r, (long long)src, (long long)w->K);
      xr[r] = src >= 0 ? load_x(x, dt, m * w->K + src) : 0.0f;
    }
    if (mode == OE_Q4_INT8) {
      quantize_blocks_scalar(xr.data(), nb, xq.data(), xd.data(), xds.data());
      for (int64_t r = 0; r < Kp; ++r) xv[r] = static_cast<double>(xd[r / kBlockK]) * xq[r];
    } else {
      for (int64_t r = 0; r < Kp; ++r) xv[r] = xr[r];
    }
    for (int64_t n = 0; n < w->N; ++n) {
      double acc = 0.0;
      for (int64_t r = 0; r < Kp; ++r) acc += xv[r] * weight_at(*w, r, n);
      float v = static_cast<float>(acc);
      if (w->bias) v += w->bias[n];
      const int64_t i = m * w->N + n;
      if (dt == OE_F16) static_cast<uint16_t*>(y)[i] = f32_to_f16(v);
      else if (dt == OE_BF16) static_cast<uint16_t*>(y)[i] = f32_to_bf16(v);
      else static_cast<float*>(y)[i] = v;
    }
  }
  return OE_OK;
}
