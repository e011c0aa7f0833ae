"""Spoken replies end to end on the tiny checkpoint with a tiny HiFT vocoder: `omni-edge chat --speak OUT.wav`
writes the speech of the reply as it streams, with the same text and codes as an in-process spoken turn
(`ChatSession.send_spoken` + the offline decode of each segment: same sample count), the history keeps the
generated audio as codes so the next turn reuses the KV cache exactly, and missing or bad vocoders are clear
errors."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import wave

import pytest
import torch

from omni_edge import pipeline
from omni_edge.speak import SpeakParams
from omni_edge.speech import decode_clause, wave_concat

ENV = dict(os.environ, PYTHONIOENCODING="utf-8")
BUDGET = 62  # positions of the reply (text tokens and audio frames): keeps the random tiny model's turn short


def omni_edge(*args, stdin: str = ""):
    return subprocess.run([sys.executable, "-m", "omni_edge", *args], input=stdin, capture_output=True,
                          text=True, encoding="utf-8", env=ENV, timeout=600)


@pytest.fixture(scope="module", autouse=True)
def _single_thread(one_thread):  # tests/conftest.py: tiny ops run single-threaded
    pass


@pytest.fixture(scope="module")
def speaking(tiny_omni, tmp_path_factory):
    """The tiny checkpoint plus a tiny vocoder in its folder (as a bundle would carry it)."""
    from omni_edge.testing import write_tiny_vocoder

    d = tmp_path_factory.mktemp("speaking") / "model"
    shutil.copytree(tiny_omni, d)
    voc = tmp_path_factory.mktemp("voc")
    write_tiny_vocoder(voc)
    shutil.copy(voc / "vocoder.safetensors", d / "vocoder.safetensors")
    return d


def test_speak_writes_the_streamed_speech_of_the_reply(speaking, tmp_path):
    out = tmp_path / "reply.wav"
    r = omni_edge("chat", "--model", str(speaking), "--prompt", "Hello", "--temperature", "0",
                  "--max-new-tokens", str(BUDGET), "--speak", str(out), "--stats", "--first-audio-frames", "4")
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr and "first_audio_s=" in r.stderr
    assert not [p for p in os.listdir(tmp_path) if ".partial-" in p]
    with wave.open(str(out)) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (24000, 1, 2)
        n = w.getnframes()

    # The same turn in process: same text and codes; the stream delivers exactly the offline sample count.
    m = pipeline.load(speaking)
    s = m.session(system="请用【邻家女声】这个声音回答问题。", seed=None)
    chunks = []
    head, stream = m.speech_outputs(chunks.append, first_codes=4)
    reply = s.send_spoken("Hello", head, params=SpeakParams().greedy(), max_new_tokens=BUDGET,
                          on_audio_frame=stream.push, on_clause_end=stream.end_clause)
    stream.close()
    assert r.stdout == reply.text + "\n"
    assert reply.segments and reply.frames > 0
    streamed = torch.cat(chunks) if chunks else torch.zeros(0)
    assert streamed.numel() == n
    offline = wave_concat([decode_clause(m.stage("speech"), m.stage("vocoder"), codes) for codes in reply.segments
                           if codes.shape[0] > 0])
    assert offline.numel() == n

    # The history holds the generated audio as codes: the next turn prefills only its own message, and its
    # reply equals a fresh session's reply to the same conversation (which rebuilds the pad rows from codes).
    assistant = s.history[-1]
    assert assistant["role"] == "assistant" and [sp.kind for sp in assistant["spans"]] == ["audiogen"] * len(
        assistant["spans"])
    from omni_edge.generate import SamplingParams
    greedy = SamplingParams(max_new_tokens=5, temperature=0, repetition_penalty=1.0)
    cached_before = len(s.cached)
    follow = s.send("And then?", greedy)
    assert follow.prefilled_tokens == follow.prompt_tokens - cached_before
    fresh = m.session(system=s.system)
    fresh.history = s.history[:-2]
    assert fresh.send("And then?", greedy).ids == follow.ids


def test_speak_errors_name_what_is_missing(tiny_omni, speaking, tmp_path):
    r = omni_edge("chat", "--model", str(tiny_omni), "--prompt", "Hi", "--speak", str(tmp_path / "a.wav"))
    assert r.returncode == 2 and "no vocoder" in r.stderr and "--vocoder" in r.stderr
    bad = tmp_path / "hift.pt"
    bad.write_bytes(b"not a checkpoint")
    r = omni_edge("chat", "--model", str(tiny_omni), "--prompt", "Hi", "--speak", str(tmp_path / "a.wav"),
                  "--vocoder", str(bad), "--max-new-tokens", "8")
    assert r.returncode == 2 and "hift.pt" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "a.wav").exists()
    r = omni_edge("chat", "--model", str(speaking), "--prompt", "Hi", "--play")
    assert r.returncode == 2 and "--speak" in r.stderr


def test_chat_keeps_past_speech_as_the_reference_does(speaking, tmp_path):
    """`chat --speak` keeps each spoken segment in the history as its 24 kHz wave re-tokenised by the audio input
    path (MODEL.md §2.2), as the reference demo does on its next turn; the next turn re-prefills from there and
    answers as a fresh session given the same history."""
    import io

    from omni_edge.audio_in import AudioInput
    from omni_edge.chat import SpeechOut
    from omni_edge.generate import SamplingParams

    m = pipeline.load(speaking)
    s = m.session(seed=0)
    out = SpeechOut(m, str(tmp_path / "r.wav"), play=False, first_frames=4, seed=0, err=io.StringIO())
    reply = out.send(s, "Hello", SamplingParams(max_new_tokens=BUDGET, temperature=0), write=lambda t: None,
                     numbered=False, on_notice=lambda t: None)
    assistant = s.history[-1]
    spans = assistant["spans"]
    assert len(spans) == sum(1 for seg in reply.segments if seg.shape[0] > 0) >= 1
    pad = m.tokenizer.token_id("<audio_pad_baichuan>")
    for sp in spans:
        assert sp.kind == "audio" and isinstance(sp.item, AudioInput) and sp.item.n_tokens == sp.n_tokens
        (a, n), = sp.segments
        assert assistant["ids"][a:a + n] == [pad] * n
    greedy = SamplingParams(max_new_tokens=5, temperature=0, repetition_penalty=1.0)
    follow = s.send("And then?", greedy)
    assert follow.prefilled_tokens > 5  # the re-tokenised speech is new to the KV cache
    fresh = m.session(seed=0)
    fresh.history = s.history[:-2]
    assert fresh.send("And then?", greedy).ids == follow.ids


class _FakeSoundDevice:
    """Stands in for the `sounddevice` module: records the output stream's settings, calls and chunks."""

    def __init__(self):
        self.streams = []

    def OutputStream(self, **kw):  # noqa: N802 (the module's name)
        dev = self

        class _Stream:
            def __init__(self):
                self.kw, self.calls, self.chunks = kw, [], []
                dev.streams.append(self)

            def start(self):
                self.calls.append("start")

            def write(self, x):
                self.calls.append("write")
                self.chunks.append(x.copy())

            def stop(self):
                self.calls.append("stop")

            def close(self):
                self.calls.append("close")
        return _Stream()


