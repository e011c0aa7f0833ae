"""ONNX export of the vision stage (Qwen2-VL ViT + bridge), fp32 and fp16.

The graph (`vision.onnx` / `vision.fp16.onnx`) takes what the host builds cheaply, so the number of patches and
of images / frames are both dynamic and no shape depends on tensor values:

    patches      (P, 1176)  fp32 (fp16 in the fp16 graph)  Qwen2-VL patch order, images / frames packed
    cos, sin     (P, 80)    fp32                           2-D rotary tables (`omni_edge.vision.rotary_cos_sin`)
    segment_ids  (P,)       int64                          image / frame of each patch (`segment_ids_of`)
    -> embeddings (P / 4, hidden)  fp32 (fp16)

The block-diagonal mask is built in the graph from segment_ids (Equal + Where), attention is written with
MatMul + Softmax (scores and softmax in fp32 in both variants, as the runtime kernel), so only standard ops
appear. The legacy TorchScript exporter is used (`dynamo=False`): it handles this tower; the dynamo exporter
fails on it.
"""

from __future__ import annotations

import time
import warnings
from typing import List

import torch
from torch import nn

from omni_edge import backends, vision

from .common import (ExportContext, ExportError, GraphFile, check_graph, externalize, install_files, parity,
                     remove_scratch, scratch_dir)

STAGE = "vision"
INPUTS = ["patches", "cos", "sin", "segment_ids"]
OUTPUTS = ["embeddings"]
FILES = {"float32": "vision.onnx", "float16": "vision.fp16.onnx"}
MASK_VALUE = -1e30  # additive mask across images: exp() gives exactly 0 in fp32
# Parity of the graph (onnxruntime CPU) against the fp32 torch stage, as max |diff| / max |ref|:
# fp32: same math, different summation order and attention blocking: 1e-4;
# fp16: weights and activations rounded to fp16 (11-bit mantissa), accumulated over depth: 3e-2.
TOLERANCE = {"float32": 1e-4, "float16": 3e-2}
# Parity cases: lists of (t, h, w) grids; odd patch counts, several images and frames per call.
CASES = [[(1, 4, 6)], [(1, 2, 2), (1, 6, 4), (1, 2, 8)], [(1, 10, 2), (1, 4, 4)]]


class VisionGraph(nn.Module):
    """The exported function: the tower over packed patches with an in-graph block-diagonal mask."""

    def __init__(self, tower: vision.VisionTower):
        super().__init__()
        self.tower = tower

    def forward(self, patches, cos, sin, segment_ids):
        same = segment_ids.unsqueeze(1) == segment_ids.unsqueeze(0)  # (P, P)
        bias = torch.where(same, torch.zeros((), dtype=torch.float32), torch.full((), MASK_VALUE))
        scale = self.tower.head_dim ** -0.5
        return self.tower(patches, cos, sin, lambda q, k, v: vision.masked_attention(q, k, v, bias, scale))


