"""Audio-head benchmark: time per 80 ms frame of the incremental 8-slot head against the reference decode loop's
way of running it (the whole 8-slot head re-run for each of the 8 codes), in the same run, at the real size.

Shapes (MODEL.md §1.6): width 3584, 28 heads x 128, 3 layers, 8 slots, slot FFN 3584 -> 7168 -> 3584, heads
8193 / 4097 / 2049 / 1025 x 5 outputs; random weights (1.46 B head parameters + the 70 M audio embedding rows).
Codes are picked by argmax so both sides do the same picks (sampling costs the same on both sides).

Per frame the incremental head reads each slot's FFN block and each output head once, and the attention
projections once per sub-step (slot l's input needs code l-1); the re-run reads everything 8 times. The table
gives the weight bytes each side reads per frame, the achieved GB/s and its share of the read bandwidth measured
in the same run (a torch sum over 2 GiB), and the ratio of the two times. One frame must take < 80 ms to keep up
with speech (12.5 frames/s) on top of the backbone step.

    python benchmarks/bench_head.py [--dtypes fp32,bf16] [--device cpu|cuda] [--threads N] [--reps 3]
                                    [--width 3584] [--layers 3]
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import time

import torch

from omni_edge.audio_head import HEAD_DIM, AudioHead, DepthLayer

CODEBOOKS = [8192, 4096, 2048, 1024, 1024, 1024, 1024, 1024]  # vq_config.codebook_sizes
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def random_head(width: int, layers: int, dtype, device, seed: int = 0) -> AudioHead:
    """A head at the given size with N(0, 1/fan_in) weights, built directly in the repacked layout and dtype
    (no fp32 copy of the 1.46 B parameters is ever held)."""
    g = torch.Generator().manual_seed(seed)
    c, s = width, len(CODEBOOKS)

    def randn(*shape, scale=1.0):
        t = torch.empty(shape, dtype=dtype)
        for row in t.view(-1, shape[-1]).split(4096):  # fill in slices: bounded fp32 scratch
            row.copy_(torch.randn(row.shape, generator=g) * scale)
        return t.to(device)

    def norm():
        return (1.0 + 0.1 * torch.randn(c, generator=g)).to(dtype=dtype, device=device)

    ls = [DepthLayer(ln1=norm(), in_w=randn(3 * c, c, scale=c ** -0.5), in_b=randn(3 * c, scale=0.1),
                     out_w=randn(c, c, scale=c ** -0.5), out_b=randn(c, scale=0.1), ln2=norm(),
                     w1=randn(s, 2 * c, c, scale=c ** -0.5), w2=randn(s, c, 2 * c, scale=(2 * c) ** -0.5))
          for _ in range(layers)]
    heads_w = [randn(n + 1, c, scale=c ** -0.5) for n in CODEBOOKS]
    heads_b = [randn(n + 1, scale=0.1) for n in CODEBOOKS]
    embed = [randn(n + 1, c) for n in CODEBOOKS]
    return AudioHead(c, CODEBOOKS, ls, norm(), heads_w, heads_b, embed)


def frame_bytes(head: AudioHead):
    """(incremental, re-run) weight bytes read per frame."""
    es = head.dtype.itemsize
    attn = sum(l.in_w.numel() + l.in_b.numel() + l.out_w.numel() + l.out_b.numel() + 2 * l.ln1.numel()
               for l in head.layers)
    ffn = sum(l.w1.numel() + l.w2.numel() for l in head.layers)
    heads = sum(w.numel() + b.numel() for w, b in zip(head.heads_w, head.heads_b))
    whole = attn + ffn + heads + head.headnorm.numel()
    incremental = head.depth * (attn + head.headnorm.numel()) + ffn + heads
    return incremental * es, head.depth * whole * es


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, reps: int, device, warmup: int = 1):
    for _ in range(warmup):
        fn()
    sync(device)
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync(device)
        ts.append((time.perf_counter() - t) * 1e3)
    return statistics.median(ts), min(ts), max(ts)


def read_bandwidth(device) -> float:
    """GB/s of a torch sum over 2 GiB of fp32 (the decode roofline figure used by the other benchmarks)."""
    a = torch.ones(512 * 1024 * 1024, device=device)
    med, _, _ = timed(lambda: a.sum(), 5, device)
    del a
    gc.collect()
    return 2 * 1024 ** 3 / (med * 1e-3) / 1e9


def rerun_frame(head: AudioHead, hidden: torch.Tensor) -> torch.Tensor:
    """The reference decode loop: for each slot i the whole 8-slot head runs with the codes chosen so far (zeros
    elsewhere), and only slot i's logits are used."""
    codes = torch.zeros((hidden.shape[0], head.depth), dtype=torch.long, device=hidden.device)
    for i in range(head.depth):
        logits = head.full_logits(hidden, codes)[i]
        codes[:, i] = (logits if i == 0 else logits[:, :-1]).argmax(-1)
    return codes


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--width", type=int, default=3584)
    ap.add_argument("--layers", type=int, default=3)
    args = ap.parse_args()
    if args.width % HEAD_DIM:
        raise SystemExit(f"--width must be a multiple of {HEAD_DIM}, got {args.width}")
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"CPU, {torch.get_num_threads()} threads")
    bw = read_bandwidth(device)
    print(f"# audio head, {where}; width {args.width}, {args.layers} layers, 8 slots, codebooks {CODEBOOKS}; "
          f"median of {args.reps} frames [min-max] ms; read bandwidth {bw:.1f} GB/s (sum over 2 GiB)")
    if device.type == "cpu":
        print(f"# load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (other work shares them)")
    print(f"{'dtype':<6}{'path':<14}{'ms/frame':>26}{'GB/frame':>10}{'GB/s':>8}{'% bw':>7}{'frames/s':>10}"
          f"{'speedup':>9}")
    for name in args.dtypes.split(","):
        dtype = DTYPES[name]
        head = random_head(args.width, args.layers, dtype, device)
        hidden = torch.randn(1, args.width, generator=torch.Generator().manual_seed(1)).to(device, dtype)
        inc = head.run_frame(hidden, lambda slot, logits: logits.argmax(-1))
        ref = rerun_frame(head, hidden)
        same = bool(torch.equal(inc, ref))
        b_inc, b_ref = frame_bytes(head)
        t_inc = timed(lambda: head.run_frame(hidden, lambda slot, logits: logits.argmax(-1)), args.reps, device)
        t_ref = timed(lambda: rerun_frame(head, hidden), args.reps, device)
        for path, t, b, sp in (("incremental", t_inc, b_inc, t_ref[0] / t_inc[0]), ("8x re-run", t_ref, b_ref, 1.0)):
            gbs = b / (t[0] * 1e-3) / 1e9
            print(f"{name:<6}{path:<14}{t[0]:>10.1f} [{t[1]:.1f}-{t[2]:.1f}]".ljust(46)
                  + f"{b / 1e9:>10.2f}{gbs:>8.1f}{100 * gbs / bw:>6.0f}%{1e3 / t[0]:>10.2f}{sp:>8.2f}x")
        print(f"# {name}: incremental and re-run picked {'the same' if same else 'DIFFERENT'} codes {inc[0].tolist()}")
        del head
        gc.collect()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
