"""Backbone numerics against transformers' Qwen2 / Llama on shared random weights, KV-cache consistency,
4-bit paths, error paths, and the real-weights lane (SmolLM2-135M-Instruct)."""

import math

import pytest
import torch

from omni_edge.backbone import (LINEAR_GROUPS_PACKED, LINEAR_GROUPS_SPLIT, Backbone, DecoderLayer, Linear,
                                apply_rope, linear_groups, rope_tables, rtn_group_size)
from omni_edge.checkpoint import Checkpoint
from omni_edge.config import BackboneConfig
from omni_edge.ops import q4
from omni_edge.testing import backbone_tensors

transformers = pytest.importorskip("transformers")

# Two tiny shapes: a generic one and the Qwen2.5-7B 7:1 GQA ratio (28/4 heads there, 7/1 here). Odd sizes on
# purpose (vocab 509, sequence 13) so nothing lines up with a tile.
SHAPES = {
    "gqa2": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 intermediate_size=96, vocab_size=509),
    "gqa7": dict(hidden_size=128, num_hidden_layers=3, num_attention_heads=7, num_key_value_heads=1, head_dim=32,
                 intermediate_size=160, vocab_size=509),
}


def _cfg(shape, *, packed=True, bias=True, tied=False, theta=1e6, eps=1e-6):
    return BackboneConfig(**SHAPES[shape], rope_theta=theta, rms_norm_eps=eps, max_position_embeddings=256,
                          qkv_bias=bias, packed_qkv=packed, tie_word_embeddings=tied, torch_dtype="float32")


_tensors = backbone_tensors  # omni_edge.testing (shared with the self-check)


def _hf_model(cfg: BackboneConfig, tensors, arch="qwen2"):
    """transformers' reference model holding the same weights (W_pack split into q/k/v rows)."""
    common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                  num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
                  num_key_value_heads=cfg.num_key_value_heads, rms_norm_eps=cfg.rms_norm_eps,
                  max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=cfg.tie_word_embeddings,
                  rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta})
    if arch == "qwen2":
        hc = transformers.Qwen2Config(**common, use_sliding_window=False)
        hc.head_dim = cfg.head_dim
        model = transformers.Qwen2ForCausalLM(hc)
    else:
        hc = transformers.LlamaConfig(**common, head_dim=cfg.head_dim, attention_bias=cfg.qkv_bias)
        model = transformers.LlamaForCausalLM(hc)
    sd = {}
    for k, v in tensors.items():
        if ".W_pack." in k:
            q, kk, vv = v.split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=0)
            for part, t in zip(("q_proj", "k_proj", "v_proj"), (q, kk, vv)):
                sd[k.replace("W_pack", part)] = t
        else:
            sd[k] = v
    if cfg.tie_word_embeddings:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected, unexpected
    assert not [m for m in missing if "rotary" not in m], missing
    return model.eval().float()


def _ids(vocab, b, t, seed=1):
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


def _rel(a, b):
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def _greedy_ours(bb: Backbone, prompt, steps):
    """Prefill the prompt, then decode one token at a time through the KV cache."""
    b, t = prompt.shape
    bb.allocate_cache(t + steps, batch=b)
    h = bb.forward(prompt, start=0)
    nxt = bb.logits(h[:, -1]).argmax(-1)
    out = [nxt]
    for i in range(steps - 1):
        h = bb.forward(nxt[:, None], start=t + i)
        nxt = bb.logits(h[:, -1]).argmax(-1)
        out.append(nxt)
    return torch.stack(out, 1)


@torch.no_grad()
def _greedy_hf_recompute(model, prompt, steps):
    """Greedy tokens by full recomputation (no cache) in the reference model."""
    seq = prompt
    for _ in range(steps):
        nxt = model(seq, use_cache=False).logits[:, -1].argmax(-1)
        seq = torch.cat([seq, nxt[:, None]], 1)
    return seq[:, prompt.shape[1]:]


