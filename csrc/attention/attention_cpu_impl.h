// The CPU attention tile loop, written once over a vector policy `V` and compiled once per instruction set
// (attention_cpu.cpp: portable, attention_avx2.cpp, attention_avx512.cpp). Include it inside an anonymous
// namespace after defining the policy, so that each translation unit keeps its own copy: a copy compiled
// with AVX-512 flags must never be picked by the linker for a caller on an older CPU. For the same reason
// this file uses no std:: templates.
//
// The policy provides (reg = one vector of W floats):
//   W, MG, DG                   lanes; query rows x vectors held in registers by the P.V tile
//   kRegs                       vector registers (sizes the register-resident q in scores_row)
//   kBf16Dot                    whether breg / load_bf16 / dot_bf16 exist (bf16 pair dot products)
//   zero, set1, load, store, fmadd(a, b, c) = a * b + c, mul, sub
//   exp(x)                      e^x for x <= 0 (x = -inf gives 0), ~1 ulp
//   keep_first(x, n)            lanes >= n set to 0
//   reduce_w(acc, out)          out[i] = horizontal sum of acc[i], for i < W
//   load_row(src, dtype, n, dst)             n elements of dtype -> fp32
//   store_row(src, mul, dtype, n, dst)       fp32 * mul -> n elements of dtype (round to nearest even)
//
// Algorithm (per task, see attention_cpu.h for what a task is): q is converted to fp32 and pre-scaled;
// keys are visited in tiles of kBlockKeys converted to fp32 (zero-padded to Dp = D rounded up to 16);
// for every query row the tile's scores are the dot products of q with each key, computed W keys at a
// time with W accumulators and one transposing horizontal reduction; then the usual online softmax
// (running max m, running sum l, o = o * e^(m_old - m_new) + sum_j p_j v_j) in fp32.

// DPC: the padded head dim when known at compile time (64, 80, 128), else 0 and `dp` at run time. With a
// constant head dim that fits in registers, q stays in registers and each key row is read once by a single
// moving pointer; otherwise q is re-read per chunk.
template <class V, int DPC>
inline void scores_row(const float* qv, const float* kt, int nk, int dp_rt, float* s) {
  using reg = typename V::reg;
  constexpr int W = V::W;
  if constexpr (DPC != 0 && DPC / W + W + 2 <= V::kRegs) {
    constexpr int NQ = DPC / W;
    reg q[NQ];
#pragma GCC unroll 16
    for (int c = 0; c < NQ; ++c) q[c] = V::load(qv + c * W);
    for (int j = 0; j < nk; j += W) {
      reg acc[W];
      const float* kj = kt + static_cast<int64_t>(j) * DPC;
#pragma GCC unroll 16
      for (int i = 0; i < W; ++i) {
        reg a = V::mul(q[0], V::load(kj + i * DPC));
#pragma GCC unroll 16
        for (int c = 1; c < NQ; ++c) a = V::fmadd(q[c], V::load(kj + i * DPC + c * W), a);
        acc[i] = a;
      }
      V::reduce_w(acc, s + j);
    }
  } else {
    const int dp = DPC ? DPC : dp_rt;
    for (int j = 0; j < nk; j += W) {
      reg acc[W];
#pragma GCC unroll 16
      for (int i = 0; i < W; ++i) acc[i] = V::zero();
      const float* kj = kt + static_cast<int64_t>(j) * dp;
      for (int d = 0; d < dp; d += W) {
        const reg qd = V::load(qv + d);
#pragma GCC unroll 16
        for (int i = 0; i < W; ++i) acc[i] = V::fmadd(qd, V::load(kj + static_cast<int64_t>(i) * dp + d), acc[i]);
      }
      V::reduce_w(acc, s + j);
    }
  }
}

