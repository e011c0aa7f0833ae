// What the CUDA side of this build can do. Compiled in every build: without CUDA the functions say so.
#pragma once
#include "common/oe.h"

namespace oe {

bool cuda_compiled();
const char* cuda_archs();  // e.g. "80;86;87;89;90", "" without CUDA
// Number of usable GPUs; 0 when there is no driver or no device (never an error for that).
int cuda_device_count();
// Name and compute capability of `device`; returns false if it cannot be queried.
bool cuda_device_info(int device, char* name, int name_len, int* major, int* minor);
// Block the host until all work on `stream` (a cudaStream_t as an integer) is done.
oe_status cuda_stream_sync(uintptr_t stream);

}  // namespace oe
