// omni_edge._C: the only file that includes pybind11.
//
// Every kernel entry point takes tensors as raw addresses (Python ints from tensor.data_ptr()) plus
// sizes; the Python ops in omni_edge/ops/ validate dtype, device, contiguity, shapes and ranges before
// calling here. Kernel statuses become exceptions: OE_ERR_INVALID_ARG / OE_ERR_OUT_OF_RANGE -> ValueError,
// OE_ERR_UNSUPPORTED -> NotImplementedError, OE_ERR_CUDA -> RuntimeError. The GIL is released while a
// kernel runs.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>

#include "common/cpu_features.h"
#include "common/cuda_info.h"
#include "common/oe.h"
#include "q4/q4.h"

namespace py = pybind11;

namespace {

void check(oe_status s) {
  if (s == OE_OK) return;
  const std::string msg = oe_last_error();
  switch (s) {
    case OE_ERR_INVALID_ARG:
    case OE_ERR_OUT_OF_RANGE: throw py::value_error(msg);
    case OE_ERR_UNSUPPORTED: throw py::type_error("unsupported: " + msg);
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
#if defined(OE_WITH_OPENMP)
  d["openmp"] = true;
#else
  d["openmp"] = false;
#endif
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
  m.def("set_num_threads", &oe::set_num_threads);
  m.def("num_threads", &oe::num_threads);
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

  // ---- rvq (csrc/rvq) -----------------------------------------------------------------------------
}
