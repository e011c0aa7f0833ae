"""Threads under contention: 1 and 2 CPU threads, with and without another busy process, interleaved.

    python benchmarks/bench_threads.py                  # about 2-4 minutes
    python benchmarks/bench_threads.py --reps 5 --steps 24
    python benchmarks/bench_threads.py --only q4          # the 4-bit rows only

What it measures (random weights, built here; the shapes are stated in the table header):

- decode: the native decode step (csrc/decode: every linear, attention and norm of one token on the kernels'
  CPU pool), median time per token over --steps steps after a 64-token prompt, for
    * a 4-bit backbone (hidden 2048, 16 layers, MLP 5632, GQA 16/4; ~0.45 GB of weights read per token),
    * a SmolLM2-135M-shaped fp32 backbone (hidden 576, 30 layers, MLP 1536, GQA 9/3), bound by per-step costs.
- prefill: one forward over a 64-token prompt (median of --prefill-reps), for
    * the 4-bit backbone: q4 GEMM and attention on the kernels' pool,
    * the SmolLM2-shaped fp32 backbone: its dense matmuls run in torch (torch's own OpenMP pool, whose
      threads spin at barriers), attention on the kernels' pool. This is the row the project's issue measured
      collapsing (9-11 tok/s at 2 threads under contention against 170-218 at 1). The omni-edge command sets
      OMP_WAIT_POLICY=PASSIVE before torch loads, and so does this script unless --omp-active is given.

Each under three conditions: no competitor; a competitor (`python -c "while True: pass"`) pinned to CPU 0;
the same competitor unpinned (a busy loop: `while True: pass`, ending with the benchmark). The pool size and torch's threads follow --threads' values (1, 2) together, as
`omni-edge --threads N` sets them. Rows are measured round-robin (condition x threads, repeated --reps
times) so that drifts in the machine's load hit every row alike; the table gives medians over rounds and
the 2-thread / 1-thread ratio per condition (> 1: two threads are faster). The load average is printed: on
a machine shared with other work every number moves, compare rows of the same run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

if "--omp-active" not in sys.argv:  # as the `omni-edge` command does (omni_edge/cli.py), before torch loads
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_backbone import backbone_config, random_backbone  # noqa: E402  (same folder)

Q4_SHAPE = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=4, head_dim=128,
                intermediate_size=5632, vocab_size=4096, qkv_bias=True, packed_qkv=True)
SMOL_SHAPE = dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                  intermediate_size=1536, vocab_size=4096, qkv_bias=False, packed_qkv=False,
                  tie_word_embeddings=True)
CONDITIONS = ("quiet", "busy pinned cpu0", "busy unpinned")
PROMPT = 64


def start_competitor(condition: str):
    if condition == "quiet":
        return None
    pin = condition == "busy pinned cpu0"
    cpus = sorted(os.sched_getaffinity(0))
    pre = (lambda: os.sched_setaffinity(0, {cpus[0]})) if pin else None
    # busy until its parent (this benchmark) is gone, so an interrupted run leaves nothing spinning
    p = subprocess.Popen([sys.executable, "-c", "import os\nparent = os.getppid()\nwhile os.getppid() == parent: pass"],
                         preexec_fn=pre)
    time.sleep(0.3)  # let it take its core
    return p


def stop_competitor(p) -> None:
    if p is not None:
        p.kill()
        p.wait()


def set_threads(n: int) -> None:
    """The pool and torch's threads together, as `--threads N` sets them."""
    from omni_edge import _native
    _native.lib().set_num_threads(n)
    torch.set_num_threads(n)


