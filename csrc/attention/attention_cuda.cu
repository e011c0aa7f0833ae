// CUDA attention entry points: argument checks, the decode split plan, dispatch to the per-head-dim kernels
// (attention_cuda_d*.cu) and the kernel that merges the decode splits.
#include <cuda_runtime.h>

#include "attention/attention.h"
#include "attention/attention_cuda.cuh"

namespace oe {
namespace attn_cuda {
namespace {

__device__ __forceinline__ void store_out(float* p, float x) { *p = x; }
__device__ __forceinline__ void store_out(__half* p, float x) { *p = __float2half_rn(x); }
__device__ __forceinline__ void store_out(__nv_bfloat16* p, float x) { *p = __float2bfloat16_rn(x); }

// out[b, h] = sum_s 2^(m_s - M) o_s / sum_s 2^(m_s - M) l_s over the splits with l_s > 0, M = max m_s.
// Grid (Hq, B).
template <typename T>
__global__ void __launch_bounds__(kThreads) combine_kernel(const float* part_o, const float* part_ml, T* out, int Hq,
                                                           int D, int num_splits) {
  const int64_t bh = static_cast<int64_t>(blockIdx.y) * Hq + blockIdx.x;
  const float* ml = part_ml + bh * num_splits * 2;
  float mmax = -INFINITY;
  for (int s = 0; s < num_splits; ++s)
    if (ml[2 * s + 1] > 0.0f) mmax = fmaxf(mmax, ml[2 * s]);
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float o = 0.0f, lsum = 0.0f;
    if (mmax != -INFINITY) {
      for (int s = 0; s < num_splits; ++s) {
        if (!(ml[2 * s + 1] > 0.0f)) continue;
        const float w = exp2f(ml[2 * s] - mmax);
        lsum += w * ml[2 * s + 1];
        o += w * part_o[(bh * num_splits + s) * D + d];
      }
    }
    store_out(out + bh * D + d, lsum > 0.0f ? o / lsum : 0.0f);
  }
}

oe_status cuda_error(cudaError_t e, const char* what) {
  return fail(OE_ERR_CUDA, "%s: %s", what, cudaGetErrorString(e));
}

bool aligned16(const void* a, const void* b, const void* c, const void* d) {
  return ((reinterpret_cast<uintptr_t>(a) | reinterpret_cast<uintptr_t>(b) | reinterpret_cast<uintptr_t>(c) |
           reinterpret_cast<uintptr_t>(d)) & 15u) == 0;
}

template <typename T>
cudaError_t tiled_for(const TiledParams& p, bool aligned, int64_t max_rows, int num_seq, cudaStream_t st) {
  if (aligned && p.D == 64) return launch_tiled<T, 64, true>(p, max_rows, num_seq, st);
  if (aligned && p.D == 80) return launch_tiled<T, 80, true>(p, max_rows, num_seq, st);
  if (aligned && p.D == 128) return launch_tiled<T, 128, true>(p, max_rows, num_seq, st);
  return launch_tiled<T, 256, false>(p, max_rows, num_seq, st);
}

cudaError_t tiled(const TiledParams& p, int dtype, bool aligned, int64_t max_rows, int num_seq, cudaStream_t st) {
  switch (dtype) {
    case OE_F32: return tiled_for<float>(p, aligned, max_rows, num_seq, st);
    case OE_F16: return tiled_for<__half>(p, aligned, max_rows, num_seq, st);
    default: return tiled_for<__nv_bfloat16>(p, aligned, max_rows, num_seq, st);
  }
}

template <typename T>
cudaError_t decode_for(const DecodeParams& p, bool aligned, int B, cudaStream_t st) {
  cudaError_t e;
  if (aligned && p.D == 64) e = launch_decode<T, 64, true>(p, B, st);
  else if (aligned && p.D == 80) e = launch_decode<T, 80, true>(p, B, st);
  else if (aligned && p.D == 128) e = launch_decode<T, 128, true>(p, B, st);
  else e = launch_decode<T, 256, false>(p, B, st);
  if (e != cudaSuccess || p.num_splits == 1) return e;
  combine_kernel<T><<<dim3(static_cast<unsigned>(p.Hq), static_cast<unsigned>(B)), kThreads, 0, st>>>(
      p.part_o, p.part_ml, static_cast<T*>(p.o), p.Hq, p.D, p.num_splits);
  return cudaGetLastError();
}

constexpr int64_t kMaxGrid = 65535;  // grid y and z limits

oe_status check_dims(int dtype, int64_t Hq, int64_t Hkv, int64_t D) {
  OE_CHECK(dtype_valid(dtype), OE_ERR_INVALID_ARG, "attention: dtype code %d is not one of 0 (f32), 1 (f16), 2 (bf16)",
           dtype);
  OE_CHECK(D >= 1 && D <= OE_ATTN_MAX_HEAD_DIM, OE_ERR_INVALID_ARG, "attention: head_dim must be in [1, %d], got %lld",
           OE_ATTN_MAX_HEAD_DIM, static_cast<long long>(D));
  OE_CHECK(Hq >= 1 && Hkv >= 1 && Hq % Hkv == 0 && Hq <= kMaxGrid, OE_ERR_INVALID_ARG,
           "attention: query heads (%lld) must be a multiple of kv heads (%lld) and at most %lld",
           static_cast<long long>(Hq), static_cast<long long>(Hkv), static_cast<long long>(kMaxGrid));
  return OE_OK;
}

int64_t decode_groups(int64_t Hq, int64_t Hkv) { return (Hq / Hkv + kMaxGroup - 1) / kMaxGroup; }

}  // namespace
}  // namespace attn_cuda
}  // namespace oe