// bf16 inputs on CPUs with AVX512_BF16: scores straight from the cache's bf16 keys with the bf16 pair
// dot-product instruction (exact products, fp32 accumulation), q kept unscaled in bf16 (its input values);
// the caller scales the scores. Keys j < nk at k + j * stride; rows past nk are never read.
template <class V, int DPC>
inline void scores_row_bf16(const uint16_t* qv, const uint16_t* k, int64_t stride, int nk, float* s) {
  using reg = typename V::reg;
  using breg = typename V::breg;
  constexpr int W = V::W;
  constexpr int NQ = (DPC + 2 * W - 1) / (2 * W);  // chunks of 2W bf16; the last one may be partial
  constexpr int TAIL = DPC - (NQ - 1) * 2 * W;
  breg q[NQ];
#pragma GCC unroll 8
  for (int c = 0; c < NQ; ++c) q[c] = V::load_bf16(qv + c * 2 * W, c == NQ - 1 ? TAIL : 2 * W);
  for (int j = 0; j < nk; j += W) {
    reg acc[W];
    const int n = nk - j < W ? nk - j : W;
    const uint16_t* kj = k + static_cast<int64_t>(j) * stride;
#pragma GCC unroll 16
    for (int i = 0; i < W; ++i) {
      const uint16_t* row = kj + (i < n ? i : 0) * stride;  // a partial group repeats its first key
      reg a = V::zero();
#pragma GCC unroll 8
      for (int c = 0; c < NQ; ++c) a = V::dot_bf16(a, q[c], V::load_bf16(row + c * 2 * W, c == NQ - 1 ? TAIL : 2 * W));
      acc[i] = a;
    }
    V::reduce_w(acc, s + j);
  }
}

// o[m][d] = o[m][d] * alpha[m] + sum_{j < nv} p[m][j] * vt[j][d] for MG consecutive rows m, all d < dp.
template <class V, int DPC, int MG>
inline void pv_rows(float* o, const float* p, const float* alpha, const float* vt, int nv, int dp_rt) {
  const int dp = DPC ? DPC : dp_rt;
  using reg = typename V::reg;
  constexpr int W = V::W;
  constexpr int DG = V::DG;
  int d0 = 0;
  for (; d0 + DG * W <= dp; d0 += DG * W) {
    reg acc[MG][DG];
#pragma GCC unroll 8
    for (int m = 0; m < MG; ++m) {
      const reg a = V::set1(alpha[m]);
#pragma GCC unroll 8
      for (int c = 0; c < DG; ++c) acc[m][c] = V::mul(V::load(o + m * dp + d0 + c * W), a);
    }
    for (int j = 0; j < nv; ++j) {
      reg vv[DG];
#pragma GCC unroll 8
      for (int c = 0; c < DG; ++c) vv[c] = V::load(vt + static_cast<int64_t>(j) * dp + d0 + c * W);
#pragma GCC unroll 8
      for (int m = 0; m < MG; ++m) {
        const reg pb = V::set1(p[m * kBlockKeys + j]);
#pragma GCC unroll 8
        for (int c = 0; c < DG; ++c) acc[m][c] = V::fmadd(pb, vv[c], acc[m][c]);
      }
    }
#pragma GCC unroll 8
    for (int m = 0; m < MG; ++m)
#pragma GCC unroll 8
      for (int c = 0; c < DG; ++c) V::store(o + m * dp + d0 + c * W, acc[m][c]);
  }
  for (; d0 < dp; d0 += W) {
    reg acc[MG];
#pragma GCC unroll 8
    for (int m = 0; m < MG; ++m) acc[m] = V::mul(V::load(o + m * dp + d0), V::set1(alpha[m]));
    for (int j = 0; j < nv; ++j) {
      const reg vv = V::load(vt + static_cast<int64_t>(j) * dp + d0);
#pragma GCC unroll 8
      for (int m = 0; m < MG; ++m) acc[m] = V::fmadd(V::set1(p[m * kBlockKeys + j]), vv, acc[m]);
    }
#pragma GCC unroll 8
    for (int m = 0; m < MG; ++m) V::store(o + m * dp + d0, acc[m]);
  }
}

template <class V, int DPC>
inline void pv_tail(int rows, float* o, const float* p, const float* alpha, const float* vt, int nv, int dp) {
  // rows < V::MG (at most 7)
  switch (rows) {
    case 1: pv_rows<V, DPC, 1>(o, p, alpha, vt, nv, dp); break;
    case 2: pv_rows<V, DPC, 2>(o, p, alpha, vt, nv, dp); break;
    case 3: pv_rows<V, DPC, 3>(o, p, alpha, vt, nv, dp); break;
    default:
      for (int m = 0; m < rows; ++m)
        pv_rows<V, DPC, 1>(o + m * dp, p + m * kBlockKeys, alpha + m, vt, nv, dp);
  }
}

