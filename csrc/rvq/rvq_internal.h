// Internal to csrc/rvq: argument checks and the per-instruction-set inner loops of the CPU path.
#pragma once
#include <cstdint>

#include "common/oe.h"
#include "rvq/rvq.h"

namespace oe {
namespace rvq {

// Validates the codebook table (layers, dims, dtype, pointers, sizes).
oe_status check_books(const oe_rvq_books* books, bool need_data);
// Checks every code against its layer's size (host memory); reads nothing else.
oe_status check_codes(const void* codes, int codes_int64, int64_t T, const oe_rvq_books* books);

// Inner loops, one set per instruction-set level (the scalar set is portable C++).
struct Kernels {
  int lanes;  // fp32 lanes of the dot products' accumulators (for the screening error bound)
  // dots[t * ldd + i] = sum_d r[t * D + d] * row_i[d] for t < nt (<= 8), i < nrows; rows of `dt`.
  void (*dots)(const float* r, int nt, const void* rows, oe_dtype dt, int64_t nrows, int64_t D, float* dots,
               int64_t ldd);
  // sum_d (double(r[d]) - double(row[d]))^2
  double (*exact_dist)(const float* r, const void* row, oe_dtype dt, int64_t D);
  // acc[d] += row[d] for d < n
  void (*add_row)(float* acc, const void* row, oe_dtype dt, int64_t n);
  // Screening GEMM tile on packed operands: for t < mt (1..kMR), j < nr:
  //   s[t * lds + j] = (accumulate ? s[t * lds + j] : 0) + sum_{k < kc} r[t * ldr + k] * pc[k * nr + j]
  // with the k terms added one after the other in one fp32 FMA chain per (t, j) (so a dot product split into
  // consecutive kc slices is still one sequential chain of D terms: the screening bound uses lanes = 1).
  void (*gemm_tile)(const float* r, int64_t ldr, int mt, const float* pc, int kc, float* s, int64_t lds,
                    int accumulate);
  int nr;  // columns of a packed panel (two vector registers)
};

constexpr int kMR = 6;  // frames per GEMM tile (rows of the register tile)

const Kernels& kernels_scalar();
#if defined(OE_ARCH_X86)
const Kernels& kernels_avx2();
const Kernels& kernels_avx512();
#endif

}  // namespace rvq
}  // namespace oe
