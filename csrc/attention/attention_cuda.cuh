// CUDA attention: parameter blocks and launcher declarations. The kernels are in attention_cuda_kernels.cuh,
// instantiated once per head-dim group in attention_cuda_d{64,80,128,gen}.cu (so the groups compile in
// parallel and nothing is compiled twice); the C entry points and the split combine are attention_cuda.cu.
// Template parameters: T = element type (float, __half, __nv_bfloat16); DH = head-dim capacity (64, 80, 128,
// or 256 for the generic kernels with a run-time D); VEC = 4-element vector loads.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace oe {
namespace attn_cuda {

constexpr float kLog2e = 1.4426950408889634f;
constexpr int kThreads = 128;

// ---- prefill / varlen ------------------------------------------------------------------------------

struct TiledParams {
  const void* q;
  const void* k;
  const void* v;
  void* o;
  int64_t q_seq_stride, q_row_stride;                    // q and o; head stride is D
  int64_t kv_seq_stride, kv_head_stride, kv_row_stride;  // k and v
  int Hq, Hkv, D;
  int64_t T;                 // prefill: rows per sequence (cu == nullptr)
  const int32_t* cu;         // varlen: segment offsets (num_seq + 1 values), rows of q, k and v alike
  int64_t n_rows;            // varlen: total rows (bounds for cu values)
  const int32_t* lengths;    // prefill: valid positions per sequence, or null
  int64_t start, S;
  int causal;
  float scale_log2;          // scale * log2(e)
};

// ---- decode ----------------------------------------------------------------------------------------

constexpr int kMaxGroup = 8;  // query heads per block (heads sharing one kv head)

struct DecodeParams {
  const void* q;        // (B, Hq, D)
  const void* k;        // (B, Hkv, S, D)
  const void* v;
  void* o;              // (B, Hq, D), written when num_splits == 1
  float* part_o;        // (B, Hq, num_splits, D) unnormalised outputs, when num_splits > 1
  float* part_ml;       // (B, Hq, num_splits, 2) running max (log2 domain) and sum
  const int32_t* lengths;
  int Hq, Hkv, D, groups;  // groups = ceil((Hq / Hkv) / kMaxGroup)
  int64_t S;
  int num_splits;
  float scale_log2;
};

// Launch the prefill / varlen kernel over grid (ceil(max_rows / 32), Hq, num_seq).
template <typename T, int DH, bool VEC>
cudaError_t launch_tiled(const TiledParams& p, int64_t max_rows, int num_seq, cudaStream_t stream);
// Launch the split decode kernel over grid (num_splits, Hkv * groups, B); with num_splits > 1 it writes the
// partial states, which the caller then merges (attention_cuda.cu).
template <typename T, int DH, bool VEC>
cudaError_t launch_decode(const DecodeParams& p, int B, cudaStream_t stream);

}  // namespace attn_cuda
}  // namespace oe
