"""Audio front end: decode a file, resample to 16 kHz, downmix, Whisper-style log-mel (MODEL.md §1.4).

- `read_audio(path) -> (wave (n, channels) fp32, sample_rate)`: wav / flac / ogg through soundfile, everything
  else (mp3, m4a, webm, ...) through PyAV. Integer PCM of 8/16/24/32 bits and float data are returned as fp32
  in [-1, 1) (soundfile's and FFmpeg's own scaling).
- `resample(wave, orig_sr, new_sr)`: the band-limited windowed-sinc resampler of the reference
  (torchaudio's `resample` with `sinc_interp_hann`, `lowpass_filter_width` 128, `rolloff` 0.99), written from
  its documented formula. For output sample n (rates reduced by their gcd):
      y[n] = sum_m x[m] * s * h((m / orig - n / new) * f_c),   f_c = min(orig, new) * rolloff,  s = f_c / orig
      h(t) = sinc(pi t) * cos(pi t / (2 W))^2 for |t| <= W (t clamped to [-W, W]),  W = lowpass width,
  with m running over [n*orig/new - w, n*orig/new + w + orig) (w = ceil(W * orig / f_c)) and x zero outside
  the signal; the output has ceil(new * len / orig) samples. Rates with a small reduced `orig` use the
  polyphase kernel table (one strided conv1d, as the reference); rates whose table would be huge (e.g.
  11111 Hz) evaluate the same formula per output block.
- `log_mel(wave16k, n_mels) -> (n_mels, frames)`: n_fft 400, hop 160, periodic Hann window, centred reflect-padded
  |STFT|^2 with the last frame dropped, Slaney mel filters (0-8 kHz, Slaney norm), log10(clamp 1e-10), floor at
  max - 8, (x + 4) / 4. As in the reference the piece is zero-padded to 30 s for the STFT and the max is taken
  over those 3000 frames; only the `valid = min(3000, samples // 160 + 1)` frames are returned.

torch only (no torchaudio); soundfile and av are imported when a file is read.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Tuple

import torch

N_FFT = 400
HOP = 160
SAMPLE_RATE = 16000
CHUNK_SECONDS = 30
CHUNK_SAMPLES = CHUNK_SECONDS * SAMPLE_RATE  # 480000: the reference pads each piece to this for the STFT
CHUNK_FRAMES = CHUNK_SAMPLES // HOP  # 3000 mel frames per 30 s piece
LOWPASS_WIDTH = 128
ROLLOFF = 0.99
MIN_RATE, MAX_RATE = 8000, 192000
_POLYPHASE_MAX_ELEMS = 1 << 22  # kernel table (new, taps) above this: evaluate per output block instead

_SOUNDFILE_EXT = (".wav", ".flac", ".ogg", ".oga", ".aiff", ".aif", ".au", ".caf", ".w64", ".rf64")


class DecodeError(ValueError):
    """A file that cannot be decoded as audio (the caller adds its name)."""


# ------------------------------------------------------------------------------------------------
# Decoding
# ------------------------------------------------------------------------------------------------

def _wav_shortfall(path: str) -> int:
    """Bytes missing from a RIFF/WAVE file's data chunk (0 when complete, not a WAV, or size left open)."""
    import struct

    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return 0
        size = f.seek(0, 2)
        pos = 12
        while pos + 8 <= size:
            f.seek(pos)
            cid, n = struct.unpack("<4sI", f.read(8))
            if cid == b"data":
                if n in (0, 0xFFFFFFFF):  # streamed writers leave the size open
                    return 0
                return max(0, pos + 8 + n - size)
            pos += 8 + n + (n & 1)
    return 0


def _read_soundfile(path: str):
    import soundfile as sf

    missing = _wav_shortfall(path)
    if missing:
        raise DecodeError(f"truncated: the WAV data chunk is {missing} bytes shorter than its header says")

    with sf.SoundFile(path) as f:
        frames_hdr = f.frames
        data = f.read(dtype="float32", always_2d=True)
        sr = f.samplerate
    if frames_hdr > 0 and data.shape[0] < frames_hdr:
        raise DecodeError(f"truncated: the header announces {frames_hdr} frames but only {data.shape[0]} could be read")
    return data, sr


