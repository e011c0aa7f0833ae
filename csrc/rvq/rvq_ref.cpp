// Scalar RVQ references: decode sums the rows in layer order; encode evaluates the exact (fp64) distance of
// every row at every layer and keeps the first minimum. Slow and plain on purpose: the fast paths are
// tested against them.
#include <cmath>
#include <vector>

#include "common/half.h"
#include "rvq/rvq.h"
#include "rvq/rvq_internal.h"

namespace {

float ref_elem(const oe_rvq_books* b, int l, int64_t i, int64_t d) {
  const int64_t idx = i * b->dim + d;
  switch (b->dtype) {
    case OE_F32: return static_cast<const float*>(b->data[l])[idx];
    case OE_BF16: return oe::bf16_to_f32(static_cast<const uint16_t*>(b->data[l])[idx]);
    default: return oe::f16_to_f32(static_cast<const uint16_t*>(b->data[l])[idx]);
  }
}

}  // namespace

extern "C" oe_status oe_rvq_decode_ref(const void* codes, int codes_int64, int64_t T, const oe_rvq_books* books,
                                       float* out) {
  oe_status st = oe::rvq::check_books(books, true);
  if (st != OE_OK) return st;
  if ((st = oe::rvq::check_codes(codes, codes_int64, T, books)) != OE_OK) return st;
  const int L = books->num_layers;
  const int64_t D = books->dim;
  for (int64_t t = 0; t < T; ++t)
    for (int64_t d = 0; d < D; ++d) {
      float acc = 0.0f;
      for (int l = 0; l < L; ++l) {
        const int64_t c = codes_int64 ? static_cast<const int64_t*>(codes)[t * L + l]
                                      : static_cast<const int32_t*>(codes)[t * L + l];
        acc += ref_elem(books, l, c, d);
      }
      out[t * D + d] = acc;
    }
  return OE_OK;
}

extern "C" oe_status oe_rvq_encode_ref(const float* x, int64_t T, const oe_rvq_books* books, int64_t* codes) {
  oe_status st = oe::rvq::check_books(books, true);
  if (st != OE_OK) return st;
  OE_CHECK(T >= 0, OE_ERR_INVALID_ARG, "rvq_encode: frame count must be >= 0, got %lld", static_cast<long long>(T));
  const int L = books->num_layers;
  const int64_t D = books->dim;
  std::vector<float> r(static_cast<size_t>(D));
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t d = 0; d < D; ++d) {
      OE_CHECK(std::isfinite(x[t * D + d]), OE_ERR_INVALID_ARG, "rvq_encode: x[%lld, %lld] is not finite",
               static_cast<long long>(t), static_cast<long long>(d));
      r[static_cast<size_t>(d)] = x[t * D + d];
    }
    for (int l = 0; l < L; ++l) {
      int64_t best = 0;
      double best_d = INFINITY;
      for (int64_t i = 0; i < books->sizes[l]; ++i) {
        double s = 0.0;
        for (int64_t d = 0; d < D; ++d) {
          const double diff = static_cast<double>(r[static_cast<size_t>(d)]) - static_cast<double>(ref_elem(books, l, i, d));
          s += diff * diff;
        }
        if (s < best_d) {
          best_d = s;
          best = i;
        }
      }
      codes[t * L + l] = best;
      for (int64_t d = 0; d < D; ++d) r[static_cast<size_t>(d)] = r[static_cast<size_t>(d)] - ref_elem(books, l, best, d);
    }
  }
  return OE_OK;
}