def sample_inputs(grids, patch_dim: int, head_dim: int, merge: int, dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n = sum(t * h * w for t, h, w in grids)
    patches = torch.randn(n, patch_dim, generator=g).to(dtype)
    cos, sin = vision.rotary_cos_sin(grids, head_dim, merge)
    return patches, cos, sin, vision.segment_ids_of(grids)


def export_one(ctx: ExportContext, precision: str, reference: vision.VisionStage, tensors: dict) -> GraphFile:
    import onnxruntime as ort

    cfg = ctx.config.visual
    dtype = {"float32": torch.float32, "float16": torch.float16}[precision]
    tower = vision.build_tower({k: v.to(dtype) for k, v in tensors.items()}, cfg)
    graph = VisionGraph(tower).eval()
    head_dim, merge = cfg.embed_dim // cfg.num_heads, cfg.spatial_merge_size
    example = sample_inputs(CASES[1], tower.patch_dim, head_dim, merge, dtype)
    name = FILES[precision]
    scratch = scratch_dir(ctx.bundle_dir, STAGE)
    try:
        raw = scratch / "raw" / name
        raw.parent.mkdir()
        t0 = time.perf_counter()
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # the legacy exporter is chosen on purpose
            torch.onnx.export(graph, example, str(raw), input_names=INPUTS, output_names=OUTPUTS,
                              dynamic_axes={"patches": {0: "patches"}, "cos": {0: "patches"}, "sin": {0: "patches"},
                                            "segment_ids": {0: "patches"}, "embeddings": {0: "tokens"}},
                              opset_version=ctx.opset, dynamo=False, do_constant_folding=True)
        data = externalize(raw, scratch / name, name + ".data", ctx.external_data_above)
        remove_scratch(raw.parent)
        check_graph(scratch / name)

        opts = ort.SessionOptions()
        if ctx.threads:
            opts.intra_op_num_threads = ctx.threads
        sess = ort.InferenceSession(str(scratch / name), sess_options=opts, providers=["CPUExecutionProvider"])
        cases, worst_abs, worst_rel = [], 0.0, 0.0
        for i, grids in enumerate(CASES):
            patches, cos, sin, seg = sample_inputs(grids, tower.patch_dim, head_dim, merge, torch.float32, seed=i)
            want = reference.run(patches, grids).float()
            feeds = {"patches": patches.to(dtype).numpy(), "cos": cos.numpy(), "sin": sin.numpy(),
                     "segment_ids": seg.numpy()}
            got = torch.from_numpy(sess.run(None, feeds)[0]).float()
            if got.shape != want.shape:
                raise ExportError(f"{name}: output shape {tuple(got.shape)} for grids {grids}, the torch stage "
                                  f"gives {tuple(want.shape)}")
            p = parity(got, want)
            cases.append({"grids": [list(g) for g in grids], **p})
            worst_abs, worst_rel = max(worst_abs, p["max_abs"]), max(worst_rel, p["max_rel"])
        if not worst_rel <= TOLERANCE[precision]:
            raise ExportError(f"{name}: onnxruntime output differs from the torch stage by {worst_rel:.3g} "
                              f"(relative to max |ref|), tolerance {TOLERANCE[precision]}; not written")
        install_files(scratch, ctx.bundle_dir, data + [name])
    finally:
        remove_scratch(scratch)
    ctx.log(f"vision: wrote {name}{' + ' + ', '.join(data) if data else ''} ({precision}, opset {ctx.opset}, "
            f"{time.perf_counter() - t0:.1f} s); parity vs torch fp32: max rel {worst_rel:.2e}")
    return GraphFile(stage=STAGE, precision=precision, file=name, data=data, inputs=INPUTS, outputs=OUTPUTS,
                     opset=ctx.opset,
                     parity={"max_abs": worst_abs, "max_rel": worst_rel, "tolerance": TOLERANCE[precision],
                             "reference": "torch float32 (native varlen attention), onnxruntime CPU",
                             "cases": cases},
                     extra={"io": {"patches": ["P", tower.patch_dim], "cos": ["P", head_dim], "sin": ["P", head_dim],
                                   "segment_ids": ["P"], "embeddings": ["P/4", cfg.hidden_size]}})


def export(ctx: ExportContext) -> List[GraphFile]:
    if ctx.config.visual is None:
        raise ExportError("vision: the checkpoint has no visual_config")
    tensors = {}
    for stage in ("visual", "visual_bridge"):
        tensors.update(ctx.ckpt.stage_tensors(stage, dtype=torch.float32))
    reference = vision.VisionStage(ctx.config.visual, tower=vision.build_tower(tensors, ctx.config.visual),
                                   pick=backends.Pick(STAGE, "torch", "export reference"), device="cpu",
                                   dtype=torch.float32)
    return [export_one(ctx, p, reference, tensors) for p in ctx.precisions]

