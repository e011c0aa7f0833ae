"""HiFT vocoder (omni_edge.vocoder) on a tiny random vocoder in the released layout.

The oracle is a plain-torch transcription of CosyVoice's HiFTGenerator.inference written here: it reads the
`hift.pt` g/v pairs itself (torch._weight_norm), runs SineGen with the phase and noise injected, the
reference's STFT / iSTFT calls and its layer order. Tolerance: both sides run the same fp32 ops in the same
order, so differences come from the weight-norm fold (one rounding per weight) and conv algorithm choice:
1e-5 absolute on a +-0.99 signal.
"""

import math
import os
import pickle

import pytest
import torch
import torch.nn.functional as F

from omni_edge.testing import write_tiny_vocoder
from omni_edge.vocoder import (RECEPTIVE_FRAMES, Vocoder, VocoderFileError, VocoderNoise, VocoderStream, convert,
                               end_fade)


@pytest.fixture(scope="module", autouse=True)
def _single_thread(one_thread):  # tests/conftest.py: tiny ops run single-threaded
    yield


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_tiny_vocoder(tmp_path_factory.mktemp("voc"), seed=3)


@pytest.fixture(scope="module")
def voc(files):
    return Vocoder.from_file(files[0])


def random_mel(t, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(80, t, generator=g) * 2 - 4  # log-mel-like range


# ------------------------------------------------------------------------------------------------
# The oracle
# ------------------------------------------------------------------------------------------------

def ref_vocode(pt_path, mel, phase, noise):
    sd = torch.load(pt_path, weights_only=True)

    def w(name):
        if name + ".weight_g" in sd:
            return torch._weight_norm(sd[name + ".weight_v"], sd[name + ".weight_g"], 0)
        return sd[name + ".weight"]

    def conv(name, x, **kw):
        return F.conv1d(x, w(name), sd[name + ".bias"], **kw)

    def snake(name, x):
        a = sd[name + ".alpha"].unsqueeze(0).unsqueeze(-1)
        return x + (1.0 / (a + 0.000000001)) * torch.pow(torch.sin(x * a), 2)

    def resblock(p, x, k):
        for j, d in enumerate([1, 3, 5]):
            xt = snake(f"{p}.activations1.{j}", x)
            xt = conv(f"{p}.convs1.{j}", xt, dilation=d, padding=int((k * d - d) / 2))
            xt = snake(f"{p}.activations2.{j}", xt)
            xt = conv(f"{p}.convs2.{j}", xt, padding=int((k - 1) / 2))
            x = xt + x
        return x

    x = mel[None]
    # f0 predictor
    h = x
    for i in range(5):
        h = F.elu(conv(f"f0_predictor.condnet.{2 * i}", h, padding=1))
    f0 = torch.abs((h.transpose(1, 2) @ sd["f0_predictor.classifier.weight"].t() + sd["f0_predictor.classifier.bias"])
                   .squeeze(-1))
    s = F.interpolate(f0[:, None], scale_factor=480, mode="nearest").transpose(1, 2)  # nn.Upsample(480)
    # SineGen
    f0s = s.transpose(1, 2)
    fmat = torch.zeros(1, 9, f0s.size(-1))
    for i in range(9):
        fmat[:, i:i + 1, :] = f0s * (i + 1) / 24000
    theta = 2 * math.pi * (torch.cumsum(fmat, dim=-1) % 1)
    sine = 0.1 * torch.sin(theta + phase.view(1, 9, 1))
    uv = (f0s > 10).type(torch.float32)
    amp = uv * 0.003 + (1 - uv) * 0.1 / 3
    sine = sine * uv + amp * noise[None]
    src = torch.tanh(sine.transpose(1, 2) @ sd["m_source.l_linear.weight"].t() + sd["m_source.l_linear.bias"])
    src = src.transpose(1, 2)
    # decode
    win = torch.hann_window(16, periodic=True)
    spec = torch.view_as_real(torch.stft(src.squeeze(1), 16, 4, 16, window=win, return_complex=True))
    s_stft = torch.cat([spec[..., 0], spec[..., 1]], dim=1)
    x = conv("conv_pre", x, padding=3)
    ups = [(8, 16), (5, 11), (3, 7)]
    downs = [dict(stride=15, padding=7), dict(stride=3, padding=1), {}]
    for i, (u, k) in enumerate(ups):
        x = F.leaky_relu(x, 0.1)
        x = F.conv_transpose1d(x, w(f"ups.{i}"), sd[f"ups.{i}.bias"], stride=u, padding=(k - u) // 2)
        if i == 2:
            x = F.pad(x, (1, 0), mode="reflect")
        si = resblock(f"source_resblocks.{i}", conv(f"source_downs.{i}", s_stft, **downs[i]), [7, 7, 11][i])
        x = x + si
        xs = None
        for j, kk in enumerate([3, 7, 11]):
            y = resblock(f"resblocks.{i * 3 + j}", x, kk)
            xs = y if xs is None else xs + y
        x = xs / 3
    x = conv("conv_post", F.leaky_relu(x), padding=3)
    mag = torch.clip(torch.exp(x[:, :9]), max=1e2)
    ph = torch.sin(x[:, 9:])
    out = torch.istft(torch.complex(mag * torch.cos(ph), mag * torch.sin(ph)), 16, 4, 16, window=win)
    return torch.clamp(out, -0.99, 0.99)[0]


# ------------------------------------------------------------------------------------------------
# Tests
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("t", [1, 2, 7, 53])
def test_matches_reference_and_counts(voc, files, t):
    mel = random_mel(t, seed=t)
    noise = VocoderNoise(t)
    phase, src_noise = noise.phase(), noise.take(0, 480 * t)
    assert phase[0] == 0 and -math.pi <= phase.min() and phase.max() <= math.pi
    got = voc(mel, phase=phase, source_noise=src_noise)
    want = ref_vocode(files[1], mel, phase, src_noise)
    assert got.shape == want.shape == (480 * t,)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert got.abs().max() <= 0.99 and got.std() > 1e-3  # a real signal, not silence


def test_pt_and_safetensors_and_convert_agree(files, tmp_path):
    a = Vocoder.from_file(files[1])
    out = convert(files[1], tmp_path / "v.safetensors")
    b = Vocoder.from_file(out)
    mel = random_mel(9, seed=1)
    wa, wb = a(mel, VocoderNoise(2)), b(mel, VocoderNoise(2))
    torch.testing.assert_close(wa, wb, atol=1e-6, rtol=0)
    assert "weight_g" not in " ".join(b.state_dict())


def test_noise_is_fixed_per_sample():
    n = VocoderNoise(5)
    whole = n.take(0, 60000)
    assert torch.equal(VocoderNoise(5).take(23990, 48100), whole[:, 23990:48100])
    assert torch.equal(VocoderNoise(5).phase(), n.phase())


@pytest.mark.parametrize("cuts", [[40, 41, 100, 130], [17, 18, 19, 90, 95, 130]])
def test_stream_equals_offline(voc, cuts):
    """Pushing a growing mel at arbitrary boundaries (unchanged frames): every seam exact, counts exact."""
    mel = random_mel(130, seed=4)
    offline = voc(mel, VocoderNoise(9))
    st = VocoderStream(voc, noise=VocoderNoise(9))
    parts = [st.push(mel[:, :c], final=(c == 130)) for c in cuts]
    stops = [max(0, c - RECEPTIVE_FRAMES) for c in cuts[:-1]] + [130]  # look-ahead held back until the end
    assert [p.shape[0] for p in parts] == [480 * (b - a) for a, b in zip([0] + stops[:-1], stops)]
    wave = torch.cat(parts)
    assert wave.shape == offline.shape == (130 * 480,)
    torch.testing.assert_close(wave, offline, atol=1e-5, rtol=0)


def test_receptive_field(voc):
    """Changing mel frame j changes no sample farther than RECEPTIVE_FRAMES frames from it (what makes the
    streaming windows exact)."""
    mel = random_mel(90, seed=6)
    a = voc(mel, VocoderNoise(1))
    mel2 = mel.clone()
    mel2[:, 45] += 3.0
    b = voc(mel2, VocoderNoise(1))
    changed = ((a - b).abs() > 0).nonzero().flatten()
    lo, hi = changed.min().item() // 480, changed.max().item() // 480
    assert 45 - RECEPTIVE_FRAMES <= lo and hi <= 45 + RECEPTIVE_FRAMES


def test_end_fade():
    w = torch.ones(2000)
    f = end_fade(w)
    assert torch.equal(f[:1040], w[:1040]) and f[-1] == 0 and (f[1040:].diff() <= 0).all()


# -- bad files ------------------------------------------------------------------------------------

class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_bad_files_refused(files, tmp_path):
    sd = torch.load(files[1], weights_only=True)
    cases = {}
    torch.save([1, 2, 3], tmp_path / "list.pt"); cases["list.pt"] = "expected a state dict"
    torch.save({k: v for k, v in sd.items() if not k.startswith("conv_post.")}, tmp_path / "missing.pt")
    cases["missing.pt"] = "missing tensor"
    bad = dict(sd)
    bad["m_source.l_linear.weight"] = torch.zeros(1, 5)
    torch.save(bad, tmp_path / "shape.pt"); cases["shape.pt"] = r"misshaped: m_source.l_linear.weight \(1, 5\)"
    with open(tmp_path / "code.pt", "wb") as f:
        pickle.dump({"conv_pre.weight": _Evil()}, f)
    cases["code.pt"] = "weights-only"
    (tmp_path / "trunc.safetensors").write_bytes(open(files[0], "rb").read()[:100])
    cases["trunc.safetensors"] = "not a readable safetensors"
    extra = dict(sd)
    extra["junk"] = torch.zeros(1)
    torch.save(extra, tmp_path / "extra.pt"); cases["extra.pt"] = "unexpected tensor"
    nan = dict(sd)
    nan["conv_pre.bias"] = torch.full_like(sd["conv_pre.bias"], float("nan"))
    torch.save(nan, tmp_path / "nan.pt"); cases["nan.pt"] = "non-finite"
    for name, msg in cases.items():
        with pytest.raises(VocoderFileError, match=msg) as e:
            Vocoder.from_file(tmp_path / name)
        assert name in str(e.value)
    with pytest.raises(VocoderFileError, match="no file"):
        Vocoder.from_file(tmp_path / "absent.pt")
