"""The layer-by-layer pass: quantize a checkpoint's decoder with one layer in memory at a time.

For each decoder layer i, in order:

  1. load layer i from the (memory-mapped) checkpoint as dense fp32;
  2. reference pass: the unquantized layer on the calibration activations (which come out of the already
     quantized layers 0..i-1) gives the reference outputs; the held-out "source" stream advances too;
  3. for each group of linears that read the same input (W_pack or q/k/v; o_proj; gate/up; down), in
     order: run the layer, with the groups before it already quantized, up to that input, accumulate the
     Hessian, quantize the group's stacked weight (GPTQ or RTN) and put the dequantized weight in place
     ("true sequential": later groups see the errors of earlier ones, as in the GPTQ reference code);
  4. final pass: the quantized layer's outputs become the next layer's calibration activations, the held-out
     "quantized" stream advances; the layer's output error against step 2 is recorded;
  5. the layer's GPTQ tensors go to `on_layer` (the bundle writer) and the layer is dropped.

Tensors that stay unquantized (norms, biases, embeddings, lm_head) are stored as fp16 in the bundle, so the
quantized stream uses their fp16-rounded values; the source stream uses them as stored in the source.
Perplexity on held-out text is computed from both streams at the end (final norm + lm_head).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from omni_edge.backbone import DecoderLayer, Linear, linear_groups, rms_norm
from omni_edge.checkpoint import Checkpoint, layer_prefix
from omni_edge.ops import q4

from .gptq import HessianAccumulator, QuantResult, QuantSpec, output_error, quantize_layer

STORE_DTYPE = torch.float16  # unquantized backbone tensors (embeddings, norms, biases, lm_head) in the bundle


def as_stored(t: torch.Tensor) -> torch.Tensor:
    """The fp32 value a float tensor has once stored as fp16 in the bundle."""
    return t.to(STORE_DTYPE).float()


@dataclass
class LayerReport:
    index: int
    linear_errors: Dict[str, float]  # relative output error of each linear on its calibration inputs
    output_error: float  # ||layer_q(x) - layer(x)||^2 / ||layer(x) - x||^2 over calibration tokens
    seconds: float
    damp: Dict[str, float] = field(default_factory=dict)  # groups whose Hessian needed more dampening

    def as_dict(self) -> dict:
        d = {"layer": self.index, "output_error": self.output_error, "seconds": round(self.seconds, 2),
             "linears": {k: v for k, v in self.linear_errors.items()}}
        if self.damp:
            d["damp_raised"] = self.damp
        return d


@dataclass
class PassResult:
    layers: List[LayerReport]
    ppl_source: Optional[float]
    ppl_quantized: Optional[float]
    heldout_tokens: int


class _Stop(Exception):
    """Raised by a capture hook to end a forward pass once the wanted input has been seen."""


class _CaptureLinear(Linear):
    """A dense Linear that hands its input to `hook` (which may raise _Stop)."""

    __slots__ = ("hook",)

    def __init__(self, inner: Linear, hook: Callable[[torch.Tensor], None]):
        super().__init__(weight=inner.weight, bias=inner.bias)
        self.hook = hook

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.hook(x)
        return super().__call__(x)


def _capture_hessian(layer: DecoderLayer, name: str, inputs: Sequence[torch.Tensor]) -> HessianAccumulator:
    """Hessian of the input of linear `name` over all calibration samples (forward stops right there)."""
    original = layer.linear(name)
    acc = HessianAccumulator(original.in_features, device=original.weight.device)

    def hook(x):
        acc.add(x)
        raise _Stop

    layer.replace_linear(name, _CaptureLinear(original, hook))
    try:
        for x in inputs:
            try:
                layer(x)
            except _Stop:
                pass
    finally:
        layer.replace_linear(name, original)
    return acc


def _split_result(res: QuantResult, sizes: Sequence[int]) -> List[QuantResult]:
    out, start = [], 0
    for n in sizes:
        rows = slice(start, start + n)
        out.append(QuantResult(q=res.q[:, rows].contiguous(), zeros=res.zeros[:, rows].contiguous(),
                               scales=res.scales[:, rows].contiguous(), g_idx=res.g_idx,
                               weight=res.weight[rows], damp_used=res.damp_used))
        start += n
    return out


def gptq_tensors(prefix: str, res: QuantResult, bias: Optional[torch.Tensor],
                 checkpoint_format: str = "gptq") -> Dict[str, torch.Tensor]:
    """The standard GPTQ checkpoint tensors of one linear, CPU."""
    qweight, qzeros = q4.pack_gptq(res.q.cpu(), res.zeros.cpu(), checkpoint_format=checkpoint_format)
    t = {prefix + ".qweight": qweight, prefix + ".qzeros": qzeros,
         prefix + ".scales": res.scales.cpu().to(torch.float16), prefix + ".g_idx": res.g_idx.cpu().to(torch.int32)}
    if bias is not None:
        t[prefix + ".bias"] = bias.detach().cpu().to(STORE_DTYPE)
    return t


def _nll(hidden: torch.Tensor, ids: torch.Tensor, norm: torch.Tensor, lm_head: torch.Tensor, eps: float) -> float:
    """Summed next-token negative log-likelihood of one sample: hidden (1, T, C), ids (T,)."""
    h = rms_norm(hidden[0], norm, eps)
    logits = (h[:-1] @ lm_head.t()).float()
    return float(F.cross_entropy(logits, ids[1:].to(logits.device), reduction="sum"))


def run_sequential(ckpt: Checkpoint, spec: QuantSpec, *, method: str, calibration: Sequence[Sequence[int]],
                   heldout: Sequence[Sequence[int]] = (), device="cpu", checkpoint_format: str = "gptq",
                   on_layer: Optional[Callable[[int, Dict[str, torch.Tensor]], None]] = None,
                   progress: bool = True,
                   quantized_head: Optional[Callable[[], torch.Tensor]] = None) -> PassResult:
    """Quantize every decoder layer of `ckpt` in order (see the module docstring). `on_layer(i, tensors)`
    receives each layer's output tensors (GPTQ parts of every linear, fp16 norms), named as in the source.
    `quantized_head()`, when given, returns the (V, C) lm_head the bundle holds (a q8 / q4 lm_head dequantized)
    for the quantized model's perplexity; by default that is the fp16 lm_head."""
    from tqdm import tqdm

    dev = torch.device(device)
    cfg = ckpt.config.backbone
    groups = linear_groups(cfg)
    eps = cfg.rms_norm_eps

    embed = ckpt.get("model.embed_tokens.weight")  # (V, C) stored dtype
    calib = [torch.tensor(s, dtype=torch.long) for s in calibration]
    held = [torch.tensor(s, dtype=torch.long) for s in heldout]
    xs = [as_stored(embed[ids]).unsqueeze(0).to(dev) for ids in calib]  # quantized-model stream
    hs_q = [as_stored(embed[ids]).unsqueeze(0).to(dev) for ids in held]
    hs_src = [embed[ids].float().unsqueeze(0).to(dev) for ids in held]  # source-model stream
    del embed

    reports: List[LayerReport] = []
    for i in range(cfg.num_hidden_layers):
        t0 = time.time()
        prefix = layer_prefix(i)
        bar = tqdm(total=len(groups) + 2, desc=f"layer {i + 1}/{cfg.num_hidden_layers}", leave=True,
                   disable=not progress, dynamic_ncols=True)
        layer = DecoderLayer.from_checkpoint(ckpt, i, device=dev, dtype=torch.float32)

        # 2. reference outputs (source precision) on the quantized stream; the source held-out stream
        with torch.no_grad():
            refs = [layer(x) for x in xs]
            hs_src = [layer(h) for h in hs_src]
        bar.update(1)

        # from here on the layer holds what the bundle stores: fp16 norms and biases, quantized weights
        layer.input_layernorm = as_stored(layer.input_layernorm)
        layer.post_attention_layernorm = as_stored(layer.post_attention_layernorm)
        for name in [n for g in groups for n in g]:
            lin = layer.linear(name)
            if lin.bias is not None:
                layer.replace_linear(name, Linear(weight=lin.weight, bias=as_stored(lin.bias)))

        out: Dict[str, torch.Tensor] = {
            prefix + "input_layernorm.weight": layer.input_layernorm.to(STORE_DTYPE).cpu(),
            prefix + "post_attention_layernorm.weight": layer.post_attention_layernorm.to(STORE_DTYPE).cpu()}
        errors: Dict[str, float] = {}
        damp_raised: Dict[str, float] = {}
        for group in groups:
            with torch.no_grad():
                hessian = _capture_hessian(layer, group[0], xs).hessian()
                lins = [layer.linear(n) for n in group]
                stacked = torch.cat([lin.weight for lin in lins], dim=0) if len(lins) > 1 else lins[0].weight
                res = quantize_layer(stacked, hessian, spec, method=method)
                if res.damp_used > spec.damp + 1e-12:
                    damp_raised["+".join(group)] = res.damp_used
                parts = _split_result(res, [lin.out_features for lin in lins]) if len(lins) > 1 else [res]
                for name, lin, part in zip(group, lins, parts):
                    errors[name] = output_error(lin.weight, part.weight, hessian)
                    out.update(gptq_tensors(prefix + name, part, lin.bias, checkpoint_format))
                    layer.replace_linear(name, Linear(weight=part.weight.to(dev), bias=lin.bias))
                del hessian, res, parts, stacked
            bar.set_postfix_str(" ".join(f"{n.split('.')[-1]}={errors[n]:.2e}" for n in group))
            bar.update(1)

        # 4. the quantized layer moves both streams on
        with torch.no_grad():
            num = den = 0.0
            new_xs = []
            for x, ref in zip(xs, refs):
                y = layer(x)
                num += float(((y - ref) ** 2).sum())
                den += float(((ref - x) ** 2).sum())
                new_xs.append(y)
            xs = new_xs
            hs_q = [layer(h) for h in hs_q]
        del refs
        layer_err = num / den if den > 0 else 0.0
        report = LayerReport(index=i, linear_errors=errors, output_error=layer_err, seconds=time.time() - t0,
                             damp=damp_raised)
        reports.append(report)
        bar.set_postfix_str(f"layer error {layer_err:.3e}")
        bar.update(1)
        bar.close()
        if on_layer is not None:
            on_layer(i, out)
        del layer, out

    ppl_src = ppl_q = None
    tokens = sum(len(ids) - 1 for ids in held)
    if held:
        with torch.no_grad():
            norm = ckpt.get("model.norm.weight").float().to(dev)
            head_name = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
            stored = ckpt.get(head_name)  # (V, C) in the source dtype; one fp32 copy at a time below
            head = stored.float().to(dev)
            nll_src = sum(_nll(h, ids, norm, head, eps) for h, ids in zip(hs_src, held))
            del head
            norm = as_stored(norm)
            head = (as_stored(stored) if quantized_head is None else quantized_head().float()).to(dev)
            del stored
            nll_q = sum(_nll(h, ids, norm, head, eps) for h, ids in zip(hs_q, held))
            del head
        ppl_src, ppl_q = math.exp(nll_src / tokens), math.exp(nll_q / tokens)
    return PassResult(layers=reports, ppl_source=ppl_src, ppl_quantized=ppl_q, heldout_tokens=tokens)
