"""Speech decode chain: 8 RVQ codes per 80 ms -> 80-bin mel at 50 Hz -> (with `omni_edge.vocoder`) 24 kHz audio.

MODEL.md §1.7-1.9 and §2.3. One clause (the codes between `<audiogen_start>` and the EOS frame) is decoded as:

    codes (N, 8) --rvq decode (sum of codebook rows, fp32, layer 7 down to 0)--> (N, 5120)
      --proj_decoder--> (N, 1280) --AudioDecoder--> (4N-1, 1280) @ 50 Hz --Prenet--> mu (80, T)
      --CFM: 10 Euler steps, CFG 0.7, chunk-causal U-Net--> mel (80, T), T = 4N - 1
      --Vocoder (HiFT)--> 480 T samples at 24 kHz

Interface (used by the audio head / `omni_edge.speak`; the pipeline builds the two stages):

    speech = SpeechDecoder.from_checkpoint(ckpt, cfg, device="cpu", dtype=torch.float32,   # cfg: ModelConfig
                                           backend="auto", bundle_dir=None, manifest=None, threads=None)
    vocoder = Vocoder.from_file("vocoder.safetensors")            # or hift.pt; omni_edge.vocoder
    vocoder.select_backend("auto", bundle_dir, manifest)          # optional: the trunk in onnxruntime
    mel = speech.mel(codes)                                       # (80, T) fp32; noise=None -> NoiseBuffer(0)
    wave = decode_clause(speech, vocoder, codes, noise=None)      # offline: float32 (480 T,), T = 4N - 1

    stream = SpeechStream(speech, vocoder, on_audio=callback,     # callback(chunk: torch float32 (n,), 24 kHz)
                          first_codes=10, hop_codes=None, norm_stats="first", seed=0)
    for frame in frames: stream.push(frame)                       # frame: LongTensor (8,), one per 80 ms
    stream.end_clause()                                           # flush the clause (at the EOS frame)
    stream.stats_history[-1]                                      # the clause's pinned GroupNorm (mean, var)
    wave = stream.decode_clause(codes, noise=None, stats=None)    # offline decode with the stream's seed
    mel = speech.cfm(mu, noise)                                   # (1, 80, T) each: chunk by chunk (CfmStream)
    speech.describe(), vocoder.describe()                         # backends and why

The EOS frame (code_0 == 8192) is not pushed: call `end_clause()` instead. `codes` rows hold one code per
codebook (0 <= code < codebook size); anything else raises `SpeechError` (a ValueError) naming the entry.

Randomness is explicit: the CFM start noise is a `NoiseBuffer` (fixed per absolute mel frame: block b of 100
frames is drawn from its own generator seeded with (seed, b)), or a tensor given by the caller; the vocoder's
sine phase and noise likewise (see `omni_edge.vocoder`). So a streamed clause and its offline decode use
the same draws.

Streaming and what "equal to offline" means here (`SpeechStream`):
- The audio decoder's layers and the prenet are causal, the estimator's attention is chunk-causal (100 mel
  frames = 25 codes) and its convolutions are causal, so with the same noise the mel of a finished chunk
  does not change when later codes arrive ... except for one op that sees the whole clause: `dconv1`'s
  GroupNorm(1, 1280) normalises over all channels and frames of the clause. The reference decodes each
  clause whole after its EOS frame (MODEL.md §2.3, §4), so its statistics are the whole clause's; a stream
  that speaks before the clause ends cannot know them. Decision: by default (`norm_stats="first"`) the
  statistics are pinned at the clause's first decode to those of the codes it has (the first 10 codes);
  every later frame uses the same values, so nothing emitted is revised for them, and the streamed clause
  equals the offline decode with those statistics (`decode_clause(..., stats=stream.stats)`): same sample
  count, mel within 1e-5 (fp32; the decoder runs in pieces, which only reorders float sums). Against the
  reference's whole-clause decode it differs by that statistics shift (one affine change of the decoder
  input per clause). `norm_stats="clause"` decodes at the EOS frame only and equals the reference.
- A first chunk is decoded after `first_codes` codes (default 10 = 0.8 s of speech) as a preview: the chunk
  is not complete yet, so its attention sees fewer frames than the offline decode; when the chunk
  completes it is recomputed and only samples not yet emitted are sent (the vocoder cross-fades the seam).
  Each chunk is decoded as soon as it is complete (once the code after its last frame has arrived: the
  frame count of n codes is 4n - 1); the rest of the clause at `end_clause()`.
- Each frame goes through the decoder, prenet and CFM once: the decoder and prenet keep K/V caches, the
  CFM keeps per Euler step the K/V and causal-conv context of the finished chunks (`omni_edge.flow.
  CfmStream`; by default `cache="inputs"`: the layer inputs, 1.15 MB per mel frame in fp32, 58 MB per second
  of speech, K/V recomputed from them at each chunk for ~6% more CFM work; `cache="kv"` keeps K/V, 4x the
  memory (a 40 s clause would hold 4.6 GB); both freed at the clause end). A
  streamed clause costs its offline decode plus its previews (the first `first_codes` codes' frames, and
  each `hop_codes` preview's partial chunk). The offline decode (`SpeechDecoder.cfm`) needs no cache: one
  estimator pass per Euler step over the whole clause, its attention chunk by chunk (`flow.CHUNKED`).
- Clauses are joined as the reference's `wave_concat` joins segments: an extra 240-sample linear cross-fade
  (last 240 samples of the previous clause fading out, first 240 of the next fading in) is inserted between
  them (MODEL.md §2.3). The vocoder's output is otherwise delivered unchanged (clamped to +-0.99 by HiFT).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from omni_edge.config import ModelConfig
from omni_edge.flow import CHUNK, CfmStream, Estimator, StepCache, attention, cached_kv, cfm_solve, fused_qkv
from omni_edge.ops import rvq

N_MELS = 80
MEL_PER_CODE = 4  # dconv1 stride (avg_pooler): 12.5 Hz codes -> 50 Hz frames
JOIN_SAMPLES = 240  # wave_concat overlap: int(24000 * 0.01)


class SpeechError(ValueError):
    """Bad input to the speech chain (codes of the wrong shape or range, a clause too long)."""


def mel_frames(n_codes: int) -> int:
    """Mel frames of a clause of n codes: (n - 1) * 4 + 3 (ConvTranspose k3 s4, nothing trimmed)."""
    return 0 if n_codes <= 0 else (n_codes - 1) * MEL_PER_CODE + 3


# ------------------------------------------------------------------------------------------------
# Audio decoder (OmniAudioDecoder up to hidden_states_before_dconv2) and prenet
# ------------------------------------------------------------------------------------------------

def _rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The reference RMSNorm: variance in fp32, x * rsqrt in fp32, cast back when the weight is half."""
    var = x.float().pow(2).mean(-1, keepdim=True)
    h = x * torch.rsqrt(var + eps)
    if w.dtype in (torch.float16, torch.bfloat16):
        h = h.to(w.dtype)
    return w * h


