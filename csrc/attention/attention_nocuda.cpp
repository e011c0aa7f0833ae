// The CUDA entry points of a build without CUDA kernels: they say so.
#if !defined(OE_WITH_CUDA)
#include "attention/attention.h"

namespace {
oe_status no_cuda() { return oe::fail(OE_ERR_UNSUPPORTED, "this build has no CUDA attention kernels"); }
}  // namespace

extern "C" oe_status oe_attention_decode_cuda_plan(int64_t, int64_t, int64_t, int64_t, int64_t, int, int64_t,
                                                   int64_t*, int64_t*) {
  return no_cuda();
}
extern "C" oe_status oe_attention_decode_cuda(const void*, const void*, const void*, void*, int64_t, int64_t,
                                              int64_t, int64_t, int64_t, const int32_t*, float, int, int64_t, void*,
                                              int64_t, uintptr_t) {
  return no_cuda();
}
extern "C" oe_status oe_attention_prefill_cuda(const void*, const void*, const void*, void*, int64_t, int64_t,
                                               int64_t, int64_t, int64_t, int64_t, int64_t, const int32_t*, float,
                                               int, uintptr_t) {
  return no_cuda();
}
extern "C" oe_status oe_attention_varlen_cuda(const void*, const void*, const void*, void*, int64_t, int64_t,
                                              int64_t, const int32_t*, int64_t, int64_t, float, int, uintptr_t) {
  return no_cuda();
}
#endif
