"""HiFT vocoder (CosyVoice2's HiFTGenerator as vendored by Baichuan, `cosy24k_vocoder`): mel -> 24 kHz audio.

MODEL.md §1.9. mel (80, T) at 50 Hz -> wave (480 T,) float32 in [-0.99, 0.99]:

    f0      = |Linear(ELU(conv k3) x5 (mel))|                    f0_predictor.condnet.{0,2,4,6,8}, .classifier
    source  = tanh(Linear_9->1(SineGen(f0 repeated x480)))       m_source.l_linear
              SineGen: harmonic h = 1..9, theta = 2 pi (cumsum(h f0 / 24000) mod 1) (fp32 cumsum with a
              float64 accumulator, as torch's CPU cumsum), sine = 0.1 sin(theta + phase_h), phase_1 = 0,
              voiced uv = f0 > 10, out = sine uv + (uv 0.003 + (1 - uv) 0.1/3) n, n ~ N(0, 1) per sample
    s_stft  = STFT(source, n_fft 16, hop 4, Hann periodic, centred, reflect) -> (18, 120 T + 1) [re | im]
    trunk   = conv_pre k7 -> 3 x [LeakyReLU 0.1 -> ConvT (x8 k16 | x5 k11 | x3 k7) (+ ReflectionPad(1, 0) after
              the last) + ResBlock(source_downs[i](s_stft)) -> mean of 3 Snake ResBlocks] -> LeakyReLU 0.01 ->
              conv_post k7 (18 channels)
    wave    = clamp(iSTFT(exp(ch 0..8) clipped at 100, sin(ch 9..17) as phase), +-0.99)

Sample counts (asserted): conv_pre T -> ups 8 T -> 40 T -> 120 T (+1 after the reflection pad); the source
STFT has 480 T / 4 + 1 = 120 T + 1 frames; source_downs give 8 T, 40 T, 120 T + 1; the iSTFT returns 480 T.

Randomness is explicit (`VocoderNoise`): the initial sine phases (9,) (Uniform(-pi, pi), phase 0 of the
fundamental) and the per-sample noise (9, n), fixed per absolute sample position (blocks of 24000 samples
from generators seeded with (seed, block)), or given as tensors by the caller.

Weights: `Vocoder.from_file(path)` reads the CosyVoice `hift.pt` (a PyTorch state dict with weight-norm g/v
pairs, loaded with `torch.load(weights_only=True)`) or a `.safetensors` file (folded or not); weight norm is
folded at load. Anything else (not a state dict, missing or misshaped tensors, a pickle that needs code) is
refused with a `VocoderFileError` naming the file. `convert(src, dst)` writes the folded safetensors file.

Streaming (`VocoderStream`): the trunk is non-causal with a finite receptive field (`RECEPTIVE_FRAMES` mel
frames each side, measured for the released shapes), so a window with that many frames of context on each
side reproduces the offline samples of its centre; the source is computed from absolute sample positions (phase
accumulator carried, noise by position), so no seam needs a cross-fade while the mel does not change. When
the mel of already-voiced frames is revised (a preview chunk recomputed), the new samples are cross-faded
with the old look-ahead samples over `XFADE` samples.
"""

from __future__ import annotations

import math
import os
import pickle
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

SAMPLE_RATE = 24000
HOP = 480  # samples per mel frame
FADE_SAMPLES = 960  # 40 ms fade at the end of a clause
XFADE = 240  # cross-fade where a revised mel meets audio already sent
RECEPTIVE_FRAMES = 16  # mel frames of context each side that reproduce offline samples (see tests)


class VocoderFileError(ValueError):
    """A vocoder file that cannot be used (unreadable, not a state dict, wrong tensors)."""


