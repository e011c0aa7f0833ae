"""Which 4-bit grid `--quant rtn4` should use: quality on real weights, size and GEMV speed.

Quality (SmolLM2-135M-Instruct, the real-weights lane): for each grid, every decoder linear is rounded to
nearest at load exactly as `--quant rtn4` does (embeddings, norms, lm_head stay fp32), then
  - perplexity on the built-in held-out texts (never used for calibration; plain text, no template),
  - greedy answers (transformers' defaults: no repetition penalty) to three short questions,
against the fp32 model in the same run. All four K of SmolLM2 (576, 576, 1536) take groups of 32 and 64;
group 128 falls back to 64 (576 = 4.5 x 128), as the fallback rule says.

Size and speed (--shape, default Qwen2.5-7B's down_proj 18944 x 3584): bytes per weight of the runtime's tiled
layout and the native q4 GEMV (M = 1) time per call for each grid, median of --reps calls each timed alone
after warm-up, rotating over enough weight copies to exceed the last-level cache. The ratio column is the
group-128 symmetric time over the grid's (< 1: slower than group 128).

Usage: python benchmarks/bench_rtn4_grid.py [--threads 2] [--reps 9] [--skip-quality] [--skip-speed]
Timings on a shared machine are noisy: compare the ratios within one run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

GRIDS = [(64, True), (64, False), (32, True), (32, False)]  # SmolLM2: group 128 falls back to 64
SPEED_GRIDS = [(128, True), (128, False), (64, False), (32, True), (32, False)]
QUESTIONS = ["What is the capital of Japan?", "Which planet is the largest in our solar system?",
             "What is the capital of France?"]


def label(gs: int, sym: bool) -> str:
    return f"{'sym' if sym else 'asym'} g{gs}"


def quality(args) -> None:
    from omni_edge import pipeline
    from omni_edge.backbone import decoder_in_features, linear_names, model_group_size, quantize_linear_rtn
    from omni_edge.quantize.calibration import heldout_samples
    from omni_edge.quantize.report import runtime_perplexity
    from omni_edge.testing import smollm2_checkpoint

    src = smollm2_checkpoint()
    rows = []
    grids = [None] + GRIDS if not args.grids else [
        None if g == "fp32" else (int(g.split("-g")[1]), g.startswith("sym")) for g in args.grids.split(",")]
    for grid in grids:
        t0 = time.perf_counter()
        model = pipeline.load(src, dtype="float32", max_context=640)
        if grid is not None:
            asked, sym = grid
            gs = model_group_size(decoder_in_features(model.config.backbone), asked)
            for layer in model.backbone.layers:
                for name in linear_names(model.config.backbone):
                    layer.replace_linear(name, quantize_linear_rtn(layer.linears[name], gs, sym))
            name = label(asked, sym) + (f" (-> g{gs})" if gs != asked else "")
        else:
            name = "fp32"
        ppl = runtime_perplexity(model.backbone, heldout_samples(model.tokenizer.encode, max_tokens=512))
        params = model.sampling_defaults.resolve(max_new_tokens=args.max_new_tokens).params()
        answers = [" ".join(model.session().send(q, params).text.split()) for q in QUESTIONS]
        rows.append((name, ppl, answers, time.perf_counter() - t0))
        print(f"  {name}: ppl {ppl:.3f}; " + " | ".join(answers), flush=True)
    print(f"\nSmolLM2-135M-Instruct ({src}); held-out perplexity (built-in held-out texts) and greedy answers")
    print(f"{'grid':18s} {'ppl':>8s} {'vs fp32':>8s}")
    for name, ppl, _, _ in rows:
        print(f"{name:18s} {ppl:8.3f} " + (f"{100 * (ppl / rows[0][1] - 1):+7.1f}%" if rows[0][0] == "fp32" else ""))
    for i, q in enumerate(QUESTIONS):
        print(f"\nQ: {q}")
        for name, _, answers, _ in rows:
            print(f"  {name:18s} {answers[i][:110]}")


def speed(args) -> None:
    from omni_edge.ops import q4

    k, n = (int(v) for v in args.shape.split("x"))
    torch.manual_seed(0)
    x = torch.randn(1, k)
    results = []
    for gs, sym in SPEED_GRIDS:
        w0 = q4.qweight_rtn(torch.randn(n, k) * 0.02, gs, sym=sym)
        per_copy = w0.nbytes
        copies = max(1, int(args.rotate_gb * 2 ** 30 // per_copy))
        ws = [w0] + [q4.qweight_rtn(torch.randn(n, k) * 0.02, gs, sym=sym) for _ in range(min(copies, 4) - 1)]
        for w in ws:  # warm-up
            q4.matmul(x, w)
        times = []
        for r in range(args.reps * len(ws)):
            w = ws[r % len(ws)]
            t0 = time.perf_counter()
            q4.matmul(x, w)
            times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        results.append((label(gs, sym), per_copy / (n * k) * 8, med, per_copy / med / 1e9))
    base = results[0][2]
    print(f"\nq4 GEMV M=1, K={k}, N={n} (torch threads {torch.get_num_threads()}, native kernels, "
          f"{len(ws)} weight copies rotated)")
    print(f"{'grid':10s} {'bits/weight':>11s} {'median ms':>10s} {'GB/s':>7s} {'g128 sym / this':>16s}")
    for name, bpw, med, gbs in results:
        print(f"{name:10s} {bpw:11.3f} {med * 1e3:10.3f} {gbs:7.2f} {base / med:16.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--rotate-gb", type=float, default=0.15)
    ap.add_argument("--shape", default="18944x3584", help="K x N (inputs x outputs) of the weight; default Qwen2.5-7B down_proj")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--grids", help="comma list such as fp32,sym g64... written fp32,sym-g64,asym-g32 (default all)")
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--skip-speed", action="store_true")
    args = ap.parse_args()
    from omni_edge.pipeline import set_threads
    set_threads(args.threads)
    if not args.skip_quality:
        quality(args)
    if not args.skip_speed:
        speed(args)


if __name__ == "__main__":
    main()
