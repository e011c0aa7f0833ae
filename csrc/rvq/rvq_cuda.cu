// CUDA RVQ: decode (gather + sum in fp32) and encode (per layer: a tiled fp32 screen s = ||c||^2 - 2 r.c over all
// rows, then one block per frame that re-evaluates the possible minima exactly in fp64, picks the lowest
// index among equal distances and subtracts the chosen row). Contracts: rvq.h.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "rvq/rvq.h"
#include "rvq/rvq_internal.h"

namespace oe {
namespace rvq_cuda {
namespace {

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }

// ---- decode -----------------------------------------------------------------------------------------

constexpr int kDecodeThreads = 256;

// Grid (ceil(D / 256), T). out[t, d] = sum_l row(l, codes[t, l])[d] in layer order; a bad code is never
// dereferenced: the frame gets NaN and *flag the (1-based) position of a bad code.
template <typename T>
__global__ void __launch_bounds__(kDecodeThreads) decode_kernel(const void* codes, int is64, oe_rvq_books b, float* out,
                                                               int32_t* flag) {
  const int64_t t = blockIdx.y;
  const int64_t d = static_cast<int64_t>(blockIdx.x) * kDecodeThreads + threadIdx.x;
  if (d >= b.dim) return;
  const int L = b.num_layers;
  float acc = 0.0f;
  for (int l = 0; l < L; ++l) {
    const int64_t c = is64 ? static_cast<const int64_t*>(codes)[t * L + l] : static_cast<const int32_t*>(codes)[t * L + l];
    if (c < 0 || c >= b.sizes[l]) {
      if (flag && d == 0) {
        const int64_t pos = 1 + t * L + l;
        atomicCAS(flag, 0, static_cast<int32_t>(pos < 2147483647 ? pos : 2147483647));
      }
      acc = NAN;
      break;
    }
    acc += to_f(static_cast<const T*>(b.data[l])[c * b.dim + d]);
  }
  out[t * b.dim + d] = acc;
}

// ---- encode: screen ---------------------------------------------------------------------------------

constexpr int kBM = 32, kBN = 64, kBK = 32;  // frames x rows x dims per tile; 256 threads, 2 x 4 outputs each

// s[t * lds + i] = norms2[i] - 2 r_t . c_i. Each thread sums kBK products into a fresh partial, then adds the
// partial to its total, so no addition chain is longer than kBK + ceil(D / kBK) (the bound in encode_select).
template <typename T>
__global__ void __launch_bounds__(256) screen_kernel(const float* R, int64_t nframes, const T* rows, int64_t n,
                                                     int64_t D, const float* norms2, float* S, int64_t lds) {
  __shared__ float as[kBK][kBM + 1];
  __shared__ float bs[kBK][kBN + 1];
  const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
  const int64_t t0 = static_cast<int64_t>(blockIdx.y) * kBM, i0 = static_cast<int64_t>(blockIdx.x) * kBN;
  float acc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
  for (int64_t k0 = 0; k0 < D; k0 += kBK) {
    for (int e = threadIdx.x; e < kBM * kBK; e += 256) {
      const int f = e / kBK, k = e % kBK;
      const int64_t t = t0 + f, d = k0 + k;
      as[k][f] = t < nframes && d < D ? R[t * D + d] : 0.0f;
    }
    for (int e = threadIdx.x; e < kBN * kBK; e += 256) {
      const int i = e / kBK, k = e % kBK;
      const int64_t row = i0 + i, d = k0 + k;
      bs[k][i] = row < n && d < D ? to_f(rows[row * D + d]) : 0.0f;
    }
    __syncthreads();
    float part[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll 8
    for (int k = 0; k < kBK; ++k) {
      const float a0 = as[k][ty], a1 = as[k][ty + 16];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float bv = bs[k][tx + 16 * j];
        part[0][j] = fmaf(a0, bv, part[0][j]);
        part[1][j] = fmaf(a1, bv, part[1][j]);
      }
    }
#pragma unroll
    for (int f = 0; f < 2; ++f)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[f][j] += part[f][j];
    __syncthreads();
  }
#pragma unroll
  for (int f = 0; f < 2; ++f) {
    const int64_t t = t0 + ty + 16 * f;
    if (t >= nframes) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t i = i0 + tx + 16 * j;
      if (i < n) S[t * lds + i] = norms2[i] - 2.0f * acc[f][j];
    }
  }
}

// ---- encode: exact decision + residual update --------------------------------------------------------

constexpr int kSelThreads = 256;

// Deterministic block reductions (fixed shuffle tree, then warp 0 over the per-warp values).
__device__ double block_sum(double v, double* red) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  __syncthreads();
  if (lane == 0) red[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kSelThreads / 32 ? red[lane] : 0.0;
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    if (lane == 0) red[0] = v;
  }
  __syncthreads();
  return red[0];
}

