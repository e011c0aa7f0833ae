"""`omni-edge bench --model PATH`: how fast a model's backbone prefills and decodes here, against the memory
bandwidth measured in the same run (PERFORMANCE.md).

    omni-edge bench --model PATH [--device cpu|cuda] [--prompt-tokens N] [--decode-tokens N] [--threads N] [--json]

What is measured, `repeats` times after one untimed warm-up (which also captures the CUDA graph):
- prefill: a random prompt of N tokens (seeded) from position 0, then the lm_head and an argmax of the last
  position; prompt tok/s = N / time. Time to first token = that same time (the first token is then on the
  host).
- decode: N steps of `Backbone.decode_step` after that prompt, each feeding the previous argmax (on a GPU
  the token never leaves the device, so the loop does not wait for the host); decode tok/s = 1 / the median
  step time over every step of every repeat. On a GPU whose step replays a CUDA graph, the same decode run
  eagerly (OMNI_EDGE_CUDA_GRAPH=0) is measured in the same run as the peer, with the ratio.
- peak memory: the process's peak resident set (CPU; it includes the load) or torch's peak allocated CUDA
  memory since the model was loaded (weights, cache, graph pools).
- bytes per decode token: what one step must stream: every weight as held (4-bit codes + scales + zeros +
  bias, dense matrices at their dtype, norms, the lm_head and one embedding row) plus the K/V cache read at
  the mean decode position. Achieved GB/s = bytes per token x decode tok/s.
- bandwidth: CPU: a multi-stream read measured here (`cpu_read_bandwidth`: each thread reduces several
  arrays, together `bandwidth_mb` MiB, far larger than the last-level cache, interleaved in 1 MiB slices so
  several DRAM streams are open at once), median of 5; CUDA: a device-to-device copy timed with CUDA events
  (read + write bytes), median of 10. The percent is of that figure.

Timing: time.perf_counter on the CPU; CUDA events on a GPU (host clocks around async launches measure the
launches, not the work). `benchmarks/bench_backbone.py` calls `bench_backbone`, `decode_bytes` and the two
bandwidth functions for its own backbones.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

from omni_edge import cli_args  # torch is imported where used: `omni-edge --help` stays light

DEFAULT_PROMPT_TOKENS = 128
DEFAULT_DECODE_TOKENS = 64
DEFAULT_REPEATS = 3
DEFAULT_BANDWIDTH_MB = 1024
SLICE_BYTES = 1 << 20  # CPU read: bytes of one array read before moving to the thread's next array
CACHE_SLICE_BYTES = 256 << 10  # the reader's ceiling is measured on this much, which stays in L2
READER_BOUND = 0.8  # a DRAM read above this fraction of the reader's ceiling is flagged as reader-bound


def _stats(values: List[float]) -> Dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


# ------------------------------------------------------------------------------------------------
# Bandwidth
# ------------------------------------------------------------------------------------------------

def _pool_threads() -> int:
    """The native kernels' pool size: OMNI_EDGE_THREADS / --threads, else every CPU this process may use."""
    from omni_edge import knobs

    return knobs.settings().threads or knobs.cpu_count()