@dataclass
class HiftConfig:
    """Cosy24kVocoder's HiFTGenerator arguments (the released values are the defaults)."""
    in_channels: int = 80
    base_channels: int = 512
    cond_channels: int = 512  # f0 predictor width
    nb_harmonics: int = 8
    sampling_rate: int = SAMPLE_RATE
    nsf_alpha: float = 0.1
    nsf_sigma: float = 0.003
    nsf_voiced_threshold: float = 10.0
    upsample_rates: List[int] = field(default_factory=lambda: [8, 5, 3])
    upsample_kernel_sizes: List[int] = field(default_factory=lambda: [16, 11, 7])
    resblock_kernel_sizes: List[int] = field(default_factory=lambda: [3, 7, 11])
    resblock_dilations: List[int] = field(default_factory=lambda: [1, 3, 5])
    source_resblock_kernel_sizes: List[int] = field(default_factory=lambda: [7, 7, 11])
    n_fft: int = 16
    hop: int = 4
    lrelu_slope: float = 0.1
    audio_limit: float = 0.99

    @property
    def upsample(self) -> int:
        return math.prod(self.upsample_rates) * self.hop  # 480


# ------------------------------------------------------------------------------------------------
# Modules (names = the CosyVoice state dict after weight-norm folding)
# ------------------------------------------------------------------------------------------------

class Snake(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(ch))  # activations{1,2}.j.alpha (ch,)

    def forward(self, x):
        a = self.alpha.view(1, -1, 1)
        if torch.onnx.is_in_onnx_export() or torch.jit.is_tracing():
            return x + (1.0 / (a + 1e-9)) * torch.sin(x * a).pow(2)
        s = torch.sin(x * a)  # x + sin(a x)^2 / a in 3 passes over x instead of 5 (one fused multiply-add)
        return torch.addcmul(x, s * s if torch.is_grad_enabled() else s.mul_(s), 1.0 / (a + 1e-9))


