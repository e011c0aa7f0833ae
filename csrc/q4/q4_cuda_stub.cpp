// Builds without CUDA: the q4 CUDA entry points exist and say that this build has no CUDA kernels.
#include "q4/q4.h"

#if !defined(OE_WITH_CUDA)
extern "C" size_t oe_q4_cuda_workspace_bytes(int64_t M, int64_t Kp) {
  return M > 0 && Kp > 0 ? static_cast<size_t>(M) * static_cast<size_t>(Kp) * sizeof(float) : 0;
}

extern "C" oe_status oe_q4_matmul_cuda(const oe_q4_weight*, const void*, int, int64_t, void*, int, void*, size_t,
                                       uintptr_t) {
  return oe::fail(OE_ERR_UNSUPPORTED, "q4: this build has no CUDA kernels");
}
#endif
