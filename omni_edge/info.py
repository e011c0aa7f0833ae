"""`omni-edge info`: what this build contains and what the machine offers; `--self-check` runs every
native kernel family against its torch reference (CPU, and each GPU)."""

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
    print(f"CPU threads:           {info['threads']} (OpenMP {_yes(info['openmp'])})")
    archs = ", ".join(f"sm_{a}" for a in info["cuda_archs"].split(",") if a)
    print(f"CUDA kernels compiled: {_yes(info['cuda_compiled'])}" + (f" ({archs})" if archs else ""))
    gpus = C.cuda_devices()
    if gpus:
        for g in gpus:
            print(f"GPU {g['index']}:                 {g['name']} (sm_{g['capability'][0]}{g['capability'][1]})")
    else:
        print("GPU found:             no")

    if not args.self_check:
        return 0

    import torch

    from omni_edge.ops import _dispatch

    devices = [torch.device("cpu")]
    if gpus and info["cuda_compiled"] and torch.cuda.is_available():
        devices += [torch.device("cuda", g["index"]) for g in gpus]
    failed = 0
    print("\nself-check (native kernel vs torch reference):")
    for dev in devices:
        results = _dispatch.run_self_check(dev)
        if dev.type == "cuda":
            _dispatch._store_cache(_dispatch.gpu_key(dev), results)
        for fam, r in results.items():
            status = "ok" if r["ok"] else f"FAILED ({r['error']})"
            failed += not r["ok"]
            print(f"  {str(dev):8s} {fam:10s} {status}")
    return 1 if failed else 0
