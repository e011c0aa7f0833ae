"""Writing an edge bundle: atomically, one tensor at a time.

- `AtomicDir(out, force=)`: a context manager that hands out a temporary folder beside OUT
  (`.OUT.partial-<pid>`) and renames it to OUT only when the `with` block ends without an exception. On an
  exception or Ctrl-C the temporary folder is removed; a process killed outright leaves only the hidden
  partial folder, which has no manifest and so is never taken for a bundle. An existing OUT is refused
  unless force=True, and even then only replaced if it is empty or a bundle (it has omni_edge.json).
- `SafetensorsWriter(path, specs)`: a .safetensors file whose table of contents (names, dtypes, shapes) is
  known up front; the header is written first and each tensor is written into its slot whenever it is
  ready, so a 7B backbone never has to sit in memory as a whole.
- `source_fingerprint(ckpt)`, `copy_side_files(src, dst)`, `file_entry(path)`: manifest helpers.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from omni_edge.bundle import MANIFEST, sha256_of, tensor_table

# torch dtype <-> safetensors dtype name
ST_DTYPE = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
            torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
            torch.bool: "BOOL"}
ST_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}

# Files of a source checkpoint that are never copied into a bundle (weights are rewritten, pickles never read).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".pkl", ".ckpt", ".onnx", ".gguf", ".h5", ".msgpack")
NOT_COPIED = ("config.json", "model.safetensors.index.json", "quantize_config.json", MANIFEST)
SIDE_FILE_LIMIT = 64 << 20  # bigger top-level files are not side files (tokenizer.json of Qwen is ~7 MB)


class OutputExistsError(FileExistsError):
    pass


# ------------------------------------------------------------------------------------------------
# Atomic output folder
# ------------------------------------------------------------------------------------------------

def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(root)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class AtomicDir:
    """with AtomicDir(out, force=False) as tmp: write into tmp; on success tmp becomes out."""

    def __init__(self, out, *, force: bool = False):
        self.out = Path(out).absolute()
        self.force = force
        self.tmp = self.out.parent / f".{self.out.name}.partial-{os.getpid()}"

    def check_target(self) -> None:
        """Raise if OUT may not be written (call early, before any long work)."""
        out = self.out
        if out.exists() or out.is_symlink():
            if not self.force:
                raise OutputExistsError(f"{out} already exists; pass --force to replace it")
            if not out.is_dir() or out.is_symlink():
                raise OutputExistsError(f"{out} exists and is not a folder; not replacing it even with --force")
            if any(out.iterdir()) and not (out / MANIFEST).is_file():
                raise OutputExistsError(f"{out} is a non-empty folder that is not an omni-edge bundle (no "
                                        f"{MANIFEST}); not replacing it even with --force")
        if not out.parent.is_dir():
            raise OutputExistsError(f"the parent folder of {out} does not exist")

    def __enter__(self) -> Path:
        self.check_target()
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir()
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        try:
            self._commit()
        except BaseException:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise
        return False

    def _commit(self) -> None:
        _fsync_tree(self.tmp)
        self.check_target()  # still allowed (nothing appeared meanwhile without --force)
        old = None
        if self.out.exists():
            old = self.out.parent / f".{self.out.name}.old-{os.getpid()}"
            os.rename(self.out, old)
        os.rename(self.tmp, self.out)
        _fsync_dir(self.out.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------------------------
# Streaming safetensors
# ------------------------------------------------------------------------------------------------

class SafetensorsWriter:
    """One .safetensors file with a fixed table of contents; tensors are written in any order.

    specs: {name: (torch dtype, shape)}. Data are laid out by decreasing item size, then name (so every
    tensor is aligned to its item size), the header is padded with spaces to a multiple of 8 bytes."""

    def __init__(self, path, specs: Dict[str, Tuple[torch.dtype, Sequence[int]]],
                 metadata: Optional[Dict[str, str]] = None):
        self.path = Path(path)
        self.specs = {n: (dt, tuple(int(s) for s in shape)) for n, (dt, shape) in specs.items()}
        order = sorted(self.specs, key=lambda n: (-ST_ITEMSIZE[ST_DTYPE[self.specs[n][0]]], n))
        header: Dict[str, object] = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        self.offsets: Dict[str, Tuple[int, int]] = {}
        pos = 0
        for n in order:
            dt, shape = self.specs[n]
            nbytes = ST_ITEMSIZE[ST_DTYPE[dt]]
            for s in shape:
                nbytes *= s
            self.offsets[n] = (pos, pos + nbytes)
            header[n] = {"dtype": ST_DTYPE[dt], "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
            pos += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)
        self.data_start = 8 + len(raw)
        self.total = self.data_start + pos
        self.pending = set(self.specs)
        self._f = open(self.path, "wb")
        self._f.write(struct.pack("<Q", len(raw)))
        self._f.write(raw)
        self._f.truncate(self.total)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if name not in self.specs:
            raise ValueError(f"{self.path.name}: tensor {name} is not in this file's table of contents")
        if name not in self.pending:
            raise ValueError(f"{self.path.name}: tensor {name} was already written")
        dt, shape = self.specs[name]
        if tensor.dtype != dt or tuple(tensor.shape) != shape:
            raise ValueError(f"{self.path.name}: tensor {name} is {tensor.dtype} {tuple(tensor.shape)}, the table "
                             f"says {dt} {shape}")
        t = tensor.detach().to("cpu").contiguous()
        begin, end = self.offsets[name]
        data = t.view(torch.uint8).reshape(-1).numpy() if t.numel() else b""
        if len(data) != end - begin:
            raise AssertionError(f"{name}: {len(data)} bytes for a {end - begin}-byte slot")
        self._f.seek(self.data_start + begin)
        self._f.write(data)
        self.pending.discard(name)

    def close(self) -> None:
        if self._f.closed:
            return
        if self.pending:
            names = sorted(self.pending)
            self._f.close()
            raise ValueError(f"{self.path.name}: {len(names)} tensor(s) were never written, e.g. {names[0]}")
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()

    def abort(self) -> None:
        if not self._f.closed:
            self._f.close()


# ------------------------------------------------------------------------------------------------
# Manifest helpers
# ------------------------------------------------------------------------------------------------

def source_fingerprint(config_path, tensors: Iterable[Tuple[str, str, Sequence[int]]]) -> str:
    """sha256 over config.json's content and every tensor's (name, dtype, shape): identifies the source
    checkpoint without reading its weights."""
    with open(config_path, "rb") as f:
        config = json.loads(f.read().decode("utf-8"))
    doc = {"config": config, "tensors": sorted([n, d, list(s)] for n, d, s in tensors)}
    blob = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return "sha256:" + hashlib.sha256(blob).hexdigest()


def side_files(src) -> List[str]:
    """Top-level files of a checkpoint worth carrying into a bundle: tokenizer files, generation config,
    chat template, license, remote code. Never weights, the index, config.json or a manifest."""
    out = []
    for p in sorted(Path(src).iterdir()):
        if not p.is_file() or p.name.startswith("."):
            continue
        if p.name in NOT_COPIED or p.name.endswith(WEIGHT_SUFFIXES):
            continue
        if p.stat().st_size > SIDE_FILE_LIMIT:
            continue
        out.append(p.name)
    return out


def copy_side_files(src, dst) -> List[str]:
    names = side_files(src)
    for name in names:
        shutil.copyfile(Path(src) / name, Path(dst) / name)
    return names


def file_entry(path, *, tensors: bool = False) -> dict:
    """{"bytes", "sha256"[, "tensors"]} of one written file, for the manifest's "files" table."""
    path = Path(path)
    entry = {"bytes": path.stat().st_size, "sha256": sha256_of(path)}
    if tensors:
        entry["tensors"] = tensor_table(path)
    return entry


def write_json(path, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")
