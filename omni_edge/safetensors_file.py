"""Reading the parts of checkpoint files that must be trusted before any tensor is touched.

One place for: the safetensors header (every loader reads it through `read_header`), sha256 of a file,
and "is this path a plain file?" (a FIFO, a device or a symlink to one is named, not opened: reading a FIFO
hangs, reading /dev/zero never ends).

A .safetensors file is an 8-byte little-endian header length n, n bytes of UTF-8 JSON, then the data. The JSON
is an object {name: {"dtype": str, "shape": [int, ...], "data_offsets": [begin, end]}, "__metadata__": {str:
str}} with offsets relative to the start of the data. `read_header` checks all of it against the file's size
before anything is memory-mapped: a truncated download, offsets past the end or of the wrong length, overlapping
tensors, an unknown dtype, a header that is not an object or is nested absurdly deep are all a
`SafetensorsFileError` (a ValueError) naming the file and the problem. Plain python (json, struct, hashlib).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import struct
from pathlib import Path
from typing import Dict, Tuple

# Bytes per element of every safetensors dtype name.
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4,
            "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
MAX_HEADER_BYTES = 100 << 20  # the safetensors library refuses bigger headers too
MAX_DIMS = 16


class SafetensorsFileError(ValueError):
    """A .safetensors file that cannot be used; the message names the file and the problem."""


# ------------------------------------------------------------------------------------------------
# Plain files
# ------------------------------------------------------------------------------------------------

def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder")):
        if test(mode):
            return name
    return "not a regular file"


def special_file(path) -> str:
    """'' when `path` is missing or a regular file (through symlinks); otherwise what it is, in words."""
    p = Path(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        if p.is_symlink():
            return f"a broken symlink (to {os.readlink(p)})"
        return ""
    except OSError as e:
        return f"unreadable ({e.strerror})"
    if stat.S_ISREG(st.st_mode):
        return ""
    what = _kind(st.st_mode)
    if p.is_symlink():
        return f"a symlink to {os.path.realpath(p)}, which is {what}"
    return what


def require_regular(path, what: str = "") -> Path:
    """Raise ValueError when `path` exists but is not a regular file (FIFO, device, socket, folder)."""
    kind = special_file(path)
    if kind:
        raise ValueError(f"{what or Path(path).name}: {path} is {kind}, not a regular file; refusing to read it")
    return Path(path)


def sha256_file(path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file's content, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------
# safetensors header
# ------------------------------------------------------------------------------------------------

def _entry(path: Path, name, v) -> Tuple[str, Tuple[int, ...], int, int]:
    def bad(problem: str):
        return SafetensorsFileError(f"{path}: safetensors header entry {str(name)[:80]!r} {problem}")

    if not isinstance(v, dict):
        raise bad(f"must be an object, got {type(v).__name__}")
    for key in ("dtype", "shape", "data_offsets"):
        if key not in v:
            raise bad(f"lacks \"{key}\"")
    dtype, shape, offsets = v["dtype"], v["shape"], v["data_offsets"]
    if not isinstance(dtype, str) or dtype not in ITEMSIZE:
        raise bad(f"has an unknown dtype {dtype!r} (known: {', '.join(ITEMSIZE)})")
    if (not isinstance(shape, list) or len(shape) > MAX_DIMS
            or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2**62 for s in shape)):
        raise bad(f"has an invalid shape {str(shape)[:80]} (a list of at most {MAX_DIMS} non-negative integers)")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
            or offsets[0] > offsets[1]):
        raise bad(f"has invalid data_offsets {str(offsets)[:80]} (expected [begin, end], 0 <= begin <= end)")
    nbytes = ITEMSIZE[dtype]
    for s in shape:
        nbytes *= s
    if offsets[1] - offsets[0] != nbytes:
        raise bad(f"is {dtype} {tuple(shape)} = {nbytes} bytes, but its data_offsets {offsets} span "
                  f"{offsets[1] - offsets[0]} bytes")
    return dtype, tuple(shape), offsets[0], offsets[1]


def read_header(path) -> Dict[str, dict]:
    """The validated JSON header of a .safetensors file: {name: {"dtype", "shape", "data_offsets"}} plus
    "__metadata__" when present. Raises SafetensorsFileError (a ValueError) naming the file and the problem."""
    path = Path(path)
    require_regular(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise SafetensorsFileError(f"{path}: {size} bytes, too short for a safetensors file")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise SafetensorsFileError(f"{path}: the safetensors header claims {n} bytes, but only {size - 8} "
                                           f"follow (truncated, or not a safetensors file)")
            if n > MAX_HEADER_BYTES:
                raise SafetensorsFileError(f"{path}: safetensors header of {n} bytes exceeds the "
                                           f"{MAX_HEADER_BYTES >> 20} MiB limit")
            raw = f.read(n)
    except OSError as e:
        raise SafetensorsFileError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise SafetensorsFileError(f"{path}: the safetensors header is not UTF-8 text (not a safetensors "
                                   f"file?)") from None
    except RecursionError:
        raise SafetensorsFileError(f"{path}: the safetensors header is nested too deeply") from None
    except ValueError as e:
        raise SafetensorsFileError(f"{path}: the safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise SafetensorsFileError(f"{path}: the safetensors header must be a JSON object, got "
                                   f"{type(header).__name__}")
    meta = header.get("__metadata__")
    if meta is not None and (not isinstance(meta, dict)
                             or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())):
        raise SafetensorsFileError(f"{path}: the safetensors \"__metadata__\" must map strings to strings")
    spans = []
    for name, v in header.items():
        if name != "__metadata__":
            _, _, begin, end = _entry(path, name, v)
            spans.append((begin, end, name))
    data = size - 8 - n
    spans.sort()
    pos = 0
    for begin, end, name in spans:
        if begin != pos:
            problem = "overlaps the previous tensor" if begin < pos else f"leaves a gap of {begin - pos} bytes"
            raise SafetensorsFileError(f"{path}: tensor {name!r} (data_offsets [{begin}, {end}]) {problem}")
        pos = end
    if pos > data:
        raise SafetensorsFileError(f"{path}: truncated: the tensors need {pos} bytes of data, the file holds "
                                   f"{data} (an interrupted download or copy?)")
    if pos < data:
        raise SafetensorsFileError(f"{path}: {data - pos} bytes after the last tensor that no tensor covers")
    return header


def tensor_meta(path) -> Dict[str, Tuple[str, Tuple[int, ...]]]:
    """name -> (safetensors dtype, shape) of a validated .safetensors file."""
    return {k: (v["dtype"], tuple(v["shape"])) for k, v in read_header(path).items() if k != "__metadata__"}
