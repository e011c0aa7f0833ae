"""ONNX export of the audio encoder + bridge (`audio_encoder.onnx`, MODEL.md §1.4), with its parity check.

Graph (one row per 30 s piece; batch and frames dynamic, frames a multiple of 8 up to 3000):
    inputs   mel       (B, n_mels, F)   log-mel, zero past each piece's end
             mel_mask  (B, 1, F)        1 for a piece's frames, 0 past its end
             key_bias  (B, 1, 1, F/2)   0 for a piece's encoder frames, -1e4 past its end (additive key mask)
    output   features  (B, F/8, 4 d)    bridge output; row b keeps its first ((F_b - 1) // 2 + 1) // 4 groups
`omni_edge.audio_in.padded_inputs` builds the inputs. The piece structure is data (mask tensors), never a
shape computed from values, so the graph has no data-dependent shapes (TensorRT-friendly). fp16 graphs hold
fp16 weights and take fp16 inputs.

`export(bundle_dir, manifest, precision, *, source=None)` writes the graph into `bundle_dir`, checks it
(onnx checker, strict shape inference, no data-dependent ops), measures parity against the torch module in
onnxruntime and returns the manifest entry of `omni_edge.backends` (the caller puts it at
manifest["graphs"]["audio_encoder"][precision]). Tolerances: fp32 max |onnx - torch| <= 1e-4 x max |torch|
(same math, different kernels); fp16 <= 3e-2 x max |torch fp32| (fp16 weights and activations through
every layer; the per-layer rounding error of ~1e-3 grows with depth).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

import torch

STAGE = "audio_encoder"
OPSET = 17
FILES = {"float32": "audio_encoder.onnx", "float16": "audio_encoder.fp16.onnx"}
TOLERANCE = {"float32": 1e-4, "float16": 3e-2}
INPUTS = ["mel", "mel_mask", "key_bias"]
OUTPUTS = ["features"]
# Ops whose output shape depends on tensor values: none may appear (TensorRT needs static shape logic).
DATA_DEPENDENT_OPS = {"NonZero", "Unique", "Compress", "Loop", "If", "Scan", "NonMaxSuppression"}


class ExportError(ValueError):
    """The export could not be written or failed its checks."""


class EncoderGraph(torch.nn.Module):
    """Encoder (padded form) + bridge on groups of 4 frames."""

    def __init__(self, encoder, bridge):
        super().__init__()
        self.encoder = encoder
        self.bridge = bridge

    def forward(self, mel, mel_mask, key_bias):
        x = self.encoder.forward_padded(mel, mel_mask, key_bias)  # (B, F/2, d)
        b, t, d = x.shape
        return self.bridge.grouped(x.reshape(b, -1, 4 * d))  # (B, F/8, 4d)


def _probe_inputs(n_mels: int, frames: List[int], seed: int):
    from omni_edge.audio_in import padded_inputs

    g = torch.Generator().manual_seed(seed)
    mels = [torch.randn(n_mels, f, generator=g) for f in frames]
    return mels, padded_inputs(mels)


def check_graph(path: str) -> None:
    """onnx checker, strict shape inference and the no-data-dependent-ops rule; ExportError otherwise."""
    import onnx

    try:
        onnx.checker.check_model(path, full_check=True)
    except Exception as e:
        raise ExportError(f"{os.path.basename(path)}: onnx checker: {' '.join(str(e).split())[:300]}") from None
    model = onnx.load(path, load_external_data=False)
    bad = sorted({n.op_type for n in model.graph.node} & DATA_DEPENDENT_OPS)
    if bad:
        raise ExportError(f"{os.path.basename(path)}: data-dependent ops {bad} in the graph")


def parity(path: str, graph: EncoderGraph, reference: EncoderGraph, precision: str, *, threads: Optional[int] = None,
           cases=((3000,), (101, 37, 800))) -> Dict[str, object]:
    """Run the graph in onnxruntime and the fp32 torch module on probe inputs; errors over the kept groups."""
    from omni_edge.audio_in import piece_lengths_from_frames
    from omni_edge.backends import OnnxGraph

    sess = OnnxGraph(path, threads=threads)
    dt = torch.float16 if precision == "float16" else torch.float32
    n_mels = graph.encoder.conv1.weight.shape[1]
    worst_abs, worst_rel, rows = 0.0, 0.0, []
    for i, frames in enumerate(cases):
        mels, (mel, mask, bias) = _probe_inputs(n_mels, list(frames), seed=100 + i)
        with torch.inference_mode():
            want = reference(mel, mask, bias)
        (got,) = sess.run(mel=mel.to(dt), mel_mask=mask.to(dt), key_bias=bias.to(dt))
        for b, f in enumerate(frames):
            keep = piece_lengths_from_frames(f)
            err = (got[b, :keep].float() - want[b, :keep]).abs().max().item() if keep else 0.0
            scale = want[b, :keep].abs().max().item() if keep else 1.0
            worst_abs, worst_rel = max(worst_abs, err), max(worst_rel, err / max(scale, 1e-30))
        rows.append({"frames": list(frames), "max_abs": worst_abs})
    return {"max_abs": worst_abs, "max_rel": worst_rel, "tolerance_rel": TOLERANCE[precision], "cases": rows}


def export_modules(encoder, bridge, out_dir, precision: str = "float32", *, threads: Optional[int] = None,
                   check_parity: bool = True) -> Dict[str, object]:
    """Export already-built modules (fp32) into `out_dir`; returns the manifest entry."""
    if precision not in FILES:
        raise ExportError(f"precision must be one of {sorted(FILES)}, got {precision!r}")
    import onnx

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    reference = EncoderGraph(encoder.float(), bridge.float()).eval()
    dt = torch.float16 if precision == "float16" else torch.float32
    import copy
    graph = copy.deepcopy(reference).to(dt).eval()
    n_mels = encoder.conv1.weight.shape[1]
    _, (mel, mask, bias) = _probe_inputs(n_mels, [3000, 101], seed=1)
    name = FILES[precision]
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        raw = os.path.join(tmp, "raw.onnx")
        with torch.inference_mode():
            torch.onnx.export(graph, (mel.to(dt), mask.to(dt), bias.to(dt)), raw, dynamo=False, opset_version=OPSET,
                              input_names=INPUTS, output_names=OUTPUTS,
                              dynamic_axes={"mel": {0: "batch", 2: "frames"}, "mel_mask": {0: "batch", 2: "frames"},
                                            "key_bias": {0: "batch", 3: "enc_frames"},
                                            "features": {0: "batch", 1: "tokens"}})
        model = onnx.load(raw)
        final = os.path.join(tmp, name)
        onnx.save_model(model, final, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=name + ".data", size_threshold=1024)
        check_graph(final)
        report = parity(final, graph, reference, precision, threads=threads) if check_parity else None
        if report is not None and not report["max_rel"] <= TOLERANCE[precision]:
            raise ExportError(f"{name}: parity {report['max_rel']:.3g} (relative max error against the torch "
                              f"module) exceeds {TOLERANCE[precision]:g}")
        for f in (name, name + ".data"):
            shutil.move(os.path.join(tmp, f), out_dir / f)
    return {"file": name, "data": [name + ".data"], "inputs": INPUTS, "outputs": OUTPUTS, "opset": OPSET,
            "max_frames": 3000, "frames_multiple": 8, "parity": report}


def export(bundle_dir, manifest: Optional[dict], precision: str = "float32", *, source=None,
           threads: Optional[int] = None) -> Dict[str, object]:
    """Export the audio encoder + bridge of the checkpoint at `source` (default: `bundle_dir`) into
    `bundle_dir`; returns the manifest entry (also stored into `manifest["graphs"]` when a manifest is given)."""
    from omni_edge.audio_in import load_bridge, load_encoder
    from omni_edge.checkpoint import Checkpoint

    ckpt = Checkpoint.open(source if source is not None else bundle_dir, check=False)
    a = ckpt.config.audio
    if a is None:
        raise ExportError(f"{source or bundle_dir}: the checkpoint has no audio_config")
    tensors = {**ckpt.stage_tensors("audio_encoder", dtype=torch.float32),
               **ckpt.stage_tensors("audio_bridge", dtype=torch.float32)}
    entry = export_modules(load_encoder(tensors, a), load_bridge(tensors, a), bundle_dir, precision, threads=threads)
    if manifest is not None:
        manifest.setdefault("graphs", {}).setdefault(STAGE, {})[precision] = entry
    return entry
