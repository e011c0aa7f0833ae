// Runtime CPU instruction-set detection and the dispatch level every CPU kernel family follows.
#pragma once
#include "common/pool.h"  // num_threads(): the CPU thread pool every kernel family shares

namespace oe {

// Ordered: a higher level implies the lower ones are usable on this CPU.
enum class Isa : int { Scalar = 0, Neon = 1, Avx2 = 2, Avx512 = 3 };

struct CpuFeatures {
  bool avx2 = false, fma = false, f16c = false;
  bool avx512f = false, avx512bw = false, avx512vl = false, avx512dq = false;
  bool avx512vnni = false, avx512bf16 = false;
  bool neon = false;
};

const CpuFeatures& cpu_features();

// The best level this CPU and this build support.
Isa isa_available();
// The level kernels use: isa_available(), capped by isa_set_cap() (the Python runtime applies its
// OMNI_EDGE_ISA switch through it when the library loads; tests use it to exercise every path).
Isa isa_active();
void isa_set_cap(Isa cap);
const char* isa_name(Isa isa);

}  // namespace oe
