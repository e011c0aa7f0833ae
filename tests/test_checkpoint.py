"""Checkpoint loader: stage tables, sharded and single-file safetensors, validation errors, one stage alone,
GPTQ-layout linears, hf checkpoints, refusal of pickled weights."""

import json
import math
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from omni_edge.backbone import Backbone
from omni_edge.checkpoint import (INDEX_FILE, STAGES, Checkpoint, Linear, Tensor, decoder_layer_specs,
                                  stage_specs)
from omni_edge.config import parse_config
from omni_edge.ops import q4
from omni_edge.testing import reference_config, random_tensors


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------

def _load_all(folder):
    with open(os.path.join(folder, INDEX_FILE)) as f:
        wm = json.load(f)["weight_map"]
    tensors = {}
    for shard in sorted(set(wm.values())):
        tensors.update(load_file(os.path.join(folder, shard)))
    return tensors, wm


def _rewrite(src, dst, edit=None, config_edit=None, single_file=False):
    """Copy checkpoint `src` to `dst`, applying edit(tensors) -> tensors and config_edit(dict) -> None."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", INDEX_FILE))
    tensors, wm = _load_all(src)
    if edit is not None:
        tensors = edit(dict(tensors))
    if config_edit is not None:
        with open(os.path.join(dst, "config.json")) as f:
            cfg = json.load(f)
        config_edit(cfg)
        with open(os.path.join(dst, "config.json"), "w") as f:
            json.dump(cfg, f)
    if single_file:
        save_file(tensors, os.path.join(dst, "model.safetensors"))
        return str(dst)
    first = sorted(set(wm.values()))[0]
    shards = {}
    for name, t in tensors.items():
        shards.setdefault(wm.get(name, first), {})[name] = t
    for shard, ts in shards.items():
        save_file(ts, os.path.join(dst, shard))
    with open(os.path.join(dst, INDEX_FILE), "w") as f:
        json.dump({"metadata": {}, "weight_map": {n: s for s, ts in shards.items() for n in ts}}, f)
    return str(dst)


# ------------------------------------------------------------------------------------------------
# Tables
# ------------------------------------------------------------------------------------------------

def _count(cfg, stage):
    return sum(1 if isinstance(s, Tensor) else 1 + s.bias for s in stage_specs(cfg, stage))


def _params(cfg, stage):
    return sum(math.prod(s.shape) if isinstance(s, Tensor) else s.out_features * (s.in_features + s.bias)
               for s in stage_specs(cfg, stage))


def test_tables_at_real_sizes_match_model_md():
    cfg = parse_config(reference_config())
    # docs/MODEL.md §3.3 cross-check: tensor counts of the audio stack (bridge = encode side + RVQ/proj_decoder)
    assert _count(cfg, "audio_encoder") == 487
    assert _count(cfg, "audio_bridge") + _count(cfg, "rvq") == 31
    assert _count(cfg, "audio_decoder") == 149
    assert _count(cfg, "flow_prenet") == 163
    assert _count(cfg, "flow_estimator") == 910
    # docs/MODEL.md §5 parameter counts (millions, rounded as there)
    assert round(_params(cfg, "audio_head") / 1e6) == 1457
    assert round(_params(cfg, "visual") / 1e6) == 631
    assert round(_params(cfg, "visual_bridge") / 1e6, 1) == 44.6
    assert round(_params(cfg, "audio_embed") / 1e6, 1) == 69.8
    assert round(_params(cfg, "flow_estimator") / 1e6, 1) == 71.0
    per_layer = sum(s.out_features * (s.in_features + s.bias) if isinstance(s, Linear) else math.prod(s.shape)
                    for s in decoder_layer_specs(cfg.backbone))
    assert round(per_layer / 1e6) == 233
    # a few literal shapes from §3.3
    specs = {getattr(s, "name", getattr(s, "prefix", None)): s for st in STAGES for s in stage_specs(cfg, st)}
    assert specs["model.layers.27.self_attn.W_pack"] == Linear("model.layers.27.self_attn.W_pack", 4608, 3584, True)
    assert specs["model.visual_model.patch_embed.proj.weight"].shape == (1280, 3, 2, 14, 14)
    assert specs["audio_head.transformer_layers.2.linear1.weight"].shape == (7168, 28672)
    assert specs["audio_head.transformer_layers.2.linear2.weight"].shape == (3584, 57344)
    assert specs["audio_head.transformer_layers.0.self_attention.in_proj_weight"].shape == (10752, 3584)
    assert specs["audio_tokenizer.audio_bridge_model.gate_proj.weight"].shape == (5120, 1280, 4)
    assert specs["audio_tokenizer.audio_bridge_model.vq_list.0.codebook.embed"].shape == (8192, 5120)
    assert specs["audio_head.heads.0"].out_features == 8193
    assert specs["model.audio_embed_layers.7.weight"].shape == (1025, 3584)


# Names quoted in docs/MODEL.md §3.3, checked literally in the tiny checkpoint (layer / block indices within range).
LITERAL_NAMES = [
    "model.embed_tokens.weight", "model.layers.0.self_attn.W_pack.weight", "model.layers.1.self_attn.W_pack.bias",
    "model.layers.1.self_attn.o_proj.weight", "model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight",
    "model.layers.0.mlp.down_proj.weight", "model.layers.0.input_layernorm.weight",
    "model.layers.0.post_attention_layernorm.weight", "model.norm.weight", "lm_head.weight",
    "model.audio_embed_layers.7.weight", "model.visual_model.patch_embed.proj.weight",
    "model.visual_model.blocks.1.norm1.weight", "model.visual_model.blocks.1.attn.qkv.weight",
    "model.visual_model.blocks.1.attn.proj.bias", "model.visual_model.blocks.0.mlp.fc1.weight",
    "model.visual_model.blocks.0.mlp.fc2.weight", "model.visual_bridge_model.ln_q.weight",
    "model.visual_bridge_model.mlp.0.weight", "model.visual_bridge_model.mlp.2.bias",
    "audio_head.transformer_layers.1.self_attention.in_proj_weight",
    "audio_head.transformer_layers.1.self_attention.in_proj_bias",
    "audio_head.transformer_layers.1.self_attention.out_proj.weight",
    "audio_head.transformer_layers.1.self_attention.out_proj.bias", "audio_head.transformer_layers.0.layernorm1.weight",
    "audio_head.transformer_layers.0.layernorm2.weight", "audio_head.transformer_layers.0.linear1.bias",
    "audio_head.transformer_layers.0.linear2.weight", "audio_head.headnorm.weight", "audio_head.heads.7.bias",
    "audio_tokenizer.audio_model.conv1.weight", "audio_tokenizer.audio_model.conv2.bias",
    "audio_tokenizer.audio_model.layers.1.self_attn.q_proj.weight", "audio_tokenizer.audio_model.layers.1.self_attn.out_proj.bias",
    "audio_tokenizer.audio_model.layers.0.self_attn_layer_norm.weight", "audio_tokenizer.audio_model.layers.0.fc1.weight",
    "audio_tokenizer.audio_model.layers.0.final_layer_norm.bias", "audio_tokenizer.audio_model.layer_norm.weight",
    "audio_tokenizer.audio_model.positional_embedding",
    "audio_tokenizer.audio_bridge_model.gate_proj.weight", "audio_tokenizer.audio_bridge_model.up_proj.weight",
    "audio_tokenizer.audio_bridge_model.down_proj.weight", "audio_tokenizer.audio_bridge_model.layer_norm.bias",
    "audio_tokenizer.audio_bridge_model.proj_decoder.weight", "audio_tokenizer.audio_bridge_model.vq_list.7.codebook.embed",
    "audio_tokenizer.audio_bridge_model.vq_list.0.codebook.embed_avg",
    "audio_tokenizer.audio_bridge_model.vq_list.0.codebook.cluster_size",
    "audio_tokenizer.audio_decoder.dconv1.conv.weight", "audio_tokenizer.audio_decoder.dconv1.norm.weight",
    "audio_tokenizer.audio_decoder.positional_embedding", "audio_tokenizer.audio_decoder.layers.1.fc2.weight",
    "audio_tokenizer.audio_decoder.layer_norm.weight", "audio_tokenizer.audio_decoder.dconv2.conv.weight",
    "audio_tokenizer.audio_decoder.post_net.layers.0.weight", "audio_tokenizer.audio_decoder.post_net.layers.12.weight",
    "audio_tokenizer.audio_flow_matching_decoder.prenet.in_mlp.0.weight",
    "audio_tokenizer.audio_flow_matching_decoder.prenet.in_mlp.2.weight",
    "audio_tokenizer.audio_flow_matching_decoder.prenet.transformer_layers.1.self_attn.k_proj.weight",
    "audio_tokenizer.audio_flow_matching_decoder.prenet.final_norm.weight",
    "audio_tokenizer.audio_flow_matching_decoder.prenet.out_proj.weight",
    "audio_tokenizer.audio_flow_matching_decoder.prenet.positional_embedding",
    "audio_tokenizer.audio_flow_matching_decoder.conditional_decoder.time_mlp.linear_1.weight",
    "audio_tokenizer.audio_flow_matching_decoder.conditional_decoder.time_mlp.linear_2.bias",
    "audio_tokenizer.audio_flow_matching_decoder.conditional_decoder.down_blocks.0.0.mlp.1.weight",
    "audio_tokenizer.audio_flow_matching_decoder.conditional_decoder.down_blocks.0.0.block1.block.0.weight",
    "audio_tokenizer.audio_flow_matching_decoder.conditional_decoder.down_blocks.0.0.block2.block.2.weight",
    "audio_tokenizer.audio_flow_matching_decoder.conditional_decoder.down_blocks.0.0.res_conv.weight",
    "audio_tokenizer.audio_flow_matching_decoder.conditional_decoder.down_blocks.0.1.0.attn1.to_q.weight",
    "audio_tokenizer.audio_flow_matching_decoder.conditional_decoder.down_blocks.0.1.0.attn1.to_out.0.bias",
    "audio_tokenizer.audio_flow_matching_decoder.conditional_decoder.down_blocks.0.1.0.norm3.weight",
    "audio_tokenizer.audio_flow_matching_decoder.conditional_decoder.down_blocks.0.1.0.ff.net.0.proj.weight",
    "audio_tokenizer.audio_flow_matching_decoder.conditional_decoder.down_blocks.0.1.0.ff.net.2.weight",
    "audio_tokenizer.audio_flow_matching_decoder.conditional_decoder.down_blocks.0.2.weight",
    "audio_tokenizer.audio_flow_matching_decoder.conditional_decoder.mid_blocks.1.0.res_conv.bias",
    "audio_tokenizer.audio_flow_matching_decoder.conditional_decoder.mid_blocks.1.1.0.norm1.bias",
    "audio_tokenizer.audio_flow_matching_decoder.conditional_decoder.up_blocks.0.0.block1.block.0.weight",
    "audio_tokenizer.audio_flow_matching_decoder.conditional_decoder.up_blocks.0.2.bias",
    "audio_tokenizer.audio_flow_matching_decoder.conditional_decoder.final_block.block.0.weight",
    "audio_tokenizer.audio_flow_matching_decoder.conditional_decoder.final_block.block.2.bias",
    "audio_tokenizer.audio_flow_matching_decoder.conditional_decoder.final_proj.weight",
]


def test_tiny_checkpoint_holds_every_stage(tiny_omni):
    ckpt = Checkpoint.open(tiny_omni)
    assert ckpt.config.kind == "omni"
    for stage in STAGES:
        assert ckpt.missing(stage) == [], stage
        assert ckpt.stage(stage), stage
    assert ckpt.unknown() == []
    for name in LITERAL_NAMES:
        assert ckpt.has(name), name
    # sharded with an index; every stage's names are disjoint and cover the file
    with open(os.path.join(tiny_omni, INDEX_FILE)) as f:
        assert len(set(json.load(f)["weight_map"].values())) >= 2
    all_names = [n for st in STAGES for n in ckpt.stage(st)]
    assert len(all_names) == len(set(all_names)) and sorted(all_names) == ckpt.names()
    assert ckpt.dtype("model.embed_tokens.weight") == "bfloat16"
    # up-block input is the skip concat (2 x channels); ConvTranspose1d weights are (in, out, k)
    cd = "audio_tokenizer.audio_flow_matching_decoder.conditional_decoder."
    assert ckpt.shape(cd + "up_blocks.0.0.block1.block.0.weight")[1] == 2 * ckpt.config.flow_matching.channels[0]
    assert ckpt.shape("audio_tokenizer.audio_decoder.dconv2.conv.weight")[1] == 80


def test_tiny_tokenizer_files(tiny_omni, tiny_omni_bytelevel):
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(os.path.join(tiny_omni, "tokenizer.json"))
    assert tok.encode("Hello").ids == [9707]
    added = json.load(open(os.path.join(tiny_omni, "added_tokens.json")))
    assert len(added) == 59 and added["<audiogen_start_baichuan>"] == 151700
    for content, i in added.items():
        assert tok.token_to_id(content) == i
        assert tok.encode(content).ids == [i]
    tcfg = json.load(open(os.path.join(tiny_omni, "tokenizer_config.json")))
    assert tcfg["eos_token"] == "<|endoftext|>" and tcfg["bos_token"] is None and not tcfg["add_bos_token"]
    assert len(tcfg["added_tokens_decoder"]) == 59
    gen = json.load(open(os.path.join(tiny_omni, "generation_config.json")))
    assert gen["eos_token_id"] == gen["bos_token_id"] == 151643
    # byte-level variant: same strings, other ids, config ids follow the tokenizer
    bl = Tokenizer.from_file(os.path.join(tiny_omni_bytelevel, "tokenizer.json"))
    cfg = Checkpoint.open(tiny_omni_bytelevel).config
    assert bl.token_to_id("<audio_start_baichuan>") == cfg.audio.audio_start_token_id
    assert bl.token_to_id("<video_palce_baichuan>") == cfg.video.video_place_token_id
    assert cfg.backbone.vocab_size >= bl.get_vocab_size()
    text = "Hello, 世界! <C_Q>"
    assert bl.decode(bl.encode(text).ids, skip_special_tokens=False) == text


def test_tiny_checkpoint_is_deterministic(tmp_path, tiny_omni_bytelevel):
    from omni_edge.testing import write_tiny_checkpoint
    again = write_tiny_checkpoint(tmp_path / "again", seed=0, tokenizer="bytelevel")
    a, _ = _load_all(tiny_omni_bytelevel)
    b, _ = _load_all(again)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for f in ("config.json", "tokenizer.json"):
        assert open(os.path.join(again, f)).read() == open(os.path.join(tiny_omni_bytelevel, f)).read()
    other = write_tiny_checkpoint(tmp_path / "seed1", seed=1, tokenizer="bytelevel", layers=1,
                                  num_attention_heads=7, num_key_value_heads=1)
    c = Checkpoint.open(other)
    assert c.config.backbone.num_key_value_heads == 1 and c.config.backbone.num_hidden_layers == 1
    assert not torch.equal(c.get("model.norm.weight"), Checkpoint.open(again).get("model.norm.weight"))


# ------------------------------------------------------------------------------------------------
# Files, shards, errors
# ------------------------------------------------------------------------------------------------

def test_single_file_equals_sharded(tmp_path, tiny_omni_bytelevel):
    single = _rewrite(tiny_omni_bytelevel, tmp_path / "single", single_file=True)
    a, b = Checkpoint.open(tiny_omni_bytelevel), Checkpoint.open(single)
    assert a.names() == b.names()
    name = "model.layers.1.mlp.down_proj.weight"
    assert torch.equal(a.get(name), b.get(name))
    t = b.get(name, dtype=torch.float32)
    assert t.dtype == torch.float32 and t.shape == a.shape(name)


def test_one_stage_loads_alone(tiny_omni_bytelevel, monkeypatch):
    opened = []
    original = Checkpoint._handle

    def spy(self, file):
        opened.append(os.path.basename(file))
        return original(self, file)
    monkeypatch.setattr(Checkpoint, "_handle", spy)
    ckpt = Checkpoint.open(tiny_omni_bytelevel)
    assert opened == []  # opening reads headers only
    rvq = ckpt.stage_tensors("rvq")
    assert set(rvq) == set(ckpt.stage("rvq"))
    assert set(opened) == {"model-00003-of-00003.safetensors"}
    opened.clear()
    layer = ckpt.layer_tensors(1)
    assert all(k.startswith("model.layers.1.") for k in layer) and len(layer) == 8  # 2 norms, W_pack weight + bias, o, gate, up, down
    assert set(opened) == {"model-00001-of-00003.safetensors"}


def test_shape_mismatch_names_tensor(tmp_path, tiny_omni_bytelevel):
    name = "model.layers.1.self_attn.W_pack.weight"

    def edit(t):
        t[name] = t[name][:-8].clone()
        return t
    bad = _rewrite(tiny_omni_bytelevel, tmp_path / "bad", edit)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.W_pack\.weight: expected shape "
                                         r"\(256, 128\), got \(248, 128\)"):
        Checkpoint.open(bad)


def test_dtype_mismatch_names_tensor(tmp_path, tiny_omni_bytelevel):
    name = "audio_tokenizer.audio_model.conv1.weight"

    def edit(t):
        t[name] = torch.zeros(t[name].shape, dtype=torch.int32)
        return t
    bad = _rewrite(tiny_omni_bytelevel, tmp_path / "bad", edit)
    with pytest.raises(ValueError, match=rf"{name}: expected dtype float32/float16/bfloat16, got int32"):
        Checkpoint.open(bad)


def test_missing_tensor_is_named_per_stage(tmp_path, tiny_omni_bytelevel):
    gone = ["audio_head.heads.3.bias", "model.layers.0.mlp.up_proj.weight"]

    def edit(t):
        for n in gone:
            del t[n]
        return t
    bad = _rewrite(tiny_omni_bytelevel, tmp_path / "bad", edit)
    ckpt = Checkpoint.open(bad)  # a folder may hold some stages only: missing tensors surface per stage
    assert ckpt.missing("audio_head") == ["audio_head.heads.3.bias"]
    with pytest.raises(ValueError, match=r"stage audio_head is missing tensor\(s\): audio_head\.heads\.3\.bias"):
        ckpt.stage("audio_head")
    assert ckpt.stage("rvq")  # other stages are unaffected
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.up_proj\.weight"):
        Backbone.from_checkpoint(ckpt)


def test_index_errors(tmp_path, tiny_omni_bytelevel):
    broken = shutil.copytree(tiny_omni_bytelevel, tmp_path / "noshard")
    os.remove(broken / "model-00002-of-00003.safetensors")
    with pytest.raises(ValueError, match="shard model-00002-of-00003.safetensors .* is missing"):
        Checkpoint.open(broken)
    lying = shutil.copytree(tiny_omni_bytelevel, tmp_path / "lying")
    idx = json.load(open(lying / INDEX_FILE))
    idx["weight_map"]["model.norm.weight"] = "model-00003-of-00003.safetensors"
    json.dump(idx, open(lying / INDEX_FILE, "w"))
    with pytest.raises(ValueError, match=r"model\.norm\.weight \(expected in model-00003"):
        Checkpoint.open(lying)
    escape = shutil.copytree(tiny_omni_bytelevel, tmp_path / "escape")
    idx = json.load(open(escape / INDEX_FILE))
    idx["weight_map"]["model.norm.weight"] = "../elsewhere.safetensors"
    json.dump(idx, open(escape / INDEX_FILE, "w"))
    with pytest.raises(ValueError, match="not a local .safetensors"):
        Checkpoint.open(escape)


def test_pickled_weights_refused(tmp_path, tiny_omni_bytelevel):
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(os.path.join(tiny_omni_bytelevel, "config.json"), folder)
    torch.save({"model.norm.weight": torch.ones(3)}, folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pickled weights .* never loaded"):
        Checkpoint.open(folder)
    with pytest.raises(ValueError, match="expected a folder"):
        Checkpoint.open(folder / "pytorch_model.bin")


def test_hf_checkpoint_stages(tmp_path):
    cfg_dict = dict(model_type="qwen2", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, intermediate_size=96, vocab_size=300, rms_norm_eps=1e-6,
                    rope_theta=1e6, tie_word_embeddings=True, torch_dtype="float32")
    cfg = parse_config(cfg_dict)
    tensors = random_tensors(cfg, seed=2)
    assert "lm_head.weight" not in tensors and "model.layers.0.self_attn.q_proj.bias" in tensors
    (tmp_path / "config.json").write_text(json.dumps(cfg_dict))
    save_file(tensors, tmp_path / "model.safetensors")
    ckpt = Checkpoint.open(tmp_path)
    assert ckpt.stage("lm_head") == []
    with pytest.raises(ValueError, match="exists only in omni checkpoints"):
        ckpt.stage("visual")
    bb = Backbone.from_checkpoint(ckpt)
    assert bb.lm_head.weight is bb.embed_tokens


# ------------------------------------------------------------------------------------------------
# GPTQ layout
# ------------------------------------------------------------------------------------------------

def _gptq_edit(cfg, group_size, fmt, store):
    """Replace every decoder linear's .weight by RTN GPTQ tensors; `store` collects (q, zeros, scales) per prefix."""
    def edit(t):
        for i in range(cfg.backbone.num_hidden_layers):
            for s in decoder_layer_specs(cfg.backbone):
                if not isinstance(s, Linear):
                    continue
                p = f"model.layers.{i}.{s.prefix}"
                w = t.pop(p + ".weight")
                q, zeros, scales, g_idx = q4.quantize_rtn(w.float(), group_size, sym=True)
                qweight, qzeros = q4.pack_gptq(q, zeros, checkpoint_format=fmt)
                t.update({p + ".qweight": qweight, p + ".qzeros": qzeros, p + ".scales": scales,
                          p + ".g_idx": g_idx})
                store[p] = (q, zeros, scales, g_idx)
        return t
    return edit