# ------------------------------------------------------------------------------------------------
# Parity with transformers
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", list(SHAPES))
@torch.no_grad()
def test_qwen2_parity_logits_and_greedy(shape):
    cfg = _cfg(shape)
    tensors = _tensors(cfg)
    ours = Backbone.from_tensors(cfg, tensors)
    ref = _hf_model(cfg, tensors)
    prompt = _ids(cfg.vocab_size, 2, 13)
    ours.allocate_cache(64, batch=2)
    got = ours.logits(ours.forward(prompt, start=0))
    want = ref(prompt).logits
    assert got.dtype == torch.float32 and got.shape == want.shape
    # fp32 end to end on both sides; only summation order differs: 1e-4 of the logit range.
    assert _rel(got, want) < 1e-4, _rel(got, want)
    # Greedy tokens through our KV cache vs the reference's full recomputation, 32 steps.
    toks = _greedy_ours(ours, prompt, 32)
    assert torch.equal(toks, _greedy_hf_recompute(ref, prompt, 32))


@torch.no_grad()
def test_llama_parity_no_bias_tied():
    cfg = _cfg("gqa2", packed=False, bias=False, tied=True, theta=10000.0, eps=1e-5)
    tensors = _tensors(cfg, seed=3)
    assert not any(k.endswith("_proj.bias") for k in tensors)
    ours = Backbone.from_tensors(cfg, tensors)
    ref = _hf_model(cfg, tensors, arch="llama")
    prompt = _ids(cfg.vocab_size, 1, 11, seed=4)
    ours.allocate_cache(48)
    assert _rel(ours.logits(ours.forward(prompt, start=0)), ref(prompt).logits) < 1e-4
    assert torch.equal(_greedy_ours(ours, prompt, 32), _greedy_hf_recompute(ref, prompt, 32))


@torch.no_grad()
def test_qwen2_split_qkv_parity():
    """hf-style separate q/k/v with bias (plain Qwen2 checkpoints)."""
    cfg = _cfg("gqa7", packed=False, bias=True)
    tensors = _tensors(cfg, seed=5)
    ours = Backbone.from_tensors(cfg, tensors)
    ref = _hf_model(cfg, tensors)
    prompt = _ids(cfg.vocab_size, 1, 9, seed=6)
    ours.allocate_cache(16)
    assert _rel(ours.logits(ours.forward(prompt, start=0)), ref(prompt).logits) < 1e-4


@torch.no_grad()
def test_kv_cache_decode_equals_full_recompute():
    cfg = _cfg("gqa7")
    bb = Backbone.from_tensors(cfg, _tensors(cfg, seed=7))
    seq = _ids(cfg.vocab_size, 2, 20, seed=8)
    bb.allocate_cache(32, batch=2)
    full = bb.logits(bb.forward(seq, start=0))
    # Same sequence in pieces: a 7-token prefill, a 5-token chunk, then single-token decode steps.
    bb.allocate_cache(32, batch=2)
    parts = [bb.logits(bb.forward(seq[:, :7], start=0)), bb.logits(bb.forward(seq[:, 7:12], start=7))]
    for t in range(12, 20):
        parts.append(bb.logits(bb.forward(seq[:, t:t + 1], start=t)))
    inc = torch.cat(parts, 1)
    # Same fp32 math in a different grouping (decode kernel vs prefill): tight tolerance.
    assert _rel(inc, full) < 1e-5, _rel(inc, full)


@torch.no_grad()
def test_inputs_embeds_equals_ids():
    cfg = _cfg("gqa2")
    bb = Backbone.from_tensors(cfg, _tensors(cfg))
    ids = _ids(cfg.vocab_size, 1, 6)
    bb.allocate_cache(8)
    a = bb.forward(ids, start=0)
    b = bb.forward(inputs_embeds=bb.embed(ids), start=0)
    assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------
# 4-bit
# ------------------------------------------------------------------------------------------------

