// q4 on NVIDIA GPUs (sm_80 and newer): y = x @ W + bias from the tiled layout (q4.h, quantize/FORMAT.md).
//
// Three kernels, all on the caller's stream, writing caller-owned memory:
//   prep_x  x (M, K) in fp32/fp16/bf16 -> workspace xw (M, Kp) fp32 in layout row order: gathered through
//           perm (act-order folded at load, so x is permuted once per call, not W), padding rows zero.
//   gemv    M <= 8 (decode). One block per 16-column tile; each thread loads 16 bytes of codes (4 columns x
//           8 rows) per step, dequantizes them in registers ((q - z) * s is exact in fp32) and accumulates
//           fp32 dot products for every row of x; partial sums are reduced across the block through warp
//           shuffles and shared memory. Memory bound: the code stream is read exactly once.
//   gemm    M > 8 (prefill). 64 x 64 output tiles, K in steps of one 32-row block (so one group per step):
//           the block's x slice and its dequantized fp32 weight slice are staged in shared memory, then a
//           register-blocked 4 x 4 outer product per thread.
//
// Why fp32 CUDA-core math and not tensor cores (mma.sync): fp32 activations would lose precision through an
// fp16/bf16 mma, this code is compiled on machines without a GPU and must be right the first time it runs,
// and the self-check (omni_edge.ops.q4.self_check) is the only gate before it is used. A simple tiled GEMM is
// easy to verify by reading; an mma path for fp16/bf16 activations can replace `gemm` later behind the same
// entry point. Device code never trusts user data for addressing: perm and block_group are clamped
// (they are validated on the host when the QWeight is built), and every global access is bounds-checked.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>

#include "q4/q4.h"

namespace {

using oe::q4::kBlockK;
using oe::q4::kOctet;
using oe::q4::kTileN;

template <typename T>
__device__ __forceinline__ float to_f32(T v);
template <>
__device__ __forceinline__ float to_f32<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_f32<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_f32(float v);
template <>
__device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Row of octet-local nibble j (bits 4j..4j+3 of a word): q4.h kNibbleRow = {0, 4, 1, 5, 2, 6, 3, 7}.
__device__ __forceinline__ constexpr int nibble_row(int j) { return (j >> 1) + 4 * (j & 1); }

__device__ __forceinline__ int64_t group_of(const int32_t* block_group, int64_t b, int64_t G) {
  const int64_t g = block_group[b];
  return g < 0 ? 0 : (g >= G ? G - 1 : g);
}

// ---- prep_x -----------------------------------------------------------------------------------------
template <typename T>
__global__ void prep_x(const T* __restrict__ x, const int32_t* __restrict__ perm, int64_t M, int64_t K, int64_t Kp,
                       float* __restrict__ xw) {
  const int64_t total = M * Kp;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t m = i / Kp, r = i % Kp;
    const int64_t src = perm ? perm[r] : (r < K ? r : -1);
    xw[i] = (src >= 0 && src < K) ? to_f32<T>(x[m * K + src]) : 0.0f;
  }
}

// ---- gemv (M <= 8) ------------------------------------------------------------------------------------
constexpr int kGemvThreads = 256;
constexpr int kGemvSlots = kGemvThreads / 4;  // octet rows in flight per block (4 threads per octet row)
constexpr int kGemvWarps = kGemvThreads / 32;
constexpr int kMaxM = oe::q4::kCudaGemvMaxM;