@pytest.mark.usefixtures("q4_exact")
@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
@torch.no_grad()
def test_gptq_linears_load_as_qweights(tmp_path, tiny_omni_bytelevel, fmt):
    cfg = Checkpoint.open(tiny_omni_bytelevel).config
    store = {}
    qc = {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False, "sym": True,
          "checkpoint_format": fmt}
    folder = _rewrite(tiny_omni_bytelevel, tmp_path / fmt, _gptq_edit(cfg, 32, fmt, store),
                      lambda c: c.update(quantization_config=qc))
    ckpt = Checkpoint.open(folder)
    assert ckpt.gptq.checkpoint_format == fmt and ckpt.gptq.group_size == 32
    p = "model.layers.1.self_attn.W_pack"
    assert ckpt.is_quantized(p) and not ckpt.is_quantized("lm_head")
    assert f"{p}.qweight" in ckpt.stage("backbone") and f"{p}.bias" in ckpt.stage("backbone")
    # every linear: the loaded QWeight dequantizes exactly to scales * (q - zero) of the codes we packed
    for prefix, (q, zeros, scales, g_idx) in store.items():
        qw = ckpt.linear(prefix)
        assert isinstance(qw, q4.QWeight)
        g = g_idx.long()
        want = (q.float() - zeros.float()[g]) * scales.float()[g]
        assert torch.equal(qw.dequantize(), want), prefix
    assert ckpt.linear(p).bias is not None  # W_pack keeps its bias next to the GPTQ tensors
    # the GPTQ toolchain's per-layer view
    layer = ckpt.layer_tensors(0)
    assert "model.layers.0.mlp.down_proj.qweight" in layer and layer["model.layers.0.mlp.down_proj.qweight"].dtype == torch.int32
    # the backbone from the GPTQ checkpoint equals a dense backbone holding the dequantized weights
    bq = Backbone.from_checkpoint(ckpt)
    assert all(lin.quantized for layer in bq.layers for lin in layer.linears.values())
    dense = dict(random_tensors(cfg, stages=("backbone", "lm_head")))
    dense = {k: Checkpoint.open(tiny_omni_bytelevel).get(k, dtype=torch.float32) for k in dense}
    for prefix in store:
        dense[prefix + ".weight"] = ckpt.linear(prefix).dequantize().t().contiguous()
    bd = Backbone.from_tensors(cfg.backbone, dense)
    ids = torch.tensor([[5, 17, 99, 3, 250, 7]])
    for bb in (bq, bd):
        bb.allocate_cache(8)
    a, b = bq.logits(bq.forward(ids, start=0)), bd.logits(bd.forward(ids, start=0))
    assert float((a - b).abs().max() / b.abs().max()) < 1e-4


