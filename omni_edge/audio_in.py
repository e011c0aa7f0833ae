"""Audio input: file -> 16 kHz wave -> log-mel -> Whisper-shaped encoder -> conv-GLU bridge -> 8 RVQ codes per
80 ms (MODEL.md §1.4). The backbone sees the sum of the 8 `model.audio_embed_layers` rows of each code frame
(done by the pipeline).

- `load_audio(path, cfg, *, max_seconds=600, max_tokens=None) -> AudioInput`: decode (omni_edge.audio_io),
  resample every channel to 16 kHz, downmix, split into 30 s pieces; `n_tokens` comes from the sample counts
  alone. `audio_from_wave(wave, sample_rate, cfg, ...)` does the same for samples in memory.
- `AudioEncoderStage.from_checkpoint(ckpt, cfg, *, device, dtype, backend, bundle_dir, manifest, threads)`:
  `codes(items) -> [ (n_tokens, 8) int64 ]`, `features(items)` (the bridge output, (n_tokens, 5120) fp32),
  `describe()`.

Lengths per piece of s samples: mel frames F = min(3000, s // 160 + 1); encoder frames T = (F - 1) // 2 + 1;
tokens = T // 4 (the zero-padded last group of 4 is computed and dropped): 1 s -> 101 -> 51 -> 12.

Each piece goes through the convolutions on its own (zero padding at its edges, as a one-piece call of the
reference); the transformer layers run over all pieces of all items at once, attention restricted to each piece
(`omni_edge.ops.attention.varlen`). `AudioEncoder.forward_padded` is the same computation on a padded batch with
a frame mask and an additive key mask: the form the ONNX export uses.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from omni_edge import audio_io
from omni_edge.config import AudioConfig, ModelConfig

try:  # the shared input error of omni_edge.inputs, when that module is present
    from omni_edge.inputs import InputError  # type: ignore
except Exception:  # pragma: no cover - depends on what is merged
    class InputError(ValueError):
        """Bad user input (a file or a limit); the message names the input and the limit."""

DEFAULT_MAX_SECONDS = 600.0
LN_EPS = 1e-5  # nn.LayerNorm default, used by the encoder layers, its final norm and the bridge norm


# ------------------------------------------------------------------------------------------------
# Lengths
# ------------------------------------------------------------------------------------------------

def piece_lengths(samples: int) -> Tuple[int, int, int]:
    """(mel frames, encoder frames, tokens) of one piece of `samples` 16 kHz samples."""
    f = audio_io.valid_frames(samples)
    t = (f - 1) // 2 + 1
    return f, t, t // 4


def split_pieces(n: int) -> List[Tuple[int, int]]:
    """[start, end) sample ranges of the pieces that make tokens, as the reference processor splits: audio up to
    30 s is one piece; longer audio is cut into 30 s pieces (no overlap), a last piece shorter than n_fft (400
    samples) is dropped, and pieces whose bridge length is 0 (under 960 samples) are skipped."""
    if n <= audio_io.CHUNK_SAMPLES:
        cuts = [(0, n)]
    else:
        cuts = [(s, min(n, s + audio_io.CHUNK_SAMPLES)) for s in range(0, n, audio_io.CHUNK_SAMPLES)]
        cuts = [(s, e) for s, e in cuts if e - s >= audio_io.N_FFT]
    return [(s, e) for s, e in cuts if piece_lengths(e - s)[2] > 0]


# ------------------------------------------------------------------------------------------------
# Prepared item
# ------------------------------------------------------------------------------------------------

@dataclass
class AudioInput:
    """One audio attachment, ready for the encoder."""
    source: str  # file name (or a caller's label)
    wave: torch.Tensor  # (n,) fp32, 16 kHz mono
    digest: str  # sha256 hex of the file bytes (or wave bytes) + processing parameters
    pieces: List[Tuple[int, int]] = field(default_factory=list)  # [start, end) sample ranges of the 30 s pieces
    n_mels: int = 128

    @property
    def piece_tokens(self) -> List[int]:
        return [piece_lengths(e - s)[2] for s, e in self.pieces]

    @property
    def n_tokens(self) -> int:
        return sum(self.piece_tokens)

    @property
    def seconds(self) -> float:
        return self.wave.shape[0] / audio_io.SAMPLE_RATE

    def mels(self) -> List[torch.Tensor]:
        """(n_mels, F_i) fp32 per piece."""
        return [audio_io.log_mel(self.wave[s:e], self.n_mels) for s, e in self.pieces]


def _params_tag(n_mels: int) -> bytes:
    return (f"|sr={audio_io.SAMPLE_RATE}|sinc_hann w={audio_io.LOWPASS_WIDTH} rolloff={audio_io.ROLLOFF}"
            f"|mel={n_mels}|piece={audio_io.CHUNK_SECONDS}s").encode()


def audio_from_wave(wave: torch.Tensor, sample_rate: int, cfg: AudioConfig, *, source: str = "<wave>",
                    max_seconds: float = DEFAULT_MAX_SECONDS, max_tokens: Optional[int] = None,
                    digest_bytes: Optional[bytes] = None) -> AudioInput:
    """An AudioInput from samples in memory: wave (n,) or (n, channels), any float dtype, at `sample_rate`."""
    if not isinstance(wave, torch.Tensor):
        wave = torch.as_tensor(wave)
    if wave.dim() not in (1, 2) or not wave.is_floating_point():
        raise InputError(f"{source}: expected float samples of shape (n,) or (n, channels), got "
                         f"{str(wave.dtype).replace('torch.', '')} {tuple(wave.shape)}")
    sr = int(sample_rate)
    if not audio_io.MIN_RATE <= sr <= audio_io.MAX_RATE:
        raise InputError(f"{source}: sample rate {sr} Hz is outside the supported {audio_io.MIN_RATE}-"
                         f"{audio_io.MAX_RATE} Hz")
    if wave.shape[0] == 0 or (wave.dim() == 2 and wave.shape[1] == 0):
        raise InputError(f"{source}: the audio is empty (0 samples)")
    seconds = wave.shape[0] / sr
    if seconds > max_seconds:
        raise InputError(f"{source}: {seconds:.1f} s of audio is longer than the limit of {max_seconds:g} s")
    wave = wave.float()
    finite = torch.isfinite(wave)
    if not bool(finite.all()):
        what = "all samples are" if not bool(finite.any()) else f"{int((~finite).sum())} samples are"
        raise InputError(f"{source}: {what} NaN or infinite; audio must be finite")
    # the reference resamples every channel, then averages them
    chans = wave[:, None] if wave.dim() == 1 else wave
    wave16 = audio_io.downmix(torch.stack([audio_io.resample(chans[:, c], sr, audio_io.SAMPLE_RATE)
                                           for c in range(chans.shape[1])], 1))
    if wave16.shape[0] < audio_io.N_FFT:
        raise InputError(f"{source}: {seconds * 1000:.1f} ms of audio is too short (at least {audio_io.N_FFT} "
                         f"samples at {audio_io.SAMPLE_RATE} Hz are needed)")
    n_mels = cfg.num_mel_bins
    h = hashlib.sha256()
    h.update(digest_bytes if digest_bytes is not None else wave.contiguous().numpy().tobytes() + f"|{sr}".encode())
    h.update(_params_tag(n_mels))
    item = AudioInput(source=source, wave=wave16, digest=h.hexdigest(), pieces=split_pieces(wave16.shape[0]),
                      n_mels=n_mels)
    if item.n_tokens == 0:
        raise InputError(f"{source}: {seconds * 1000:.1f} ms of audio is too short to make one audio token "
                         f"(at least 960 samples at {audio_io.SAMPLE_RATE} Hz, 60 ms)")
    if max_tokens is not None and item.n_tokens > max_tokens:
        raise InputError(f"{source}: {seconds:.1f} s of audio makes {item.n_tokens} audio tokens, more than the "
                         f"{max_tokens} the context has room for")
    return item


def load_audio(path, cfg: AudioConfig, *, max_seconds: float = DEFAULT_MAX_SECONDS,
               max_tokens: Optional[int] = None) -> AudioInput:
    """Read an audio file (wav/flac/ogg/mp3/m4a/webm, 8-192 kHz, any channels) into an AudioInput.
    InputError (a ValueError) naming the file and the limit for anything it cannot take."""
    path = os.fspath(path)
    name = os.path.basename(path) or path
    if not os.path.isfile(path):
        raise InputError(f"{name}: no such audio file")
    with open(path, "rb") as f:
        raw = f.read()
    if not raw:
        raise InputError(f"{name}: the file is empty (0 bytes)")
    try:
        wave, sr = audio_io.read_audio(path)
    except audio_io.DecodeError as e:
        raise InputError(f"{name}: {e}") from None
    if wave.shape[0] == 0:
        raise InputError(f"{name}: the file holds no audio samples")
    return audio_from_wave(wave, sr, cfg, source=name, max_seconds=max_seconds, max_tokens=max_tokens,
                           digest_bytes=raw)


# ------------------------------------------------------------------------------------------------
# Encoder (audio_tokenizer.audio_model.*)
# ------------------------------------------------------------------------------------------------

class EncoderLayer(torch.nn.Module):
    """Pre-LN Whisper layer: x + out(attn(LN(x))), then x + fc2(gelu(fc1(LN(x)))). k_proj has no bias."""

    def __init__(self, d: int, heads: int, ffn: int):
        super().__init__()
        self.heads = heads
        self.self_attn_layer_norm = torch.nn.LayerNorm(d, eps=LN_EPS)  # layers.N.self_attn_layer_norm (d,)
        self.q_proj = torch.nn.Linear(d, d)  # layers.N.self_attn.q_proj (d, d) + (d,)
        self.k_proj = torch.nn.Linear(d, d, bias=False)  # layers.N.self_attn.k_proj (d, d)
        self.v_proj = torch.nn.Linear(d, d)  # layers.N.self_attn.v_proj (d, d) + (d,)
        self.out_proj = torch.nn.Linear(d, d)  # layers.N.self_attn.out_proj (d, d) + (d,)
        self.final_layer_norm = torch.nn.LayerNorm(d, eps=LN_EPS)  # layers.N.final_layer_norm (d,)
        self.fc1 = torch.nn.Linear(d, ffn)  # layers.N.fc1 (ffn, d) + (ffn,)
        self.fc2 = torch.nn.Linear(ffn, d)  # layers.N.fc2 (d, ffn) + (d,)

    def _mlp(self, x):
        return x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        """x (N, d) = all pieces back to back; cu_seqlens (P + 1,) int32 piece offsets."""
        from omni_edge.ops import attention

        n, d = x.shape
        h = self.self_attn_layer_norm(x)
        q = self.q_proj(h).view(n, self.heads, -1)
        k = self.k_proj(h).view(n, self.heads, -1)
        v = self.v_proj(h).view(n, self.heads, -1)
        a = attention.varlen(q.contiguous(), k.contiguous(), v.contiguous(), cu_seqlens)
        x = x + self.out_proj(a.reshape(n, d))
        return self._mlp(x)

    def forward_masked(self, x: torch.Tensor, key_bias: torch.Tensor) -> torch.Tensor:
        """x (B, T, d); key_bias (B, 1, 1, T) additive (0 for a frame of the piece, very negative past its end)."""
        b, t, d = x.shape
        hd = d // self.heads
        h = self.self_attn_layer_norm(x)
        q = self.q_proj(h).view(b, t, self.heads, hd).transpose(1, 2)
        k = self.k_proj(h).view(b, t, self.heads, hd).transpose(1, 2)
        v = self.v_proj(h).view(b, t, self.heads, hd).transpose(1, 2)
        s = torch.matmul(q * (hd ** -0.5), k.transpose(-1, -2)) + key_bias
        a = torch.matmul(torch.softmax(s, dim=-1), v).transpose(1, 2).reshape(b, t, d)
        x = x + self.out_proj(a)
        return self._mlp(x)


class AudioEncoder(torch.nn.Module):
    """Conv1d(mels -> d, k3, p1) + GELU, Conv1d(d -> d, k3, s2, p1) + GELU, + stored sinusoids, layers, LayerNorm."""

    def __init__(self, n_mels: int, d: int, layers: int, heads: int, ffn: int, positions: int):
        super().__init__()
        self.conv1 = torch.nn.Conv1d(n_mels, d, 3, padding=1)  # audio_model.conv1 (d, n_mels, 3) + (d,)
        self.conv2 = torch.nn.Conv1d(d, d, 3, stride=2, padding=1)  # audio_model.conv2 (d, d, 3) + (d,)
        # audio_model.positional_embedding (positions, d): the stored (bf16-rounded) sinusoids, used as stored
        self.register_buffer("positional_embedding", torch.zeros(positions, d), persistent=True)
        self.layers = torch.nn.ModuleList([EncoderLayer(d, heads, ffn) for _ in range(layers)])
        self.layer_norm = torch.nn.LayerNorm(d, eps=LN_EPS)  # audio_model.layer_norm (d,)

    def embed(self, mel: torch.Tensor) -> torch.Tensor:
        """One piece (n_mels, F) -> (T, d) conv output + positions."""
        x = F.gelu(self.conv1(mel[None].to(self.conv1.weight.dtype)))
        x = F.gelu(self.conv2(x))[0].t()
        pos = self.positional_embedding[: x.shape[0]]
        return (x.float() + pos.float()).to(x.dtype)

    def forward(self, mels: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """Pieces (n_mels, F_i) -> encoder outputs (T_i, d), all pieces through the layers in one call."""
        xs = [self.embed(m) for m in mels]
        lens = [x.shape[0] for x in xs]
        cu = torch.tensor([0] + lens, dtype=torch.int64).cumsum(0).to(torch.int32).to(xs[0].device)
        x = torch.cat(xs, 0)
        for layer in self.layers:
            x = layer(x, cu)
        return list(self.layer_norm(x).split(lens, 0))

    def forward_padded(self, mel: torch.Tensor, mel_mask: torch.Tensor, key_bias: torch.Tensor) -> torch.Tensor:
        """mel (B, n_mels, F) zero past each piece's end; mel_mask (B, 1, F) 1/0; key_bias (B, 1, 1, F'/2... T)
        with T = (F - 1) // 2 + 1. Returns (B, T, d). Rows past a piece's end are not meaningful."""
        x = F.gelu(self.conv1(mel)) * mel_mask  # zero past the end, as the piece's own conv2 padding
        x = F.gelu(self.conv2(x)).transpose(1, 2)  # (B, T, d)
        x = (x.float() + self.positional_embedding[: x.shape[1]].float()).to(x.dtype)
        for layer in self.layers:
            x = layer.forward_masked(x, key_bias)
        return self.layer_norm(x)


