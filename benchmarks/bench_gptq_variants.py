"""GPTQ design choices measured on real Hessians: SmolLM2-135M-Instruct's decoder linears.

For a few decoder layers, the input Hessian of each linear group (q/k/v, o_proj, gate/up, down_proj) is taken
from the fp32 model on the built-in calibration texts (one user turn each, as `omni-edge quantize` renders
them), and every variant quantizes the same weights against the same Hessians. The figure is GPTQ's own
objective, the relative output error tr(dW H dW^T) / tr(W H W^T), averaged over the linears (lower is
better), with RTN on the same grid beside it. A variant that lowers it everywhere is a candidate for the
default; held-out perplexity (benchmarks/bench_gptq_quality.py) then has the last word.

Variants: the column order -- natural, group-aware (QuantSpec.group_order, the default without act-order:
groups by decreasing largest diag H, columns inside a group by decreasing diag H, the same groups and g_idx),
act-order (desc_act with static groups) -- crossed with the group statistics "block" (the default: the grid
from the values at the start of the 128-column lazy block, as the reference GPTQ code and GPTQModel) and
"current" (every earlier column's error applied); then larger dampening and a smaller lazy block. Every
output row counts in the error.

    python benchmarks/bench_gptq_variants.py [--layers 0,10,20,29] [--nsamples 16] [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

_TESTS = Path(__file__).resolve().parents[1] / "tests"  # the SmolLM2 converter lives with the tests
if str(_TESTS) not in sys.path:
    sys.path.insert(0, str(_TESTS))


def capture(args):
    from omni_edge.backbone import DecoderLayer, linear_groups
    from omni_edge.checkpoint import Checkpoint
    from omni_edge.quantize.calibration import build_calibration
    from omni_edge.quantize.sequential import _capture_hessian
    from smollm2_weights import smollm2_checkpoint
    from omni_edge.tokenizer import Tokenizer, prompt_format

    src = smollm2_checkpoint()
    ckpt = Checkpoint.open(src)
    tok = Tokenizer.from_dir(src)
    prompt = prompt_format(tok, "hf")
    calib = build_calibration(lambda t: prompt.render([{"role": "user", "content": t}]), nsamples=args.nsamples,
                              seqlen=args.seqlen, seed=0)
    embed = ckpt.get("model.embed_tokens.weight").float()
    xs = [embed[torch.tensor(s)].unsqueeze(0) for s in calib.samples]
    wanted = sorted(int(v) for v in args.layers.split(","))
    cases = []  # (name, weight (N, K), hessian)
    with torch.no_grad():
        for i in range(max(wanted) + 1):
            layer = DecoderLayer.from_checkpoint(ckpt, i, dtype=torch.float32)
            if i in wanted:
                for group in linear_groups(ckpt.config.backbone):
                    h = _capture_hessian(layer, group[0], xs).hessian()
                    w = torch.cat([layer.linear(n).weight for n in group], dim=0)
                    cases.append((f"{i}.{'+'.join(n.split('.')[-1] for n in group)}", w, h))
            xs = [layer(x) for x in xs]
    return cases, calib.tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", default="0,10,20,29")
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from omni_edge.quantize.gptq import QuantSpec, gptq_quantize, output_error, rtn_quantize

    t0 = time.time()
    cases, tokens = capture(args)
    print(f"SmolLM2-135M-Instruct, layers {args.layers}: {len(cases)} linear groups, Hessians from {tokens} "
          f"calibration tokens ({time.time() - t0:.0f} s); torch threads {args.threads}")
    grids = [(32, True), (32, False), (64, True), (64, False)]
    orders = {"natural": dict(group_order=False), "group": dict(group_order=True),
              "act": dict(act_order=True, static_groups=True)}
    variants = [(o, st, 128, 0.01) for o in orders for st in ("block", "current") if o != "act" or st == "block"]
    variants += [("group", "block", 32, 0.01), ("group", "block", 128, 0.05)]
    print("\nmean relative output error x 1e3 over the linear groups (lower is better); order/stats/block/damp")
    print(f"{'grid':10s} {'RTN':>7s}" + "".join(f" {f'{o}/{st}/b{bs}/d{d}':>24s}" for o, st, bs, d in variants))
    for gs, sym in grids:
        rtn = sum(output_error(w, rtn_quantize(w, QuantSpec(group_size=gs, sym=sym)).weight, h, max_rows=1 << 30)
                  for _, w, h in cases) / len(cases)
        cells = []
        for order, stats, bs, damp in variants:
            spec = QuantSpec(group_size=gs, sym=sym, block_size=bs, damp=damp, group_stats=stats, **orders[order])
            err = sum(output_error(w, gptq_quantize(w, h, spec).weight, h, max_rows=1 << 30)
                      for _, w, h in cases) / len(cases)
            cells.append(f"{1e3 * err:24.3f}")
        print(f"{('sym' if sym else 'asym') + ' g' + str(gs):10s} {1e3 * rtn:7.3f}" + "".join(cells), flush=True)
    print(f"\ntotal {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
