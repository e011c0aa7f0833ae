"""The language backbone: Qwen2.5-7B decoder with Baichuan tensor names (fused W_pack), or plain Llama / Qwen2.

MODEL.md §1.5: pre-norm decoder layers (RMSNorm -> attention -> residual -> RMSNorm -> SwiGLU MLP -> residual),
GQA attention with RoPE (rotate-half / NeoX style, theta from the config, computed in fp32), final RMSNorm,
untied (or tied) lm_head. Each linear is dense (fp32 / bf16 / fp16) or a 4-bit `omni_edge.ops.q4.QWeight`.
Attention runs through `omni_edge.ops.attention` over a KV cache allocated once per session
(`allocate_cache`), never inside `forward`. The same code runs on CPU and CUDA.

    bb = Backbone.from_checkpoint(Checkpoint.open(folder), device="cpu", dtype=torch.float32, quant="none")
    bb.allocate_cache(max_len=512)
    h = bb.forward(ids, start=0)              # (B, T, hidden) after model.norm; K/V written at 0..T-1
    logits = bb.logits(h[:, -1])              # (B, vocab) fp32
    h = bb.forward(next_ids[:, None], start=T)  # T == 1 runs attention.decode

Decode of one sequence on the CPU (B == 1, T == 1, fp32) runs every layer in one native call
(csrc/decode: `_C.DecodePlan`, built from the layers' tensors when the cache is allocated and rebuilt after a
linear is replaced) instead of the Python layer loop, whose per-op dispatch dominates a small model's step.
Same kernels, same results up to fp32 summation order in the dense matmuls; OMNI_EDGE_NATIVE_DECODE=0 (or
OMNI_EDGE_NATIVE=0) keeps the Python loop, which stays the reference. The plan includes the lm_head, so
`decode_step` runs a whole token (layers, final norm, lm_head) in one native call; `forward` still returns
hidden states only, for the callers that need no logits.

Embedding and lm_head precision. On the CPU with fp32 activations, a 16-bit embedding / dense lm_head (fp16 in
bundles, bf16 in Baichuan's checkpoint) stays in its stored dtype: the lookup converts the gathered rows only,
and the lm_head GEMV reads the 16-bit weight (omni_edge.ops.gemv). `quantize_lm_head` (or a bundle written with
`omni-edge quantize --lm-head q8|q4`) replaces the lm_head by an int8 or 4-bit copy; a tied embedding stays
dense for the lookup. LM_HEAD_FORMATS names the choices.

Decode on CUDA (T == 1) runs `omni_edge.device_step.DeviceStep`: positions and lengths in device buffers,
workspaces made with the cache, no host synchronisation, and the whole step captured once as a CUDA graph and
replayed per token (OMNI_EDGE_CUDA_GRAPH=0 runs it eagerly). `decode_step(ids, start=)` returns the hidden
states and the logits of one position in one call (on CUDA, one graph holding layers + final norm + lm_head);
`decode_path()` says in one line which decode path runs and, where there is no graph, why.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from omni_edge.checkpoint import (Checkpoint, GptqParams, Linear as LinearSpec, decoder_layer_specs,
                                  layer_prefix, qweight_from_tensors)
from omni_edge.config import BackboneConfig
from omni_edge import knobs
from omni_edge.ops import _dispatch, attention, gemv, q4

QUANT_MODES = ("none", "rtn4")
# lm_head formats (`quantize_lm_head`, `omni-edge quantize --lm-head`, chat's `--lm-head`): the dense dtypes, q8
# (int8, one fp16 scale per row and block of LM_HEAD_Q8_BLOCK inputs) and q4 (RTN 4-bit, asymmetric, group
# LM_HEAD_Q4_GROUP, the tiled q4 layout). See quantize/FORMAT.md §4 and benchmarks/bench_lm_head.py.
LM_HEAD_FORMATS = ("fp32", "fp16", "bf16", "q8", "q4")
LM_HEAD_Q8_BLOCK = 32
LM_HEAD_Q4_GROUP = 32
LM_HEAD_Q4_SYM = False
_HEAD_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

RTN_GROUP_SIZES = (128, 64, 32)  # fallback candidates when K is not a multiple of the group size asked for
# `--quant rtn4`'s grid: asymmetric (min/max with a zero point, as llama.cpp's Q4_1) in groups of 32 rows. On
# SmolLM2-135M the symmetric group-64 grid it replaced lost the capital of Japan; see README "rtn4 grid".
RTN_GROUP_SIZE = 32
RTN_SYM = False

# Linears of one decoder layer, names relative to `model.layers.N.`; each group shares its input
# (the GPTQ toolchain collects one Hessian per group).
LINEAR_GROUPS_PACKED: Tuple[Tuple[str, ...], ...] = (
    ("self_attn.W_pack",), ("self_attn.o_proj",), ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))
LINEAR_GROUPS_SPLIT: Tuple[Tuple[str, ...], ...] = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))


def linear_groups(cfg: BackboneConfig) -> Tuple[Tuple[str, ...], ...]:
    return LINEAR_GROUPS_PACKED if cfg.packed_qkv else LINEAR_GROUPS_SPLIT


def linear_names(cfg: BackboneConfig) -> List[str]:
    return [n for g in linear_groups(cfg) for n in g]


# ------------------------------------------------------------------------------------------------
# Building blocks
# ------------------------------------------------------------------------------------------------

class Linear:
    """y = x W^T + b with W dense (out, in), a 4-bit QWeight (which holds its own bias) or, for the lm_head, an
    int8 `omni_edge.ops.gemv.Q8Weight`. A dense W whose dtype differs from x's (a 16-bit lm_head under fp32
    activations) is read as stored: the result is fp32."""

    __slots__ = ("weight", "bias", "qweight", "q8")

    def __init__(self, weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
                 qweight: Optional[q4.QWeight] = None, q8: Optional[gemv.Q8Weight] = None):
        if (weight is not None) + (qweight is not None) + (q8 is not None) != 1:
            raise ValueError("Linear: give exactly one of weight (dense), qweight (4-bit) or q8 (int8)")
        self.weight = weight  # (out, in) dense, or None
        self.bias = bias if weight is not None else None  # (out,) dense bias, or None
        self.qweight = qweight
        self.q8 = q8

    @property
    def out_features(self) -> int:
        w = self.qweight if self.qweight is not None else self.q8
        return w.out_features if w is not None else self.weight.shape[0]

    @property
    def in_features(self) -> int:
        w = self.qweight if self.qweight is not None else self.q8
        return w.in_features if w is not None else self.weight.shape[1]

    @property
    def format(self) -> str:
        """'q4', 'q8', or the dense dtype as 'fp32' / 'fp16' / 'bf16'."""
        if self.qweight is not None:
            return "q4"
        if self.q8 is not None:
            return "q8"
        return {v: k for k, v in _HEAD_DTYPES.items()}.get(self.weight.dtype, str(self.weight.dtype))

    @property
    def nbytes(self) -> int:
        """Bytes of the weight read per matmul (codes, scales and zeros for the quantized forms)."""
        if self.qweight is not None:
            return self.qweight.nbytes
        if self.q8 is not None:
            return self.q8.nbytes
        return self.weight.numel() * self.weight.element_size()

    @property
    def quantized(self) -> bool:
        return self.qweight is not None

    def dense_weight(self) -> torch.Tensor:
        """(out, in) weight, dequantized to fp32 for 4-bit and int8 layers."""
        if self.q8 is not None:
            return self.q8.dequantize()
        return self.qweight.dequantize().t() if self.qweight is not None else self.weight

    def dense_bias(self) -> Optional[torch.Tensor]:
        if self.q8 is not None:
            return self.q8.bias
        return self.qweight.bias if self.qweight is not None else self.bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.qweight is not None:
            return q4.matmul(x, self.qweight)
        if self.q8 is not None:
            return gemv.q8_matmul(x, self.q8)
        if self.weight.dtype != x.dtype:
            return gemv.matmul(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


def rtn_group_size(in_features: int, group_size: int = 128) -> int:
    """The group size used for a layer with K = in_features inputs when `group_size` was asked for: itself if
    it divides K, else the largest of 128 / 64 / 32 below it that does (the same rule for `omni-edge quantize`
    and `--quant rtn4`); K itself (one group per output channel) when none does, or for group_size -1."""
    if group_size == -1:
        return in_features
    for g in sorted({group_size, *RTN_GROUP_SIZES}, reverse=True):
        if g <= group_size and in_features % g == 0:
            return g
    return in_features


def model_group_size(in_features: Sequence[int], group_size: int) -> int:
    """One group size for every decoder linear of a model (GPTQ checkpoints record one): `group_size` if it
    divides every K in `in_features`, else the largest of 128 / 64 / 32 below it that does, else -1
    (per-channel). Used by `omni-edge quantize` and `--quant rtn4` alike."""
    if group_size == -1:
        return -1
    for g in sorted({group_size, *RTN_GROUP_SIZES}, reverse=True):
        if g <= group_size and all(k % g == 0 for k in in_features):
            return g
    return -1


def decoder_in_features(cfg: BackboneConfig) -> List[int]:
    """K of every decoder linear: hidden (q/k/v, gate/up), heads x head_dim (o_proj), intermediate (down)."""
    return sorted({cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, cfg.intermediate_size})


def rtn_grid_label(group_sizes, sym: bool) -> str:
    """'asym, group 32' (or 'sym, groups 64/32' when the fallback changed some layers' group size)."""
    gs = sorted(set(group_sizes), reverse=True)
    word = "group" if len(gs) == 1 else "groups"
    return f"{'sym' if sym else 'asym'}, {word} {'/'.join(str(g) for g in gs)}"


def rtn_grid_of(layers) -> str:
    """The grid label of the 4-bit linears in these DecoderLayers ('' when none is 4-bit)."""
    qws = [lin.qweight for layer in layers for lin in layer.linears.values() if lin.quantized]
    if not qws:
        return ""
    return rtn_grid_label([w.group_size for w in qws], all(w.sym for w in qws))


def quantize_linear_rtn(lin: Linear, group_size: int = RTN_GROUP_SIZE, sym: bool = RTN_SYM) -> Linear:
    """Round-to-nearest 4-bit of a dense Linear on `omni_edge.ops.q4.grid_params`'s grid, group `group_size`
    (or the fallback of `rtn_group_size`); an already 4-bit Linear is returned unchanged."""
    if lin.quantized:
        return lin
    g = rtn_group_size(lin.in_features, group_size)
    return Linear(qweight=q4.qweight_rtn(lin.weight, g, sym=sym, bias=lin.bias))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen2 RMSNorm: normalise in fp32, cast back, then scale."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rope_tables(theta: float, head_dim: int, length: int, device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (length, head_dim) fp32 for positions 0..length-1 (frequencies duplicated: rotate-half layout)."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    pos = torch.arange(length, dtype=torch.float32, device=device)
    freqs = torch.outer(pos, inv)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, T, H, D), cos/sin (T, D) fp32 -> rotated x in x's dtype (computed in fp32)."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rot = torch.cat((-x2, x1), dim=-1)
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return (xf * c + rot * s).to(x.dtype)


