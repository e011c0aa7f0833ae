// CUDA attention kernels for head dim 80 (vector loads; the launcher checks alignment).
#include "attention/attention_cuda_kernels.cuh"

namespace oe {
namespace attn_cuda {
OE_ATTN_INSTANTIATE(80, true)
}  // namespace attn_cuda
}  // namespace oe