__device__ double block_min(double v, double* red) {
  for (int off = 16; off > 0; off >>= 1) v = fmin(v, __shfl_xor_sync(0xffffffffu, v, off));
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  __syncthreads();
  if (lane == 0) red[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kSelThreads / 32 ? red[lane] : INFINITY;
    for (int off = 16; off > 0; off >>= 1) v = fmin(v, __shfl_xor_sync(0xffffffffu, v, off));
    if (lane == 0) red[0] = v;
  }
  __syncthreads();
  return red[0];
}

// Error bound of a screened value (see oe_rvq_encode_cpu for the derivation; twice the bound is used).
__device__ __forceinline__ double screen_bound(double s, double n2, double rn, double gamma) {
  const double u = 1.0 / 16777216.0;
  return 2.0 * (2.0 * u * n2 + 2.0 * gamma * rn * sqrt(n2) + u * fabs(s)) + 1e-300;
}

// Grid (T). Frame t: candidates are the rows with s_i - E_i <= min_j (s_j + E_j); each is re-evaluated as
// sum_d (r_d - c_d)^2 in fp64 by the whole block; the smallest distance wins, the lowest index on ties.
template <typename T>
__global__ void __launch_bounds__(kSelThreads) select_kernel(float* R, const float* S, int64_t lds, const T* rows,
                                                            int64_t n, int64_t D, const float* norms2, int64_t* codes,
                                                            int L, int layer, double gamma) {
  __shared__ double red[kSelThreads / 32];
  __shared__ int list[kSelThreads];
  __shared__ int count;
  __shared__ double best_d;
  __shared__ long long best_i;
  const int64_t t = blockIdx.x;
  float* r = R + t * D;
  const float* s = S + t * lds;

  double acc = 0.0;
  for (int64_t d = threadIdx.x; d < D; d += kSelThreads) acc += static_cast<double>(r[d]) * r[d];
  const double rn = sqrt(block_sum(acc, red));

  double up = INFINITY;
  for (int64_t i = threadIdx.x; i < n; i += kSelThreads) {
    const double si = s[i];
    up = fmin(up, si + screen_bound(si, norms2[i], rn, gamma));
  }
  const double upper = block_min(up, red);

  if (threadIdx.x == 0) {
    best_d = INFINITY;
    best_i = -1;
  }
  for (int64_t base = 0; base < n; base += kSelThreads) {
    __syncthreads();
    if (threadIdx.x == 0) count = 0;
    __syncthreads();
    const int64_t i = base + threadIdx.x;
    if (i < n) {
      const double si = s[i];
      if (si - screen_bound(si, norms2[i], rn, gamma) <= upper) list[atomicAdd(&count, 1)] = static_cast<int>(threadIdx.x);
    }
    __syncthreads();
    const int c = count;
    for (int q = 0; q < c; ++q) {
      const int64_t cand = base + list[q];
      const T* row = rows + cand * D;
      double part = 0.0;
      for (int64_t d = threadIdx.x; d < D; d += kSelThreads) {
        const double diff = static_cast<double>(r[d]) - static_cast<double>(to_f(row[d]));
        part += diff * diff;
      }
      const double dist = block_sum(part, red);
      if (threadIdx.x == 0 && (best_i < 0 || dist < best_d || (dist == best_d && cand < best_i))) {
        best_d = dist;
        best_i = cand;
      }
    }
  }
  __syncthreads();
  const int64_t best = best_i < 0 ? 0 : best_i;  // best_i < 0 is unreachable with finite data
  if (threadIdx.x == 0) codes[t * L + layer] = best;
  const T* row = rows + best * D;
  for (int64_t d = threadIdx.x; d < D; d += kSelThreads) r[d] = r[d] - to_f(row[d]);
}

oe_status cuda_error(cudaError_t e, const char* what) { return fail(OE_ERR_CUDA, "%s: %s", what, cudaGetErrorString(e)); }

int64_t max_rows(const oe_rvq_books* b) {
  int64_t m = 0;
  for (int l = 0; l < b->num_layers; ++l) m = b->sizes[l] > m ? b->sizes[l] : m;
  return m;
}

int64_t workspace_bytes(int64_t T, const oe_rvq_books* b) {
  // residual (T, D) fp32, then screened values (T, max rows) fp32, each 256-byte aligned
  const int64_t r = (T * b->dim * 4 + 255) / 256 * 256;
  return r + (T * max_rows(b) * 4 + 255) / 256 * 256;
}

