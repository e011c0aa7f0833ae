"""The vision stage: Qwen2-VL ViT + the 2x2 bridge, images and video frames -> backbone input rows.

MODEL.md §1.2 (`OmniVisualEncoder` = transformers' Qwen2-VL vision tower without its merger, then
`OmniVisualBridge`):

    patches (P, 1176) -> patch embed (Conv3d k = s = (2, 14, 14), no bias: one GEMM)
    -> depth x [ x + proj(attn(rope(qkv(LN1 x)))) ; x + fc2(QuickGELU(fc1(LN2 x))) ]     LayerNorm eps 1e-6
    -> bridge: ln_q -> 4 consecutive patches (one 2x2 group) as one row of 4*embed -> Linear -> GELU -> Linear
    -> (P / 4, hidden)

Attention is full inside each image or video frame and absent across them. `embed` runs every image and frame
of every item in one pass: one GEMM per linear over all patches, and per layer either one block-diagonal call
of `omni_edge.ops.attention.varlen` (native kernel, `cu_seqlens` marking the images; the default on CUDA) or
torch's fused SDPA batched over the images of each size (`grouped_sdpa`; the default on CPU, where it measured
faster than the native kernel).

The 2-D rotary embedding: head_dim D = 80 is split into two halves of 40 (row ids, column ids), each
carrying 20 frequencies theta^(-2i/40), theta = 10000, duplicated (rotate-half style) to D; the ids of a patch
are its (row, column) in the image, enumerated in 2x2-merge order like the patches themselves.

Backends: the torch module above, or the ONNX graph `omni-edge export BUNDLE --stages vision` wrote into a
bundle (onnxruntime), chosen by `omni_edge.backends.resolve("vision", ...)`; the graph takes the same patches
plus host-built rotary tables and segment ids, so `embed` looks the same either way.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from omni_edge.config import ModelConfig, VisualConfig

ROPE_THETA = 10000.0
LN_EPS = 1e-6
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ------------------------------------------------------------------------------------------------
# Host-side tables: rotary cos/sin, segment offsets
# ------------------------------------------------------------------------------------------------

def rotary_ids(grid_thw: Sequence[Tuple[int, int, int]], merge: int) -> torch.Tensor:
    """(P, 2) int64 (row, column) of every patch, patches in 2x2-merge order, images one after another."""
    out = []
    for t, h, w in grid_thw:
        if h % merge or w % merge:
            raise ValueError(f"grid_thw: ({t}, {h}, {w}) is not a multiple of the merge size {merge}")
        rows = torch.arange(h).view(h // merge, merge, 1, 1).expand(h // merge, merge, w // merge, merge)
        cols = torch.arange(w).view(1, 1, w // merge, merge).expand(h // merge, merge, w // merge, merge)
        ids = torch.stack([rows.permute(0, 2, 1, 3).reshape(-1), cols.permute(0, 2, 1, 3).reshape(-1)], dim=1)
        out.append(ids.repeat(t, 1))
    return torch.cat(out) if out else torch.zeros(0, 2, dtype=torch.int64)


def rotary_cos_sin(grid_thw, head_dim: int, merge: int, theta: float = ROPE_THETA):
    """cos, sin (P, head_dim) fp32: [row freqs | column freqs] duplicated, as the reference computes them."""
    half = head_dim // 2
    inv_freq = 1.0 / (theta ** (torch.arange(0, half, 2, dtype=torch.float32) / half))  # (half/2,)
    ids = rotary_ids(grid_thw, merge)
    longest = int(ids.max()) + 1 if ids.numel() else 1
    table = torch.outer(torch.arange(longest, dtype=torch.float32), inv_freq)  # (longest, half/2)
    freqs = table[ids].flatten(1)  # (P, half)
    emb = torch.cat([freqs, freqs], dim=-1)  # (P, head_dim)
    return emb.cos(), emb.sin()


def cu_seqlens_of(grid_thw) -> torch.Tensor:
    """(n + 1,) int32 offsets of each image / frame's patches (one segment per temporal slice)."""
    lens = [h * w for t, h, w in grid_thw for _ in range(t)]
    return torch.tensor([0] + lens, dtype=torch.int64).cumsum(0).to(torch.int32)


