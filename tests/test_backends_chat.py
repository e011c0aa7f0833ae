"""One bundle, every dense stage exported: greedy replies (text, and for spoken replies the text and the number
of samples) are the same with `--backend torch` and `--backend onnx`, for an audio + image question and for a
spoken reply; `describe()` says which backend runs each stage."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import wave

import numpy as np
import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

ENV = dict(os.environ, PYTHONIOENCODING="utf-8")


def omni_edge(*args):
    return subprocess.run([sys.executable, "-m", "omni_edge", *args], capture_output=True, text=True,
                          encoding="utf-8", env=ENV, timeout=600)


@pytest.fixture(scope="module")
def exported(tiny_omni, tmp_path_factory):
    from omni_edge.export.cli import export_bundle
    from omni_edge.testing import write_tiny_vocoder
    from test_export_vision import make_bundle

    d = tmp_path_factory.mktemp("exported")
    src = d / "src"
    shutil.copytree(tiny_omni, src)
    write_tiny_vocoder(d / "voc")
    shutil.copy(d / "voc" / "vocoder.safetensors", src / "vocoder.safetensors")
    out = make_bundle(src, d / "bundle")
    manifest = export_bundle(out, ["vision", "audio_encoder", "speech"], ["float32"], log=lambda *a: None)
    assert set(manifest["graphs"]) == {"vision", "audio_encoder", "audio_decoder", "flow_estimator", "vocoder"}
    return out


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    import soundfile as sf
    from PIL import Image

    d = tmp_path_factory.mktemp("media")
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (70, 100, 3), dtype=np.uint8)).save(d / "i.png")
    t = np.arange(16000) / 16000
    sf.write(str(d / "a.wav"), (0.3 * np.sin(2 * np.pi * 300 * t)).astype(np.float32), 16000)
    return d


@pytest.mark.slow
def test_audio_and_image_question_same_reply_on_both_backends(exported, media):
    got = {}
    for backend in ("torch", "onnx"):
        r = omni_edge("chat", "--model", str(exported), "--audio", str(media / "a.wav"), "--image",
                      str(media / "i.png"), "--prompt", "", "--temperature", "0", "--max-new-tokens", "8",
                      "--backend", backend, "--json")
        assert r.returncode == 0, r.stderr
        got[backend] = json.loads(r.stdout)["reply"]
    assert got["torch"] == got["onnx"]


@pytest.mark.slow
def test_spoken_reply_same_text_and_length_on_both_backends(exported, tmp_path):
    got = {}
    for backend in ("torch", "onnx"):
        out = tmp_path / f"{backend}.wav"
        r = omni_edge("chat", "--model", str(exported), "--prompt", "Hello", "--temperature", "0",
                      "--max-new-tokens", "62", "--speak", str(out), "--first-audio-frames", "4", "--backend", backend)
        assert r.returncode == 0, r.stderr
        with wave.open(str(out)) as w:
            got[backend] = (r.stdout, w.getnframes())
    assert got["torch"] == got["onnx"] and got["torch"][1] > 0


def test_describe_names_the_backend_of_each_stage(exported):
    from omni_edge import pipeline

    m = pipeline.load(exported, backend=["onnx", "vocoder=torch"])
    m.stage("speech"), m.stage("vocoder")
    stages = m.describe()["stages"]
    assert "onnx" in stages["speech"] and "torch" in stages["vocoder"]