template <typename T>
__global__ void __launch_bounds__(kGemvThreads)
    gemv(const uint32_t* __restrict__ codes, const uint16_t* __restrict__ scales, const uint8_t* __restrict__ zeros,
         const int32_t* __restrict__ block_group, const float* __restrict__ bias, const float* __restrict__ xw,
         T* __restrict__ y, int M, int64_t N, int64_t Kp, int64_t G) {
  __shared__ float red[kGemvWarps][kMaxM][kTileN];
  const int64_t t = blockIdx.x;
  const int quad = threadIdx.x & 3;   // this thread's columns: 4 * quad .. 4 * quad + 3 of the tile
  const int slot = threadIdx.x >> 2;  // this thread's octet rows: slot, slot + kGemvSlots, ...
  const int64_t octets = Kp / kOctet;
  const uint4* tile = reinterpret_cast<const uint4*>(codes + t * octets * kTileN);

  float acc[kMaxM][4];
#pragma unroll
  for (int m = 0; m < kMaxM; ++m)
#pragma unroll
    for (int c = 0; c < 4; ++c) acc[m][c] = 0.0f;

  for (int64_t o = slot; o < octets; o += kGemvSlots) {
    const uint4 wq = __ldg(tile + o * 4 + quad);
    const int64_t g = group_of(block_group, o / (kBlockK / kOctet), G);
    const int64_t gi = (t * G + g) * kTileN + 4 * quad;
    float s[4], z[4];
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      s[c] = __half2float(__ushort_as_half(__ldg(scales + gi + c)));
      z[c] = static_cast<float>(__ldg(zeros + gi + c));
    }
    const uint32_t word[4] = {wq.x, wq.y, wq.z, wq.w};
    float wv[8][4];  // dequantized weights of rows 8o .. 8o+7 (layout order), exact in fp32
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c) wv[nibble_row(j)][c] = (static_cast<float>((word[c] >> (4 * j)) & 0xFu) - z[c]) * s[c];
#pragma unroll
    for (int m = 0; m < kMaxM; ++m) {
      if (m < M) {
        const float4* xr = reinterpret_cast<const float4*>(xw + m * Kp + o * kOctet);
        const float4 a = xr[0], b = xr[1];
        const float xv[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
#pragma unroll
        for (int r = 0; r < 8; ++r)
#pragma unroll
          for (int c = 0; c < 4; ++c) acc[m][c] = fmaf(wv[r][c], xv[r], acc[m][c]);
      }
    }
  }

  // Reduce over the 8 lanes of a warp that share a quad (lane = quad + 4k), then over the warps.
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int m = 0; m < kMaxM; ++m)
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      float v = acc[m][c];
      v += __shfl_xor_sync(0xffffffffu, v, 4);
      v += __shfl_xor_sync(0xffffffffu, v, 8);
      v += __shfl_xor_sync(0xffffffffu, v, 16);
      if (lane < 4) red[warp][m][4 * lane + c] = v;
    }
  __syncthreads();
  for (int i = threadIdx.x; i < M * kTileN; i += kGemvThreads) {
    const int m = i / kTileN, l = i % kTileN;
    const int64_t n = t * kTileN + l;
    if (n >= N) continue;
    float v = 0.0f;
#pragma unroll
    for (int k = 0; k < kGemvWarps; ++k) v += red[k][m][l];
    if (bias) v += bias[n];
    y[m * N + n] = from_f32<T>(v);
  }
}

// ---- gemm (M > 8) ------------------------------------------------------------------------------------
constexpr int kBM = 64, kBN = 64, kGemmThreads = 256;
constexpr int kPad = 4;  // keeps rows 16-byte aligned and spreads shared-memory banks
static_assert(kBN % kTileN == 0 && kBN / kTileN * (kBlockK / kOctet) * kTileN == kGemmThreads,
              "one code word per thread per K step");
static_assert(kBM * kBlockK == kGemmThreads * 8, "eight activations per thread per K step");

