"""The audio head (omni_edge/audio_head.py) against a plain re-implementation of the reference.

The reference below is written the way the original code computes it: `nn.MultiheadAttention` with the stored
in_proj/out_proj tensors and a causal mask, the FFN weights reshaped to (2C, 8, C) / (C, 8, 2C) and contracted
with einsum over all 8 slots, the slot inputs as a cumulative sum of the stacked embedding rows, and a decode loop
that re-runs the whole 8-slot head for each of the 8 codes with the codes not chosen yet left at 0.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from omni_edge.audio_head import (AUDIO_SAMPLING, AudioCodeSampler, AudioHead, CodeError, embed_codes)
from omni_edge.checkpoint import Checkpoint
from omni_edge.generate import SamplingParams


# ---- the plain reference ---------------------------------------------------------------------------

def ref_rms(x, w, eps=1e-6):
    var = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
    x = x * torch.rsqrt(var + eps)
    if w.dtype in (torch.float16, torch.bfloat16):
        x = x.to(w.dtype)
    return w * x


class RefHead:
    def __init__(self, cfg, tensors, dtype):
        self.c = c = cfg.backbone.hidden_size
        self.cbs = list(cfg.audio.codebook_sizes)
        t = {k: v.to(dtype) for k, v in tensors.items()}
        self.t = t
        self.layers = []
        for n in range(cfg.audio.audio_head_transformer_layers):
            p = f"audio_head.transformer_layers.{n}."
            mha = torch.nn.MultiheadAttention(c, c // 128, batch_first=True).to(dtype).eval()
            with torch.no_grad():
                mha.in_proj_weight.copy_(t[p + "self_attention.in_proj_weight"])
                mha.in_proj_bias.copy_(t[p + "self_attention.in_proj_bias"])
                mha.out_proj.weight.copy_(t[p + "self_attention.out_proj.weight"])
                mha.out_proj.bias.copy_(t[p + "self_attention.out_proj.bias"])
            self.layers.append((mha, t[p + "layernorm1.weight"], t[p + "layernorm2.weight"],
                                t[p + "linear1.weight"], t[p + "linear2.weight"]))

    @torch.no_grad()
    def forward(self, x, tokens):
        """x (B, C), tokens (B, 8) -> 8 logit tensors (B, cb_i + 1)."""
        c = self.c
        rows = torch.stack([F.embedding(tokens[..., i], self.t[f"model.audio_embed_layers.{i}.weight"])
                            for i in range(len(self.cbs) - 1)], dim=1)
        h = torch.cat([x.reshape(-1, 1, c), torch.cumsum(rows, dim=1)], dim=1)
        for mha, ln1, ln2, w1, w2 in self.layers:
            s = h.size(1)
            res = h
            hn = ref_rms(h, ln1)
            mask = torch.triu(torch.ones(s, s), diagonal=1).bool()
            a, _ = mha(hn, hn, hn, is_causal=True, attn_mask=mask)
            res = ref_rms(a + res, ln2)
            f = torch.einsum("bld,tld->blt", res, w1.reshape(2 * c, -1, c))
            f = F.gelu(f)
            f = torch.einsum("blt,dlt->bld", f, w2.reshape(c, -1, 2 * c))
            h = res + f
        h = ref_rms(h, self.t["audio_head.headnorm.weight"])
        return [F.linear(h[:, i], self.t[f"audio_head.heads.{i}.weight"], self.t[f"audio_head.heads.{i}.bias"])
                for i in range(len(self.cbs))]

    def greedy_frame(self, x):
        """The reference decode loop for one frame, argmax picks: returns codes (B, 8) and the logits each
        pick was made from (slot 0 all cb_0 + 1, others last dropped), fp32."""
        b = x.shape[0]
        tokens = torch.zeros(b, len(self.cbs), dtype=torch.long)
        seen = []
        for i in range(len(self.cbs)):
            logits = self.forward(x, tokens)
            li = (logits[i] if i == 0 else logits[i][:, :-1]).float()
            seen.append(li)
            tokens[:, i] = li.argmax(-1)
        return tokens, seen


# ---- fixtures ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module", autouse=True)
def _single_thread(one_thread):  # tests/conftest.py: tiny ops run single-threaded
    yield


@pytest.fixture(scope="module")
def head_ckpt(tmp_path_factory):
    """Width 256 (2 attention heads of 128), 3 head layers, the tiny codebooks [64, 32, 16 x 6]."""
    from omni_edge.testing import write_tiny_checkpoint
    path = write_tiny_checkpoint(tmp_path_factory.mktemp("head256"), seed=3, hidden_size=256, head_dim=64,
                                 num_attention_heads=4, num_key_value_heads=2, layers=1, dtype="float32",
                                 config_overrides={"audio_config": {"audio_head_transformer_layers": 3}})
    return Checkpoint.open(path)


def _tensors(ckpt):
    return {n: ckpt.get(n) for st in ("audio_head", "audio_embed") for n in ckpt.stage(st)}


# ---- numerics ----------------------------------------------------------------------------------------

def test_incremental_equals_rerun_all_slots_fp32(head_ckpt):
    cfg = head_ckpt.config
    head = AudioHead.from_checkpoint(head_ckpt, device="cpu", dtype=torch.float32)
    ref = RefHead(cfg, _tensors(head_ckpt), torch.float32)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, cfg.backbone.hidden_size, generator=g)  # batch 3: odd, rows independent
    codes, ref_logits = ref.greedy_frame(x)
    got = head.frame_logits(x, codes)
    assert len(got) == 8
    for i, (a, b) in enumerate(zip(got, ref_logits)):
        assert a.shape == b.shape == (3, cfg.audio.codebook_sizes[i] + (1 if i == 0 else 0))
        # fp32 with different summation orders (per-slot GEMV vs einsum over 8 slots, fp32 softmax vs SDPA):
        # differences are rounding only, ~1e-6 on logits of size ~1
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=f"slot {i}")
    # the greedy picks of the incremental head are the reference's
    picks = head.run_frame(x, lambda slot, logits: logits.argmax(-1))
    assert torch.equal(picks, codes)
    # the whole-head path (the benchmark's peer) agrees too, slot by slot
    full = head.full_logits(x, codes)
    for i in range(8):
        want = ref.forward(x, codes)[i]
        torch.testing.assert_close(full[i], want.float(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_incremental_half_precision_within_twice_reference_error(head_ckpt, dtype):
    """bf16/fp16: error against the fp32 reference at most 2x (+ a floor of one bf16 ulp at the logits' scale)
    that of the reference itself run in the same dtype: the rule for attention-like ops in STYLE.md."""
    cfg = head_ckpt.config
    tensors = _tensors(head_ckpt)
    ref32 = RefHead(cfg, tensors, torch.float32)
    ref_lo = RefHead(cfg, tensors, dtype)
    head = AudioHead.from_tensors(cfg, tensors, dtype=dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, cfg.backbone.hidden_size, generator=g).to(dtype)
    codes, _ = ref32.greedy_frame(x.float())
    want = ref32.forward(x.float(), codes)
    lo = ref_lo.forward(x, codes)
    got = head.frame_logits(x, codes)
    for i in range(8):
        w = want[i] if i == 0 else want[i][:, :-1]
        r = (lo[i] if i == 0 else lo[i][:, :-1]).float()
        err_ref = (r - w).abs().max().item()
        err = (got[i] - w).abs().max().item()
        floor = w.abs().max().item() * 2 ** -8
        assert err <= 2 * err_ref + floor, f"slot {i}: {err} vs reference {err_ref}"


def test_embed_codes_is_the_reference_sum_in_model_dtype(head_ckpt):
    """Bit-exact: pad embedding = E_0[c_0], then += E_i[c_i] in the model dtype (bf16 rounding per add)."""
    head = AudioHead.from_checkpoint(head_ckpt, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(2)
    cbs = head.codebook_sizes
    codes = torch.stack([torch.randint(0, n, (5,), generator=g) for n in cbs], dim=1)
    want = None
    for i in range(8):
        row = F.embedding(codes[:, i], head_ckpt.get(f"model.audio_embed_layers.{i}.weight").bfloat16())
        if want is None:
            want = row
        else:
            want += row
    assert torch.equal(head.embed_codes(codes), want)
    assert torch.equal(embed_codes(head.embed, codes), want)


def test_each_ffn_block_and_head_read_once_per_frame(head_ckpt, monkeypatch):
    """One frame touches each slot-specific FFN block of every layer exactly once and each head once; only the
    shared attention projections run once per sub-step (8 per layer). The reference re-run touches every
    block 8 times."""
    head = AudioHead.from_checkpoint(head_ckpt)
    ffn, heads, attn = [], [], []
    orig_ffn, orig_head, orig_attn = head._ffn, head._head, head._attention
    monkeypatch.setattr(head, "_ffn", lambda i, s, x: (ffn.append((i, s)), orig_ffn(i, s, x))[1])
    monkeypatch.setattr(head, "_head", lambda s, x: (heads.append(s), orig_head(s, x))[1])
    monkeypatch.setattr(head, "_attention", lambda i, s, x: (attn.append((i, s)), orig_attn(i, s, x))[1])
    sampler = AudioCodeSampler(head.codebook_sizes, AUDIO_SAMPLING, seed=0)
    head.sample_frame(torch.randn(head.hidden_size), sampler)
    layers = len(head.layers)
    assert sorted(ffn) == [(i, s) for i in range(layers) for s in range(8)]
    assert sorted(heads) == list(range(8))
    assert sorted(attn) == [(i, s) for i in range(layers) for s in range(8)]
    # FFN blocks are the bulk of the weights: per frame each of the 8 (2C x C) + (C x 2C) blocks once
    c = head.hidden_size
    block_reads = sum(head.layers[i].w1[s].numel() + head.layers[i].w2[s].numel() for i, s in ffn)
    assert block_reads == layers * 8 * 4 * c * c


# ---- sampling ----------------------------------------------------------------------------------------

def test_penalty_is_per_codebook_over_the_segment():
    """Greedy: code 3 wins by a small margin everywhere. After a frame with code 3 in codebook 0 only, the
    penalty (1.3) flips codebook 0 to the runner-up but leaves codebook 1 alone; reset() empties it."""
    cbs = [8, 6]
    s = AudioCodeSampler(cbs, SamplingParams(max_new_tokens=10, temperature=0.0, repetition_penalty=1.3), seed=0)

    def logits(n):
        v = torch.zeros(n)
        v[3], v[2] = 2.0, 1.8  # 2.0 / 1.3 < 1.8
        return v

    assert int(s.pick(0, logits(9))) == 3 and int(s.pick(1, logits(6))) == 3
    s.observe(torch.tensor([3, 5]))
    assert int(s.pick(0, logits(9))) == 2
    assert int(s.pick(1, logits(6))) == 3
    # a negative logit is multiplied by the penalty (HF rule)
    v = torch.full((6,), -1.0)
    v[5], v[0] = -0.5, -0.6  # -0.5 * 1.3 = -0.65 < -0.6
    assert int(s.pick(1, v)) == 0
    s.reset()
    assert int(s.pick(0, logits(9))) == 3


def test_sampled_distribution_matches_hf_processors():
    """The candidate distribution (penalty 1.3 over the history, T 0.5, top-k 5, top-p 0.85) equals what HF's
    own processors give, for codebook sizes with and without the end-of-audio entry."""
    tf = pytest.importorskip("transformers.generation.logits_process")
    procs = tf.LogitsProcessorList([tf.RepetitionPenaltyLogitsProcessor(1.3), tf.TemperatureLogitsWarper(0.5),
                                    tf.TopKLogitsWarper(5), tf.TopPLogitsWarper(0.85)])
    g = torch.Generator().manual_seed(5)
    s = AudioCodeSampler([17, 13], AUDIO_SAMPLING, seed=0)
    hist = [torch.tensor([4, 7]), torch.tensor([16, 1]), torch.tensor([4, 2])]
    for f in hist:
        s.observe(f)
    for slot, n in ((0, 18), (1, 13)):
        for _ in range(5):
            x = torch.randn(n, generator=g) * 2
            ids = torch.stack([f[slot] for f in hist])[None]
            want = torch.softmax(procs(ids, x[None].clone()), dim=-1)[0]
            vals, idx = s.samplers[slot].candidates(x.clone())
            got = torch.zeros(n)
            got[idx] = torch.softmax(vals, dim=-1)
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_sampling_is_seeded_and_in_range(head_ckpt):
    head = AudioHead.from_checkpoint(head_ckpt)
    h = torch.randn(head.hidden_size, generator=torch.Generator().manual_seed(4))
    a = [head.sample_frame(h, AudioCodeSampler(head.codebook_sizes, seed=11)) for _ in range(2)]
    assert torch.equal(a[0], a[1])
    assert a[0].shape == (8,) and a[0].dtype == torch.long
    for i, n in enumerate(head.codebook_sizes):
        assert 0 <= int(a[0][i]) < (n + 1 if i == 0 else n)


# ---- errors ------------------------------------------------------------------------------------------

def test_clean_errors(head_ckpt):
    head = AudioHead.from_checkpoint(head_ckpt)
    with pytest.raises(ValueError, match=r"hidden: expected shape \(B, 256\)"):
        head.frame_logits(torch.zeros(2, 255), torch.zeros(2, 8, dtype=torch.long))
    with pytest.raises(CodeError, match=r"codes\[:, 1\]: values must lie in \[0, 32\)"):
        head.embed_codes(torch.tensor([[0, 32, 0, 0, 0, 0, 0, 0]]))
    with pytest.raises(CodeError, match=r"codes: expected shape \(N, 8\)"):
        head.embed_codes(torch.zeros(3, 7, dtype=torch.long))
    with pytest.raises(ValueError, match="sample_frame serves one sequence"):
        head.sample_frame(torch.zeros(2, 256), AudioCodeSampler(head.codebook_sizes, seed=0))
    t = _tensors(head_ckpt)
    t["audio_head.transformer_layers.1.linear2.weight"] = torch.zeros(256, 100)
    with pytest.raises(ValueError, match=r"linear2.weight: expected shape \(256, 4096\)"):
        AudioHead.from_tensors(head_ckpt.config, t)
    with pytest.raises(ValueError, match="dtype"):
        AudioHead.from_tensors(head_ckpt.config, _tensors(head_ckpt), dtype=torch.float64)