inline const char* elem_ptr(const void* base, int64_t index, oe_dtype dt) {
  return static_cast<const char*>(base) + index * static_cast<int64_t>(dt == OE_F32 ? 4 : 2);
}

template <class V, int DPC>
void run_group_dp(const GroupTask& t, float* scratch) {
  constexpr int W = V::W;
  constexpr int BK = kBlockKeys;
  const int D = t.D;
  const int dp = DPC ? DPC : padded_dim(D);
  const int M = t.n_rows * t.n_heads;

  // Scratch layout (fp32): q[M][dp] o[M][dp] s[M][BK] mrow[M] lrow[M] alpha[M] kt[BK][dp] vt[BK][dp],
  // then q as bf16 [M][dp] for the raw-bf16 path.
  float* qf = scratch;
  float* of = qf + kMaxTaskRows * dp;
  float* sb = of + kMaxTaskRows * dp;
  float* mrow = sb + kMaxTaskRows * BK;
  float* lrow = mrow + kMaxTaskRows;
  float* alpha = lrow + kMaxTaskRows;
  float* kt = alpha + kMaxTaskRows;
  float* vt = kt + BK * dp;

  // bf16 with a bf16 dot-product instruction and a compile-time head dim: keys are not converted.
  constexpr bool kCanRaw = V::kBf16Dot && DPC != 0;
  const bool raw = kCanRaw && t.dtype == OE_BF16 && DPC == D;
  uint16_t* qraw = reinterpret_cast<uint16_t*>(vt + BK * dp);  // q as bf16 (raw mode only)

  int64_t kend[kMaxTaskRows];
  int64_t kmax = t.kbeg;
  const float neg_inf = -__builtin_inff();
  for (int r = 0; r < t.n_rows; ++r) {
    int64_t e;
    if (t.causal) {
      const int64_t pos = t.pos0 + r;
      e = pos < t.klimit ? pos + 1 : 0;
    } else {
      e = t.klimit;
    }
    if (e > t.kstop) e = t.kstop;
    for (int g = 0; g < t.n_heads; ++g) {
      const int m = r * t.n_heads + g;
      kend[m] = e;
      float* qm = qf + m * dp;
      V::load_row(elem_ptr(t.q, r * t.q_row_stride + g * t.q_head_stride, t.dtype), t.dtype, D, qm);
      if (raw) {
        const uint16_t* src = static_cast<const uint16_t*>(t.q) + r * t.q_row_stride + g * t.q_head_stride;
        for (int d = 0; d < D; ++d) qraw[m * dp + d] = src[d];
      }
      for (int d = 0; d < D; ++d) qm[d] *= t.scale;
      for (int d = D; d < dp; ++d) qm[d] = 0.0f;
      for (int d = 0; d < dp; ++d) of[m * dp + d] = 0.0f;
      mrow[m] = neg_inf;
      lrow[m] = 0.0f;
    }
    if (e > kmax) kmax = e;
  }

  const int64_t row_bytes = static_cast<int64_t>(D) * (t.dtype == OE_F32 ? 4 : 2);
  for (int64_t j0 = t.kbeg; j0 < kmax; j0 += BK) {
    const int nb = static_cast<int>(kmax - j0 < BK ? kmax - j0 : BK);
    // Ask for the next tile's keys and values now, so that memory streams while this tile computes.
    for (int64_t j = j0 + BK; j < j0 + 2 * BK && j < kmax; ++j) {
      const char* kr = elem_ptr(t.k, j * t.kv_row_stride, t.dtype);
      const char* vr = elem_ptr(t.v, j * t.kv_row_stride, t.dtype);
      for (int64_t b = 0; b < row_bytes; b += 64) {
        __builtin_prefetch(kr + b);
        __builtin_prefetch(vr + b);
      }
    }
    const int nbw = (nb + W - 1) / W * W;
    for (int j = 0; j < nb; ++j) {
      float* kr = kt + j * dp;
      float* vr = vt + j * dp;
      if (!raw) V::load_row(elem_ptr(t.k, (j0 + j) * t.kv_row_stride, t.dtype), t.dtype, D, kr);
      V::load_row(elem_ptr(t.v, (j0 + j) * t.kv_row_stride, t.dtype), t.dtype, D, vr);
      for (int d = D; d < dp; ++d) kr[d] = vr[d] = 0.0f;
    }
    for (int j = nb; j < nbw; ++j)
      for (int d = 0; d < dp; ++d) kt[j * dp + d] = 0.0f;

    // Scores and the online-softmax update, row by row.
    for (int m = 0; m < M; ++m) {
      float* s = sb + m * BK;
      int64_t vm64 = kend[m] - j0;
      const int vm = vm64 <= 0 ? 0 : (vm64 >= nb ? nb : static_cast<int>(vm64));
      if (vm == 0) {
        alpha[m] = 1.0f;
        for (int j = 0; j < BK; ++j) s[j] = 0.0f;
        continue;
      }
      if constexpr (kCanRaw) {
        if (raw) {
          scores_row_bf16<V, DPC>(qraw + m * dp, static_cast<const uint16_t*>(t.k) + j0 * t.kv_row_stride,
                                  t.kv_row_stride, vm, s);
          const typename V::reg sc = V::set1(t.scale);
          for (int j = 0; j < vm; j += W) V::store(s + j, V::mul(V::load(s + j), sc));
        } else {
          scores_row<V, DPC>(qf + m * dp, kt, vm, dp, s);
        }
      } else {
        scores_row<V, DPC>(qf + m * dp, kt, vm, dp, s);
      }
      float mx = s[0];
      for (int j = 1; j < vm; ++j) mx = s[j] > mx ? s[j] : mx;
      const float m_old = mrow[m];
      const float m_new = mx > m_old ? mx : m_old;
      const float a = m_old == neg_inf ? 0.0f : __builtin_expf(m_old - m_new);
      const typename V::reg mv = V::set1(m_new);
      float sum = 0.0f;
      for (int j = 0; j < nbw; j += W) {
        typename V::reg p = V::exp(V::sub(V::load(s + j), mv));
        p = V::keep_first(p, vm - j);
        V::store(s + j, p);
      }
      for (int j = 0; j < vm; ++j) sum += s[j];
      for (int j = nbw; j < BK; ++j) s[j] = 0.0f;
      lrow[m] = lrow[m] * a + sum;
      mrow[m] = m_new;
      alpha[m] = a;
    }

    // o = o * alpha + P V, MG rows at a time.
    int m = 0;
    for (; m + V::MG <= M; m += V::MG) {
      int nv = 0;
      for (int i = 0; i < V::MG; ++i) {
        const int64_t e = kend[m + i] - j0;
        const int v = e <= 0 ? 0 : (e >= nb ? nb : static_cast<int>(e));
        nv = v > nv ? v : nv;
      }
      if (nv) pv_rows<V, DPC, V::MG>(of + m * dp, sb + m * BK, alpha + m, vt, nv, dp);
    }
    if (m < M) {
      int nv = 0;
      for (int i = m; i < M; ++i) {
        const int64_t e = kend[i] - j0;
        const int v = e <= 0 ? 0 : (e >= nb ? nb : static_cast<int>(e));
        nv = v > nv ? v : nv;
      }
      if (nv) pv_tail<V, DPC>(M - m, of + m * dp, sb + m * BK, alpha + m, vt, nv, dp);
    }
  }

  for (int r = 0; r < t.n_rows; ++r) {
    for (int g = 0; g < t.n_heads; ++g) {
      const int m = r * t.n_heads + g;
      if (t.part) {
        float* pm = t.part + static_cast<int64_t>(m) * (2 + dp);
        pm[0] = mrow[m];
        pm[1] = lrow[m];
        for (int d = 0; d < D; ++d) pm[2 + d] = of[m * dp + d];
      } else {
        const float inv = lrow[m] > 0.0f ? 1.0f / lrow[m] : 0.0f;
        char* dst = static_cast<char*>(t.out) +
                    (r * t.o_row_stride + g * t.o_head_stride) * static_cast<int64_t>(t.dtype == OE_F32 ? 4 : 2);
        V::store_row(of + m * dp, inv, t.dtype, D, dst);
      }
    }
  }
}

template <class V>
void run_group_impl(const GroupTask& t, float* scratch) {
  switch (padded_dim(t.D)) {
    case 64: run_group_dp<V, 64>(t, scratch); break;
    case 80: run_group_dp<V, 80>(t, scratch); break;
    case 128: run_group_dp<V, 128>(t, scratch); break;
    default: run_group_dp<V, 0>(t, scratch); break;
  }
}
