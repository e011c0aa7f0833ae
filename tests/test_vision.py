"""The vision stage against transformers' Qwen2-VL vision tower on shared random weights (the tiny checkpoint's
tensors, loaded by their real names), several odd-size images in one batch; fp32, bf16, fp16; errors."""

import pytest
import torch

from omni_edge.checkpoint import Checkpoint
from omni_edge.inputs import VisualInput
from omni_edge.testing import write_tiny_checkpoint
from omni_edge.ops.attention import varlen_ref
from omni_edge.vision import VisionStage, cu_seqlens_of, grouped_sdpa, rotary_cos_sin, rotary_ids

# head_dim 80 as in the real tower (embed 160 / 2 heads), 3 layers, bridge to 128
VISUAL = {"embed_dim": 160, "num_heads": 2, "depth": 3}
# several images / frames in one call: odd patch counts (h, w multiples of the merge size 2 only)
GRIDS = [(1, 6, 10), (1, 2, 2), (1, 14, 4), (1, 4, 18)]
# equal-size frames apart and back to back (grouped SDPA's gather and view paths)
MIXED = [(1, 4, 6), (1, 2, 2), (1, 4, 6), (1, 6, 4), (1, 2, 2), (1, 2, 2)]
ATTENTION = ["varlen", "sdpa"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = write_tiny_checkpoint(tmp_path_factory.mktemp("vision_ckpt"), seed=3, dtype="float32",
                                 config_overrides={"visual_config": VISUAL})
    c = Checkpoint.open(path)
    yield c
    c.close()


def hf_tower(ckpt, dtype):
    """transformers' Qwen2VisionTransformerPretrainedModel holding the checkpoint's visual tensors; its merger has
    the bridge's shape, so the bridge tensors load into it."""
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

    v = ckpt.config.visual
    hc = Qwen2VLVisionConfig(depth=v.depth, embed_dim=v.embed_dim, hidden_size=v.hidden_size, hidden_act="quick_gelu",
                             mlp_ratio=int(v.mlp_ratio) if float(v.mlp_ratio).is_integer() else v.mlp_ratio, num_heads=v.num_heads, in_channels=v.in_channels,
                             patch_size=v.patch_size, spatial_merge_size=v.spatial_merge_size,
                             temporal_patch_size=v.temporal_patch_size)
    hc._attn_implementation = "eager"
    model = Qwen2VisionTransformerPretrainedModel(hc).eval()
    sd = {}
    for name, t in ckpt.stage_tensors("visual").items():
        sd[name[len("model.visual_model."):]] = t
    for name, t in ckpt.stage_tensors("visual_bridge").items():
        sd["merger." + name[len("model.visual_bridge_model."):]] = t
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and all("inv_freq" in m for m in missing), (missing, unexpected)
    return model.to(dtype)


def hf_run(model, patches, grids, dtype):
    with torch.no_grad():
        out = model(hidden_states=patches.to(dtype), grid_thw=torch.tensor(grids))
    return out.pooler_output


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def patches_for(grids, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(sum(t * h * w for t, h, w in grids), 1176, generator=g)


def test_rotary_ids_follow_the_merge_order():
    # a 4x4 grid: the first 2x2 group is (0,0) (0,1) (1,0) (1,1), then the group to its right
    ids = rotary_ids([(1, 4, 4)], 2)
    assert ids[:8].tolist() == [[0, 0], [0, 1], [1, 0], [1, 1], [0, 2], [0, 3], [1, 2], [1, 3]]
    assert ids.shape == (16, 2) and sorted(map(tuple, ids.tolist())) == [(r, c) for r in range(4) for c in range(4)]
    # two temporal slices repeat the ids; offsets mark one segment per slice
    assert rotary_ids([(2, 2, 2)], 2).tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]] * 2
    assert cu_seqlens_of([(2, 2, 2), (1, 4, 2)]).tolist() == [0, 4, 8, 16]


def test_rotary_tables_match_transformers():
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLVisionRotaryEmbedding

    hc = Qwen2VLVisionConfig(embed_dim=1280, num_heads=16)
    rope = Qwen2VLVisionRotaryEmbedding(hc)
    grids = [(1, 6, 10), (1, 4, 2)]
    ids = rotary_ids(grids, 2)
    want_cos, want_sin = rope(torch.zeros(1), ids)  # ids (P, 2): row, column
    cos, sin = rotary_cos_sin(grids, 80, 2)
    # same fp32 formula: bit-exact
    assert torch.equal(cos, want_cos.reshape(cos.shape)) and torch.equal(sin, want_sin.reshape(sin.shape))