@pytest.mark.usefixtures("q4_exact")
@torch.no_grad()
def test_rtn4_matches_dequantized_dense_and_stays_close():
    cfg = _cfg("gqa7")
    tensors = _tensors(cfg, seed=9)
    dense = Backbone.from_tensors(cfg, tensors)
    quant = Backbone.from_tensors(cfg, tensors, quant="rtn4")
    for layer in quant.layers:
        assert all(lin.quantized for lin in layer.linears.values())
    assert not quant.lm_head.quantized  # embeddings, norms and lm_head stay dense
    prompt = _ids(cfg.vocab_size, 1, 10, seed=10)
    for bb in (dense, quant):
        bb.allocate_cache(16)
    ld, lq = dense.logits(dense.forward(prompt, start=0)), quant.logits(quant.forward(prompt, start=0))

    # (1) Exactness of the 4-bit path: a dense model holding the dequantized RTN weights gives the same logits
    # (both fp32; only the matmul order differs).
    deq = dict(tensors)
    for i, layer in enumerate(quant.layers):
        for name, lin in layer.linears.items():
            deq[f"model.layers.{i}.{name}.weight"] = lin.dense_weight().contiguous()
    ref = Backbone.from_tensors(cfg, deq)
    ref.allocate_cache(16)
    assert _rel(lq, ref.logits(ref.forward(prompt, start=0))) < 1e-4

    # (2) Closeness to the unquantized model. Symmetric 4-bit RTN of Gaussian weights has a per-weight error of
    # about scale/sqrt(12) ~ 0.1 of the weight spread, so each linear's output is off by ~10% and three layers
    # compound that: we allow 35% relative RMS error on the logits and require cosine similarity > 0.93
    # (random weights: no outlier structure for a real model's quality to lean on).
    err = float((lq - ld).pow(2).mean().sqrt() / ld.pow(2).mean().sqrt())
    cos = float(torch.nn.functional.cosine_similarity(lq.flatten(), ld.flatten(), dim=0))
    assert err < 0.35 and cos > 0.93, (err, cos)
    assert err > 1e-3  # the weights really were quantized


def test_rtn_group_size_rule():
    assert rtn_group_size(3584) == 128
    assert rtn_group_size(18944) == 128
    assert rtn_group_size(224) == 32  # 7 heads x 32
    assert rtn_group_size(192) == 64
    assert rtn_group_size(200) == 200  # no candidate divides: per-channel
    assert rtn_group_size(256, 64) == 64


# ------------------------------------------------------------------------------------------------
# DecoderLayer standalone (the GPTQ toolchain's view)
# ------------------------------------------------------------------------------------------------

@torch.no_grad()
def test_decoder_layer_nocache_chain_equals_model():
    cfg = _cfg("gqa7")
    tensors = _tensors(cfg, seed=11)
    bb = Backbone.from_tensors(cfg, tensors)
    ids = _ids(cfg.vocab_size, 2, 9, seed=12)
    bb.allocate_cache(9, batch=2)
    want = bb.forward(ids, start=0)
    h = bb.embed(ids)
    for i in range(cfg.num_hidden_layers):
        layer = DecoderLayer.from_tensors(cfg, i, {k: v for k, v in tensors.items()
                                                   if k.startswith(f"model.layers.{i}.")})
        h = layer.forward_nocache(h)
    from omni_edge.backbone import rms_norm
    got = rms_norm(h, bb.norm, cfg.rms_norm_eps)
    assert _rel(got, want) < 1e-5


