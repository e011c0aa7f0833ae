"""Attention benchmark: omni-edge's kernels against torch.nn.functional.scaled_dot_product_attention in the
same dtype, at the Qwen2.5-7B shape (28 query heads over 4 kv heads, head dim 128).

- decode: one query per sequence over a KV cache of 512 / 2048 / 8192 tokens (batch 1). Decode is bound
  by reading the cache, so the table gives the achieved GB/s (K and V bytes read per call / time) and its
  share of the machine's read bandwidth measured in the same run. The caches are rotated over enough copies
  to exceed the last-level cache, so the figure is DRAM bandwidth, not cache bandwidth.
- prefill: 512 new tokens, causal, cache empty before; reported as GFLOP/s (4 * Hq * D * T(T+1)/2 flops).

Times are medians of --reps calls after warm-up (min and max shown); on a GPU they come from CUDA events.
On a shared machine other work competes for the cores and memory: compare the ratio of the two columns,
measured in the same run, rather than the absolute figures.

    python benchmarks/bench_attention.py [--device cpu|cuda] [--dtype bf16|fp16|fp32] [--threads N]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time

import torch
import torch.nn.functional as F

from omni_edge import _native
from omni_edge.ops import _dispatch
from omni_edge.ops import attention as A

HQ, HKV, D = 28, 4, 128  # Qwen2.5-7B (docs/MODEL.md §1.5)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
ROTATE_BYTES = 512 << 20  # total size of the rotated KV caches (well above any last-level cache)


def timed(fn, reps: int, device: torch.device):
    """Median, min, max of `reps` calls in milliseconds (fn(i) gets the call index for rotation)."""
    for i in range(3):
        fn(i)
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for i in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(i)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for i in range(reps):
            t = time.perf_counter()
            fn(i)
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times), min(times), max(times)


def read_bandwidth(device: torch.device) -> float:
    """GB/s of a large reduction (reads 1 GiB), the ceiling for decode."""
    x = torch.ones(1 << 28, dtype=torch.float32, device=device)
    med, _, _ = timed(lambda i: x.sum(), 5, device)
    return x.numel() * 4 / (med * 1e-3) / 1e9


def fmt(t) -> str:
    med, lo, hi = t
    return f"{med:8.3f} [{lo:.3f}-{hi:.3f}]"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--threads", type=int, default=None, help="CPU threads for both sides (default: all)")
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()

    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    lib = _native.lib()
    if args.threads:
        torch.set_num_threads(args.threads)
        lib.set_num_threads(args.threads)
    if not _dispatch.native_enabled("attention", device):
        raise SystemExit(f"the native attention kernels are not enabled on {device}")
    es = torch.tensor([], dtype=dtype).element_size()
    info = lib.build_info()
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"CPU, {lib.num_threads()} threads, ISA {info['isa_active']}")
    bw = read_bandwidth(device)
    print(f"# attention, {where}, dtype {args.dtype}, Hq={HQ} Hkv={HKV} D={D}, batch 1, median of {args.reps} "
          f"[min-max] ms; measured read bandwidth {bw:.1f} GB/s")
    if os.cpu_count() and device.type == "cpu":
        print(f"# load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (other work shares them)")
    print(f"{'op':<22}{'omni-edge ms':>24}{'torch sdpa ms':>26}{'speedup':>9}{'ours':>12}{'sdpa':>11}{'ours/ceil':>10}")

    g = torch.Generator().manual_seed(0)
    for ctx in (512, 2048, 8192):
        set_bytes = 2 * HKV * ctx * D * es
        n = max(1, min(64, ROTATE_BYTES // set_bytes))
        ks = [torch.randn(1, HKV, ctx, D, generator=g).to(dtype).to(device) for _ in range(n)]
        vs = [torch.randn(1, HKV, ctx, D, generator=g).to(dtype).to(device) for _ in range(n)]
        q = torch.randn(1, HQ, D, generator=g).to(dtype).to(device)
        q4 = q.view(1, HQ, 1, D)
        lengths = torch.full((1,), ctx, dtype=torch.int32, device=device)
        ours = timed(lambda i: A.decode(q, ks[i % n], vs[i % n], lengths), args.reps, device)
        peer = timed(lambda i: F.scaled_dot_product_attention(q4, ks[i % n], vs[i % n], enable_gqa=True),
                     args.reps, device)
        err = (A.decode(q, ks[0], vs[0], lengths).float()
               - F.scaled_dot_product_attention(q4, ks[0], vs[0], enable_gqa=True)[:, :, 0].float()).abs().max()
        gbs = lambda t: set_bytes / (t[0] * 1e-3) / 1e9
        print(f"{'decode ctx=' + str(ctx):<22}{fmt(ours):>24}{fmt(peer):>26}{peer[0] / ours[0]:>8.2f}x"
              f"{gbs(ours):>8.1f}GB/s{gbs(peer):>7.1f}GB/s{100 * gbs(ours) / bw:>9.0f}%   (max |diff| {err:.1e})")
        del ks, vs

    t = 512
    q = torch.randn(1, t, HQ, D, generator=g).to(dtype).to(device)
    kc = torch.randn(1, HKV, t, D, generator=g).to(dtype).to(device)
    vc = torch.randn(1, HKV, t, D, generator=g).to(dtype).to(device)
    qt = q.transpose(1, 2).contiguous()
    ours = timed(lambda i: A.prefill(q, kc, vc, start=0), max(3, args.reps // 4), device)
    peer = timed(lambda i: F.scaled_dot_product_attention(qt, kc, vc, is_causal=True, enable_gqa=True),
                 max(3, args.reps // 4), device)
    flops = 4 * HQ * D * t * (t + 1) / 2
    gf = lambda tt: flops / (tt[0] * 1e-3) / 1e9
    err = (A.prefill(q, kc, vc, start=0).float()
           - F.scaled_dot_product_attention(qt, kc, vc, is_causal=True, enable_gqa=True).transpose(1, 2).float()).abs().max()
    print(f"{'prefill T=512':<22}{fmt(ours):>24}{fmt(peer):>26}{peer[0] / ours[0]:>8.2f}x"
          f"{gf(ours):>6.1f}GFLOP/s{gf(peer):>5.1f}GFLOP/s{'':>4}   (max |diff| {err:.1e})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
