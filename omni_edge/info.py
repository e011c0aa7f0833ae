"""`omni-edge info`: what this build contains, what the machine offers and which runtime switches are in
force (omni_edge/knobs.py); `--self-check` runs every native kernel family against its torch reference (CPU,
and each GPU), plus the dense GEMV and the whole-model native decode step on CPU. A check that cannot run
because the switches leave nothing native to check (OMNI_EDGE_NATIVE=0) says "skipped", never "ok"."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--self-check", action="store_true",
                   help="run each native kernel family against its torch reference on CPU and every GPU")


def _yes(b: bool) -> str:
    return "yes" if b else "no"


def run(args) -> int:
    from omni_edge import __version__, _native

    print(f"omni-edge {__version__}")
    if not _native.available():
        try:
            _native.lib()
        except ImportError as e:
            print(f"native kernels: NOT BUILT ({e})")
        return 1
    C = _native.lib()
    info = C.build_info()
    feats = info["cpu_features"]
    have = [k for k in ("neon", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq",
                        "avx512vnni", "avx512bf16") if feats[k]]
    print(f"CPU ISA features:      {' '.join(have) or 'none beyond the baseline'}")
    print(f"CPU kernel level:      {info['isa_available']} available, {info['isa_active']} used")
    pool = C.pool_stats()
    print(f"CPU threads:           {pool['size']} in the native kernels' pool (CPUs this process may use: "
          f"{info['threads_default']}; set with --threads or OMNI_EDGE_THREADS)")
    archs = ", ".join(f"sm_{a}" for a in info["cuda_archs"].split(",") if a)
    print(f"CUDA kernels compiled: {_yes(info['cuda_compiled'])}" + (f" ({archs})" if archs else ""))
    gpus = C.cuda_devices()
    if gpus:
        for g in gpus:
            print(f"GPU {g['index']}:                 {g['name']} (sm_{g['capability'][0]}{g['capability'][1]})")
    else:
        print("GPU found:             no")

    from omni_edge import backends

    why_not = backends.onnxruntime_status()
    if why_not is None:
        import onnxruntime

        onnx_line = f"onnx (onnxruntime {onnxruntime.__version__}; {', '.join(onnxruntime.get_available_providers())})"
    else:
        onnx_line = f"onnx unavailable: {why_not}"
    print(f"dense-stage backends:  torch; {onnx_line}; a bundle's graphs run in onnx when present "
          f"(chat --backend auto|torch|onnx|STAGE=KIND; `describe()` names each stage's)")

    from omni_edge import knobs

    s = knobs.settings()
    print("runtime switches:")
    for row in knobs.table():
        print(f"  {row['variable']:24s} {row['value']:20s} ({row['source']}) {row['meaning']}")
    for problem in s.problems:
        print(f"  INVALID: {problem}")
    if not args.self_check:
        return 1 if s.problems else 0

    import torch

    from omni_edge.ops import _dispatch

    devices = [torch.device("cpu")]
    if gpus and info["cuda_compiled"] and torch.cuda.is_available():
        devices += [torch.device("cuda", g["index"]) for g in gpus]
    failed = 0
    print("\nself-check (native kernel vs torch reference):")
    if not s.native:
        print(f"  {'all':8s} {'all':12s} skipped (OMNI_EDGE_NATIVE=0: the torch references run everywhere, "
              f"nothing native to check)")
        return 1 if s.problems else 0
    for dev in devices:
        results = _dispatch.run_self_check(dev)
        if dev.type == "cuda":
            _dispatch._store_cache(_dispatch.gpu_key(dev), results)
        else:
            results.update(cpu_extra_checks())
        for fam, r in results.items():
            status = r.get("status") or ("ok" if r["ok"] else f"FAILED ({r['error']})")
            failed += not r["ok"]
            print(f"  {str(dev):8s} {fam:12s} {status}")
    return 1 if failed or s.problems else 0


def _gemv_check() -> None:
    """Dense fp32 GEMV (csrc/decode) vs a float64 product on odd shapes; bound: fp32 accumulation over K."""
    import torch

    from omni_edge import _native

    lib = _native.lib()
    g = torch.Generator().manual_seed(0)
    for n, k in ((1, 1), (7, 17), (33, 100), (129, 577)):
        w, x, b = torch.randn(n, k, generator=g), torch.randn(k, generator=g), torch.randn(n, generator=g)
        y = torch.empty(n)
        lib.gemv_f32_cpu(w.data_ptr(), x.data_ptr(), b.data_ptr(), n, k, y.data_ptr())
        ref = w.double() @ x.double() + b.double()
        bound = 1e-6 * ((w.double().abs() @ x.double().abs()) + b.double().abs()) * max(1, k) ** 0.5 + 1e-6
        if not bool(((y.double() - ref).abs() <= bound).all()):
            raise AssertionError(f"gemv ({n}x{k}) differs from the float64 product by "
                                 f"{float((y.double() - ref).abs().max()):.3g}")


def _decode_step_check() -> str:
    """The native whole-model decode step vs the Python layer loop on a tiny random backbone (dense and
    4-bit); both run the same kernels, so they agree to fp32 summation-order noise (1e-5 of max |h|).
    Returns "" when it ran, else why it was skipped."""
    import torch

    from omni_edge import knobs
    from omni_edge.backbone import Backbone
    from omni_edge.config import BackboneConfig
    from omni_edge.testing import backbone_tensors

    if not knobs.settings().native_decode:
        return "OMNI_EDGE_NATIVE_DECODE=0"
    cfg = BackboneConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
                         head_dim=16, intermediate_size=96, vocab_size=67, rope_theta=1e4, rms_norm_eps=1e-6,
                         max_position_embeddings=64, torch_dtype="float32").validate()
    ids = torch.randint(0, cfg.vocab_size, (1, 9), generator=torch.Generator().manual_seed(1))
    for quant in ("none", "rtn4"):
        bb = Backbone.from_tensors(cfg, backbone_tensors(cfg, seed=0), quant=quant)
        outs = []
        for native in (False, True):
            with knobs.override(native_decode=native), torch.no_grad():
                bb.allocate_cache(16)
                reason = bb.native_decode_supported()
                if native and reason is not None:
                    raise AssertionError(f"native decode step unavailable: {reason}")
                bb.forward(ids[:, :4], start=0)
                outs.append(torch.cat([bb.forward(ids[:, i:i + 1], start=i) for i in range(4, 9)], 1))
        err = float((outs[1] - outs[0]).abs().max() / outs[0].abs().max())
        if not err <= 1e-5:
            raise AssertionError(f"native decode step ({quant}) differs from the Python layer loop by {err:.3g} "
                                 f"of max |h|")
    return ""


def cpu_extra_checks() -> dict:
    """{"gemv": ..., "decode_step": ...} results in run_self_check's form (+ "status" when skipped)."""
    out = {}
    for name, fn in (("gemv", _gemv_check), ("decode_step", _decode_step_check)):
        try:
            skipped = fn()
            out[name] = {"ok": True, "error": ""}
            if skipped:
                out[name]["status"] = f"skipped ({skipped})"
        except Exception as e:  # any failure means: do not trust this path
            out[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    return out