@torch.no_grad()
def test_decoder_layer_matches_hf_layer():
    """One layer alone against transformers' Qwen2DecoderLayer with the same weights."""
    from transformers.models.qwen2 import modeling_qwen2 as mq
    cfg = _cfg("gqa2")
    tensors = _tensors(cfg, seed=13)
    ref = _hf_model(cfg, tensors)
    layer = DecoderLayer.from_tensors(cfg, 1, tensors)  # extra names of other layers are ignored
    h = torch.randn(2, 7, cfg.hidden_size, generator=torch.Generator().manual_seed(14))
    pos = torch.arange(7)[None].expand(2, 7)
    cos, sin = ref.model.rotary_emb(h, pos)
    mask = torch.full((7, 7), float("-inf")).triu(1)[None, None].expand(2, 1, 7, 7)
    want = ref.model.layers[1](h, attention_mask=mask, position_embeddings=(cos, sin), position_ids=pos)
    want = want[0] if isinstance(want, tuple) else want
    assert isinstance(ref.model.layers[1], mq.Qwen2DecoderLayer)
    assert _rel(layer.forward_nocache(h), want) < 1e-5


@pytest.mark.usefixtures("q4_exact")
def test_linear_groups_and_replace():
    cfg = _cfg("gqa2")
    assert linear_groups(cfg) == LINEAR_GROUPS_PACKED
    assert linear_groups(_cfg("gqa2", packed=False)) == LINEAR_GROUPS_SPLIT
    tensors = _tensors(cfg, seed=15)
    layer = DecoderLayer.from_tensors(cfg, 0, tensors)
    for group in layer.linear_groups:  # members of a group share their input
        assert len({layer.linear(n).in_features for n in group}) == 1
    assert layer.linear("self_attn.W_pack").out_features == cfg.qkv_size
    h = torch.randn(1, 5, cfg.hidden_size, generator=torch.Generator().manual_seed(16))
    w = layer.linear("mlp.down_proj").weight
    qw = q4.qweight_rtn(w, 32, sym=True)
    layer.replace_linear("mlp.down_proj", qw)
    assert layer.linear("mlp.down_proj").quantized
    a = layer.forward_nocache(h)
    layer.replace_linear("mlp.down_proj", qw.dequantize().t().contiguous())
    b = layer.forward_nocache(h)
    assert _rel(a, b) < 1e-5
    with pytest.raises(ValueError, match="expected shape"):
        layer.replace_linear("mlp.down_proj", torch.zeros(3, 3))
    with pytest.raises(ValueError, match="W_pack"):
        layer.linear("self_attn.q_proj")


def test_decoder_layer_missing_and_misshaped_tensor():
    cfg = _cfg("gqa2")
    t = {k: v for k, v in _tensors(cfg).items() if k.startswith("model.layers.0.")}
    bad = dict(t)
    del bad["model.layers.0.mlp.up_proj.weight"]
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.up_proj\.weight"):
        DecoderLayer.from_tensors(cfg, 0, bad)
    bad = dict(t, **{"model.layers.0.self_attn.W_pack.weight": torch.zeros(cfg.qkv_size - 1, cfg.hidden_size)})
    want = rf"W_pack\.weight: expected shape \({cfg.qkv_size}, 64\), got \({cfg.qkv_size - 1}, 64\)"
    with pytest.raises(ValueError, match=want):
        DecoderLayer.from_tensors(cfg, 0, bad)


# ------------------------------------------------------------------------------------------------
# Errors, RoPE, checkpoint loading
# ------------------------------------------------------------------------------------------------

def test_cache_errors():
    cfg = _cfg("gqa2")
    bb = Backbone.from_tensors(cfg, _tensors(cfg))
    ids = _ids(cfg.vocab_size, 1, 5)
    with pytest.raises(ValueError, match="allocate_cache"):
        bb.forward(ids, start=0)
    bb.allocate_cache(6)
    assert bb.max_len == 6
    bb.forward(ids, start=0)
    with pytest.raises(ValueError, match=r"positions 5\.\.6 exceed the allocated cache \(max_len=6\)"):
        bb.forward(ids[:, :2], start=5)
    with pytest.raises(ValueError, match="batch"):
        bb.forward(_ids(cfg.vocab_size, 2, 1), start=0)
    with pytest.raises(ValueError, match="exactly one"):
        bb.forward(start=0)
    with pytest.raises(ValueError, match="max_len"):
        bb.allocate_cache(0)
    with pytest.raises(ValueError, match="quant"):
        Backbone.from_tensors(cfg, _tensors(cfg), quant="int3")


