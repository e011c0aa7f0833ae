"""argparse `type=` helpers shared by the subcommands: each turns a bad value into argparse's one-line usage
error naming the option and the accepted range (exit code 2, no traceback).

    p.add_argument("--threads", type=threads, ...)         # 1 .. the CPUs this process may use
    p.add_argument("--temperature", type=finite_float(min=0.0), ...)
    p.add_argument("--seed", type=seed, ...)               # 0 .. 2**63 - 1, integers only ("1e23" refused)
    p.add_argument("--device", type=device, ...)           # cpu | cuda | cuda:N
    p.add_argument("--max-new-tokens", type=int_range(1, 32768), ...)
"""

from __future__ import annotations

import argparse
import math
import re
from typing import Callable, Optional

SEED_MAX = 2**63 - 1


def cpu_count() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    from omni_edge.knobs import cpu_count as count
    return count()


def _int(text: str, what: str) -> int:
    s = str(text).strip()
    if not re.fullmatch(r"[+-]?\d+", s):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return int(s)


def int_range(low: int, high: int, what: str = "an integer") -> Callable[[str], int]:
    """An integer in [low, high]."""
    def parse(text: str) -> int:
        v = _int(text, what)
        if not low <= v <= high:
            raise argparse.ArgumentTypeError(f"must lie in [{low}, {high}], got {v}")
        return v
    parse.__name__ = "integer"
    return parse


def threads(text: str) -> int:
    """A thread count in [1, CPUs present]."""
    v = _int(text, "a thread count")
    n = cpu_count()
    if not 1 <= v <= n:
        raise argparse.ArgumentTypeError(f"must lie in [1, {n}] (the CPUs this process may use), got {v}")
    return v


threads.__name__ = "thread count"


def add_threads(p: argparse.ArgumentParser, what: str = "") -> None:
    """The `--threads N` option every command that computes takes (apply it with `apply_threads`)."""
    p.add_argument("--threads", type=threads, metavar="N", default=None,
                   help=f"CPU threads{what}, 1..{cpu_count()} (default: OMNI_EDGE_THREADS, else every CPU this "
                        f"process may use)")


def add_lm_head(p: argparse.ArgumentParser) -> None:
    """The `--lm-head FMT` option of the commands that load a model (pipeline.load(lm_head=...))."""
    p.add_argument("--lm-head", choices=("fp16", "bf16", "q8", "q4"), default=None,
                   help="convert the lm_head at load: fp16/bf16, q8 (int8 per 32-input block) or q4 (4-bit, asym "
                        "group 32); default: as stored")


def apply_threads(n: Optional[int]) -> None:
    """Make `--threads N` the size of the native kernels' CPU pool and of torch's intra-op threads (the
    OMNI_EDGE_THREADS switch, omni_edge/knobs.py); None leaves the switch as it is."""
    if n is not None:
        from omni_edge import knobs
        knobs.set("threads", n)


def finite_float(min: Optional[float] = None, max: Optional[float] = None) -> Callable[[str], float]:
    """A finite float (no nan / inf), optionally within [min, max]."""
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
        if (min is not None and v < min) or (max is not None and v > max):
            lo = "-inf" if min is None else f"{min:g}"
            hi = "inf" if max is None else f"{max:g}"
            raise argparse.ArgumentTypeError(f"must lie in [{lo}, {hi}], got {v:g}")
        return v
    parse.__name__ = "number"
    return parse


def seed(text: str) -> int:
    """A seed: an integer in [0, 2**63 - 1]."""
    v = _int(text, "an integer seed")
    if not 0 <= v <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"must lie in [0, 2**63-1], got {v}")
    return v


seed.__name__ = "seed"


def device(text: str) -> str:
    """cpu, cuda or cuda:N (N >= 0). Whether the GPU exists is checked when the model loads."""
    s = str(text).strip().lower()
    if s == "cpu" or re.fullmatch(r"cuda(:\d{1,3})?", s):
        return s
    raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")


device.__name__ = "device"