def cpu_read_bandwidth(threads: int, *, total_bytes: int = DEFAULT_BANDWIDTH_MB << 20, streams: int = 8,
                       reps: int = 5) -> Dict[str, float]:
    """Multi-stream DRAM read: `threads` threads each own `streams` uint64 arrays (together `total_bytes`)
    and OR-reduce them slice by slice, round robin over their arrays, so threads x streams sequential
    streams are in flight. numpy releases the GIL inside the reductions. Returns GB/s (1e9 bytes/s) as
    median / min / max over `reps` passes, with the conditions."""
    import numpy as np

    if threads < 1 or streams < 1 or reps < 1:
        raise ValueError(f"cpu_read_bandwidth: threads, streams and reps must be >= 1, "
                         f"got {threads}, {streams}, {reps}")
    per_array = max(SLICE_BYTES, total_bytes // (threads * streams)) // 8 * 8
    words = per_array // 8
    arrays = [[np.full(words, i * streams + j + 1, dtype=np.uint64) for j in range(streams)] for i in range(threads)]
    slice_words = SLICE_BYTES // 8
    sinks = [0] * threads

    def read(i: int) -> None:
        acc = np.uint64(0)
        mine = arrays[i]
        for off in range(0, words, slice_words):
            for a in mine:
                acc |= np.bitwise_or.reduce(a[off:off + slice_words])
        sinks[i] = int(acc)

    def one_pass() -> float:
        workers = [threading.Thread(target=read, args=(i,)) for i in range(threads)]
        t0 = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        return time.perf_counter() - t0

    one_pass()  # warm-up: page faults are already taken by np.full; this settles the threads and caches
    nbytes = threads * streams * per_array
    rates = [nbytes / one_pass() / 1e9 for _ in range(reps)]

    # The reader's own ceiling: the same reduction over a slice that stays in the L2 cache. A DRAM figure
    # close to it means the reduction, not the memory, set the pace (the figure then understates DRAM).
    hot = [a[0][: CACHE_SLICE_BYTES // 8] for a in arrays]
    hot_reps = max(1, nbytes // (CACHE_SLICE_BYTES * threads))

    def read_hot(i: int) -> None:
        acc = np.uint64(0)
        for _ in range(hot_reps):
            acc |= np.bitwise_or.reduce(hot[i])
        sinks[i] |= int(acc)

    def hot_pass() -> float:
        workers = [threading.Thread(target=read_hot, args=(i,)) for i in range(threads)]
        t0 = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        return time.perf_counter() - t0

    hot_pass()
    ceiling = statistics.median(threads * hot_reps * CACHE_SLICE_BYTES / hot_pass() / 1e9 for _ in range(reps))
    expect = 0
    for i in range(threads):
        for j in range(streams):
            expect |= i * streams + j + 1
    if int(np.bitwise_or.reduce(np.array(sinks, dtype=np.uint64))) != expect:  # the reads really happened
        raise RuntimeError("cpu_read_bandwidth: the reduction result is wrong")
    return {**_stats(rates), "bytes": nbytes, "threads": threads, "streams": threads * streams, "reps": reps,
            "reader_ceiling": ceiling,
            "kind": f"{threads * streams}-stream read, {threads} thread(s), {nbytes / 2**20:.0f} MiB"}


def cuda_copy_bandwidth(device, *, nbytes: int = DEFAULT_BANDWIDTH_MB << 20, reps: int = 10) -> Dict[str, float]:
    """Device-to-device copy of `nbytes` (capped at a quarter of the free memory), timed with CUDA events;
    GB/s counts the bytes read plus the bytes written. Median / min / max over `reps` copies."""
    import torch

    device = torch.device(device)
    free, _ = torch.cuda.mem_get_info(device)
    nbytes = max(1 << 20, min(nbytes, free // 4)) // 16 * 16
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for a, b in events:
        a.record()
        dst.copy_(src)
        b.record()
    torch.cuda.synchronize(device)
    rates = [2 * nbytes / (a.elapsed_time(b) / 1e3) / 1e9 for a, b in events]
    del src, dst
    return {**_stats(rates), "bytes": nbytes, "reps": reps,
            "kind": f"device-to-device copy of {nbytes / 2**20:.0f} MiB (read + write), CUDA events"}


# ------------------------------------------------------------------------------------------------
# Bytes per decode token
# ------------------------------------------------------------------------------------------------

def _tensor_bytes(t) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def linear_bytes(lin) -> int:
    """Bytes a matmul with this backbone Linear streams: 4-bit codes + scales + zeros (+ perm, block_group)
    and the fp32 bias the kernels read, or the dense weight and bias."""
    if lin.quantized:
        w = lin.qweight
        return w.nbytes + (0 if w.bias is None else 4 * w.out_features)
    return lin.nbytes + _tensor_bytes(lin.bias)  # dense or int8 (q8 lm_head) weight


def decode_bytes(bb, keys: float) -> Dict[str, float]:
    """Bytes one decode step of batch 1 streams with `keys` cached positions to attend to: weights as held
    (every layer's linears and norms, the final norm, the lm_head, one embedding row) and the K/V read."""
    cfg = bb.config
    weights = _tensor_bytes(bb.norm) + linear_bytes(bb.lm_head) + cfg.hidden_size * bb.embed_tokens.element_size()
    for layer in bb.layers:
        weights += _tensor_bytes(layer.input_layernorm) + _tensor_bytes(layer.post_attention_layernorm)
        weights += sum(linear_bytes(lin) for lin in layer.linears.values())
    import torch

    elt = torch.empty((), dtype=bb.dtype).element_size()  # the cache holds K/V in the activation dtype
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * elt * float(keys)
    return {"weights": float(weights), "kv": kv, "total": weights + kv}


# ------------------------------------------------------------------------------------------------
# The measurement
# ------------------------------------------------------------------------------------------------

class _Clock:
    """Host clock on the CPU, CUDA events on a GPU: start(), stop() -> a handle; seconds(handle) after sync()."""

    def __init__(self, device):
        import torch

        self.torch = torch
        self.cuda = device.type == "cuda"
        self.device = device

    def start(self):
        if self.cuda:
            e = self.torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def stop(self, begin):
        if self.cuda:
            e = self.torch.cuda.Event(enable_timing=True)
            e.record()
            return begin, e
        return begin, time.perf_counter()

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize(self.device)

    def seconds(self, span) -> float:
        a, b = span
        return a.elapsed_time(b) / 1e3 if self.cuda else b - a


def bench_backbone(bb, *, prompt_tokens: int, decode_tokens: int, repeats: int = DEFAULT_REPEATS,
                   seed: int = 0) -> Dict[str, object]:
    """Prefill `prompt_tokens` random tokens then decode `decode_tokens` greedily, `repeats` times after one
    warm-up, on a Backbone whose cache holds at least prompt_tokens + decode_tokens positions (batch 1).
    Returns prefill / time-to-first-token / decode figures (medians with min and max) and bytes per token."""
    import torch

    with torch.inference_mode():
        return _bench_backbone(bb, prompt_tokens, decode_tokens, repeats, seed)


def _bench_backbone(bb, prompt_tokens: int, decode_tokens: int, repeats: int, seed: int):
    import torch

    from omni_edge import knobs

    if bb.batch != 1 or bb.max_len < prompt_tokens + decode_tokens:
        raise ValueError(f"bench: the cache must be batch 1 with >= {prompt_tokens + decode_tokens} positions, "
                         f"got batch {bb.batch}, {bb.max_len} positions")
    dev = bb.device
    clock = _Clock(dev)
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, bb.config.vocab_size, (1, prompt_tokens), generator=gen).to(dev)

    def one(steps: int):
        t = clock.start()
        h = bb.forward(prompt, start=0)
        tok = bb.logits(h[:, -1]).argmax(-1, keepdim=True)  # (1, 1)
        first = int(tok)  # the first token reaches the host: the time to first token ends here
        prefill = clock.stop(t)
        spans = []
        for i in range(steps):
            t = clock.start()
            _, logits = bb.decode_step(tok, start=prompt_tokens + i)
            tok = logits.argmax(-1, keepdim=True)
            spans.append(clock.stop(t))
        last = int(tok)
        clock.sync()
        return clock.seconds(prefill), [clock.seconds(s) for s in spans], (first, last)

    one(min(decode_tokens, 2))  # warm-up: kernel self-checks, CUDA graph capture, caches
    prefill_s, step_s = [], []
    for _ in range(repeats):
        p, steps, _ = one(decode_tokens)
        prefill_s.append(p)
        step_s.extend(steps)
    keys = prompt_tokens + (decode_tokens + 1) / 2  # mean keys attended over the decode positions
    peer = {}
    if dev.type == "cuda" and knobs.settings().cuda_graph and bb.decode_path().startswith("cuda graph"):
        # the peer in the same run: the same step run eagerly (the launches one by one from Python)
        with knobs.override(cuda_graph=False):
            eager_s = []
            for _ in range(repeats):
                eager_s.extend(one(decode_tokens)[1])
        peer = {"decode_tok_s_eager": _stats([1 / s for s in eager_s])}
    return {
        "prompt_tokens": prompt_tokens, "decode_tokens": decode_tokens, "repeats": repeats,
        "prefill_tok_s": _stats([prompt_tokens / s for s in prefill_s]),
        "ttft_ms": _stats([1e3 * s for s in prefill_s]),
        "decode_tok_s": _stats([1 / s for s in step_s]),
        "decode_step_ms": _stats([1e3 * s for s in step_s]),
        "bytes_per_token": decode_bytes(bb, keys),
        "decode_path": bb.decode_path(),
        **peer,
    }


def peak_rss_bytes() -> int:
    """The process's peak resident set size so far (Linux reports KiB, macOS bytes)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def run_bench(path, *, device: str = "cpu", prompt_tokens: int = DEFAULT_PROMPT_TOKENS,
              decode_tokens: int = DEFAULT_DECODE_TOKENS, threads: Optional[int] = None,
              repeats: int = DEFAULT_REPEATS, dtype: Optional[str] = None, quant: str = "none",
              lm_head: Optional[str] = None,
              bandwidth_mb: int = DEFAULT_BANDWIDTH_MB, seed: int = 0) -> Dict[str, object]:
    """Load the model at `path` (pipeline.load: ModelLoadError, a ValueError, for a bad folder or device),
    benchmark its backbone and measure the bandwidth; returns the result dict that `--json` prints."""
    import torch

    from omni_edge import pipeline
    from omni_edge.config import load_config

    need = prompt_tokens + decode_tokens
    if not Path(path).is_dir():
        raise pipeline.ModelLoadError(f"model path {path} is not a folder (expected a checkpoint or bundle folder)"
                                      if Path(path).exists() else f"model path {path} does not exist")
    try:
        limit = int(load_config(path).backbone.max_position_embeddings)
    except (OSError, ValueError) as e:
        raise pipeline.ModelLoadError(f"{path}: {pipeline._one_line(e)}") from None
    if need > limit:
        raise ValueError(f"--prompt-tokens + --decode-tokens = {need} exceeds the model's context of {limit} "
                         f"positions (max_position_embeddings)")
    model = pipeline.load(path, device=device, dtype=dtype, quant=quant, max_context=max(2, need), threads=threads,
                          lm_head=lm_head)
    bb = model.backbone
    dev, dtype_used = bb.device, str(bb.dtype).replace("torch.", "")
    model_lm_head = bb.lm_head.format
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    result = bench_backbone(bb, prompt_tokens=prompt_tokens, decode_tokens=decode_tokens, repeats=repeats, seed=seed)
    if dev.type == "cuda":
        peak = {"bytes": int(torch.cuda.max_memory_allocated(dev)), "kind": "torch peak CUDA memory allocated"}
        bandwidth = cuda_copy_bandwidth(dev, nbytes=bandwidth_mb << 20)
        props = torch.cuda.get_device_properties(dev)
        hardware = f"{props.name} (sm_{props.major}{props.minor})"
    else:
        peak = {"bytes": peak_rss_bytes(), "kind": "process peak RSS"}
        n = threads or _pool_threads()
        del model, bb  # the bandwidth arrays need not sit on top of the weights
        bandwidth = cpu_read_bandwidth(n, total_bytes=bandwidth_mb << 20)
        hardware = _cpu_name()
    achieved = result["bytes_per_token"]["total"] * result["decode_tok_s"]["median"] / 1e9
    cfg = load_config(path).backbone
    return {
        "model": str(path), "device": str(dev), "hardware": hardware,
        "threads": threads or _pool_threads(),
        "dtype": dtype_used,
        "quant": quant, "lm_head": model_lm_head, "shape": {"layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size,
                                  "heads": cfg.num_attention_heads, "kv_heads": cfg.num_key_value_heads,
                                  "vocab": cfg.vocab_size},
        **result,
        "peak_memory": peak,
        "bandwidth_gb_s": bandwidth,
        "achieved_gb_s": achieved,
        "percent_of_bandwidth": 100.0 * achieved / bandwidth["median"],
        "torch": torch.__version__,
    }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


# ------------------------------------------------------------------------------------------------
# Output
# ------------------------------------------------------------------------------------------------

def _range(s: Dict[str, float], fmt: str) -> str:
    return f"{format(s['min'], fmt)} .. {format(s['max'], fmt)}"


def format_table(r: Dict[str, object]) -> str:
    """The result as a Markdown table with its conditions above it."""
    b = r["bytes_per_token"]
    bw = r["bandwidth_gb_s"]
    sh = r["shape"]
    rows = [
        ("prefill", f"{r['prefill_tok_s']['median']:.1f} tok/s", _range(r["prefill_tok_s"], ".1f"),
         f"{r['prompt_tokens']}-token prompt"),
        ("time to first token", f"{r['ttft_ms']['median']:.1f} ms", _range(r["ttft_ms"], ".1f"),
         "prefill + lm_head + argmax"),
        ("decode", f"{r['decode_tok_s']['median']:.1f} tok/s", _range(r["decode_tok_s"], ".1f"),
         f"median of {r['decode_tokens']} steps x {r['repeats']}"),
    ]
    if "decode_tok_s_eager" in r:
        e = r["decode_tok_s_eager"]
        rows.append(("decode, eager step (peer)", f"{e['median']:.1f} tok/s", _range(e, ".1f"),
                     f"no CUDA graph, same run: the graph is {r['decode_tok_s']['median'] / e['median']:.2f}x"))
    rows += [
        ("peak memory", f"{r['peak_memory']['bytes'] / 2**20:.0f} MiB", "", r["peak_memory"]["kind"]),
        ("bytes per decode token", f"{b['total'] / 1e6:.2f} MB", "",
         f"weights {b['weights'] / 1e6:.2f} MB + KV {b['kv'] / 1e6:.2f} MB"),
        ("achieved", f"{r['achieved_gb_s']:.2f} GB/s", "",
         f"{r['percent_of_bandwidth']:.1f}% of the measured bandwidth"),
        ("measured bandwidth", f"{bw['median']:.1f} GB/s", _range(bw, ".1f"), bw["kind"]),
    ]
    if "reader_ceiling" in bw:
        bound = bw["median"] > READER_BOUND * bw["reader_ceiling"]
        rows.append(("read loop ceiling", f"{bw['reader_ceiling']:.1f} GB/s", "",
                     "same reduction on L2-resident data" + (
                         ": the read above is bound by the loop, so it understates DRAM" if bound else "")))
    head = (f"omni-edge bench: {r['model']}\n"
            f"device {r['device']} ({r['hardware']}), {r['threads']} thread(s), {r['dtype']}, quant {r['quant']}, lm_head {r['lm_head']}, "
            f"{sh['layers']} layers, hidden {sh['hidden']}, heads {sh['heads']}/{sh['kv_heads']}, vocab {sh['vocab']}\n"
            f"decode path: {r['decode_path']}\n")
    lines = ["| metric | median | min .. max | conditions |", "|---|---|---|---|"]
    lines += [f"| {a} | {b_} | {c} | {d} |" for a, b_, c, d in rows]
    return head + "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# The subcommand
# ------------------------------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="PATH", help="checkpoint folder or edge bundle")
    p.add_argument("--device", default="cpu", type=cli_args.device, metavar="DEV",
                   help="cpu or cuda (cuda:N for another GPU); default cpu")
    p.add_argument("--prompt-tokens", type=cli_args.int_range(1, 1 << 20), default=DEFAULT_PROMPT_TOKENS,
                   metavar="N", help=f"prompt length for the prefill figure (default {DEFAULT_PROMPT_TOKENS})")
    p.add_argument("--decode-tokens", type=cli_args.int_range(1, 1 << 20), default=DEFAULT_DECODE_TOKENS,
                   metavar="N", help=f"tokens decoded after the prompt (default {DEFAULT_DECODE_TOKENS})")
    cli_args.add_threads(p, " for the kernels and the bandwidth read")
    p.add_argument("--repeats", type=cli_args.int_range(1, 100), default=DEFAULT_REPEATS, metavar="N",
                   help=f"timed repetitions of prefill + decode after a warm-up (default {DEFAULT_REPEATS})")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"),
                   help="activation / dense-weight dtype (default float32)")
    p.add_argument("--quant", choices=("none", "rtn4"), default="none",
                   help="rtn4: round the dense decoder linears to 4 bits at load (as chat --quant)")
    cli_args.add_lm_head(p)
    p.add_argument("--bandwidth-mb", type=cli_args.int_range(16, 1 << 16), default=DEFAULT_BANDWIDTH_MB,
                   metavar="MiB", help=f"bytes the bandwidth measurement reads (default {DEFAULT_BANDWIDTH_MB} MiB)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object instead of a table")


def run(args) -> int:
    from omni_edge.cli import CliError

    try:
        result = run_bench(args.model, device=args.device, prompt_tokens=args.prompt_tokens,
                           decode_tokens=args.decode_tokens, threads=args.threads, repeats=args.repeats,
                           dtype=args.dtype, quant=args.quant, bandwidth_mb=args.bandwidth_mb,
                           lm_head=args.lm_head)
    except ValueError as e:
        raise CliError(" ".join(str(e).split())) from None
    print(json.dumps(result, indent=1) if args.json else format_table(result))
    return 0