def test_rope_is_relative_and_fp32():
    cos, sin = rope_tables(1e6, 8, 40)
    assert cos.dtype == torch.float32 and cos.shape == (40, 8)
    q = torch.randn(1, 1, 1, 8, dtype=torch.float64).float()
    k = torch.randn(1, 1, 1, 8).float()
    # <R(m) q, R(n) k> depends only on m - n
    def dot(m, n):
        return float((apply_rope(q, cos[m:m + 1], sin[m:m + 1]) * apply_rope(k, cos[n:n + 1], sin[n:n + 1])).sum())
    assert math.isclose(dot(10, 3), dot(37, 30), rel_tol=1e-4, abs_tol=1e-5)
    # bf16 input: computed in fp32, returned in bf16
    assert apply_rope(q.bfloat16(), cos[:1], sin[:1]).dtype == torch.bfloat16


@torch.no_grad()
def test_from_checkpoint_tiny_omni(tiny_omni):
    ckpt = Checkpoint.open(tiny_omni)
    bb = Backbone.from_checkpoint(ckpt)
    cfg = ckpt.config.backbone
    assert cfg.packed_qkv and cfg.qkv_bias and not cfg.tie_word_embeddings
    ids = torch.tensor([[9707, 151667, 1, 2, 151668]])
    bb.allocate_cache(8)
    lf = bb.logits(bb.forward(ids, start=0))
    assert lf.shape == (1, 5, cfg.vocab_size) and torch.isfinite(lf).all()
    # bf16 (the stored dtype) runs and stays near fp32: bf16 keeps ~3 significant digits per op.
    b16 = Backbone.from_checkpoint(ckpt, dtype=torch.bfloat16)
    b16.allocate_cache(8)
    l16 = b16.logits(b16.forward(ids, start=0))
    assert l16.dtype == torch.float32
    assert float((l16 - lf).pow(2).mean().sqrt() / lf.pow(2).mean().sqrt()) < 0.05
    # rtn4 from the checkpoint loads every decoder linear as 4-bit
    bq = Backbone.from_checkpoint(ckpt, quant="rtn4")
    assert all(isinstance(lin.qweight, q4.QWeight) for layer in bq.layers for lin in layer.linears.values())


@pytest.mark.cuda
@torch.no_grad()
def test_cuda_matches_cpu():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    cfg = _cfg("gqa7")
    tensors = _tensors(cfg, seed=17)
    cpu, gpu = Backbone.from_tensors(cfg, tensors), Backbone.from_tensors(cfg, tensors, device="cuda")
    prompt = _ids(cfg.vocab_size, 1, 12, seed=18)
    a = _greedy_ours(cpu, prompt, 16)
    b = _greedy_ours(gpu, prompt.cuda(), 16).cpu()
    assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------
# Real weights
# ------------------------------------------------------------------------------------------------

@pytest.mark.slow
@torch.no_grad()
def test_smollm2_greedy_matches_transformers(smollm2_dir):
    """SmolLM2-135M-Instruct in fp32: our backbone (KV cache, decode kernel) and transformers give the same
    greedy tokens for 16 steps on a chat prompt."""
    tok = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    prompt = prompt["input_ids"]
    ref = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    want = _greedy_hf_recompute(ref, prompt, 16)  # runs on past <|im_end|>: 16 comparable steps
    ckpt = Checkpoint.open(smollm2_dir)
    assert ckpt.config.kind == "hf" and ckpt.config.backbone.tie_word_embeddings
    bb = Backbone.from_checkpoint(ckpt, dtype=torch.float32)
    got = _greedy_ours(bb, prompt, 16)
    assert torch.equal(got, want), (tok.decode(got[0]), tok.decode(want[0]))
    assert "Paris" in tok.decode(got[0])
