"""`omni-edge demo`: prove an install works without the 22 GB checkpoint.

Writes the tiny Baichuan-Omni-shaped test checkpoint (random weights, byte-level tokenizer with the real
special tokens) to a temporary folder, loads it through the same pipeline `omni-edge chat` uses, and runs one
chat turn in full precision and again with the backbone quantised to 4 bits at load; then a question with an
image and audio (vision tower, audio encoder and RVQ) and a spoken reply (audio head, speech decoder, flow
matching and a tiny random HiFT vocoder). It prints what ran (model shape, device, kernels, CPU instruction set,
stages) and how fast. The weights are random, so the replies are gibberish: the point is that every step runs.
"""

from __future__ import annotations

import argparse
import sys

DEMO_PROMPT = "Hello! Can you tell me about the edge?"


# The tiny model's KV cache holds 4096 positions; a demo reply needs far fewer.
MAX_NEW_TOKENS = 1024


def add_arguments(p: argparse.ArgumentParser) -> None:
    from omni_edge import cli_args

    p.add_argument("--device", default="cpu", metavar="DEV", type=cli_args.device,
                   help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--max-new-tokens", type=cli_args.int_range(1, MAX_NEW_TOKENS), default=32, metavar="N",
                   help=f"reply length, 1..{MAX_NEW_TOKENS} (default 32)")
    p.add_argument("--threads", type=cli_args.threads, metavar="N",
                   help=f"CPU threads, 1..{cli_args.cpu_count()} (default: all cores)")


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() else "\u00b7" for c in text)


def run(args) -> int:
    import tempfile

    from omni_edge import pipeline
    from omni_edge.cli import CliError
    from omni_edge.generate import SamplingParams
    from omni_edge.testing import write_tiny_checkpoint

    if not 1 <= args.max_new_tokens <= MAX_NEW_TOKENS:  # run() may be called without the parser
        raise CliError(f"--max-new-tokens must lie in [1, {MAX_NEW_TOKENS}], got {args.max_new_tokens}")
    out = sys.stdout
    out.write("omni-edge demo: a tiny Baichuan-Omni-shaped model with RANDOM weights, so the reply is gibberish;\n"
              "it shows that tokenizer, prompt format, backbone, KV cache, sampling and streaming all run.\n")
    # Sampling settings of the reference demo's text step (docs/MODEL.md §2.3), seeded for a repeatable run.
    params = SamplingParams(max_new_tokens=args.max_new_tokens)
    with tempfile.TemporaryDirectory(prefix="omni-edge-demo-") as tmp:
        write_tiny_checkpoint(tmp, seed=0, tokenizer="bytelevel")
        for n, quant in enumerate(("none", "rtn4")):
            try:
                model = pipeline.load(tmp, device=args.device, quant=quant, threads=args.threads)
            except pipeline.ModelLoadError as e:
                raise CliError(str(e)) from None
            d = model.describe()
            if n == 0:
                out.write(f"model:   {d['kind']}, {d['layers']} layers, hidden {d['hidden']}, "
                          f"{d['heads']} heads / {d['kv_heads']} kv heads x {d['head_dim']}, "
                          f"MLP {d['intermediate']}, vocab {d['vocab']}, context {d['max_context']}\n")
                out.write(f"device:  {d['device']} ({d['dtype']}); CPU kernel level {d['isa']}\n")
                out.write(f"prompt:  {DEMO_PROMPT!r} ({model.prompt.name} format)\n")
            kernels = ", ".join(f"{fam} {how}" for fam, how in d["kernels"].items())
            session = model.session(seed=0)
            reply = session.send(DEMO_PROMPT, params)
            out.write(f"\n[quant {quant}] kernels: {kernels}\n")
            out.write(f"  reply ({reply.new_tokens} tokens, {reply.finish_reason}): {_printable(reply.text)!s}\n")
            out.write(f"  prefill {reply.prompt_tokens} tokens at {reply.prefill_tok_s:.0f} tok/s, "
                      f"decode {len(reply.step_s)} steps at {reply.decode_tok_s:.0f} tok/s\n")
            del model, session
        _omni_turns(tmp, args, out)
    out.write("\ndemo finished: everything ran. For a real model see `omni-edge chat --help`.\n")
    return 0


def _omni_turns(tmp: str, args, out) -> None:
    """An image + audio question, then a spoken reply (tiny random vocoder), through the same pipeline."""
    import os
    import time

    import numpy as np
    import torch
    from PIL import Image

    from omni_edge import pipeline
    from omni_edge.audio_in import audio_from_wave
    from omni_edge.generate import SamplingParams
    from omni_edge.speak import SpeakParams
    from omni_edge.testing import write_tiny_vocoder

    write_tiny_vocoder(tmp)
    os.remove(os.path.join(tmp, "hift.pt"))  # the folded safetensors copy is what a bundle carries
    model = pipeline.load(tmp, device=args.device, threads=args.threads)
    image_path = os.path.join(tmp, "demo.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (120, 160, 3), dtype=np.uint8)).save(image_path)
    image = model.load_media("image", image_path)
    t = torch.arange(16000 * 2) / 16000.0
    audio = audio_from_wave(0.3 * torch.sin(2 * torch.pi * 330 * t), 16000, model.config.audio, source="tone")
    session = model.session(seed=0)
    reply = session.send([{"type": "image", "image": image}, {"type": "audio", "audio": audio},
                          {"type": "text", "text": "What do you see and hear?"}],
                         SamplingParams(max_new_tokens=min(args.max_new_tokens, 16)))
    stage_s = ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in reply.media_s.items())
    out.write(f"\n[image + audio in] {reply.media_tokens.get('image', 0)} image tokens, "
              f"{reply.media_tokens.get('audio', 0)} audio tokens; stages: {stage_s}\n")
    out.write(f"  reply: {_printable(reply.text)}\n")
    chunks, first = [], []
    t0 = time.perf_counter()

    def on_audio(chunk):
        if not first:
            first.append(time.perf_counter() - t0)
        chunks.append(chunk)
    head, stream = model.speech_outputs(on_audio, first_codes=4)
    spoken = session.send_spoken("Now say it aloud.", head, params=SpeakParams(), max_new_tokens=64,
                                 on_audio_frame=stream.push, on_clause_end=stream.end_clause)
    stream.close()
    seconds = sum(c.numel() for c in chunks) / 24000
    out.write(f"[spoken reply] {spoken.text_tokens} text tokens, {spoken.frames} audio frames -> {seconds:.2f} s of "
              f"24 kHz speech (first audio after {first[0]:.2f} s)\n" if first else
              f"[spoken reply] {spoken.text_tokens} text tokens, no audio frame within the demo's budget\n")
    out.write(f"  stages built on first use: {', '.join(model.describe()['stages'])}\n")
