// q4 on the CPU: argument checks, the per-call activation preparation, the parallel driver over column
// tiles, the output epilogue, and the portable scalar tile kernels (the Isa::Scalar level).
//
// One call:
//   1. prepares the activations once: gathers x rows through perm (act-order), converts to fp32, zeroes the
//      padding rows; in INT8 mode quantizes each 32-row block to int8 (decode sizes on the calling thread,
//      prefill sizes split over the pool);
//   2. for each column tile (contiguous chunks of tiles claimed by the calling thread and the pool workers,
//      csrc/q4/q4_threads.cpp, so each thread streams one region of the codes at a time), for each group of
//      up to kMaxMR rows: the ISA's tile kernel, then bias + dtype store.
// Nothing is allocated: the caller owns the workspace (oe_q4_cpu_workspace_bytes). Thread count:
// oe::num_threads() (OMP_NUM_THREADS / _C.set_num_threads, shared with the other kernel families).
//
// Huge pages (Linux): the first call that sees a codes buffer of at least kHugeMinBytes asks the kernel to
// back it with 2 MiB pages (madvise MADV_HUGEPAGE, then MADV_COLLAPSE to do it now rather than whenever
// khugepaged gets there). A decode GEMV streams its codes once per token: with 4 KiB pages every 4 KiB of
// the stream costs a TLB miss and a page walk, which on the project's 2-core machine cut a plain
// multi-stream read from ~20 to ~15 GB/s. The collapse copies the buffer once and changes no byte of it:
// ~5 s per GB measured on that machine while it ran ~6x more work than it has cores, paid by the first call
// on each weight; next to nothing when the buffer is on huge pages already (torch allocates on them when
// THP_MEM_ALLOC_ENABLE=1 is set before it is imported). OMNI_EDGE_Q4_HUGEPAGES=0 turns it off (read when
// a new buffer is seen). Errors (no THP, a file-backed mapping) are ignored. Buffers are remembered by
// start address: a new buffer that reuses a freed one's address is not advised again (speed only).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <unordered_set>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "common/cpu_features.h"
#include "common/half.h"
#include "q4/q4.h"

