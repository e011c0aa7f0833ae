// CPU RVQ: argument checks, the portable inner loops, ISA dispatch and the decode / encode drivers
// (the CPU pool over frames x dims for decode; encode: a packed, register-tiled screening GEMM over blocks of
// codebook rows, then an exact per-frame decision, each loop on the pool).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "common/cpu_features.h"
#include "common/half.h"
#include "rvq/rvq.h"
#include "rvq/rvq_internal.h"

namespace oe {
namespace rvq {

oe_status check_books(const oe_rvq_books* b, bool need_data) {
  OE_CHECK(b != nullptr, OE_ERR_INVALID_ARG, "rvq: null codebook table");
  OE_CHECK(b->num_layers >= 1 && b->num_layers <= OE_RVQ_MAX_LAYERS, OE_ERR_INVALID_ARG,
           "rvq: number of layers must be in [1, %d], got %d", OE_RVQ_MAX_LAYERS, b->num_layers);
  OE_CHECK(dtype_valid(b->dtype), OE_ERR_INVALID_ARG, "rvq: codebook dtype code %d is not one of 0 (f32), 1 (f16), 2 (bf16)",
           b->dtype);
  OE_CHECK(b->dim >= 1 && b->dim <= (int64_t{1} << 24), OE_ERR_INVALID_ARG, "rvq: dim must be in [1, 2^24], got %lld",
           static_cast<long long>(b->dim));
  for (int l = 0; l < b->num_layers; ++l) {
    OE_CHECK(b->sizes[l] >= 1 && b->sizes[l] <= (int64_t{1} << 31) - 1, OE_ERR_INVALID_ARG,
             "rvq: codebook %d must have between 1 and 2^31-1 rows, got %lld", l, static_cast<long long>(b->sizes[l]));
    OE_CHECK(!need_data || b->data[l] != nullptr, OE_ERR_INVALID_ARG, "rvq: codebook %d pointer is null", l);
  }
  return OE_OK;
}

oe_status check_codes(const void* codes, int codes_int64, int64_t T, const oe_rvq_books* b) {
  OE_CHECK(T >= 0, OE_ERR_INVALID_ARG, "rvq: frame count must be >= 0, got %lld", static_cast<long long>(T));
  if (T == 0) return OE_OK;
  OE_CHECK(codes != nullptr, OE_ERR_INVALID_ARG, "rvq: codes pointer is null");
  const int L = b->num_layers;
  for (int64_t t = 0; t < T; ++t)
    for (int l = 0; l < L; ++l) {
      const int64_t c = codes_int64 ? static_cast<const int64_t*>(codes)[t * L + l]
                                    : static_cast<const int32_t*>(codes)[t * L + l];
      OE_CHECK(c >= 0 && c < b->sizes[l], OE_ERR_OUT_OF_RANGE,
               "rvq: codes[%lld, %d] = %lld is outside [0, %lld) (the size of codebook %d)", static_cast<long long>(t),
               l, static_cast<long long>(c), static_cast<long long>(b->sizes[l]), l);
    }
  return OE_OK;
}

namespace {

float elem(const char* p, oe_dtype dt) {
  uint16_t h;
  switch (dt) {
    case OE_F32: {
      float f;
      std::memcpy(&f, p, 4);
      return f;
    }
    case OE_BF16: std::memcpy(&h, p, 2); return bf16_to_f32(h);
    default: std::memcpy(&h, p, 2); return f16_to_f32(h);
  }
}

// Portable inner loops: one fp32 accumulator per frame (the screening bound then uses the full length).
void dots_scalar(const float* r, int nt, const void* rows, oe_dtype dt, int64_t nrows, int64_t D, float* out,
                 int64_t ldd) {
  const char* rb = static_cast<const char*>(rows);
  const int64_t es = dt == OE_F32 ? 4 : 2;
  for (int64_t i = 0; i < nrows; ++i) {
    const char* row = rb + i * D * es;
    for (int t = 0; t < nt; ++t) {
      const float* rt = r + t * D;
      float acc = 0.0f;
      for (int64_t d = 0; d < D; ++d) acc += rt[d] * elem(row + d * es, dt);
      out[t * ldd + i] = acc;
    }
  }
}

double exact_dist_scalar(const float* r, const void* row, oe_dtype dt, int64_t D) {
  const char* p = static_cast<const char*>(row);
  const int64_t es = dt == OE_F32 ? 4 : 2;
  double s = 0.0;
  for (int64_t d = 0; d < D; ++d) {
    const double diff = static_cast<double>(r[d]) - static_cast<double>(elem(p + d * es, dt));
    s += diff * diff;
  }
  return s;
}

void add_row_scalar(float* acc, const void* row, oe_dtype dt, int64_t n) {
  const char* p = static_cast<const char*>(row);
  const int64_t es = dt == OE_F32 ? 4 : 2;
  for (int64_t d = 0; d < n; ++d) acc[d] += elem(p + d * es, dt);
}

void gemm_tile_scalar(const float* r, int64_t ldr, int mt, const float* pc, int kc, float* s, int64_t lds,
                      int accumulate) {
  constexpr int NR = 16;
  for (int t = 0; t < mt; ++t)
    for (int j = 0; j < NR; ++j) {
      float acc = accumulate ? s[t * lds + j] : 0.0f;
      for (int k = 0; k < kc; ++k) acc += r[t * ldr + k] * pc[k * NR + j];
      s[t * lds + j] = acc;
    }
}

const Kernels& pick() {
#if defined(OE_ARCH_X86)
  switch (isa_active()) {
    case Isa::Avx512: return kernels_avx512();
    case Isa::Avx2: return kernels_avx2();
    default: break;
  }
#endif
  return kernels_scalar();
}

const char* row_ptr(const oe_rvq_books* b, int l, int64_t i) {
  return static_cast<const char*>(b->data[l]) + i * b->dim * static_cast<int64_t>(dtype_size(static_cast<oe_dtype>(b->dtype)));
}

}  // namespace

const Kernels& kernels_scalar() {
  static const Kernels k = {1, &dots_scalar, &exact_dist_scalar, &add_row_scalar, &gemm_tile_scalar, 16};
  return k;
}

}  // namespace rvq
}  // namespace oe

