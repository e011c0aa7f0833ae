// The CUDA entry points of a build without CUDA kernels: they say so.
#if !defined(OE_WITH_CUDA)
#include "rvq/rvq.h"

namespace {
oe_status no_cuda() { return oe::fail(OE_ERR_UNSUPPORTED, "this build has no CUDA rvq kernels"); }
}  // namespace

extern "C" oe_status oe_rvq_decode_cuda(const void*, int, int64_t, const oe_rvq_books*, float*, int32_t*, uintptr_t) {
  return no_cuda();
}
extern "C" oe_status oe_rvq_encode_cuda_workspace(int64_t, const oe_rvq_books*, int64_t*) { return no_cuda(); }
extern "C" oe_status oe_rvq_encode_cuda(const float*, int64_t, const oe_rvq_books*, int64_t*, void*, int64_t,
                                        uintptr_t) {
  return no_cuda();
}
#endif
