"""`omni-edge quantize SRC OUT`: quantize a checkpoint's backbone (GPTQ or RTN) and write an edge bundle."""

from __future__ import annotations

import argparse

from omni_edge import cli_args


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", metavar="SRC", help="source checkpoint folder: Baichuan-Omni-1.5, or a plain HF "
                   "Qwen2/Llama causal LM (config.json, *.safetensors, tokenizer files)")
    p.add_argument("out", metavar="OUT", help="bundle folder to write (must not exist, unless --force)")
    p.add_argument("--method", choices=("gptq", "rtn"), default="gptq",
                   help="GPTQ (default) or round-to-nearest, the baseline")
    p.add_argument("--bits", type=int, default=4, choices=(4,), help="weight bits (4)")
    p.add_argument("--group-size", type=int, default=128, metavar="G",
                   help="input rows per quantization group: 32, 64, 128 (default) ..., or -1 for per-channel; when it "
                        "does not divide every layer's input size, the largest of 128/64/32 below it that does is "
                        "used (said in the output and the manifest)")
    p.add_argument("--act-order", action="store_true",
                   help="quantize columns by decreasing Hessian diagonal (desc_act), with static groups")
    p.add_argument("--no-static-groups", dest="static_groups", action="store_false", default=None,
                   help="with --act-order: groups follow the processing order (a permuted g_idx, as GPTQModel's "
                        "desc_act without static_groups)")
    p.add_argument("--no-group-order", dest="group_order", action="store_false", default=True,
                   help="without --act-order: quantize columns in their natural order instead of group by group "
                        "in decreasing Hessian-diagonal order (the default; same plain groups, lower error)")
    p.add_argument("--clip", choices=("hessian", "mse", "none"), default="hessian",
                   help="grid search of each group's range: hessian (default; shrink the min/max range where that "
                        "lowers the group's squared error weighted by what GPTQ pays per column), mse (GPTQ's "
                        "reference search, |error|^2.4 unweighted, GPTQModel's mse=2.4) or none (min/max)")
    sym = p.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="sym", action="store_true", default=True, help="symmetric grid (default)")
    sym.add_argument("--asym", dest="sym", action="store_false", help="asymmetric grid with zero points")
    p.add_argument("--checkpoint-format", choices=("gptq", "gptq_v2"), default=None,
                   help="zero-point convention of the GPTQ tensors: gptq (v1, stored zero - 1; default with --sym) "
                        "or gptq_v2 (default with --asym: other tools refuse asymmetric v1 checkpoints)")
    p.add_argument("--damp", type=float, default=0.01, help="Hessian dampening, fraction of its mean diagonal "
                   "(default 0.01)")
    p.add_argument("--calib", metavar="FILE", help="calibration texts, JSON lines {\"text\": \"...\"}, each used "
                   "as one user turn (default: the built-in bilingual set of 64 short texts, fine for small models "
                   "and tests; give the 7B a few hundred longer texts)")
    p.add_argument("--nsamples", type=int, metavar="N",
                   help="calibration samples (default: 128, or every text of a smaller set)")
    p.add_argument("--seqlen", type=int, default=512, metavar="L", help="tokens per sample at most (default 512)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    p.add_argument("--seed", type=int, default=0, help="seed for the calibration choice (default 0)")
    p.add_argument("--no-eval", dest="heldout", action="store_false",
                   help="skip the held-out perplexity of the source and quantized models")
    p.add_argument("--vocoder", metavar="PATH",
                   help="the HiFT vocoder for spoken replies (hift.pt from the Baichuan-Omni-1.5 repository, "
                        "third_party/cosy24k_vocoder), checked and stored in the bundle as vocoder.safetensors "
                        "(default: hift.pt or vocoder.safetensors in SRC, if there)")
    p.add_argument("--lm-head", choices=("fp16", "q8", "q4"), default=None,
                   help="how the bundle stores the lm_head: q8 (default; int8, one fp16 scale per row and 32 "
                        "inputs, half the bytes of fp16), q4 (4-bit RTN, asymmetric, group 32, about a quarter), "
                        "or fp16 (dense; keeps the bundle a plain GPTQ checkpoint other tools read). A tied "
                        "embedding stays fp16; the quantized lm_head is a copy")
    p.add_argument("--force", action="store_true", help="replace OUT if it is an existing bundle")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    cli_args.add_threads(p, " for the quantizer's torch math and the native kernels")


def run(args) -> int:
    import signal

    from omni_edge.cli import CliError

    from .build import QuantizeOptions, quantize_checkpoint
    from .bundle_writer import OutputExistsError
    from .report import format_report

    cli_args.apply_threads(getattr(args, "threads", None))
    if args.group_size != -1 and args.group_size <= 0:
        raise CliError(f"--group-size must be -1 (per-channel) or positive, got {args.group_size}")
    if (args.nsamples is not None and args.nsamples <= 0) or args.seqlen < 2:
        raise CliError(f"--nsamples must be positive and --seqlen at least 2, got {args.nsamples}, {args.seqlen}")
    if args.static_groups is False and not args.act_order:
        raise CliError("--no-static-groups only applies with --act-order")
    opts = QuantizeOptions(bits=args.bits, group_size=args.group_size, sym=args.sym, act_order=args.act_order,
                           static_groups=args.static_groups, damp=args.damp, method=args.method, calib=args.calib,
                           nsamples=args.nsamples, seqlen=args.seqlen, device=args.device, seed=args.seed,
                           force=args.force, heldout=args.heldout, progress=not args.quiet,
                           checkpoint_format=args.checkpoint_format, vocoder=args.vocoder,
                           group_order=args.group_order, clip=args.clip,
                           **({} if args.lm_head is None else {"lm_head": args.lm_head}))

    def on_term(signum, frame):  # a kill still removes the partial output (via KeyboardInterrupt cleanup)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        manifest = quantize_checkpoint(args.src, args.out, opts)
    except (OutputExistsError, ValueError, OSError) as e:
        raise CliError(" ".join(str(e).split())) from None
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(format_report(manifest))
    print(f"wrote {args.out}")
    return 0
