"""`omni-edge demo`: prove an install works without the 22 GB checkpoint.

Writes the tiny Baichuan-Omni-shaped test checkpoint (random weights, byte-level tokenizer with the real
special tokens) to a temporary folder, loads it through the same pipeline `omni-edge chat` uses, and runs one
chat turn in full precision and again with the backbone quantised to 4 bits at load. It prints what ran
(model shape, device, kernels, CPU instruction set) and how fast. The weights are random, so the reply is
gibberish: the point is that every step runs.
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
    out.write("\ndemo finished: everything ran. For a real model see `omni-edge chat --help`.\n")
    return 0
