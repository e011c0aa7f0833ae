// CUDA attention kernels (templates), included only by the per-head-dim translation units
// attention_cuda_d{64,80,128,gen}.cu. All math after the loads is fp32; scores live in the log2 domain (q is
// pre-multiplied by scale * log2(e), so softmax weights are exp2(s - m)).
//
// Template parameters: T = element type (float, __half, __nv_bfloat16); DH = head-dim capacity (64, 80, 128
// exact, or 256 for the generic kernels that take any D <= 256 at run time); VEC = 4-element vector loads
// (the launcher uses VEC only when D == DH and every base pointer is 16-byte aligned).
#pragma once
#include "attention/attention_cuda.cuh"

namespace oe {
namespace attn_cuda {
namespace {  // kernels: one private copy per translation unit

// ---- element conversions and loads ---------------------------------------------------------------

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_f(float x);
template <>
__device__ __forceinline__ float from_f<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Four consecutive elements row[d..d+3] as fp32, zeros past `n` (the row length).
template <typename T, bool VEC>
__device__ __forceinline__ float4 load4(const T* row, int d, int n) {
  if (VEC) {  // d % 4 == 0, d + 3 < n, row 16-byte aligned for float and 8-byte for 16-bit types
    if constexpr (sizeof(T) == 4) {
      return *reinterpret_cast<const float4*>(row + d);
    } else {
      const uint2 u = *reinterpret_cast<const uint2*>(row + d);
      const T* h = reinterpret_cast<const T*>(&u);
      return make_float4(to_f(h[0]), to_f(h[1]), to_f(h[2]), to_f(h[3]));
    }
  }
  float4 r;
  r.x = d + 0 < n ? to_f(row[d + 0]) : 0.0f;
  r.y = d + 1 < n ? to_f(row[d + 1]) : 0.0f;
  r.z = d + 2 < n ? to_f(row[d + 2]) : 0.0f;
  r.w = d + 3 < n ? to_f(row[d + 3]) : 0.0f;
  return r;
}

__device__ __forceinline__ float dot4(float4 a, float4 b) { return a.x * b.x + a.y * b.y + a.z * b.z + a.w * b.w; }

// ---- prefill / varlen: tiled online-softmax kernel ------------------------------------------------

// ---- prefill / varlen: tiled online-softmax kernel ------------------------------------------------

// Block: 128 threads = 32 query rows x 4 threads; thread (row, lane4) owns the dims 16 i + 4 lane4 + {0..3}.
// Keys go through shared memory in tiles of BK, converted to fp32.
template <typename T, int DH, bool VEC>
__global__ void __launch_bounds__(kThreads) tiled_kernel(TiledParams p) {
  constexpr int BQ = 32;
  constexpr int BK = DH <= 128 ? 32 : 16;
  constexpr int DP = (DH + 15) / 16 * 16;  // shared-memory row length
  constexpr int NV = DP / 16;              // float4 pieces per thread
  __shared__ float4 ks[BK][DP / 4];
  __shared__ float4 vs[BK][DP / 4];

  const int D = DH <= 128 && VEC ? DH : p.D;
  const int seq = blockIdx.z, head = blockIdx.y;
  const int kvh = head / (p.Hq / p.Hkv);
  const int row = threadIdx.x >> 2, lane4 = threadIdx.x & 3;

  // Rows and keys of this sequence / segment.
  int64_t n_rows, klimit;
  const T* qb;
  const T* kb;
  const T* vb;
  T* ob;
  if (p.cu) {
    const int64_t a = p.cu[seq], e = p.cu[seq + 1];
    if (a < 0 || e < a || e > p.n_rows) return;  // malformed offsets: nothing is read or written
    n_rows = e - a;
    klimit = n_rows;
    qb = static_cast<const T*>(p.q) + a * p.q_row_stride + static_cast<int64_t>(head) * D;
    ob = static_cast<T*>(p.o) + a * p.q_row_stride + static_cast<int64_t>(head) * D;
    kb = static_cast<const T*>(p.k) + a * p.kv_row_stride + static_cast<int64_t>(kvh) * p.kv_head_stride;
    vb = static_cast<const T*>(p.v) + a * p.kv_row_stride + static_cast<int64_t>(kvh) * p.kv_head_stride;
  } else {
    n_rows = p.T;
    int64_t len = p.lengths ? p.lengths[seq] : p.S;
    klimit = len < 0 ? 0 : (len > p.S ? p.S : len);
    qb = static_cast<const T*>(p.q) + seq * p.q_seq_stride + static_cast<int64_t>(head) * D;
    ob = static_cast<T*>(p.o) + seq * p.q_seq_stride + static_cast<int64_t>(head) * D;
    kb = static_cast<const T*>(p.k) + seq * p.kv_seq_stride + static_cast<int64_t>(kvh) * p.kv_head_stride;
    vb = static_cast<const T*>(p.v) + seq * p.kv_seq_stride + static_cast<int64_t>(kvh) * p.kv_head_stride;
  }
  const int64_t r_first = static_cast<int64_t>(blockIdx.x) * BQ;
  if (r_first >= n_rows) return;  // uniform across the block
  const int64_t r = r_first + row;
  const bool row_ok = r < n_rows;

  // Keys this row may see, and the block's furthest key.
  int64_t kend, kmax;
  if (p.causal) {
    const int64_t pos = p.start + r;
    kend = row_ok && pos < klimit ? pos + 1 : 0;
    const int64_t last = (r_first + BQ < n_rows ? r_first + BQ : n_rows) - 1;
    const int64_t pos_last = p.start + last;
    kmax = p.start + r_first < klimit ? (pos_last + 1 < klimit ? pos_last + 1 : klimit) : 0;
  } else {
    kend = row_ok ? klimit : 0;
    kmax = klimit;
  }

  float qr[NV * 4], acc[NV * 4];
#pragma unroll
  for (int i = 0; i < NV; ++i) {
    const int d = 16 * i + 4 * lane4;
    float4 x = make_float4(0.f, 0.f, 0.f, 0.f);
    if (row_ok && d < D) x = load4<T, VEC>(qb + r * p.q_row_stride, d, D);
    qr[4 * i + 0] = x.x * p.scale_log2;
    qr[4 * i + 1] = x.y * p.scale_log2;
    qr[4 * i + 2] = x.z * p.scale_log2;
    qr[4 * i + 3] = x.w * p.scale_log2;
    acc[4 * i + 0] = acc[4 * i + 1] = acc[4 * i + 2] = acc[4 * i + 3] = 0.0f;
  }
  float m = -INFINITY, l = 0.0f;

  for (int64_t j0 = 0; j0 < kmax; j0 += BK) {
    __syncthreads();  // the previous tile is no longer read
    for (int idx = threadIdx.x; idx < BK * (DP / 4); idx += kThreads) {
      const int jj = idx / (DP / 4), d = (idx % (DP / 4)) * 4;
      float4 kx = make_float4(0.f, 0.f, 0.f, 0.f), vx = kx;
      if (j0 + jj < kmax && d < D) {
        kx = load4<T, VEC>(kb + (j0 + jj) * p.kv_row_stride, d, D);
        vx = load4<T, VEC>(vb + (j0 + jj) * p.kv_row_stride, d, D);
      }
      ks[jj][d / 4] = kx;
      vs[jj][d / 4] = vx;
    }
    __syncthreads();

    float s[BK];
    float tile_max = -INFINITY;
#pragma unroll
    for (int j = 0; j < BK; ++j) {
      float part = 0.0f;
#pragma unroll
      for (int i = 0; i < NV; ++i) {
        const float4 kx = ks[j][4 * i + lane4];
        part += qr[4 * i + 0] * kx.x + qr[4 * i + 1] * kx.y + qr[4 * i + 2] * kx.z + qr[4 * i + 3] * kx.w;
      }
      part += __shfl_xor_sync(0xffffffffu, part, 1);
      part += __shfl_xor_sync(0xffffffffu, part, 2);
      s[j] = j0 + j < kend ? part : -INFINITY;
      tile_max = fmaxf(tile_max, s[j]);
    }
    const float m_new = fmaxf(m, tile_max);
    if (m_new == -INFINITY) continue;  // nothing visible yet for this row (no shared-memory traffic below)
    const float alpha = m == -INFINITY ? 0.0f : exp2f(m - m_new);
    l *= alpha;
#pragma unroll
    for (int c = 0; c < NV * 4; ++c) acc[c] *= alpha;
#pragma unroll
    for (int j = 0; j < BK; ++j) {
      const float pj = s[j] == -INFINITY ? 0.0f : exp2f(s[j] - m_new);
      l += pj;
#pragma unroll
      for (int i = 0; i < NV; ++i) {
        const float4 vx = vs[j][4 * i + lane4];
        acc[4 * i + 0] += pj * vx.x;
        acc[4 * i + 1] += pj * vx.y;
        acc[4 * i + 2] += pj * vx.z;
        acc[4 * i + 3] += pj * vx.w;
      }
    }
    m = m_new;
  }

  if (!row_ok) return;
  const float inv = l > 0.0f ? 1.0f / l : 0.0f;
  T* orow = ob + r * p.q_row_stride;
#pragma unroll
  for (int i = 0; i < NV; ++i) {
    const int d = 16 * i + 4 * lane4;
#pragma unroll
    for (int c = 0; c < 4; ++c)
      if (d + c < D) orow[d + c] = from_f<T>(acc[4 * i + c] * inv);
  }
}

// ---- decode: split-K over the key sequence ---------------------------------------------------------

// Block (split s, kv head x head group, batch b), 128 threads. Per key tile of 128 keys: thread t scores key
// j0 + t against the group's G <= 8 query heads (q in shared memory), block max per head, weights to shared
// memory, then thread (key group kg, slice sl) accumulates o[h][4 sl .. 4 sl + 3] over keys j = kg (mod KG).
// At the end the KG partial accumulators are summed through shared memory.
template <typename T, int DH, bool VEC>
__global__ void __launch_bounds__(kThreads) decode_kernel(DecodeParams p) {
  constexpr int DP = (DH + 3) / 4 * 4;
  __shared__ float qs[kMaxGroup][DP];
  __shared__ float ps[kMaxGroup][kThreads];
  __shared__ float red[kThreads / 32][kMaxGroup];
  // Partial accumulators of the key groups: KG * NS <= kThreads threads x kMaxGroup heads x 4 dims.
  __shared__ float ored[kThreads * kMaxGroup * 4];
  __shared__ float lred[kThreads * kMaxGroup];

  const int D = DH <= 128 && VEC ? DH : p.D;
  const int NS = (D + 3) / 4;          // 4-dim slices
  const int KG = kThreads / NS;         // key groups (>= 1 since D <= 4 * kThreads)
  const int split = blockIdx.x, b = blockIdx.z;
  const int kvh = blockIdx.y / p.groups, grp = blockIdx.y % p.groups;
  const int rep = p.Hq / p.Hkv;
  const int h0 = kvh * rep + grp * kMaxGroup;
  const int G = rep - grp * kMaxGroup < kMaxGroup ? rep - grp * kMaxGroup : kMaxGroup;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int sl = tid % NS, kg = tid / NS;
  const bool pv_thread = kg < KG;

  int64_t len = p.lengths[b];
  len = len < 0 ? 0 : (len > p.S ? p.S : len);
  int64_t chunk = (len + p.num_splits - 1) / p.num_splits;
  const int64_t kbeg = split * chunk;
  const int64_t kstop = kbeg + chunk < len ? kbeg + chunk : len;

  const T* qb = static_cast<const T*>(p.q) + (static_cast<int64_t>(b) * p.Hq + h0) * D;
  const T* kb = static_cast<const T*>(p.k) + (static_cast<int64_t>(b) * p.Hkv + kvh) * p.S * D;
  const T* vb = static_cast<const T*>(p.v) + (static_cast<int64_t>(b) * p.Hkv + kvh) * p.S * D;

  for (int idx = tid; idx < kMaxGroup * DP; idx += kThreads) {
    const int h = idx / DP, d = idx % DP;
    qs[h][d] = h < G && d < D ? to_f(qb[static_cast<int64_t>(h) * D + d]) * p.scale_log2 : 0.0f;
  }
  __syncthreads();

  float m[kMaxGroup], l[kMaxGroup], acc[kMaxGroup][4];
#pragma unroll
  for (int h = 0; h < kMaxGroup; ++h) {
    m[h] = -INFINITY;
    l[h] = 0.0f;
    acc[h][0] = acc[h][1] = acc[h][2] = acc[h][3] = 0.0f;
  }

  for (int64_t j0 = kbeg; j0 < kstop; j0 += kThreads) {
    const int64_t j = j0 + tid;
    float s[kMaxGroup];
#pragma unroll
    for (int h = 0; h < kMaxGroup; ++h) s[h] = 0.0f;
    if (j < kstop) {
      const T* krow = kb + j * D;
      for (int d = 0; d < D; d += 4) {
        const float4 kx = load4<T, VEC>(krow, d, D);
#pragma unroll
        for (int h = 0; h < kMaxGroup; ++h)  // d + 3 < DP: D <= DH and d % 4 == 0; qs is zero past D
          s[h] += qs[h][d] * kx.x + qs[h][d + 1] * kx.y + qs[h][d + 2] * kx.z + qs[h][d + 3] * kx.w;
      }
    } else {
#pragma unroll
      for (int h = 0; h < kMaxGroup; ++h) s[h] = -INFINITY;
    }
    // Block max per head.
#pragma unroll
    for (int h = 0; h < kMaxGroup; ++h) {
      float x = s[h];
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, off));
      if (lane == 0) red[warp][h] = x;
    }
    __syncthreads();
    float alpha[kMaxGroup];
#pragma unroll
    for (int h = 0; h < kMaxGroup; ++h) {
      float tmax = red[0][h];
#pragma unroll
      for (int w = 1; w < kThreads / 32; ++w) tmax = fmaxf(tmax, red[w][h]);
      const float m_new = fmaxf(m[h], tmax);
      alpha[h] = m[h] == -INFINITY ? 0.0f : exp2f(m[h] - m_new);
      ps[h][tid] = s[h] == -INFINITY ? 0.0f : exp2f(s[h] - m_new);
      m[h] = m_new;
    }
    __syncthreads();
    const int n_tile = static_cast<int>(kstop - j0 < kThreads ? kstop - j0 : kThreads);
    if (pv_thread) {
#pragma unroll
      for (int h = 0; h < kMaxGroup; ++h) {
        l[h] *= alpha[h];
        acc[h][0] *= alpha[h];
        acc[h][1] *= alpha[h];
        acc[h][2] *= alpha[h];
        acc[h][3] *= alpha[h];
      }
      for (int jj = kg; jj < n_tile; jj += KG) {
        const float4 vx = load4<T, VEC>(vb + (j0 + jj) * D, 4 * sl, D);
#pragma unroll
        for (int h = 0; h < kMaxGroup; ++h) {
          const float pj = ps[h][jj];
          l[h] += pj;
          acc[h][0] += pj * vx.x;
          acc[h][1] += pj * vx.y;
          acc[h][2] += pj * vx.z;
          acc[h][3] += pj * vx.w;
        }
      }
    }
  }

