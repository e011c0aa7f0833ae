"""Vision stage benchmark: encode time per image for omni-edge's stage (torch backend with fused SDPA or the
native varlen attention, and the exported ONNX graph in onnxruntime) against transformers' Qwen2-VL vision tower
holding the same random weights, at the real widths (embed 1280, 16 heads x 80, MLP 5120, bridge 5120 -> 3584).

Images: 448x448, 1024x768 and 1344x1344 after the reference's smart_resize (token counts shown). Each figure is
the median of --reps calls after one warm-up (min and max shown), all in one process with the same thread count.
GFLOP/s counts the tower's matmul work (patch embed, qkv, proj, MLP, attention QK^T and PV inside each image,
bridge) and is compared with this machine's fp32 matmul rate measured in the same run (torch.matmul on
(4096 x 1280) @ (1280 x 5120), the MLP's shape).

The full tower has 32 layers; one 1344x1344 image is then ~25 TFLOP, minutes per call on a 2-core machine. So
--layers (default 1) sets the depth actually run, every layer with the real shapes, and the table gives
per-image times at that depth plus the full-depth (32-layer) time extrapolated per layer. The table says so.

The ONNX graph attends over all patches with a block-diagonal mask (no data-dependent shapes, TensorRT-ready),
so its score tensor is heads x P x P in fp32: 5.4 GB for one 1344x1344 image. Sizes above --onnx-max-patches
(default 4096) are skipped for it and marked so.

    PYTHONPATH=. python benchmarks/bench_vision.py [--threads 2] [--layers 1] [--reps 2] [--sizes 448x448,8x448x448]
        [--no-onnx] [--no-hf]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

from omni_edge.config import parse_config
from omni_edge.inputs import smart_resize
from omni_edge.testing import random_tensors, reference_config
from omni_edge import vision

SIZES = ["448x448", "1024x768", "1344x1344", "8x448x448"]  # WxH, or NxWxH: a video of N frames in one call


def timed(fn, reps: int):
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), min(times), max(times)


def matmul_rate(reps: int, m: int = 4096, k: int = 1280, n: int = 5120) -> float:
    """fp32 torch matmul GFLOP/s of (m, k) @ (k, n), median of max(reps, 5) (bench_speech.py uses it too)."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    med, _, _ = timed(lambda: torch.matmul(a, b), max(reps, 5))
    return 2 * m * k * n / med / 1e9


