"""`omni-edge export BUNDLE --stages vision`: the graph's checks, its parity with the torch stage in onnxruntime
over several shapes, the manifest entry, atomic writing, and the stage's backend choice.

The bundles here are the tiny checkpoint's files plus a manifest that lists them (what `bundle.validate` checks);
`omni-edge quantize` writes real ones (tests/test_bundle.py) and takes a minute, which these tests do not need."""

import json
import os
import shutil
import types

import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from omni_edge import bundle  # noqa: E402
from omni_edge.checkpoint import Checkpoint  # noqa: E402
from omni_edge.export import common  # noqa: E402
from omni_edge.export import vision as export_vision  # noqa: E402
from omni_edge.export.cli import export_bundle, run  # noqa: E402
from omni_edge.testing import write_tiny_checkpoint  # noqa: E402
from omni_edge.vision import VisionStage  # noqa: E402

VISUAL = {"embed_dim": 160, "num_heads": 2, "depth": 2}  # head_dim 80 as the real tower
# Shapes not seen at export: one image, many small ones, a video's frames, a long thin one.
SHAPES = [[(1, 8, 12)], [(1, 2, 2)] * 5, [(1, 4, 6), (1, 4, 6), (1, 4, 6)], [(1, 2, 30), (1, 12, 2)]]
# onnxruntime fp32 graph vs the torch stage in fp32: same math in another order (MLAS GEMMs, one masked softmax
# over all patches vs the varlen kernel's online softmax): 1e-5 of the output's magnitude.
FP32_TOL = 1e-5
# fp16 graph (weights and activations rounded to 11-bit mantissas, scores and softmax in fp32) vs torch fp32.
FP16_TOL = 3e-2


def quiet(_):
    pass


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("export_src") / "ckpt", seed=5, dtype="float32",
                                 config_overrides={"visual_config": VISUAL})


def make_bundle(src, out):
    """A bundle folder holding the checkpoint's files, listed (size, sha256) in its manifest."""
    shutil.copytree(src, out)
    files = {f.name: {"bytes": f.stat().st_size, "sha256": bundle.sha256_of(f)}
             for f in sorted(out.iterdir()) if f.is_file()}
    shards = [n for n in files if n.endswith(".safetensors")]
    manifest = {"format": bundle.FORMAT, "format_version": bundle.FORMAT_VERSION, "created_by": "test",
                "source": {"kind": "omni"}, "files": files,
                "modules": {"visual": {"files": shards, "precision": "float32"}}}
    (out / bundle.MANIFEST).write_text(json.dumps(manifest, indent=2))
    return out


@pytest.fixture(scope="module")
def exported(src, tmp_path_factory):
    out = make_bundle(src, tmp_path_factory.mktemp("export_bundle") / "bundle")
    export_bundle(out, ["vision"], ["float32", "float16"], log=quiet)
    return out


def rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def patches_for(grids, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(sum(t * h * w for t, h, w in grids), 1176, generator=g)


def test_manifest_lists_checked_graphs(exported):
    import onnx

    manifest = bundle.validate(exported, deep=True)  # sizes and hashes of the new files too
    graphs = manifest["graphs"]["vision"]
    assert set(graphs) == {"float32", "float16"}
    for precision, entry in graphs.items():
        assert entry["inputs"] == ["patches", "cos", "sin", "segment_ids"] and entry["outputs"] == ["embeddings"]
        assert entry["opset"] == 17 and entry["precision"] == precision
        assert entry["parity"]["max_rel"] <= export_vision.TOLERANCE[precision]
        assert len(entry["parity"]["cases"]) == len(export_vision.CASES)
        path = exported / entry["file"]
        common.check_graph(path)  # checker, strict shape inference, op set
        model = onnx.load(str(path))
        assert {i.name: i.type.tensor_type.elem_type for i in model.graph.input} == {
            "patches": onnx.TensorProto.FLOAT if precision == "float32" else onnx.TensorProto.FLOAT16,
            "cos": onnx.TensorProto.FLOAT, "sin": onnx.TensorProto.FLOAT, "segment_ids": onnx.TensorProto.INT64}
        # the patch count is a symbolic dimension: any number of patches and images
        assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "patches"
        assert not {n.op_type for n in model.graph.node} & common.DATA_DEPENDENT_OPS
    assert not [p for p in os.listdir(exported) if p.startswith(".")]  # no scratch or temporary files left


@pytest.mark.parametrize("precision,dtype,tol", [("float32", torch.float32, FP32_TOL),
                                                 ("float16", torch.float16, FP16_TOL)])
def test_onnx_backend_matches_torch_backend(exported, precision, dtype, tol):
    manifest = bundle.read_manifest(exported)
    ckpt = Checkpoint.open(exported)
    try:
        onnx_stage = VisionStage.from_checkpoint(ckpt, ckpt.config, dtype=dtype, backend="auto",
                                                 bundle_dir=exported, manifest=manifest, threads=2)
        torch_stage = VisionStage.from_checkpoint(ckpt, ckpt.config, dtype=torch.float32, backend="torch",
                                                  bundle_dir=exported, manifest=manifest)
    finally:
        ckpt.close()
    assert onnx_stage.pick.kind == "onnx" and onnx_stage.tower is None
    assert export_vision.FILES[precision] in onnx_stage.describe()
    assert "torch (asked for)" in torch_stage.describe()
    for i, grids in enumerate(SHAPES):
        x = patches_for(grids, seed=100 + i)
        got, want = onnx_stage.run(x, grids), torch_stage.run(x, grids)
        assert got.dtype == dtype and got.shape == want.shape
        assert rel(got, want) <= tol, (grids, rel(got, want))


def test_external_data_and_plain_folder(src, tmp_path):
    out = make_bundle(src, tmp_path / "b")
    manifest = export_bundle(out, ["vision"], ["float32"], log=quiet, external_data_above=0)
    entry = manifest["graphs"]["vision"]["float32"]
    assert entry["data"] == ["vision.onnx.data"] and (out / "vision.onnx.data").stat().st_size > 100_000
    assert (out / "vision.onnx").stat().st_size < 100_000
    bundle.validate(out, deep=True)
    ckpt = Checkpoint.open(out)
    stage = VisionStage.from_checkpoint(ckpt, ckpt.config, backend="onnx", bundle_dir=out,
                                        manifest=bundle.read_manifest(out))
    assert stage.run(patches_for([(1, 2, 4)], 0), [(1, 2, 4)]).shape == (2, ckpt.config.visual.hidden_size)
    ckpt.close()
    # a plain checkpoint folder is refused with a one-line error
    with pytest.raises(common.ExportError, match="not an omni-edge bundle"):
        export_bundle(src, ["vision"], ["float32"], log=quiet)


def test_failed_parity_leaves_the_bundle_untouched(src, tmp_path, monkeypatch):
    out = make_bundle(src, tmp_path / "b")
    before = sorted(os.listdir(out)), (out / bundle.MANIFEST).read_bytes()
    monkeypatch.setitem(export_vision.TOLERANCE, "float32", 0.0)  # any difference now fails the check
    with pytest.raises(common.ExportError, match="differs from the torch stage"):
        export_bundle(out, ["vision"], ["float32"], log=quiet)
    assert (sorted(os.listdir(out)), (out / bundle.MANIFEST).read_bytes()) == before


def test_cli_errors_are_one_line(src, exported):
    from omni_edge.cli import CliError

    def args(**kw):
        base = dict(bundle=str(exported), stages="vision", precision="float32", opset=17, threads=None)
        return types.SimpleNamespace(**{**base, **kw})

    for kw, msg in (({"stages": "vision,teleport"}, "--stages"), ({"precision": "int4"}, "--precision"),
                    ({"bundle": str(src)}, "not an omni-edge bundle"), ({"opset": 9}, "--opset"),
                    ({"bundle": str(exported / "nope")}, "not a folder")):
        with pytest.raises(CliError, match=msg) as info:
            run(args(**kw))
        assert "\n" not in str(info.value)


def test_auto_falls_back_to_torch_without_the_graph(exported, tmp_path):
    manifest = json.loads((exported / bundle.MANIFEST).read_text())
    del manifest["graphs"]
    ckpt = Checkpoint.open(exported)
    try:
        stage = VisionStage.from_checkpoint(ckpt, ckpt.config, backend="auto", bundle_dir=exported, manifest=manifest)
        assert stage.pick.kind == "torch" and "--stages vision" in stage.describe()
        with pytest.raises(ValueError, match="vision=onnx"):
            VisionStage.from_checkpoint(ckpt, ckpt.config, backend="onnx", bundle_dir=exported, manifest=manifest)
    finally:
        ckpt.close()