class _RMSNorm(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return _rms_norm(x, self.weight)


class _SelfAttention(nn.Module):
    """OmniWhisperAttention, causal: q/v/out with bias, k without; scale 1/sqrt(head_dim)."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(d, d)  # (d, d) + bias
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, cache: Optional[StepCache] = None) -> torch.Tensor:  # x (B, T, d)
        b, t, d = x.shape
        if torch.onnx.is_in_onnx_export() or torch.jit.is_tracing():
            qkv = [p(x) for p in (self.q_proj, self.k_proj, self.v_proj)]
        else:
            qkv = fused_qkv(self, x, (self.q_proj, self.k_proj, self.v_proj)).chunk(3, dim=-1)
        q, k, v = (y.reshape(b, t, self.heads, d // self.heads).transpose(1, 2) for y in qkv)
        if cache is None or cache.offset == 0:
            k, v = cached_kv(self, k, v, cache)
            o = attention(q, k, v, causal=True)
        else:  # new frames [offset, offset + t) after the kept ones: causal with an offset
            k, v = cached_kv(self, k, v, cache)
            keys = torch.arange(k.shape[2], device=x.device)
            mask = keys[None, :] <= (cache.offset + torch.arange(t, device=x.device))[:, None]
            o = attention(q, k, v, mask)
        return self.out_proj(o.transpose(1, 2).reshape(b, t, d))


class _Layer(nn.Module):
    """OmniWhisperTransformerLayer (pre-norm, GELU MLP); LayerNorm or RMSNorm."""

    def __init__(self, d: int, heads: int, ffn: int, rms: bool):
        super().__init__()
        norm = (lambda: _RMSNorm(d)) if rms else (lambda: nn.LayerNorm(d))
        self.self_attn = _SelfAttention(d, heads)
        self.self_attn_layer_norm = norm()
        self.fc1 = nn.Linear(d, ffn)
        self.fc2 = nn.Linear(ffn, d)
        self.final_layer_norm = norm()

    def forward(self, x, cache: Optional[StepCache] = None):
        x = x + self.self_attn(self.self_attn_layer_norm(x), cache)
        x = x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))
        if (x.dtype in (torch.float16, torch.bfloat16) and not torch.jit.is_tracing()
                and not bool(torch.isfinite(x).all())):
            lim = torch.finfo(x.dtype).max - 1000  # the reference's overflow clamp (half dtypes only)
            x = x.clamp(-lim, lim)
        return x


class _ConvT(nn.Module):
    def __init__(self, d: int, k: int, stride: int):
        super().__init__()
        self.conv = nn.ConvTranspose1d(d, d, k, stride)  # dconv1.conv.weight (d_in, d_out, 3), bias (d,)
        self.norm = nn.GroupNorm(1, d)  # dconv1.norm.{weight,bias} (d,)


class AudioDecoder(nn.Module):
    """proj_decoder + OmniAudioDecoder up to `hidden_states_before_dconv2` (dconv2 and post_net skipped)."""

    def __init__(self, d: int, bridge_dim: int, heads: int, ffn: int, layers: int, positions: int, stride: int = 4,
                 kernel: int = 3):
        super().__init__()
        self.d, self.stride, self.kernel = d, stride, kernel
        self.proj_decoder = nn.Linear(bridge_dim, d)  # audio_bridge_model.proj_decoder (1280, 5120) + bias
        self.dconv1 = _ConvT(d, kernel, stride)
        self.register_buffer("positional_embedding", torch.zeros(positions, d))  # (3000, 1280), stored values
        self.layers = nn.ModuleList([_Layer(d, heads, ffn, rms=False) for _ in range(layers)])
        self.layer_norm = nn.LayerNorm(d)

    @property
    def max_frames(self) -> int:
        return self.positional_embedding.shape[0]

    def upsample(self, emb: torch.Tensor, n_frames: int):
        """ConvTranspose of (N, d) code embeddings -> (1, d, n_frames) before GroupNorm (n_frames <= 4N)."""
        x = self.dconv1.conv(emb.t().unsqueeze(0))  # (1, d, (N-1)*4+3)
        if n_frames > x.shape[-1]:  # the next code's bias-only frame: known once more codes follow
            bias = self.dconv1.conv.bias.view(1, -1, 1).expand(1, -1, n_frames - x.shape[-1])
            x = torch.cat([x, bias.to(x.dtype)], dim=-1)
        return x[..., :n_frames]

    @staticmethod
    def norm_stats(x: torch.Tensor):
        """GroupNorm(1) statistics (mean, biased variance) of (1, d, T) in fp32 (what F.group_norm uses)."""
        xf = x.float()
        return xf.mean(), xf.var(unbiased=False)

    def forward(self, emb: torch.Tensor, n_frames: Optional[int] = None, stats=None) -> torch.Tensor:
        """emb (N, 1280) from proj_decoder -> (T, 1280). n_frames defaults to the clause length 4N-1;
        `stats` (mean, var) replaces the GroupNorm statistics of this input (streaming)."""
        n_frames = mel_frames(emb.shape[0]) if n_frames is None else n_frames
        return self.layers_from(self.normalize(self.upsample(emb, n_frames), stats))

    def normalize(self, x: torch.Tensor, stats=None) -> torch.Tensor:
        """dconv1's GroupNorm(1) of (1, d, T): over x itself, or with the given (mean, var)."""
        gn = self.dconv1.norm
        if stats is None:
            return gn(x)
        mean, var = stats
        y = (x.float() - mean) * torch.rsqrt(var + gn.eps)
        return (y * gn.weight.float().view(1, -1, 1) + gn.bias.float().view(1, -1, 1)).to(x.dtype)

    def layers_from(self, x: torch.Tensor, cache: Optional[StepCache] = None) -> torch.Tensor:
        """Normalised (1, d, n) frames [offset, offset + n) (offset = cache.offset or 0) -> (n, d)."""
        off, n = (0 if cache is None else cache.offset), x.shape[-1]
        h = (x.transpose(1, 2).float() + self.positional_embedding[off:off + n].float()).to(x.dtype)
        for layer in self.layers:
            h = layer(h, cache)
        return self.layer_norm(h)[0]


class Prenet(nn.Module):
    """FlowmatchingPrenet: (T, 1280) -> mu (T, 80). Interpolation at ratio 1.0 is the identity; the stored
    positional table is not used by the reference forward."""

    def __init__(self, d_in: int, d: int, heads: int, ffn: int, layers: int, d_out: int, positions: int):
        super().__init__()
        self.register_buffer("positional_embedding", torch.zeros(positions, d))  # (5000, 512), unused
        self.in_mlp = nn.ModuleList([nn.Linear(d_in, 4 * d), nn.Identity(), nn.Linear(4 * d, d)])  # in_mlp.{0,2}
        self.transformer_layers = nn.ModuleList([_Layer(d, heads, ffn, rms=True) for _ in range(layers)])
        self.final_norm = _RMSNorm(d)  # (512,)
        self.out_proj = nn.Linear(d, d_out, bias=False)  # (80, 512)

    def forward(self, h: torch.Tensor, cache: Optional[StepCache] = None) -> torch.Tensor:
        x = self.in_mlp[2](F.silu(self.in_mlp[0](h))).unsqueeze(0)
        for layer in self.transformer_layers:
            x = layer(x, cache)
        return self.out_proj(self.final_norm(x))[0]


# ------------------------------------------------------------------------------------------------
# Noise
# ------------------------------------------------------------------------------------------------

class NoiseBuffer:
    """Start noise fixed per absolute frame: frames [100 b, 100 b + 100) come from a generator seeded with
    (seed, b), so any slice is the same whatever the length asked for."""

    BLOCK = CHUNK

    def __init__(self, seed: int = 0, channels: int = N_MELS):
        self.seed, self.channels = int(seed), channels
        self._blocks: List[torch.Tensor] = []

    def take(self, start: int, stop: int) -> torch.Tensor:
        """(channels, stop - start) fp32."""
        while len(self._blocks) * self.BLOCK < stop:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + len(self._blocks))
            self._blocks.append(torch.randn(self.channels, self.BLOCK, generator=g))
        return torch.cat(self._blocks, dim=1)[:, start:stop]