  // Sum the key groups' partial accumulators (all groups share the running max m, so no rescaling).
  if (pv_thread) {
#pragma unroll
    for (int h = 0; h < kMaxGroup; ++h) {
#pragma unroll
      for (int c = 0; c < 4; ++c) ored[((kg * kMaxGroup + h) * NS + sl) * 4 + c] = acc[h][c];
      if (sl == 0) lred[kg * kMaxGroup + h] = l[h];
    }
  }
  __syncthreads();
  for (int idx = tid; idx < G * D; idx += kThreads) {
    const int h = idx / D, d = idx % D;
    float o = 0.0f, lsum = 0.0f;
    for (int g = 0; g < KG; ++g) {
      o += ored[((g * kMaxGroup + h) * NS + d / 4) * 4 + d % 4];
      lsum += lred[g * kMaxGroup + h];
    }
    const int64_t bh = static_cast<int64_t>(b) * p.Hq + h0 + h;
    if (p.num_splits == 1) {
      static_cast<T*>(p.o)[bh * D + d] = from_f<T>(lsum > 0.0f ? o / lsum : 0.0f);
    } else {
      const int64_t slot = bh * p.num_splits + split;
      p.part_o[slot * D + d] = o;
      if (d == 0) {
        p.part_ml[slot * 2 + 0] = m[h];
        p.part_ml[slot * 2 + 1] = lsum;
      }
    }
  }
}

}  // namespace

