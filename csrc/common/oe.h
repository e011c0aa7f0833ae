// omni-edge kernel ABI: shared by every kernel family.
//
// Kernels take raw pointers, sizes, strides and a dtype code, write into caller-owned outputs and
// return an oe_status. On failure they leave a human-readable message in a thread-local buffer that
// oe_last_error() returns (the binding turns it into a Python exception). Nothing here includes torch
// or Python.
#pragma once
#include <cstddef>
#include <cstdint>

extern "C" {

typedef enum oe_status {
  OE_OK = 0,
  OE_ERR_INVALID_ARG = 1,   // a size, stride or pointer is unusable
  OE_ERR_OUT_OF_RANGE = 2,  // user data (a code, an index, a length) is outside its allowed range
  OE_ERR_UNSUPPORTED = 3,   // valid request this build or device cannot serve
  OE_ERR_CUDA = 4,          // a CUDA runtime call failed
  OE_ERR_NO_MEMORY = 5,     // a host allocation failed
} oe_status;

// Element types of activations and outputs. Values are part of the ABI.
typedef enum oe_dtype {
  OE_F32 = 0,
  OE_F16 = 1,
  OE_BF16 = 2,
} oe_dtype;

const char* oe_last_error(void);

}  // extern "C"

namespace oe {

// Record a printf-style message for oe_last_error() and return `status`.
oe_status fail(oe_status status, const char* fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;

inline size_t dtype_size(oe_dtype t) { return t == OE_F32 ? 4 : 2; }
inline bool dtype_valid(int t) { return t == OE_F32 || t == OE_F16 || t == OE_BF16; }

}  // namespace oe

#define OE_CHECK(cond, status, ...) \
  do {                              \
    if (!(cond)) return ::oe::fail((status), __VA_ARGS__); \
  } while (0)
