// q4::parallel_chunks, the name the q4 and dense GEMV drivers use: the shared CPU pool (csrc/common/pool.h).
#include "common/pool.h"
#include "q4/q4.h"

namespace oe {
namespace q4 {

void parallel_chunks(int64_t chunks, ChunkFn fn, void* ctx) { oe::parallel_chunks(chunks, fn, ctx, 0); }

}  // namespace q4
}  // namespace oe