@torch.inference_mode()
def measure(bb, kind: str, steps: int, prefill_reps: int) -> float:
    """Tokens per second: decode (median step over `steps`) or prefill (median of `prefill_reps`)."""
    ids = torch.arange(PROMPT).view(1, -1) % bb.config.vocab_size
    if kind == "prefill":
        ts = []
        for _ in range(prefill_reps):
            t0 = time.perf_counter()
            bb.forward(ids, start=0)
            ts.append(time.perf_counter() - t0)
        return PROMPT / statistics.median(ts)
    bb.forward(ids, start=0)
    tok = torch.tensor([[1]])
    ts = []
    for i in range(steps):
        t0 = time.perf_counter()
        bb.forward(tok, start=PROMPT + i)
        ts.append(time.perf_counter() - t0)
    return 1.0 / statistics.median(ts)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=3, help="rounds over every row (default 3)")
    ap.add_argument("--steps", type=int, default=16, help="decode steps per measurement (default 16)")
    ap.add_argument("--prefill-reps", type=int, default=2, help="prefills per measurement (default 2)")
    ap.add_argument("--omp-active", action="store_true",
                    help="leave torch's OpenMP threads spinning at barriers (libgomp's default) instead of "
                         "OMP_WAIT_POLICY=PASSIVE, which the omni-edge command sets")
    ap.add_argument("--only", default="", help="run only the workloads whose name contains this text (e.g. q4)")
    args = ap.parse_args()

    from omni_edge import _native, knobs
    from omni_edge.pipeline import kernel_report

    if len(os.sched_getaffinity(0)) < 2:
        print("needs at least 2 CPUs in this process's affinity mask", file=sys.stderr)
        return 2
    lib = _native.lib()
    workloads = {}
    t0 = time.perf_counter()
    bq = random_backbone(backbone_config(**Q4_SHAPE), dtype=torch.float32, q4=True)
    bq.allocate_cache(PROMPT + args.steps + 1)
    bs = random_backbone(backbone_config(**SMOL_SHAPE), dtype=torch.float32, q4=False)
    bs.allocate_cache(PROMPT + args.steps + 1)
    workloads["q4 2048x16 decode"] = (bq, "decode")
    workloads["q4 2048x16 prefill 64"] = (bq, "prefill")
    workloads["fp32 SmolLM2-shape decode"] = (bs, "decode")
    workloads["fp32 SmolLM2-shape prefill 64 (torch matmul)"] = (bs, "prefill")
    workloads = {w: v for w, v in workloads.items() if args.only in w}
    build_s = time.perf_counter() - t0

    kr = kernel_report(torch.device("cpu"), uses_q4=True, uses_rvq=False)
    print(f"conditions: CPUs {sorted(os.sched_getaffinity(0))}, CPU kernel level {kr['isa']}, native decode step "
          f"{'on' if knobs.settings().native_decode else 'off'}, torch {torch.__version__}; load average before: "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}; models built in {build_s:.0f} s; "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset: libgomp spins)')}")
    print(f"rounds {args.reps}, decode {args.steps} steps after a {PROMPT}-token prompt, prefill median of "
          f"{args.prefill_reps}; competitor: python -c 'while True: pass'")

    results = {(w, c, n): [] for w in workloads for c in CONDITIONS for n in (1, 2)}
    for r in range(args.reps):
        for c in CONDITIONS:
            comp = start_competitor(c)
            try:
                for n in (1, 2):
                    set_threads(n)
                    for w, (bb, kind) in workloads.items():
                        if kind == "decode":  # warm this thread count (each model's prefill follows its decode)
                            measure(bb, kind, 2, 1)
                        results[(w, c, n)].append(measure(bb, kind, args.steps, args.prefill_reps))
                        print(f"  round {r + 1}/{args.reps}, {c}, {n} thread(s), {w}: "
                              f"{results[(w, c, n)][-1]:.1f} tok/s", file=sys.stderr, flush=True)
            finally:
                stop_competitor(comp)
    set_threads(len(os.sched_getaffinity(0)))

    row = "{:<46s} {:<18s} {:>12s} {:>12s} {:>9s}"
    print()
    print(row.format("workload (tok/s, median over rounds)", "condition", "1 thread", "2 threads", "2t / 1t"))
    print("-" * 101)
    for w in workloads:
        for c in CONDITIONS:
            one = statistics.median(results[(w, c, 1)])
            two = statistics.median(results[(w, c, 2)])
            print(row.format(w, c, f"{one:.1f}", f"{two:.1f}", f"{two / one:.2f}x"))
    st = lib.pool_stats()
    print(f"\npool: {st['jobs']} jobs posted, {st['inline_jobs']} run on their caller alone, "
          f"{st['helped_chunks']} chunks run by workers, {st['caller_sleeps']} caller sleeps; "
          f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