def test_play_sends_24khz_float_chunks_in_order(speaking, tmp_path, monkeypatch):
    """`--play`: the sound card gets one 24 kHz mono float32 stream, started before the first chunk and closed
    after the last, with the reply's chunks in order: their concatenation is the written wav (to its int16
    rounding, 1/32767)."""
    import io

    import numpy as np

    from omni_edge.chat import SpeechOut
    from omni_edge.generate import SamplingParams

    fake = _FakeSoundDevice()
    monkeypatch.setitem(sys.modules, "sounddevice", fake)
    m = pipeline.load(speaking)
    outputs = m.speech_outputs

    def small_hops(on_audio, **kw):  # a decode at every code, 2 frames of look-ahead: the short reply of the
        head, stream = outputs(on_audio, **kw)  # random tiny model arrives in several chunks
        stream.hop_codes, stream._voc.lookahead = 1, 2
        return head, stream

    monkeypatch.setattr(m, "speech_outputs", small_hops)
    err = io.StringIO()
    out = SpeechOut(m, str(tmp_path / "r.wav"), play=True, first_frames=1, seed=0, err=err)
    reply = out.send(m.session(seed=0), "Hello", SamplingParams(max_new_tokens=BUDGET, temperature=0),
                     write=lambda t: None, numbered=False, on_notice=lambda t: None)
    assert err.getvalue() == ""
    (st,) = fake.streams
    assert st.kw == {"samplerate": 24000, "channels": 1, "dtype": "float32"}
    assert st.calls[0] == "start" and st.calls[-2:] == ["stop", "close"] and st.calls.count("write") >= 3
    assert all(c.dtype == np.float32 and c.ndim == 2 and c.shape[1] == 1 for c in st.chunks)
    played = np.concatenate([c[:, 0] for c in st.chunks])
    assert played.size == 480 * sum(4 * seg.shape[0] - 1 for seg in reply.segments if seg.shape[0])
    with wave.open(str(tmp_path / "r.wav")) as w:
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float32) / 32767.0
    assert played.shape == pcm.shape and played.size > 0
    np.testing.assert_allclose(played, pcm, atol=1.0 / 32767 + 1e-7, rtol=0)


def test_play_without_a_player_library_says_how_to_get_one(speaking, tmp_path, monkeypatch):
    import io

    from omni_edge.chat import SpeechOut

    monkeypatch.setitem(sys.modules, "sounddevice", None)  # `import sounddevice` raises ImportError
    err = io.StringIO()
    out = SpeechOut(None, str(tmp_path / "r.wav"), play=True, first_frames=4, seed=0, err=err)  # no model needed
    msg = err.getvalue()
    assert out.play is False and msg.count("\n") == 1
    assert "--play needs the sounddevice package" in msg and "pip install sounddevice" in msg
