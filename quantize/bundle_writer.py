"""Writing an edge bundle: atomically, one tensor at a time.

- `AtomicDir(out, force=)`: a context manager that hands out a temporary folder beside OUT
  (`.OUT.partial-<pid>`) and renames it to OUT only when the `with` block ends without an exception. On an
  exception or Ctrl-C the temporary folder is removed; a process killed outright leaves only the hidden
  partial folder, which has no manifest and so is never taken for a bundle; the next run for the same OUT
  removes such folders of dead processes (`clean_stale_partials`) and says so. An existing OUT is refused
  unless force=True, and even then only replaced if it is empty or a bundle (it has omni_edge.json).
- `SafetensorsWriter(path, specs)`: a .safetensors file whose table of contents (names, dtypes, shapes) is
  known up front; the header is written first and each tensor is written into its slot whenever it is
  ready, so a 7B backbone never has to sit in memory as a whole.
- `source_fingerprint(ckpt)`, `copy_side_files(src, dst)` (an allow-list, never through a symlink leaving the
  source), `file_entry(path)`: manifest helpers.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from omni_edge.bundle import MANIFEST, sha256_of, source_fingerprint, tensor_table  # noqa: F401 (re-exported)
from omni_edge.safetensors_file import special_file

# torch dtype <-> safetensors dtype name
ST_DTYPE = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
            torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
            torch.bool: "BOOL"}
ST_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}

# Files of a source checkpoint that are never copied into a bundle (weights are rewritten, pickles never read).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".pkl", ".ckpt", ".onnx", ".gguf", ".h5", ".msgpack")
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

# The only source files a bundle carries besides the weights it writes and its own config.json: what the runtime
# reads (generation config, tokenizer files, chat template, processor settings) and the licence / readme that
# must travel with the weights. Anything else in the source folder (notes, credentials, remote code, caches)
# stays out.
SIDE_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja",
              "chat_template.json", "preprocessor_config.json", "processor_config.json")
SIDE_FILE_PREFIXES = ("LICENSE", "LICENCE", "NOTICE", "README", "USE_POLICY")  # LICENSE, LICENSE.txt, README.md


def _side_file_ok(src: Path, p: Path) -> str:
    """'' when `p` may be copied; else why not (in words)."""
    if p.is_symlink():
        target = Path(os.path.realpath(p))
        if src.resolve() not in target.parents:
            return f"a symlink to {target}, outside the source folder"
    if special_file(p) or not p.is_file():
        return special_file(p) or "not a regular file"
    if p.stat().st_size > SIDE_FILE_LIMIT:
        return f"larger than {SIDE_FILE_LIMIT >> 20} MiB"
    return ""


def side_files(src, skipped: Optional[List[str]] = None) -> List[str]:
    """Names of the source's top-level files a bundle carries (SIDE_FILES and licence / readme files), never
    through a symlink that leaves the source folder. Candidates refused are described in `skipped`."""
    src = Path(src)
    out = []
    for p in sorted(src.iterdir()):
        wanted = p.name in SIDE_FILES or (p.name.upper().startswith(SIDE_FILE_PREFIXES) and "/" not in p.name
                                          and not p.name.endswith(WEIGHT_SUFFIXES))
        if not wanted:
            continue
        why = _side_file_ok(src, p)
        if why:
            if skipped is not None:
                skipped.append(f"{p.name}: {why}")
            continue
        out.append(p.name)
    return out


def copy_side_files(src, dst, skipped: Optional[List[str]] = None) -> List[str]:
    """Copy `side_files(src)` into `dst` (file contents; the copies are plain files). Returns their names."""
    names = side_files(src, skipped)
    for name in names:
        shutil.copyfile(Path(src) / name, Path(dst) / name, follow_symlinks=True)
    return names


def clean_stale_partials(out) -> List[str]:
    """Remove `.OUT.partial-<pid>` folders beside OUT left by quantize runs that were killed outright (their
    process no longer exists). Folders of live processes are kept. Returns the names removed."""
    out = Path(out).absolute()
    removed = []
    if not out.parent.is_dir():
        return removed
    prefix = f".{out.name}.partial-"
    for p in out.parent.iterdir():
        if not p.name.startswith(prefix) or not p.is_dir() or p.is_symlink():
            continue
        pid_text = p.name[len(prefix):]
        if not pid_text.isdigit():
            continue
        pid = int(pid_text)
        if pid == os.getpid() or _alive(pid):
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p.name)
    return sorted(removed)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return pid < 2**22  # another user's process (or an absurd number): keep its folder unless absurd
    return True


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
