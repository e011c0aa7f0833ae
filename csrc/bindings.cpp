// omni_edge._C: the only file that includes pybind11.
//
// Every kernel entry point takes tensors as raw addresses (Python ints from tensor.data_ptr()) plus
// sizes; the Python ops in omni_edge/ops/ validate dtype, device, contiguity, shapes and ranges before
// calling here. Kernel statuses become exceptions (check() below): OE_ERR_INVALID_ARG / OE_ERR_OUT_OF_RANGE
// -> ValueError, OE_ERR_UNSUPPORTED -> TypeError ("unsupported: ..."), OE_ERR_NO_MEMORY -> MemoryError,
// OE_ERR_CUDA and anything else -> RuntimeError. Argument checks made here in the binding (a malformed plan
// tuple, an unknown ISA name, too many RVQ layers) raise ValueError. The GIL is released while a kernel runs.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <chrono>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <string>
#include <vector>

#include "common/cpu_features.h"
#include "common/cuda_info.h"
#include "common/pool.h"
#include "common/oe.h"
#include "q4/q4.h"

#include "attention/attention.h"
#include "rvq/rvq.h"
#include "decode/decode.h"

namespace py = pybind11;

namespace {

void check(oe_status s) {
  if (s == OE_OK) return;
  const std::string msg = oe_last_error();
  switch (s) {
    case OE_ERR_INVALID_ARG:
    case OE_ERR_OUT_OF_RANGE: throw py::value_error(msg);
    case OE_ERR_UNSUPPORTED: throw py::type_error("unsupported: " + msg);
    case OE_ERR_NO_MEMORY:
      PyErr_SetString(PyExc_MemoryError, msg.c_str());
      throw py::error_already_set();
    default: throw std::runtime_error(msg);
  }
}

template <typename T>
T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

using release_gil = py::call_guard<py::gil_scoped_release>;

py::dict build_info() {
  py::dict d;
  const oe::CpuFeatures& f = oe::cpu_features();
  py::dict feats;
  feats["avx2"] = f.avx2;
  feats["fma"] = f.fma;
  feats["f16c"] = f.f16c;
  feats["avx512f"] = f.avx512f;
  feats["avx512bw"] = f.avx512bw;
  feats["avx512vl"] = f.avx512vl;
  feats["avx512dq"] = f.avx512dq;
  feats["avx512vnni"] = f.avx512vnni;
  feats["avx512bf16"] = f.avx512bf16;
  feats["neon"] = f.neon;
  d["cpu_features"] = feats;
  d["isa_available"] = oe::isa_name(oe::isa_available());
  d["isa_active"] = oe::isa_name(oe::isa_active());
  d["threads"] = oe::num_threads();
  d["threads_default"] = oe::default_num_threads();
  d["cuda_compiled"] = oe::cuda_compiled();
  d["cuda_archs"] = std::string(oe::cuda_archs());
#if defined(OE_VERSION_INFO)
  d["version"] = std::string(OE_VERSION_INFO);
#endif
  return d;
}

py::list cuda_devices() {
  py::list out;
  const int n = oe::cuda_device_count();
  for (int i = 0; i < n; ++i) {
    char name[256];
    int major = 0, minor = 0;
    if (!oe::cuda_device_info(i, name, sizeof(name), &major, &minor)) continue;
    py::dict d;
    d["index"] = i;
    d["name"] = std::string(name);
    d["capability"] = py::make_tuple(major, minor);
    out.append(d);
  }
  return out;
}

oe::Isa isa_from_name(const std::string& s) {
  if (s == "scalar") return oe::Isa::Scalar;
  if (s == "neon") return oe::Isa::Neon;
  if (s == "avx2") return oe::Isa::Avx2;
  if (s == "avx512") return oe::Isa::Avx512;
  throw py::value_error("isa must be one of scalar, neon, avx2, avx512; got '" + s + "'");
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "omni-edge native kernels (torch-free; tensors are passed as raw addresses)";

  // ---- common -----------------------------------------------------------------------------------
  m.def("build_info", &build_info, "What this build contains and what the CPU offers");
  m.def("cuda_devices", &cuda_devices, "GPUs visible to the CUDA runtime (empty without driver or device)");
  m.def("set_isa_cap", [](const std::string& s) { oe::isa_set_cap(isa_from_name(s)); },
        "Cap the CPU instruction set the kernels use (tests use it to exercise every path)");
  m.def("isa_active", []() { return std::string(oe::isa_name(oe::isa_active())); });
  m.def("set_num_threads", &oe::set_num_threads, py::arg("n"),
        "Size of the CPU pool every kernel family shares (n <= 0: the CPUs this process may run on)");
  m.def("num_threads", &oe::num_threads, "Threads a kernel called from this thread may use, the caller included");
  m.def("pool_stats", []() {
    const oe::PoolStats st = oe::pool_stats();
    py::dict d;
    d["size"] = st.size;
    d["workers"] = st.workers;
    d["jobs"] = st.jobs;
    d["inline_jobs"] = st.inline_jobs;
    d["helped_chunks"] = st.helped_chunks;
    d["caller_sleeps"] = st.caller_sleeps;
    d["stalls"] = st.stalls;
    d["backoff_jobs"] = st.backoff_jobs;
    return d;
  }, "Counters of the CPU pool (jobs posted, jobs run on their caller alone, chunks run by workers, ...)");
  // A pool job for the tests: chunk c adds c + 1 to counts[c] (int64) after ~work_us of busy work; with
  // fail_at >= 0, chunk fail_at throws (RuntimeError); a chunk run off the caller's thread first sleeps
  // helper_sleep_us (a worker that lost its core). Returns the number of distinct threads that ran chunks.
  m.def("pool_test_job",
        [](uintptr_t counts, int64_t chunks, int max_threads, int64_t fail_at, double work_us,
           double helper_sleep_us) {
          struct Ctx {
            int64_t* counts;
            int64_t fail_at;
            double work_us, helper_sleep_us;
            std::thread::id caller;
            std::mutex mu;
            std::vector<std::thread::id> ids;
          } c{ptr<int64_t>(counts), fail_at, work_us, helper_sleep_us, std::this_thread::get_id(), {}, {}};
          oe::parallel_chunks(
              chunks,
              [](void* p, int64_t i) {
                Ctx& c = *static_cast<Ctx*>(p);
                if (c.helper_sleep_us > 0 && std::this_thread::get_id() != c.caller)
                  std::this_thread::sleep_for(std::chrono::duration<double, std::micro>(c.helper_sleep_us));
                const auto t0 = std::chrono::steady_clock::now();
                while (std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count() <
                       c.work_us) {
                }
                {
                  std::lock_guard<std::mutex> lk(c.mu);
                  const auto id = std::this_thread::get_id();
                  if (std::find(c.ids.begin(), c.ids.end(), id) == c.ids.end()) c.ids.push_back(id);
                }
                if (i == c.fail_at) throw std::runtime_error("pool test: chunk " + std::to_string(i) + " failed");
                c.counts[i] += i + 1;
              },
              &c, max_threads);
          return static_cast<int>(c.ids.size());
        },
        py::arg("counts"), py::arg("chunks"), py::arg("max_threads") = 0, py::arg("fail_at") = -1,
        py::arg("work_us") = 0.0, py::arg("helper_sleep_us") = 0.0, release_gil());
  m.def("cuda_stream_sync", [](uintptr_t stream) { check(oe::cuda_stream_sync(stream)); }, release_gil());

  // ---- q4 (csrc/q4) -------------------------------------------------------------------------------
  // A weight travels as the tuple (codes, scales, zeros, perm, block_group, bias, K, N, Kp, G): tensor addresses
  // (0 for a NULL perm / bias) and sizes, built and kept alive by omni_edge.ops.q4.QWeight.
  using Q4Tuple = std::tuple<uintptr_t, uintptr_t, uintptr_t, uintptr_t, uintptr_t, uintptr_t, int64_t, int64_t,
                             int64_t, int64_t>;
  static auto q4_weight = [](const Q4Tuple& t) {
    oe_q4_weight w;
    w.codes = ptr<const uint32_t>(std::get<0>(t));
    w.scales = ptr<const uint16_t>(std::get<1>(t));
    w.zeros = ptr<const uint8_t>(std::get<2>(t));
    w.perm = ptr<const int32_t>(std::get<3>(t));
    w.block_group = ptr<const int32_t>(std::get<4>(t));
    w.bias = ptr<const float>(std::get<5>(t));
    w.K = std::get<6>(t);
    w.N = std::get<7>(t);
    w.Kp = std::get<8>(t);
    w.G = std::get<9>(t);
    return w;
  };
  m.def("q4_layout", []() {
    py::dict d;
    d["tile_n"] = oe::q4::kTileN;
    d["octet"] = oe::q4::kOctet;
    d["block_k"] = oe::q4::kBlockK;
    d["nibble_row"] = py::make_tuple(oe::q4::kNibbleRow[0], oe::q4::kNibbleRow[1], oe::q4::kNibbleRow[2],
                                     oe::q4::kNibbleRow[3], oe::q4::kNibbleRow[4], oe::q4::kNibbleRow[5],
                                     oe::q4::kNibbleRow[6], oe::q4::kNibbleRow[7]);
    d["cuda_gemv_max_m"] = oe::q4::kCudaGemvMaxM;
    return d;
  }, "Constants of the q4 tiled weight layout (quantize/FORMAT.md)");
  m.def("q4_repack_gptq_cpu",
        [](uintptr_t qweight, int64_t K, int64_t N, uintptr_t perm, int64_t Kp, uintptr_t codes) {
          check(oe_q4_repack_gptq_cpu(ptr<const int32_t>(qweight), K, N, ptr<const int32_t>(perm), Kp,
                                      ptr<int32_t>(codes)));
        },
        py::arg("qweight"), py::arg("K"), py::arg("N"), py::arg("perm"), py::arg("Kp"), py::arg("codes"),
        release_gil(), "GPTQ qweight (K/8, N) -> tiled codes (ceil(N/16), Kp/8, 16), rows reordered by perm");
  m.def("q4_cpu_workspace_bytes", &oe_q4_cpu_workspace_bytes, py::arg("M"), py::arg("Kp"), py::arg("mode"));
  m.def("q4_cuda_workspace_bytes", &oe_q4_cuda_workspace_bytes, py::arg("M"), py::arg("Kp"));
  m.def("q4_matmul_cpu",
        [](const Q4Tuple& wt, uintptr_t x, int dt, int64_t M, uintptr_t y, int mode, uintptr_t ws, size_t ws_bytes) {
          const oe_q4_weight w = q4_weight(wt);
          check(oe_q4_matmul_cpu(&w, ptr<const void>(x), dt, M, ptr<void>(y), mode, ptr<void>(ws), ws_bytes));
        },
        py::arg("weight"), py::arg("x"), py::arg("dtype"), py::arg("M"), py::arg("y"), py::arg("mode"),
        py::arg("workspace"), py::arg("workspace_bytes"), release_gil(),
        "y (M, N) = x (M, K) @ W + bias on the CPU; mode 0 exact fp32, 1 int8 activations");
  m.def("q4_matmul_ref_cpu",
        [](const Q4Tuple& wt, uintptr_t x, int dt, int64_t M, uintptr_t y, int mode) {
          const oe_q4_weight w = q4_weight(wt);
          check(oe_q4_matmul_ref_cpu(&w, ptr<const void>(x), dt, M, ptr<void>(y), mode));
        },
        py::arg("weight"), py::arg("x"), py::arg("dtype"), py::arg("M"), py::arg("y"), py::arg("mode"), release_gil(),
        "Scalar reference of q4_matmul_cpu (double accumulation)");
  m.def("q4_matmul_cuda",
        [](const Q4Tuple& wt, uintptr_t x, int dt, int64_t M, uintptr_t y, int kernel, uintptr_t ws, size_t ws_bytes,
           uintptr_t stream) {
          const oe_q4_weight w = q4_weight(wt);
          check(oe_q4_matmul_cuda(&w, ptr<const void>(x), dt, M, ptr<void>(y), kernel, ptr<void>(ws), ws_bytes,
                                  stream));
        },
        py::arg("weight"), py::arg("x"), py::arg("dtype"), py::arg("M"), py::arg("y"), py::arg("kernel"),
        py::arg("workspace"), py::arg("workspace_bytes"), py::arg("stream"), release_gil(),
        "y = x @ W + bias on the GPU; kernel 0 auto, 1 GEMV (M <= 8), 2 GEMM");

  // ---- attention (csrc/attention) -----------------------------------------------------------------
  // Addresses are tensor.data_ptr(); `lengths` 0 means none (prefill only). omni_edge/ops/attention.py
  // validates shapes, dtypes and devices before calling; the kernels re-check sizes and (CPU) lengths.
  m.def("attention_prefill_cpu",
        [](uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out, int64_t B, int64_t T, int64_t Hq, int64_t Hkv,
           int64_t S, int64_t D, int64_t start, uintptr_t lengths, float scale, int dtype) {
          check(oe_attention_prefill_cpu(ptr<const void>(q), ptr<const void>(k), ptr<const void>(v), ptr<void>(out),
                                         B, T, Hq, Hkv, S, D, start, ptr<const int32_t>(lengths), scale, dtype));
        },
        release_gil());
  m.def("attention_prefill_ref",
        [](uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out, int64_t B, int64_t T, int64_t Hq, int64_t Hkv,
           int64_t S, int64_t D, int64_t start, uintptr_t lengths, float scale, int dtype) {
          check(oe_attention_prefill_ref(ptr<const void>(q), ptr<const void>(k), ptr<const void>(v), ptr<void>(out),
                                         B, T, Hq, Hkv, S, D, start, ptr<const int32_t>(lengths), scale, dtype));
        },
        release_gil());
  m.def("attention_decode_cpu",
        [](uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out, int64_t B, int64_t Hq, int64_t Hkv, int64_t S,
           int64_t D, uintptr_t lengths, float scale, int dtype, int64_t num_splits) {
          check(oe_attention_decode_cpu(ptr<const void>(q), ptr<const void>(k), ptr<const void>(v), ptr<void>(out),
                                        B, Hq, Hkv, S, D, ptr<const int32_t>(lengths), scale, dtype, num_splits));
        },
        release_gil());
  m.def("attention_decode_ref",
        [](uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out, int64_t B, int64_t Hq, int64_t Hkv, int64_t S,
           int64_t D, uintptr_t lengths, float scale, int dtype) {
          check(oe_attention_decode_ref(ptr<const void>(q), ptr<const void>(k), ptr<const void>(v), ptr<void>(out),
                                        B, Hq, Hkv, S, D, ptr<const int32_t>(lengths), scale, dtype));
        },
        release_gil());
  m.def("attention_varlen_cpu",
        [](uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out, int64_t N, int64_t H, int64_t D, uintptr_t cu,
           int64_t nseg, float scale, int dtype) {
          check(oe_attention_varlen_cpu(ptr<const void>(q), ptr<const void>(k), ptr<const void>(v), ptr<void>(out),
                                        N, H, D, ptr<const int32_t>(cu), nseg, scale, dtype));
        },
        release_gil());
  m.def("attention_varlen_ref",
        [](uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out, int64_t N, int64_t H, int64_t D, uintptr_t cu,
           int64_t nseg, float scale, int dtype) {
          check(oe_attention_varlen_ref(ptr<const void>(q), ptr<const void>(k), ptr<const void>(v), ptr<void>(out),
                                        N, H, D, ptr<const int32_t>(cu), nseg, scale, dtype));
        },
        release_gil());
  m.def("attention_decode_cuda_plan",
        [](int64_t B, int64_t Hq, int64_t Hkv, int64_t S, int64_t D, int device, int64_t requested) {
          int64_t splits = 0, bytes = 0;
          check(oe_attention_decode_cuda_plan(B, Hq, Hkv, S, D, device, requested, &splits, &bytes));
          return py::make_tuple(splits, bytes);
        },
        "(num_splits, workspace_bytes) for a CUDA decode call");
  m.def("attention_decode_cuda",
        [](uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out, int64_t B, int64_t Hq, int64_t Hkv, int64_t S,
           int64_t D, uintptr_t lengths, float scale, int dtype, int64_t num_splits, uintptr_t workspace,
           int64_t workspace_bytes, uintptr_t stream) {
          check(oe_attention_decode_cuda(ptr<const void>(q), ptr<const void>(k), ptr<const void>(v), ptr<void>(out),
                                         B, Hq, Hkv, S, D, ptr<const int32_t>(lengths), scale, dtype, num_splits,
                                         ptr<void>(workspace), workspace_bytes, stream));
        },
        release_gil());
  m.def("attention_prefill_cuda",
        [](uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out, int64_t B, int64_t T, int64_t Hq, int64_t Hkv,
           int64_t S, int64_t D, int64_t start, uintptr_t lengths, float scale, int dtype, uintptr_t stream) {
          check(oe_attention_prefill_cuda(ptr<const void>(q), ptr<const void>(k), ptr<const void>(v), ptr<void>(out),
                                          B, T, Hq, Hkv, S, D, start, ptr<const int32_t>(lengths), scale, dtype,
                                          stream));
        },
        release_gil());
  m.def("attention_varlen_cuda",
        [](uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out, int64_t N, int64_t H, int64_t D, uintptr_t cu,
           int64_t nseg, int64_t max_seqlen, float scale, int dtype, uintptr_t stream) {
          check(oe_attention_varlen_cuda(ptr<const void>(q), ptr<const void>(k), ptr<const void>(v), ptr<void>(out),
                                         N, H, D, ptr<const int32_t>(cu), nseg, max_seqlen, scale, dtype, stream));
        },
        release_gil());

  // ---- rvq (csrc/rvq) -----------------------------------------------------------------------------
  // Codebooks arrive as per-layer lists (data_ptr, rows) plus dim and dtype code; omni_edge/ops/rvq.py
  // validates them. The kernels check every code before reading any row (CPU: ValueError).
  using ptr_list = std::vector<uintptr_t>;
  using size_list = std::vector<int64_t>;
  // The codebook table from per-layer lists (data pointers, row counts, optional squared-norm pointers).
  static const auto rvq_books = [](const std::vector<uintptr_t>& data, const std::vector<int64_t>& sizes,
                                   int64_t dim, int dtype, const std::vector<uintptr_t>& norms2) {
    if (data.empty() || data.size() > OE_RVQ_MAX_LAYERS || sizes.size() != data.size() ||
        (!norms2.empty() && norms2.size() != data.size()))
      throw py::value_error("rvq: expected 1.." + std::to_string(OE_RVQ_MAX_LAYERS) +
                            " codebooks with one size (and optionally one norms pointer) each; got " +
                            std::to_string(data.size()) + " pointers, " + std::to_string(sizes.size()) + " sizes, " +
                            std::to_string(norms2.size()) + " norms");
    oe_rvq_books b{};
    b.num_layers = static_cast<int32_t>(data.size());
    b.dtype = dtype;
    b.dim = dim;
    for (size_t l = 0; l < data.size(); ++l) {
      b.data[l] = reinterpret_cast<const void*>(data[l]);
      b.sizes[l] = sizes[l];
      b.norms2[l] = norms2.empty() ? nullptr : reinterpret_cast<const float*>(norms2[l]);
    }
    return b;
  };
  m.def("rvq_decode_cpu",
        [](uintptr_t codes, bool codes_int64, int64_t T, const ptr_list& data, const size_list& sizes, int64_t dim,
           int dtype, uintptr_t out) {
          const oe_rvq_books b = rvq_books(data, sizes, dim, dtype, {});
          check(oe_rvq_decode_cpu(ptr<const void>(codes), codes_int64, T, &b, ptr<float>(out)));
        },
        release_gil());
  m.def("rvq_decode_ref",
        [](uintptr_t codes, bool codes_int64, int64_t T, const ptr_list& data, const size_list& sizes, int64_t dim,
           int dtype, uintptr_t out) {
          const oe_rvq_books b = rvq_books(data, sizes, dim, dtype, {});
          check(oe_rvq_decode_ref(ptr<const void>(codes), codes_int64, T, &b, ptr<float>(out)));
        },
        release_gil());
  m.def("rvq_encode_cpu",
        [](uintptr_t x, int64_t T, const ptr_list& data, const size_list& sizes, int64_t dim, int dtype,
           const ptr_list& norms2, uintptr_t codes) {
          const oe_rvq_books b = rvq_books(data, sizes, dim, dtype, norms2);
          check(oe_rvq_encode_cpu(ptr<const float>(x), T, &b, ptr<int64_t>(codes)));
        },
        release_gil());
  m.def("rvq_encode_ref",
        [](uintptr_t x, int64_t T, const ptr_list& data, const size_list& sizes, int64_t dim, int dtype,
           uintptr_t codes) {
          const oe_rvq_books b = rvq_books(data, sizes, dim, dtype, {});
          check(oe_rvq_encode_ref(ptr<const float>(x), T, &b, ptr<int64_t>(codes)));
        },
        release_gil());
  m.def("rvq_decode_cuda",
        [](uintptr_t codes, bool codes_int64, int64_t T, const ptr_list& data, const size_list& sizes, int64_t dim,
           int dtype, uintptr_t out, uintptr_t error_flag, uintptr_t stream) {
          const oe_rvq_books b = rvq_books(data, sizes, dim, dtype, {});
          check(oe_rvq_decode_cuda(ptr<const void>(codes), codes_int64, T, &b, ptr<float>(out),
                                   ptr<int32_t>(error_flag), stream));
        },
        release_gil());
  m.def("rvq_encode_cuda_workspace",
        [](int64_t T, const ptr_list& data, const size_list& sizes, int64_t dim, int dtype) {
          const oe_rvq_books b = rvq_books(data, sizes, dim, dtype, {});
          int64_t bytes = 0;
          check(oe_rvq_encode_cuda_workspace(T, &b, &bytes));
          return bytes;
        });
  m.def("rvq_encode_cuda",
        [](uintptr_t x, int64_t T, const ptr_list& data, const size_list& sizes, int64_t dim, int dtype,
           const ptr_list& norms2, uintptr_t codes, uintptr_t workspace, int64_t workspace_bytes, uintptr_t stream) {
          const oe_rvq_books b = rvq_books(data, sizes, dim, dtype, norms2);
          check(oe_rvq_encode_cuda(ptr<const float>(x), T, &b, ptr<int64_t>(codes), ptr<void>(workspace),
                                   workspace_bytes, stream));
        },
        release_gil());

  // ---- decode (csrc/decode) -----------------------------------------------------------------------
  // The native CPU decode step. omni_edge/backbone.py builds a DecodePlan once per KV cache from the layers'
  // tensor addresses and passes `keepalive` (the tensors themselves), which the plan holds so the addresses
  // stay valid for its lifetime. A linear travels as (1, weight, bias, N, K) for dense fp32 (bias 0 = none)
  // or (1, weight, bias, N, K, dtype) for fp16 / bf16 weights, (2, q4 tuple) for 4-bit (the tuple of the q4
  // section) or (3, codes, scales, bias, N, K, block) for q8; the lm_head is one more such tuple. A layer is (input_norm, post_norm, linears,
  // k_cache, v_cache) with linears [W_pack, o, gate, up, down] (packed) or [q, k, v, o, gate, up, down].
  m.def("gemv_f32_cpu",
        [](uintptr_t W, uintptr_t x, uintptr_t bias, int64_t N, int64_t K, uintptr_t y) {
          check(oe_gemv_f32_cpu(ptr<const float>(W), ptr<const float>(x), ptr<const float>(bias), N, K, ptr<float>(y)));
        },
        py::arg("W"), py::arg("x"), py::arg("bias"), py::arg("N"), py::arg("K"), py::arg("y"), release_gil(),
        "y (N) = W (N, K) . x (K) + bias, fp32 (bias 0 = none)");
  m.def("gemv_cpu",
        [](uintptr_t W, int wdtype, uintptr_t x, uintptr_t bias, int64_t N, int64_t K, uintptr_t y) {
          check(oe_gemv_cpu(ptr<const void>(W), wdtype, ptr<const float>(x), ptr<const float>(bias), N, K, ptr<float>(y)));
        },
        py::arg("W"), py::arg("wdtype"), py::arg("x"), py::arg("bias"), py::arg("N"), py::arg("K"), py::arg("y"),
        release_gil(), "y (N) fp32 = W (N, K) in wdtype (0 f32, 1 f16, 2 bf16) . x (K) fp32 + bias (0 = none)");
  m.def("gemv_q8_cpu",
        [](uintptr_t q, uintptr_t scales, int64_t block, uintptr_t x, uintptr_t bias, int64_t N, int64_t K, uintptr_t y,
           int mode) {
          check(oe_gemv_q8_cpu(ptr<const int8_t>(q), ptr<const uint16_t>(scales), block, ptr<const float>(x),
                               ptr<const float>(bias), N, K, ptr<float>(y), mode));
        },
        py::arg("q"), py::arg("scales"), py::arg("block"), py::arg("x"), py::arg("bias"), py::arg("N"), py::arg("K"),
        py::arg("y"), py::arg("mode") = 0, release_gil(),
        "y (N) fp32 = (scales (N, ceil(K/block)) fp16 per block * q (N, K) int8) . x (K) fp32 + bias (0 = none); "
        "mode 1: x quantized to int8 per 32 inputs first (as the q4 INT8 mode)");
  struct DecodePlan {
    oe_decode_plan* plan = nullptr;
    py::object keepalive;
    int64_t hidden = 0, max_len = 0;
    ~DecodePlan() { oe_decode_plan_destroy(plan); }
  };
  static const auto decode_linear = [](const py::tuple& t, const char* what) {
    oe_decode_linear l{};
    const int kind = t.size() >= 1 ? t[0].cast<int>() : 0;
    if (kind == OE_DECODE_DENSE && (t.size() == 5 || t.size() == 6)) {
      l.kind = kind;
      l.weight = ptr<const void>(t[1].cast<uintptr_t>());
      l.bias = ptr<const float>(t[2].cast<uintptr_t>());
      l.N = t[3].cast<int64_t>();
      l.K = t[4].cast<int64_t>();
      l.wdtype = t.size() == 6 ? t[5].cast<int>() : OE_F32;
    } else if (kind == OE_DECODE_Q8 && t.size() == 7) {
      l.kind = kind;
      l.weight = ptr<const void>(t[1].cast<uintptr_t>());
      l.q8_scales = ptr<const uint16_t>(t[2].cast<uintptr_t>());
      l.bias = ptr<const float>(t[3].cast<uintptr_t>());
      l.N = t[4].cast<int64_t>();
      l.K = t[5].cast<int64_t>();
      l.q8_block = t[6].cast<int64_t>();
    } else if (kind == OE_DECODE_Q4 && t.size() == 2) {
      l.kind = kind;
      l.q4 = q4_weight(t[1].cast<Q4Tuple>());
      l.N = l.q4.N;
      l.K = l.q4.K;
    } else {
      throw py::value_error(std::string("decode plan: ") + what + ": expected (1, weight, bias, N, K[, dtype]), (2, q4 tuple) "
                            "or (3, codes, scales, bias, N, K, block), got a " +
                            std::to_string(t.size()) + "-tuple of kind " + std::to_string(kind));
    }
    return l;
  };
  py::class_<DecodePlan>(m, "DecodePlan", "Opaque native decode plan (csrc/decode/decode.h)")
      .def(py::init([](int64_t hidden, int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t intermediate,
                       int64_t max_len, float eps, bool packed, uintptr_t cos, uintptr_t sin, uintptr_t final_norm,
                       const std::vector<py::tuple>& layers, py::object keepalive, py::object lm_head) {
             oe_decode_config c{};
             if (!lm_head.is_none()) c.lm_head = decode_linear(lm_head.cast<py::tuple>(), "lm_head");
             c.hidden = hidden;
             c.heads = heads;
             c.kv_heads = kv_heads;
             c.head_dim = head_dim;
             c.intermediate = intermediate;
             c.layers = static_cast<int64_t>(layers.size());
             c.max_len = max_len;
             c.eps = eps;
             c.packed_qkv = packed ? 1 : 0;
             c.dtype = OE_F32;
             c.cos = ptr<const float>(cos);
             c.sin = ptr<const float>(sin);
             c.final_norm = ptr<const float>(final_norm);
             std::vector<oe_decode_layer> ls(layers.size());
             const size_t n_lin = packed ? 5 : 7;
             for (size_t i = 0; i < layers.size(); ++i) {
               const py::tuple& t = layers[i];
               if (t.size() != 5) throw py::value_error("decode plan: layer " + std::to_string(i) +
                                                        ": expected (input_norm, post_norm, linears, k_cache, v_cache)");
               const auto lin = t[2].cast<std::vector<py::tuple>>();
               if (lin.size() != n_lin)
                 throw py::value_error("decode plan: layer " + std::to_string(i) + ": expected " + std::to_string(n_lin) +
                                       " linears, got " + std::to_string(lin.size()));
               oe_decode_layer& L = ls[i];
               L.input_norm = ptr<const float>(t[0].cast<uintptr_t>());
               L.post_norm = ptr<const float>(t[1].cast<uintptr_t>());
               size_t j = 0;
               if (packed) {
                 L.qkv = decode_linear(lin[j++], "W_pack");
               } else {
                 L.q = decode_linear(lin[j++], "q_proj");
                 L.k = decode_linear(lin[j++], "k_proj");
                 L.v = decode_linear(lin[j++], "v_proj");
               }
               L.o = decode_linear(lin[j++], "o_proj");
               L.gate = decode_linear(lin[j++], "gate_proj");
               L.up = decode_linear(lin[j++], "up_proj");
               L.down = decode_linear(lin[j++], "down_proj");
               L.k_cache = ptr<float>(t[3].cast<uintptr_t>());
               L.v_cache = ptr<float>(t[4].cast<uintptr_t>());
             }
             auto p = std::make_unique<DecodePlan>();
             check(oe_decode_plan_create(&c, ls.data(), static_cast<int64_t>(ls.size()), &p->plan));
             p->keepalive = std::move(keepalive);
             p->hidden = hidden;
             p->max_len = max_len;
             return p;
           }),
           py::arg("hidden"), py::arg("heads"), py::arg("kv_heads"), py::arg("head_dim"), py::arg("intermediate"),
           py::arg("max_len"), py::arg("eps"), py::arg("packed"), py::arg("cos"), py::arg("sin"),
           py::arg("final_norm"), py::arg("layers"), py::arg("keepalive"), py::arg("lm_head") = py::none())
      .def("step",
           [](DecodePlan& p, uintptr_t h_in, uintptr_t h_out, int64_t pos, int q4_mode) {
             check(oe_decode_step_cpu(p.plan, ptr<const float>(h_in), ptr<float>(h_out), pos, q4_mode));
           },
           py::arg("h_in"), py::arg("h_out"), py::arg("pos"), py::arg("q4_mode"), release_gil(),
           "h_in (C,) fp32 -> h_out (C,) after the final norm, K/V written at pos; ValueError if pos >= max_len")
      .def("step_logits",
           [](DecodePlan& p, uintptr_t h_in, uintptr_t h_out, uintptr_t logits, int64_t pos, int q4_mode) {
             check(oe_decode_step_logits_cpu(p.plan, ptr<const float>(h_in), ptr<float>(h_out), ptr<float>(logits), pos,
                                             q4_mode));
           },
           py::arg("h_in"), py::arg("h_out"), py::arg("logits"), py::arg("pos"), py::arg("q4_mode"), release_gil(),
           "step, then logits (V,) fp32 = lm_head(h_out) (h_out 0: not written); the plan needs an lm_head")
      .def_readonly("hidden", &DecodePlan::hidden)
      .def_readonly("max_len", &DecodePlan::max_len);
}