def _check_shape(name: str, t, shape) -> None:
    actual = tuple(t.shape) if isinstance(t, torch.Tensor) else (t.out_features, t.in_features)
    if actual != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {actual}")


# ------------------------------------------------------------------------------------------------
# Decoder layer
# ------------------------------------------------------------------------------------------------

class DecoderLayer:
    """One pre-norm decoder layer. `linears` maps names relative to `model.layers.N.` (see linear_groups) to
    Linear; norms are (hidden,) weights."""

    def __init__(self, cfg: BackboneConfig, index: int, linears: Dict[str, Linear],
                 input_layernorm: torch.Tensor, post_attention_layernorm: torch.Tensor):
        self.cfg = cfg
        self.index = index
        missing = [n for n in linear_names(cfg) if n not in linears]
        if missing:
            raise ValueError(f"DecoderLayer {index}: missing linear(s) {', '.join(missing)}")
        self.linears = dict(linears)
        self.input_layernorm = input_layernorm  # (C,) model.layers.N.input_layernorm.weight
        self.post_attention_layernorm = post_attention_layernorm  # (C,) model.layers.N.post_attention_layernorm
        self._bind()

    def _bind(self) -> None:
        # bumped whenever the linears are (re)bound: a Backbone's native decode plan holds their addresses and is
        # rebuilt when the versions of its layers change (Backbone._layers_version)
        self.version = getattr(self, "version", 0) + 1
        lin = self.linears
        self._packed = self.cfg.packed_qkv
        self._wpack = lin.get("self_attn.W_pack")  # (H*D + 2*Hkv*D, C): rows [q | k | v]
        self._q, self._k, self._v = lin.get("self_attn.q_proj"), lin.get("self_attn.k_proj"), lin.get("self_attn.v_proj")
        self._o = lin["self_attn.o_proj"]  # (C, H*D)
        self._gate, self._up, self._down = lin["mlp.gate_proj"], lin["mlp.up_proj"], lin["mlp.down_proj"]
        self._split = [self.cfg.q_size, self.cfg.kv_size, self.cfg.kv_size]

    @property
    def linear_groups(self) -> Tuple[Tuple[str, ...], ...]:
        return linear_groups(self.cfg)

    def linear(self, name: str) -> Linear:
        if name not in self.linears:
            raise ValueError(f"linear: expected one of {list(self.linears)}, got {name!r}")
        return self.linears[name]

    def replace_linear(self, name: str, new) -> None:
        """Swap one linear for a QWeight, a dense (out, in) weight tensor, or a Linear (same shape)."""
        old = self.linear(name)
        if isinstance(new, q4.QWeight):
            new = Linear(qweight=new)
        elif isinstance(new, torch.Tensor):
            new = Linear(weight=new, bias=old.dense_bias())
        elif not isinstance(new, Linear):
            raise ValueError(f"replace_linear: expected QWeight, Tensor or Linear, got {type(new).__name__}")
        if (new.out_features, new.in_features) != (old.out_features, old.in_features):
            raise ValueError(f"replace_linear {name}: expected shape ({old.out_features}, {old.in_features}), "
                             f"got ({new.out_features}, {new.in_features})")
        self.linears[name] = new
        self._bind()

    def quantize_rtn(self, group_size: int = RTN_GROUP_SIZE) -> None:
        for name in linear_names(self.cfg):
            self.linears[name] = quantize_linear_rtn(self.linears[name], group_size)
        self._bind()

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def from_tensors(cls, cfg: BackboneConfig, layer_index: int, tensors: Dict[str, object], *,
                     device=None, dtype: Optional[torch.dtype] = None, quant: str = "none", group_size: int = RTN_GROUP_SIZE,
                     gptq: Optional[GptqParams] = None) -> "DecoderLayer":
        """Build layer `layer_index` from its tensors, keyed by full (`model.layers.N.*`) or relative names.
        GPTQ-layout linears (`.qweight/.qzeros/.scales/.g_idx`) need `gptq`; values may also be QWeights."""
        prefix = layer_prefix(layer_index)
        rel = {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in tensors.items()}

        def get(name):
            if name not in rel:
                raise ValueError(f"{prefix}{name}: missing from the layer's tensors")
            t = rel[name]
            return t.to(device=device, dtype=dtype if t.is_floating_point() else None)

        def linear(spec: LinearSpec):
            p = spec.prefix
            if isinstance(rel.get(p), q4.QWeight):
                return Linear(qweight=rel[p])
            if p + ".qweight" in rel:
                if gptq is None:
                    raise ValueError(f"{prefix}{p}: GPTQ tensors given without GptqParams")
                parts = {k: rel[p + "." + k].to(device=device) for k in ("qweight", "qzeros", "scales", "g_idx", "bias")
                         if p + "." + k in rel}
                return Linear(qweight=qweight_from_tensors(parts, gptq, prefix=prefix + p, bias_dtype=dtype))
            return Linear(weight=get(p + ".weight"), bias=get(p + ".bias") if spec.bias else None)

        return cls._build(cfg, layer_index, get, linear, quant, group_size)

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint, layer_index: int, *, device=None, dtype=None, quant: str = "none",
                        group_size: int = RTN_GROUP_SIZE) -> "DecoderLayer":
        """Load layer `layer_index`, one tensor at a time (rtn4: each weight is quantized as soon as it is read)."""
        prefix = layer_prefix(layer_index)
        ckpt.layer_names(layer_index)  # clear error for a missing tensor

        def get(name):
            return ckpt.get(prefix + name, dtype=dtype, device=device)

        def linear(spec: LinearSpec):
            p = prefix + spec.prefix
            if ckpt.is_quantized(p):
                return Linear(qweight=ckpt.linear(p, dtype=dtype, device=device))
            bias = ckpt.get(p + ".bias", dtype=dtype, device=device) if spec.bias else None
            if quant == "rtn4":  # quantize from the stored precision, then drop the dense weight
                return quantize_linear_rtn(Linear(weight=ckpt.get(p + ".weight", device=device), bias=bias),
                                           group_size)
            return Linear(weight=ckpt.get(p + ".weight", dtype=dtype, device=device), bias=bias)

        return cls._build(ckpt.config.backbone, layer_index, get, linear, quant, group_size)

    @classmethod
    def _build(cls, cfg, index, get, linear, quant, group_size):
        if quant not in QUANT_MODES:
            raise ValueError(f"quant: expected one of {QUANT_MODES}, got {quant!r}")
        prefix = layer_prefix(index)
        linears: Dict[str, Linear] = {}
        norms: Dict[str, torch.Tensor] = {}
        for spec in decoder_layer_specs(cfg):
            if isinstance(spec, LinearSpec):
                lin = linear(spec)
                _check_shape(prefix + spec.prefix + ("" if lin.quantized else ".weight"), lin,
                             (spec.out_features, spec.in_features))
                if lin.bias is not None:
                    _check_shape(prefix + spec.prefix + ".bias", lin.bias, (spec.out_features,))
                linears[spec.prefix] = lin
            else:
                t = get(spec.name)
                _check_shape(prefix + spec.name, t, spec.shape)
                norms[spec.name] = t
        layer = cls(cfg, index, linears, norms["input_layernorm.weight"], norms["post_attention_layernorm.weight"])
        if quant == "rtn4":
            layer.quantize_rtn(group_size)
        return layer

    # ---- compute ------------------------------------------------------------------------------

    def _qkv(self, x: torch.Tensor):
        b, t, _ = x.shape
        if self._packed:
            q, k, v = self._wpack(x).split(self._split, dim=-1)
        else:
            q, k, v = self._q(x), self._k(x), self._v(x)
        cfg = self.cfg
        return (q.reshape(b, t, cfg.num_attention_heads, cfg.head_dim),
                k.reshape(b, t, cfg.num_key_value_heads, cfg.head_dim),
                v.reshape(b, t, cfg.num_key_value_heads, cfg.head_dim))

    def _mlp(self, h: torch.Tensor) -> torch.Tensor:
        x = rms_norm(h, self.post_attention_layernorm, self.cfg.rms_norm_eps)
        return h + self._down(F.silu(self._gate(x)) * self._up(x))

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, start: int, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        """h (B, T, C); cos/sin (T, D) for positions start..start+T-1; k_cache/v_cache (B, Hkv, S, D).
        T == 1 with `lengths` (B,) int32 == start + 1 uses the decode kernel, else causal prefill."""
        b, t, _ = h.shape
        x = rms_norm(h, self.input_layernorm, self.cfg.rms_norm_eps)
        q, k, v = self._qkv(x)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        attention.write_kv(k_cache, v_cache, k, v, start)
        if t == 1 and lengths is not None:
            o = attention.decode(q[:, 0], k_cache, v_cache, lengths)
        else:
            o = attention.prefill(q, k_cache, v_cache, start=start)
        h = h + self._o(o.reshape(b, t, self.cfg.q_size))
        return self._mlp(h)

    def forward_nocache(self, h: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Full causal attention over h (B, T, C) alone (positions start..start+T-1), no session cache: a
        scratch K/V of exactly T positions is used. For calibration (GPTQ) and tests."""
        b, t, _ = h.shape
        cfg = self.cfg
        cos, sin = rope_tables(cfg.rope_theta, cfg.head_dim, start + t, device=h.device)
        x = rms_norm(h, self.input_layernorm, cfg.rms_norm_eps)
        q, k, v = self._qkv(x)
        q, k = apply_rope(q, cos[start:], sin[start:]), apply_rope(k, cos[start:], sin[start:])
        kc = k.transpose(1, 2).contiguous()  # (B, Hkv, T, D)
        vc = v.transpose(1, 2).contiguous()
        o = attention.prefill(q, kc, vc, start=0)
        h = h + self._o(o.reshape(b, t, cfg.q_size))
        return self._mlp(h)

    __call__ = forward_nocache


# ------------------------------------------------------------------------------------------------
# The backbone
# ------------------------------------------------------------------------------------------------

def _head_dtype(stored: str, device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype the embedding / a dense lm_head is kept in: the stored 16-bit dtype on the CPU under fp32
    activations (read as stored, never copied to fp32), else the activation dtype."""
    keep = {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(stored)
    return keep if keep is not None and device.type == "cpu" and dtype == torch.float32 else dtype


class Backbone:
    def __init__(self, cfg: BackboneConfig, embed_tokens: torch.Tensor, layers: Sequence[DecoderLayer],
                 norm: torch.Tensor, lm_head: Linear, *, dtype: Optional[torch.dtype] = None):
        self.config = cfg
        self.embed_tokens = embed_tokens  # (V, C) model.embed_tokens.weight, activation dtype or stored 16-bit
        self.layers = list(layers)  # model.layers.N
        self.norm = norm  # (C,) model.norm.weight
        self.lm_head = lm_head  # (V, C) lm_head.weight (the embedding matrix when tied), or its q8 / q4 copy
        self.device = embed_tokens.device
        self.dtype = dtype if dtype is not None else norm.dtype  # activations
        self._k: Optional[torch.Tensor] = None  # (L, B, Hkv, S, D)
        self._v: Optional[torch.Tensor] = None
        self._cos: Optional[torch.Tensor] = None  # (S, D) fp32
        self._sin: Optional[torch.Tensor] = None
        self._lengths: Optional[torch.Tensor] = None  # (B,) int32, reused by every decode step
        self._plan = None  # _C.DecodePlan for the current cache, layers and lm_head, or None
        self._plan_head = False  # the plan computes logits
        self._plan_epoch = None  # _layers_version() the plan was built at
        self._layout_reason: Optional[str] = None  # native_decode_supported's per-tensor verdict ...
        self._layout_epoch = None  # ... at this _layers_version()
        self._dstep = None  # omni_edge.device_step.DeviceStep (CUDA decode), built on first use per cache

    # ---- construction -------------------------------------------------------------------------

    @staticmethod
    def _check_args(device, dtype, quant):
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"dtype: expected torch.float32, float16 or bfloat16, got {dtype}")
        if quant not in QUANT_MODES:
            raise ValueError(f"quant: expected one of {QUANT_MODES}, got {quant!r}")
        return torch.device(device)

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint, *, device="cpu", dtype: torch.dtype = torch.float32,
                        quant: str = "none", group_size: int = RTN_GROUP_SIZE,
                        lm_head: Optional[str] = None) -> "Backbone":
        """Load the backbone stage (+ lm_head) of a checkpoint, one tensor at a time.

        quant "rtn4": every decoder linear is rounded to 4 bits at load (asymmetric, group `group_size`, default
        32, or the fallback of `rtn_group_size`); embeddings, norms and lm_head stay dense. GPTQ-stored linears load
        as QWeights whatever `quant` says. On the CPU with fp32 activations a 16-bit embedding / lm_head stays
        16-bit. A q8 / q4 lm_head stored in the checkpoint loads as such; `lm_head` (one of LM_HEAD_FORMATS)
        converts the lm_head at load (see quantize_lm_head)."""
        device = cls._check_args(device, dtype, quant)
        if lm_head is not None and lm_head not in LM_HEAD_FORMATS:
            raise ValueError(f"lm_head: expected one of {LM_HEAD_FORMATS}, got {lm_head!r}")
        ckpt.require("backbone")
        ckpt.require("lm_head")
        cfg = ckpt.config.backbone
        if quant == "rtn4":  # one group size for the whole model, as `omni-edge quantize` picks it
            group_size = model_group_size(decoder_in_features(cfg), group_size)
        name = "model.embed_tokens.weight"
        embed = ckpt.get(name, dtype=_head_dtype(ckpt.dtype(name), device, dtype), device=device)
        layers = [DecoderLayer.from_checkpoint(ckpt, i, device=device, dtype=dtype, quant=quant,
                                               group_size=group_size) for i in range(cfg.num_hidden_layers)]
        norm = ckpt.get("model.norm.weight", dtype=dtype, device=device)
        stored = ckpt.lm_head_format()
        if stored == "q4":
            head = Linear(qweight=ckpt.linear("lm_head", dtype=dtype, device=device))
        elif stored == "q8":
            head = Linear(q8=ckpt.q8_linear("lm_head", device=device))
        elif cfg.tie_word_embeddings:
            head = Linear(weight=embed)
        else:
            head = Linear(weight=ckpt.get("lm_head.weight", device=device,
                                          dtype=_head_dtype(ckpt.dtype("lm_head.weight"), device, dtype)))
        bb = cls(cfg, embed, layers, norm, head, dtype=dtype)
        if lm_head is not None:
            bb.quantize_lm_head(lm_head)
        return bb

    @classmethod
    def from_tensors(cls, cfg: BackboneConfig, tensors: Dict[str, torch.Tensor], *, device="cpu",
                     dtype: torch.dtype = torch.float32, quant: str = "none", group_size: int = RTN_GROUP_SIZE,
                     gptq: Optional[GptqParams] = None) -> "Backbone":
        """Build from a dict of checkpoint-named tensors (tests, tools)."""
        device = cls._check_args(device, dtype, quant)
        c = cfg.hidden_size
        if quant == "rtn4":
            group_size = model_group_size(decoder_in_features(cfg), group_size)

        def get(name, shape):
            if name not in tensors:
                raise ValueError(f"{name}: missing from the tensors")
            _check_shape(name, tensors[name], shape)
            return tensors[name].to(device=device, dtype=dtype)

        embed = get("model.embed_tokens.weight", (cfg.vocab_size, c))
        layers = []
        for i in range(cfg.num_hidden_layers):
            p = layer_prefix(i)
            layers.append(DecoderLayer.from_tensors(cfg, i, {k: v for k, v in tensors.items() if k.startswith(p)},
                                                    device=device, dtype=dtype, quant=quant,
                                                    group_size=group_size, gptq=gptq))
        norm = get("model.norm.weight", (c,))
        lm_head = Linear(weight=embed if cfg.tie_word_embeddings else get("lm_head.weight", (cfg.vocab_size, c)))
        return cls(cfg, embed, layers, norm, lm_head, dtype=dtype)

    # ---- lm_head ------------------------------------------------------------------------------

    def quantize_lm_head(self, fmt: str, *, q8_block: int = LM_HEAD_Q8_BLOCK,
                         q4_group: int = LM_HEAD_Q4_GROUP, q4_sym: bool = LM_HEAD_Q4_SYM) -> None:
        """Replace the lm_head by a copy in `fmt` (LM_HEAD_FORMATS), made from its current weight (dequantized
        first if it is already q8 / q4): a dense dtype, q8 (round-to-nearest int8 per row and block of
        `q8_block` inputs, -1 = per row) or q4 (round-to-nearest 4-bit, group `q4_group` or the fallback of
        rtn_group_size). A tied embedding is not touched (the lookup stays dense)."""
        if fmt not in LM_HEAD_FORMATS:
            raise ValueError(f"lm_head format: expected one of {LM_HEAD_FORMATS}, got {fmt!r}")
        w = self.lm_head.dense_weight()  # (V, C)
        bias = self.lm_head.dense_bias()
        if fmt == "q8":
            head = Linear(q8=gemv.quantize_q8(w, q8_block, bias=bias))
        elif fmt == "q4":
            if w.shape[0] % 8:
                raise ValueError(f"lm_head format q4: the 4-bit layout needs a vocabulary that is a multiple of 8 "
                                 f"rows, got {w.shape[0]}; use q8")
            g = rtn_group_size(w.shape[1], q4_group)
            head = Linear(qweight=q4.qweight_rtn(w, g, sym=q4_sym, bias=None if bias is None else bias.float()))
        else:
            dt = _HEAD_DTYPES[fmt]
            head = Linear(weight=w if w.dtype == dt else w.to(dt).contiguous(), bias=bias)
        self.set_lm_head(head)

    def set_lm_head(self, head: "Linear") -> None:
        """Use `head` (a Linear of (vocab, hidden)) as the lm_head from the next step on (the native plan and
        the CUDA step are rebuilt around it)."""
        if (head.out_features, head.in_features) != (self.config.vocab_size, self.config.hidden_size):
            raise ValueError(f"lm_head: expected ({self.config.vocab_size}, {self.config.hidden_size}), "
                             f"got ({head.out_features}, {head.in_features})")
        self.lm_head = head
        self._plan = None  # rebuilt with the new lm_head at the next step
        self._drop_device_step()

    # ---- cache --------------------------------------------------------------------------------

    def allocate_cache(self, max_len: int, batch: int = 1) -> None:
        """Allocate the KV cache (L, B, Hkv, max_len, D) in the model dtype and the RoPE tables for max_len
        positions. Call once per session (again to resize)."""
        if not isinstance(max_len, int) or max_len <= 0:
            raise ValueError(f"max_len: expected a positive integer, got {max_len!r}")
        if not isinstance(batch, int) or batch <= 0:
            raise ValueError(f"batch: expected a positive integer, got {batch!r}")
        cfg = self.config
        self._drop_device_step()
        self._k = self._v = self._plan = None  # free the old cache first (the plan holds it too)
        shape = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self._k = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self._v = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self._cos, self._sin = rope_tables(cfg.rope_theta, cfg.head_dim, max_len, device=self.device)
        self._lengths = torch.zeros(batch, dtype=torch.int32, device=self.device)
        self._plan = None
        self._plan_epoch = self._layout_epoch = None
        if self.native_decode_supported() is None:
            self._decode_plan()

    def free_cache(self) -> None:
        self._drop_device_step()
        self._k = self._v = self._cos = self._sin = self._lengths = None
        self._plan = None
        self._plan_epoch = self._layout_epoch = None

    # ---- native decode step -------------------------------------------------------------------

    def native_decode_supported(self) -> Optional[str]:
        """None when the native CPU decode step (csrc/decode) can serve this backbone and cache, else the
        reason it cannot (the Python layer loop is used then). The per-tensor part is cached per set of
        layers: change linears through DecoderLayer.replace_linear / quantize_rtn (which rebuild the plan),
        not by editing `layer.linears` in place."""
        if self.device.type != "cpu":
            return f"device {self.device} (the native decode step runs on cpu)"
        if self.dtype != torch.float32:
            return f"dtype {self.dtype} (the native decode step takes float32 activations)"
        if self._k is None or self.batch != 1:
            return f"cache batch {self.batch} (the native decode step serves batch 1)"
        if not knobs.settings().native_decode:
            return "OMNI_EDGE_NATIVE_DECODE=0"
        if not (_dispatch.native_enabled("q4", self.device) and _dispatch.native_enabled("attention", self.device)):
            return "native kernels disabled (OMNI_EDGE_NATIVE=0 or not built)"
        version = self._layers_version()
        if self._layout_epoch != version:  # the per-tensor checks, once per set of layers
            self._layout_reason = self._native_layout_reason()
            self._layout_epoch = version
        return self._layout_reason

    def _layers_version(self) -> tuple:
        """Identifies the current layers and their bound linears (a plan is valid for one value)."""
        return tuple((id(layer), layer.version) for layer in self.layers)

    def _native_layout_reason(self) -> Optional[str]:
        if self.config.head_dim > attention.MAX_NATIVE_HEAD_DIM or self.config.head_dim % 2:
            return f"head_dim {self.config.head_dim}"
        dense_ok = lambda t: t is None or (t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous())
        if not all(dense_ok(t) for t in (self.norm, self._cos, self._sin)):
            return "final norm / rope tables not contiguous fp32"
        for layer in self.layers:
            if not (dense_ok(layer.input_layernorm) and dense_ok(layer.post_attention_layernorm)):
                return f"layer {layer.index}: norm weights not contiguous fp32"
            for name in linear_names(self.config):
                lin = layer.linears[name]
                if lin.quantized:
                    if lin.qweight.device.type != "cpu":
                        return f"layer {layer.index} {name}: 4-bit weight on {lin.qweight.device}"
                elif not (dense_ok(lin.weight) and dense_ok(lin.bias)):
                    return f"layer {layer.index} {name}: dense weight not contiguous fp32"
        return None

    def _decode_plan(self):
        """The native plan for the current cache and layers (built once, rebuilt after a linear changes)."""
        version = self._layers_version()
        if self._plan is not None and self._plan_epoch == version:
            return self._plan
        from omni_edge import _native
        cfg = self.config
        keep: list = [self._k, self._v, self._cos, self._sin, self.norm]  # tensors the plan points into

        def linear(lin: Linear):
            if lin.quantized:
                keep.append(lin.qweight)  # holds codes, scales, zeros, perm, block_group and the fp32 bias
                return (2, lin.qweight._handle)
            keep.extend((lin.weight, lin.bias))
            return (1, lin.weight.data_ptr(), 0 if lin.bias is None else lin.bias.data_ptr(),
                    lin.weight.shape[0], lin.weight.shape[1])

        layers = []
        for i, layer in enumerate(self.layers):
            keep.extend((layer.input_layernorm, layer.post_attention_layernorm))
            layers.append((layer.input_layernorm.data_ptr(), layer.post_attention_layernorm.data_ptr(),
                           [linear(layer.linears[n]) for n in linear_names(cfg)],
                           self._k[i].data_ptr(), self._v[i].data_ptr()))
        head = self._lm_head_tuple(keep)
        self._plan = _native.lib().DecodePlan(
            cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
            cfg.intermediate_size, self.max_len, float(cfg.rms_norm_eps), bool(cfg.packed_qkv),
            self._cos.data_ptr(), self._sin.data_ptr(), self.norm.data_ptr(), layers, keep, head)
        self._plan_head = head is not None
        self._plan_epoch = version
        return self._plan

    def _lm_head_tuple(self, keep: list):
        """The lm_head as a plan linear (csrc/bindings.cpp), or None when the native step cannot run it (a
        non-contiguous or non-CPU weight, a bias in another dtype); decode_step then runs it in torch."""
        lin = self.lm_head
        if lin.qweight is not None:
            if lin.qweight.device.type != "cpu":
                return None
            keep.append(lin.qweight)
            return (2, lin.qweight._handle)
        if lin.q8 is not None:
            w = lin.q8
            if w.device.type != "cpu":
                return None
            keep.append(w)
            return (3, w.codes.data_ptr(), w.scales.data_ptr(), 0 if w.bias is None else w.bias.data_ptr(),
                    w.out_features, w.in_features, w.block)
        w, b = lin.weight, lin.bias
        if (w.device.type != "cpu" or not w.is_contiguous() or w.dtype not in _HEAD_DTYPES.values()
                or (b is not None and (b.dtype != torch.float32 or not b.is_contiguous()))):
            return None
        keep.extend((w, b))
        return (1, w.data_ptr(), 0 if b is None else b.data_ptr(), w.shape[0], w.shape[1],
                {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}[w.dtype])

    def decode_step_native(self, h: torch.Tensor, start: int) -> torch.Tensor:
        """One position through every layer natively: h (1, 1, C) fp32 at position `start` -> (1, 1, C) after
        the final norm (K/V written at `start`). Raises ValueError when `start` is outside the cache."""
        reason = self.native_decode_supported()
        if reason is not None:
            raise ValueError(f"decode_step_native: not supported here: {reason}")
        if tuple(h.shape) != (1, 1, self.config.hidden_size) or h.dtype != torch.float32:
            raise ValueError(f"h: expected a float32 tensor of shape (1, 1, {self.config.hidden_size}), "
                             f"got {h.dtype} {tuple(h.shape)}")
        return self._native_step(h, start)

    def _native_step(self, h: torch.Tensor, start: int) -> torch.Tensor:
        h = h.contiguous()
        out = torch.empty_like(h)
        self._decode_plan().step(h.data_ptr(), out.data_ptr(), start,
                                 q4.MODE_EXACT if q4.exact_default() else q4.MODE_INT8)
        return out

    @property
    def max_len(self) -> int:
        """Positions the allocated cache holds (0 before allocate_cache)."""
        return 0 if self._k is None else self._k.shape[3]

    @property
    def batch(self) -> int:
        return 0 if self._k is None else self._k.shape[1]

    @property
    def kv_cache(self) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """(k, v) each (L, B, Hkv, S, D)."""
        return self._k, self._v

    @property
    def rope_tables(self) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """(cos, sin) each (S, D) fp32, rows = positions of the allocated cache."""
        return self._cos, self._sin

    # ---- decode on CUDA (omni_edge/device_step.py) ----------------------------------------------

    def _device_step(self):
        """The DeviceStep for the current cache and weights (rebuilt, dropping its graphs, when they change)."""
        from omni_edge.device_step import DeviceStep
        if self._dstep is None or self._dstep.key != DeviceStep.key_of(self):
            self._drop_device_step()
            self._dstep = DeviceStep(self)
        return self._dstep

    def _drop_device_step(self) -> None:
        if getattr(self, "_dstep", None) is not None:
            self._dstep.reset()
        self._dstep = None

    def decode_step(self, input_ids: Optional[torch.Tensor] = None, *,
                    inputs_embeds: Optional[torch.Tensor] = None, start: int):
        """One new position per sequence: input_ids (B, 1) or inputs_embeds (B, 1, C) at `start` -> (hidden
        (B, 1, C) after the final norm, logits (B, V) fp32), K/V written at `start`. The same numbers as
        `forward` then `logits(hidden[:, -1])`. On CUDA it is one replay of a graph holding the layers, the
        final norm and the lm_head (no host synchronisation, nothing allocated); the returned tensors are then
        the graph's output buffers, overwritten by the next step: copy what you keep."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("decode_step: give exactly one of input_ids or inputs_embeds")
        if self._k is None:
            raise ValueError("decode_step: no KV cache; call allocate_cache(max_len, batch) first")
        x = input_ids if input_ids is not None else inputs_embeds
        want = (self.batch, 1) if input_ids is not None else (self.batch, 1, self.config.hidden_size)
        if not isinstance(x, torch.Tensor) or tuple(x.shape) != want:
            name = "input_ids" if input_ids is not None else "inputs_embeds"
            raise ValueError(f"{name}: expected shape {want} (one position per sequence of the cache's batch), "
                             f"got {tuple(getattr(x, 'shape', ()))}")
        if self.device.type == "cuda":
            if input_ids is not None and input_ids.device.type not in ("cpu", self.device.type):
                raise ValueError(f"input_ids: expected a tensor on cpu or {self.device}, got {input_ids.device}")
            if inputs_embeds is not None:
                inputs_embeds = inputs_embeds.to(device=self.device, dtype=self.dtype)
            return self._device_step().run(start, ids=input_ids, embeds=inputs_embeds, logits=True)
        if input_ids is not None and self._native_head_ready(start):
            # the CPU native step with the lm_head in its plan: one call, no torch op on the lm_head
            h = self.embed(input_ids).contiguous()
            out = torch.empty_like(h)
            logits = torch.empty(1, self.lm_head.out_features, dtype=torch.float32)
            self._decode_plan().step_logits(h.data_ptr(), out.data_ptr(), logits.data_ptr(), start,
                                            q4.MODE_EXACT if q4.exact_default() else q4.MODE_INT8)
            return out, logits
        h = self.forward(input_ids, inputs_embeds=inputs_embeds, start=start)
        return h, self.logits(h[:, -1])

    def _native_head_ready(self, start) -> bool:
        """True when a CPU decode step at `start` can run layers + lm_head in one native call."""
        if not (isinstance(start, int) and 0 <= start < self.max_len and not self.embed_tokens.requires_grad
                and self.native_decode_supported() is None):
            return False
        self._decode_plan()
        return bool(self._plan_head)

    def decode_path(self) -> str:
        """One line: how a one-position step runs on this backbone and cache (for describe() and stats)."""
        if self._k is None:
            return "no KV cache allocated"
        if self.device.type == "cuda":
            return self._device_step().describe()
        reason = self.native_decode_supported()
        return "native cpu step (csrc/decode)" if reason is None else f"python layer loop ({reason})"

    # ---- compute ------------------------------------------------------------------------------

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids -> (B, T, C) embeddings in the activation dtype (a 16-bit table converts only the
        gathered rows)."""
        return F.embedding(input_ids, self.embed_tokens).to(self.dtype)

    def forward(self, input_ids: Optional[torch.Tensor] = None, *, inputs_embeds: Optional[torch.Tensor] = None,
                start: int) -> torch.Tensor:
        """Run positions start..start+T-1 (writing their K/V) and return hidden states (B, T, C) after the
        final norm. Give input_ids (B, T) or inputs_embeds (B, T, C)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("forward: give exactly one of input_ids or inputs_embeds")
        if self._k is None:
            raise ValueError("forward: no KV cache; call allocate_cache(max_len, batch) first")
        if input_ids is not None:
            if input_ids.dim() != 2:
                raise ValueError(f"input_ids: expected shape (B, T), got {tuple(input_ids.shape)}")
            h = self.embed(input_ids)
        else:
            if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.config.hidden_size:
                raise ValueError(f"inputs_embeds: expected shape (B, T, {self.config.hidden_size}), "
                                 f"got {tuple(inputs_embeds.shape)}")
            h = inputs_embeds.to(self.dtype)
        b, t = h.shape[:2]
        if b != self.batch:
            raise ValueError(f"batch: the cache was allocated for batch {self.batch}, got {b}")
        if t == 0:
            raise ValueError("forward: need at least one position (T >= 1)")
        if not isinstance(start, int) or start < 0 or start + t > self.max_len:
            raise ValueError(f"start: positions {start}..{start + t - 1} exceed the allocated cache "
                             f"(max_len={self.max_len}); allocate a longer cache")
        if t == 1 and b == 1 and not h.requires_grad and self.native_decode_supported() is None:
            return self._native_step(h, start)
        if t == 1 and self.device.type == "cuda" and not h.requires_grad:
            step = self._device_step()
            hidden, _ = step.run(start, embeds=h, logits=False)
            return hidden.clone() if step.last_static else hidden
        cos, sin = self._cos[start:start + t], self._sin[start:start + t]
        lengths = None
        if t == 1:
            self._lengths.fill_(start + 1)
            lengths = self._lengths
        for i, layer in enumerate(self.layers):
            h = layer.forward(h, cos, sin, self._k[i], self._v[i], start, lengths)
        return rms_norm(h, self.norm, self.config.rms_norm_eps)

    __call__ = forward

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., C) hidden -> (..., vocab) fp32 logits."""
        return self.lm_head(hidden).float()