# ------------------------------------------------------------------------------------------------
# Bridge (audio_tokenizer.audio_bridge_model.*, encode side)
# ------------------------------------------------------------------------------------------------

class AudioBridge(torch.nn.Module):
    """Groups of 4 frames: g = gate(x4), u = up(x4) (Conv1d k4 s4 = a GEMM on (T/4, 4d)), c = down(SiLU(g) u),
    LayerNorm(c + x4)."""

    def __init__(self, d: int, pool: int):
        super().__init__()
        big = d * pool
        self.pool = pool
        # gate_proj.weight / up_proj.weight (5120, 1280, 4) conv kernels, held as GEMM weights (5120, 4 * 1280)
        # with column k * d + c = kernel[:, c, k] (conversion once, in load_bridge / gemm_weight)
        self.gate_proj = torch.nn.Linear(pool * d, big, bias=False)
        self.up_proj = torch.nn.Linear(pool * d, big, bias=False)
        self.down_proj = torch.nn.Linear(big, big, bias=False)  # down_proj.weight (5120, 5120)
        self.layer_norm = torch.nn.LayerNorm(big, eps=LN_EPS)  # layer_norm (5120,)

    @staticmethod
    def gemm_weight(w: torch.Tensor) -> torch.Tensor:
        """Conv1d weight (big, d, k) applied at stride k -> linear weight (big, k * d) on x4[j] = [x[kj], ...]."""
        return w.permute(0, 2, 1).reshape(w.shape[0], -1).contiguous()

    def grouped(self, x4: torch.Tensor) -> torch.Tensor:
        """x4 (..., G, pool * d) -> (..., G, pool * d)."""
        c = self.down_proj(F.silu(self.gate_proj(x4)) * self.up_proj(x4))
        return self.layer_norm(c + x4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """One piece (T, d) -> (T // pool, pool * d): pad to a multiple of pool, compute, drop the padded group."""
        t, d = x.shape
        pad = (-t) % self.pool  # zero frames up to a whole group
        x4 = F.pad(x, (0, 0, 0, pad)).reshape(-1, self.pool * d)
        return self.grouped(x4)[: t // self.pool]


def load_encoder(tensors: dict, a: AudioConfig, *, layers: Optional[int] = None) -> AudioEncoder:
    """The encoder from checkpoint tensors (names of checkpoint.stage_specs "audio_encoder"; sizes from `a`);
    `layers` keeps only the first N layers (benchmarks)."""
    n_layers = a.encoder_layers if layers is None else layers
    p = "audio_tokenizer.audio_model."
    enc = AudioEncoder(a.num_mel_bins, a.d_model, n_layers, a.encoder_attention_heads, a.encoder_ffn_dim,
                       tensors[p + "positional_embedding"].shape[0])
    sd = {}
    for k, v in tensors.items():
        if k.startswith(p):
            name = k[len(p):]
            if name.startswith("layers."):
                parts = name.split(".")
                if int(parts[1]) >= n_layers:
                    continue
                name = ".".join(parts[:2] + [x for x in parts[2:] if x != "self_attn"])
            sd[name] = v
    enc.load_state_dict(sd, strict=True)
    return enc


def load_bridge(tensors: dict, a: AudioConfig) -> AudioBridge:
    """The bridge from checkpoint tensors (names of checkpoint.stage_specs "audio_bridge")."""
    q = "audio_tokenizer.audio_bridge_model."
    bridge = AudioBridge(a.d_model, a.avg_pooler)
    bridge.load_state_dict({"gate_proj.weight": AudioBridge.gemm_weight(tensors[q + "gate_proj.weight"]),
                            "up_proj.weight": AudioBridge.gemm_weight(tensors[q + "up_proj.weight"]),
                            "down_proj.weight": tensors[q + "down_proj.weight"],
                            "layer_norm.weight": tensors[q + "layer_norm.weight"],
                            "layer_norm.bias": tensors[q + "layer_norm.bias"]}, strict=True)
    return bridge


# ------------------------------------------------------------------------------------------------
# The stage
# ------------------------------------------------------------------------------------------------

def padded_inputs(mels: Sequence[torch.Tensor], frames: Optional[int] = None):
    """Pieces (n_mels, F_i) -> (mel (B, n_mels, Fp), mel_mask (B, 1, Fp), key_bias (B, 1, 1, Fp // 2)) with Fp a
    multiple of 8 (so the encoder length Fp // 2 is a multiple of 4), at least `frames`."""
    fmax = max(m.shape[1] for m in mels)
    fp = max(frames or 0, fmax)
    fp = -(-fp // 8) * 8
    b, n_mels = len(mels), mels[0].shape[0]
    mel = torch.zeros(b, n_mels, fp, dtype=torch.float32)
    mask = torch.zeros(b, 1, fp, dtype=torch.float32)
    bias = torch.full((b, 1, 1, fp // 2), -1e4, dtype=torch.float32)
    for i, m in enumerate(mels):
        f = m.shape[1]
        mel[i, :, :f] = m
        mask[i, 0, :f] = 1.0
        bias[i, 0, 0, : (f - 1) // 2 + 1] = 0.0
    return mel, mask, bias


class AudioEncoderStage(torch.nn.Module):
    """Encoder + bridge + RVQ codebooks on one device and dtype; the encoder+bridge may run as an ONNX graph."""

    def __init__(self, cfg: AudioConfig, encoder: Optional[AudioEncoder], bridge: Optional[AudioBridge],
                 codebooks: List[torch.Tensor], *, pick=None, threads: Optional[int] = None, device="cpu",
                 dtype=torch.float32):
        super().__init__()
        from omni_edge.ops import rvq

        self.cfg = cfg
        self.encoder = encoder  # None when the ONNX graph runs the encoder and bridge
        self.bridge = bridge
        self._device, self._dtype = torch.device(device), dtype
        # vq_list.{l}.codebook.embed (n_l, 5120) fp32: the search is always fp32 (MODEL.md §1.10)
        self.books = rvq.Codebooks([c.float().contiguous() for c in codebooks])
        self.pick = pick
        self._graph = pick.open(threads=threads) if pick is not None and pick.kind == "onnx" else None

    @classmethod
    def from_checkpoint(cls, ckpt, cfg: ModelConfig, *, device="cpu", dtype=torch.float32, backend: str = "auto",
                        bundle_dir=None, manifest=None, threads: Optional[int] = None) -> "AudioEncoderStage":
        from omni_edge import backends

        a = cfg.audio
        if a is None:
            raise ValueError("audio encoder: the checkpoint's config has no audio_config")
        device = torch.device(device)
        pick = backends.resolve("audio_encoder", backend, bundle_dir, manifest, str(device), str(dtype))
        enc = bridge = None
        if pick.kind == "torch":  # the graph holds its own weights: load the torch modules only when they run
            tensors = {**ckpt.stage_tensors("audio_encoder", dtype=dtype),
                       **ckpt.stage_tensors("audio_bridge", dtype=dtype)}
            enc = load_encoder(tensors, a).to(device=device, dtype=dtype)
            bridge = load_bridge(tensors, a).to(device=device, dtype=dtype)
        books = [ckpt.get(f"audio_tokenizer.audio_bridge_model.vq_list.{i}.codebook.embed", dtype=torch.float32)
                 for i in range(len(a.codebook_sizes))]
        stage = cls(a, enc, bridge, [b.to(device) for b in books], pick=pick, threads=threads, device=device,
                    dtype=dtype)
        return stage.eval()

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    def describe(self) -> str:
        how = self.pick.describe() if self.pick is not None else "torch (built directly)"
        return f"audio encoder: {how}; RVQ encode: fp32 nearest neighbour, native kernel where built"

    @torch.inference_mode()
    def features(self, items: Sequence[AudioInput]) -> List[torch.Tensor]:
        """Bridge outputs per item, (n_tokens, pool * d) fp32, pieces in order."""
        t0 = time.perf_counter()
        mels, owner = [], []
        for k, it in enumerate(items):
            for m in it.mels():
                mels.append(m)
                owner.append(k)
        t1 = time.perf_counter()
        self.timings = {"mel_s": t1 - t0}
        if not mels:
            return [torch.zeros(0, self.cfg.bridge_dim) for _ in items]
        if self._graph is not None:
            outs = self._run_graph(mels)
        else:
            dev, dt = self.device, self.dtype
            encs = self.encoder([m.to(device=dev, dtype=dt) for m in mels])
            outs = [self.bridge(e).float() for e in encs]
        self.timings["encoder_s"] = time.perf_counter() - t1
        per = [[] for _ in items]
        for k, o in zip(owner, outs):
            per[k].append(o)
        return [torch.cat(p, 0) if p else torch.zeros(0, self.cfg.bridge_dim) for p in per]

    def _run_graph(self, mels: List[torch.Tensor]) -> List[torch.Tensor]:
        """All pieces in one run: padded to the longest (a multiple of 8 frames), the masks keep them apart."""
        mel, mask, bias = padded_inputs(mels)
        dt = torch.float16 if self.pick.precision == "float16" else torch.float32
        (y,) = self._graph.run(mel=mel.to(dt), mel_mask=mask.to(dt), key_bias=bias.to(dt))
        return [y[i, : piece_lengths_from_frames(m.shape[1])].float().to(self.device) for i, m in enumerate(mels)]

    def codes(self, items: Sequence[AudioInput]) -> List[torch.Tensor]:
        """(n_tokens, num_codebooks) int64 per item; one RVQ search over every item's frames."""
        from omni_edge.ops import rvq

        feats = self.features(items)
        if not feats:
            return []
        t0 = time.perf_counter()
        codes = rvq.encode(torch.cat(feats, 0).to(self.books.device), self.books)
        self.timings["rvq_s"] = time.perf_counter() - t0
        return list(codes.split([f.shape[0] for f in feats], 0))


def piece_lengths_from_frames(frames: int) -> int:
    """Tokens of a piece with `frames` mel frames."""
    return ((frames - 1) // 2 + 1) // 4