using namespace oe;
using namespace oe::rvq;

extern "C" oe_status oe_rvq_decode_cpu(const void* codes, int codes_int64, int64_t T, const oe_rvq_books* books,
                                       float* out) {
  oe_status st = check_books(books, true);
  if (st != OE_OK) return st;
  if ((st = check_codes(codes, codes_int64, T, books)) != OE_OK) return st;  // before any row is read
  if (T == 0) return OE_OK;
  OE_CHECK(out != nullptr, OE_ERR_INVALID_ARG, "rvq_decode: output pointer is null");
  const Kernels& K = pick();
  const int L = books->num_layers;
  const int64_t D = books->dim;
  const oe_dtype dt = static_cast<oe_dtype>(books->dtype);
  constexpr int64_t kChunk = 1024;  // dims per work item: a streaming frame (T = 1) still uses every thread
  const int64_t nchunk = (D + kChunk - 1) / kChunk;
  const int64_t items = T * nchunk;
  const int64_t es = static_cast<int64_t>(dtype_size(dt));
  // Small decodes (a few frames of a narrow book) run here alone: handing them out costs more than they take.
  const int threads = T * D * L > 32768 ? 0 : 1;
  parallel_for(items, [&](int64_t it) {
    const int64_t t = it / nchunk, d0 = (it % nchunk) * kChunk;
    const int64_t n = D - d0 < kChunk ? D - d0 : kChunk;
    float* o = out + t * D + d0;
    for (int64_t d = 0; d < n; ++d) o[d] = 0.0f;
    for (int l = 0; l < L; ++l) {
      const int64_t c = codes_int64 ? static_cast<const int64_t*>(codes)[t * L + l]
                                    : static_cast<const int32_t*>(codes)[t * L + l];
      K.add_row(o, row_ptr(books, l, c) + d0 * es, dt, n);
    }
  }, threads);
  return OE_OK;
}

