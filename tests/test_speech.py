"""Speech decode chain (omni_edge.speech, omni_edge.flow) on the tiny checkpoint.

The oracle is a plain-torch transcription of the reference formulation, written here from the checkpoint
tensors by name: masks multiplied in, the additive chunk bias (finfo.min) of `mask_to_bias`, the two CFG passes
run one after the other at batch 1, the Euler loop exactly as ConditionalCFM.solve_euler, the RVQ sum layer 7
first. Tolerances: fp32 runs differ only by summation order inside GEMMs / attention kernels (~1e-6 relative
per op); through 10 Euler steps x 2 passes of a random U-Net that grows to ~1e-4 absolute on unit-scale mels,
so fp32 checks use atol 2e-4. bf16 runs round every op to 8 bits; they are compared at the error of a bf16 run
of the same oracle against fp32 (2x, the STYLE.md rule), not at a fixed number.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from omni_edge.checkpoint import Checkpoint
from omni_edge.speech import (JOIN_SAMPLES, NoiseBuffer, SpeechDecoder, SpeechError, SpeechStream, decode_clause,
                              mel_frames, wave_concat)
from omni_edge.vocoder import Vocoder

DEC = "audio_tokenizer.audio_decoder."
RVQ = "audio_tokenizer.audio_bridge_model."
PRE = "audio_tokenizer.audio_flow_matching_decoder.prenet."
EST = "audio_tokenizer.audio_flow_matching_decoder.conditional_decoder."


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny shapes: threads only add contention on a shared machine
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def ckpt(tiny_omni_bytelevel):
    return Checkpoint.open(tiny_omni_bytelevel)


@pytest.fixture(scope="module")
def speech(ckpt):
    return SpeechDecoder.from_checkpoint(ckpt, ckpt.config, backend="torch")


@pytest.fixture(scope="module")
def vocoder(tmp_path_factory):
    from omni_edge.testing import write_tiny_vocoder
    st, _ = write_tiny_vocoder(tmp_path_factory.mktemp("voc"))
    return Vocoder.from_file(st)


@pytest.fixture(scope="module")
def weights(ckpt):
    names = [n for s in ("rvq", "audio_decoder", "flow_prenet", "flow_estimator") for n in ckpt.stage(s)]
    return {n: ckpt.get(n, dtype=torch.float32) for n in names}


def random_codes(sizes, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randint(0, s, (n,), generator=g) for s in sizes], 1)


# ------------------------------------------------------------------------------------------------
# The oracle
# ------------------------------------------------------------------------------------------------

def ref_layer(W, p, x, heads, rms):
    """OmniWhisperTransformerLayer on one unpacked sequence x (T, d); causal attention."""
    def norm(name, h):
        if rms:
            var = h.float().pow(2).mean(-1, keepdim=True)
            y = h * torch.rsqrt(var + 1e-6)
            if W[name + ".weight"].dtype in (torch.float16, torch.bfloat16):
                y = y.to(W[name + ".weight"].dtype)
            return W[name + ".weight"] * y
        return F.layer_norm(h, h.shape[-1:], W[name + ".weight"], W[name + ".bias"], 1e-5)

    t, d = x.shape
    hd = d // heads
    h = norm(p + "self_attn_layer_norm", x)
    q = (h @ W[p + "self_attn.q_proj.weight"].t() + W[p + "self_attn.q_proj.bias"]).view(t, heads, hd)
    k = (h @ W[p + "self_attn.k_proj.weight"].t()).view(t, heads, hd)
    v = (h @ W[p + "self_attn.v_proj.weight"].t() + W[p + "self_attn.v_proj.bias"]).view(t, heads, hd)
    s = torch.einsum("qhd,khd->hqk", q.float(), k.float()) / math.sqrt(hd)
    s = s.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf"))
    o = torch.einsum("hqk,khd->qhd", s.softmax(-1), v.float()).reshape(t, d).to(x.dtype)
    x = x + o @ W[p + "self_attn.out_proj.weight"].t() + W[p + "self_attn.out_proj.bias"]
    h = norm(p + "final_layer_norm", x)
    h = F.gelu(h @ W[p + "fc1.weight"].t() + W[p + "fc1.bias"]) @ W[p + "fc2.weight"].t() + W[p + "fc2.bias"]
    return x + h


def ref_mu(W, cfg, codes):
    a, fm = cfg.audio, cfg.flow_matching
    dt = W[DEC + "layer_norm.weight"].dtype
    emb = 0
    for i in range(codes.shape[1] - 1, -1, -1):  # layer 7 first, fp32
        emb = emb + W[f"{RVQ}vq_list.{i}.codebook.embed"].float()[codes[:, i]]
    emb = emb.to(dt) @ W[RVQ + "proj_decoder.weight"].t() + W[RVQ + "proj_decoder.bias"]
    x = F.conv_transpose1d(emb.t()[None], W[DEC + "dconv1.conv.weight"], W[DEC + "dconv1.conv.bias"], stride=4)
    x = F.group_norm(x, 1, W[DEC + "dconv1.norm.weight"], W[DEC + "dconv1.norm.bias"])[0].t()
    assert x.shape[0] == (codes.shape[0] - 1) * 4 + 3
    h = (x.float() + W[DEC + "positional_embedding"][:x.shape[0]].float()).to(dt)
    for n in range(a.decoder_layers):
        h = ref_layer(W, f"{DEC}layers.{n}.", h, a.decoder_attention_heads, rms=False)
    h = F.layer_norm(h, h.shape[-1:], W[DEC + "layer_norm.weight"], W[DEC + "layer_norm.bias"])
    h = F.interpolate(h.float().t()[None], size=h.shape[0], mode="nearest")[0].t().to(dt)  # ratio 1.0
    h = F.silu(h @ W[PRE + "in_mlp.0.weight"].t() + W[PRE + "in_mlp.0.bias"])
    h = h @ W[PRE + "in_mlp.2.weight"].t() + W[PRE + "in_mlp.2.bias"]
    for n in range(fm.prenet_nlayers):
        h = ref_layer(W, f"{PRE}transformer_layers.{n}.", h, fm.prenet_attention_heads, rms=True)
    var = h.float().pow(2).mean(-1, keepdim=True)
    y = h * torch.rsqrt(var + 1e-6)
    if dt != torch.float32:
        y = y.to(dt)
    h = W[PRE + "final_norm.weight"] * y
    return (h @ W[PRE + "out_proj.weight"].t()).float().to(dt).t()  # (80, T)


def ref_estimator(W, cfg, x, mask, mu, t):
    """ConditionalDecoder.forward at batch 1: x, mu (1, 80, T), mask (1, 1, T), t a 0-d tensor."""
    fm = cfg.flow_matching
    heads, hd = fm.num_heads, fm.attention_head_dim

    def conv(name, h, pad_left):
        return F.conv1d(F.pad(h, (pad_left, 0)), W[name + ".weight"], W[name + ".bias"])

    def cblock(p, h, m):
        h = conv(p + "block.0", h * m, 2)
        h = F.layer_norm(h.transpose(1, 2), h.shape[1:2], W[p + "block.2.weight"], W[p + "block.2.bias"])
        h = h.transpose(1, 2)
        return F.mish(h) * m

    def resnet(p, h, m, temb):
        y = cblock(p + "block1.", h, m)
        y = y + (F.mish(temb) @ W[p + "mlp.1.weight"].t() + W[p + "mlp.1.bias"]).unsqueeze(-1)
        y = cblock(p + "block2.", y, m)
        return y + conv(p + "res_conv", h * m, 0)

    def tblock(p, h, bias):  # h (1, T, C)
        b, n, c = h.shape
        y = F.layer_norm(h, (c,), W[p + "norm1.weight"], W[p + "norm1.bias"])
        q, k, v = (torch.matmul(y, W[f"{p}attn1.to_{z}.weight"].t()).view(b, n, heads, hd).transpose(1, 2)
                   for z in "qkv")
        s = q @ k.transpose(-1, -2) * hd ** -0.5 + bias
        o = (s.softmax(-1) @ v).transpose(1, 2).reshape(b, n, heads * hd)
        h = h + o @ W[p + "attn1.to_out.0.weight"].t() + W[p + "attn1.to_out.0.bias"]
        y = F.layer_norm(h, (c,), W[p + "norm3.weight"], W[p + "norm3.bias"])
        y = F.gelu(y @ W[p + "ff.net.0.proj.weight"].t() + W[p + "ff.net.0.proj.bias"])
        return h + y @ W[p + "ff.net.2.weight"].t() + W[p + "ff.net.2.bias"]

    half = (fm.in_channels * 2) // 2
    freq = torch.exp(torch.arange(half).float() * -(math.log(10000) / (half - 1)))
    e = (1000 * t.unsqueeze(0)).unsqueeze(1) * freq.unsqueeze(0)
    temb = torch.cat([e.sin(), e.cos()], -1).to(x.dtype)
    temb = F.silu(temb @ W[EST + "time_mlp.linear_1.weight"].t() + W[EST + "time_mlp.linear_1.bias"])
    temb = temb @ W[EST + "time_mlp.linear_2.weight"].t() + W[EST + "time_mlp.linear_2.bias"]
    h = torch.cat([x, mu], 1)
    m = mask.to(x.dtype)
    n = x.shape[-1]
    pos = torch.arange(n)
    allowed = pos[None, :] < ((pos // 100 + 1) * 100)[:, None]
    allowed = m.bool()[:, 0, None, :] & allowed[None]  # add_optional_chunk_mask: masks & chunk mask
    bias = ((1.0 - allowed.to(x.dtype)) * torch.finfo(x.dtype).min).unsqueeze(1)  # mask_to_bias, per head

    def tblocks(p, h):
        h = h.transpose(1, 2)
        for j in range(fm.n_blocks):
            h = tblock(f"{p}1.{j}.", h, bias)
        return h.transpose(1, 2)

    h = tblocks(EST + "down_blocks.0.", resnet(EST + "down_blocks.0.0.", h, m, temb))
    skip = h
    h = conv(EST + "down_blocks.0.2", h * m, 2)
    for i in range(fm.num_mid_blocks):
        h = tblocks(f"{EST}mid_blocks.{i}.", resnet(f"{EST}mid_blocks.{i}.0.", h, m, temb))
    h = torch.cat([h[:, :, :skip.shape[-1]], skip], 1)
    h = tblocks(EST + "up_blocks.0.", resnet(EST + "up_blocks.0.0.", h, m, temb))
    h = conv(EST + "up_blocks.0.2", h * m, 2)
    h = cblock(EST + "final_block.", h, m)
    return conv(EST + "final_proj", h * m, 0) * m


def ref_mel(W, cfg, codes, z):
    mu = ref_mu(W, cfg, codes)[None]
    mask = torch.ones(1, 1, mu.shape[-1])
    t_span = torch.linspace(0, 1, 11)
    t_span = (1 - torch.cos(t_span * 0.5 * torch.pi)).to(mu.dtype)
    x = z.to(mu.dtype)[None]
    t, dt = t_span[0], t_span[1] - t_span[0]
    for step in range(1, 11):
        v = ref_estimator(W, cfg, x, mask, mu, t)
        v0 = ref_estimator(W, cfg, x, mask, torch.zeros_like(mu), t)
        v = (1.0 + 0.7) * v - 0.7 * v0
        x = x + dt * v
        t = t + dt
        if step < 10:
            dt = t_span[step + 1] - t
    return x[0].float()


# ------------------------------------------------------------------------------------------------
# Tests
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 7, 29])
def test_mu_matches_reference(speech, weights, ckpt, n):
    codes = random_codes(speech.codebook_sizes, n, seed=n)
    got = speech.mu(codes)
    want = ref_mu(weights, ckpt.config, codes)
    assert got.shape == (80, mel_frames(n)) == want.shape
    torch.testing.assert_close(got, want, atol=5e-5, rtol=1e-4)


def test_estimator_matches_reference_across_chunks(speech, weights, ckpt):
    g = torch.Generator().manual_seed(1)
    t_len = 237  # three chunks, the last partial
    x, mu = torch.randn(1, 80, t_len, generator=g), torch.randn(1, 80, t_len, generator=g)
    t = torch.tensor(0.37)
    got = speech.estimator(x, mu, t.reshape(1))
    want = ref_estimator(weights, ckpt.config, x, torch.ones(1, 1, t_len), mu, t)
    torch.testing.assert_close(got, want, atol=5e-5, rtol=1e-4)
    # chunk-causal: frames of the first chunk ignore everything after frame 100, and see all of frames < 100
    x2 = x.clone()
    x2[..., 150:] += 1.0
    got2 = speech.estimator(x2, mu, t.reshape(1))
    assert torch.equal(got2[..., :100], got[..., :100])
    x3 = x.clone()
    x3[..., 99] += 1.0
    assert not torch.allclose(speech.estimator(x3, mu, t.reshape(1))[..., 0], got[..., 0])


def test_mel_matches_reference_fp32(speech, weights, ckpt):
    codes = random_codes(speech.codebook_sizes, 30, seed=3)  # 119 frames: crosses a chunk boundary
    z = NoiseBuffer(5).take(0, mel_frames(30))
    got = speech.mel(codes, z)
    want = ref_mel(weights, ckpt.config, codes, z)
    assert got.dtype == torch.float32 and got.shape == (80, 119)
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)


@pytest.mark.slow
def test_mel_matches_reference_bf16(ckpt, weights):
    speech16 = SpeechDecoder.from_checkpoint(ckpt, ckpt.config, dtype=torch.bfloat16, backend="torch")
    w16 = {k: (v if "codebook" in k else v.to(torch.bfloat16)) for k, v in weights.items()}
    codes = random_codes(speech16.codebook_sizes, 12, seed=4)
    z = NoiseBuffer(6).take(0, mel_frames(12))
    got = speech16.mel(codes, z)
    want = ref_mel(w16, ckpt.config, codes, z)
    exact = ref_mel(weights, ckpt.config, codes, z)
    bound = (want - exact).abs().max().item()
    assert (got - want).abs().max().item() <= 2 * bound + 1e-6, "bf16 run drifts further than a bf16 oracle"
    # the bf16 time grid is the rounded one (MODEL.md §1.10)
    from omni_edge.flow import time_grid
    assert abs(float(time_grid(10, torch.bfloat16)[1]) - 0.01233) < 5e-5


def test_noise_buffer_is_fixed_per_frame():
    a = NoiseBuffer(3).take(0, 250)
    b = NoiseBuffer(3)
    assert torch.equal(b.take(120, 180), a[:, 120:180])
    assert torch.equal(b.take(0, 40), a[:, :40])
    assert not torch.equal(NoiseBuffer(4).take(0, 40), a[:, :40])


def test_bad_codes(speech):
    with pytest.raises(SpeechError, match=r"codes\[1, 0\] = 64 is outside \[0, 64\)"):
        speech.mel(torch.tensor([[0] * 8, [64, 0, 0, 0, 0, 0, 0, 0]]))
    with pytest.raises(SpeechError, match=r"expected shape \(N, 8\)"):
        speech.mel(torch.zeros(3, 7, dtype=torch.long))
    with pytest.raises(SpeechError, match="1 to 750 frames"):
        speech.mel(torch.zeros(751, 8, dtype=torch.long))
    with pytest.raises(SpeechError, match="integer"):
        speech.mel(torch.zeros(3, 8))
    with pytest.raises(SpeechError, match="at least 11 frames"):
        speech.mel(torch.zeros(3, 8, dtype=torch.long), torch.zeros(80, 10))


def _clause_stats(speech, codes):
    full = speech.decoder.norm_stats(speech.decoder.upsample(speech.embed(codes), mel_frames(codes.shape[0])))
    return lambda prefix: full


def _stream(speech, vocoder, clauses, **kw):
    chunks = []
    s = SpeechStream(speech, vocoder, chunks.append, **kw)
    for c in clauses:
        for frame in c:
            s.push(frame)
        s.end_clause()
    return chunks, s


def test_stream_equals_offline_with_clause_statistics(speech, vocoder):
    """With the GroupNorm statistics pinned to the clause's, emitting on chunk boundaries reproduces the
    offline decode: same sample count, same samples to fp32 rounding (1e-5 on a +-0.99 signal)."""
    codes = random_codes(speech.codebook_sizes, 57, seed=7)  # 227 frames: 2 chunk-boundary decodes + the end
    chunks, s = _stream(speech, vocoder, [codes], first_codes=None, norm_stats=_clause_stats(speech, codes))
    assert [c.shape[0] for c in chunks] == [(100 - 16) * 480, 100 * 480, (27 + 16) * 480]
    wave = torch.cat(chunks)
    offline = decode_clause(speech, vocoder, codes)
    assert wave.shape[0] == offline.shape[0] == 480 * mel_frames(57) == s.samples_out
    torch.testing.assert_close(wave, offline, atol=1e-5, rtol=0)


def test_stream_preview_then_exact(speech, vocoder):
    """A preview after 10 codes: only the preview samples (and the 240-sample cross-fade after them) differ
    from the offline decode; every later sample matches it, and the count is exact."""
    codes = random_codes(speech.codebook_sizes, 40, seed=8)
    chunks, _ = _stream(speech, vocoder, [codes], first_codes=10, norm_stats=_clause_stats(speech, codes))
    first = chunks[0].shape[0]
    assert first == (39 - 16) * 480  # 0.46 s of audio after 0.8 s of codes (39 frames less the look-ahead)
    wave, offline = torch.cat(chunks), decode_clause(speech, vocoder, codes)
    assert wave.shape == offline.shape
    torch.testing.assert_close(wave[first + 240:], offline[first + 240:], atol=1e-5, rtol=0)


def test_stream_default_pins_first_statistics(speech, vocoder):
    """Default streaming pins the GroupNorm statistics at the first decode (the first 10 codes): the stream
    equals the offline decode with those statistics (same count; after the preview seam and its 240-sample
    cross-fade, the same samples to fp32 rounding, 1e-5 on a +-0.99 signal)."""
    codes = random_codes(speech.codebook_sizes, 57, seed=9)
    chunks, s = _stream(speech, vocoder, [codes])
    first10 = _clause_stats(speech, codes[:10])(None)
    torch.testing.assert_close(torch.stack(s.stats_history[0]), torch.stack(first10), atol=0, rtol=0)
    wave = torch.cat(chunks)
    offline = decode_clause(speech, vocoder, codes, stats=first10)
    assert wave.shape == offline.shape and wave.shape[0] == 480 * mel_frames(57)
    start = chunks[0].shape[0] + 240
    torch.testing.assert_close(wave[start:], offline[start:], atol=1e-5, rtol=0)
    assert torch.isfinite(wave).all() and wave.abs().max() <= 0.99


def test_pinned_statistics_vs_whole_clause(speech):
    """What pinning costs against the reference's whole-clause statistics, on the mel: stated bound mean
    |diff| under 10% of the mean |mel| on these random weights (measured 2-4%; with trained weights the
    statistics of 0.8 s of speech and of the clause are closer than for random codes)."""
    codes = random_codes(speech.codebook_sizes, 50, seed=0)
    full = speech.mel(codes, NoiseBuffer(0))
    pinned = speech.mel(codes, NoiseBuffer(0), stats=_clause_stats(speech, codes[:10])(None))
    assert pinned.shape == full.shape
    assert (pinned - full).abs().mean() < 0.10 * full.abs().mean()


def test_stream_clause_mode_is_the_reference(speech, vocoder):
    """norm_stats="clause": nothing before the EOS, then exactly the offline whole-clause decode."""
    codes = random_codes(speech.codebook_sizes, 30, seed=14)
    chunks = []
    s = SpeechStream(speech, vocoder, chunks.append, norm_stats="clause")
    for frame in codes:
        s.push(frame)
    assert chunks == []
    s.end_clause()
    torch.testing.assert_close(torch.cat(chunks), decode_clause(speech, vocoder, codes), atol=1e-5, rtol=0)
    with pytest.raises(SpeechError, match="norm_stats"):
        SpeechStream(speech, vocoder, lambda c: None, norm_stats="prefix")


def test_stream_decodes_each_frame_once(speech, vocoder):
    """The cost of a streamed clause: every mel frame integrated once, plus the preview's 39 frames (chunk
    caches instead of re-running the clause so far); the caches are dropped with the clause."""
    codes = random_codes(speech.codebook_sizes, 57, seed=15)
    _, s = _stream(speech, vocoder, [codes], first_codes=10)
    assert s.cfm_frames == mel_frames(57) + mel_frames(10)
    _, s = _stream(speech, vocoder, [codes], first_codes=None)
    assert s.cfm_frames == mel_frames(57)
    assert s.cache_bytes > 0 and s._cfm.nbytes() == 0
    want, _ = _stream(speech, vocoder, [codes[:30]])
    got, s = _stream(speech, vocoder, [codes[:30]], cache="inputs")
    torch.testing.assert_close(torch.cat(got), torch.cat(want), atol=1e-5, rtol=0)
    with pytest.raises(SpeechError, match="cache"):
        SpeechStream(speech, vocoder, lambda c: None, cache="none")


def test_chunked_cfm_equals_one_masked_pass(speech):
    """CfmStream (chunk by chunk, K/V and conv caches per Euler step) against one pass per step over the whole
    clause (cfm_solve; its attention chunk by chunk, which equals the reference's masked attention: see
    test_estimator_matches_reference_across_chunks): same values up to fp32 summation order (atol 1e-5 on
    unit-scale mels)."""
    from omni_edge.flow import cfm_solve

    g = torch.Generator().manual_seed(3)
    t = 237  # three chunks, the last partial
    mu, z = torch.randn(1, 80, t, generator=g), torch.randn(1, 80, t, generator=g)
    one = cfm_solve(speech.estimator, mu, z)
    cs = speech.cfm_stream()
    a = cs.run(mu[..., :100], z[..., :100])
    with pytest.raises(ValueError, match="one chunk"):  # a preview spans at most the current chunk
        cs.run(mu[..., 100:237], z[..., 100:237], keep=False)
    p = cs.run(mu[..., 100:130], z[..., 100:130], keep=False)  # a preview changes nothing kept
    assert cs.done == 100 and p.shape[-1] == 30
    b = cs.run(mu[..., 100:], z[..., 100:])  # split at the chunk boundary 200 inside
    assert cs.done == 237
    torch.testing.assert_close(torch.cat([a, b], -1), one, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="ended"):  # kept frames ended mid-chunk: the clause is over
        cs.run(mu[..., :5], z[..., :5])
    ci = speech.cfm_stream(cache="inputs")  # layer inputs kept, K/V recomputed: same values, less memory
    c = torch.cat([ci.run(mu[..., :100], z[..., :100]), ci.run(mu[..., 100:200], z[..., 100:200])], -1)
    kv = speech.cfm_stream(cache="kv")
    kv.run(mu[..., :200], z[..., :200])
    attn = [m for m in speech.estimator.modules() if type(m).__name__ == "_Attention"]
    inner, dim = attn[0].heads * attn[0].head_dim, attn[0].to_q.in_features
    assert kv.nbytes() - ci.nbytes() == len(attn) * 10 * 2 * 200 * (2 * inner - dim) * 4  # steps, passes, fp32
    c = torch.cat([c, ci.run(mu[..., 200:], z[..., 200:])], -1)
    torch.testing.assert_close(c, one, atol=1e-5, rtol=0)
    # the offline decode is that one pass per step
    torch.testing.assert_close(speech.cfm(mu, z), one, atol=0, rtol=0)


def test_fast_mish_equals_torch_mish():
    """flow.mish (one exp) against F.mish over the whole fp32 range, extremes included: 4e-7 relative."""
    from omni_edge.flow import mish

    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(20000, generator=g) * 6, torch.linspace(-120, 120, 4801),
                   torch.tensor([-1e30, -200.0, -88.0, -20.0, -1e-8, 0.0, 1e-8, 19.99, 20.0, 20.01, 88.0, 1e30])])
    want = F.mish(x)
    got = mish(x)
    assert torch.isfinite(got).all()
    assert ((got - want).abs() <= 4e-7 * want.abs() + 1e-30).all(), float((got - want).abs().max())
    xb = x.to(torch.bfloat16)  # other dtypes: torch's own
    assert torch.equal(mish(xb), F.mish(xb))


def test_incremental_decoder_equals_offline(speech, vocoder):
    """Decoder + prenet fed 10, then 7, then 1, then 15 codes (K/V caches, the bias-only frame between
    pushes) give the offline mu with the same statistics (atol 1e-5)."""
    codes = random_codes(speech.codebook_sizes, 33, seed=16)
    stats = _clause_stats(speech, codes[:10])(None)
    want = speech.mu(codes, stats=stats)
    s = SpeechStream(speech, vocoder, lambda c: None)
    s.stats = stats
    parts = [s._extend_mu(codes[a:b]) for a, b in ((0, 10), (10, 17), (17, 18), (18, 33))]
    got = torch.cat(parts, -1)[0]
    assert got.shape == want.shape == (80, mel_frames(33))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_clauses_join_like_wave_concat(speech, vocoder):
    a = random_codes(speech.codebook_sizes, 9, seed=10)
    b = random_codes(speech.codebook_sizes, 14, seed=11)
    stats = {id(a): _clause_stats(speech, a), id(b): _clause_stats(speech, b)}
    chunks, s = [], None
    s = SpeechStream(speech, vocoder, chunks.append, first_codes=None)
    for c in (a, b):
        s.norm_stats = stats[id(c)]
        for frame in c:
            s.push(frame)
        s.end_clause()
    want = wave_concat([decode_clause(speech, vocoder, a, seed=0), decode_clause(speech, vocoder, b, seed=1)])
    wave = torch.cat(chunks)
    assert wave.shape[0] == want.shape[0] == 480 * (mel_frames(9) + mel_frames(14)) + JOIN_SAMPLES
    torch.testing.assert_close(wave, want, atol=1e-5, rtol=0)


def test_push_rejects_bad_frames(speech, vocoder):
    s = SpeechStream(speech, vocoder, lambda c: None)
    with pytest.raises(SpeechError, match="one frame of 8 codes"):
        s.push(torch.zeros(7, dtype=torch.long))
    with pytest.raises(SpeechError, match="outside"):
        s.push(torch.tensor([64, 0, 0, 0, 0, 0, 0, 0]))


def test_small_hop_previews(speech, vocoder):
    """hop_codes below a chunk: every decode before the clause end is a preview; counts stay exact and the
    samples after the last revised seam (plus its cross-fade) equal the offline decode."""
    codes = random_codes(speech.codebook_sizes, 20, seed=12)
    chunks, s = _stream(speech, vocoder, [codes], first_codes=4, hop_codes=6, norm_stats=_clause_stats(speech, codes))
    assert len(chunks) == 4  # decodes at 4 (16 frames: all held back as vocoder look-ahead), 6, 12, 18, end
    wave, offline = torch.cat(chunks), decode_clause(speech, vocoder, codes)
    assert wave.shape == offline.shape
    last = wave.shape[0] - chunks[-1].shape[0]
    torch.testing.assert_close(wave[last + 240:], offline[last + 240:], atol=1e-5, rtol=0)
    with pytest.raises(SpeechError, match="hop_codes"):
        SpeechStream(speech, vocoder, lambda c: None, hop_codes=0)


def test_stream_decode_clause_uses_the_clause_seed(speech, vocoder):
    codes = random_codes(speech.codebook_sizes, 6, seed=13)
    s = SpeechStream(speech, vocoder, lambda c: None, seed=5)
    torch.testing.assert_close(s.decode_clause(codes), decode_clause(speech, vocoder, codes, seed=5), atol=0, rtol=0)
    for frame in codes:
        s.push(frame)
    s.end_clause()
    torch.testing.assert_close(s.decode_clause(codes), decode_clause(speech, vocoder, codes, seed=6), atol=0, rtol=0)


def test_stream_with_an_opaque_estimator_reruns_the_clause(speech, vocoder, monkeypatch):
    """An estimator that takes no caches (an ONNX session) streams by re-running the clause so far at each
    decode: same decode points, same pinned statistics, same samples after the preview seam (1e-5)."""
    codes = random_codes(speech.codebook_sizes, 30, seed=17)
    want, s_inc = _stream(speech, vocoder, [codes])
    monkeypatch.setitem(speech.__dict__, "estimator_fn", lambda x, mu, t: speech.estimator(x, mu, t))
    assert not speech.incremental
    got, s = _stream(speech, vocoder, [codes])
    assert [c.shape[0] for c in got] == [c.shape[0] for c in want]
    assert s.cfm_frames == mel_frames(10) + mel_frames(26) + mel_frames(30)  # the clause so far, each time
    torch.testing.assert_close(torch.stack(s.stats_history[0]), torch.stack(s_inc.stats_history[0]), atol=0, rtol=0)
    start = got[0].shape[0] + 240
    torch.testing.assert_close(torch.cat(got)[start:], torch.cat(want)[start:], atol=1e-5, rtol=0)


def test_fused_qkv_follows_weight_changes():
    """The stacked q/k/v weight is rebuilt when a weight is written in place (load_state_dict) and works for
    modules built under inference mode (no version counter); compared with separate projections (1e-6)."""
    from omni_edge.flow import _Attention

    torch.manual_seed(0)
    with torch.inference_mode():
        a = _Attention(16, 2, 8)
        x = torch.randn(2, 5, 16)
        y = a(x, None)
    b = _Attention(16, 2, 8)
    b.load_state_dict(a.state_dict())
    x = x.clone()

    def separate(m):
        q, k, v = (p(x).view(2, 5, 2, 8).transpose(1, 2) for p in (m.to_q, m.to_k, m.to_v))
        return m.to_out[0](F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, 5, 16))

    with torch.no_grad():
        torch.testing.assert_close(b(x, None), y, atol=1e-6, rtol=0)
        b(x, None)
        b.load_state_dict({k: v * 2 if k.endswith("to_k.weight") else v for k, v in a.state_dict().items()})
        torch.testing.assert_close(b(x, None), separate(b), atol=1e-6, rtol=0)
