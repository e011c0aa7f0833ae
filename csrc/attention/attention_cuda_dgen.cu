// CUDA attention kernels for any head dim up to 256 (scalar loads, run-time D): head dims without a
// specialisation and unaligned tensors.
#include "attention/attention_cuda_kernels.cuh"

namespace oe {
namespace attn_cuda {
OE_ATTN_INSTANTIATE(256, false)
}  // namespace attn_cuda
}  // namespace oe