# ------------------------------------------------------------------------------------------------
# The stage
# ------------------------------------------------------------------------------------------------

@dataclass
class SpeechParams:
    n_steps: int = 10  # diffusion_steps
    cfg_rate: float = 0.7  # cfm_params.inference_cfg_rate
    scheduler: str = "cosine"  # cfm_params.t_scheduler


_DEC = "audio_tokenizer.audio_decoder."
_RVQ = "audio_tokenizer.audio_bridge_model."
_PRE = "audio_tokenizer.audio_flow_matching_decoder.prenet."
_EST = "audio_tokenizer.audio_flow_matching_decoder.conditional_decoder."


class SpeechDecoder(nn.Module):
    """codes (N, 8) -> mel (80, 4N-1): RVQ decode, proj_decoder, audio decoder, prenet, CFM."""

    def __init__(self, cfg: ModelConfig, codebooks: Sequence[torch.Tensor]):
        super().__init__()
        a, fm = cfg.audio, cfg.flow_matching
        self.codebook_sizes = [int(c.shape[0]) for c in codebooks]
        # the reference sums layer 7 first, down to layer 0 (fp32): keep the books in that order
        self._books_rev = rvq.Codebooks(list(codebooks)[::-1])
        self.decoder = AudioDecoder(a.d_model, a.bridge_dim, a.decoder_attention_heads, a.decoder_ffn_dim,
                                    a.decoder_layers, a.decoder_positions, a.avg_pooler, a.decoder_kernel_size)
        self.prenet = Prenet(fm.prenet_in_dim, fm.prenet_d_model, fm.prenet_attention_heads, fm.prenet_ffn_dim,
                             fm.prenet_nlayers, fm.prenet_out_dim, fm.prenet_max_source_positions)
        self.estimator = Estimator(fm.in_channels * 2 + fm.spk_emb_dim, fm.in_channels, fm.channels, fm.n_blocks,
                                   fm.num_mid_blocks, fm.num_heads, fm.attention_head_dim)
        if fm.spk_emb_dim:
            raise ValueError(f"flow_matching_config.spk_emb_dim: only 0 (no speaker embedding) is supported, "
                             f"got {fm.spk_emb_dim}")
        self.params = SpeechParams(fm.diffusion_steps, fm.cfm_params.inference_cfg_rate, fm.cfm_params.t_scheduler)
        # callables, not submodules: an ONNX session wrapper replaces them when the bundle has graphs
        self.__dict__["estimator_fn"] = self.estimator
        self.__dict__["decoder_fn"] = None
        self.backend = "torch"

    # -- loading ---------------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, ckpt, cfg: ModelConfig, *, device="cpu", dtype=torch.float32, backend="auto",
                        bundle_dir=None, manifest=None, threads=None) -> "SpeechDecoder":
        """Build from a `Checkpoint` (stages rvq, audio_decoder, flow_prenet, flow_estimator). Codebooks stay
        fp32 (MODEL.md §1.7); the rest is cast to `dtype`."""
        for stage in ("rvq", "audio_decoder", "flow_prenet", "flow_estimator"):
            ckpt.require(stage)
        names = [n for s in ("rvq", "audio_decoder", "flow_prenet", "flow_estimator") for n in ckpt.stage(s)]
        skip = ("embed_avg", "cluster_size")  # training-only RVQ tensors; dconv2 / post_net are unused too
        names = [n for n in names if not n.endswith(skip) and not n.startswith((_DEC + "dconv2.", _DEC + "post_net."))]
        m = cls.from_tensors(cfg, {n: ckpt.get(n) for n in names}, device=device, dtype=dtype)
        m._select_backend(backend, bundle_dir, manifest, device, dtype, threads)
        return m

    @classmethod
    def from_tensors(cls, cfg: ModelConfig, tensors, *, device="cpu", dtype=torch.float32) -> "SpeechDecoder":
        """Build from checkpoint-named tensors (e.g. `omni_edge.testing.random_tensors` for benchmarks)."""
        books = [tensors[f"{_RVQ}vq_list.{i}.codebook.embed"].to(device=device, dtype=torch.float32)
                 for i in range(len(cfg.audio.codebook_sizes))]
        m = cls(cfg, books)
        sd = {"decoder.proj_decoder.weight": tensors[_RVQ + "proj_decoder.weight"],
              "decoder.proj_decoder.bias": tensors[_RVQ + "proj_decoder.bias"]}
        for name, t in tensors.items():
            if name.startswith(_DEC) and not name[len(_DEC):].startswith(("dconv2.", "post_net.")):
                sd["decoder." + name[len(_DEC):]] = t
            elif name.startswith(_PRE):
                sd["prenet." + name[len(_PRE):]] = t
            elif name.startswith(_EST):
                sd["estimator." + name[len(_EST):]] = t
        m.load_state_dict(sd, strict=True)
        m.to(device=device, dtype=dtype).eval()
        m.requires_grad_(False)
        m.picks = {}
        return m

    def _select_backend(self, backend, bundle_dir, manifest, device, dtype, threads):
        from omni_edge import backends
        kinds = backends.parse(backend if backend is not None else "auto")
        picks = {s: backends.resolve(s, kinds[s], bundle_dir, manifest, device, dtype)
                 for s in ("audio_decoder", "flow_estimator")}
        self.picks = picks
        if picks["flow_estimator"].kind == "onnx":
            est = picks["flow_estimator"].open(threads=threads)
            e_dt = torch.float16 if picks["flow_estimator"].precision == "float16" else torch.float32
            self.__dict__["estimator_fn"] = lambda x, mu, t: est.run(
                x=x.to(e_dt), mu=mu.to(e_dt), t=t.to(e_dt))[0].to(x.dtype)
        if picks["audio_decoder"].kind == "onnx":
            dec = picks["audio_decoder"].open(threads=threads)
            d_dt = torch.float16 if picks["audio_decoder"].precision == "float16" else torch.float32
            self.__dict__["decoder_fn"] = lambda emb, mean, var: dec.run(emb=emb.to(d_dt), mean=mean, var=var)[0]

    def describe(self) -> str:
        picks = getattr(self, "picks", None)
        if not picks:
            return "torch"
        return "; ".join(f"{s}: {p.describe()}" for s, p in picks.items())

    # -- the chain ---------------------------------------------------------------------------------
    @property
    def dtype(self):
        return self.decoder.layer_norm.weight.dtype

    @property
    def device(self):
        return self.decoder.layer_norm.weight.device

    def check_codes(self, codes) -> torch.Tensor:
        codes = torch.as_tensor(codes)
        if codes.dim() != 2 or codes.shape[1] != len(self.codebook_sizes):
            raise SpeechError(f"codes: expected shape (N, {len(self.codebook_sizes)}), got {tuple(codes.shape)}")
        if codes.dtype not in (torch.int64, torch.int32):
            raise SpeechError(f"codes: expected an integer tensor (int64 / int32), got {codes.dtype}")
        max_codes = (self.decoder.max_frames - 3) // MEL_PER_CODE + 1
        if not 1 <= codes.shape[0] <= max_codes:
            raise SpeechError(f"codes: a clause holds 1 to {max_codes} frames (the audio decoder's position table "
                              f"has {self.decoder.max_frames} rows), got {codes.shape[0]}")
        lim = torch.tensor(self.codebook_sizes, dtype=codes.dtype)
        bad = (codes < 0) | (codes >= lim)
        if bool(bad.any()):
            t, l = (int(v) for v in bad.nonzero()[0])
            raise SpeechError(f"codes[{t}, {l}] = {int(codes[t, l])} is outside [0, {self.codebook_sizes[l]}) "
                              f"(codebook {l}; the EOS code {self.codebook_sizes[0]} ends a clause and is not decoded)")
        return codes.to(torch.int64)

    def embed(self, codes: torch.Tensor) -> torch.Tensor:
        """(N, 8) -> (N, 1280): Σ codebook rows in fp32 (layer 7 first), cast to the model dtype, proj_decoder."""
        s = rvq.decode(codes.flip(1).contiguous().to(self._books_rev.device), self._books_rev)
        return self.decoder.proj_decoder(s.to(self.dtype))

    @torch.no_grad()
    def mu(self, codes, n_frames: Optional[int] = None, stats=None) -> torch.Tensor:
        """codes (N, 8) -> mu (80, T): decoder + prenet. n_frames / stats as in `AudioDecoder.forward`."""
        codes = self.check_codes(codes)
        emb = self.embed(codes)
        n = mel_frames(codes.shape[0]) if n_frames is None else n_frames
        if self.decoder_fn is not None:
            x = self.decoder.upsample(emb, n)
            mean, var = stats if stats is not None else AudioDecoder.norm_stats(x)
            return self.decoder_fn(emb, torch.as_tensor(mean).float().reshape(1),
                                   torch.as_tensor(var).float().reshape(1))[0, :, :n].to(self.dtype)
        h = self.decoder(emb, n, stats)
        return self.prenet(h).t()

    @torch.no_grad()
    def mel(self, codes, noise=None, *, n_frames: Optional[int] = None, stats=None, seed: int = 0) -> torch.Tensor:
        """codes (N, 8) -> mel (80, T) fp32. noise: (80, >=T) tensor, a NoiseBuffer, or None (NoiseBuffer(seed))."""
        mu = self.mu(codes, n_frames, stats)
        t = mu.shape[1]
        if noise is None:
            noise = NoiseBuffer(seed)
        z = noise.take(0, t) if isinstance(noise, NoiseBuffer) else torch.as_tensor(noise).reshape(N_MELS, -1)
        if z.shape[1] < t:
            raise SpeechError(f"noise: expected at least {t} frames (80, {t}), got {tuple(z.shape)}")
        z = z[:, :t].to(device=mu.device, dtype=mu.dtype)
        return self.cfm(mu.unsqueeze(0), z.unsqueeze(0))[0].float()

    @property
    def incremental(self) -> bool:
        """True when the estimator and decoder run in torch (chunk caches); an ONNX graph runs whole clauses."""
        return self.estimator_fn is self.estimator and self.decoder_fn is None

    def cfm_stream(self, cache: str = "inputs") -> CfmStream:
        p = self.params
        return CfmStream(self.estimator, p.n_steps, p.cfg_rate, p.scheduler, cache=cache)

    @torch.no_grad()
    def cfm(self, mu: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """mu, noise (1, 80, T) -> mel (1, 80, T) in mu's dtype: one estimator pass per Euler step over the
        whole clause (in torch with chunk-by-chunk attention, `flow.CHUNKED`; an ONNX graph with the mask)."""
        p = self.params
        return cfm_solve(self.estimator_fn, mu, noise, p.n_steps, p.cfg_rate, p.scheduler)


def decode_clause(speech: SpeechDecoder, vocoder, codes, noise=None, *, seed: int = 0, fade: bool = True,
                  stats=None):
    """Offline: one clause's codes (N, 8) -> float32 wave (480 (4N-1),) at 24 kHz (the end fade applied
    like a stream's `end_clause`, unless fade=False). stats: GroupNorm (mean, var) to use instead of the
    clause's own (a stream's pinned `stats`)."""
    from omni_edge.vocoder import VocoderNoise, end_fade

    mel = speech.mel(codes, noise if noise is not None else NoiseBuffer(seed), stats=stats)
    wave = vocoder(mel, noise=VocoderNoise(seed))
    return end_fade(wave) if fade else wave


def wave_concat(waves: Sequence[torch.Tensor], overlap: int = JOIN_SAMPLES) -> torch.Tensor:
    """The reference's join (web_demo `wave_concat`): between consecutive segments longer than `overlap`,
    insert a linear cross-fade of the previous segment's last and the next segment's first `overlap`
    samples (nothing is removed)."""
    out = []
    for i, w in enumerate(waves):
        if i > 0 and waves[i - 1].shape[-1] > overlap and w.shape[-1] > overlap:
            out.append(_join(waves[i - 1][-overlap:], w[:overlap]))
        out.append(w)
    return torch.cat(out) if out else torch.zeros(0)


def _join(tail: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
    n = tail.shape[-1]
    return tail * torch.linspace(1.0, 0.0, n) + head * torch.linspace(0.0, 1.0, n)


# ------------------------------------------------------------------------------------------------
# Streaming
# ------------------------------------------------------------------------------------------------

class SpeechStream:
    """Push codes frame by frame; audio arrives through `on_audio(chunk)` (torch float32 (n,), 24 kHz).

    first_codes: codes before the first decode of a clause, a preview of its first chunk (None: no preview;
      the first decode comes when the first chunk is complete).
    hop_codes: None, or also preview the unfinished chunk whenever the clause holds a multiple of hop_codes
      codes (lower latency between chunks, more compute: each preview integrates the partial chunk).
      Finished chunks are decoded as soon as they are complete (100 mel frames = 25 codes, plus the code
      that follows the chunk's last frame), whatever the hop.
    norm_stats: the GroupNorm statistics of `dconv1` (the one op that sees the whole clause):
      "first" (default): pinned at the first decode of the clause to the statistics of the codes it has
        (the first `first_codes` codes); the streamed clause then equals `decode_clause(..., stats=
        stream.stats)` (fp32: 1e-5), and the reference's whole-clause decode up to that statistics shift.
      "clause": no decode before `end_clause()`; the clause is decoded whole, exactly as the reference
        demo does (MODEL.md §2.3; first audio only after the clause's EOS frame).
      a callable codes -> (mean, var): called once at the first decode with the codes so far, its result
        pinned (tests pass the whole clause's statistics, which makes the stream equal the reference).
    seed: CFM and vocoder noise; clause k uses seed + k (each clause starts with fresh noise, as the
      reference draws new noise per segment).
    cache: the CFM chunk caches, "inputs" (the default: 1.15 MB per mel frame, K/V of earlier chunks
      recomputed) or "kv" (4.6 MB per frame, nothing recomputed); see `omni_edge.flow.CfmStream`.

    With the torch estimator each mel frame is decoded once per clause (chunk caches, `omni_edge.flow`),
    plus the frames of each preview; with ONNX graphs every decode re-runs the clause so far."""

    def __init__(self, speech: SpeechDecoder, vocoder, on_audio: Callable, *, first_codes: Optional[int] = 10,
                 hop_codes: Optional[int] = None, seed: int = 0, norm_stats="first",
                 lookahead: Optional[int] = None, fade: bool = True, cache: str = "inputs"):
        from omni_edge.vocoder import VocoderStream  # noqa: F401 (fail early if missing)

        if first_codes is not None and (not isinstance(first_codes, int) or first_codes < 1):
            raise SpeechError(f"first_codes: expected None or an integer >= 1, got {first_codes!r}")
        if hop_codes is not None and (not isinstance(hop_codes, int) or hop_codes < 1):
            raise SpeechError(f"hop_codes: expected None or an integer >= 1, got {hop_codes!r}")
        if cache not in ("kv", "inputs"):
            raise SpeechError(f"cache: expected 'kv' or 'inputs', got {cache!r}")
        self.cache = cache
        if not (callable(norm_stats) or norm_stats in ("first", "clause")):
            raise SpeechError(f"norm_stats: expected 'first', 'clause' or a callable, got {norm_stats!r}")
        self.hop_codes = hop_codes
        self.speech, self.vocoder, self.on_audio = speech, vocoder, on_audio
        self.first_codes, self.seed, self.norm_stats = first_codes, int(seed), norm_stats
        self.lookahead, self.fade = lookahead, fade
        self.clauses = 0
        self.samples_out = 0
        self.cfm_frames = 0  # mel frames integrated by the CFM over the stream's life (cost accounting)
        self.cache_bytes = 0  # peak size of the chunk caches
        self.stats_history: list = []  # the pinned GroupNorm (mean, var) of each finished clause
        self._prev_tail: Optional[torch.Tensor] = None  # last JOIN_SAMPLES of the previous clause
        self._start_clause()

    def _start_clause(self):
        from omni_edge.vocoder import VocoderNoise, VocoderStream

        seed = self.seed + self.clauses
        self._codes: List[torch.Tensor] = []
        self._noise = NoiseBuffer(seed)
        kw = {} if self.lookahead is None else {"lookahead": self.lookahead}
        self._voc = VocoderStream(self.vocoder, noise=VocoderNoise(seed), **kw)
        self._pending = torch.zeros(0)  # first samples of this clause, held for the join
        self._joined = False
        self._tail = torch.zeros(0)  # last JOIN_SAMPLES samples of this clause
        self._clause_samples = 0
        self.stats = None  # the clause's pinned GroupNorm (mean, var), set at its first decode
        # incremental state: decoder + prenet caches, mu not yet integrated, finished mel
        self._dec_cache = StepCache()
        self._dec_codes = 0  # codes through the decoder
        self._dec_frames = 0  # decoder frames done (4 n - 1 for n codes)
        self._mu_todo = None  # (1, 80, k): mu of frames [cfm.done, _dec_frames)
        self._cfm = self.speech.cfm_stream(self.cache) if self.speech.incremental else None
        self._mel_done: List[torch.Tensor] = []  # (80, n) fp32 pieces of finished chunks
        self._full_done = 0  # ONNX path: frames of finished chunks decoded so far

    def decode_clause(self, codes, noise=None, stats=None) -> torch.Tensor:
        """Offline decode of one whole clause with this stream's models and seed (not delivered to on_audio):
        codes (N, 8) -> float32 wave (480 (4N - 1),). noise: None (the seeded buffer) or (80, >= 4N - 1);
        stats: None (the clause's own GroupNorm statistics) or a stream's pinned `stats`."""
        return decode_clause(self.speech, self.vocoder, codes, noise, seed=self.seed + self.clauses,
                             fade=self.fade, stats=stats)

    def push(self, codes) -> None:
        c = torch.as_tensor(codes).reshape(-1)
        if c.numel() != len(self.speech.codebook_sizes):
            raise SpeechError(f"push: expected one frame of {len(self.speech.codebook_sizes)} codes, got shape "
                              f"{tuple(torch.as_tensor(codes).shape)}")
        self.speech.check_codes(c.reshape(1, -1))
        max_codes = (self.speech.decoder.max_frames - 3) // MEL_PER_CODE + 1
        if len(self._codes) >= max_codes:
            raise SpeechError(f"push: a clause holds at most {max_codes} frames (the audio decoder's position "
                              f"table has {self.speech.decoder.max_frames} rows); call end_clause() first")
        self._codes.append(c.to(torch.int64))
        if self.norm_stats == "clause":
            return
        n = len(self._codes)
        done = self._cfm.done if self._cfm is not None else self._voc_done_frames()
        chunk_ready = mel_frames(n) >= (done // CHUNK + 1) * CHUNK
        preview = n == self.first_codes or (self.hop_codes is not None and n % self.hop_codes == 0)
        if preview or chunk_ready:
            self._decode(final=False, preview=preview)

    def _voc_done_frames(self) -> int:
        """Whole-clause path: the frames of finished chunks decoded so far (a multiple of CHUNK)."""
        return self._full_done

    def _pin_stats(self, codes: torch.Tensor):
        if self.stats is None:
            if callable(self.norm_stats):
                self.stats = self.norm_stats(codes)
            else:
                sp = self.speech
                self.stats = AudioDecoder.norm_stats(sp.decoder.upsample(sp.embed(sp.check_codes(codes)),
                                                                         mel_frames(codes.shape[0])))

    @torch.no_grad()
    def _decode(self, final: bool, preview: bool = False):
        codes = torch.stack(self._codes)
        self._pin_stats(codes)
        if self._cfm is None:
            mel = self.speech.mel(codes, self._noise, stats=self.stats)
            self.cfm_frames += mel.shape[1]
            self._full_done = mel.shape[1] // CHUNK * CHUNK
            if not final and not preview:  # a chunk decode sends finished chunks only, as the cached path
                mel = mel[:, :self._full_done]
        else:
            mel = self._decode_incremental(codes, final, preview)
            if mel is None:
                return
        wave = self._voc.push(mel, final=final)
        self._emit(wave, final)

    def _decode_incremental(self, codes: torch.Tensor, final: bool, preview: bool) -> Optional[torch.Tensor]:
        sp, cfm = self.speech, self._cfm
        if codes.shape[0] > self._dec_codes:  # decoder + prenet on the new codes' frames (causal: kept)
            mu = self._extend_mu(codes[self._dec_codes:])
            self._mu_todo = mu if self._mu_todo is None else torch.cat([self._mu_todo, mu], dim=-1)
        todo = 0 if self._mu_todo is None else self._mu_todo.shape[-1]
        k = todo if final else max(0, ((cfm.done + todo) // CHUNK) * CHUNK - cfm.done)
        if k:
            z = self._noise.take(cfm.done, cfm.done + k).to(device=sp.device, dtype=sp.dtype)[None]
            self._mel_done.append(cfm.run(self._mu_todo[..., :k], z, keep=True)[0].float())
            self._mu_todo = self._mu_todo[..., k:]
            self.cfm_frames += k
            todo -= k
        pieces = list(self._mel_done)
        if preview and not final and todo:
            z = self._noise.take(cfm.done, cfm.done + todo).to(device=sp.device, dtype=sp.dtype)[None]
            pieces.append(cfm.run(self._mu_todo, z, keep=False)[0].float())
            self.cfm_frames += todo
        elif not k and not final:
            return None
        self.cache_bytes = max(self.cache_bytes, cfm.nbytes() + self._dec_cache.nbytes())
        return torch.cat(pieces, dim=-1) if pieces else torch.zeros(N_MELS, 0)

    def _extend_mu(self, new_codes: torch.Tensor) -> torch.Tensor:
        """Codes after the first `_dec_codes` -> mu (1, 80, m) of the frames [4 n0 - 1, 4 n - 1) (from 0 for
        the first codes): the bias-only frame 4 n0 - 1 between the old and the new codes, then the new codes'
        ConvTranspose frames; GroupNorm with the pinned statistics; the causal layers continue from their
        caches."""
        sp, dec = self.speech, self.speech.decoder
        x = dec.dconv1.conv(sp.embed(new_codes).t().unsqueeze(0))  # (1, d, 4m - 1)
        if self._dec_codes:
            x = torch.cat([dec.dconv1.conv.bias.view(1, -1, 1).to(x.dtype), x], dim=-1)
        c = self._dec_cache
        c.offset, c.keep = self._dec_frames, x.shape[-1]
        h = dec.layers_from(dec.normalize(x, self.stats), c)
        mu = sp.prenet(h, c).t().unsqueeze(0)
        self._dec_codes += new_codes.shape[0]
        self._dec_frames += x.shape[-1]
        return mu

    def _emit(self, wave: torch.Tensor, final: bool):
        from omni_edge.vocoder import end_fade

        if final and self.fade:
            wave = end_fade(wave)  # the final push always carries >= `lookahead` frames, more than the fade
        out = []
        if self._prev_tail is not None and not self._joined:
            # wave_concat: hold this clause's first samples until JOIN_SAMPLES + 1 exist, insert the cross-fade
            self._pending = torch.cat([self._pending, wave])
            if self._pending.shape[0] > JOIN_SAMPLES or final:
                if self._pending.shape[0] > JOIN_SAMPLES:
                    out.append(_join(self._prev_tail, self._pending[:JOIN_SAMPLES]))
                out.append(self._pending)
                self._joined = True
        else:
            out.append(wave)
        self._clause_samples += wave.shape[0]
        self._tail = torch.cat([self._tail, wave])[-JOIN_SAMPLES:]
        for w in out:
            if w.numel():
                self.samples_out += w.shape[0]
                self.on_audio(w)

    def end_clause(self) -> None:
        """Decode the rest of the clause and flush it; the next push starts a new clause."""
        if not self._codes:
            return
        self._decode(final=True)
        self.stats_history.append(self.stats)
        self._prev_tail = self._tail if self._clause_samples > JOIN_SAMPLES else None
        self.clauses += 1
        self._start_clause()

    def close(self) -> None:
        self.end_clause()