def test_grouped_sdpa_is_block_diagonal():
    g = torch.Generator().manual_seed(2)
    lengths = [5, 0, 7, 5, 5, 3, 7]
    q, k, v = (torch.randn(sum(lengths), 3, 80, generator=g) for _ in range(3))
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    want = varlen_ref(q, k, v, cu)
    # fp32 on both sides: only the summation order differs
    assert (grouped_sdpa(q, k, v, lengths) - want).abs().max().item() <= 1e-5


@pytest.mark.parametrize("attention", ATTENTION)
@pytest.mark.parametrize("grids", [GRIDS, MIXED], ids=["sizes", "frames"])
def test_fp32_matches_transformers(ckpt, attention, grids):
    stage = VisionStage.from_checkpoint(ckpt, ckpt.config, backend="torch", dtype=torch.float32, attention=attention)
    model = hf_tower(ckpt, torch.float32)
    patches = patches_for(grids)
    got = stage.run(patches, grids)
    want = hf_run(model, patches, grids, torch.float32)
    assert got.shape == want.shape == (sum(h * w for _, h, w in grids) // 4, ckpt.config.visual.hidden_size)
    # fp32 on both sides; only summation order differs (GEMM blocking, the attention kernels' softmax order)
    assert rel_err(got, want) < 1e-4


@pytest.mark.parametrize("attention", ATTENTION)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_within_twice_transformers_error(ckpt, dtype, attention):
    """Our bf16 / fp16 error against the fp32 transformers tower is at most 2x that of the transformers tower
    run in the same dtype (the flash-attention rule), with a floor of one unit in the last place of the
    output's magnitude."""
    stage = VisionStage.from_checkpoint(ckpt, ckpt.config, backend="torch", dtype=dtype, attention=attention)
    patches = patches_for(GRIDS, seed=1)
    ref = hf_run(hf_tower(ckpt, torch.float32), patches, GRIDS, torch.float32)
    peer = hf_run(hf_tower(ckpt, dtype), patches, GRIDS, dtype)
    got = stage.run(patches, GRIDS)
    assert got.dtype == dtype
    floor = torch.finfo(dtype).eps
    assert rel_err(got, ref) <= 2 * max(rel_err(peer, ref), floor), (rel_err(got, ref), rel_err(peer, ref))


def test_embed_packs_items_and_splits_them_back(ckpt):
    """One call over several items equals each item alone: attention never crosses images or frames."""
    stage = VisionStage.from_checkpoint(ckpt, ckpt.config, backend="torch", dtype=torch.float32)
    items = [VisualInput("image", "a.png", patches_for([(1, 6, 10)], 5), [(1, 6, 10)], "a"),
             VisualInput("video", "b.mp4", patches_for([(1, 4, 2), (1, 4, 2)], 6), [(1, 4, 2), (1, 4, 2)], "b"),
             VisualInput("image", "c.png", patches_for([(1, 2, 2)], 7), [(1, 2, 2)], "c")]
    assert [it.n_tokens for it in items] == [15, 4, 1]
    assert items[1].frame_tokens == [2, 2]
    together = stage.embed(items)
    assert [t.shape[0] for t in together] == [15, 4, 1]
    for item, got in zip(items, together):
        alone = stage.run(item.patches, item.grid_thw)
        assert (got - alone).abs().max().item() <= 1e-5 * alone.abs().max().item()
    frame = stage.run(items[1].patches[:8], [(1, 4, 2)])
    assert torch.allclose(together[1][:2], frame, rtol=0, atol=1e-5 * frame.abs().max().item())
    assert stage.embed([]) == []


def test_describe_and_clean_errors(ckpt):
    stage = VisionStage.from_checkpoint(ckpt, ckpt.config, backend="torch", dtype="float32")
    assert "torch" in stage.describe() and "float32" in stage.describe() and "attention sdpa" in stage.describe()
    with pytest.raises(ValueError, match="attention must be one of"):
        VisionStage.from_checkpoint(ckpt, ckpt.config, backend="torch", attention="flash")
    with pytest.raises(ValueError, match=r"patches must be \(P, 1176\)"):
        stage.run(torch.zeros(4, 1000), [(1, 2, 2)])
    with pytest.raises(ValueError, match="needs 8"):
        stage.run(torch.zeros(4, 1176), [(1, 2, 4)])
    with pytest.raises(ValueError, match="multiples of 2"):
        stage.run(torch.zeros(6, 1176), [(1, 2, 3)])
    with pytest.raises(ValueError, match="dtype must be one of"):
        VisionStage.from_checkpoint(ckpt, ckpt.config, backend="torch", dtype="int8")
    with pytest.raises(ValueError, match="backend must be one of"):
        VisionStage.from_checkpoint(ckpt, ckpt.config, backend="tensorrt")
    # auto on a plain checkpoint folder: torch, and it says why
    auto = VisionStage.from_checkpoint(ckpt, ckpt.config, backend="auto", bundle_dir=ckpt.path, manifest=None)
    assert auto.tower is not None and "not a bundle" in auto.describe()
