#include "common/cuda_info.h"

#include <cstring>

#if defined(OE_WITH_CUDA)
#include <cuda_runtime.h>
#endif

namespace oe {

#if defined(OE_WITH_CUDA)
bool cuda_compiled() { return true; }
const char* cuda_archs() { return OE_CUDA_ARCHS_STR; }

int cuda_device_count() {
  int n = 0;
  // cudart loads without a driver and answers cudaErrorInsufficientDriver / NoDevice: both mean "no GPU".
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky error
    return 0;
  }
  return n;
}

bool cuda_device_info(int device, char* name, int name_len, int* major, int* minor) {
  cudaDeviceProp prop;
  if (cudaGetDeviceProperties(&prop, device) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  std::strncpy(name, prop.name, name_len - 1);
  name[name_len - 1] = 0;
  *major = prop.major;
  *minor = prop.minor;
  return true;
}

oe_status cuda_stream_sync(uintptr_t stream) {
  cudaError_t e = cudaStreamSynchronize(reinterpret_cast<cudaStream_t>(stream));
  if (e != cudaSuccess) return fail(OE_ERR_CUDA, "cudaStreamSynchronize: %s", cudaGetErrorString(e));
  return OE_OK;
}
#else
bool cuda_compiled() { return false; }
const char* cuda_archs() { return ""; }
int cuda_device_count() { return 0; }
bool cuda_device_info(int, char*, int, int*, int*) { return false; }
oe_status cuda_stream_sync(uintptr_t) { return fail(OE_ERR_UNSUPPORTED, "this build has no CUDA kernels"); }
#endif

}  // namespace oe
