"""A spoken question end to end on the tiny checkpoint, as a user sends it (`omni-edge chat --audio q.wav
--prompt ""`, default flags, --temperature 0), against a torch-reference run of the same pipeline written out
here: front end, the audio stage's torch modules and RVQ codes, the sum of the 8 audio embeddings at the pad
positions, greedy decoding by whole-sequence forwards. Bad audio files inside an interactive session are
refused one by one and the session goes on."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from omni_edge import pipeline
from omni_edge.audio_in import AudioEncoderStage, load_audio
from omni_edge.testing import greedy_on_embeddings

ENV = dict(os.environ, PYTHONIOENCODING="utf-8")
N = 6


def omni_edge(*args, stdin: str = ""):
    return subprocess.run([sys.executable, "-m", "omni_edge", *args], input=stdin, capture_output=True,
                          text=True, encoding="utf-8", env=ENV, timeout=300)


@pytest.fixture(scope="module")
def model(tiny_omni):
    return pipeline.load(tiny_omni, max_context=512)


@pytest.fixture(scope="module")
def question(tmp_path_factory):
    """1.7 s of a chirp at 22.05 kHz (stereo, 16-bit): downmix and resampling are on the path."""
    import soundfile as sf

    sr = 22050
    t = np.arange(int(sr * 1.7)) / sr
    x = 0.3 * np.sin(2 * np.pi * (200 + 300 * t) * t)
    path = tmp_path_factory.mktemp("audio") / "q.wav"
    sf.write(str(path), np.stack([x, 0.5 * x], axis=1).astype(np.float32), sr, subtype="PCM_16")
    return path


def reference_reply(model, item, text: str, n: int = N) -> str:
    tok, bb = model.tokenizer, model.backbone
    t = tok.token_id
    stage = AudioEncoderStage.from_checkpoint(model.checkpoint, model.config, dtype=torch.float32, backend="torch")
    (codes,) = stage.codes([item])
    assert codes.shape == (item.n_tokens, 8)
    names = [f"model.audio_embed_layers.{i}.weight" for i in range(8)]
    tables = model.checkpoint.tensors(names, dtype=bb.dtype)
    rows = sum(tables[nm][codes[:, i]] for i, nm in enumerate(names))  # summed in the model dtype
    ids = [t("<B_SYS>"), t("<C_Q>"), t("<audio_start_baichuan>")]
    first = len(ids)
    ids += [t("<audio_pad_baichuan>")] * item.n_tokens + [t("<audio_end_baichuan>")]
    ids += tok.encode(text) + [t("<C_A>")]
    return greedy_on_embeddings(model, ids, {first + j: rows[j] for j in range(item.n_tokens)}, n)


def test_spoken_question_equals_the_torch_reference(tiny_omni, model, question):
    item = load_audio(question, model.config.audio)
    assert item.n_tokens == 21  # 1.7 s: 27200 samples -> 171 mel frames -> 86 encoder frames -> 21 tokens
    want = reference_reply(model, item, "")
    r = omni_edge("chat", "--model", tiny_omni, "--audio", str(question), "--prompt", "", "--temperature", "0",
                  "--max-new-tokens", str(N), "--stats")
    assert r.returncode == 0, r.stderr
    assert r.stdout == want + "\n"
    assert "audio_tokens=21" in r.stderr and "audio_stage_s=" in r.stderr
    for part in ("audio_load_s=", "audio_mel_s=", "audio_encoder_s=", "audio_rvq_s="):
        assert part in r.stderr, r.stderr


def test_audio_then_text_in_one_message(tiny_omni, model, question):
    item = load_audio(question, model.config.audio)
    want = reference_reply(model, item, "Answer briefly.")
    r = omni_edge("chat", "--model", tiny_omni, "--audio", str(question), "--prompt", "Answer briefly.",
                  "--temperature", "0", "--max-new-tokens", str(N))
    assert r.returncode == 0, r.stderr
    assert r.stdout == want + "\n"


def test_bad_audio_in_a_session_is_refused_and_the_session_goes_on(tiny_omni, model, question, tmp_path):
    import soundfile as sf

    (tmp_path / "empty.wav").write_bytes(b"")
    (tmp_path / "junk.wav").write_bytes(np.random.default_rng(0).bytes(3000))
    sf.write(str(tmp_path / "full.wav"), np.zeros((16000, 1), np.float32) + 0.1, 16000, subtype="PCM_16")
    data = (tmp_path / "full.wav").read_bytes()
    (tmp_path / "trunc.wav").write_bytes(data[: len(data) // 2])
    sf.write(str(tmp_path / "zero.wav"), np.zeros((0, 1), np.float32), 16000, subtype="PCM_16")
    sf.write(str(tmp_path / "nan.wav"), np.full((1600, 1), np.nan, np.float32), 16000, subtype="FLOAT")
    bad = [tmp_path / n for n in ("missing.wav", "empty.wav", "junk.wav", "trunc.wav", "zero.wav", "nan.wav")]
    lines = []
    for p in bad:
        lines += [f"/audio {p}", ""]  # an audio question needs no text: the empty line sends it
    lines += [f"/audio {question}", "Answer briefly."]
    r = omni_edge("chat", "--model", tiny_omni, "--temperature", "0", "--max-new-tokens", str(N), "--interactive",
                  stdin="\n".join(lines) + "\n")
    assert r.returncode == 0, r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == len(bad) == 6, r.stderr
    for p, err in zip(bad, errors):
        assert p.name in err, err
    assert "Traceback" not in r.stderr
    assert r.stdout == reference_reply(model, load_audio(question, model.config.audio), "Answer briefly.") + "\n"
