// CUDA attention kernels for head dim 64 (vector loads; the launcher checks alignment).
#include "attention/attention_cuda_kernels.cuh"

namespace oe {
namespace attn_cuda {
OE_ATTN_INSTANTIATE(64, true)
}  // namespace attn_cuda
}  // namespace oe
