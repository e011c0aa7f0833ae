// The RVQ inner loops written once over a vector policy `V` (see attention_cpu_impl.h for the reasons this
// is included inside an anonymous namespace, once per instruction-set translation unit, and uses no std::
// templates). The policy provides: W (fp32 lanes), reg, zero, load (W floats), load_row (W elements of a
// dtype, converted), load_row_part (first n < W elements, others 0), store, fmadd, add, hsum (horizontal
// sum), and exact_dist / add_row implementations.

// dots[t * ldd + i] = r_t . row_i, NT frames at once so every codebook element is loaded once per NT frames.
template <class V, int NT>
void dots_nt(const float* r, const char* rows, oe_dtype dt, int64_t nrows, int64_t D, float* dots, int64_t ldd) {
  using reg = typename V::reg;
  constexpr int W = V::W;
  const int64_t es = dt == OE_F32 ? 4 : 2;
  for (int64_t i = 0; i < nrows; ++i) {
    const char* row = rows + i * D * es;
    reg acc[NT];
#pragma GCC unroll 8
    for (int t = 0; t < NT; ++t) acc[t] = V::zero();
    int64_t d = 0;
    for (; d + W <= D; d += W) {
      const reg c = V::load_row(row + d * es, dt);
#pragma GCC unroll 8
      for (int t = 0; t < NT; ++t) acc[t] = V::fmadd(V::load(r + t * D + d), c, acc[t]);
    }
    if (d < D) {
      const int n = static_cast<int>(D - d);
      const reg c = V::load_row_part(row + d * es, dt, n);
#pragma GCC unroll 8
      for (int t = 0; t < NT; ++t) acc[t] = V::fmadd(V::load_part(r + t * D + d, n), c, acc[t]);
    }
#pragma GCC unroll 8
    for (int t = 0; t < NT; ++t) dots[t * ldd + i] = V::hsum(acc[t]);
  }
}

template <class V>
void dots_impl(const float* r, int nt, const void* rows, oe_dtype dt, int64_t nrows, int64_t D, float* dots,
               int64_t ldd) {
  const char* rb = static_cast<const char*>(rows);
  int t = 0;
  for (; t + 8 <= nt; t += 8) dots_nt<V, 8>(r + t * D, rb, dt, nrows, D, dots + t * ldd, ldd);
  if (nt - t >= 4) {
    dots_nt<V, 4>(r + t * D, rb, dt, nrows, D, dots + t * ldd, ldd);
    t += 4;
  }
  if (nt - t >= 2) {
    dots_nt<V, 2>(r + t * D, rb, dt, nrows, D, dots + t * ldd, ldd);
    t += 2;
  }
  if (nt - t >= 1) dots_nt<V, 1>(r + t * D, rb, dt, nrows, D, dots + t * ldd, ldd);
}

// Screening GEMM register tile: MR frames x NR = 2 W codebook rows, accumulators in registers, B from a packed
// panel (kc x NR, row-interleaved), A broadcast from the residuals. One sequential FMA chain per output.
template <class V, int MR>
void gemm_tile_mr(const float* r, int64_t ldr, const float* pc, int kc, float* s, int64_t lds, int accumulate) {
  using reg = typename V::reg;
  constexpr int W = V::W, NR = 2 * V::W;
  reg acc0[MR], acc1[MR];
#pragma GCC unroll 8
  for (int t = 0; t < MR; ++t) {
    acc0[t] = accumulate ? V::load(s + t * lds) : V::zero();
    acc1[t] = accumulate ? V::load(s + t * lds + W) : V::zero();
  }
  for (int k = 0; k < kc; ++k) {
    const reg b0 = V::load(pc + k * NR), b1 = V::load(pc + k * NR + W);
#pragma GCC unroll 8
    for (int t = 0; t < MR; ++t) {
      const reg a = V::broadcast(r + t * ldr + k);
      acc0[t] = V::fmadd(a, b0, acc0[t]);
      acc1[t] = V::fmadd(a, b1, acc1[t]);
    }
  }
#pragma GCC unroll 8
  for (int t = 0; t < MR; ++t) {
    V::store(s + t * lds, acc0[t]);
    V::store(s + t * lds + W, acc1[t]);
  }
}

template <class V>
void gemm_tile_impl(const float* r, int64_t ldr, int mt, const float* pc, int kc, float* s, int64_t lds,
                    int accumulate) {
  switch (mt) {
    case 1: gemm_tile_mr<V, 1>(r, ldr, pc, kc, s, lds, accumulate); break;
    case 2: gemm_tile_mr<V, 2>(r, ldr, pc, kc, s, lds, accumulate); break;
    case 3: gemm_tile_mr<V, 3>(r, ldr, pc, kc, s, lds, accumulate); break;
    case 4: gemm_tile_mr<V, 4>(r, ldr, pc, kc, s, lds, accumulate); break;
    case 5: gemm_tile_mr<V, 5>(r, ldr, pc, kc, s, lds, accumulate); break;
    default: gemm_tile_mr<V, 6>(r, ldr, pc, kc, s, lds, accumulate); break;
  }
}