def _read_pyav(path: str):
    import av
    import numpy as np

    try:
        container = av.open(path)
    except Exception as e:  # av raises its own error types (InvalidDataError, ...)
        raise DecodeError(f"not a readable audio file ({type(e).__name__}: {' '.join(str(e).split())[:120]})") from None
    with container:
        streams = [s for s in container.streams if s.type == "audio"]
        if not streams:
            raise DecodeError("has no audio stream")
        stream = streams[0]
        parts, sr, channels = [], stream.rate or stream.codec_context.sample_rate, None
        # fltp = planar fp32: (channels, samples) per frame; downmixing is done by the caller
        resampler = av.AudioResampler(format="fltp")
        try:
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    arr = out.to_ndarray()
                    channels = channels or arr.shape[0]
                    parts.append(arr[:channels])
                    sr = out.sample_rate
        except Exception as e:
            raise DecodeError(f"decoding failed ({type(e).__name__}: {' '.join(str(e).split())[:120]})") from None
    if not parts:
        return np.zeros((0, 1), dtype=np.float32), sr or 0
    return np.ascontiguousarray(np.concatenate(parts, axis=1).T.astype(np.float32)), sr


def read_audio(path: str) -> Tuple[torch.Tensor, int]:
    """Decode a file -> (wave (n, channels) fp32, sample rate). DecodeError (ValueError) if it cannot."""
    if path.lower().endswith(_SOUNDFILE_EXT):
        try:
            data, sr = _read_soundfile(path)
        except DecodeError:
            raise
        except Exception as e:  # soundfile.LibsndfileError, RuntimeError: try FFmpeg before giving up
            try:
                data, sr = _read_pyav(path)
            except DecodeError:
                raise DecodeError(f"not a readable audio file ({' '.join(str(e).split())[:120]})") from None
    else:
        data, sr = _read_pyav(path)
    return torch.from_numpy(data), int(sr)


def downmix(wave: torch.Tensor) -> torch.Tensor:
    """(n, channels) or (n,) -> (n,) fp32 mean over channels."""
    wave = wave.float()
    return wave.mean(dim=1) if wave.dim() == 2 else wave


# ------------------------------------------------------------------------------------------------
# Resampling
# ------------------------------------------------------------------------------------------------

def _sinc_hann(t: torch.Tensor, width: float) -> torch.Tensor:
    """h(t) of the module docstring for t already in units of the cut-off (fp64)."""
    t = t.clamp(-width, width)
    window = torch.cos(t * (math.pi / width / 2)) ** 2
    t = t * math.pi
    safe = torch.where(t == 0, torch.ones_like(t), t)
    return torch.where(t == 0, torch.ones_like(t), torch.sin(safe) / safe) * window


@lru_cache(maxsize=16)
def _polyphase_kernel(orig: int, new: int, width_taps: int, base: float) -> torch.Tensor:
    """(new, 1, 2 * width_taps + orig) fp32 table: row p holds the taps of output phase p."""
    idx = torch.arange(-width_taps, width_taps + orig, dtype=torch.float64)[None] / orig
    t = (torch.arange(0, -new, -1, dtype=torch.float64)[:, None] / new + idx) * base
    k = _sinc_hann(t, LOWPASS_WIDTH) * (base / orig)
    return k[:, None, :].float()


def resample(wave: torch.Tensor, orig_sr: int, new_sr: int = SAMPLE_RATE) -> torch.Tensor:
    """(n,) fp32 at orig_sr -> (ceil(n * new / orig),) fp32 at new_sr (module docstring formula)."""
    if orig_sr == new_sr:
        return wave.float()
    g = math.gcd(int(orig_sr), int(new_sr))
    orig, new = int(orig_sr) // g, int(new_sr) // g
    base = min(orig, new) * ROLLOFF
    w = int(math.ceil(LOWPASS_WIDTH * orig / base))
    n = wave.shape[-1]
    out_len = int(math.ceil(new * n / orig))
    x = wave.float().reshape(1, 1, n)
    if new * (2 * w + orig) <= _POLYPHASE_MAX_ELEMS:
        kernel = _polyphase_kernel(orig, new, w, base)
        xp = torch.nn.functional.pad(x, (w, w + orig))
        y = torch.nn.functional.conv1d(xp, kernel, stride=orig)  # (1, new, frames)
        return y[0].t().reshape(-1)[:out_len].contiguous()
    return _resample_direct(wave.float(), orig, new, w, base, out_len)


