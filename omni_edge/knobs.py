"""Runtime switches: every `OMNI_EDGE_*` environment variable the runtime obeys, read here, once.

The environment is read the first time `settings()` is called (the first op, load or CLI command) and never
again; each switch has a Python equivalent (`set(...)`, or the `override(...)` context manager) that takes
effect at once. A value that is not one of the allowed ones is not silently ignored: it is recorded in
`settings().problems`, warned about once, refused by the `omni-edge` command (exit code 2), and listed by
`omni-edge info`, which shows every switch with its value and where the value came from.

| variable                | values                        | default        | Python equivalent            |
|-------------------------|-------------------------------|----------------|------------------------------|
| OMNI_EDGE_ISA           | scalar, neon, avx2, avx512    | best available | set("isa", "avx2")           |
| OMNI_EDGE_NATIVE        | 0, 1                          | 1              | set("native", False)         |
| OMNI_EDGE_NATIVE_DECODE | 0, 1                          | 1              | set("native_decode", False)  |
| OMNI_EDGE_Q4_EXACT      | 0, 1                          | 0              | set("q4_exact", True)        |
| OMNI_EDGE_CUDA_GRAPH    | 0, 1                          | 1              | set("cuda_graph", False)     |
| OMNI_EDGE_CACHE         | a folder                      | ~/.cache/omni_edge | set("cache_dir", path)   |
| OMNI_EDGE_THREADS       | 1 .. CPUs this process may use | those CPUs    | set("threads", 2)            |

OMNI_EDGE_THREADS sizes the one CPU thread pool every native kernel family shares (OMP_NUM_THREADS does not
touch it) and, once set, torch's intra-op threads too; `--threads N` on the commands sets the same switch.

OMNI_EDGE_CACHE is the one cache folder: the CUDA self-check results (`selfcheck.json`) and the test-model
conversions (`test-models/`) live under it. Build-time switches (OMNI_EDGE_CUDA, OMNI_EDGE_CUDA_ARCHS) are
read by the build only. Plain python: importing this module is cheap.
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import List, Optional

ISAS = ("scalar", "neon", "avx2", "avx512")
ENV = {"isa": "OMNI_EDGE_ISA", "native": "OMNI_EDGE_NATIVE", "native_decode": "OMNI_EDGE_NATIVE_DECODE",
       "q4_exact": "OMNI_EDGE_Q4_EXACT", "cuda_graph": "OMNI_EDGE_CUDA_GRAPH", "cache_dir": "OMNI_EDGE_CACHE",
       "threads": "OMNI_EDGE_THREADS"}
MEANING = {
    "isa": "caps the CPU instruction set of the native kernels",
    "native": "0: torch reference paths everywhere instead of the native kernels",
    "native_decode": "0: the Python layer loop instead of the native whole-model decode step",
    "q4_exact": "1: exact fp32-activation q4 matmul instead of the int8-activation one",
    "cuda_graph": "0: CUDA decode steps run eagerly instead of replaying a captured CUDA graph",
    "cache_dir": "cache folder (CUDA self-check results, converted test models)",
    "threads": "CPU threads of the native kernels' pool (and torch's, when set)",
}


@dataclass(frozen=True)
class Settings:
    isa: Optional[str] = None  # None: the best the CPU offers
    native: bool = True
    native_decode: bool = True
    q4_exact: bool = False
    cuda_graph: bool = True
    cache_dir: Path = field(default_factory=lambda: Path.home() / ".cache" / "omni_edge")
    threads: Optional[int] = None  # None: the CPUs this process may run on
    source: dict = field(default_factory=dict)  # knob -> "default" | "environment" | "set()"
    problems: tuple = ()  # one line per environment value that was refused


_lock = threading.Lock()
_current: Optional[Settings] = None
_warned = False


def _flag(name: str, raw: str, problems: List[str], default: bool) -> bool:
    if raw in ("0", "1"):
        return raw == "1"
    problems.append(f"{ENV[name]}={raw!r} is not 0 or 1")
    return default


def cpu_count() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def parse_threads(raw) -> int:
    """A thread count in [1, cpu_count()]; ValueError naming the limit otherwise."""
    n = cpu_count()
    text = str(raw).strip()
    if isinstance(raw, bool) or not (isinstance(raw, int) or text.lstrip("+").isdigit()):
        raise ValueError(f"threads: expected an integer from 1 to {n} (the CPUs this process may use), got {raw!r}")
    v = int(text)
    if not 1 <= v <= n:
        raise ValueError(f"threads: must lie in [1, {n}] (the CPUs this process may use), got {v}")
    return v


def _from_env(environ) -> Settings:
    problems: List[str] = []
    values: dict = {}
    source = {k: "default" for k in ENV}
    d = Settings()
    for name, var in ENV.items():
        raw = environ.get(var)
        if raw is None or raw == "":
            continue
        if name == "isa":
            if raw.strip().lower() in ISAS:
                values[name] = raw.strip().lower()
            else:
                problems.append(f"{var}={raw!r} is not one of {', '.join(ISAS)}")
                continue
        elif name == "cache_dir":
            values[name] = Path(raw).expanduser()
        elif name == "threads":
            try:
                values[name] = parse_threads(raw)
            except ValueError as e:
                problems.append(f"{var}={raw!r}: {str(e).split(': ', 1)[1]}")
                continue
        else:
            values[name] = _flag(name, raw.strip(), problems, getattr(d, name))
            if raw.strip() not in ("0", "1"):
                continue
        source[name] = "environment"
    return replace(d, source=source, problems=tuple(problems), **values)


def settings() -> Settings:
    """The switches in force (the environment is read on the first call only)."""
    global _current, _warned
    s = _current
    if s is None:
        with _lock:
            if _current is None:
                _current = _from_env(os.environ)
                _apply_isa(_current)
                _apply_threads(_current)
            s = _current
        if s.problems and not _warned:
            _warned = True
            warnings.warn("omni-edge: " + "; ".join(s.problems) + " (ignored: the defaults are used)",
                          RuntimeWarning, stacklevel=2)
    return s


def reload() -> Settings:
    """Forget every set() and read the environment again (tests, tools that change os.environ)."""
    global _current, _warned
    with _lock:
        _current = None
        _warned = False
    return settings()


def set(name: str, value) -> None:  # noqa: A001 (the Python equivalent of setting the variable)
    """Change one switch now, e.g. set("native_decode", False); ValueError for an unknown name or value."""
    global _current
    if name not in ENV:
        raise ValueError(f"knob: expected one of {', '.join(ENV)}, got {name!r}")
    if name == "isa":
        if value is not None and value not in ISAS:
            raise ValueError(f"isa: expected one of {ISAS} or None, got {value!r}")
    elif name == "cache_dir":
        value = Path(value).expanduser()
    elif name == "threads":
        value = None if value is None else parse_threads(value)
    elif not isinstance(value, bool):
        raise ValueError(f"{name}: expected True or False, got {value!r}")
    s = settings()
    with _lock:
        _current = replace(s, **{name: value}, source=dict(s.source, **{name: "set()"}))
        if name == "isa":
            _apply_isa(_current)
        if name == "threads":
            _apply_threads(_current)


@contextlib.contextmanager
def override(**values):
    """with override(native_decode=False): ... -- the switches restored afterwards."""
    global _current
    before = settings()
    try:
        for name, value in values.items():
            set(name, value)
        yield settings()
    finally:
        with _lock:
            _current = before
            if "isa" in values:
                _apply_isa(before)
            if "threads" in values:
                _apply_threads(before)


def _apply_isa(s: Settings) -> None:
    """Hand the ISA cap to the native library if it is already loaded (omni_edge._native applies it at load)."""
    import sys
    if "omni_edge._C" in sys.modules:
        sys.modules["omni_edge._C"].set_isa_cap(s.isa or "avx512")


def _apply_threads(s: Settings) -> None:
    """Size the native pool (if the library is loaded; omni_edge._native applies it at load) and, when the switch
    was given, torch's intra-op threads (if torch is imported: this module never imports it)."""
    import sys
    if "omni_edge._C" in sys.modules:
        sys.modules["omni_edge._C"].set_num_threads(s.threads or 0)  # 0: the CPUs this process may use
    if s.threads is not None and "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(s.threads)


def table() -> List[dict]:
    """Every switch: name, variable, value, source, meaning (for `omni-edge info`)."""
    s = settings()
    rows = []
    for f in fields(Settings):
        if f.name not in ENV:
            continue
        v = getattr(s, f.name)
        if f.name == "threads":
            shown = str(v) if v is not None else f"(all: {cpu_count()})"
        else:
            shown = {True: "1", False: "0", None: "(best available)"}.get(v, str(v)) if not isinstance(v, Path) else str(v)
        rows.append({"name": f.name, "variable": ENV[f.name], "value": shown, "source": s.source.get(f.name),
                     "meaning": MEANING[f.name]})
    return rows