template <typename T>
cudaError_t encode_layers(const float* x, int64_t T_, const oe_rvq_books* b, int64_t* codes, char* ws,
                          cudaStream_t st) {
  const int64_t D = b->dim;
  float* R = reinterpret_cast<float*>(ws);
  float* S = reinterpret_cast<float*>(ws + (T_ * D * 4 + 255) / 256 * 256);
  const int64_t lds = max_rows(b);
  cudaError_t e = cudaMemcpyAsync(R, x, static_cast<size_t>(T_ * D * 4), cudaMemcpyDeviceToDevice, st);
  if (e != cudaSuccess) return e;
  const double u = 1.0 / 16777216.0;
  const double k = static_cast<double>(kBK + (D + kBK - 1) / kBK + 2);
  const double gamma = k * u / (1.0 - k * u);
  for (int l = 0; l < b->num_layers; ++l) {
    const int64_t n = b->sizes[l];
    const T* rows = static_cast<const T*>(b->data[l]);
    const dim3 grid(static_cast<unsigned>((n + kBN - 1) / kBN), static_cast<unsigned>((T_ + kBM - 1) / kBM));
    screen_kernel<T><<<grid, 256, 0, st>>>(R, T_, rows, n, D, b->norms2[l], S, lds);
    if ((e = cudaGetLastError()) != cudaSuccess) return e;
    select_kernel<T><<<static_cast<unsigned>(T_), kSelThreads, 0, st>>>(R, S, lds, rows, n, D, b->norms2[l], codes,
                                                                      b->num_layers, l, gamma);
    if ((e = cudaGetLastError()) != cudaSuccess) return e;
  }
  return cudaSuccess;
}

}  // namespace
}  // namespace rvq_cuda
}  // namespace oe

using namespace oe;
using namespace oe::rvq_cuda;

extern "C" oe_status oe_rvq_decode_cuda(const void* codes, int codes_int64, int64_t T, const oe_rvq_books* books,
                                        float* out, int32_t* error_flag, uintptr_t stream) {
  oe_status st = rvq::check_books(books, true);
  if (st != OE_OK) return st;
  OE_CHECK(T >= 0, OE_ERR_INVALID_ARG, "rvq_decode: frame count must be >= 0, got %lld", static_cast<long long>(T));
  if (T == 0) return OE_OK;
  OE_CHECK(codes && out, OE_ERR_INVALID_ARG, "rvq_decode: null pointer");
  const cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  const int64_t L = books->num_layers, es = codes_int64 ? 8 : 4;
  for (int64_t t0 = 0; t0 < T; t0 += 65535) {  // grid.y limit; the flag positions are then per chunk
    const int64_t nt = T - t0 < 65535 ? T - t0 : 65535;
    const dim3 grid(static_cast<unsigned>((books->dim + kDecodeThreads - 1) / kDecodeThreads), static_cast<unsigned>(nt));
    const void* c = static_cast<const char*>(codes) + t0 * L * es;
    float* o = out + t0 * books->dim;
    switch (books->dtype) {
      case OE_F32: decode_kernel<float><<<grid, kDecodeThreads, 0, s>>>(c, codes_int64, *books, o, error_flag); break;
      case OE_F16: decode_kernel<__half><<<grid, kDecodeThreads, 0, s>>>(c, codes_int64, *books, o, error_flag); break;
      default: decode_kernel<__nv_bfloat16><<<grid, kDecodeThreads, 0, s>>>(c, codes_int64, *books, o, error_flag);
    }
    const cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return cuda_error(e, "rvq_decode launch");
  }
  return OE_OK;
}

extern "C" oe_status oe_rvq_encode_cuda_workspace(int64_t T, const oe_rvq_books* books, int64_t* bytes) {
  oe_status st = rvq::check_books(books, false);
  if (st != OE_OK) return st;
  OE_CHECK(T >= 0 && bytes, OE_ERR_INVALID_ARG, "rvq_encode: bad frame count %lld or null output",
           static_cast<long long>(T));
  *bytes = workspace_bytes(T, books);
  return OE_OK;
}

extern "C" oe_status oe_rvq_encode_cuda(const float* x, int64_t T, const oe_rvq_books* books, int64_t* codes,
                                        void* workspace, int64_t ws_bytes, uintptr_t stream) {
  oe_status st = rvq::check_books(books, true);
  if (st != OE_OK) return st;
  OE_CHECK(T >= 0 && (T + kBM - 1) / kBM <= 65535, OE_ERR_INVALID_ARG, "rvq_encode: frame count %lld out of range",
           static_cast<long long>(T));
  if (T == 0) return OE_OK;
  OE_CHECK(x && codes && workspace, OE_ERR_INVALID_ARG, "rvq_encode: null pointer");
  for (int l = 0; l < books->num_layers; ++l)
    OE_CHECK(books->norms2[l] != nullptr, OE_ERR_INVALID_ARG,
             "rvq_encode (CUDA): squared row norms of codebook %d are required", l);
  OE_CHECK(ws_bytes >= workspace_bytes(T, books), OE_ERR_INVALID_ARG,
           "rvq_encode: workspace of %lld bytes is smaller than the %lld needed", static_cast<long long>(ws_bytes),
           static_cast<long long>(workspace_bytes(T, books)));
  const cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  char* ws = static_cast<char*>(workspace);
  cudaError_t e;
  switch (books->dtype) {
    case OE_F32: e = encode_layers<float>(x, T, books, codes, ws, s); break;
    case OE_F16: e = encode_layers<__half>(x, T, books, codes, ws, s); break;
    default: e = encode_layers<__nv_bfloat16>(x, T, books, codes, ws, s); break;
  }
  return e == cudaSuccess ? OE_OK : cuda_error(e, "rvq_encode");
}