using namespace oe;
using namespace oe::attn_cuda;

extern "C" oe_status oe_attention_decode_cuda_plan(int64_t B, int64_t Hq, int64_t Hkv, int64_t S, int64_t D,
                                                   int device, int64_t requested, int64_t* num_splits,
                                                   int64_t* workspace_bytes) {
  oe_status st = check_dims(OE_F32, Hq, Hkv, D);
  if (st != OE_OK) return st;
  OE_CHECK(num_splits && workspace_bytes, OE_ERR_INVALID_ARG, "attention_decode_cuda_plan: null output pointer");
  OE_CHECK(requested >= 0 && requested <= 1024, OE_ERR_INVALID_ARG,
           "attention_decode: num_splits must be in [0, 1024], got %lld", static_cast<long long>(requested));
  int64_t splits = requested;
  if (splits == 0) {
    int sms = 0;
    cudaError_t e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
    if (e != cudaSuccess) return cuda_error(e, "cudaDeviceGetAttribute(multiProcessorCount)");
    // Two blocks per multiprocessor, but no split shorter than 256 keys of the cache capacity.
    const int64_t base = B * Hkv * decode_groups(Hq, Hkv);
    const int64_t target = 2 * static_cast<int64_t>(sms);
    splits = base <= 0 || base >= target ? 1 : (target + base - 1) / base;
    const int64_t cap = (S + 255) / 256;
    if (splits > cap) splits = cap;
    if (splits < 1) splits = 1;
  }
  *num_splits = splits;
  *workspace_bytes = splits > 1 ? B * Hq * splits * (D + 2) * 4 : 0;
  return OE_OK;
}

extern "C" oe_status oe_attention_decode_cuda(const void* q, const void* k_cache, const void* v_cache, void* out,
                                              int64_t B, int64_t Hq, int64_t Hkv, int64_t S, int64_t D,
                                              const int32_t* lengths, float scale, int dtype, int64_t num_splits,
                                              void* workspace, int64_t workspace_bytes, uintptr_t stream) {
  oe_status st = check_dims(dtype, Hq, Hkv, D);
  if (st != OE_OK) return st;
  OE_CHECK(B >= 0 && B <= kMaxGrid, OE_ERR_INVALID_ARG, "attention_decode: batch must be in [0, %lld], got %lld",
           static_cast<long long>(kMaxGrid), static_cast<long long>(B));
  OE_CHECK(S >= 0 && S < (int64_t{1} << 31), OE_ERR_INVALID_ARG, "attention_decode: bad cache capacity %lld",
           static_cast<long long>(S));
  OE_CHECK(num_splits >= 1 && num_splits <= 1024, OE_ERR_INVALID_ARG,
           "attention_decode: num_splits must be in [1, 1024], got %lld", static_cast<long long>(num_splits));
  const int64_t groups = decode_groups(Hq, Hkv);
  OE_CHECK(Hkv * groups <= kMaxGrid, OE_ERR_INVALID_ARG, "attention_decode: too many kv heads (%lld)",
           static_cast<long long>(Hkv));
  if (B == 0) return OE_OK;
  OE_CHECK(q && k_cache && v_cache && out && lengths, OE_ERR_INVALID_ARG, "attention_decode: null pointer");
  const int64_t need = num_splits > 1 ? B * Hq * num_splits * (D + 2) * 4 : 0;
  OE_CHECK(workspace_bytes >= need && (need == 0 || workspace), OE_ERR_INVALID_ARG,
           "attention_decode: workspace of %lld bytes is smaller than the %lld needed", 
           static_cast<long long>(workspace_bytes), static_cast<long long>(need));

  DecodeParams p;
  p.q = q;
  p.k = k_cache;
  p.v = v_cache;
  p.o = out;
  p.part_o = static_cast<float*>(workspace);
  p.part_ml = num_splits > 1 ? p.part_o + B * Hq * num_splits * D : nullptr;
  p.lengths = lengths;
  p.Hq = static_cast<int>(Hq);
  p.Hkv = static_cast<int>(Hkv);
  p.D = static_cast<int>(D);
  p.groups = static_cast<int>(groups);
  p.S = S;
  p.num_splits = static_cast<int>(num_splits);
  p.scale_log2 = scale * kLog2e;
  const bool al = aligned16(q, k_cache, v_cache, out);
  const cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  cudaError_t e;
  switch (dtype) {
    case OE_F32: e = decode_for<float>(p, al, static_cast<int>(B), s); break;
    case OE_F16: e = decode_for<__half>(p, al, static_cast<int>(B), s); break;
    default: e = decode_for<__nv_bfloat16>(p, al, static_cast<int>(B), s); break;
  }
  return e == cudaSuccess ? OE_OK : cuda_error(e, "attention_decode launch");
}

