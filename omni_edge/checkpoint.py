"""Checkpoint loader: safetensors (single file or sharded), tensor-name tables per stage, GPTQ linears.

A checkpoint is a folder with `config.json` and either `model.safetensors`, a sharded set listed by
`model.safetensors.index.json`, or (edge bundles) several `*.safetensors` files without an index. Pickled
weights (`*.bin`, `*.pt`) are never loaded.

`Checkpoint.open(folder)` reads only the safetensors headers (validated against each file's size by
`omni_edge.safetensors_file`, so a truncated or corrupt file is named), checks the config's layer count against
the tensors present, then every tensor it knows against the config (shape and dtype), so a wrong checkpoint fails
before anything runs, with messages that name the tensor, the expected and the actual value. Float tensors are
checked for NaN / Inf as they are read (small ones always, every one with `finite_check = "all"`). Tensors are then materialised one at a time from memory-mapped files
(`get`, `stage_tensors`, `layer_tensors`), so one stage loads alone and the backbone never needs the whole
checkpoint in memory.

Architecture is data: `stage_specs(config, stage)` returns the tensor table of one stage (docs/MODEL.md §3.3) for a
config, as `Tensor` entries (name, shape) and `Linear` entries (prefix, out, in, bias). A Linear is stored either
dense (`<prefix>.weight` (out, in) [+ `.bias`]) or, when config.json has a GPTQ `quantization_config`, in the
standard GPTQ layout (`<prefix>.qweight` int32 (in/8, out), `.qzeros` int32 (G, out/8), `.scales` (G, out),
`.g_idx` int32 (in,) [+ `.bias`], G = ceil(in / group_size)); each linear may be either.

The lm_head may also be stored quantized (`omni-edge quantize --lm-head q8|q4`, quantize/FORMAT.md §4), its
format recorded in `quantization_config["omni_edge_lm_head"]`: q4 as GPTQ tensors `lm_head.qweight` ... with
that entry's own group size / sym / checkpoint_format, q8 as `lm_head.q8_codes` int8 (V, C) and
`lm_head.q8_scales` fp16 (V, ceil(C / block)). With tied embeddings these are a copy for the lm_head only.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple, Union

from omni_edge.config import BackboneConfig, ModelConfig, load_config, parse_config
from omni_edge.safetensors_file import require_regular, tensor_meta

STAGES = ("backbone", "lm_head", "audio_embed", "audio_head", "visual", "visual_bridge", "audio_encoder",
          "audio_bridge", "rvq", "audio_decoder", "flow_prenet", "flow_estimator")
HF_STAGES = ("backbone", "lm_head")

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")

FLOAT = ("F32", "F16", "BF16")  # safetensors dtype names accepted for float tensors
GPTQ_PARTS = ("qweight", "qzeros", "scales", "g_idx")
Q8_PARTS = ("q8_codes", "q8_scales")  # the q8 lm_head (quantize/FORMAT.md §4)
LM_HEAD_QUANT_KEY = "omni_edge_lm_head"  # quantization_config entry describing a quantized lm_head

_ST_TO_TORCH = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64", "I64": "int64",
                "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


# ------------------------------------------------------------------------------------------------
# Tensor tables (docs/MODEL.md §3.3)
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Tensor:
    """A plain tensor: `name` with `shape`, any float dtype."""
    name: str
    shape: Tuple[int, ...]


@dataclass(frozen=True)
class Linear:
    """A linear layer y = x W^T + b: dense `<prefix>.weight` (out, in) or GPTQ tensors; `<prefix>.bias` (out,)."""
    prefix: str
    out_features: int
    in_features: int
    bias: bool


Spec = Union[Tensor, Linear]


def _ln(p: str, n: int) -> List[Spec]:
    """LayerNorm / GroupNorm: weight and bias."""
    return [Tensor(p + ".weight", (n,)), Tensor(p + ".bias", (n,))]


def _conv(p: str, out: int, inp: int, k: int, bias: bool = True) -> List[Spec]:
    """Conv1d weight (out, in, k); ConvTranspose1d callers pass (in, out) swapped."""
    return [Tensor(p + ".weight", (out, inp, k))] + ([Tensor(p + ".bias", (out,))] if bias else [])


def decoder_layer_specs(b: BackboneConfig) -> List[Spec]:
    """One backbone decoder layer, names relative to `model.layers.N.`."""
    c, i = b.hidden_size, b.intermediate_size
    if b.packed_qkv:  # rows [q H*D | k Hkv*D | v Hkv*D]
        attn = [Linear("self_attn.W_pack", b.qkv_size, c, b.qkv_bias)]
    else:
        attn = [Linear("self_attn.q_proj", b.q_size, c, b.qkv_bias),
                Linear("self_attn.k_proj", b.kv_size, c, b.qkv_bias),
                Linear("self_attn.v_proj", b.kv_size, c, b.qkv_bias)]
    return ([Tensor("input_layernorm.weight", (c,))] + attn
            + [Linear("self_attn.o_proj", c, b.q_size, False),
               Tensor("post_attention_layernorm.weight", (c,)),
               Linear("mlp.gate_proj", i, c, False),
               Linear("mlp.up_proj", i, c, False),
               Linear("mlp.down_proj", c, i, False)])


def _prefixed(prefix: str, specs: List[Spec]) -> List[Spec]:
    out: List[Spec] = []
    for s in specs:
        if isinstance(s, Tensor):
            out.append(Tensor(prefix + s.name, s.shape))
        else:
            out.append(Linear(prefix + s.prefix, s.out_features, s.in_features, s.bias))
    return out


def layer_prefix(i: int) -> str:
    return f"model.layers.{i}."


def _whisper_layer(p: str, d: int, ffn: int, rms: bool = False) -> List[Spec]:
    """OmniWhisperTransformerLayer: k_proj without bias; LayerNorm (or RMSNorm: weight only) pre-norms."""
    norm = (lambda q: [Tensor(q + ".weight", (d,))]) if rms else (lambda q: _ln(q, d))
    return ([Linear(p + "self_attn.q_proj", d, d, True), Linear(p + "self_attn.k_proj", d, d, False),
             Linear(p + "self_attn.v_proj", d, d, True), Linear(p + "self_attn.out_proj", d, d, True)]
            + norm(p + "self_attn_layer_norm")
            + [Linear(p + "fc1", ffn, d, True), Linear(p + "fc2", d, ffn, True)]
            + norm(p + "final_layer_norm"))


def _resnet1d(p: str, dim: int, dim_out: int, tdim: int) -> List[Spec]:
    """CausalResnetBlock1D: time mlp, two (causal conv k3 + LayerNorm) blocks, 1x1 residual conv."""
    return ([Linear(p + "mlp.1", dim_out, tdim, True)]
            + _conv(p + "block1.block.0", dim_out, dim, 3) + _ln(p + "block1.block.2", dim_out)
            + _conv(p + "block2.block.0", dim_out, dim_out, 3) + _ln(p + "block2.block.2", dim_out)
            + _conv(p + "res_conv", dim_out, dim, 1))


def _basic_transformer(p: str, dim: int, inner: int) -> List[Spec]:
    """diffusers-style BasicTransformerBlock: to_q/k/v without bias, to_out.0 with bias, GELU FF (4x)."""
    return (_ln(p + "norm1", dim)
            + [Linear(p + "attn1.to_q", inner, dim, False), Linear(p + "attn1.to_k", inner, dim, False),
               Linear(p + "attn1.to_v", inner, dim, False), Linear(p + "attn1.to_out.0", dim, inner, True)]
            + _ln(p + "norm3", dim)
            + [Linear(p + "ff.net.0.proj", 4 * dim, dim, True), Linear(p + "ff.net.2", dim, 4 * dim, True)])


def stage_specs(cfg: ModelConfig, stage: str) -> List[Spec]:
    """The tensor table of one stage for this config (empty where the stage has no tensors, e.g. a tied lm_head)."""
    if stage not in STAGES:
        raise ValueError(f"stage: expected one of {STAGES}, got {stage!r}")
    b = cfg.backbone
    c = b.hidden_size
    if stage == "backbone":
        specs: List[Spec] = [Tensor("model.embed_tokens.weight", (b.vocab_size, c))]
        for i in range(b.num_hidden_layers):
            specs += _prefixed(layer_prefix(i), decoder_layer_specs(b))
        return specs + [Tensor("model.norm.weight", (c,))]
    if stage == "lm_head":
        return [] if b.tie_word_embeddings else [Linear("lm_head", b.vocab_size, c, False)]
    if cfg.kind != "omni":
        raise ValueError(f"stage {stage!r} exists only in omni checkpoints; this one is {cfg.kind!r} "
                         f"(stages: {HF_STAGES})")
    a, v, fm = cfg.audio, cfg.visual, cfg.flow_matching
    cbs = a.codebook_sizes
    if stage == "audio_embed":
        return [Tensor(f"model.audio_embed_layers.{i}.weight", (n + 1, c)) for i, n in enumerate(cbs)]
    if stage == "audio_head":
        depth = len(cbs)
        specs = []
        for n in range(a.audio_head_transformer_layers):
            p = f"audio_head.transformer_layers.{n}."
            specs += [Tensor(p + "self_attention.in_proj_weight", (3 * c, c)),
                      Tensor(p + "self_attention.in_proj_bias", (3 * c,)),
                      Linear(p + "self_attention.out_proj", c, c, True),
                      Tensor(p + "layernorm1.weight", (c,)), Tensor(p + "layernorm2.weight", (c,)),
                      # per-slot FFNs stored as one Linear each (reshaped in forward; biases unused)
                      Tensor(p + "linear1.weight", (2 * c, depth * c)), Tensor(p + "linear1.bias", (2 * c,)),
                      Tensor(p + "linear2.weight", (c, depth * 2 * c)), Tensor(p + "linear2.bias", (c,))]
        specs.append(Tensor("audio_head.headnorm.weight", (c,)))
        return specs + [Linear(f"audio_head.heads.{i}", n + 1, c, True) for i, n in enumerate(cbs)]
    if stage == "visual":
        e, p0 = v.embed_dim, "model.visual_model."
        specs = [Tensor(p0 + "patch_embed.proj.weight",
                        (e, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size))]
        for n in range(v.depth):
            p = f"{p0}blocks.{n}."
            specs += (_ln(p + "norm1", e) + _ln(p + "norm2", e)
                      + [Linear(p + "attn.qkv", 3 * e, e, True), Linear(p + "attn.proj", e, e, True),
                         Linear(p + "mlp.fc1", v.mlp_dim, e, True), Linear(p + "mlp.fc2", e, v.mlp_dim, True)])
        return specs
    if stage == "visual_bridge":
        e, p = v.embed_dim, "model.visual_bridge_model."
        merged = e * v.merge_size ** 2
        return (_ln(p + "ln_q", e) + [Linear(p + "mlp.0", merged, merged, True),
                                       Linear(p + "mlp.2", v.hidden_size, merged, True)])
    d, big = a.d_model, a.bridge_dim
    if stage == "audio_encoder":
        p = "audio_tokenizer.audio_model."
        specs = (_conv(p + "conv1", d, a.num_mel_bins, a.kernel_size) + _conv(p + "conv2", d, d, a.kernel_size)
                 + [Tensor(p + "positional_embedding", (a.encoder_positions, d))])
        for n in range(a.encoder_layers):
            specs += _whisper_layer(f"{p}layers.{n}.", d, a.encoder_ffn_dim)
        return specs + _ln(p + "layer_norm", d)
    if stage == "audio_bridge":  # encode side: conv-GLU 4x downsampling + LayerNorm
        p = "audio_tokenizer.audio_bridge_model."
        return (_conv(p + "gate_proj", big, d, a.avg_pooler, bias=False)
                + _conv(p + "up_proj", big, d, a.avg_pooler, bias=False)
                + [Linear(p + "down_proj", big, big, False)] + _ln(p + "layer_norm", big))
    if stage == "rvq":  # codebooks (embed used; embed_avg / cluster_size training-only) + proj_decoder
        p = "audio_tokenizer.audio_bridge_model."
        specs = []
        for i, n in enumerate(cbs):
            q = f"{p}vq_list.{i}.codebook."
            specs += [Tensor(q + "embed", (n, big)), Tensor(q + "embed_avg", (n, big)),
                      Tensor(q + "cluster_size", (n,))]
        return specs + [Linear(p + "proj_decoder", d, big, True)]
    if stage == "audio_decoder":
        p, mel = "audio_tokenizer.audio_decoder.", cfg.vocoder.num_mel_bins
        # ConvTranspose1d weights are (in, out, k)
        specs = (_conv(p + "dconv1.conv", d, d, a.decoder_kernel_size, bias=False)
                 + [Tensor(p + "dconv1.conv.bias", (d,))] + _ln(p + "dconv1.norm", d)
                 + [Tensor(p + "positional_embedding", (a.decoder_positions, d))])
        for n in range(a.decoder_layers):
            specs += _whisper_layer(f"{p}layers.{n}.", d, a.decoder_ffn_dim)
        specs += (_ln(p + "layer_norm", d)
                  + _conv(p + "dconv2.conv", d, mel, a.decoder_kernel_size, bias=False)
                  + [Tensor(p + "dconv2.conv.bias", (mel,))] + _ln(p + "dconv2.norm", mel))
        cin, idx = mel, 0  # post_net: [Conv1d k5, GroupNorm, Mish] per channels[:-1], then 1x1 conv to mel
        for cout in cfg.vocoder.channels[:-1]:
            specs += _conv(f"{p}post_net.layers.{idx}", cout, cin, 5) + _ln(f"{p}post_net.layers.{idx + 1}", cout)
            cin, idx = cout, idx + 3
        return specs + _conv(f"{p}post_net.layers.{idx}", mel, cin, 1)
    if stage == "flow_prenet":
        p, pd = "audio_tokenizer.audio_flow_matching_decoder.prenet.", fm.prenet_d_model
        specs = [Tensor(p + "positional_embedding", (fm.prenet_max_source_positions, pd)),
                 Linear(p + "in_mlp.0", 4 * pd, fm.prenet_in_dim, True), Linear(p + "in_mlp.2", pd, 4 * pd, True)]
        for n in range(fm.prenet_nlayers):
            specs += _whisper_layer(f"{p}transformer_layers.{n}.", pd, fm.prenet_ffn_dim, rms=True)
        return specs + [Tensor(p + "final_norm.weight", (pd,)), Linear(p + "out_proj", fm.prenet_out_dim, pd, False)]
    # flow_estimator: the causal U-Net (ConditionalDecoder)
    p = "audio_tokenizer.audio_flow_matching_decoder.conditional_decoder."
    ch = list(fm.channels)
    in_ch, tdim, inner = fm.in_channels * 2 + fm.spk_emb_dim, ch[0] * 4, fm.num_heads * fm.attention_head_dim
    specs = [Linear(p + "time_mlp.linear_1", tdim, in_ch, True), Linear(p + "time_mlp.linear_2", tdim, tdim, True)]
    cout = in_ch
    for i, c_i in enumerate(ch):
        cin, cout, q = cout, c_i, f"{p}down_blocks.{i}."
        specs += _resnet1d(q + "0.", cin, cout, tdim)
        for j in range(fm.n_blocks):
            specs += _basic_transformer(f"{q}1.{j}.", cout, inner)
        last = i == len(ch) - 1
        specs += _conv(q + "2", cout, cout, 3) if last else _conv(q + "2.conv", cout, cout, 3)
    for i in range(fm.num_mid_blocks):
        q = f"{p}mid_blocks.{i}."
        specs += _resnet1d(q + "0.", ch[-1], cout, tdim)
        for j in range(fm.n_blocks):
            specs += _basic_transformer(f"{q}1.{j}.", cout, inner)
    up = ch[::-1] + [ch[0]]
    for i in range(len(up) - 1):
        cin, cout, q = up[i] * 2, up[i + 1], f"{p}up_blocks.{i}."
        specs += _resnet1d(q + "0.", cin, cout, tdim)
        for j in range(fm.n_blocks):
            specs += _basic_transformer(f"{q}1.{j}.", cout, inner)
        last = i == len(up) - 2
        specs += _conv(q + "2", cout, cout, 3) if last else _conv(q + "2.conv", cout, cout, 4)  # ConvT (in,out,4)
    return (specs + _conv(p + "final_block.block.0", up[-1], up[-1], 3) + _ln(p + "final_block.block.2", up[-1])
            + _conv(p + "final_proj", fm.in_channels, up[-1], 1))


def stages_of(cfg: ModelConfig) -> Tuple[str, ...]:
    return STAGES if cfg.kind == "omni" else HF_STAGES


# ------------------------------------------------------------------------------------------------
# GPTQ parameters
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GptqParams:
    """The parts of `quantization_config` the loader needs (quant_method "gptq")."""
    bits: int
    group_size: int  # -1: one group per column (per-channel)
    desc_act: bool
    sym: bool
    checkpoint_format: str  # "gptq" (v1: stored zero = zero - 1) | "gptq_v2"

    def groups(self, in_features: int) -> int:
        g = self.group_size if self.group_size and self.group_size > 0 else in_features
        return -(-in_features // g)

    def group_size_for(self, in_features: int) -> int:
        return self.group_size if self.group_size and self.group_size > 0 else in_features

    @staticmethod
    def from_config(q: Optional[dict]) -> Optional["GptqParams"]:
        if q is None:
            return None
        method = str(q.get("quant_method", "gptq")).lower()
        if method != "gptq":
            raise ValueError(f"config.json: quantization_config.quant_method {method!r} is not supported "
                             "(only 'gptq')")
        missing = [k for k in ("bits", "group_size") if k not in q]
        if missing:
            raise ValueError(f"config.json: quantization_config is missing required key(s): {', '.join(missing)}")
        fmt = q.get("checkpoint_format", "gptq")
        if fmt not in ("gptq", "gptq_v2"):
            raise ValueError(f"config.json: quantization_config.checkpoint_format must be 'gptq' or 'gptq_v2', "
                             f"got {fmt!r}")
        bits = int(q["bits"])
        if bits != 4:
            raise ValueError(f"config.json: quantization_config.bits={bits}; only 4-bit GPTQ is supported")
        return GptqParams(bits=bits, group_size=int(q["group_size"]), desc_act=bool(q.get("desc_act", False)),
                          sym=bool(q.get("sym", True)), checkpoint_format=fmt)


# ------------------------------------------------------------------------------------------------
# safetensors headers
# ------------------------------------------------------------------------------------------------

def read_header(path: str) -> Dict[str, Tuple[str, Tuple[int, ...]]]:
    """name -> (safetensors dtype, shape), from the file's validated JSON header only
    (`omni_edge.safetensors_file.read_header`: offsets checked against the file size, so a truncated file is
    refused here, by name, before anything is memory-mapped)."""
    return tensor_meta(path)


_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.")
# Float tensors up to this many elements are checked for NaN / Inf whenever they are read (norms, biases, GPTQ
# scales: a fraction of a millisecond each); bigger ones only when the checkpoint is opened with
# finite_check="all" (quantize does, the read is paid anyway).
FINITE_CHECK_ELEMS = 1 << 22


def _read_json(path: str, what: str, kind: type):
    """A small JSON file of a checkpoint; ValueError naming it when unreadable or of the wrong kind."""
    require_regular(path, what)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ValueError(f"checkpoint: {path} is not readable JSON ({' '.join(str(e).split())[:200]})") from None
    if not isinstance(data, kind):
        raise ValueError(f"checkpoint: {path} must hold a JSON {'object' if kind is dict else kind.__name__}, "
                         f"got {type(data).__name__}")
    return data


def _fmt_shape(s) -> str:
    return "(" + ", ".join(str(x) for x in s) + ("," if len(s) == 1 else "") + ")"


# ------------------------------------------------------------------------------------------------
# The checkpoint
# ------------------------------------------------------------------------------------------------

class Checkpoint:
    """A checkpoint folder: config, tensor index (name -> file, dtype, shape), lazy memory-mapped reads."""

    def __init__(self, path: str, config: ModelConfig, files: Dict[str, str],
                 header: Dict[str, Tuple[str, Tuple[int, ...]]]):
        self.path = path
        self.config = config
        self.gptq = GptqParams.from_config(config.quantization)
        self._files = files  # tensor name -> file path
        self._header = header  # tensor name -> (dtype, shape)
        self._handles: Dict[str, object] = {}
        self.finite_check = "small"  # "small" | "all" | "none": which float tensors `get` checks for NaN / Inf
        self.lm_head_quant = self._lm_head_quant(config.quantization)  # None, or the lm_head format entry

    @staticmethod
    def _lm_head_quant(q: Optional[dict]) -> Optional[dict]:
        """quantization_config["omni_edge_lm_head"], checked: {"format": "q8", "block": B} or {"format": "q4",
        "bits": 4, "group_size": g, "sym": bool, "checkpoint_format": "gptq" | "gptq_v2"}; None when absent or
        "fp16" (a dense lm_head)."""
        entry = (q or {}).get(LM_HEAD_QUANT_KEY)
        if entry is None:
            return None
        where = f"config.json: quantization_config.{LM_HEAD_QUANT_KEY}"
        if not isinstance(entry, dict) or entry.get("format") not in ("fp16", "q8", "q4"):
            raise ValueError(f"{where}: expected an object with \"format\" fp16, q8 or q4, got {entry!r}")
        fmt = entry["format"]
        if fmt == "q8":
            b = entry.get("block")
            if not isinstance(b, int) or isinstance(b, bool) or b < 1:
                raise ValueError(f"{where}.block: expected a positive integer, got {b!r}")
        elif fmt == "q4":
            GptqParams.from_config({"quant_method": "gptq", **{k: v for k, v in entry.items() if k != "format"}})
        return None if fmt == "fp16" else dict(entry)

    def _gptq_for(self, prefix: str) -> Optional["GptqParams"]:
        """The GPTQ parameters of the linear at `prefix` (the lm_head's own when it is stored as q4)."""
        if prefix == "lm_head" and self.lm_head_quant is not None and self.lm_head_quant["format"] == "q4":
            return GptqParams.from_config({"quant_method": "gptq",
                                           **{k: v for k, v in self.lm_head_quant.items() if k != "format"}})
        return self.gptq

    def lm_head_format(self) -> str:
        """How the lm_head is stored: "q8", "q4" (GPTQ tensors) or "dense" (lm_head.weight, or tied)."""
        if self.has("lm_head.q8_codes") or self.has("lm_head.q8_scales"):
            return "q8"
        return "q4" if self.is_quantized("lm_head") else "dense"

    # ---- opening ------------------------------------------------------------------------------

    @classmethod
    def open(cls, path, *, check: bool = True) -> "Checkpoint":
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise ValueError(f"checkpoint: expected a folder with config.json and *.safetensors, got {path}")
        config = load_config(path)
        qc_path = os.path.join(path, "quantize_config.json")
        if config.quantization is None and os.path.lexists(qc_path):
            raw = dict(config.raw, quantization_config=_read_json(qc_path, "quantize_config.json", dict))
            config = parse_config(raw)
        files, header = cls._index(path)
        ckpt = cls(path, config, files, header)
        ckpt._check_layer_count()  # before any per-layer table is built (a config may claim 10^9 layers)
        if check:
            ckpt.check()
        return ckpt

    def _check_layer_count(self) -> None:
        """config.json's num_hidden_layers against the decoder layers the tensors hold (a folder without any
        decoder-layer tensor, holding other stages only, is left to `require`; the config caps the count)."""
        stored = {int(m.group(1)) for n in self._header for m in [_LAYER_RE.match(n)] if m}
        want = self.config.backbone.num_hidden_layers
        have = max(stored) + 1 if stored else 0
        if stored and want > have:
            held = f"decoder layers 0..{have - 1}"
            raise ValueError(f"checkpoint {self.path}: config.json num_hidden_layers={want}, but the tensors hold "
                             f"{held} (model.layers.N.*)")

    @staticmethod
    def _index(path: str):
        index = os.path.join(path, INDEX_FILE)
        files: Dict[str, str] = {}
        header: Dict[str, Tuple[str, Tuple[int, ...]]] = {}
        if os.path.lexists(index):
            weight_map = _read_json(index, INDEX_FILE, dict).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError(f"checkpoint: {index} has no weight_map object (name -> shard file)")
            for shard in sorted({str(v) for v in weight_map.values()}):
                full = os.path.join(path, shard)
                if (not all(isinstance(v, str) for v in weight_map.values()) or os.path.basename(shard) != shard
                        or not shard.endswith(".safetensors")):
                    raise ValueError(f"checkpoint: {INDEX_FILE} names a shard that is not a local .safetensors "
                                     f"file: {shard!r}")
                if not os.path.isfile(full):
                    raise ValueError(f"checkpoint: shard {shard} listed in {INDEX_FILE} is missing")
                for name, meta in read_header(full).items():
                    if weight_map.get(name) == shard:
                        files[name], header[name] = full, meta
            absent = [n for n in weight_map if n not in files]
            if absent:
                raise ValueError(f"checkpoint: {len(absent)} tensor(s) listed in {INDEX_FILE} are not in their "
                                 f"shard, e.g. {absent[0]} (expected in {weight_map[absent[0]]})")
            return files, header
        shards = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        if not shards:
            pickled = sorted(f for f in os.listdir(path) if f.endswith(PICKLE_SUFFIXES))
            if pickled:
                raise ValueError(f"checkpoint: {path} holds only pickled weights ({', '.join(pickled[:3])}); "
                                 "they are never loaded: convert them to safetensors")
            raise ValueError(f"checkpoint: no *.safetensors files in {path}")
        for shard in shards:
            full = os.path.join(path, shard)
            for name, meta in read_header(full).items():
                if name in files:
                    raise ValueError(f"checkpoint: tensor {name} is stored twice "
                                     f"({os.path.basename(files[name])} and {shard})")
                files[name], header[name] = full, meta
        return files, header

    # ---- validation ---------------------------------------------------------------------------

    def _check_linear(self, s: Linear, errors: List[str], missing: Optional[List[str]]) -> None:
        p = s.prefix
        dense, quant = self.has(p + ".weight"), self.has(p + ".qweight")
        q8 = any(self.has(p + "." + x) for x in Q8_PARTS)
        if dense + quant + q8 > 1:
            errors.append(f"{p}: more than one of .weight, .qweight and .q8_codes are stored")
            return
        if q8:
            lq = self.lm_head_quant
            if p != "lm_head" or lq is None or lq["format"] != "q8":
                errors.append(f"{p}.q8_codes: int8 tensors but config.json's quantization_config has no "
                              f"{LM_HEAD_QUANT_KEY} of format q8 for them")
                return
            n, k = s.out_features, s.in_features
            self._check_tensor(p + ".q8_codes", (n, k), ("I8",), errors, missing)
            self._check_tensor(p + ".q8_scales", (n, -(-k // min(lq["block"], k))), ("F16",), errors, missing)
            for part in Q8_PARTS:
                if missing is None and not self.has(p + "." + part):
                    errors.append(f"{p}.{part}: missing (the q8 lm_head needs {' and '.join(Q8_PARTS)})")
            return
        if quant:
            gptq = self._gptq_for(p)
            if gptq is None:
                errors.append(f"{p}.qweight: GPTQ tensors but config.json has no quantization_config")
                return
            n, k, g = s.out_features, s.in_features, gptq.groups(s.in_features)
            want = {"qweight": ((k // 8, n), ("I32",)), "qzeros": ((g, n // 8), ("I32",)),
                    "scales": ((g, n), FLOAT), "g_idx": ((k,), ("I32", "I64"))}
            if k % 8 or n % 8:
                errors.append(f"{p}: GPTQ needs in/out features that are multiples of 8, got ({n}, {k})")
                return
            for part, (shape, dtypes) in want.items():
                if part == "g_idx" and not self.has(p + ".g_idx"):
                    continue  # optional: defaults to i // group_size
                self._check_tensor(f"{p}.{part}", shape, dtypes, errors, missing)
        elif dense or missing is not None:
            self._check_tensor(p + ".weight", (s.out_features, s.in_features), FLOAT, errors, missing)
        if s.bias and (dense or quant or missing is not None):
            self._check_tensor(p + ".bias", (s.out_features,), FLOAT, errors, missing)
        elif not s.bias and self.has(p + ".bias"):
            errors.append(f"{p}.bias: this layer has no bias, but the checkpoint stores one")

    def _check_tensor(self, name, shape, dtypes, errors: List[str], missing: Optional[List[str]]) -> None:
        if name not in self._header:
            if missing is not None:
                missing.append(name)
            return
        dt, actual = self._header[name]
        if tuple(actual) != tuple(shape):
            errors.append(f"{name}: expected shape {_fmt_shape(shape)}, got {_fmt_shape(actual)}")
        if dt not in dtypes:
            errors.append(f"{name}: expected dtype {'/'.join(_ST_TO_TORCH[d] for d in dtypes)}, "
                          f"got {_ST_TO_TORCH.get(dt, dt)}")

    def _raise(self, errors: List[str], what: str) -> None:
        if errors:
            shown = "\n  ".join(errors[:12])
            more = f"\n  ... and {len(errors) - 12} more" if len(errors) > 12 else ""
            raise ValueError(f"checkpoint {self.path}: {what}:\n  {shown}{more}")

    def check(self) -> None:
        """Check every stored tensor the tables know against the config (shape, dtype). Missing tensors are
        reported per stage by `require` / `stage`, since a folder may hold only some stages (edge bundles)."""
        errors: List[str] = []
        for stage in stages_of(self.config):
            for s in stage_specs(self.config, stage):
                if isinstance(s, Linear):
                    self._check_linear(s, errors, None)
                else:
                    self._check_tensor(s.name, s.shape, FLOAT, errors, None)
        b = self.config.backbone
        if b.tie_word_embeddings and self.lm_head_format() != "dense":  # the quantized copy of a tied lm_head
            self._check_linear(Linear("lm_head", b.vocab_size, b.hidden_size, False), errors, None)
        if self.lm_head_quant is not None and self.lm_head_format() != self.lm_head_quant["format"]:
            errors.append(f"quantization_config.{LM_HEAD_QUANT_KEY} says the lm_head is "
                          f"{self.lm_head_quant['format']}, but the tensors store it as {self.lm_head_format()}")
        self._raise(errors, "tensors do not match config.json")

    def missing(self, stage: str) -> List[str]:
        """Names of this stage's tensors that the checkpoint lacks."""
        errors: List[str] = []
        missing: List[str] = []
        for s in stage_specs(self.config, stage):
            if isinstance(s, Linear):
                self._check_linear(s, errors, missing)
            else:
                self._check_tensor(s.name, s.shape, FLOAT, errors, missing)
        self._raise(errors, f"stage {stage} does not match config.json")
        return missing

    def require(self, stage: str) -> None:
        missing = self.missing(stage)
        if missing:
            shown = ", ".join(missing[:8]) + (f", ... ({len(missing)} in all)" if len(missing) > 8 else "")
            raise ValueError(f"checkpoint {self.path}: stage {stage} is missing tensor(s): {shown}")

    # ---- names --------------------------------------------------------------------------------

    def names(self) -> List[str]:
        return sorted(self._header)

    def has(self, name: str) -> bool:
        return name in self._header

    def shape(self, name: str) -> Tuple[int, ...]:
        return tuple(self._meta(name)[1])

    def dtype(self, name: str) -> str:
        """torch dtype name of the stored tensor ("bfloat16", "int32", ...)."""
        return _ST_TO_TORCH.get(self._meta(name)[0], self._meta(name)[0])

    def _meta(self, name: str):
        if name not in self._header:
            raise ValueError(f"checkpoint {self.path}: no tensor named {name}")
        return self._header[name]

    def is_quantized(self, prefix: str) -> bool:
        """True when the linear at `prefix` is stored as GPTQ tensors."""
        return self.has(prefix + ".qweight")

    def spec_names(self, s: Spec) -> List[str]:
        """Stored names of one table entry (GPTQ linears expand to their parts)."""
        if isinstance(s, Tensor):
            return [s.name]
        p = s.prefix
        if self.is_quantized(p):
            parts = [p + "." + x for x in GPTQ_PARTS if self.has(p + "." + x)]
        elif self.has(p + ".q8_codes"):
            parts = [p + "." + x for x in Q8_PARTS]
        else:
            parts = [p + ".weight"]
        return parts + ([p + ".bias"] if s.bias else [])

    def stage(self, stage: str) -> List[str]:
        """Stored tensor names of one stage; ValueError naming what is missing."""
        self.require(stage)
        return [n for s in stage_specs(self.config, stage) for n in self.spec_names(s)]

    def unknown(self) -> List[str]:
        """Stored names no stage table knows (ignored by the runtime)."""
        known = set()
        for stage in stages_of(self.config):
            for s in stage_specs(self.config, stage):
                if isinstance(s, Tensor):
                    known.add(s.name)
                else:
                    known.update(s.prefix + "." + x for x in GPTQ_PARTS + Q8_PARTS + ("weight", "bias"))
        if self.config.backbone.tie_word_embeddings:  # a quantized copy of the tied lm_head
            known.update("lm_head." + x for x in GPTQ_PARTS + Q8_PARTS)
        return sorted(n for n in self._header if n not in known)

    # ---- reading ------------------------------------------------------------------------------

    def _handle(self, file: str):
        h = self._handles.get(file)
        if h is None:
            from safetensors import safe_open
            h = safe_open(file, framework="pt", device="cpu")
            self._handles[file] = h
        return h

    def get(self, name: str, dtype=None, device=None):
        """Materialise one tensor (optionally cast / moved). Only this tensor's bytes are read. Float tensors
        are checked for NaN / Inf (small ones always, all with finite_check="all"): ValueError naming it."""
        self._meta(name)
        t = self._handle(self._files[name]).get_tensor(name)
        if t.is_floating_point() and (self.finite_check == "all"
                                      or (self.finite_check == "small" and t.numel() <= FINITE_CHECK_ELEMS)):
            check_finite(name, t, where=f"checkpoint {self.path}")
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        if device is not None:
            t = t.to(device)
        return t

    def tensors(self, names, dtype=None, device=None) -> Dict[str, object]:
        return {n: self.get(n, dtype=dtype, device=device) for n in names}

    def stage_tensors(self, stage: str, dtype=None, device=None) -> Dict[str, object]:
        """All tensors of one stage (float ones cast to `dtype` if given; GPTQ integers kept)."""
        return self.tensors(self.stage(stage), dtype=dtype, device=device)

    def layer_names(self, i: int) -> List[str]:
        b = self.config.backbone
        if not 0 <= i < b.num_hidden_layers:
            raise ValueError(f"layer: index must lie in [0, {b.num_hidden_layers}), got {i}")
        names = [n for s in _prefixed(layer_prefix(i), decoder_layer_specs(b)) for n in self.spec_names(s)]
        absent = [n for n in names if not self.has(n)]
        if absent:
            raise ValueError(f"checkpoint {self.path}: decoder layer {i} is missing tensor(s): {', '.join(absent)}")
        return names

    def layer_tensors(self, i: int, dtype=None, device=None) -> Dict[str, object]:
        """The tensors of decoder layer i, full names (`model.layers.i.*`), materialised (this layer only)."""
        return self.tensors(self.layer_names(i), dtype=dtype, device=device)

    def iter_layers(self, dtype=None, device=None) -> Iterator[Tuple[int, Dict[str, object]]]:
        for i in range(self.config.backbone.num_hidden_layers):
            yield i, self.layer_tensors(i, dtype=dtype, device=device)

    def linear(self, prefix: str, dtype=None, device=None):
        """One linear: dense weight (out, in) tensor, or a `omni_edge.ops.q4.QWeight` for GPTQ storage (its bias
        inside). Dense biases are returned separately by `get(prefix + '.bias')`."""
        if not self.is_quantized(prefix):
            return self.get(prefix + ".weight", dtype=dtype, device=device)
        return qweight_from_tensors(
            {k: self.get(prefix + "." + k, device=device) for k in GPTQ_PARTS + ("bias",)
             if self.has(prefix + "." + k)}, self._gptq_for(prefix), prefix=prefix, bias_dtype=dtype)

    def q8_linear(self, prefix: str, device=None):
        """The q8 linear at `prefix` (the lm_head) as an `omni_edge.ops.gemv.Q8Weight`."""
        from omni_edge.ops.gemv import Q8Weight
        if self.lm_head_quant is None or self.lm_head_quant["format"] != "q8":
            raise ValueError(f"checkpoint {self.path}: {prefix} is not stored as q8")
        codes = self.get(prefix + ".q8_codes", device=device)
        k = codes.shape[1]
        return Q8Weight(codes, self.get(prefix + ".q8_scales", device=device), min(self.lm_head_quant["block"], k))

    def close(self) -> None:
        self._handles.clear()

    def __repr__(self) -> str:
        return f"Checkpoint({self.path!r}, kind={self.config.kind!r}, tensors={len(self._header)})"


def check_finite(name: str, t, *, where: str = "") -> None:
    """ValueError naming tensor `name` when it holds NaN or Inf.

    One fp32 sum decides the common case without a temporary (any NaN or Inf makes the sum NaN or Inf); only a
    non-finite sum, which an overflow of large finite values can also cause, is followed by the exact search in
    slices that finds (and names) the first bad element."""
    import torch
    if t.numel() == 0 or math.isfinite(float(t.sum(dtype=torch.float32))):
        return
    flat = t.reshape(-1)
    step = 1 << 24
    for i in range(0, flat.numel(), step):
        part = flat[i:i + step]
        ok = torch.isfinite(part)
        if not bool(ok.all()):
            bad = int((~ok).nonzero()[0]) + i
            value = float(flat[bad])
            raise ValueError(f"{where + ': ' if where else ''}tensor {name} holds a non-finite value ({value} at "
                             f"flat index {bad}); the weights are corrupt")


def qweight_from_tensors(parts: Dict[str, object], gptq: GptqParams, *, prefix: str = "", bias_dtype=None):
    """GPTQ tensors of one linear ({"qweight", "qzeros", "scales", ["g_idx"], ["bias"]}) -> QWeight."""
    from omni_edge.ops import q4
    missing = [k for k in ("qweight", "qzeros", "scales") if k not in parts]
    if missing:
        raise ValueError(f"{prefix}: GPTQ linear is missing {', '.join(missing)}")
    k = parts["qweight"].shape[0] * 8
    bias = parts.get("bias")
    if bias is not None and bias_dtype is not None:
        bias = bias.to(bias_dtype)
    g_idx = parts.get("g_idx")
    if g_idx is not None:
        g_idx = g_idx.to(dtype=parts["qweight"].dtype)
    return q4.QWeight.from_gptq(parts["qweight"], parts["qzeros"], parts["scales"], g_idx,
                                bits=gptq.bits, group_size=gptq.group_size_for(k), sym=gptq.sym,
                                checkpoint_format=gptq.checkpoint_format, bias=bias)
