"""Model configuration read from a checkpoint's `config.json`.

Two kinds of checkpoint are understood:

- "omni": Baichuan-Omni-1.5 (`model_type "omni"`, docs/MODEL.md §3.2): the Qwen2.5-7B backbone keys at the top level
  plus the sections `audio_config`, `visual_config`, `video_config`, `flow_matching_config`, `vocoder_config`.
- "hf": a plain Hugging Face causal LM of the Llama / Qwen2 family (`model_type` "llama", "qwen2", ...): backbone only.

Every section is a dataclass. Keys a stage needs to build its tensors are required: a missing one raises
ValueError naming the section and the keys. Keys this runtime does not use are kept in the section's `extra`
dict, and the whole file stays available as `ModelConfig.raw`.

No torch here: `import omni_edge.config` is cheap.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional

KINDS = ("omni", "hf")
HF_MODEL_TYPES = ("llama", "qwen2", "mistral")
DTYPES = ("float32", "float16", "bfloat16")

_REQUIRED = object()  # marker default: the key must be present in config.json


def _req():
    return field(default=_REQUIRED)


def _where(section: str, key: str) -> str:
    return key if section.startswith("backbone") else f"{section}.{key}"


def _typed(section: str, key: str, annotation, v):
    """Check one config value against its field's annotation ("int", "float", "Optional[int]", ...); a JSON
    number written as 4.0 for an integer field is accepted as 4. ValueError names the key and the value."""
    ann = str(annotation)
    optional = ann.startswith("Optional[")
    base = ann[len("Optional["):-1] if optional else ann
    if v is None and optional:
        return None
    shown = repr(v) if len(repr(v)) < 60 else repr(v)[:57] + "..."
    if base == "int":
        if isinstance(v, float) and math.isfinite(v) and v.is_integer():
            v = int(v)
        if not isinstance(v, int) or isinstance(v, bool):
            raise ValueError(f"config.json: {_where(section, key)} must be an integer, got {shown}")
    elif base == "float":
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            raise ValueError(f"config.json: {_where(section, key)} must be a finite number, got {shown}")
        v = float(v)
    elif base == "bool":
        if not isinstance(v, bool):
            raise ValueError(f"config.json: {_where(section, key)} must be true or false, got {shown}")
    elif base == "str":
        if not isinstance(v, str):
            raise ValueError(f"config.json: {_where(section, key)} must be a string, got {shown}")
    elif base == "list":
        if not isinstance(v, list):
            raise ValueError(f"config.json: {_where(section, key)} must be a list, got {shown}")
    elif base == "dict":
        if not isinstance(v, dict):
            raise ValueError(f"config.json: {_where(section, key)} must be an object, got {shown}")
    return v


def _build(cls, section: str, d: dict, renames: Optional[dict] = None, **overrides):
    """Fill dataclass `cls` from dict `d`; keys not declared go to `extra`.

    `renames` maps a field name to the config key it is read from (when they differ); `overrides` sets fields
    computed by the caller (they are not looked up in `d`)."""
    if not isinstance(d, dict):
        raise ValueError(f"config.json: {section} must be a JSON object, got {type(d).__name__}")
    renames = renames or {}
    kwargs: dict[str, Any] = {}
    missing = []
    used = set()
    for f in dataclasses.fields(cls):
        if f.name == "extra":
            continue
        if f.name in overrides:
            kwargs[f.name] = overrides[f.name]
            continue
        key = renames.get(f.name, f.name)
        if key in d:
            kwargs[f.name] = _typed(section, key, f.type, d[key])
            used.add(key)
        elif f.default is _REQUIRED:
            missing.append(key)
    if missing:
        raise ValueError(f"config.json: {section} is missing required key(s): {', '.join(missing)}")
    extra = {k: v for k, v in d.items() if k not in used}
    return cls(**kwargs, extra=extra)


# ------------------------------------------------------------------------------------------------
# Backbone (docs/MODEL.md §1.5)
# ------------------------------------------------------------------------------------------------

# Plausible ranges of the backbone's integer keys: far beyond any real model, small enough that a corrupt value
# is refused here instead of driving an allocation (the loader also checks the layer count against the tensors).
BACKBONE_LIMITS = {
    "hidden_size": (1, 2**17), "num_hidden_layers": (1, 4096), "num_attention_heads": (1, 4096),
    "num_key_value_heads": (1, 4096), "head_dim": (2, 1024), "intermediate_size": (1, 2**20),
    "vocab_size": (1, 2**24), "max_position_embeddings": (2, 2**24),
}


@dataclass
class BackboneConfig:
    hidden_size: int = _req()  # 3584
    num_hidden_layers: int = _req()  # 28
    num_attention_heads: int = _req()  # 28
    num_key_value_heads: int = _req()  # 4 (GQA 7:1)
    head_dim: int = _req()  # 128
    intermediate_size: int = _req()  # 18944 (SwiGLU)
    vocab_size: int = _req()  # 152064 (embedding and lm_head rows)
    rope_theta: float = _req()  # 1e6; RoPE rotate-half (NeoX), computed in fp32
    rms_norm_eps: float = _req()  # 1e-6
    max_position_embeddings: int = 8192
    qkv_bias: bool = True  # bias on q/k/v (W_pack); never on o_proj
    packed_qkv: bool = True  # fused W_pack (omni) vs separate q_proj/k_proj/v_proj (hf)
    tie_word_embeddings: bool = False  # True: no lm_head.weight, logits use embed_tokens
    torch_dtype: str = "bfloat16"  # dtype of the stored weights
    hidden_act: str = "silu"
    extra: dict = field(default_factory=dict)

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def qkv_size(self) -> int:
        """Rows of the fused W_pack: [q | k | v] = [H*D | Hkv*D | Hkv*D]."""
        return self.q_size + 2 * self.kv_size

    def validate(self) -> "BackboneConfig":
        for name, (low, high) in BACKBONE_LIMITS.items():
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or not low <= v <= high:
                raise ValueError(f"config.json: {name} must be an integer in [{low}, {high}], got {v!r}")
        if self.q_size > 2**20 or self.qkv_size > 2**20:
            raise ValueError(f"config.json: num_attention_heads x head_dim = {self.q_size} is implausibly large "
                             f"(at most 2^20)")
        for name in ("rope_theta", "rms_norm_eps"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"config.json: {name} must be a positive finite number, got {v!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"config.json: num_attention_heads={self.num_attention_heads} must be a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")
        if self.head_dim % 2:
            raise ValueError(f"config.json: head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.torch_dtype not in DTYPES:
            raise ValueError(f"config.json: torch_dtype must be one of {DTYPES}, got {self.torch_dtype!r}")
        if self.hidden_act != "silu":
            raise ValueError(f"config.json: hidden_act must be 'silu' (SwiGLU), got {self.hidden_act!r}")
        return self


# ------------------------------------------------------------------------------------------------
# Omni sections (docs/MODEL.md §3.2)
# ------------------------------------------------------------------------------------------------

@dataclass
class AudioConfig:
    """`audio_config` (a WhisperConfig in the reference code): encoder, bridge, RVQ, audio decoder, audio head."""
    d_model: int = _req()  # 1280
    encoder_layers: int = _req()  # 32
    encoder_attention_heads: int = _req()  # 20
    encoder_ffn_dim: int = _req()  # 5120
    decoder_layers: int = _req()  # 8
    decoder_attention_heads: int = _req()  # 20
    decoder_ffn_dim: int = _req()  # 5120
    num_mel_bins: int = _req()  # 128
    avg_pooler: int = _req()  # 4 (50 Hz -> 12.5 Hz)
    audio_head_transformer_layers: int = _req()  # 3
    codebook_sizes: list = _req()  # vq_config.codebook_sizes [8192, 4096, 2048, 1024 x 5]
    kernel_size: int = 3
    stride_size: int = 2
    decoder_kernel_size: int = 3
    decoder_stride_size: int = 2
    n_fft: int = 400
    hop_length: int = 160
    sampling_rate: int = 16000
    max_audio_seconds: int = 30
    split_overlap: float = 0.0
    activation_function: str = "gelu"  # WhisperConfig default
    scale_embedding: bool = False  # WhisperConfig default
    audio_start_token_id: int = _req()  # 151676
    audio_end_token_id: int = _req()  # 151677
    audio_pad_token_id: int = _req()  # 151678
    audio_delim_token_id: Optional[int] = None  # 151693, unused
    audiogen_start_token_id: int = _req()  # 151700
    audiogen_end_token_id: int = _req()  # 151701
    audiotext_start_token_id: int = _req()  # 151697
    audiotext_end_token_id: Optional[int] = None  # 151698, unused
    audiotext_pad_token_id: Optional[int] = None  # 151699, unused
    vq_config: dict = field(default_factory=dict)  # the raw vq_config object
    extra: dict = field(default_factory=dict)

    @property
    def encoder_positions(self) -> int:
        """Rows of the encoder's sinusoid table: 1500 (30 s at 50 Hz)."""
        return (self.max_audio_seconds * self.sampling_rate // self.hop_length) // self.stride_size

    @property
    def decoder_positions(self) -> int:
        """Rows of the audio decoder's sinusoid table: 3000."""
        return self.max_audio_seconds * self.sampling_rate // self.hop_length

    @property
    def bridge_dim(self) -> int:
        """RVQ / bridge width d_model * avg_pooler: 5120."""
        return self.d_model * self.avg_pooler


@dataclass
class VisualConfig:
    """`visual_config` (a CLIPVisionConfig in the reference code; the Qwen2-VL ViT keys are the ones used)."""
    embed_dim: int = _req()  # 1280
    depth: int = _req()  # 32
    num_heads: int = _req()  # 16 (head_dim 80)
    mlp_ratio: float = _req()  # 4
    patch_size: int = _req()  # 14
    temporal_patch_size: int = _req()  # 2
    spatial_merge_size: int = _req()  # 2
    hidden_size: int = _req()  # 3584 (projector output = backbone width)
    in_channels: int = 3
    merge_size: int = 2
    hidden_act: str = "quick_gelu"
    min_pixels: int = 3136
    max_pixels: int = 3211264
    image_mean: list = field(default_factory=lambda: [0.48145466, 0.4578275, 0.40821073])
    image_std: list = field(default_factory=lambda: [0.26862954, 0.26130258, 0.27577711])
    image_start_token_id: int = _req()  # 151679
    image_end_token_id: int = _req()  # 151680
    image_pad_token_id: int = _req()  # 151681
    image_line_token_id: Optional[int] = None  # 151682, unused
    image_delimiter_token_id: Optional[int] = None  # 151688, unused
    extra: dict = field(default_factory=dict)

    @property
    def mlp_dim(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)


@dataclass
class VideoConfig(VisualConfig):
    """`video_config`: the same ViT keys plus frame sampling and the video tokens."""
    max_frame_num: int = 32
    decode_way: str = "1fps"
    video_start_token_id: int = _req()  # 151695
    video_end_token_id: int = _req()  # 151696
    video_place_token_id: int = _req()  # 151694 (<video_palce_baichuan>)


@dataclass
class CfmParams:
    sigma_min: float = 1e-6
    solver: str = "euler"
    t_scheduler: str = "cosine"
    training_cfg_rate: float = 0.2
    inference_cfg_rate: float = 0.7
    extra: dict = field(default_factory=dict)


@dataclass
class FlowMatchingConfig:
    """`flow_matching_config` (docs/MODEL.md §1.8): prenet and the CFM U-Net estimator."""
    prenet_in_dim: int = _req()  # 1280
    prenet_out_dim: int = _req()  # 80
    prenet_d_model: int = _req()  # 512
    prenet_attention_heads: int = _req()  # 8
    prenet_ffn_dim: int = _req()  # 2048
    prenet_nlayers: int = _req()  # 12
    in_channels: int = _req()  # 80
    channels: list = _req()  # [256]
    attention_head_dim: int = _req()  # 64
    n_blocks: int = _req()  # 4
    num_mid_blocks: int = _req()  # 12
    num_heads: int = _req()  # 8
    prenet_activation_function: str = "gelu"
    prenet_max_source_positions: int = 5000
    prenet_target_mel_length_scale_ratio: float = 1.0
    spk_emb_dim: int = 0
    diffusion_steps: int = 10
    act_fn: str = "gelu"
    sampling_rate: int = 24000
    hop_length: int = 480
    use_hires_mel: bool = True
    use_hidden_states_before_dconv2: bool = True
    unet_use_omni_attn: bool = False
    dropout: float = 0.0
    cfm_params: CfmParams = field(default_factory=CfmParams)
    extra: dict = field(default_factory=dict)


@dataclass
class VocoderConfig:
    """`vocoder_config`: drives only the (unused at inference) dconv2 + post_net path of the audio decoder."""
    num_mel_bins: int = _req()  # 80
    channels: list = _req()  # [256] * 5 (post_net conv widths)
    sampling_rate: int = 16000
    hop_length: int = 256
    n_fft: int = 1024
    enable_multi_scale: bool = True
    extra: dict = field(default_factory=dict)


@dataclass
class ModelConfig:
    kind: str  # "omni" | "hf"
    backbone: BackboneConfig
    audio: Optional[AudioConfig] = None
    visual: Optional[VisualConfig] = None
    video: Optional[VideoConfig] = None
    flow_matching: Optional[FlowMatchingConfig] = None
    vocoder: Optional[VocoderConfig] = None
    quantization: Optional[dict] = None  # the `quantization_config` object, if any
    raw: dict = field(default_factory=dict)  # the whole config.json


# ------------------------------------------------------------------------------------------------
# Parsing
# ------------------------------------------------------------------------------------------------

_BACKBONE_KEYS = {f.name for f in dataclasses.fields(BackboneConfig)}
# Keys read into other fields or sections, so they are not repeated in BackboneConfig.extra.
_NOT_BACKBONE = {"audio_config", "visual_config", "video_config", "flow_matching_config", "vocoder_config",
                 "quantization_config", "attention_qkv_bias", "attention_qkv_pack", "dtype", "rope_parameters"}


def _rope_theta(d: dict) -> Optional[float]:
    """rope_theta at the top level (transformers 4.x) or inside rope_parameters (transformers 5)."""
    if "rope_theta" in d:
        return _typed("backbone", "rope_theta", "float", d["rope_theta"])
    rp = d.get("rope_parameters")
    if isinstance(rp, dict) and "rope_theta" in rp:
        return _typed("rope_parameters", "rope_theta", "float", rp["rope_theta"])
    return None


def _check_rope_scaling(d: dict) -> None:
    for key in ("rope_scaling", "rope_parameters"):
        rs = d.get(key)
        if isinstance(rs, dict):
            kind = rs.get("rope_type", rs.get("type", "default"))
            if kind not in (None, "default"):
                raise ValueError(f"config.json: {key}.rope_type {kind!r} is not supported (only plain RoPE)")


def _flag(d: dict, key: str, default: bool) -> bool:
    """A true/false key of the top level (null counts as absent)."""
    v = d.get(key)
    return default if v is None else _typed("backbone", key, "bool", v)


def _dtype_name(d: dict) -> str:
    v = d.get("torch_dtype", d.get("dtype", "bfloat16"))
    return str(v).replace("torch.", "") if v is not None else "bfloat16"


def _backbone(d: dict, kind: str) -> BackboneConfig:
    src = dict(d)
    theta = _rope_theta(d)
    if kind == "omni":
        overrides = dict(qkv_bias=_flag(d, "attention_qkv_bias", True),
                         packed_qkv=_flag(d, "attention_qkv_pack", True),
                         torch_dtype=_dtype_name(d))
        if theta is not None:
            overrides["rope_theta"] = theta
        if d.get("position_embedding_type", "rope") != "rope":
            raise ValueError(f"config.json: position_embedding_type must be 'rope', got {d['position_embedding_type']!r}")
        if _flag(d, "use_norm_head", False):
            raise ValueError("config.json: use_norm_head=true (normalised lm_head) is not supported")
        if d.get("sparse_attention_layers"):
            raise ValueError("config.json: sparse_attention_layers must be empty, got "
                             f"{d['sparse_attention_layers']!r}")
    else:
        model_type = d.get("model_type")
        if model_type not in HF_MODEL_TYPES:
            raise ValueError(f"config.json: model_type must be 'omni' or one of {HF_MODEL_TYPES}, got {model_type!r}")
        _check_rope_scaling(d)
        if _flag(d, "mlp_bias", False):
            raise ValueError("config.json: mlp_bias=true is not supported")
        if model_type == "qwen2":
            qkv_bias = True  # Qwen2 always has q/k/v biases
        else:
            qkv_bias = _flag(d, "attention_bias", False)
        heads = d.get("num_attention_heads")
        if heads is not None:  # checked here: head_dim and num_key_value_heads may be derived from it
            heads = _typed("backbone", "num_attention_heads", "int", heads)
            if heads < 1:
                raise ValueError(f"config.json: num_attention_heads must be a positive integer, got {heads}")
        overrides = dict(qkv_bias=qkv_bias, packed_qkv=False, torch_dtype=_dtype_name(d),
                         rope_theta=theta if theta is not None else 10000.0,
                         tie_word_embeddings=_flag(d, "tie_word_embeddings", False))
        if "num_key_value_heads" not in d and heads is not None:
            src["num_key_value_heads"] = heads
        if d.get("head_dim") is None and heads and d.get("hidden_size") is not None:
            src["head_dim"] = _typed("backbone", "hidden_size", "int", d["hidden_size"]) // heads
        if _flag(d, "use_sliding_window", False):
            raise ValueError("config.json: use_sliding_window=true is not supported")
    cfg = _build(BackboneConfig, "backbone (top level)", src, **overrides)
    cfg.extra = {k: v for k, v in d.items() if k not in _BACKBONE_KEYS and k not in _NOT_BACKBONE}
    return cfg.validate()


# Counts that size the omni stages' tensor tables (layers, blocks, list lengths) and the sizes that must be
# positive: a corrupt value is refused here, before a table of that many entries is built.
COUNT_LIMIT = 1024
_COUNTS = ("encoder_layers", "decoder_layers", "audio_head_transformer_layers", "depth", "prenet_nlayers",
           "n_blocks", "num_mid_blocks")
_SIZES = ("d_model", "encoder_attention_heads", "encoder_ffn_dim", "decoder_attention_heads", "decoder_ffn_dim",
          "num_mel_bins", "avg_pooler", "embed_dim", "num_heads", "patch_size", "temporal_patch_size",
          "spatial_merge_size", "hidden_size", "prenet_in_dim", "prenet_out_dim", "prenet_d_model",
          "prenet_attention_heads", "prenet_ffn_dim", "in_channels", "attention_head_dim", "kernel_size",
          "decoder_kernel_size", "stride_size", "hop_length", "sampling_rate", "max_audio_seconds", "merge_size")


def _check_counts(section: str, obj) -> None:
    for name in _COUNTS:
        v = getattr(obj, name, None)
        if v is not None and not 0 <= v <= COUNT_LIMIT:
            raise ValueError(f"config.json: {section}.{name} must lie in [0, {COUNT_LIMIT}], got {v}")
    for name in _SIZES:
        v = getattr(obj, name, None)
        if v is not None and not 1 <= v <= 2**24:
            raise ValueError(f"config.json: {section}.{name} must lie in [1, 2^24], got {v}")
    for name in ("codebook_sizes", "channels"):
        v = getattr(obj, name, None)
        if v is None:
            continue
        if not 1 <= len(v) <= 64 or not all(isinstance(x, int) and not isinstance(x, bool) and 1 <= x <= 2**24
                                            for x in v):
            raise ValueError(f"config.json: {section}.{name} must be a list of 1 to 64 integers in [1, 2^24], "
                             f"got {str(v)[:80]}")


def parse_config(d: dict) -> ModelConfig:
    """config.json contents -> ModelConfig."""
    if not isinstance(d, dict):
        raise ValueError(f"config.json: expected a JSON object, got {type(d).__name__}")
    kind = "omni" if d.get("model_type") == "omni" else "hf"
    backbone = _backbone(d, kind)
    quant = d.get("quantization_config")
    if quant is not None and not isinstance(quant, dict):
        raise ValueError(f"config.json: quantization_config must be an object, got {type(quant).__name__}")
    if kind == "hf":
        return ModelConfig(kind=kind, backbone=backbone, quantization=quant, raw=d)

    missing = [k for k in ("audio_config", "visual_config", "video_config", "flow_matching_config", "vocoder_config")
               if k not in d]
    if missing:
        raise ValueError(f"config.json: model_type 'omni' is missing required section(s): {', '.join(missing)}")
    a = d["audio_config"]
    vq = a.get("vq_config") if isinstance(a, dict) else None
    if not isinstance(vq, dict) or "codebook_sizes" not in vq:
        raise ValueError("config.json: audio_config is missing required key(s): vq_config.codebook_sizes")
    if not isinstance(vq["codebook_sizes"], list):
        raise ValueError(f"config.json: audio_config.vq_config.codebook_sizes must be a list, got "
                         f"{str(vq['codebook_sizes'])[:80]}")
    audio = _build(AudioConfig, "audio_config", a, codebook_sizes=list(vq["codebook_sizes"]), vq_config=vq)
    visual = _build(VisualConfig, "visual_config", d["visual_config"])
    video = _build(VideoConfig, "video_config", d["video_config"])
    fm = dict(d["flow_matching_config"])
    cfm = _build(CfmParams, "flow_matching_config.cfm_params", fm.pop("cfm_params", {}))
    flow = _build(FlowMatchingConfig, "flow_matching_config", fm, cfm_params=cfm)
    vocoder = _build(VocoderConfig, "vocoder_config", d["vocoder_config"])
    for section, obj in (("audio_config", audio), ("visual_config", visual), ("video_config", video),
                         ("flow_matching_config", flow), ("vocoder_config", vocoder)):
        _check_counts(section, obj)
    return ModelConfig(kind=kind, backbone=backbone, audio=audio, visual=visual, video=video, flow_matching=flow,
                       vocoder=vocoder, quantization=quant, raw=d)


def load_config(path_or_dir) -> ModelConfig:
    """Read `config.json` from a checkpoint folder (or the file itself)."""
    from omni_edge.safetensors_file import require_regular

    path = os.fspath(path_or_dir)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.lexists(path):
        raise ValueError(f"config: no config.json at {path}")
    require_regular(path, "config")
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ValueError(f"config: {path} is not valid JSON ({' '.join(str(e).split())[:200]})") from None
    except OSError as e:
        raise ValueError(f"config: cannot read {path}: {e.strerror or e}") from None
    return parse_config(d)