namespace oe {
namespace q4 {

oe_status validate(const oe_q4_weight* w, const void* x, int dt, int64_t M, const void* y, bool check_groups) {
  OE_CHECK(w != nullptr, OE_ERR_INVALID_ARG, "q4: weight descriptor is NULL");
  OE_CHECK(dtype_valid(dt), OE_ERR_INVALID_ARG, "q4: x dtype code must be 0 (f32), 1 (f16) or 2 (bf16), got %d", dt);
  OE_CHECK(M >= 0, OE_ERR_INVALID_ARG, "q4: M must be >= 0, got %lld", (long long)M);
  OE_CHECK(w->K > 0 && w->N > 0, OE_ERR_INVALID_ARG, "q4: K and N must be positive, got K=%lld N=%lld",
           (long long)w->K, (long long)w->N);
  OE_CHECK(w->N % 8 == 0, OE_ERR_INVALID_ARG, "q4: N must be a multiple of 8, got %lld", (long long)w->N);
  OE_CHECK(w->Kp % kBlockK == 0 && w->Kp >= w->K, OE_ERR_INVALID_ARG,
           "q4: Kp must be a multiple of %d and >= K=%lld, got %lld", kBlockK, (long long)w->K, (long long)w->Kp);
  OE_CHECK(w->G >= 1, OE_ERR_INVALID_ARG, "q4: G (groups) must be >= 1, got %lld", (long long)w->G);
  OE_CHECK(w->codes && w->scales && w->zeros && w->block_group, OE_ERR_INVALID_ARG,
           "q4: codes, scales, zeros and block_group must not be NULL");
  OE_CHECK(M == 0 || (x && y), OE_ERR_INVALID_ARG, "q4: x and y must not be NULL");
  if (check_groups) {
    const int64_t nb = w->Kp / kBlockK;
    for (int64_t b = 0; b < nb; ++b) {
      const int32_t g = w->block_group[b];
      OE_CHECK(g >= 0 && g < w->G, OE_ERR_OUT_OF_RANGE, "q4: block_group[%lld] = %d outside [0, %lld)",
               (long long)b, g, (long long)w->G);
    }
  }
  return OE_OK;
}

namespace {

inline float load_x(const void* x, int dt, int64_t i) {
  switch (dt) {
    case OE_F16: return f16_to_f32(static_cast<const uint16_t*>(x)[i]);
    case OE_BF16: return bf16_to_f32(static_cast<const uint16_t*>(x)[i]);
    default: return static_cast<const float*>(x)[i];
  }
}

// Gathers layout rows [r0, r0 + n) of activation row m into dst (fp32). Returns false on a bad perm entry.
bool gather(const oe_q4_weight& w, const void* x, int dt, int64_t m, int64_t r0, int64_t n, float* dst) {
  const int64_t base = m * w.K;
  if (!w.perm) {
    const int64_t valid = std::max<int64_t>(0, std::min<int64_t>(n, w.K - r0));
    if (dt == OE_F32) {
      std::memcpy(dst, static_cast<const float*>(x) + base + r0, valid * sizeof(float));
    } else if (dt == OE_F16) {
      const uint16_t* s = static_cast<const uint16_t*>(x) + base + r0;
      for (int64_t i = 0; i < valid; ++i) dst[i] = f16_to_f32(s[i]);
    } else {
      const uint16_t* s = static_cast<const uint16_t*>(x) + base + r0;
      for (int64_t i = 0; i < valid; ++i) dst[i] = bf16_to_f32(s[i]);
    }
    for (int64_t i = valid; i < n; ++i) dst[i] = 0.0f;
    return true;
  }
  bool ok = true;
  for (int64_t i = 0; i < n; ++i) {
    const int32_t src = w.perm[r0 + i];
    if (src >= 0 && src < w.K) {
      dst[i] = load_x(x, dt, base + src);
    } else {
      ok = ok && src == -1;
      dst[i] = 0.0f;
    }
  }
  return ok;
}

void store_tile(const oe_q4_weight& w, int64_t t, int64_t m0, int mr, const float* out, int dt, void* y) {
  const int64_t n0 = t * kTileN;
  const int64_t nn = std::min<int64_t>(kTileN, w.N - n0);
  for (int m = 0; m < mr; ++m) {
    const int64_t row = (m0 + m) * w.N + n0;
    for (int64_t l = 0; l < nn; ++l) {
      float v = out[m * kTileN + l];
      if (w.bias) v += w.bias[n0 + l];
      switch (dt) {
        case OE_F16: static_cast<uint16_t*>(y)[row + l] = f32_to_f16(v); break;
        case OE_BF16: static_cast<uint16_t*>(y)[row + l] = f32_to_bf16(v); break;
        default: static_cast<float*>(y)[row + l] = v;
      }
    }
  }
}

// ---- portable scalar tile kernels (Isa::Scalar; the same loop structure as the SIMD ones) ----

template <int MR>
void tile_exact_scalar(const oe_q4_weight& w, int64_t t, const Prep& p, int64_t m0, float* out) {
  const int64_t octets = w.Kp / kOctet, nb = w.Kp / kBlockK;
  const uint32_t* c = w.codes + t * octets * kTileN;
  const uint16_t* sc = w.scales + t * w.G * kTileN;
  const uint8_t* zp = w.zeros + t * w.G * kTileN;
  float y[MR][kTileN] = {};
  int64_t b = 0;
  while (b < nb) {
    const int32_t g = w.block_group[b];
    float acc[MR][kTileN] = {};
    float z[kTileN];
    for (int l = 0; l < kTileN; ++l) z[l] = static_cast<float>(zp[g * kTileN + l]);
    do {
      for (int o = 0; o < kOctetsPerBlock; ++o) {
        const int64_t oct = b * kOctetsPerBlock + o;
        const uint32_t* word = c + oct * kTileN;
        for (int j = 0; j < 8; ++j) {  // loops over the 16 lanes innermost: compilers vectorize them
          const int64_t r = oct * kOctet + kNibbleRow[j];
          float wv[kTileN];
          for (int l = 0; l < kTileN; ++l) wv[l] = static_cast<float>((word[l] >> (4 * j)) & 0xFu) - z[l];
          for (int m = 0; m < MR; ++m) {
            const float xv = p.xf[(m0 + m) * w.Kp + r];
            for (int l = 0; l < kTileN; ++l) acc[m][l] += wv[l] * xv;
          }
        }
      }
      ++b;
    } while (b < nb && w.block_group[b] == g);
    for (int l = 0; l < kTileN; ++l) {
      const float s = f16_to_f32(sc[g * kTileN + l]);
      for (int m = 0; m < MR; ++m) y[m][l] += s * acc[m][l];
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int l = 0; l < kTileN; ++l) out[m * kTileN + l] = y[m][l];
}

template <int MR>
void tile_int8_scalar(const oe_q4_weight& w, int64_t t, const Prep& p, int64_t m0, float* out) {
  const int64_t octets = w.Kp / kOctet, nb = w.Kp / kBlockK;
  const uint32_t* c = w.codes + t * octets * kTileN;
  const uint16_t* sc = w.scales + t * w.G * kTileN;
  const uint8_t* zp = w.zeros + t * w.G * kTileN;
  float y[MR][kTileN] = {};
  int64_t b = 0;
  while (b < nb) {
    const int32_t g = w.block_group[b];
    float acc[MR][kTileN] = {};
    float zsum[MR] = {};
    do {
      int32_t isum[MR][kTileN] = {};
      for (int o = 0; o < kOctetsPerBlock; ++o) {
        const int64_t oct = b * kOctetsPerBlock + o;
        const uint32_t* word = c + oct * kTileN;
        for (int j = 0; j < 8; ++j) {
          const int64_t r = oct * kOctet + kNibbleRow[j];
          int32_t q[kTileN];
          for (int l = 0; l < kTileN; ++l) q[l] = static_cast<int32_t>((word[l] >> (4 * j)) & 0xFu);
          for (int m = 0; m < MR; ++m) {
            const int32_t xv = p.xq[(m0 + m) * w.Kp + r];
            for (int l = 0; l < kTileN; ++l) isum[m][l] += q[l] * xv;
          }
        }
      }
      for (int m = 0; m < MR; ++m) {
        const float d = p.xd[(m0 + m) * nb + b];
        for (int l = 0; l < kTileN; ++l) acc[m][l] += static_cast<float>(isum[m][l]) * d;
        zsum[m] += p.xds[(m0 + m) * nb + b];
      }
      ++b;
    } while (b < nb && w.block_group[b] == g);
    for (int l = 0; l < kTileN; ++l) {
      const float s = f16_to_f32(sc[g * kTileN + l]);
      const float z = static_cast<float>(zp[g * kTileN + l]);
      for (int m = 0; m < MR; ++m) y[m][l] += s * (acc[m][l] - z * zsum[m]);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int l = 0; l < kTileN; ++l) out[m * kTileN + l] = y[m][l];
}

const TileKernels kScalar = {
    {tile_exact_scalar<1>, tile_exact_scalar<2>, tile_exact_scalar<3>, tile_exact_scalar<4>},
    {tile_int8_scalar<1>, tile_int8_scalar<2>, tile_int8_scalar<3>, tile_int8_scalar<4>},
    quantize_blocks_scalar,
};

const TileKernels* pick_kernels() {
  const Isa isa = isa_active();
  const TileKernels* k = nullptr;
  if (isa == Isa::Avx512) k = kernels_avx512();
  if (!k && isa >= Isa::Avx2) k = kernels_avx2();
  if (!k && isa == Isa::Neon) k = kernels_neon();
  return k ? k : &kScalar;
}

inline size_t align64(size_t n) { return (n + 63) & ~size_t(63); }

constexpr size_t kHugePage = size_t(2) << 20;
constexpr size_t kHugeMinBytes = 2 * kHugePage;  // smaller buffers have at most one whole huge page inside
constexpr size_t kHugeMaxSeen = 1 << 16;         // buffers remembered; beyond that no more advice is given

// Advises the whole 2 MiB pages inside [p, p + n) once per buffer start (see the file comment).
void advise_huge_pages(const void* p, size_t n) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (n < kHugeMinBytes) return;
  static std::mutex mu;
  static std::unordered_set<uintptr_t> seen;
  const uintptr_t start = reinterpret_cast<uintptr_t>(p);
  {
    std::lock_guard<std::mutex> lk(mu);
    if (seen.size() >= kHugeMaxSeen || !seen.insert(start).second) return;
  }
  const char* env = std::getenv("OMNI_EDGE_Q4_HUGEPAGES");
  if (env && env[0] == '0') return;
  const uintptr_t a = (start + kHugePage - 1) & ~(kHugePage - 1), e = (start + n) & ~(kHugePage - 1);
  if (e <= a) return;
  void* base = reinterpret_cast<void*>(a);
  if (madvise(base, e - a, MADV_HUGEPAGE) != 0) return;
#if defined(MADV_COLLAPSE)
  madvise(base, e - a, MADV_COLLAPSE);
#else
  madvise(base, e - a, 25);  // MADV_COLLAPSE (Linux 6.1+) where the C library headers predate it
#endif
#else
  (void)p;
  (void)n;
#endif
}

constexpr int64_t kSerialPrepRows = 32768;  // M * Kp up to which the calling thread prepares x alone

}  // namespace

const TileKernels* kernels_scalar() { return &kScalar; }

void quantize_blocks_scalar(const float* xf, int64_t nblocks, int8_t* xq, float* xd, float* xds) {
  for (int64_t b = 0; b < nblocks; ++b) {
    const float* v = xf + b * kBlockK;
    float amax = 0.0f;
    for (int i = 0; i < kBlockK; ++i) amax = std::max(amax, std::fabs(v[i]));
    const float d = amax / 127.0f;
    const float id = amax > 0.0f ? 127.0f / amax : 0.0f;
    int32_t sum = 0;
    for (int i = 0; i < kBlockK; ++i) {
      float r = std::nearbyint(v[i] * id);  // round half to even (default rounding mode)
      r = std::min(127.0f, std::max(-127.0f, r));
      const int8_t q = static_cast<int8_t>(r);
      xq[b * kBlockK + i] = q;
      sum += q;
    }
    xd[b] = d;
    xds[b] = d * static_cast<float>(sum);
  }
}


namespace {

// Everything one oe_q4_matmul_cpu call shares with its chunks.
struct Call {
  const oe_q4_weight& w;
  const void* x;
  int dt;
  int64_t M;
  void* y;
  int mode;
  const TileKernels* kern;
  const TileFn* fns;
  Prep p;
  float* xf;
  float* xs;
  int8_t* xq;
  float* xd;
  float* xds;
  int64_t nb, nt;
  int64_t prep_chunk, tile_chunk;
  std::atomic<int> bad_perm;
};

// Prepare (row, block) items [i0, i1): gather, convert, and in INT8 mode quantize.
void prep_range(Call& c, int64_t i0, int64_t i1) {
  const int64_t Kp = c.w.Kp;
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t m = i / c.nb, b = i % c.nb;
    bool ok;
    if (c.mode == OE_Q4_INT8) {
      alignas(64) float tmp[kBlockK];
      ok = gather(c.w, c.x, c.dt, m, b * kBlockK, kBlockK, tmp);
      c.kern->quantize(tmp, 1, c.xq + m * Kp + b * kBlockK, c.xd + m * c.nb + b, c.xds + m * c.nb + b);
    } else {
      float* xf = c.xf + m * Kp + b * kBlockK;
      ok = gather(c.w, c.x, c.dt, m, b * kBlockK, kBlockK, xf);
      float sum = 0.0f;
      for (int r = 0; r < kBlockK; ++r) sum += xf[r];
      c.xs[m * c.nb + b] = sum;
    }
    if (!ok) c.bad_perm.store(1, std::memory_order_relaxed);
  }
}

void prep_chunk(void* ctx, int64_t chunk) {
  Call& c = *static_cast<Call*>(ctx);
  const int64_t i0 = chunk * c.prep_chunk;
  prep_range(c, i0, std::min(c.M * c.nb, i0 + c.prep_chunk));
}

void tile_chunk(void* ctx, int64_t chunk) {
  Call& c = *static_cast<Call*>(ctx);
  const int64_t t1 = std::min(c.nt, (chunk + 1) * c.tile_chunk);
  alignas(64) float out[kMaxMR * kTileN];
  for (int64_t t = chunk * c.tile_chunk; t < t1; ++t) {
    for (int64_t m0 = 0; m0 < c.M; m0 += kMaxMR) {
      const int mr = static_cast<int>(std::min<int64_t>(kMaxMR, c.M - m0));
      c.fns[mr - 1](c.w, t, c.p, m0, out);
      store_tile(c.w, t, m0, mr, out, c.dt, c.y);
    }
  }
}

}  // namespace
}  // namespace q4
}  // namespace oe

