"""config.json parsing: the full omni config, plain Hugging Face configs, missing and unknown keys."""

import copy
import json

import pytest

from omni_edge.config import load_config, parse_config
from omni_edge.testing import SPECIAL_TOKENS, reference_config


def test_reference_omni_config_fields():
    cfg = parse_config(reference_config())
    assert cfg.kind == "omni"
    b = cfg.backbone
    # docs/MODEL.md §1.5
    assert (b.num_hidden_layers, b.hidden_size, b.num_attention_heads, b.num_key_value_heads, b.head_dim) == \
        (28, 3584, 28, 4, 128)
    assert (b.intermediate_size, b.vocab_size, b.rope_theta, b.rms_norm_eps) == (18944, 152064, 1e6, 1e-6)
    assert b.qkv_bias and b.packed_qkv and not b.tie_word_embeddings
    assert b.torch_dtype == "bfloat16" and b.max_position_embeddings == 8192
    assert b.qkv_size == 3584 + 512 + 512
    # §3.2 sections
    a = cfg.audio
    assert (a.d_model, a.encoder_layers, a.encoder_attention_heads, a.encoder_ffn_dim) == (1280, 32, 20, 5120)
    assert (a.decoder_layers, a.avg_pooler, a.num_mel_bins, a.audio_head_transformer_layers) == (8, 4, 128, 3)
    assert a.codebook_sizes == [8192, 4096, 2048, 1024, 1024, 1024, 1024, 1024]
    assert (a.encoder_positions, a.decoder_positions, a.bridge_dim) == (1500, 3000, 5120)
    assert (a.audio_start_token_id, a.audio_pad_token_id, a.audiogen_start_token_id) == (151676, 151678, 151700)
    v, vid = cfg.visual, cfg.video
    assert (v.embed_dim, v.depth, v.num_heads, v.mlp_dim, v.hidden_size) == (1280, 32, 16, 5120, 3584)
    assert (v.max_pixels, vid.max_pixels, vid.max_frame_num, vid.decode_way) == (3211264, 602112, 32, "1fps")
    assert (vid.video_place_token_id, vid.video_start_token_id, v.image_pad_token_id) == (151694, 151695, 151681)
    fm = cfg.flow_matching
    assert (fm.prenet_d_model, fm.prenet_nlayers, fm.channels, fm.n_blocks, fm.num_mid_blocks) == (512, 12, [256], 4, 12)
    assert (fm.diffusion_steps, fm.cfm_params.inference_cfg_rate, fm.cfm_params.t_scheduler) == (10, 0.7, "cosine")
    assert cfg.vocoder.channels == [256] * 5 and cfg.vocoder.num_mel_bins == 80
    assert cfg.quantization is None
    # unknown keys are kept, not dropped
    assert v.extra["image_size"] == 224 and b.extra["sliding_window"] == 131072
    assert fm.cfm_params.extra == {"reg_loss_type": "l1"}
    assert cfg.raw["multimodal"] == ["audio", "image", "video", "audiogen"]


def test_special_token_table_matches_model_md():
    ids = [i for _, i, _ in SPECIAL_TOKENS]
    assert ids == list(range(151643, 151702))  # 59 added tokens
    names = {c: i for c, i, _ in SPECIAL_TOKENS}
    assert names["<B_SYS>"] == 151665 and names["<C_Q>"] == 151667 and names["<C_A>"] == 151668
    assert names["<audiotext_start_baichuan>"] == 151697 and names["<audiogen_end_baichuan>"] == 151701
    assert names["<video_palce_baichuan>"] == 151694 and names["<img_delim_baichuan>"] == 151688


@pytest.mark.parametrize("path,key", [
    ((), "hidden_size"),
    ((), "rms_norm_eps"),
    (("audio_config",), "d_model"),
    (("audio_config",), "audio_pad_token_id"),
    (("visual_config",), "embed_dim"),
    (("video_config",), "video_place_token_id"),
    (("flow_matching_config",), "channels"),
    (("vocoder_config",), "num_mel_bins"),
])
def test_missing_required_key_is_named(path, key):
    d = reference_config()
    sub = d
    for p in path:
        sub = sub[p]
    del sub[key]
    with pytest.raises(ValueError, match=f"missing required key.*{key}"):
        parse_config(d)


