// q4: 4-bit GPTQ matmul, y = x @ W + bias, on omni-edge's own tiled weight layout.
//
// The layout (quantize/FORMAT.md, "omni-edge tiled layout") is built once from the standard GPTQ
// tensors by omni_edge.ops.q4.QWeight.from_gptq and is the same on CPU and GPU:
//
//   Kp = rows after folding act-order: input rows sorted by group, each group padded with zero rows to a
//        multiple of kBlockK (32); Np = N rounded up to kTileN (16); nt = Np / 16 column tiles; G groups.
//   codes       uint32 (nt, Kp/8, 16)  word [t][o][l] holds the 8 codes of column 16t+l, rows 8o..8o+7;
//                                      byte b (little-endian) = row 8o+b in bits 0..3, row 8o+4+b in bits 4..7
//   scales      fp16   (nt, G, 16)     scale of group g, column 16t+l
//   zeros       uint8  (nt, G, 16)     true zero point (0..15) of group g, column 16t+l
//   perm        int32  (Kp,)           input row feeding layout row r, or -1 for a padding row; NULL means
//                                      the identity over rows 0..K-1 with padding rows after them
//   block_group int32  (Kp/32,)        group of each 32-row block (all rows of a block share one group)
//
//   W[perm[r], n] = scales[t][g][l] * (code(r, n) - zeros[t][g][l]),  n = 16t + l, g = block_group[r / 32]
//
// Two CPU modes (oe_q4_mode):
//   OE_Q4_EXACT  fp32 activations times exactly dequantized weights, fp32 accumulation. Tolerance: the
//                dequantized fp32 matmul up to fp32 summation order (~1e-6 relative to sum |x||w| per output).
//   OE_Q4_INT8   activations quantized per 32-row block to int8 (d = max|x| / 127, xi = round-half-even(x *
//                127 / max|x|)), integer dot products (AVX-512 VNNI vpdpbusd, AVX2 vpmaddubsw), fp32 per block.
//                The result is the exact product of the quantized activations with the weights up to fp32
//                rounding, so |y - y_exact| <= sum_k |W[k, n]| * d_block(k) / 2 (+ fp32 rounding).
// CUDA computes in fp32 with exactly dequantized weights (the EXACT contract) whatever the mode.
//
// CPU threads: column tiles are split over the calling thread and the one work-claiming pool every kernel
// family shares (csrc/common/pool.h), so a call never waits for a thread that has not started (on cores shared
// with other work an OpenMP fork/join waited for a scheduler slice on most decode calls).
#pragma once
#include <cstddef>
#include <cstdint>

#include "common/oe.h"

namespace oe {
namespace q4 {

constexpr int kBits = 4;
constexpr int kTileN = 16;          // columns per tile: one 512-bit register of int32/fp32 lanes
constexpr int kOctet = 8;           // rows per code word
constexpr int kBlockK = 32;         // rows per activation-quantization block; groups are padded to this
constexpr int kOctetsPerBlock = kBlockK / kOctet;
constexpr int kTileOctetBytes = kTileN * kOctet * kBits / 8;  // bytes of one octet row of a tile
constexpr int kGptqPerWord = 32 / kBits;                       // GPTQ: codes per int32 word

static_assert(kTileOctetBytes == 64, "one octet row of a tile is one 64-byte cache line / zmm register");
static_assert(kTileN * 4 == 64, "16 fp32 or int32 lanes fill a 512-bit register");
static_assert(kOctet * kBits == 32, "a code word holds exactly one column's 8 rows");
static_assert(kBlockK % kOctet == 0 && kOctetsPerBlock == 4, "a block is four octets");
static_assert(kGptqPerWord == kOctet, "a GPTQ word and a layout word both hold 8 codes");
// Integer-path headroom: a block's dot product sum_k q_k * xi_k with q <= 15, |xi| <= 127 fits easily in int32,
// and the AVX2 path keeps it in int16: 32 * 15 * 127 = 60960 would not, but it adds two maddubs results per
// octet and four octets per block in int16 before widening: 4 * 2 * (2 * 15 * 127) = 30480 < 32767.
static_assert(4 * 2 * (2 * 15 * 127) < 32767, "AVX2 int16 block accumulator cannot overflow");

// Layout row r within octet o: nibble j of the little-endian word (bits 4j..4j+3) holds row 8o + kNibbleRow[j].
constexpr int kNibbleRow[8] = {0, 4, 1, 5, 2, 6, 3, 7};

}  // namespace q4
}  // namespace oe