@torch.no_grad()
def test_gptq_act_order_g_idx(tmp_path, tiny_omni_bytelevel):
    """desc_act checkpoints permute g_idx: the loader must honour it row by row."""
    cfg = Checkpoint.open(tiny_omni_bytelevel).config
    prefix = "model.layers.0.mlp.down_proj"
    n, k = cfg.backbone.hidden_size, cfg.backbone.intermediate_size
    gen = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (k, n), generator=gen, dtype=torch.uint8)
    zeros = torch.randint(0, 16, (k // 32, n), generator=gen, dtype=torch.uint8)
    scales = (torch.rand(k // 32, n, generator=gen) * 0.01 + 0.001).half()
    g_idx = (torch.randperm(k, generator=gen) // 32).to(torch.int32)
    qweight, qzeros = q4.pack_gptq(q, zeros, checkpoint_format="gptq")

    def edit(t):
        del t[prefix + ".weight"]
        t.update({prefix + ".qweight": qweight, prefix + ".qzeros": qzeros, prefix + ".scales": scales,
                  prefix + ".g_idx": g_idx})
        return t
    qc = {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": True, "sym": False}
    folder = _rewrite(tiny_omni_bytelevel, tmp_path / "act", edit, lambda c: c.update(quantization_config=qc))
    qw = Checkpoint.open(folder).linear(prefix)
    want = torch.empty(k, n)
    for row in range(k):
        gi = int(g_idx[row])
        want[row] = scales[gi].float() * (q[row].float() - zeros[gi].float())
    assert torch.equal(qw.dequantize(), want)


def test_gptq_errors(tmp_path, tiny_omni_bytelevel):
    cfg = Checkpoint.open(tiny_omni_bytelevel).config
    qc = {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False, "sym": True}
    edit = _gptq_edit(cfg, 32, "gptq", {})
    # GPTQ tensors without a quantization_config
    with pytest.raises(ValueError, match="no quantization_config"):
        Checkpoint.open(_rewrite(tiny_omni_bytelevel, tmp_path / "noqc", edit))

    def bad_zeros(t):
        t = edit(t)
        z = "model.layers.1.mlp.gate_proj.qzeros"
        t[z] = t[z][:-1].clone()
        return t
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.gate_proj\.qzeros: expected shape \(4, 32\), "
                                         r"got \(3, 32\)"):
        Checkpoint.open(_rewrite(tiny_omni_bytelevel, tmp_path / "badz", bad_zeros,
                                 lambda c: c.update(quantization_config=qc)))
    with pytest.raises(ValueError, match="only 4-bit"):
        Checkpoint.open(_rewrite(tiny_omni_bytelevel, tmp_path / "bits", edit,
                                 lambda c: c.update(quantization_config=dict(qc, bits=8))))
    with pytest.raises(ValueError, match="quant_method 'awq'"):
        Checkpoint.open(_rewrite(tiny_omni_bytelevel, tmp_path / "awq", edit,
                                 lambda c: c.update(quantization_config=dict(qc, quant_method="awq"))))