def test_missing_section_and_codebooks():
    d = reference_config()
    del d["vocoder_config"]
    with pytest.raises(ValueError, match="vocoder_config"):
        parse_config(d)
    d = reference_config()
    del d["audio_config"]["vq_config"]
    with pytest.raises(ValueError, match="vq_config.codebook_sizes"):
        parse_config(d)


def test_bad_values():
    d = reference_config()
    d["num_key_value_heads"] = 5
    with pytest.raises(ValueError, match="multiple of num_key_value_heads=5"):
        parse_config(d)
    d = reference_config()
    d["use_norm_head"] = True
    with pytest.raises(ValueError, match="use_norm_head"):
        parse_config(d)
    d = reference_config()
    d["torch_dtype"] = "float8"
    with pytest.raises(ValueError, match="torch_dtype"):
        parse_config(d)


def _hf(model_type, **kw):
    d = dict(model_type=model_type, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
             intermediate_size=96, vocab_size=300, rms_norm_eps=1e-5, max_position_embeddings=512)
    d.update(kw)
    return d


def test_hf_llama_and_qwen2_configs():
    # transformers 5 style: rope_parameters; defaults for head_dim and num_key_value_heads
    c = parse_config(_hf("llama", rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
                         tie_word_embeddings=True, dtype="float32"))
    b = c.backbone
    assert c.kind == "hf" and c.audio is None and c.flow_matching is None
    assert (b.head_dim, b.num_key_value_heads, b.rope_theta) == (16, 4, 100000.0)
    assert not b.packed_qkv and not b.qkv_bias and b.tie_word_embeddings and b.torch_dtype == "float32"
    # transformers 4 style: rope_theta at the top; Qwen2 always has q/k/v biases
    c = parse_config(_hf("qwen2", rope_theta=1e6, num_key_value_heads=2, torch_dtype="bfloat16"))
    assert c.backbone.qkv_bias and c.backbone.rope_theta == 1e6 and c.backbone.num_key_value_heads == 2
    assert parse_config(_hf("llama", attention_bias=True)).backbone.qkv_bias
    with pytest.raises(ValueError, match="rope_type 'llama3' is not supported"):
        parse_config(_hf("llama", rope_scaling={"rope_type": "llama3", "factor": 8.0}))
    with pytest.raises(ValueError, match="model_type"):
        parse_config(_hf("gpt2"))
    with pytest.raises(ValueError, match="missing required key.*vocab_size"):
        d = _hf("llama")
        del d["vocab_size"]
        parse_config(d)


def test_quantization_config_kept():
    d = reference_config()
    d["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False,
                                "sym": True, "checkpoint_format": "gptq"}
    assert parse_config(d).quantization["group_size"] == 128


def test_load_config_file_and_folder(tmp_path):
    d = reference_config()
    (tmp_path / "config.json").write_text(json.dumps(d))
    assert load_config(tmp_path).backbone.hidden_size == 3584
    assert load_config(tmp_path / "config.json").raw == d
    with pytest.raises(ValueError, match="no config.json"):
        load_config(tmp_path / "nowhere")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_config(tmp_path)


def test_tiny_checkpoint_config_matches_reference_keys(tiny_omni):
    """The tiny checkpoint's config.json has exactly the real config's keys, section by section."""
    tiny = json.loads(open(f"{tiny_omni}/config.json").read())
    ref = reference_config()

    def keys(d, prefix=""):
        out = set()
        for k, v in d.items():
            out.add(prefix + k)
            if isinstance(v, dict):
                out |= keys(v, prefix + k + ".")
        return out
    assert keys(tiny) == keys(copy.deepcopy(ref))
    cfg = load_config(tiny_omni)
    assert cfg.backbone.vocab_size >= 151702 and cfg.audio.audio_start_token_id == 151676
