#include "common/cpu_features.h"

#include <cstdlib>
#include <cstring>

namespace oe {
namespace {

CpuFeatures detect() {
  CpuFeatures f;
#if defined(OE_ARCH_X86) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  f.avx2 = __builtin_cpu_supports("avx2");
  f.fma = __builtin_cpu_supports("fma");
  f.f16c = __builtin_cpu_supports("f16c");
  f.avx512f = __builtin_cpu_supports("avx512f");
  f.avx512bw = __builtin_cpu_supports("avx512bw");
  f.avx512vl = __builtin_cpu_supports("avx512vl");
  f.avx512dq = __builtin_cpu_supports("avx512dq");
  f.avx512vnni = __builtin_cpu_supports("avx512vnni");
  f.avx512bf16 = __builtin_cpu_supports("avx512bf16");
#elif defined(OE_ARCH_ARM64)
  f.neon = true;  // Advanced SIMD is mandatory on AArch64
#endif
  return f;
}

Isa detect_level(const CpuFeatures& f) {
  // The AVX-512 kernels are compiled with F/BW/VL/DQ/VNNI/BF16 enabled; require all of them.
  if (f.avx512f && f.avx512bw && f.avx512vl && f.avx512dq && f.avx512vnni && f.avx512bf16 && f.fma && f.f16c)
    return Isa::Avx512;
  if (f.avx2 && f.fma && f.f16c) return Isa::Avx2;
  if (f.neon) return Isa::Neon;
  return Isa::Scalar;
}

// No cap until the host sets one: the runtime switch OMNI_EDGE_ISA is read once, in Python
// (omni_edge/knobs.py), and applied through isa_set_cap() when the library is loaded.
Isa g_cap = Isa::Avx512;

}  // namespace

const CpuFeatures& cpu_features() {
  static const CpuFeatures f = detect();
  return f;
}

Isa isa_available() {
  static const Isa level = detect_level(cpu_features());
  return level;
}

Isa isa_active() {
  const Isa a = isa_available();
  return static_cast<int>(g_cap) < static_cast<int>(a) ? g_cap : a;
}

void isa_set_cap(Isa cap) { g_cap = cap; }

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Scalar: return "scalar";
    case Isa::Neon: return "neon";
    case Isa::Avx2: return "avx2";
    case Isa::Avx512: return "avx512";
  }
  return "?";
}

}  // namespace oe
