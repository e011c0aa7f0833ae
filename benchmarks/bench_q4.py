"""q4 on the CPU against the memory roofline and its peers, all in one process.

Decode: GEMV (M = 1) at the Qwen2.5-7B linear shapes, group 128, weights streamed from DRAM (every path
rotates over enough weight copies to exceed --rotate-gb, so the last-level cache cannot serve them).
Prefill: one GEMM row (M = --prefill-m) in GFLOP/s.

Columns: median / min / max milliseconds per call (each call timed alone, after warm-up), achieved GB/s over
the bytes the path reads for its weights, % of this machine's DRAM read ceiling measured at the start of
the same run (membw.py: several arrays on huge pages read by all threads with AVX loads, best of 7; a torch
triad is shown beside it), and `ours x`: the
peer's median time over ours (> 1: ours is faster). Peers:
  torch fp32          x @ W with W dense fp32 (8x the bytes)
  torch int4          aten._weight_int4pack_mm_for_cpu (bf16 activations), weights from
                      _convert_weight_to_int4pack_for_cpu
  ORT MatMulNBits L0  onnxruntime com.microsoft MatMulNBits, int4, block 128, accuracy_level 0 (fp32 math)
  ORT MatMulNBits L4  the same, accuracy_level 4 (int8 activations, like our INT8 path)
ORT runs one graph holding one MatMulNBits node per weight copy (all reading the same A; every copy's bytes
differ), so its per-call overhead is amortised as in a real model graph; its figure is (graph time) / copies.

Huge pages A/B (--hugepages-shape): two sets of copies of one layer, one left on 4 KiB pages
(OMNI_EDGE_Q4_HUGEPAGES=0 when the kernel first sees it), one collapsed to 2 MiB pages by the kernel's first
call, timed in alternating rounds at 1 and --threads threads.

Usage: python benchmarks/bench_q4.py [--threads 2] [--reps 7] [--rotate-gb 1.2] [--prefill-m 128]
       [--shapes 3584x4608,3584x3584] [--skip-peers]
Timings on a shared machine are noisy: run with `nice`, and compare ratios taken in the same run.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from omni_edge import _native
from omni_edge.ops import q4

sys.path.insert(0, str(Path(__file__).resolve().parent))  # membw.py beside this script

GROUP = 128
SHAPES = {  # (K, N): Qwen2.5-7B linears (docs/MODEL.md §1.5)
    (3584, 4608): "qkv W_pack",
    (3584, 3584): "o_proj",
    (3584, 37888): "gate+up",
    (18944, 3584): "down_proj",
    (3584, 152064): "lm_head",
}


def timed(fn, calls: int, warmup: int = 2):
    """Per-call seconds of `fn(i)` for i in range(calls), after `warmup` untimed calls."""
    for i in range(warmup):
        fn(i)
    out = []
    for i in range(calls):
        t = time.perf_counter()
        fn(i)
        out.append(time.perf_counter() - t)
    return out


def stats(ts):
    return statistics.median(ts), min(ts), max(ts)


def bandwidth(reps: int):
    """DRAM read GB/s (torch sum of 2 GB) and triad GB/s (a = b + s c over 3 x 0.67 GB): (median, best)."""
    n = int(2e9) // 4
    a = torch.ones(n)
    read = stats(timed(lambda i: a.sum(), reps, 1))
    del a
    m = n // 3
    x, y, z = torch.ones(m), torch.ones(m), torch.empty(m)
    triad = stats(timed(lambda i: torch.add(x, y, alpha=3.0, out=z), reps, 1))
    del x, y, z
    gc.collect()
    return (2e9 / read[0] / 1e9, 2e9 / read[1] / 1e9), (3 * m * 4 / triad[0] / 1e9, 3 * m * 4 / triad[1] / 1e9)


def hugepages_ab(k: int, n: int, threads_list, rotate_bytes: float, rounds: int):
    """Our INT8 GEMV on two sets of copies of one layer, one left on 4 KiB pages (OMNI_EDGE_Q4_HUGEPAGES=0 when
    the kernel first sees it) and one collapsed to 2 MiB pages by the kernel's first call, timed in
    alternating rounds in this process. Returns rows (threads, pages, median ms, GB/s)."""
    q, scales = random_layer(k, n, seed=7)
    x = torch.randn(1, k)
    sets = {}
    for pages, flag in (("4 KiB", "0"), ("2 MiB", "1")):
        ws, _ = build_ours(q, scales, rotate_bytes)
        os.environ["OMNI_EDGE_Q4_HUGEPAGES"] = flag
        t = time.perf_counter()
        for w in ws:
            q4.matmul(x, w, exact=False)  # first sight: the kernel advises (or not) this buffer
        sets[pages] = (ws, time.perf_counter() - t)
    os.environ.pop("OMNI_EDGE_Q4_HUGEPAGES", None)
    out = []
    for th in threads_list:
        _native.lib().set_num_threads(th)
        ts = {p: [] for p in sets}
        for _ in range(rounds):
            for pages, (ws, _) in sets.items():
                ts[pages] += timed(lambda i: q4.matmul(x, ws[i % len(ws)], exact=False), len(ws), 1)
        for pages in sets:
            med = statistics.median(ts[pages])
            out.append((th, pages, med, sets[pages][0][0].nbytes / med / 1e9, sets[pages][1]))
    return out


def copies_for(nbytes: int, rotate_bytes: float) -> int:
    return max(1, math.ceil(rotate_bytes / nbytes))


def random_layer(k: int, n: int, seed: int):
    """Symmetric group-128 codes q (K, N) uint8 and scales (G, N) fp16: the weights every path uses."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (k, n), generator=gen, dtype=torch.uint8)
    scales = (torch.rand(k // GROUP, n, generator=gen) * 0.01 + 0.001).half()
    return q, scales


def row(table, shape, path, ts, nbytes, bw_read, ours_med, flops=None):
    """bw_read = (median, best) read bandwidth: median time is judged against the median ceiling, the best
    (minimum) time against the best ceiling."""
    med, lo, hi = stats(ts)
    if flops:
        rate = f"{flops / med / 1e9:7.1f} GFLOP/s (best {flops / lo / 1e9:6.1f})".ljust(33)
    else:
        gbs, best = nbytes / med / 1e9, nbytes / lo / 1e9
        rate = f"{gbs:5.1f} GB/s {100 * gbs / bw_read[0]:4.0f}% | {best:5.1f} {100 * best / bw_read[1]:4.0f}%"
    ratio = "" if ours_med is None else f"{med / ours_med:6.2f}"
    table.append(f"{shape:<22} {path:<22} {med * 1e3:9.3f} {lo * 1e3:9.3f} {hi * 1e3:9.3f}  {rate}  {ratio}")


def bench_ours(x, ws, reps, exact):
    calls = max(reps, 2 * len(ws))
    return timed(lambda i: q4.matmul(x, ws[i % len(ws)], exact=exact), calls)


def build_ours(q, scales, rotate_bytes):
    k, n = q.shape
    zeros = torch.full((k // GROUP, n), 8, dtype=torch.uint8)
    g_idx = (torch.arange(k) // GROUP).to(torch.int32)
    t = time.perf_counter()
    w = q4.QWeight(q, zeros, scales, g_idx, GROUP, True)
    pack_s = time.perf_counter() - t
    ncopies = copies_for(w.nbytes, rotate_bytes)
    ws = [w] + [q4.QWeight._from_packed({"codes": w.codes.clone(), "scales": w.tile_scales.clone(),
                                         "zeros": w.tile_zeros.clone(), "perm": w.perm,
                                         "block_group": w.block_group}, k, n, GROUP, True, None)
                for _ in range(ncopies - 1)]
    return ws, pack_s


def bench_torch_fp32(q, scales, x, rotate_bytes, reps):
    k, n = q.shape
    nbytes = 4 * k * n
    nc = copies_for(nbytes, rotate_bytes)
    w = torch.empty(n, k)  # torch Linear layout (N, K)
    for n0 in range(0, n, 8192):
        n1 = min(n, n0 + 8192)
        w[n0:n1] = ((q[:, n0:n1].float() - 8) * scales[:, n0:n1].float().repeat_interleave(GROUP, 0)).t()
    ws = [w] + [w.clone() for _ in range(nc - 1)]
    ts = timed(lambda i: torch.nn.functional.linear(x, ws[i % nc]), max(reps, 2 * nc))
    ref = torch.nn.functional.linear(x, w)
    del ws, w
    return ts, nbytes, ref


def bench_torch_int4(q, scales, x, rotate_bytes, reps):
    k, n = q.shape
    op_pack = torch.ops.aten._convert_weight_to_int4pack_for_cpu
    op_mm = torch.ops.aten._weight_int4pack_mm_for_cpu
    packed = torch.cat([op_pack(q[:, n0:n0 + 4096].t().contiguous().to(torch.int32), 2)
                        for n0 in range(0, n, 4096)])  # rows independent in blocks of 64: chunking is exact
    # torch's convention: w = (q - 8) * scale + zero, so symmetric codes take zero = 0
    sz = torch.stack([scales.float(), torch.zeros(k // GROUP, n)], dim=2).to(torch.bfloat16).contiguous()
    nbytes = packed.numel() * packed.element_size() + sz.numel() * 2
    nc = copies_for(nbytes, rotate_bytes)
    ps = [(packed, sz)] + [(packed.clone(), sz.clone()) for _ in range(nc - 1)]
    xb = x.to(torch.bfloat16)
    ts = timed(lambda i: op_mm(xb, ps[i % nc][0], GROUP, ps[i % nc][1]), max(reps, 2 * nc))
    out = op_mm(xb, packed, GROUP, sz).float()
    del ps, packed
    return ts, nbytes, out


def bench_ort(q, scales, x, rotate_bytes, reps, level, threads):
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    k, n = q.shape
    kb = k // GROUP
    qt = q.t().contiguous().numpy().reshape(n, kb, GROUP)
    b = (qt[:, :, 0::2] | (qt[:, :, 1::2] << 4)).astype(np.uint8)  # low nibble = even k; zero point 8 implied
    del qt
    sc = scales.float().t().contiguous().numpy().reshape(n * kb)
    nbytes = b.nbytes + sc.nbytes
    nc = min(copies_for(nbytes, rotate_bytes), max(1, int(1.8e9 // nbytes)))  # protobuf: < 2 GB per model
    nodes, inits = [], []
    for c in range(nc):
        nodes.append(helper.make_node("MatMulNBits", ["A", f"B{c}", f"S{c}"], [f"Y{c}"], domain="com.microsoft",
                                      K=k, N=n, bits=4, block_size=GROUP, accuracy_level=level))
        # distinct bytes per copy: with identical initializers onnxruntime ends up reading one copy from cache
        # (measured: 2.4x faster than with distinct weights), which would not be a DRAM figure
        inits += [numpy_helper.from_array(b ^ np.uint8(c % 251), f"B{c}"), numpy_helper.from_array(sc, f"S{c}")]
    graph = helper.make_graph(nodes, "q4", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, k])],
                              [helper.make_tensor_value_info(f"Y{c}", TensorProto.FLOAT, [None, n]) for c in range(nc)],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    del inits
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    del model
    feed = {"A": x.numpy()}
    runs = timed(lambda i: sess.run(None, feed), max(3, reps // 2 + 1), 1)
    out = torch.from_numpy(sess.run(["Y0"], feed)[0])
    del sess
    gc.collect()
    return [t / nc for t in runs], nbytes, out


def check(name, got, ref, rel):
    err = float((got.float() - ref.float()).abs().max() / ref.float().abs().max())
    if not err < rel:
        raise SystemExit(f"{name}: result off by {err:.3g} (relative to max |y|), expected < {rel}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--rotate-gb", type=float, default=1.2)
    ap.add_argument("--prefill-m", type=int, default=128)
    ap.add_argument("--shapes", default=",".join(f"{k}x{n}" for k, n in SHAPES))
    ap.add_argument("--skip-peers", action="store_true")
    ap.add_argument("--hugepages-shape", default="3584x18944",
                    help="layer of the 4 KiB vs 2 MiB pages A/B ('' to skip)")
    args = ap.parse_args()
    lib = _native.lib()
    torch.set_num_threads(args.threads)
    lib.set_num_threads(args.threads)
    rot = args.rotate_gb * 1e9
    info = lib.build_info()
    load0 = os.getloadavg()
    bw_read, bw_triad = bandwidth(args.reps)
    import membw  # benchmarks/membw.py: the multi-stream read ceiling

    ceiling = membw.read_bandwidth(args.threads)
    if ceiling:  # judge both the median and the best time against the read kernel's best figure
        bw_read = (ceiling, ceiling)
    print(f"q4 CPU benchmark: {args.threads} threads, ISA {info['isa_active']} "
          f"(avx512vnni={info['cpu_features']['avx512vnni']}), group {GROUP}, symmetric, M=1 decode; "
          f"weights rotated over >= {args.rotate_gb} GB")
    print(f"DRAM read ceiling: {bw_read[0]:.1f} GB/s " + ("(membw.py: 4 streams x 256 MiB on huge pages, all threads, "
          "AVX loads, best of 7)" if ceiling else "(2 GB torch sum: no C compiler for membw.py)")
          + f"; triad {bw_triad[0]:.1f} | {bw_triad[1]:.1f} GB/s (torch, median | best); load average at start "
          f"{load0[0]:.2f}")
    print("rate: GB/s over the path's weight bytes and % of read bandwidth, at the median time | at the best time "
          "against the best read figure; ours x = peer median / our int8 median")
    hdr = f"{'shape (K x N)':<22} {'path':<22} {'median ms':>9} {'min':>9} {'max':>9}  {'rate':<33} ours x"
    table = [hdr, "-" * len(hdr)]
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",") if s]
    for (k, n) in shapes:
        label = f"{k}x{n} {SHAPES.get((k, n), '')}".strip()
        q, scales = random_layer(k, n, seed=k + n)
        x = torch.randn(1, k)
        start = len(table)
        ws, pack_s = build_ours(q, scales, rot)
        nbytes = ws[0].nbytes
        y_ours = q4.matmul(x, ws[0], exact=True)
        t8 = bench_ours(x, ws, args.reps * 4, exact=False)
        te = bench_ours(x, ws, args.reps * 2, exact=True)
        med8 = stats(t8)[0]
        row(table, label, f"ours int8 ({len(ws)} cp)", t8, nbytes, bw_read, None)
        row(table, "", "ours exact", te, nbytes, bw_read, med8)
        del ws
        gc.collect()
        if not args.skip_peers:
            for level in (4, 0):
                ts, nb, out = bench_ort(q, scales, x, rot, args.reps, level, args.threads)
                check(f"ORT L{level}", out, y_ours, 2e-2 if level == 4 else 1e-4)
                row(table, "", f"ORT MatMulNBits L{level}", ts, nb, bw_read, med8)
            ts, nb, out = bench_torch_int4(q, scales, x, rot, args.reps)
            check("torch int4", out, y_ours, 2e-2)
            row(table, "", "torch int4 (bf16 x)", ts, nb, bw_read, med8)
            ts, nb, out = bench_torch_fp32(q, scales, x, rot, args.reps)
            check("torch fp32", out, y_ours, 1e-4)
            row(table, "", "torch fp32", ts, nb, bw_read, med8)
        table.append(f"{'':<22} (repack from codes, once: {pack_s:.2f} s; {nbytes / 1e6:.1f} MB per copy)")
        del q, scales
        gc.collect()
        print("\n".join(table[:2] + table[start:]) if start == 2 else "\n".join(table[start:]), flush=True)

    # prefill GEMM
    k, n, m = 3584, 18944, args.prefill_m
    q, scales = random_layer(k, n, seed=1)
    ws, _ = build_ours(q, scales, 0)
    x = torch.randn(m, k)
    flops = 2.0 * m * k * n
    t8 = timed(lambda i: q4.matmul(x, ws[0], exact=False), max(3, args.reps // 2), 1)
    te = timed(lambda i: q4.matmul(x, ws[0], exact=True), max(3, args.reps // 2), 1)
    label = f"prefill M={m} {k}x{n}"
    table.append(f"{'':-<22}")
    start = len(table)
    row(table, label, "ours int8", t8, 0, bw_read, None, flops)
    row(table, "", "ours exact", te, 0, bw_read, stats(t8)[0], flops)
    if not args.skip_peers:
        w = torch.empty(n, k)
        for n0 in range(0, n, 8192):
            w[n0:n0 + 8192] = ((q[:, n0:n0 + 8192].float() - 8) * scales[:, n0:n0 + 8192].float().repeat_interleave(GROUP, 0)).t()
        tf = timed(lambda i: torch.nn.functional.linear(x, w), max(3, args.reps // 2), 1)
        row(table, "", "torch fp32", tf, 0, bw_read, stats(t8)[0], flops)
        ts, _, _ = bench_ort(q, scales, x, 0, args.reps, 4, args.threads)
        row(table, "", "ORT MatMulNBits L4", ts, 0, bw_read, stats(t8)[0], flops)
    print("\n".join(table[start:]))
    if args.hugepages_shape:
        k, n = (int(v) for v in args.hugepages_shape.split("x"))
        print(f"\nhuge pages A/B, {k}x{n} int8 GEMV, copies over >= {args.rotate_gb} GB, alternating rounds:")
        for th, pages, med, gbs, first_s in hugepages_ab(k, n, sorted({1, args.threads}), rot, 3):
            table_row = (f"  {th} thread(s) {pages:>6} pages: {med * 1e3:8.3f} ms  {gbs:5.1f} GB/s "
                         f"{100 * gbs / bw_read[0]:4.0f}%  (first calls incl. advice: {first_s:.2f} s)")
            print(table_row)
            table.append(table_row)
        _native.lib().set_num_threads(args.threads)
    print("\nFull table:\n" + "\n".join(table))
    print(f"load average at end {os.getloadavg()[0]:.2f} (2-core machine; > 2 means other work shared the cores)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
