// CUDA attention kernels for head dim 128 (vector loads; the launcher checks alignment).
#include "attention/attention_cuda_kernels.cuh"

namespace oe {
namespace attn_cuda {
OE_ATTN_INSTANTIATE(128, true)
}  // namespace attn_cuda
}  // namespace oe
