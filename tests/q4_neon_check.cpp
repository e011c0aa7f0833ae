// q4 NEON kernels vs the portable scalar kernels vs the scalar reference, on random layers (odd shapes,
// per-channel with K padding, act-order perm), both CPU modes. Built for AArch64 and run under qemu-aarch64
// by tests/test_q4.py::test_neon_kernels_under_qemu when a cross compiler and qemu are installed.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>
#include "common/cpu_features.h"
#include "common/half.h"
#include "q4/q4.h"
static uint32_t rng = 12345;
static uint32_t rnd() { rng = rng * 1664525u + 1013904223u; return rng >> 8; }
int main() {
  int fails = 0;
  const int64_t shapes[][3] = {{96, 24, 32}, {200, 40, 200}, {384, 72, 128}};
  for (auto& sh : shapes) {
    const int64_t K = sh[0], N = sh[1], gs = sh[2];
    const int64_t Kp = (K + 31) / 32 * 32, nt = (N + 15) / 16, G = (K + gs - 1) / gs;
    std::vector<uint32_t> codes(nt * Kp / 8 * 16);
    for (auto& v : codes) v = rnd() ^ (rnd() << 16);
    std::vector<uint16_t> sc(nt * G * 16); std::vector<uint8_t> z(nt * G * 16);
    for (auto& v : sc) v = oe::f32_to_f16((rnd() % 1000) * 2e-5f + 1e-3f);
    for (auto& v : z) v = rnd() % 16;
    std::vector<int32_t> bg(Kp / 32), perm(Kp);
    for (int64_t b = 0; b < Kp / 32; ++b) bg[b] = std::min<int64_t>(G - 1, b * 32 / gs);
    for (int64_t r = 0; r < Kp; ++r) perm[r] = r < K ? (int32_t)((r * 7) % K) : -1;  // a permutation when gcd(7,K)=1
    std::vector<float> bias(N); for (auto& v : bias) v = (rnd() % 100) * 0.01f;
    for (int use_perm = 0; use_perm < 2; ++use_perm) {
      oe_q4_weight w{codes.data(), sc.data(), z.data(), use_perm ? perm.data() : nullptr, bg.data(), bias.data(), K, N, Kp, G};
      for (int M : {1, 3, 5, 9}) {
        std::vector<float> x(M * K); for (auto& v : x) v = ((int)(rnd() % 2001) - 1000) * 1e-3f;
        for (int mode = 0; mode < 2; ++mode) {
          std::vector<float> yn(M * N), ys(M * N), yr(M * N);
          std::vector<uint8_t> ws(oe_q4_cpu_workspace_bytes(M, Kp, mode));
          oe::isa_set_cap(oe::Isa::Neon);
          if (oe::isa_active() != oe::Isa::Neon) { printf("neon not active\n"); return 2; }
          if (oe_q4_matmul_cpu(&w, x.data(), 0, M, yn.data(), mode, ws.data(), ws.size())) { printf("err %s\n", oe_last_error()); return 3; }
          oe::isa_set_cap(oe::Isa::Scalar);
          oe_q4_matmul_cpu(&w, x.data(), 0, M, ys.data(), mode, ws.data(), ws.size());
          oe_q4_matmul_ref_cpu(&w, x.data(), 0, M, yr.data(), mode);
          double worst = 0;
          for (int64_t m = 0; m < M; ++m)
            for (int64_t n = 0; n < N; ++n) {
              double mag = 1e-6;  // sum_k |x_k| * max|w| (scales < 0.021, |q - z| <= 15)
              for (int64_t k = 0; k < K; ++k) mag += std::fabs(x[m * K + k]) * 0.02 * 15;
              const double e = std::max(std::fabs(yn[m * N + n] - yr[m * N + n]), std::fabs(ys[m * N + n] - yr[m * N + n])) / mag;
              worst = std::max(worst, e);
            }
          const bool ok = worst < 1e-6;
          fails += !ok;
          printf("K=%ld N=%ld g=%ld perm=%d M=%d mode=%d  max err / sum|x||w| = %.2e %s\n", (long)K, (long)N, (long)gs, use_perm, M, mode, worst, ok ? "ok" : "FAIL");
        }
      }
    }
  }
  printf(fails ? "FAILED %d\n" : "all ok\n", fails);
  return fails != 0;
}
