"""audio_encoder.onnx: export of the tiny checkpoint's encoder + bridge, onnxruntime parity (fp32, fp16), the
graph rules, and the stage running on the graph through `omni_edge.backends`."""

import json

import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

try:
    from export import audio_encoder as ax
except ImportError:  # installed layout
    from omni_edge.export import audio_encoder as ax

from omni_edge import audio_in

pytestmark = pytest.mark.slow  # two exports + parity runs: ~40 s on 2 loaded cores


@pytest.fixture(scope="module")
def exported(tiny_omni, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundle")
    manifest = {"format": "omni-edge-bundle"}
    entries = {p: ax.export(out, manifest, p, source=tiny_omni, threads=2) for p in ("float32", "float16")}
    return out, manifest, entries


def test_export_writes_checked_graphs_with_parity(exported):
    import onnx

    out, manifest, entries = exported
    for precision, entry in entries.items():
        assert manifest["graphs"]["audio_encoder"][precision] is entry
        assert (out / entry["file"]).is_file() and (out / entry["data"][0]).is_file()
        rep = entry["parity"]
        assert rep["max_rel"] <= ax.TOLERANCE[precision], rep
        model = onnx.load(str(out / entry["file"]), load_external_data=False)
        assert not {n.op_type for n in model.graph.node} & ax.DATA_DEPENDENT_OPS
        dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
        assert dims["mel"][0] == "batch" and dims["mel"][2] == "frames"  # dynamic batch and length
    assert entries["float32"]["parity"]["max_rel"] < 1e-4
    json.dumps(manifest)  # the entry is plain JSON


def test_stage_on_the_onnx_backend_matches_torch(exported, tiny_omni):
    from omni_edge.checkpoint import Checkpoint

    out, manifest, _ = exported
    ckpt = Checkpoint.open(tiny_omni)
    cfg = ckpt.config
    onnx_stage = audio_in.AudioEncoderStage.from_checkpoint(ckpt, cfg, backend="onnx", bundle_dir=out,
                                                            manifest=manifest, threads=2)
    torch_stage = audio_in.AudioEncoderStage.from_checkpoint(ckpt, cfg, backend="torch")
    assert "onnx" in onnx_stage.describe() and "audio_encoder.onnx" in onnx_stage.describe()
    g = torch.Generator().manual_seed(9)
    items = [audio_in.audio_from_wave(torch.randn(n, generator=g) * 0.1, 16000, cfg.audio, source=f"s{n}")
             for n in (16000 * 2 + 123, 5000)]
    fo, ft = onnx_stage.features(items), torch_stage.features(items)
    for a, b, it in zip(fo, ft, items):
        assert a.shape == b.shape == (it.n_tokens, cfg.audio.bridge_dim)
        # padded-mask graph in onnxruntime vs varlen torch, fp32: summation order only
        torch.testing.assert_close(a, b, atol=1e-4 * b.abs().max().item(), rtol=0)
    co = onnx_stage.codes(items)
    assert [c.shape for c in co] == [(it.n_tokens, 8) for it in items]


def test_fp16_graph_selected_for_fp16_stage_and_bad_precision(exported):
    from omni_edge import backends

    out, manifest, _ = exported
    pick = backends.resolve("audio_encoder", "auto", out, manifest, "cpu", "float16")
    assert pick.kind == "onnx" and pick.path.endswith("audio_encoder.fp16.onnx")
    with pytest.raises(ValueError, match="precision"):
        ax.export_modules(None, None, out, "int8")