def segment_ids_of(grid_thw) -> torch.Tensor:
    """(P,) int64: which image / frame each patch belongs to (the ONNX graph's block-diagonal mask input)."""
    lens = [h * w for t, h, w in grid_thw for _ in range(t)]
    return torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens, dtype=torch.int64))


# ------------------------------------------------------------------------------------------------
# The module tree
# ------------------------------------------------------------------------------------------------

def rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (P, H, D) any dtype; cos/sin (P, D) fp32. Computed in fp32, returned in x's dtype (contiguous)."""
    xf = x.float()
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    return (xf * c + rotate_half(xf) * s).to(x.dtype)


def masked_attention(q, k, v, bias, scale: float):
    """Plain-op attention for the exported graph: q/k/v (P, H, D), bias (P, P) fp32 additive (0 / -inf-like).
    Scores and softmax in fp32 whatever the input dtype. -> (P, H, D) in q's dtype."""
    qh, kh, vh = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # (H, P, D)
    s = torch.matmul(qh.float(), kh.float().transpose(1, 2)) * scale + bias
    p = torch.softmax(s, dim=-1).to(v.dtype)
    return torch.matmul(p, vh).transpose(0, 1)


def grouped_sdpa(q, k, v, lengths: Sequence[int]):
    """Block-diagonal attention through torch's fused SDPA: q/k/v (P, H, D), segments of `lengths` back to back.
    Segments of equal length form one batched call (a video's frames: one call per layer); a run of them lying
    back to back is a view, others are gathered. -> (P, H, D)."""
    n, h, d = q.shape
    out = torch.empty_like(q)
    groups: dict = {}
    start = 0
    for length in lengths:
        if length:
            groups.setdefault(length, []).append(start)
        start += length
    for length, starts in groups.items():
        b = len(starts)
        if starts[-1] - starts[0] == (b - 1) * length:  # back to back: views, no copies
            rows = slice(starts[0], starts[0] + b * length)
        else:
            rows = (torch.tensor(starts, device=q.device)[:, None]
                    + torch.arange(length, device=q.device)[None, :]).reshape(-1)
        qb, kb, vb = (x[rows].reshape(b, length, h, d).transpose(1, 2) for x in (q, k, v))
        o = F.scaled_dot_product_attention(qb, kb, vb)  # (b, H, length, D)
        out[rows] = o.transpose(1, 2).reshape(b * length, h, d)
    return out


ATTENTION = ("auto", "varlen", "sdpa")


