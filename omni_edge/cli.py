"""The `omni-edge` command: one entry point, one module per subcommand.

Each subcommand module defines `add_arguments(parser)` and `run(args) -> int` and keeps its heavy imports
inside `run`, so `omni-edge --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# name -> (module, one-line help). Architecture as data: adding a subcommand is one line here.
SUBCOMMANDS = {
    "chat": ("omni_edge.chat", "chat with a model (interactive, or one-shot with --prompt)"),
    "demo": ("omni_edge.demo", "build a tiny model in a temporary folder and run it end to end"),
    "quantize": ("omni_edge.quantize.cli", "quantize a checkpoint's backbone to 4-bit and write an edge bundle"),
    "export": ("omni_edge.export.cli", "write ONNX graphs of the dense stages (vision, audio, speech) into a bundle"),
    "bench": ("omni_edge.bench", "measure prefill and decode speed, time to first token, memory and bandwidth use"),
    "info": ("omni_edge.info", "show what was built and what this machine offers"),
    "verify": ("omni_edge.verify", "check every file of an edge bundle against its manifest (sha256)"),
    "inspect": ("omni_edge.inspection", "show what a checkpoint or bundle holds: modules, precisions, sizes"),
}


class CliError(Exception):
    """An error to report as one line on stderr with exit code 2 (bad path, bad input, bad checkpoint)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="omni-edge",
        description="Run Baichuan-Omni-1.5 on the edge: one NVIDIA GPU, a Jetson Orin, or a plain CPU.",
    )
    from omni_edge import __version__

    parser.add_argument("--version", action="version", version=f"omni-edge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            p.set_defaults(_unavailable=f"'{name}' is not available in this install: {e}")
            continue
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def _switch_problems() -> list:
    """Runtime switches (OMNI_EDGE_* environment variables) with values that are not allowed."""
    import warnings

    from omni_edge import knobs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # reported here as an error instead
        return list(knobs.settings().problems)


def main(argv=None) -> int:
    # torch's CPU allocator puts large tensors on 2 MiB pages when this is set before torch loads: the 4-bit
    # weights then stream without TLB misses and the q4 kernels' huge-page advice has nothing left to move.
    if "torch" not in sys.modules:
        os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    # torch's OpenMP threads spin at every barrier by default; on a core shared with another process a spinning
    # waiter turns a 2-thread prefill several times slower than one thread. Passive waiting (sleep at once)
    # keeps 2 threads at about 1-thread speed under contention. Read when torch loads, so set before that;
    # an explicit OMP_WAIT_POLICY in the environment wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if getattr(args, "_unavailable", None):
        print(f"omni-edge: error: {args._unavailable}", file=sys.stderr)
        return 2
    problems = _switch_problems()
    if problems and args.command != "info":  # info lists them itself
        print(f"omni-edge {args.command}: error: {'; '.join(problems)}; fix or unset it (see omni-edge info)",
              file=sys.stderr)
        return 2
    try:
        return int(args._run(args) or 0)
    except CliError as e:
        print(f"omni-edge {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away (`omni-edge chat ... | head`): end quietly, and keep the interpreter's final
        # flush of stdout from raising again

        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
