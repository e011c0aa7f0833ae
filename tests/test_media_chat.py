"""Image and video chat end to end on the tiny checkpoint, as a user runs it (`omni-edge chat --image/--video`
with its default flags and --temperature 0), against a torch-reference run of the same pipeline written out
step by step here: load the media, run the vision stage's torch module, put its rows at the pad positions, and
decode greedily with whole-sequence forwards. Also: the ONNX backend gives the same replies as torch on one
bundle, and every bad file of the loaders' corpus is refused inside an interactive session that goes on."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from omni_edge import pipeline
from omni_edge.inputs import load_image, load_video
from omni_edge.testing import greedy_on_embeddings
from omni_edge.vision import VisionStage

from test_inputs import bad_image_corpus, bad_video_corpus, write_video

ENV = dict(os.environ, PYTHONIOENCODING="utf-8")
N = 6


def omni_edge(*args, stdin: str = ""):
    return subprocess.run([sys.executable, "-m", "omni_edge", *args], input=stdin, capture_output=True,
                          text=True, encoding="utf-8", env=ENV, timeout=300)


def rgb(h, w, seed):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    Image.fromarray(rgb(90, 130, 1)).save(d / "a.png")
    Image.fromarray(rgb(90, 130, 2)).save(d / "b.png")  # same size: same pad run, other content
    write_video(d / "v.mov", [rgb(56, 84, 10 + i) for i in range(7)], fps=2)
    return d


@pytest.fixture(scope="module")
def model(tiny_omni):
    return pipeline.load(tiny_omni, max_context=512)


def reference_reply(model, media_items, text: str, n: int = N):
    """Greedy reply computed the plain way: torch vision tower, explicit embeddings, full forwards."""
    tok, bb = model.tokenizer, model.backbone
    t = tok.token_id
    stage = VisionStage.from_checkpoint(model.checkpoint, model.config, dtype=bb.dtype, backend="torch")
    ids = [t("<B_SYS>"), t("<C_Q>")]
    rows = {}
    for kind, item in media_items:
        r = stage.embed([item])[0]
        pad = t("<img_pad_baichuan>") if kind == "image" else t("<video_palce_baichuan>")
        frames = item.frame_tokens if kind == "video" else [item.n_tokens]
        k = 0
        for f in frames:
            ids.append(t("<img_start_baichuan>"))
            for _ in range(f):
                rows[len(ids)] = r[k]
                ids.append(pad)
                k += 1
            ids.append(t("<img_end_baichuan>"))
        assert k == r.shape[0]
    ids += tok.encode(text) + [t("<C_A>")]
    return greedy_on_embeddings(model, ids, rows, n)


def test_image_chat_equals_the_torch_reference(tiny_omni, model, media):
    img = load_image(media / "a.png", model.config.visual)
    want = reference_reply(model, [("image", img)], "What is in the picture?")
    r = omni_edge("chat", "--model", tiny_omni, "--image", str(media / "a.png"), "--prompt",
                  "What is in the picture?", "--temperature", "0", "--max-new-tokens", str(N), "--stats")
    assert r.returncode == 0, r.stderr
    assert r.stdout == want + "\n"
    assert f"image_tokens={img.n_tokens}" in r.stderr and "image_stage_s=" in r.stderr


def test_video_and_two_images_in_one_message(tiny_omni, model, media):
    vid = load_video(media / "v.mov", model.config.video)
    assert len(vid.grid_thw) == 4  # 7 frames at 2 fps: frames 0, 2, 4, 6
    a = load_image(media / "a.png", model.config.visual)
    b = load_image(media / "b.png", model.config.visual)
    want = reference_reply(model, [("image", a), ("image", b), ("video", vid)], "Compare them.")
    r = omni_edge("chat", "--model", tiny_omni, "--image", str(media / "a.png"), "--image", str(media / "b.png"),
                  "--video", str(media / "v.mov"), "--prompt", "Compare them.", "--temperature", "0",
                  "--max-new-tokens", str(N))
    assert r.returncode == 0, r.stderr
    assert r.stdout == want + "\n"


def test_onnx_and_torch_backends_give_the_same_replies(tiny_omni, media, tmp_path):
    from omni_edge.export.cli import export_bundle
    from test_export_vision import make_bundle

    out = make_bundle(tiny_omni, tmp_path / "bundle")
    export_bundle(out, ["vision"], ["float32"], log=lambda *a: None)
    replies = {}
    for backend in ("torch", "onnx", "auto"):
        r = omni_edge("chat", "--model", str(out), "--image", str(media / "a.png"), "--prompt", "Describe.",
                      "--temperature", "0", "--max-new-tokens", str(N), "--backend", backend, "--json")
        assert r.returncode == 0, (backend, r.stderr)
        out_json = json.loads(r.stdout)
        replies[backend] = (out_json["reply"], out_json["new_tokens"])
    assert replies["torch"] == replies["onnx"] == replies["auto"]
    m = pipeline.load(out, max_context=256)
    assert m.describe()["stages"]["vision"] == "not loaded (built on first use)"
    s = m.session(seed=0)
    s.send([{"type": "image", "image": m.load_media("image", media / "a.png")}], None)
    assert m.describe()["stages"]["vision"].startswith("vision: onnx")


def test_bad_media_in_a_session_are_refused_and_the_session_goes_on(tiny_omni, model, media, tmp_path):
    corpus = [("image", p) for p, _, kw in bad_image_corpus(tmp_path) if not kw]
    corpus += [("video", p) for p, _, kw in bad_video_corpus(tmp_path) if not kw]
    assert len(corpus) == 18
    lines = []
    for kind, path in corpus:
        lines += [f"/{kind} {path}", "What is it?"]
    lines += [f"/image {media / 'a.png'}", "Describe."]
    r = omni_edge("chat", "--model", tiny_omni, "--temperature", "0", "--max-new-tokens", str(N), "--interactive",
                  stdin="\n".join(lines) + "\n")
    assert r.returncode == 0, r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == len(corpus), r.stderr
    for (kind, path), err in zip(corpus, errors):
        assert str(path) in err, err
    assert "Traceback" not in r.stderr
    # the one good turn is answered as if the bad ones had never happened
    img = load_image(media / "a.png", model.config.visual)
    assert r.stdout == reference_reply(model, [("image", img)], "Describe.") + "\n"