using namespace oe;
using namespace oe::q4;

extern "C" size_t oe_q4_cpu_workspace_bytes(int64_t M, int64_t Kp, int mode) {
  if (M <= 0 || Kp <= 0) return 0;
  const size_t m = static_cast<size_t>(M), kp = static_cast<size_t>(Kp), nb = kp / kBlockK;
  if (mode == OE_Q4_INT8) return align64(m * kp) + 2 * align64(m * nb * sizeof(float)) + 64;
  return align64(m * kp * sizeof(float)) + align64(m * nb * sizeof(float)) + 64;
}

extern "C" oe_status oe_q4_matmul_cpu(const oe_q4_weight* w, const void* x, int dt, int64_t M, void* y, int mode,
                                      void* workspace, size_t workspace_bytes) {
  oe_status st = validate(w, x, dt, M, y, true);
  if (st != OE_OK) return st;
  OE_CHECK(mode == OE_Q4_EXACT || mode == OE_Q4_INT8, OE_ERR_INVALID_ARG, "q4: mode must be 0 (exact) or 1 (int8), got %d",
           mode);
  if (M == 0) return OE_OK;
  const size_t need = oe_q4_cpu_workspace_bytes(M, w->Kp, mode);
  OE_CHECK(workspace && workspace_bytes >= need, OE_ERR_INVALID_ARG, "q4: workspace needs %zu bytes, got %zu", need,
           workspace ? workspace_bytes : size_t(0));

  const TileKernels* kern = pick_kernels();
  const int64_t Kp = w->Kp, nb = Kp / kBlockK, nt = (w->N + kTileN - 1) / kTileN;
  advise_huge_pages(w->codes, static_cast<size_t>(nt) * static_cast<size_t>(Kp / kOctet) * kTileN * sizeof(uint32_t));
  uint8_t* ws = reinterpret_cast<uint8_t*>(align64(reinterpret_cast<uintptr_t>(workspace)));
  Prep p;
  float *xf = nullptr, *xs = nullptr;
  int8_t* xq = nullptr;
  float *xd = nullptr, *xds = nullptr;
  if (mode == OE_Q4_INT8) {
    xq = reinterpret_cast<int8_t*>(ws);
    xd = reinterpret_cast<float*>(ws + align64(M * Kp));
    xds = reinterpret_cast<float*>(ws + align64(M * Kp) + align64(M * nb * sizeof(float)));
    p.xq = xq;
    p.xd = xd;
    p.xds = xds;
  } else {
    xf = reinterpret_cast<float*>(ws);
    p.xf = xf;
    xs = reinterpret_cast<float*>(ws + align64(M * Kp * sizeof(float)));
    p.xs = xs;
  }
  Call c{*w, x, dt, M, y, mode, kern, mode == OE_Q4_INT8 ? kern->int8 : kern->exact, p, xf, xs, xq, xd, xds, nb, nt, 1, 1, {0}};
  const int threads = num_threads();

  // 1. activations, once per call. Small ones (decode) on the calling thread: a few microseconds.
  const int64_t items = M * nb;
  if (M * Kp <= kSerialPrepRows || threads <= 1) {
    prep_range(c, 0, items);
  } else {
    c.prep_chunk = (items + 4 * threads - 1) / (4 * threads);
    parallel_chunks((items + c.prep_chunk - 1) / c.prep_chunk, prep_chunk, &c);
  }
  const bool bad_perm = c.bad_perm.load() != 0;
  OE_CHECK(!bad_perm, OE_ERR_OUT_OF_RANGE, "q4: perm holds an entry outside [-1, K=%lld)", (long long)w->K);

  // 2. column tiles, in contiguous chunks of about 1/8 of a thread's share: each chunk streams one region of
  // the codes, and a thread slowed by other work hands its remaining chunks to the others.
  c.tile_chunk = std::max<int64_t>(1, nt / (8 * static_cast<int64_t>(threads)));
  parallel_chunks((nt + c.tile_chunk - 1) / c.tile_chunk, tile_chunk, &c);
  return OE_OK;
}


// ISA files that this target does not compile: no kernels at that level.
namespace oe {
namespace q4 {
#if !defined(OE_ARCH_X86)
const TileKernels* kernels_avx2() { return nullptr; }
const TileKernels* kernels_avx512() { return nullptr; }
#endif
#if !defined(OE_ARCH_ARM64)
const TileKernels* kernels_neon() { return nullptr; }
#endif
}  // namespace q4
}  // namespace oe