def _resample_direct(x: torch.Tensor, orig: int, new: int, w: int, base: float, out_len: int) -> torch.Tensor:
    """Same formula, evaluated block by block of outputs (for rate pairs whose polyphase table is huge)."""
    n = x.shape[0]
    taps = 2 * w + orig + 1
    out = torch.empty(out_len, dtype=torch.float32)
    xp = torch.nn.functional.pad(x, (w + 1, w + orig + 1))  # xp[m + w + 1] = x[m]
    block = max(1, (1 << 22) // taps)
    for s in range(0, out_len, block):
        nn_ = torch.arange(s, min(out_len, s + block), dtype=torch.int64)
        first = torch.div(nn_ * orig, new, rounding_mode="floor") - w  # lowest input index that can contribute
        m = first[:, None] + torch.arange(taps)[None]  # (B, taps) input indices
        t = (m.double() / orig - nn_[:, None].double() / new) * base
        k = (_sinc_hann(t, LOWPASS_WIDTH) * (base / orig)).float()
        idx = (m + w + 1).clamp(0, xp.shape[0] - 1)
        vals = xp[idx] * ((m >= 0) & (m < n))
        out[nn_] = (vals * k).sum(1)
    return out


# ------------------------------------------------------------------------------------------------
# Log-mel
# ------------------------------------------------------------------------------------------------

def _hz_to_mel(f):
    """Slaney mel scale: linear below 1 kHz, logarithmic above."""
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, math.log(6.4) / 27.0
    return torch.where(f >= min_log_hz, min_log_mel + torch.log(f.clamp(min=1e-10) / min_log_hz) / logstep, f / f_sp)


def _mel_to_hz(m):
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, math.log(6.4) / 27.0
    return torch.where(m >= min_log_mel, min_log_hz * torch.exp(logstep * (m - min_log_mel)), f_sp * m)


@lru_cache(maxsize=4)
def mel_filters(n_mels: int, n_fft: int = N_FFT, sr: int = SAMPLE_RATE, fmax: float = 8000.0) -> torch.Tensor:
    """(n_mels, n_fft // 2 + 1) fp32 Slaney-normalised triangular filters on the Slaney mel scale (fp64 math)."""
    fft_freqs = torch.linspace(0, sr / 2, n_fft // 2 + 1, dtype=torch.float64)
    mels = torch.linspace(float(_hz_to_mel(torch.tensor(0.0, dtype=torch.float64))),
                          float(_hz_to_mel(torch.tensor(fmax, dtype=torch.float64))), n_mels + 2, dtype=torch.float64)
    pts = _mel_to_hz(mels)  # (n_mels + 2,) filter edges in Hz
    diff = pts[1:] - pts[:-1]
    slopes = pts[None, :] - fft_freqs[:, None]  # (n_freq, n_mels + 2)
    down = -slopes[:, :-2] / diff[:-1]
    up = slopes[:, 2:] / diff[1:]
    fb = torch.clamp(torch.minimum(down, up), min=0.0)  # (n_freq, n_mels)
    fb = fb * (2.0 / (pts[2:] - pts[:-2]))[None, :]
    return fb.t().float().contiguous()


def valid_frames(samples: int) -> int:
    """Mel frames the reference keeps for a piece of `samples` 16 kHz samples."""
    return min(CHUNK_FRAMES, samples // HOP + 1)


def log_mel_padded(wave: torch.Tensor, n_mels: int) -> torch.Tensor:
    """One piece (n <= 480000 samples at 16 kHz) zero-padded to 30 s -> all 3000 frames (n_mels, 3000) fp32."""
    n = wave.shape[0]
    if n > CHUNK_SAMPLES:
        raise ValueError(f"log_mel: a piece holds at most {CHUNK_SAMPLES} samples (30 s), got {n}")
    x = torch.nn.functional.pad(wave.float(), (0, CHUNK_SAMPLES - n))
    window = torch.hann_window(N_FFT, periodic=True, dtype=torch.float32)
    spec = torch.stft(x, N_FFT, HOP, window=window, center=True, pad_mode="reflect", return_complex=True)
    power = spec[:, :-1].abs() ** 2  # (201, 3000)
    mel = mel_filters(n_mels) @ power
    logm = torch.clamp(mel, min=1e-10).log10()
    logm = torch.maximum(logm, logm.max() - 8.0)
    return (logm + 4.0) / 4.0


def log_mel(wave: torch.Tensor, n_mels: int) -> torch.Tensor:
    """One piece (n <= 480000 samples at 16 kHz) -> (n_mels, valid_frames(n)) fp32 (module docstring)."""
    return log_mel_padded(wave, n_mels)[:, :valid_frames(wave.shape[0])].contiguous()
