"""Quality report: perplexity and per-layer reconstruction error.

- The quantize pass itself measures perplexity layer by layer (quantize/sequential.py), so it needs no more
  memory than quantizing; `format_report(manifest)` prints what it recorded.
- `runtime_perplexity(backbone, samples)` measures a loaded model (e.g. a bundle opened by
  `omni_edge.pipeline.load`, running the q4 kernels) on token-id samples: the check that the bundle on disk
  gives what the pass measured.
"""

from __future__ import annotations

import math
from typing import List, Sequence

import torch
import torch.nn.functional as F


def runtime_perplexity(backbone, samples: Sequence[Sequence[int]]) -> float:
    """exp(mean next-token NLL) of `backbone` (omni_edge.backbone.Backbone) over the samples (each scored
    from its second token on, with a fresh cache)."""
    total, count = 0.0, 0
    longest = max(len(s) for s in samples)
    if backbone.max_len < longest:
        backbone.allocate_cache(longest)
    with torch.no_grad():
        for ids in samples:
            x = torch.tensor([list(ids)], dtype=torch.long, device=backbone.device)
            h = backbone.forward(x, start=0)
            logits = backbone.logits(h[0, :-1])
            total += float(F.cross_entropy(logits.float(), x[0, 1:], reduction="sum"))
            count += len(ids) - 1
    return math.exp(total / count)


def format_report(manifest: dict) -> str:
    """The per-layer error table and the perplexities recorded in a bundle manifest."""
    rep = manifest.get("report") or {}
    q = manifest.get("quantization", {})
    lines: List[str] = []
    layers = rep.get("layers", [])
    if layers:
        names = list(layers[0]["linears"])
        short = [n.split(".")[-1] for n in names]
        lines.append("relative output error on the calibration tokens (||dW x||^2 / ||W x||^2 per linear; layer: "
                     "||dy||^2 / ||y - x||^2)")
        lines.append("layer  " + "  ".join(f"{s:>10}" for s in short) + "  " + f"{'layer':>10}" + "  seconds")
        for r in layers:
            vals = "  ".join(f"{r['linears'][n]:10.3e}" for n in names)
            lines.append(f"{r['layer']:5d}  {vals}  {r['output_error']:10.3e}  {r['seconds']:7.1f}")
            if r.get("damp_raised"):
                lines.append(f"       dampening raised: {r['damp_raised']}")
        lines.append(f"mean layer output error: {rep.get('mean_output_error', float('nan')):.3e}")
    ppl = rep.get("perplexity")
    if ppl:
        delta = 100.0 * (ppl["quantized"] / ppl["source"] - 1.0)
        lines.append(f"perplexity on {ppl['tokens']} held-out tokens: source {ppl['source']:.4f}, "
                     f"{q.get('method', '?')} {q.get('bits', '?')}-bit {ppl['quantized']:.4f} ({delta:+.2f} %)")
    if q.get("method"):
        order = "act-order" if q.get("desc_act") else ("group-aware order" if q.get("group_order") else "natural order")
        lines.append(f"settings: {q['method']} {q.get('bits')}-bit, group {q.get('group_size')}, "
                     f"{'sym' if q.get('sym') else 'asym'}"
                     + (f", {order}, grid search {q.get('clip', 'none')}, damp {q.get('damp_percent')}"
                        if q["method"] == "gptq" else ""))
    cal = q.get("calibration", {})
    if cal:
        lines.append(f"calibration: {cal.get('nsamples')} samples, {cal.get('tokens')} tokens from "
                     f"{cal.get('source')} (seed {cal.get('seed')})")
    if q.get("group_size_note"):
        lines.append(f"note: {q['group_size_note']}")
    if "seconds" in rep:
        lines.append(f"time: {rep['seconds']:.1f} s")
    return "\n".join(lines)