template <typename T>
__global__ void __launch_bounds__(kGemmThreads)
    gemm(const uint32_t* __restrict__ codes, const uint16_t* __restrict__ scales, const uint8_t* __restrict__ zeros,
         const int32_t* __restrict__ block_group, const float* __restrict__ bias, const float* __restrict__ xw,
         T* __restrict__ y, int64_t M, int64_t N, int64_t Kp, int64_t G) {
  __shared__ __align__(16) float As[kBlockK][kBM + kPad];  // [k][m]
  __shared__ __align__(16) float Bs[kBlockK][kBN + kPad];  // [k][n], dequantized
  const int tid = threadIdx.x;
  const int tx = tid % 16, ty = tid / 16;  // outputs: rows 4*ty.., columns 4*tx..
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kBM, n0 = static_cast<int64_t>(blockIdx.x) * kBN;
  const int64_t octets = Kp / kOctet, nt = (N + kTileN - 1) / kTileN;
  // this thread's code word in each K step: tile n0/16 + bt, octet bo of the block, lane bl
  const int bt = tid / 64, bo = (tid / 16) % 4, bl = tid % 16;
  const int64_t t = n0 / kTileN + bt;
  // this thread's activations in each K step: row ar, rows ak .. ak+7 of the block
  const int ar = tid / 4, ak = (tid % 4) * 8;
  const int64_t am = m0 + ar;

  float acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;

  for (int64_t b = 0; b < Kp / kBlockK; ++b) {
    if (am < M) {
      const float4* src = reinterpret_cast<const float4*>(xw + am * Kp + b * kBlockK + ak);
      const float4 p = src[0], q = src[1];
      As[ak + 0][ar] = p.x; As[ak + 1][ar] = p.y; As[ak + 2][ar] = p.z; As[ak + 3][ar] = p.w;
      As[ak + 4][ar] = q.x; As[ak + 5][ar] = q.y; As[ak + 6][ar] = q.z; As[ak + 7][ar] = q.w;
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i) As[ak + i][ar] = 0.0f;
    }
    if (t < nt) {
      const uint32_t word = __ldg(codes + (t * octets + b * (kBlockK / kOctet) + bo) * kTileN + bl);
      const int64_t gi = (t * G + group_of(block_group, b, G)) * kTileN + bl;
      const float s = __half2float(__ushort_as_half(__ldg(scales + gi)));
      const float z = static_cast<float>(__ldg(zeros + gi));
#pragma unroll
      for (int j = 0; j < 8; ++j)
        Bs[bo * kOctet + nibble_row(j)][bt * kTileN + bl] = (static_cast<float>((word >> (4 * j)) & 0xFu) - z) * s;
    } else {
#pragma unroll
      for (int j = 0; j < 8; ++j) Bs[bo * kOctet + j][bt * kTileN + bl] = 0.0f;
    }
    __syncthreads();
#pragma unroll 8
    for (int kk = 0; kk < kBlockK; ++kk) {
      const float4 a = *reinterpret_cast<const float4*>(&As[kk][4 * ty]);
      const float4 w = *reinterpret_cast<const float4*>(&Bs[kk][4 * tx]);
      const float av[4] = {a.x, a.y, a.z, a.w}, wv[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(av[i], wv[j], acc[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t m = m0 + 4 * ty + i;
    if (m >= M) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t n = n0 + 4 * tx + j;
      if (n >= N) continue;
      float v = acc[i][j];
      if (bias) v += bias[n];
      y[m * N + n] = from_f32<T>(v);
    }
  }
}

template <typename T>
oe_status launch(const oe_q4_weight& w, const void* x, int64_t M, void* y, bool use_gemv, float* xw,
                 cudaStream_t stream) {
  const int64_t total = M * w.Kp;
  const int prep_blocks = static_cast<int>(std::min<int64_t>((total + 255) / 256, 4096));
  prep_x<T><<<prep_blocks, 256, 0, stream>>>(static_cast<const T*>(x), w.perm, M, w.K, w.Kp, xw);
  const int64_t nt = (w.N + kTileN - 1) / kTileN;
  if (use_gemv) {
    gemv<T><<<static_cast<unsigned>(nt), kGemvThreads, 0, stream>>>(w.codes, w.scales, w.zeros, w.block_group, w.bias,
                                                                     xw, static_cast<T*>(y), static_cast<int>(M), w.N,
                                                                     w.Kp, w.G);
  } else {
    const dim3 grid(static_cast<unsigned>((w.N + kBN - 1) / kBN), static_cast<unsigned>((M + kBM - 1) / kBM));
    gemm<T><<<grid, kGemmThreads, 0, stream>>>(w.codes, w.scales, w.zeros, w.block_group, w.bias, xw,
                                               static_cast<T*>(y), M, w.N, w.Kp, w.G);
  }
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return oe::fail(OE_ERR_CUDA, "q4: kernel launch failed: %s", cudaGetErrorString(e));
  return OE_OK;
}

}  // namespace

extern "C" size_t oe_q4_cuda_workspace_bytes(int64_t M, int64_t Kp) {
  return M > 0 && Kp > 0 ? static_cast<size_t>(M) * static_cast<size_t>(Kp) * sizeof(float) : 0;
}

extern "C" oe_status oe_q4_matmul_cuda(const oe_q4_weight* w, const void* x, int dt, int64_t M, void* y, int kernel,
                                       void* workspace, size_t workspace_bytes, uintptr_t stream) {
  oe_status st = oe::q4::validate(w, x, dt, M, y, /*check_groups=*/false);  // block_group lives on the device
  if (st != OE_OK) return st;
  OE_CHECK(kernel >= 0 && kernel <= 2, OE_ERR_INVALID_ARG, "q4: kernel must be 0 (auto), 1 (gemv) or 2 (gemm), got %d",
           kernel);
  OE_CHECK(kernel != 1 || M <= kMaxM, OE_ERR_INVALID_ARG, "q4: the GEMV kernel takes M <= %d rows, got M=%lld", kMaxM,
           (long long)M);
  OE_CHECK((M / kBM) < 65535, OE_ERR_INVALID_ARG, "q4: M=%lld rows is more than one launch covers", (long long)M);
  if (M == 0) return OE_OK;
  const size_t need = oe_q4_cuda_workspace_bytes(M, w->Kp);
  OE_CHECK(workspace && workspace_bytes >= need, OE_ERR_INVALID_ARG, "q4: workspace needs %zu bytes, got %zu", need,
           workspace ? workspace_bytes : size_t(0));
  OE_CHECK(reinterpret_cast<uintptr_t>(workspace) % 16 == 0 && reinterpret_cast<uintptr_t>(w->codes) % 16 == 0,
           OE_ERR_INVALID_ARG, "q4: codes and workspace must be 16-byte aligned");
  // Launch on the GPU that holds the weights (this library has its own CUDA runtime instance, whose current
  // device need not be the caller's); this also rejects host pointers.
  cudaPointerAttributes attr;
  cudaError_t e = cudaPointerGetAttributes(&attr, w->codes);
  if (e != cudaSuccess || attr.type != cudaMemoryTypeDevice) {
    cudaGetLastError();
    return oe::fail(OE_ERR_INVALID_ARG, "q4: codes must be CUDA device memory (%s)",
                    e != cudaSuccess ? cudaGetErrorString(e) : "host or managed pointer");
  }
  int prev = 0;
  if ((e = cudaGetDevice(&prev)) != cudaSuccess || (prev != attr.device && (e = cudaSetDevice(attr.device)) != cudaSuccess))
    return oe::fail(OE_ERR_CUDA, "q4: selecting GPU %d: %s", attr.device, cudaGetErrorString(e));
  const bool use_gemv = kernel == 1 || (kernel == 0 && M <= kMaxM);
  float* xw = static_cast<float*>(workspace);
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  switch (dt) {
    case OE_F16: st = launch<__half>(*w, x, M, y, use_gemv, xw, s); break;
    case OE_BF16: st = launch<__nv_bfloat16>(*w, x, M, y, use_gemv, xw, s); break;
    default: st = launch<float>(*w, x, M, y, use_gemv, xw, s);
  }
  if (prev != attr.device) cudaSetDevice(prev);
  return st;
}
