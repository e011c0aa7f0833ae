#include "common/oe.h"

#include <cstdarg>
#include <cstdio>

namespace {
thread_local char g_last_error[512] = "";
}

extern "C" const char* oe_last_error(void) { return g_last_error; }

namespace oe {
oe_status fail(oe_status status, const char* fmt, ...) {
  va_list args;
  va_start(args, fmt);
  std::vsnprintf(g_last_error, sizeof(g_last_error), fmt, args);
  va_end(args);
  return status;
}
}  // namespace oe
