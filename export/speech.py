"""ONNX export of the speech decode chain: audio decoder + prenet, CFM estimator, vocoder trunk.

    entries = export(bundle_dir, manifest, precision, speech=SpeechDecoder, vocoder=Vocoder)
    # -> {"audio_decoder": {precision: entry}, "flow_estimator": {...}, "vocoder": {"float32": entry}}

Graphs (all lengths dynamic; no data-dependent shapes; opset 17):

- `audio_decoder` (stage "audio_decoder"): emb (N, 1280) [proj_decoder output, graph dtype], mean (1,),
  var (1,) fp32 [the dconv1 GroupNorm statistics, computed by the host so streaming can pin them] ->
  mu (1, 80, 4N) [the clause keeps the first 4N - 1 frames; causal layers make the extra frame harmless].
- `flow_estimator`: x (2, 80, T), mu (2, 80, T), t (2,) -> v (2, 80, T). Batch 2 = the guided and the
  unguided pass; the chunk-causal mask (100 frames) is built in the graph from T.
- `vocoder` (fp32 only): mel (1, 80, T), s_stft (1, 18, 120 T + 1) -> conv_post output (1, 18, 120 T + 1).
  The f0 predictor, the sine source, the 16-point STFT and the iSTFT stay on the host.

Each graph is written to a temporary file, checked (onnx checker with full_check, strict shape inference,
no NonZero / Loop / If nodes), run in onnxruntime against the torch module on two odd lengths, and only then
moved into the bundle. fp16 graphs are kept only if their error against the fp32 torch module is within
`FP16_BOUND` (relative to the output's scale); otherwise the entry is skipped with the reason recorded in
`skipped`. Entries follow `omni_edge.backends` ("graphs" table).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Dict, List, Optional

import torch
from torch import nn

OPSET = 17
FP16_BOUND = 2e-2  # max |fp16 - fp32| / max |fp32| accepted for an fp16 graph
FP32_BOUND = 1e-4  # the same ratio for fp32 graphs (kernel summation order only)
FORBIDDEN_OPS = {"NonZero", "Loop", "If", "Unique", "Scan"}


class _DecoderGraph(nn.Module):
    def __init__(self, speech):
        super().__init__()
        self.dec, self.pre = speech.decoder, speech.prenet

    def forward(self, emb, mean, var):
        conv = self.dec.dconv1.conv
        x = conv(emb.t().unsqueeze(0))  # (1, d, 4N - 1)
        x = torch.cat([x, conv.bias.view(1, -1, 1).to(x.dtype)], dim=2)  # + the bias-only frame: (1, d, 4N)
        gn = self.dec.dconv1.norm
        y = (x.float() - mean) * torch.rsqrt(var + gn.eps)
        x = (y * gn.weight.float().view(1, -1, 1) + gn.bias.float().view(1, -1, 1)).to(emb.dtype).transpose(1, 2)
        pos = self.dec.positional_embedding[: x.shape[1]]
        h = (x.float() + pos.float()).to(emb.dtype)
        for layer in self.dec.layers:
            h = layer(h)
        h = self.dec.layer_norm(h)
        x = self.pre.in_mlp[2](torch.nn.functional.silu(self.pre.in_mlp[0](h)))
        for layer in self.pre.transformer_layers:
            x = layer(x)
        return self.pre.out_proj(self.pre.final_norm(x)).transpose(1, 2)


class _VocoderTrunk(nn.Module):
    def __init__(self, vocoder):
        super().__init__()
        self.voc = vocoder

    def forward(self, mel, s_stft):
        return self.voc.trunk(mel, s_stft)


def _check_graph(path: str) -> None:
    import onnx

    model = onnx.load(path)
    onnx.checker.check_model(path, full_check=True)
    onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    bad = sorted({n.op_type for n in model.graph.node} & FORBIDDEN_OPS)
    if bad:
        raise ValueError(f"{os.path.basename(path)}: data-dependent or control-flow ops {bad} (not TensorRT-friendly)")


def _export(module, args, names_in, names_out, dyn, path):
    torch.onnx.export(module, args, path, input_names=names_in, output_names=names_out, dynamic_axes=dyn,
                      opset_version=OPSET, dynamo=False, do_constant_folding=True)
    _check_graph(path)


def _parity(path, module_fp32, cases, dtype) -> dict:
    """Max abs error of the graph (fed in `dtype`) against the fp32 torch module, over `cases`."""
    from omni_edge.backends import OnnxGraph

    g = OnnxGraph(path, threads=1)
    worst_abs, worst_rel, shapes = 0.0, 0.0, []
    for feeds in cases:
        with torch.no_grad():
            want = module_fp32(*[v for v in feeds.values()]).float()
        got = g.run(**{k: (v.to(dtype) if v.is_floating_point() and k not in ("mean", "var") else v)
                       for k, v in feeds.items()})[0].float()
        if got.shape != want.shape:
            raise ValueError(f"{os.path.basename(path)}: output shape {tuple(got.shape)}, expected {tuple(want.shape)}")
        err = (got - want).abs().max().item()
        scale = want.abs().max().item() or 1.0
        worst_abs, worst_rel = max(worst_abs, err), max(worst_rel, err / scale)
        shapes.append({k: list(v.shape) for k, v in feeds.items()})
    return {"max_abs": worst_abs, "max_rel": worst_rel, "cases": shapes, "reference": "torch fp32"}


def _cases_decoder(speech, lengths):
    g = torch.Generator().manual_seed(0)
    out = []
    for n in lengths:
        emb = torch.randn(n, speech.decoder.d, generator=g)
        x = speech.decoder.upsample(emb, 4 * n)
        mean, var = (v.reshape(1) for v in speech.decoder.norm_stats(x))
        out.append({"emb": emb, "mean": mean, "var": var})
    return out


def _cases_estimator(lengths):
    g = torch.Generator().manual_seed(1)
    return [{"x": torch.randn(2, 80, t, generator=g), "mu": torch.randn(2, 80, t, generator=g),
             "t": torch.full((2,), 0.3)} for t in lengths]


def _cases_vocoder(vocoder, lengths):
    g = torch.Generator().manual_seed(2)
    out = []
    for t in lengths:
        mel = torch.randn(1, 80, t, generator=g) - 4
        s = torch.tanh(0.1 * torch.randn(480 * t, generator=g))
        out.append({"mel": mel, "s_stft": vocoder.stft(s)})
    return out


def export(bundle_dir, manifest: Optional[dict], precision: str = "float32", *, speech, vocoder=None,
           lengths=(7, 31), est_lengths=(37, 213)) -> Dict[str, dict]:
    """Write the speech graphs of one precision into `bundle_dir` and return their manifest entries
    {stage: {precision: entry}}; a stage whose fp16 graph misses the bound gets {"skipped": reason}.
    `speech` is an fp32 SpeechDecoder (the parity reference); fp16 graphs are exported from a half copy."""
    import copy

    if precision not in ("float32", "float16"):
        raise ValueError(f"precision: expected 'float32' or 'float16', got {precision!r}")
    dtype = torch.float16 if precision == "float16" else torch.float32
    bound = FP16_BOUND if dtype == torch.float16 else FP32_BOUND
    suffix = "" if dtype == torch.float32 else ".fp16"
    os.makedirs(bundle_dir, exist_ok=True)
    ref = speech.float().eval()
    src = ref if dtype == torch.float32 else copy.deepcopy(ref).to(dtype)
    entries: Dict[str, dict] = {}
    jobs: List[tuple] = [
        ("audio_decoder", _DecoderGraph(src), _DecoderGraph(ref), ["emb", "mean", "var"], ["mu"],
         {"emb": {0: "codes"}, "mu": {2: "frames"}}, _cases_decoder(ref, lengths)),
        ("flow_estimator", src.estimator, ref.estimator, ["x", "mu", "t"], ["v"],
         {"x": {2: "frames"}, "mu": {2: "frames"}, "v": {2: "frames"}}, _cases_estimator(est_lengths)),
    ]
    if vocoder is not None and dtype == torch.float32:  # the vocoder stays fp32
        trunk = _VocoderTrunk(vocoder.float().eval())
        jobs.append(("vocoder", trunk, trunk, ["mel", "s_stft"], ["x"],
                     {"mel": {2: "frames"}, "s_stft": {2: "stft_frames"}, "x": {2: "stft_frames"}},
                     _cases_vocoder(vocoder, lengths)))
    with tempfile.TemporaryDirectory(dir=bundle_dir) as tmp:
        for stage, module, reference, ins, outs, dyn, cases in jobs:
            name = f"{stage}{suffix}.onnx"
            path = os.path.join(tmp, name)
            example = tuple(v.to(dtype) if v.is_floating_point() and k not in ("mean", "var") else v
                            for k, v in cases[0].items())
            with torch.no_grad():
                _export(module, example, ins, outs, dyn, path)
            try:
                parity = _parity(path, reference, cases, dtype)
            except Exception as e:  # onnxruntime may lack kernels for a precision on this machine
                entries[stage] = {precision: {"skipped": f"parity not measurable: {' '.join(str(e).split())[:200]}"}}
                continue
            if parity["max_rel"] > bound:
                entries[stage] = {precision: {"skipped": f"error {parity['max_rel']:.2e} of max |fp32| exceeds "
                                                         f"the bound {bound:.0e}", "parity": parity}}
                continue
            dst = os.path.join(bundle_dir, name)
            shutil.move(path, dst)
            entries[stage] = {precision: {"file": name, "data": [], "inputs": ins, "outputs": outs,
                                          "opset": OPSET, "parity": dict(parity, bound=bound)}}
    if manifest is not None:
        graphs = manifest.setdefault("graphs", {})
        for stage, by_prec in entries.items():
            for prec, entry in by_prec.items():
                if "file" in entry:
                    graphs.setdefault(stage, {})[prec] = entry
    return entries