class VisionAttention(nn.Module):
    def __init__(self, e: int, heads: int):
        super().__init__()
        self.heads = heads
        # model.visual_model.blocks.N.attn.qkv.{weight (3e, e), bias (3e,)}, rows [q | k | v]
        self.qkv = nn.Linear(e, 3 * e)
        self.proj = nn.Linear(e, e)  # model.visual_model.blocks.N.attn.proj.{weight (e, e), bias (e,)}

    def forward(self, x, cos, sin, attend):
        n, e = x.shape
        q, k, v = self.qkv(x).view(n, 3, self.heads, e // self.heads).unbind(1)  # each (n, H, D)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        return self.proj(attend(q, k, v.contiguous()).reshape(n, e))


class VisionMlp(nn.Module):
    def __init__(self, e: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(e, hidden)  # model.visual_model.blocks.N.mlp.fc1.{weight (mlp, e), bias (mlp,)}
        self.fc2 = nn.Linear(hidden, e)  # model.visual_model.blocks.N.mlp.fc2.{weight (e, mlp), bias (e,)}

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(h * torch.sigmoid(1.702 * h))  # QuickGELU


class VisionBlock(nn.Module):
    def __init__(self, e: int, heads: int, mlp: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(e, eps=LN_EPS)  # model.visual_model.blocks.N.norm1.{weight, bias} (e,)
        self.norm2 = nn.LayerNorm(e, eps=LN_EPS)  # model.visual_model.blocks.N.norm2.{weight, bias} (e,)
        self.attn = VisionAttention(e, heads)
        self.mlp = VisionMlp(e, mlp)

    def forward(self, x, cos, sin, attend):
        x = x + self.attn(self.norm1(x), cos, sin, attend)
        return x + self.mlp(self.norm2(x))


class VisionBridge(nn.Module):
    """OmniVisualBridge: same shape as Qwen2-VL's PatchMerger."""

    def __init__(self, e: int, merge: int, hidden: int):
        super().__init__()
        self.group = merge * merge
        merged = e * self.group
        self.ln_q = nn.LayerNorm(e, eps=LN_EPS)  # model.visual_bridge_model.ln_q.{weight, bias} (e,)
        self.mlp = nn.Sequential(
            nn.Linear(merged, merged),  # model.visual_bridge_model.mlp.0.{weight (4e, 4e), bias (4e,)}
            nn.GELU(),  # exact (erf)
            nn.Linear(merged, hidden),  # model.visual_bridge_model.mlp.2.{weight (hidden, 4e), bias (hidden,)}
        )

    def forward(self, x):
        x = self.ln_q(x)
        return self.mlp(x.reshape(-1, x.shape[-1] * self.group))


class VisionTower(nn.Module):
    """ViT + bridge over packed patches. `attend(q, k, v) -> (P, H, D)` is the block-diagonal attention."""

    def __init__(self, cfg: VisualConfig):
        super().__init__()
        e = cfg.embed_dim
        if e % cfg.num_heads or (e // cfg.num_heads) % 4:
            raise ValueError(f"visual_config: embed_dim {e} / num_heads {cfg.num_heads} must give a head_dim that "
                             f"is a multiple of 4 (2-D rotary embedding)")
        self.cfg = cfg
        self.heads = cfg.num_heads
        self.head_dim = e // cfg.num_heads
        self.patch_dim = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size ** 2  # 1176
        # model.visual_model.patch_embed.proj.weight (e, 3, 2, 14, 14), viewed as (e, 1176): Conv3d with
        # kernel = stride = its size over one patch is this GEMM
        self.patch_embed = nn.Linear(self.patch_dim, e, bias=False)
        self.blocks = nn.ModuleList(VisionBlock(e, cfg.num_heads, cfg.mlp_dim) for _ in range(cfg.depth))
        self.bridge = VisionBridge(e, cfg.spatial_merge_size, cfg.hidden_size)

    def forward(self, patches, cos, sin, attend):
        x = self.patch_embed(patches.to(self.patch_embed.weight.dtype))
        for blk in self.blocks:
            x = blk(x, cos, sin, attend)
        return self.bridge(x)


def tower_state_dict(tensors: dict, cfg: VisualConfig) -> dict:
    """Checkpoint names (`model.visual_model.*`, `model.visual_bridge_model.*`) -> VisionTower parameter names."""
    out = {}
    for name, t in tensors.items():
        if name == "model.visual_model.patch_embed.proj.weight":
            out["patch_embed.weight"] = t.reshape(t.shape[0], -1)
        elif name.startswith("model.visual_model."):
            out[name[len("model.visual_model."):]] = t
        elif name.startswith("model.visual_bridge_model."):
            out["bridge." + name[len("model.visual_bridge_model."):]] = t
        else:
            raise ValueError(f"vision: unexpected tensor {name}")
    return out


def build_tower(tensors: dict, cfg: VisualConfig) -> VisionTower:
    """A VisionTower holding `tensors` (checkpoint names; already in the wanted dtype and device)."""
    with torch.device("meta"):
        tower = VisionTower(cfg)
    tower.load_state_dict(tower_state_dict(tensors, cfg), strict=True, assign=True)
    return tower.eval()


# ------------------------------------------------------------------------------------------------
# The stage
# ------------------------------------------------------------------------------------------------

class VisionStage:
    """Images / video frames -> backbone input rows, on the torch module or an ONNX graph."""

    def __init__(self, cfg: VisualConfig, *, tower: Optional[VisionTower], pick, device, dtype, threads=None,
                 attention: str = "auto"):
        if attention not in ATTENTION:
            raise ValueError(f"vision: attention must be one of {', '.join(ATTENTION)}, got {attention!r}")
        if attention == "auto":
            # CPU: torch's fused SDPA kernel measured faster than the native varlen kernel on AVX2 machines
            # (benchmarks/bench_vision.py); CUDA: the native varlen kernel (one launch for all images).
            attention = "varlen" if torch.device(device).type == "cuda" else "sdpa"
        self.attention = attention
        self.cfg = cfg
        self.tower = tower
        self.pick = pick
        self.device = torch.device(device)
        self.dtype = dtype
        self.head_dim = cfg.embed_dim // cfg.num_heads
        self.patch_dim = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size ** 2
        self.graph = pick.open(threads=threads) if pick.kind == "onnx" else None

    @classmethod
    def from_checkpoint(cls, ckpt, cfg: ModelConfig, *, device="cpu", dtype=torch.float32, backend="auto",
                        bundle_dir=None, manifest=None, threads=None, attention: str = "auto") -> "VisionStage":
        from omni_edge import backends

        if cfg.visual is None:
            raise ValueError("vision: this checkpoint has no visual_config (not an omni model)")
        if isinstance(dtype, str):
            if dtype not in DTYPES:
                raise ValueError(f"vision: dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
            dtype = DTYPES[dtype]
        pick = backends.resolve("vision", backend, bundle_dir, manifest, device=device, dtype=dtype)
        tower = None
        if pick.kind == "torch":
            tensors = {}
            for stage in ("visual", "visual_bridge"):
                tensors.update(ckpt.stage_tensors(stage, dtype=dtype, device=device))
            tower = build_tower(tensors, cfg.visual)
        return cls(cfg.visual, tower=tower, pick=pick, device=device, dtype=dtype, threads=threads,
                   attention=attention)

    def describe(self) -> str:
        how = "" if self.graph is not None else f", attention {self.attention}"
        return f"vision: {self.pick.describe()}, {str(self.dtype).replace('torch.', '')} on {self.device}{how}"

    def _check(self, patches: torch.Tensor, grids) -> None:
        if patches.ndim != 2 or patches.shape[1] != self.patch_dim:
            raise ValueError(f"vision: patches must be (P, {self.patch_dim}), got {tuple(patches.shape)}")
        m = self.cfg.spatial_merge_size
        for g in grids:
            if len(g) != 3 or min(g) <= 0 or g[1] % m or g[2] % m:
                raise ValueError(f"vision: grid_thw entry {tuple(g)} must be positive with h and w multiples of {m}")
        want = sum(t * h * w for t, h, w in grids)
        if patches.shape[0] != want:
            raise ValueError(f"vision: {patches.shape[0]} patches, but grid_thw {list(map(tuple, grids))} "
                             f"needs {want}")

    @torch.inference_mode()
    def run(self, patches: torch.Tensor, grid_thw) -> torch.Tensor:
        """Packed patches (P, 1176) of the images / frames in `grid_thw` -> (P / 4, hidden)."""
        grids = [tuple(int(v) for v in g) for g in grid_thw]
        self._check(patches, grids)
        if patches.shape[0] == 0:
            return torch.zeros(0, self.cfg.hidden_size, dtype=self.dtype, device=self.device)
        cos, sin = rotary_cos_sin(grids, self.head_dim, self.cfg.spatial_merge_size)
        if self.graph is not None:
            x = patches.to(torch.float16 if self.pick.precision == "float16" else torch.float32)
            out = self.graph.run(patches=x, cos=cos, sin=sin, segment_ids=segment_ids_of(grids))[0]
            return out.to(self.dtype)
        dev = self.device
        if self.attention == "varlen":
            from omni_edge.ops import attention

            cu = cu_seqlens_of(grids).to(dev)

            def attend(q, k, v):
                return attention.varlen(q, k, v, cu)
        else:
            lengths = [h * w for t, h, w in grids for _ in range(t)]

            def attend(q, k, v):
                return grouped_sdpa(q, k, v, lengths)
        return self.tower(patches.to(dev, self.dtype), cos.to(dev), sin.to(dev), attend)

    def embed(self, items) -> List[torch.Tensor]:
        """Prepared VisualInputs -> one (n_tokens, hidden) tensor per item, all images / frames in one pass."""
        items = list(items)
        if not items:
            return []
        patches = torch.cat([it.patches for it in items])
        grids = [g for it in items for g in it.grid_thw]
        out = self.run(patches, grids)
        return list(out.split([it.n_tokens for it in items]))
