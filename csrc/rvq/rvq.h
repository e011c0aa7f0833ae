// Residual vector quantisation (the audio tokenizer's 8-layer RVQ, MODEL.md 1.4 / 1.7).
//
// Codebooks: layer l is a row-major (sizes[l], dim) matrix of `dtype` elements (fp32, bf16 or fp16), each
// layer its own allocation (a pointer table, so the checkpoint's tensors are used in place). Baichuan-Omni-1.5:
// 8 layers of 8192, 4096, 2048, 1024 x 5 rows, dim 5120, fp32.
//
// decode: out[t, :] = sum over l = 0, 1, ... of codebook[l][codes[t, l], :], accumulated in fp32 in layer
//         order (out starts at 0). codes (T, L) int64 or int32; out (T, dim) fp32.
//         Every code is checked against its layer's size BEFORE any codebook row is read: a code outside
//         [0, sizes[l]) fails with OE_ERR_OUT_OF_RANGE (CPU), or (CUDA) sets *error_flag = 1 + t * L + l of
//         some bad code and writes NaN to that frame's output, never reading out of bounds.
// encode: greedy residual search in fp32. r = x; for each layer l: codes[t, l] = argmin_i dist(r_t, c_i),
//         then r_t = r_t - c_{codes[t, l]} (fp32). x (T, dim) fp32; codes (T, L) int64.
//         dist(r, c) = sum_d (r_d - c_d)^2 evaluated in float64 from the fp32 values (for fp32 data this is the
//         exact distance up to ~dim * 2^-53 relative, far finer than fp32 resolution); ties go to the lowest
//         index, like torch.argmin. The fast paths screen all rows with the fp32 expanded form
//         s_i = ||c_i||^2 - 2 r.c_i and a rigorous bound E_i on its rounding error (from the summation
//         length, ||r|| ||c_i|| and the fp32 roundings), keep every row with s_i - E_i <= min_j (s_j + E_j)
//         (the true minimiser always passes) and re-evaluate those exactly, so the decision is the exact
//         argmin whatever the screen's rounding. norms2[l] (optional, fp32 per row) must hold ||c_i||^2
//         correctly rounded (within one fp32 ulp); without them the kernels compute them.
//         x and the codebooks must be finite (x is checked; the Python Codebooks object checks the books).
#pragma once
#include <cstdint>

#include "common/oe.h"

#define OE_RVQ_MAX_LAYERS 16

extern "C" {

typedef struct oe_rvq_books {
  int32_t num_layers;
  int32_t dtype;                            // oe_dtype of every layer
  int64_t dim;
  const void* data[OE_RVQ_MAX_LAYERS];      // layer l: (sizes[l], dim)
  int64_t sizes[OE_RVQ_MAX_LAYERS];
  const float* norms2[OE_RVQ_MAX_LAYERS];   // optional: ||c_i||^2 of layer l, (sizes[l],) fp32
} oe_rvq_books;

// ---- CPU (host pointers) ------------------------------------------------------------------------------
oe_status oe_rvq_decode_cpu(const void* codes, int codes_int64, int64_t T, const oe_rvq_books* books, float* out);
oe_status oe_rvq_encode_cpu(const float* x, int64_t T, const oe_rvq_books* books, int64_t* codes);
// Scalar references: plain loops; encode evaluates every row's exact distance (no screening).
oe_status oe_rvq_decode_ref(const void* codes, int codes_int64, int64_t T, const oe_rvq_books* books, float* out);
oe_status oe_rvq_encode_ref(const float* x, int64_t T, const oe_rvq_books* books, int64_t* codes);

// ---- CUDA (device pointers; `books` itself is a host struct passed by value to the kernels) -------------
// error_flag: optional device int32, set to 1 + t * L + l when codes[t, l] is out of range (else untouched).
oe_status oe_rvq_decode_cuda(const void* codes, int codes_int64, int64_t T, const oe_rvq_books* books, float* out,
                             int32_t* error_flag, uintptr_t stream);
// Bytes of device workspace oe_rvq_encode_cuda needs for T frames.
oe_status oe_rvq_encode_cuda_workspace(int64_t T, const oe_rvq_books* books, int64_t* bytes);
oe_status oe_rvq_encode_cuda(const float* x, int64_t T, const oe_rvq_books* books, int64_t* codes, void* workspace,
                             int64_t workspace_bytes, uintptr_t stream);

}  // extern "C"