extern "C" {

typedef enum oe_q4_mode {
  OE_Q4_EXACT = 0,
  OE_Q4_INT8 = 1,
} oe_q4_mode;

// One quantized linear layer in the tiled layout (see above). Pointers are device pointers for CUDA calls.
typedef struct oe_q4_weight {
  const uint32_t* codes;        // (nt, Kp/8, 16)
  const uint16_t* scales;       // (nt, G, 16) fp16 bits
  const uint8_t* zeros;         // (nt, G, 16)
  const int32_t* perm;          // (Kp,) or NULL
  const int32_t* block_group;   // (Kp/32,)
  const float* bias;            // (N,) or NULL
  int64_t K;                    // input features (rows of W)
  int64_t N;                    // output features, multiple of 8
  int64_t Kp;                   // layout rows, multiple of 32, >= K
  int64_t G;                    // groups (rows of scales / zeros per tile)
} oe_q4_weight;

// CPU: x (M, K) row-major in dtype `dt`, y (M, N) row-major in the same dtype. Workspace: caller-owned,
// at least oe_q4_cpu_workspace_bytes(M, Kp, mode) bytes, any alignment.
size_t oe_q4_cpu_workspace_bytes(int64_t M, int64_t Kp, int mode);
oe_status oe_q4_matmul_cpu(const oe_q4_weight* w, const void* x, int dt, int64_t M, void* y, int mode,
                           void* workspace, size_t workspace_bytes);
// Scalar reference (double accumulation; allocates its own scratch). Same semantics as oe_q4_matmul_cpu in
// each mode: EXACT is sum_k x_k * W[k, n]; INT8 is the same sum over the quantized activations.
oe_status oe_q4_matmul_ref_cpu(const oe_q4_weight* w, const void* x, int dt, int64_t M, void* y, int mode);

// Load-time repack on the CPU: GPTQ qweight (K/8, N) int32 -> tiled codes (ceil(N/16), Kp/8, 16) int32,
// rows reordered by perm (NULL: identity with zero padding rows after K). Bit-identical to the torch spec.
oe_status oe_q4_repack_gptq_cpu(const int32_t* qweight, int64_t K, int64_t N, const int32_t* perm, int64_t Kp,
                                int32_t* codes);

// CUDA: pointers on one device, work enqueued on `stream` (a cudaStream_t as an integer). `kernel` 0 picks
// GEMV for M <= 8 and the tiled GEMM otherwise; 1 forces GEMV (M <= 8 only), 2 forces GEMM (tests use it).
// Workspace: device memory of at least oe_q4_cuda_workspace_bytes(M, Kp) bytes, 16-byte aligned.
size_t oe_q4_cuda_workspace_bytes(int64_t M, int64_t Kp);
oe_status oe_q4_matmul_cuda(const oe_q4_weight* w, const void* x, int dt, int64_t M, void* y, int kernel,
                            void* workspace, size_t workspace_bytes, uintptr_t stream);

}  // extern "C"

namespace oe {
namespace q4 {

constexpr int kCudaGemvMaxM = 8;

// Checks shared by every entry point: sizes, pointers, dtype; block_group values (user data) in [0, G).
// Host-side block_group check is skipped for device pointers (check_groups = false).
oe_status validate(const oe_q4_weight* w, const void* x, int dt, int64_t M, const void* y, bool check_groups);

// ---- CPU internals (csrc/q4/q4_cpu.cpp and the per-ISA files) ----

// Activations prepared once per call, in layout row order (gathered by perm, converted to fp32, zero
// padding rows), per row m:
//   EXACT: xf[m * Kp + r], xs[m * nb + b] = sum of the block's xf (in order; kernels that fold the zero point
//          through the activation sums use it)
//   INT8:  xq[m * Kp + r] int8, xd[m * nb + b] block scale d, xds[m * nb + b] = d * sum of the block's xi
struct Prep {
  const float* xf = nullptr;
  const float* xs = nullptr;
  const int8_t* xq = nullptr;
  const float* xd = nullptr;
  const float* xds = nullptr;
};

// Computes the fp32 outputs (without bias) of rows m0 .. m0+MR-1 of column tile t into out[MR][16].
using TileFn = void (*)(const oe_q4_weight& w, int64_t t, const Prep& p, int64_t m0, float* out);

// Runs fn(ctx, c) for c in [0, chunks) on the calling thread plus up to num_threads() - 1 pool workers and
// returns when every chunk is done, waiting only for chunks a thread has started (csrc/common/pool.h).
using ChunkFn = void (*)(void* ctx, int64_t chunk);
void parallel_chunks(int64_t chunks, ChunkFn fn, void* ctx);

// Per-ISA tile kernels, index [MR - 1] for MR = 1..kMaxMR. nullptr tables where the ISA is not compiled.
constexpr int kMaxMR = 4;
struct TileKernels {
  TileFn exact[kMaxMR];
  TileFn int8[kMaxMR];
  // Quantizes `nblocks` consecutive 32-row blocks of fp32 activations xf into xq / xd / xds (INT8 mode).
  void (*quantize)(const float* xf, int64_t nblocks, int8_t* xq, float* xd, float* xds);
};
const TileKernels* kernels_scalar();
const TileKernels* kernels_avx2();    // nullptr unless built for x86
const TileKernels* kernels_avx512();  // nullptr unless built for x86
const TileKernels* kernels_neon();    // nullptr unless built for aarch64

// The scalar definition of the INT8 activation quantization (the contract every ISA reproduces bit for bit):
// for each 32-row block, amax = max |x|, d = amax / 127, xi = round-half-even(x * (127 / amax)) (0 when amax
// is 0), xds = d * (float)sum(xi).
void quantize_blocks_scalar(const float* xf, int64_t nblocks, int8_t* xq, float* xd, float* xds);

}  // namespace q4
}  // namespace oe
