"""The speech-quality harness (benchmarks/speech_quality.py) on real speech: Piper-voice sentences written at
24 kHz (our vocoder's rate) are transcribed by Whisper tiny.en through our resampler and front end with a WER
bound, and a wrong reference text raises the WER. Marked slow: it loads tiny.en and runs the Piper voice."""

import os
import subprocess
import sys

import pytest

from omni_edge import testing_audio as ta

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "speech_quality.py")
SENTENCE = "The weather is lovely today, so we will walk to the park."


@pytest.mark.slow
def test_harness_reports_wer_on_piper_speech(tmp_path):
    assert ta.piper_available() is None, ta.piper_available()  # CI installs the voice, espeak-ng and tiny.en
    assert ta.whisper_tiny_en_dir() is not None
    out = tmp_path / "speech.wav"
    r = subprocess.run([sys.executable, SCRIPT, "--piper", SENTENCE, "--save", str(out), "--max-wer", "0.1"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    row = r.stdout.strip().splitlines()[-1].split("|")
    assert float(row[4]) <= 0.1, r.stdout
    # the saved 24 kHz file read back through the file path gives the same words; a wrong text is caught
    r = subprocess.run([sys.executable, SCRIPT, str(out), "--text", SENTENCE, "--max-wer", "0.1"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "| 24000 |" in r.stdout, r.stdout + r.stderr
    r = subprocess.run([sys.executable, SCRIPT, str(out), "--text", "Completely different words here.",
                        "--max-wer", "0.1"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 1, r.stdout + r.stderr