extern "C" oe_status oe_rvq_encode_cpu(const float* x, int64_t T, const oe_rvq_books* books, int64_t* codes) {
  oe_status st = check_books(books, true);
  if (st != OE_OK) return st;
  OE_CHECK(T >= 0, OE_ERR_INVALID_ARG, "rvq_encode: frame count must be >= 0, got %lld", static_cast<long long>(T));
  if (T == 0) return OE_OK;
  OE_CHECK(x && codes, OE_ERR_INVALID_ARG, "rvq_encode: null pointer");
  const int64_t D = books->dim;
  for (int64_t i = 0; i < T * D; ++i)
    OE_CHECK(std::isfinite(x[i]), OE_ERR_INVALID_ARG, "rvq_encode: x[%lld, %lld] is not finite",
             static_cast<long long>(i / D), static_cast<long long>(i % D));

  const Kernels& K = pick();
  const int L = books->num_layers;
  const oe_dtype dt = static_cast<oe_dtype>(books->dtype);
  int64_t nmax = 0;
  for (int l = 0; l < L; ++l) nmax = books->sizes[l] > nmax ? books->sizes[l] : nmax;

  // Squared row norms (given, or computed here in fp64 and rounded once).
  std::vector<std::vector<float>> own_norms(static_cast<size_t>(L));
  const float* norms[OE_RVQ_MAX_LAYERS];
  for (int l = 0; l < L; ++l) {
    if (books->norms2[l]) {
      norms[l] = books->norms2[l];
      continue;
    }
    std::vector<float>& nv = own_norms[static_cast<size_t>(l)];
    nv.resize(static_cast<size_t>(books->sizes[l]));
    const std::vector<float> zero(static_cast<size_t>(D), 0.0f);
    constexpr int64_t kNormRows = 64;  // rows per chunk
    const int64_t rows = books->sizes[l];
    parallel_for((rows + kNormRows - 1) / kNormRows, [&](int64_t ch) {
      const int64_t i1 = std::min(rows, (ch + 1) * kNormRows);
      for (int64_t i = ch * kNormRows; i < i1; ++i)
        nv[static_cast<size_t>(i)] = static_cast<float>(K.exact_dist(zero.data(), row_ptr(books, l, i), dt, D));
    });
    norms[l] = nv.data();
  }

  // Rigorous bound on the screen's error. Every dot product r.c is one sequential fp32 chain of D
  // multiply-adds (Kernels::gemm_tile), so |fl(r.c) - r.c| <= gamma_k sum|r_d c_d| <= gamma_k ||r|| ||c|| with
  // k = D + 9 (gamma_k = k u / (1 - k u), u = 2^-24; the slack covers non-FMA builds). With ||c||^2 stored
  // within one ulp (2 u ||c||^2) and the final subtraction's rounding (u |s|), s = ||c||^2 - 2 r.c is within
  //   E = 2 u ||c||^2 + 2 gamma_k ||r|| ||c|| + u |s|
  // of its exact value; the kernel uses twice that.
  const double u = 1.0 / 16777216.0;
  const double k = static_cast<double>(D + 9);
  const double gamma = k * u / (1.0 - k * u);

  // Blocking of the screening GEMM S (frames x rows) = R (frames x D) . C^T: a work item is a block of kNB
  // codebook rows; its rows are packed kKC dims at a time into panels of NR rows (kKC x NR, interleaved,
  // converted to fp32) and multiplied with every frame group of kMR frames by the register-tile kernel.
  constexpr int64_t kFrames = 384;  // frames per pass (S holds kFrames x rows): a 30 s piece (375) in one
  constexpr int64_t kNB = 128;      // codebook rows per work item (a multiple of every NR)
  constexpr int64_t kKC = 256;      // dims per packed slice (a panel of 16 rows is 16 KiB: L1)
  const int64_t NR = K.nr;
  std::vector<float> resid(x, x + T * D);
  std::vector<float> sbuf(static_cast<size_t>(kFrames * nmax));
  std::vector<float> cn(static_cast<size_t>(nmax));  // sqrt of the row norms of the current layer
  float* const S = sbuf.data();
  float* const R = resid.data();
  // Per-thread packing panel and tile (whichever thread runs a block uses its own).
  auto scratch = [&](int64_t n) {
    thread_local std::vector<float> buf;
    if (static_cast<int64_t>(buf.size()) < n) buf.resize(static_cast<size_t>(n));
    return buf.data();
  };

  for (int64_t t0 = 0; t0 < T; t0 += kFrames) {
    const int nt = static_cast<int>(T - t0 < kFrames ? T - t0 : kFrames);
    for (int l = 0; l < L; ++l) {
      const int64_t n = books->sizes[l];
      const int64_t nblk = (n + kNB - 1) / kNB;
      for (int64_t i = 0; i < n; ++i) cn[static_cast<size_t>(i)] = std::sqrt(norms[l][i]);
      // Screen: s[t][i] = ||c_i||^2 - 2 r_t . c_i for every row.
      parallel_for(nblk, [&](int64_t blk) {
        float* pack = scratch(kNB * kKC + kFrames * kNB);
        float* tile = pack + kNB * kKC;
        const int64_t i0 = blk * kNB, nr = n - i0 < kNB ? n - i0 : kNB;
        const int64_t npanel = (nr + NR - 1) / NR;
        for (int64_t k0 = 0; k0 < D; k0 += kKC) {
          const int kc = static_cast<int>(D - k0 < kKC ? D - k0 : kKC);
          for (int64_t p = 0; p < npanel; ++p) {  // pack rows [i0 + p NR, +NR) x dims [k0, k0 + kc)
            float* pp = pack + p * kKC * NR;
            for (int64_t j = 0; j < NR; ++j) {
              const int64_t i = p * NR + j;
              if (i < nr) {
                const char* row = row_ptr(books, l, i0 + i);
                if (dt == OE_F32) {
                  const float* rf = reinterpret_cast<const float*>(row) + k0;
                  for (int kk = 0; kk < kc; ++kk) pp[kk * NR + j] = rf[kk];
                } else {
                  const int64_t es = static_cast<int64_t>(dtype_size(dt));
                  for (int kk = 0; kk < kc; ++kk) pp[kk * NR + j] = elem(row + (k0 + kk) * es, dt);
                }
              } else {
                for (int kk = 0; kk < kc; ++kk) pp[kk * NR + j] = 0.0f;
              }
            }
          }
          for (int64_t p = 0; p < npanel; ++p)
            for (int tt = 0; tt < nt; tt += kMR) {
              const int mt = nt - tt < kMR ? nt - tt : kMR;
              K.gemm_tile(R + (t0 + tt) * D + k0, D, mt, pack + p * kKC * NR, kc, tile + tt * kNB + p * NR, kNB,
                          k0 > 0);
            }
        }
        for (int t = 0; t < nt; ++t)
          for (int64_t i = 0; i < nr; ++i) S[t * nmax + i0 + i] = norms[l][i0 + i] - 2.0f * tile[t * kNB + i];
      });
      // Decide each frame exactly, then subtract the chosen row.
      parallel_for(nt, [&](int64_t t) {
        float* r = R + (t0 + t) * D;
        const float* s = S + t * nmax;
        double rn = 0.0;
        for (int64_t d = 0; d < D; ++d) rn += static_cast<double>(r[d]) * r[d];
        rn = std::sqrt(rn);
        const double a = 2.0 * gamma * rn;
        auto bound = [&](int64_t i) {
          const double n2 = norms[l][i];
          return 2.0 * (2.0 * u * n2 + a * cn[static_cast<size_t>(i)] + u * std::fabs(s[i])) + 1e-300;
        };
        double upper = INFINITY;
        for (int64_t i = 0; i < n; ++i) {
          const double hi = s[i] + bound(i);
          upper = hi < upper ? hi : upper;
        }
        int64_t best = -1;
        double best_d = INFINITY;
        for (int64_t i = 0; i < n; ++i) {
          if (!(s[i] - bound(i) <= upper)) continue;
          const double dist = K.exact_dist(r, row_ptr(books, l, i), dt, D);
          if (best < 0 || dist < best_d) {  // ascending i: ties keep the lowest index
            best = i;
            best_d = dist;
          }
        }
        if (best < 0) best = 0;  // unreachable with finite data; keeps the index valid regardless
        codes[(t0 + t) * L + l] = best;
        const char* c = row_ptr(books, l, best);
        const int64_t es = static_cast<int64_t>(dtype_size(dt));
        if (dt == OE_F32) {
          const float* cf = reinterpret_cast<const float*>(c);
          for (int64_t d = 0; d < D; ++d) r[d] = r[d] - cf[d];
        } else {
          for (int64_t d = 0; d < D; ++d) r[d] = r[d] - elem(c + d * es, dt);
        }
      });
    }
  }
  return OE_OK;
}