extern "C" oe_status oe_attention_prefill_cuda(const void* q, const void* k_cache, const void* v_cache, void* out,
                                               int64_t B, int64_t T, int64_t Hq, int64_t Hkv, int64_t S, int64_t D,
                                               int64_t start, const int32_t* lengths, float scale, int dtype,
                                               uintptr_t stream) {
  oe_status st = check_dims(dtype, Hq, Hkv, D);
  if (st != OE_OK) return st;
  OE_CHECK(B >= 0 && B <= kMaxGrid, OE_ERR_INVALID_ARG, "attention_prefill: batch must be in [0, %lld], got %lld",
           static_cast<long long>(kMaxGrid), static_cast<long long>(B));
  OE_CHECK(T >= 0 && S >= 0 && S < (int64_t{1} << 31), OE_ERR_INVALID_ARG, "attention_prefill: bad sizes T=%lld S=%lld",
           static_cast<long long>(T), static_cast<long long>(S));
  OE_CHECK(start >= 0 && start + T <= S, OE_ERR_OUT_OF_RANGE,
           "attention_prefill: positions %lld..%lld exceed the cache capacity %lld", static_cast<long long>(start),
           static_cast<long long>(start + T - 1), static_cast<long long>(S));
  if (B == 0 || T == 0) return OE_OK;
  OE_CHECK(q && k_cache && v_cache && out, OE_ERR_INVALID_ARG, "attention_prefill: null pointer");
  TiledParams p;
  p.q = q;
  p.k = k_cache;
  p.v = v_cache;
  p.o = out;
  p.q_seq_stride = T * Hq * D;
  p.q_row_stride = Hq * D;
  p.kv_seq_stride = Hkv * S * D;
  p.kv_head_stride = S * D;
  p.kv_row_stride = D;
  p.Hq = static_cast<int>(Hq);
  p.Hkv = static_cast<int>(Hkv);
  p.D = static_cast<int>(D);
  p.T = T;
  p.cu = nullptr;
  p.n_rows = T;
  p.lengths = lengths;
  p.start = start;
  p.S = S;
  p.causal = 1;
  p.scale_log2 = scale * kLog2e;
  cudaError_t e = tiled(p, dtype, aligned16(q, k_cache, v_cache, out), T, static_cast<int>(B),
                        reinterpret_cast<cudaStream_t>(stream));
  return e == cudaSuccess ? OE_OK : cuda_error(e, "attention_prefill launch");
}

extern "C" oe_status oe_attention_varlen_cuda(const void* q, const void* k, const void* v, void* out, int64_t N,
                                              int64_t H, int64_t D, const int32_t* cu_seqlens, int64_t num_segments,
                                              int64_t max_seqlen, float scale, int dtype, uintptr_t stream) {
  oe_status st = check_dims(dtype, H, H, D);
  if (st != OE_OK) return st;
  OE_CHECK(N >= 0 && N < (int64_t{1} << 31) && max_seqlen >= 0 && max_seqlen <= N, OE_ERR_INVALID_ARG,
           "attention_varlen: bad sizes N=%lld max_seqlen=%lld", static_cast<long long>(N),
           static_cast<long long>(max_seqlen));
  OE_CHECK(num_segments >= 0 && num_segments <= kMaxGrid, OE_ERR_INVALID_ARG,
           "attention_varlen: segment count must be in [0, %lld], got %lld", static_cast<long long>(kMaxGrid),
           static_cast<long long>(num_segments));
  if (N == 0 || num_segments == 0 || max_seqlen == 0) return OE_OK;
  OE_CHECK(q && k && v && out && cu_seqlens, OE_ERR_INVALID_ARG, "attention_varlen: null pointer");
  TiledParams p;
  p.q = q;
  p.k = k;
  p.v = v;
  p.o = out;
  p.q_seq_stride = 0;
  p.q_row_stride = H * D;
  p.kv_seq_stride = 0;
  p.kv_head_stride = D;
  p.kv_row_stride = H * D;
  p.Hq = static_cast<int>(H);
  p.Hkv = static_cast<int>(H);
  p.D = static_cast<int>(D);
  p.T = 0;
  p.cu = cu_seqlens;
  p.n_rows = N;
  p.lengths = nullptr;
  p.start = 0;
  p.S = N;
  p.causal = 0;
  p.scale_log2 = scale * kLog2e;
  cudaError_t e = tiled(p, dtype, aligned16(q, k, v, out), max_seqlen, static_cast<int>(num_segments),
                        reinterpret_cast<cudaStream_t>(stream));
  return e == cudaSuccess ? OE_OK : cuda_error(e, "attention_varlen launch");
}