// ---- launchers (explicitly instantiated per head-dim group) --------------------------------------

template <typename T, int DH, bool VEC>
cudaError_t launch_tiled(const TiledParams& p, int64_t max_rows, int num_seq, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((max_rows + 31) / 32), static_cast<unsigned>(p.Hq),
                  static_cast<unsigned>(num_seq));
  tiled_kernel<T, DH, VEC><<<grid, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, int DH, bool VEC>
cudaError_t launch_decode(const DecodeParams& p, int B, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(p.num_splits), static_cast<unsigned>(p.Hkv * p.groups),
                  static_cast<unsigned>(B));
  decode_kernel<T, DH, VEC><<<grid, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

#define OE_ATTN_INSTANTIATE(DH, VEC)                                                                         \
  template cudaError_t launch_tiled<float, DH, VEC>(const TiledParams&, int64_t, int, cudaStream_t);         \
  template cudaError_t launch_tiled<__half, DH, VEC>(const TiledParams&, int64_t, int, cudaStream_t);        \
  template cudaError_t launch_tiled<__nv_bfloat16, DH, VEC>(const TiledParams&, int64_t, int, cudaStream_t); \
  template cudaError_t launch_decode<float, DH, VEC>(const DecodeParams&, int, cudaStream_t);                \
  template cudaError_t launch_decode<__half, DH, VEC>(const DecodeParams&, int, cudaStream_t);               \
  template cudaError_t launch_decode<__nv_bfloat16, DH, VEC>(const DecodeParams&, int, cudaStream_t);

}  // namespace attn_cuda
}  // namespace oe
