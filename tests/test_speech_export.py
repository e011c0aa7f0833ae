"""ONNX export of the speech chain (export/speech.py) on the tiny checkpoint and the tiny vocoder.

Each graph is checked by the exporter itself (onnx checker, strict shape inference, no data-dependent ops)
and its parity against the fp32 torch module measured in onnxruntime; here we check what it records, that
the graphs really have dynamic lengths (run at lengths other than the export example, across the 100-frame
chunk boundary), and that `omni_edge.backends` picks them and the chain then matches the torch chain.
Tolerances: fp32 graphs differ from torch by kernel summation order (1e-4 of the output scale, the exporter's
bound); the whole mel through 20 estimator graph calls at 2e-4 absolute like the fp32 oracle tests; fp16 graphs
are held to the exporter's stated FP16_BOUND.
"""

import importlib
import json

import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from omni_edge import backends  # noqa: E402
from omni_edge.checkpoint import Checkpoint  # noqa: E402
from omni_edge.speech import NoiseBuffer, SpeechDecoder, mel_frames  # noqa: E402
from omni_edge.vocoder import Vocoder, VocoderNoise  # noqa: E402


def _export_module():
    for name in ("omni_edge.export.speech", "export.speech"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    pytest.skip("the export package is not importable")


@pytest.fixture(scope="module", autouse=True)
def _single_thread(one_thread):  # tests/conftest.py: tiny ops run single-threaded
    yield


@pytest.fixture(scope="module")
def setup(tiny_omni_bytelevel, tmp_path_factory):
    from omni_edge.testing import write_tiny_vocoder
    ckpt = Checkpoint.open(tiny_omni_bytelevel)
    speech = SpeechDecoder.from_checkpoint(ckpt, ckpt.config, backend="torch")
    voc = Vocoder.from_file(write_tiny_vocoder(tmp_path_factory.mktemp("voc"))[0])
    bundle = tmp_path_factory.mktemp("bundle")
    manifest = {}
    ex = _export_module()
    entries = {"float32": ex.export(bundle, manifest, "float32", speech=speech, vocoder=voc),
               "float16": ex.export(bundle, manifest, "float16", speech=speech, vocoder=voc)}
    (bundle / "omni_edge.json").write_text(json.dumps(manifest))
    return ckpt, speech, voc, bundle, manifest, entries, ex


def test_entries_and_graph_checks(setup):
    import onnx
    _, _, _, bundle, manifest, entries, ex = setup
    assert set(manifest["graphs"]) == {"audio_decoder", "flow_estimator", "vocoder"}
    assert "float16" not in manifest["graphs"]["vocoder"]  # the vocoder stays fp32
    for stage, by_prec in manifest["graphs"].items():
        for prec, e in by_prec.items():
            bound = ex.FP32_BOUND if prec == "float32" else ex.FP16_BOUND
            assert e["parity"]["max_rel"] <= bound, (stage, prec, e["parity"])
            model = onnx.load(str(bundle / e["file"]))
            ops = {n.op_type for n in model.graph.node}
            assert not ops & ex.FORBIDDEN_OPS
            # dynamic length axes, nothing baked
            dims = [d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim]
            assert any(dims), (stage, dims)
    est = manifest["graphs"]["flow_estimator"]["float32"]
    assert est["inputs"] == ["x", "mu", "t"]
    assert [c["x"] for c in est["parity"]["cases"]] == [[2, 80, 37], [2, 80, 213]]  # crosses a chunk boundary


def test_backend_selection_and_chain_parity(setup):
    ckpt, speech, voc, bundle, manifest, _, _ = setup
    onnx_speech = SpeechDecoder.from_checkpoint(ckpt, ckpt.config, backend="auto", bundle_dir=bundle,
                                                manifest=manifest, threads=1)
    assert onnx_speech.picks["flow_estimator"].kind == "onnx" and onnx_speech.picks["audio_decoder"].kind == "onnx"
    assert "flow_estimator.onnx" in onnx_speech.describe()
    g = torch.Generator().manual_seed(3)
    codes = torch.stack([torch.randint(0, n, (33,), generator=g) for n in speech.codebook_sizes], 1)  # 131 frames
    z = NoiseBuffer(2).take(0, mel_frames(33))
    want = speech.mel(codes, z)
    got = onnx_speech.mel(codes, z)
    assert got.shape == want.shape == (80, 131)
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)
    # the vocoder trunk graph inside the vocoder
    pick = backends.resolve("vocoder", "onnx", bundle, manifest)
    graph = pick.open(threads=1)
    trunk = lambda mel, s: graph.run(mel=mel, s_stft=s)[0]  # noqa: E731
    w_onnx = voc(want, VocoderNoise(1), trunk_fn=trunk)
    w_torch = voc(want, VocoderNoise(1))
    assert w_onnx.shape == w_torch.shape == (480 * 131,)
    torch.testing.assert_close(w_onnx, w_torch, atol=1e-4, rtol=0)


def test_torch_backend_forced(setup):
    ckpt, _, _, bundle, manifest, _, _ = setup
    s = SpeechDecoder.from_checkpoint(ckpt, ckpt.config, backend="torch", bundle_dir=bundle, manifest=manifest)
    assert s.picks["flow_estimator"].kind == "torch"
    with pytest.raises(backends.BackendError, match="no float32 ONNX graph"):
        SpeechDecoder.from_checkpoint(ckpt, ckpt.config, backend="flow_estimator=onnx")


def test_bad_precision(setup):
    _, speech, _, bundle, _, _, ex = setup
    with pytest.raises(ValueError, match="precision"):
        ex.export(bundle, None, "int8", speech=speech)