class ResBlock(nn.Module):
    """Per dilation d: x += conv2(snake2(conv1_d(snake1(x)))), 'same' padding."""

    def __init__(self, ch: int, k: int, dilations):
        super().__init__()
        self.convs1 = nn.ModuleList([nn.Conv1d(ch, ch, k, dilation=d, padding=(k * d - d) // 2) for d in dilations])
        self.convs2 = nn.ModuleList([nn.Conv1d(ch, ch, k, padding=(k - 1) // 2) for _ in dilations])
        self.activations1 = nn.ModuleList([Snake(ch) for _ in dilations])
        self.activations2 = nn.ModuleList([Snake(ch) for _ in dilations])

    def forward(self, x):
        for c1, c2, a1, a2 in zip(self.convs1, self.convs2, self.activations1, self.activations2):
            x = c2(a2(c1(a1(x)))) + x
        return x


class _F0(nn.Module):
    def __init__(self, cin: int, ch: int):
        super().__init__()
        convs = []
        for i in range(5):
            convs += [nn.Conv1d(cin if i == 0 else ch, ch, 3, padding=1), nn.ELU()]
        self.condnet = nn.Sequential(*convs)  # condnet.{0,2,4,6,8} (ch, cin|ch, 3)
        self.classifier = nn.Linear(ch, 1)

    def forward(self, mel):  # (B, 80, T) -> (B, T)
        return self.classifier(self.condnet(mel).transpose(1, 2)).squeeze(-1).abs()


class _Source(nn.Module):
    def __init__(self, harmonics: int):
        super().__init__()
        self.l_linear = nn.Linear(harmonics, 1)  # m_source.l_linear (1, 9)


class Vocoder(nn.Module):
    def __init__(self, cfg: Optional[HiftConfig] = None):
        super().__init__()
        c = self.cfg = cfg or HiftConfig()
        base = c.base_channels
        self.f0_predictor = _F0(c.in_channels, c.cond_channels)
        self.m_source = _Source(c.nb_harmonics + 1)
        self.conv_pre = nn.Conv1d(c.in_channels, base, 7, padding=3)
        self.ups = nn.ModuleList([nn.ConvTranspose1d(base // 2 ** i, base // 2 ** (i + 1), k, u, padding=(k - u) // 2)
                                  for i, (u, k) in enumerate(zip(c.upsample_rates, c.upsample_kernel_sizes))])
        cum = [1]
        for u in c.upsample_rates[::-1][:-1]:
            cum.append(cum[-1] * u)
        self.source_downs = nn.ModuleList()
        self.source_resblocks = nn.ModuleList()
        for i, (u, k) in enumerate(zip(cum[::-1], c.source_resblock_kernel_sizes)):
            ch = base // 2 ** (i + 1)
            self.source_downs.append(nn.Conv1d(c.n_fft + 2, ch, 1) if u == 1 else
                                     nn.Conv1d(c.n_fft + 2, ch, u * 2, u, padding=u // 2))
            self.source_resblocks.append(ResBlock(ch, k, c.resblock_dilations))
        self.resblocks = nn.ModuleList([ResBlock(base // 2 ** (i + 1), k, c.resblock_dilations)
                                        for i in range(len(self.ups)) for k in c.resblock_kernel_sizes])
        ch = base // 2 ** len(self.ups)
        self.conv_post = nn.Conv1d(ch, c.n_fft + 2, 7, padding=3)
        self.register_buffer("window", torch.hann_window(c.n_fft, periodic=True), persistent=False)
        self.__dict__["trunk_fn"] = self.trunk  # an ONNX session wrapper after select_backend(); not a submodule
        self.pick = None

    def select_backend(self, kind: str = "auto", bundle_dir=None, manifest=None, *, device="cpu",
                       threads=None) -> "Vocoder":
        """Run the convolutional trunk in torch or in the bundle's `vocoder` graph (always fp32; f0, source
        and iSTFT stay on the host). `kind` as `omni_edge.backends` ("auto", "torch", "onnx")."""
        from omni_edge import backends

        self.pick = backends.resolve("vocoder", kind, bundle_dir, manifest, device, "float32")
        if self.pick.kind == "onnx":
            graph = self.pick.open(threads=threads)
            self.__dict__["trunk_fn"] = lambda mel, s: graph.run(mel=mel.float(), s_stft=s.float())[0]
        else:
            self.__dict__["trunk_fn"] = self.trunk
        return self

    def describe(self) -> str:
        return "torch" if self.pick is None else self.pick.describe()

    # -- loading ---------------------------------------------------------------------------------
    @classmethod
    def from_file(cls, path, *, device="cpu") -> "Vocoder":
        sd = load_state_dict(path)
        cfg = config_from_state_dict(sd, path)
        m = cls(cfg)
        check_state_dict(m, sd, path)
        m.load_state_dict(sd, strict=True)
        return m.to(device).eval().requires_grad_(False)

    # -- pieces ----------------------------------------------------------------------------------
    def f0(self, mel: torch.Tensor) -> torch.Tensor:
        """(80, T) -> f0 (T,) Hz."""
        return self.f0_predictor(mel.unsqueeze(0).float())[0]

    def source(self, f0: torch.Tensor, noise: torch.Tensor, phase: torch.Tensor,
               acc0: Optional[torch.Tensor] = None):
        """Excitation of frames f0 (T,): noise (9, 480 T), phase (9,), acc0 (9,) float64 running phase sum
        at the first sample (None for a clause start). Returns (source (480 T,), acc (9, 480 T) float64: the
        running phase sum after each sample)."""
        c = self.cfg
        h = torch.arange(1, c.nb_harmonics + 2, dtype=torch.float32, device=f0.device).view(-1, 1)
        f_up = f0.float().repeat_interleave(c.upsample).view(1, -1)  # nearest x480
        fmat = f_up * h / c.sampling_rate  # (9, n) fp32, as F_mat
        acc = fmat.double()
        if acc0 is not None:
            acc = torch.cat([acc0.view(-1, 1).double(), acc], dim=1)
        acc = acc.cumsum(-1)
        if acc0 is not None:
            acc = acc[:, 1:]
        theta = 2 * math.pi * (acc.float() % 1)
        sine = c.nsf_alpha * torch.sin(theta + phase.view(-1, 1).float())
        uv = (f_up > c.nsf_voiced_threshold).float()
        amp = uv * c.nsf_sigma + (1 - uv) * c.nsf_alpha / 3
        sine = sine * uv + amp * noise.float()
        s = torch.tanh(self.m_source.l_linear(sine.t())).squeeze(-1)
        return s, acc

    def stft(self, s: torch.Tensor) -> torch.Tensor:
        """(n,) -> (1, 18, n / 4 + 1): [real | imag] of the centred STFT."""
        c = self.cfg
        spec = torch.stft(s.view(1, -1), c.n_fft, c.hop, c.n_fft, window=self.window, return_complex=True)
        spec = torch.view_as_real(spec)
        return torch.cat([spec[..., 0], spec[..., 1]], dim=1)

    def trunk(self, mel: torch.Tensor, s_stft: torch.Tensor) -> torch.Tensor:
        """mel (1, 80, T), s_stft (1, 18, 120 T + 1) -> conv_post output (1, 18, 120 T + 1)."""
        t = mel.shape[-1]
        x = self.conv_pre(mel)
        n = len(self.ups)
        k = len(self.cfg.resblock_kernel_sizes)
        for i in range(n):
            x = self.ups[i](F.leaky_relu(x, self.cfg.lrelu_slope))
            if i == n - 1:
                x = F.pad(x, (1, 0), mode="reflect")
            si = self.source_resblocks[i](self.source_downs[i](s_stft))
            x = x + si
            xs = self.resblocks[i * k](x)
            for j in range(1, k):
                xs = xs + self.resblocks[i * k + j](x)
            x = xs / k
        x = self.conv_post(F.leaky_relu(x))
        if not torch.jit.is_tracing() and not torch.onnx.is_in_onnx_export():
            want = t * self.cfg.upsample // self.cfg.hop + 1
            if x.shape[-1] != want:  # exact counts through every transposed conv
                raise AssertionError(f"vocoder trunk: expected {want} frames for {t} mel frames, got {x.shape[-1]}")
        return x

    def istft(self, x: torch.Tensor) -> torch.Tensor:
        """conv_post output (1, 18, F) -> wave (4 (F - 1),) clamped."""
        c = self.cfg
        nb = c.n_fft // 2 + 1
        mag = torch.clip(torch.exp(x[:, :nb]), max=1e2)
        ph = torch.sin(x[:, nb:])
        spec = torch.complex(mag * torch.cos(ph), mag * torch.sin(ph))
        w = torch.istft(spec, c.n_fft, c.hop, c.n_fft, window=self.window)
        return torch.clamp(w, -c.audio_limit, c.audio_limit)[0]

    @torch.no_grad()
    def forward(self, mel: torch.Tensor, noise=None, *, phase: Optional[torch.Tensor] = None,
                source_noise: Optional[torch.Tensor] = None, trunk_fn=None) -> torch.Tensor:
        """mel (80, T) (or (1, 80, T)) -> wave (480 T,) float32. Noise: a VocoderNoise (default seed 0), or
        explicit `phase` (9,) and `source_noise` (9, 480 T)."""
        mel = mel.reshape(-1, mel.shape[-1]).float()
        t = mel.shape[-1]
        n = t * self.cfg.upsample
        if phase is None or source_noise is None:
            noise = noise if noise is not None else VocoderNoise(0)
            phase = noise.phase() if phase is None else phase
            source_noise = noise.take(0, n) if source_noise is None else source_noise
        s, _ = self.source(self.f0(mel), source_noise, phase)
        x = (trunk_fn or self.trunk_fn)(mel.unsqueeze(0), self.stft(s))
        w = self.istft(x)
        assert w.shape[0] == n, (w.shape, n)
        return w


class VocoderNoise:
    """Sine phases and per-sample noise fixed per absolute position (see the module docstring)."""

    BLOCK = SAMPLE_RATE

    def __init__(self, seed: int = 0, harmonics: int = 9):
        self.seed, self.harmonics = int(seed), harmonics
        self._blocks: Dict[int, torch.Tensor] = {}

    def phase(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + 999_983)
        p = (torch.rand(self.harmonics, generator=g) * 2 - 1) * math.pi
        p[0] = 0
        return p

    def take(self, start: int, stop: int) -> torch.Tensor:
        parts = []
        b0, b1 = start // self.BLOCK, (max(stop, start + 1) - 1) // self.BLOCK
        for b in range(b0, b1 + 1):
            if b not in self._blocks:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + 7919 * (b + 1))
                self._blocks[b] = torch.randn(self.harmonics, self.BLOCK, generator=g)
            parts.append(self._blocks[b])
        return torch.cat(parts, dim=1)[:, start - b0 * self.BLOCK:stop - b0 * self.BLOCK]


def end_fade(wave: torch.Tensor, n: int = FADE_SAMPLES) -> torch.Tensor:
    """Half-cosine fade over the last min(n, len) samples."""
    n = min(n, wave.shape[0])
    if n == 0:
        return wave
    ramp = 0.5 * (1 + torch.cos(torch.arange(1, n + 1, dtype=torch.float32) * (math.pi / n)))
    out = wave.clone()
    out[-n:] = out[-n:] * ramp
    return out


# ------------------------------------------------------------------------------------------------
# Streaming
# ------------------------------------------------------------------------------------------------

class VocoderStream:
    """Feeds a growing (possibly revised) mel of one clause; returns the new samples of each push.

    push(mel (80, T), final): emits frames [emitted, T - lookahead) (all of them when final), computed on a
    window with `context` frames on the left and `lookahead` (or the clause end) on the right."""

    def __init__(self, vocoder: Vocoder, *, noise: Optional[VocoderNoise] = None, lookahead: int = RECEPTIVE_FRAMES,
                 context: int = RECEPTIVE_FRAMES, xfade: int = XFADE, trunk_fn=None):
        if lookahead < 2:
            raise ValueError(f"lookahead: expected >= 2 mel frames (the end fade spans 2 frames), got {lookahead}")
        self.voc, self.noise = vocoder, noise or VocoderNoise(0)
        self.lookahead, self.context, self.xfade = lookahead, context, xfade
        self.trunk_fn = trunk_fn or vocoder.trunk_fn
        self._phase = self.noise.phase()
        self._acc = {0: torch.zeros(vocoder.cfg.nb_harmonics + 1, dtype=torch.float64)}  # frame -> phase sum
        self.emitted = 0  # frames sent
        self._mel_used: Optional[torch.Tensor] = None  # mel frames the sent audio was computed from
        self._ahead: Optional[torch.Tensor] = None  # samples computed past `emitted` last time

    @torch.no_grad()
    def push(self, mel: torch.Tensor, final: bool = False) -> torch.Tensor:
        mel = mel.float()
        t = mel.shape[1]
        stop = t if final else max(self.emitted, t - self.lookahead)
        if stop <= self.emitted:
            return torch.zeros(0)
        hop = self.voc.cfg.upsample
        a = max(0, self.emitted - self.context)
        b = t if final else min(t, stop + self.lookahead)
        w_mel = mel[:, a:b]
        f0 = self.voc.f0(w_mel)
        src, acc = self.voc.source(f0, self.noise.take(a * hop, b * hop), self._phase, self._acc[a])
        # running phase at the frame starts up to `stop` (frames past it lack right context for f0)
        for j in range(a + 1, stop + 1):
            self._acc.setdefault(j, acc[:, (j - a) * hop - 1].clone())
        x = self.trunk_fn(w_mel.unsqueeze(0), self.voc.stft(src))
        wave = self.voc.istft(x)
        assert wave.shape[0] == (b - a) * hop, (wave.shape, a, b)
        new = wave[(self.emitted - a) * hop:(stop - a) * hop]
        revised = (self._mel_used is not None and self.emitted > 0 and
                   not torch.equal(self._mel_used[:, a:min(self._mel_used.shape[1], b)],
                                   mel[:, a:min(self._mel_used.shape[1], b)]))
        if revised and self._ahead is not None and self.xfade > 0:
            n = min(self.xfade, new.shape[0], self._ahead.shape[0])
            ramp = torch.linspace(0.0, 1.0, n + 2)[1:-1]
            new = new.clone()
            new[:n] = self._ahead[:n] * (1 - ramp) + new[:n] * ramp
        self._ahead = wave[(stop - a) * hop:]
        self._mel_used = mel.clone()
        self.emitted = stop
        return new


# ------------------------------------------------------------------------------------------------
# Files
# ------------------------------------------------------------------------------------------------

def _fold(g: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """weight = g * v / ||v||, the norm over every dim but 0 (torch weight_norm, dim=0)."""
    norm = v.float().flatten(1).norm(dim=1).view(-1, *([1] * (v.dim() - 1)))
    return (g.float() * v.float() / norm).to(v.dtype)


def load_state_dict(path) -> Dict[str, torch.Tensor]:
    """Read a vocoder file (safetensors, or a weights-only PyTorch pickle), fold weight norm, drop the
    `hifigan_generator.` prefix. Raises VocoderFileError naming the file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise VocoderFileError(f"vocoder: no file at {path}")
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
            sd = load_file(path)
        except Exception as e:
            raise VocoderFileError(f"vocoder {path}: not a readable safetensors file ({type(e).__name__}: "
                                   f"{' '.join(str(e).split())[:160]})") from None
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError, AttributeError, TypeError) as e:
            raise VocoderFileError(f"vocoder {path}: not a weights-only PyTorch state dict (only tensors are loaded, "
                                   f"never code): {' '.join(str(e).split())[:200]}") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not sd or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                     for k, v in sd.items()):
        raise VocoderFileError(f"vocoder {path}: expected a state dict (tensor name -> tensor), got "
                               f"{type(sd).__name__}")
    sd = {k[len("hifigan_generator."):] if k.startswith("hifigan_generator.") else k: v for k, v in sd.items()}
    out: Dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if k.endswith(".weight_g") or k.endswith(".parametrizations.weight.original0"):
            base = k[:-len(".weight_g")] if k.endswith(".weight_g") else k[:-len(".parametrizations.weight.original0")]
            vk = base + (".weight_v" if k.endswith(".weight_g") else ".parametrizations.weight.original1")
            if vk not in sd:
                raise VocoderFileError(f"vocoder {path}: {k} has no matching {vk}")
            g, vv = v, sd[vk]
            if g.shape[0] != vv.shape[0] or g.numel() != g.shape[0]:
                raise VocoderFileError(f"vocoder {path}: {k} has shape {tuple(g.shape)}, "
                                       f"expected ({vv.shape[0]}, 1, 1)")
            out[base + ".weight"] = _fold(g, vv).float()
        elif k.endswith(".weight_v") or k.endswith(".parametrizations.weight.original1"):
            continue
        else:
            out[k] = v.float()
    return out


def config_from_state_dict(sd: Dict[str, torch.Tensor], path="vocoder") -> HiftConfig:
    try:
        base = sd["conv_pre.weight"].shape[0]
        cond = sd["f0_predictor.condnet.0.weight"].shape[0]
        mels = sd["conv_pre.weight"].shape[1]
    except KeyError as e:
        raise VocoderFileError(f"vocoder {path}: missing tensor {e.args[0]} (not a HiFT vocoder state dict)") from None
    return HiftConfig(in_channels=mels, base_channels=base, cond_channels=cond)


def check_state_dict(model: Vocoder, sd: Dict[str, torch.Tensor], path="vocoder") -> None:
    want = model.state_dict()
    missing = [k for k in want if k not in sd]
    extra = [k for k in sd if k not in want]
    bad = [f"{k} {tuple(sd[k].shape)} (expected {tuple(want[k].shape)})" for k in want
           if k in sd and tuple(sd[k].shape) != tuple(want[k].shape)]
    msgs = []
    if missing:
        msgs.append(f"{len(missing)} missing tensor(s): {', '.join(missing[:4])}")
    if extra:
        msgs.append(f"{len(extra)} unexpected tensor(s): {', '.join(extra[:4])}")
    if bad:
        msgs.append(f"misshaped: {', '.join(bad[:4])}")
    if msgs:
        raise VocoderFileError(f"vocoder {path}: " + "; ".join(msgs))
    for k, v in sd.items():
        if not bool(torch.isfinite(v).all()):
            raise VocoderFileError(f"vocoder {path}: tensor {k} has non-finite values")


def convert(src, dst) -> str:
    """hift.pt (weight-norm g/v pairs) -> a folded, checked `vocoder.safetensors`; returns dst."""
    from safetensors.torch import save_file

    sd = load_state_dict(src)
    m = Vocoder(config_from_state_dict(sd, src))
    check_state_dict(m, sd, src)
    save_file({k: v.contiguous() for k, v in sd.items()}, os.fspath(dst), metadata={"format": "pt"})
    return os.fspath(dst)