def tower_flops(p: int, cfg, layers: int) -> float:
    """Matmul flops of `layers` blocks + patch embed + bridge for one image of p patches."""
    e, m, h = cfg.embed_dim, cfg.mlp_dim, cfg.hidden_size
    per_layer = 2 * p * e * (3 * e + e + 2 * m) + 4 * p * p * e
    embed = 2 * p * (cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size ** 2) * e
    bridge = 2 * (p // 4) * (4 * e) * (4 * e + h)
    return embed + layers * per_layer + bridge, per_layer


def hf_tower(tensors, cfg):
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

    hc = Qwen2VLVisionConfig(depth=cfg.depth, embed_dim=cfg.embed_dim, hidden_size=cfg.hidden_size,
                             hidden_act="quick_gelu", mlp_ratio=int(cfg.mlp_ratio) if float(cfg.mlp_ratio).is_integer() else cfg.mlp_ratio, num_heads=cfg.num_heads,
                             in_channels=cfg.in_channels, patch_size=cfg.patch_size,
                             spatial_merge_size=cfg.spatial_merge_size, temporal_patch_size=cfg.temporal_patch_size)
    hc._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = Qwen2VisionTransformerPretrainedModel(hc)
    sd = {}
    for name, t in tensors.items():
        if name.startswith("model.visual_model."):
            sd[name[len("model.visual_model."):]] = t
        else:
            sd["merger." + name[len("model.visual_bridge_model."):]] = t
    model.load_state_dict(sd, strict=False, assign=True)
    model.rotary_pos_emb.inv_freq = model.rotary_pos_emb.compute_axial_rope_parameters(hc)[0]
    return model.eval()


def onnx_graph(tower, tmp: str, threads: int):
    """Export the tower as `omni-edge export` does (fp32) and open it in onnxruntime."""
    try:
        from omni_edge.export.vision import VisionGraph, sample_inputs
        from omni_edge.export.common import externalize
    except ImportError:  # running from a source checkout without an install
        from export.vision import VisionGraph, sample_inputs
        from export.common import externalize
    from omni_edge.backends import OnnxGraph
    import warnings

    grids = [(1, 4, 6), (1, 2, 2)]
    example = sample_inputs(grids, tower.patch_dim, tower.head_dim, 2, torch.float32)
    raw = os.path.join(tmp, "raw")
    os.makedirs(raw)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(VisionGraph(tower), example, os.path.join(raw, "vision.onnx"),
                          input_names=["patches", "cos", "sin", "segment_ids"], output_names=["embeddings"],
                          dynamic_axes={"patches": {0: "P"}, "cos": {0: "P"}, "sin": {0: "P"},
                                        "segment_ids": {0: "P"}, "embeddings": {0: "T"}},
                          opset_version=17, dynamo=False)
    from pathlib import Path
    externalize(Path(raw) / "vision.onnx", Path(tmp) / "vision.onnx", "vision.onnx.data", 256 << 20)
    return OnnxGraph(os.path.join(tmp, "vision.onnx"), threads=threads)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layers", type=int, default=1, help="ViT depth to run (real model: 32)")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--sizes", default=",".join(SIZES),
                    help="comma-separated WxH images or NxWxH videos (N frames, one call)")
    ap.add_argument("--no-onnx", action="store_true")
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--onnx-max-patches", type=int, default=4096)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    full = parse_config(reference_config())
    depth_full = full.visual.depth
    cfg_dict = reference_config()
    cfg_dict["visual_config"]["depth"] = args.layers
    config = parse_config(cfg_dict)
    cfg = config.visual
    tensors = random_tensors(config, seed=0, dtype=torch.float32, stages=("visual", "visual_bridge"))
    tower = vision.build_tower(tensors, cfg)
    from omni_edge import backends
    stages = {att: vision.VisionStage(cfg, tower=tower, pick=backends.Pick("vision", "torch", "benchmark"),
                                      device="cpu", dtype=torch.float32, attention=att) for att in ("sdpa", "varlen")}
    peers = {}
    if not args.no_hf:
        peers["transformers"] = hf_tower(tensors, cfg)
    tmp = tempfile.mkdtemp(prefix="bench_vision_")
    graph = None
    if not args.no_onnx:
        graph = onnx_graph(tower, tmp, args.threads)

    rate = matmul_rate(args.reps)
    from omni_edge.ops import _dispatch
    native = _dispatch.native_enabled("attention", torch.device("cpu"))
    print(f"vision tower benchmark ({time.strftime('%Y-%m-%d %H:%M')}, load average "
          f"{' '.join(f'{v:.1f}' for v in os.getloadavg())}): fp32, CPU, {args.threads} threads, "
          f"{args.layers} of {depth_full} layers run "
          f"(embed {cfg.embed_dim}, {cfg.num_heads} heads x {cfg.embed_dim // cfg.num_heads}, MLP {cfg.mlp_dim}, "
          f"bridge -> {cfg.hidden_size}), random weights; native varlen attention: {native}")
    print("omni-edge torch sdpa = the CPU default (torch's fused SDPA, one batched call per image size); "
          "torch varlen = the native block-diagonal kernel (the CUDA default)")
    print(f"measured fp32 matmul rate (4096x1280 @ 1280x5120, torch): {rate:.1f} GFLOP/s; median of {args.reps} "
          f"calls after a warm-up (min-max); 'full depth' = patch embed + bridge + {depth_full} x per-layer time")
    head = (f"{'image':>10} {'tokens':>6} {'patches':>7} | {'backend':<24} {'ms / call':>11} {'(min-max)':>17} "
            f"{'GFLOP/s':>8} {'% mm':>5} {'full depth s':>12} {'vs transformers':>15}")
    print(head)
    print("-" * len(head))
    for label in args.sizes.split(","):
        dims = [int(v) for v in label.split("x")]
        frames, (w, h) = (dims[0], dims[1:]) if len(dims) == 3 else (1, dims)
        limit = full.video.max_pixels if len(dims) == 3 else cfg.max_pixels
        rh, rw = smart_resize(h, w, 28, cfg.min_pixels, limit)
        grid = [(1, rh // 14, rw // 14)] * frames
        p = frames * grid[0][1] * grid[0][2]
        x = torch.randn(p, tower.patch_dim)
        flops, per_layer = tower_flops(p // frames, cfg, args.layers)
        flops, per_layer = flops * frames, per_layer * frames
        rows = {}
        with torch.inference_mode():
            for att, stage in stages.items():
                rows[f"omni-edge torch {att}"] = timed(lambda: stage.run(x, grid), args.reps)
            if "transformers" in peers:
                gt = torch.tensor(grid)
                rows["transformers (sdpa)"] = timed(lambda: peers["transformers"](hidden_states=x, grid_thw=gt),
                                                    args.reps)
            if graph is not None:
                if p <= args.onnx_max_patches:
                    cos, sin = vision.rotary_cos_sin(grid, tower.head_dim, 2)
                    seg = vision.segment_ids_of(grid)
                    rows["omni-edge onnx (ort)"] = timed(lambda: graph.run(patches=x, cos=cos, sin=sin,
                                                                           segment_ids=seg), args.reps)
                else:
                    rows["omni-edge onnx (ort)"] = None
        peer = rows.get("transformers (sdpa)")
        for name, r in rows.items():
            if r is None:
                note = "skipped: P x P mask attention > --onnx-max-patches"
                print(f"{label:>10} {p // 4:>6} {p:>7} | {name:<24} {note:>60}")
                continue
            med, lo, hi = r
            gflops = flops / med / 1e9
            fixed = flops - args.layers * per_layer
            full_s = med * (fixed + depth_full * per_layer) / flops
            ratio = f"{peer[0] / med:.2f}x" if peer else "-"
            print(f"{label:>10} {p // 4:>6} {p:>7} | {name:<24} {med * 1e3:>11.1f} "
                  f"{f'({lo * 1e3:.0f}-{hi * 1e3:.0f})':>17} {gflops:>8.1f} {100 * gflops / rate:>5.0f} "
                  f"{full_s:>12.1f} {ratio:>15}")
    print("'vs transformers' = transformers time / this time (>1: faster); 'full depth s' scales each backend's "
          "measured time by flops (an estimate, not a measurement); NxWxH rows are N video frames in one call "
          "(video max_pixels), tokens and patches summed over the frames.")


if __name__ == "__main__":
    main()
