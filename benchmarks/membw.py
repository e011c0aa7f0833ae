"""DRAM read bandwidth of this machine, measured with a read kernel no runtime can beat.

A small C kernel, compiled on the fly with the system C compiler (gcc or cc) for the build machine's vector
ISA, reads several arrays concurrently (each several times the last-level cache; several streams keep more
DRAM pages open than one, which is what a GEMV over many weight rows does) with 256-bit (or 512-bit) aligned
loads, all threads at once, each thread reading its own slice of every array. The arrays are allocated
2 MiB-aligned and advised MADV_HUGEPAGE before the first touch (transparent huge pages in `madvise` mode are
the usual setting; without them a read costs a TLB walk every 4 KiB), and the best of `reps` passes is
reported: the ceiling a decode step can be judged against.

    python benchmarks/membw.py [--threads N] [--streams 4] [--mb-per-stream 256] [--reps 7]

Used by bench_backbone.py and bench_q4.py; falls back to None (callers then print a torch figure) when no C
compiler is present.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

_SRC = r"""
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <omp.h>

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

/* Reads `streams` arrays of `bytes` each (already allocated and touched) with `threads` threads, `reps`
   passes; returns the best GB/s. Each thread reads the same slice of every array, interleaved 128 bytes at
   a time, so every thread keeps `streams` sequential streams in flight. */
double oe_read_bw(char** arrays, int streams, size_t bytes, int threads, int reps) {
  double best = 0.0;
  volatile int sink = 0;
  for (int r = 0; r < reps; ++r) {
    int acc_all = 0;
    double t0 = now();
#pragma omp parallel num_threads(threads) reduction(^ : acc_all)
    {
      const int id = omp_get_thread_num(), nt = omp_get_num_threads();
      const size_t per = (bytes / nt) & ~(size_t)127;
      const size_t lo = id * per, hi = id == nt - 1 ? (bytes & ~(size_t)127) : lo + per;
#if defined(__AVX512F__)
      __m512i a0 = _mm512_setzero_si512(), a1 = a0;
      for (size_t i = lo; i < hi; i += 128)
        for (int s = 0; s < streams; ++s) {
          const char* p = arrays[s] + i;
          a0 = _mm512_xor_si512(a0, _mm512_load_si512((const void*)p));
          a1 = _mm512_xor_si512(a1, _mm512_load_si512((const void*)(p + 64)));
        }
      acc_all ^= _mm_cvtsi128_si32(_mm512_castsi512_si128(_mm512_xor_si512(a0, a1)));
#else
      __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
      for (size_t i = lo; i < hi; i += 128)
        for (int s = 0; s < streams; ++s) {
          const char* p = arrays[s] + i;
          a0 = _mm256_xor_si256(a0, _mm256_load_si256((const __m256i*)p));
          a1 = _mm256_xor_si256(a1, _mm256_load_si256((const __m256i*)(p + 32)));
          a2 = _mm256_xor_si256(a2, _mm256_load_si256((const __m256i*)(p + 64)));
          a3 = _mm256_xor_si256(a3, _mm256_load_si256((const __m256i*)(p + 96)));
        }
      acc_all ^= _mm_cvtsi128_si32(_mm256_castsi256_si128(
          _mm256_xor_si256(_mm256_xor_si256(a0, a1), _mm256_xor_si256(a2, a3))));
#endif
    }
    const double t = now() - t0;
    sink ^= acc_all;
    const double gbs = (double)streams * (double)(bytes & ~(size_t)127) / t / 1e9;
    if (gbs > best) best = gbs;
  }
  return best;
}

/* 2 MiB-aligned, advised MADV_HUGEPAGE before the first touch, filled (so every page is backed). */
char* oe_alloc_touched(size_t bytes, int fill) {
  void* p = NULL;
  if (posix_memalign(&p, 2u << 20, bytes) != 0) return NULL;
#ifdef MADV_HUGEPAGE
  madvise(p, bytes, MADV_HUGEPAGE);
#endif
  memset(p, fill, bytes);
  return (char*)p;
}

void oe_free(char* p) { free(p); }
"""


def _compiler() -> str | None:
    for cc in (os.environ.get("CC"), "gcc", "cc", "clang"):
        if cc and shutil.which(cc):
            return cc
    return None


def _isa_flags() -> list[str]:
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    return ["-mavx512f"] if " avx512f" in flags else ["-mavx2"] if " avx2" in flags else []


def _build() -> ctypes.CDLL | None:
    cc = _compiler()
    isa = _isa_flags()
    if cc is None or not isa:
        return None
    tag = hashlib.sha1((_SRC + cc + " ".join(isa)).encode()).hexdigest()[:12]
    out = Path(tempfile.gettempdir()) / f"omni_edge_membw_{tag}.so"
    if not out.exists():
        src = out.with_suffix(".c")
        src.write_text(_SRC)
        tmp = out.with_suffix(f".{os.getpid()}.so")
        r = subprocess.run([cc, "-O2", "-shared", "-fPIC", "-fopenmp", *isa, str(src), "-o", str(tmp)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            print(f"membw: {cc} failed: {r.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
            return None
        os.replace(tmp, out)
    lib = ctypes.CDLL(str(out))
    lib.oe_read_bw.restype = ctypes.c_double
    lib.oe_read_bw.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_int, ctypes.c_size_t, ctypes.c_int,
                               ctypes.c_int]
    lib.oe_alloc_touched.restype = ctypes.c_void_p
    lib.oe_alloc_touched.argtypes = [ctypes.c_size_t, ctypes.c_int]
    lib.oe_free.argtypes = [ctypes.c_void_p]
    return lib


def read_bandwidth(threads: int, streams: int = 4, mb_per_stream: int = 256, reps: int = 7) -> float | None:
    """Best-of-`reps` DRAM read GB/s with `threads` threads over `streams` arrays of `mb_per_stream` MiB."""
    lib = _build()
    if lib is None:
        return None
    nbytes = mb_per_stream << 20
    ptrs = []
    try:
        for s in range(streams):
            p = lib.oe_alloc_touched(nbytes, s + 1)
            if not p:
                return None
            ptrs.append(p)
        arr = (ctypes.c_void_p * streams)(*ptrs)
        return float(lib.oe_read_bw(arr, streams, nbytes, threads, reps))
    finally:
        for p in ptrs:
            lib.oe_free(p)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--mb-per-stream", type=int, default=256)
    ap.add_argument("--reps", type=int, default=7)
    a = ap.parse_args()
    for t in sorted({1, a.threads}):
        bw = read_bandwidth(t, a.streams, a.mb_per_stream, a.reps)
        print(f"{t} thread(s), {a.streams} streams x {a.mb_per_stream} MiB: "
              + (f"{bw:.1f} GB/s" if bw else "not measured (no C compiler / no AVX2)"))
