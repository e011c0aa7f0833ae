"""The edge bundle's manifest (`omni_edge.json`): reading and validation, runtime side.

A bundle is one folder written by `omni-edge quantize` (docs/ARCHITECTURE.md, "The edge bundle"). Its manifest
lists every file with its size (and sha256), the name, dtype and shape of every tensor in each
.safetensors file, the modules and the files that hold them, the precision of each, the quantization
settings and the source checkpoint's fingerprint. `validate(path)` checks the folder against it before
any weight is loaded, so a missing, truncated or edited file is reported by name instead of failing deep
inside a kernel; `verify(path)` hashes every file. Plain python only: importing this module is cheap.

Manifest layout (format_version 1):

    {"format": "omni-edge-bundle", "format_version": 1, "created_by": "...",
     "source": {"kind": "omni" | "hf", "fingerprint": "sha256:...", ...},
     "files": {"backbone.safetensors": {"bytes": int, "sha256": hex,
                                        "tensors": {name: [dtype, [dims...]], ...}},   # .safetensors only
               "config.json": {"bytes": int, "sha256": hex}, ...},
     "modules": {"backbone": {"files": ["backbone.safetensors"], "precision": str, ...}, ...},
     "quantization": {"method": "gptq" | "rtn", "bits": 4, "group_size": int, "sym": bool,
                      "desc_act": bool, "checkpoint_format": "gptq", ...},
     "token_ids": {...}, "report": {...}}
"""

from __future__ import annotations

import json
from pathlib import Path

from omni_edge.safetensors_file import read_header, sha256_file, special_file

MANIFEST = "omni_edge.json"
FORMAT = "omni-edge-bundle"
FORMAT_VERSION = 1
# Files at most this big have their sha256 checked on every validate(); bigger ones only with deep=True.
HASH_ALWAYS_BELOW = 64 << 20
# Keys of config.json's quantization_config that must agree with the manifest's "quantization".
QUANT_KEYS = ("bits", "group_size", "sym", "desc_act", "checkpoint_format")


class BundleError(ValueError):
    """The folder is not a usable bundle; the message names the file and what was expected."""


def is_bundle(path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def read_manifest(path) -> dict:
    """The parsed manifest of bundle folder `path` (format checked, files not)."""
    root = Path(path)
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise BundleError(f"{root} is not an omni-edge bundle: {MANIFEST} is missing")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise BundleError(f"{mpath}: cannot read the manifest: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{mpath}: expected \"format\": \"{FORMAT}\", got "
                          f"{manifest.get('format') if isinstance(manifest, dict) else type(manifest).__name__!r}")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise BundleError(f"{mpath}: format_version must be a positive integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise BundleError(f"{mpath}: bundle format version {version} is newer than this omni-edge reads "
                          f"({FORMAT_VERSION}); upgrade omni-edge")
    for key in ("files", "modules"):
        if not isinstance(manifest.get(key), dict):
            raise BundleError(f"{mpath}: \"{key}\" must be an object")
    for rel, info in manifest["files"].items():
        if not isinstance(info, dict) or not isinstance(info.get("bytes"), int) or isinstance(info["bytes"], bool):
            raise BundleError(f"{mpath}: entry for {rel} needs an integer \"bytes\"")
        if "sha256" in info and not (isinstance(info["sha256"], str) and len(info["sha256"]) == 64):
            raise BundleError(f"{mpath}: entry for {rel}: \"sha256\" must be 64 hex digits")
        if "tensors" in info and not isinstance(info["tensors"], dict):
            raise BundleError(f"{mpath}: entry for {rel}: \"tensors\" must be an object")
    for module, spec in manifest["modules"].items():
        if not isinstance(spec, dict) or not isinstance(spec.get("files", []), list):
            raise BundleError(f"{mpath}: module {module} must be an object with a \"files\" list")
    return manifest


def safetensors_header(path) -> dict:
    """The validated JSON header of a .safetensors file (`omni_edge.safetensors_file.read_header`)."""
    try:
        return read_header(path)
    except ValueError as e:
        raise BundleError(str(e)) from None


def tensor_table(path) -> dict:
    """{name: [dtype, [dims...]]} of a .safetensors file, in the manifest's form."""
    return {k: [v["dtype"], list(v["shape"])] for k, v in safetensors_header(path).items() if k != "__metadata__"}


sha256_of = sha256_file  # one sha256 helper for the project (omni_edge.safetensors_file)


def source_fingerprint(config_path, tensors) -> str:
    """sha256 over config.json's content and every tensor's (name, dtype, shape): identifies a source
    checkpoint without reading its weights. `tensors`: iterable of (name, dtype, shape)."""
    import hashlib

    with open(config_path, "rb") as f:
        config = json.loads(f.read().decode("utf-8"))
    doc = {"config": config, "tensors": sorted([n, d, list(s)] for n, d, s in tensors)}
    blob = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return "sha256:" + hashlib.sha256(blob).hexdigest()


def _safe_relpath(root: Path, rel: str) -> Path:
    p = Path(rel)
    if p.is_absolute() or ".." in p.parts or not rel:
        raise BundleError(f"{root / MANIFEST}: file name {rel!r} must be a plain path inside the bundle")
    return root / p


def _check_tensors(rel: str, found: dict, expected: dict) -> None:
    missing = [k for k in expected if k not in found]
    if missing:
        raise BundleError(f"{rel}: missing tensor(s) listed in the manifest: {', '.join(sorted(missing)[:5])}"
                          + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""))
    extra = [k for k in found if k not in expected]
    if extra:
        raise BundleError(f"{rel}: tensor(s) not in the manifest: {', '.join(sorted(extra)[:5])}"
                          + (f" (+{len(extra) - 5} more)" if len(extra) > 5 else ""))
    for name, (dtype, shape) in expected.items():
        got_dtype, got_shape = found[name]
        if got_dtype != dtype or list(got_shape) != list(shape):
            raise BundleError(f"{rel}: tensor {name} is {got_dtype} {tuple(got_shape)}, the manifest says "
                              f"{dtype} {tuple(shape)}")


def validate(path, *, deep: bool = False, hash_small: bool = True) -> dict:
    """Check bundle folder `path` against its manifest; returns the manifest.

    Always: every listed file exists with the listed size; every .safetensors file holds exactly the listed
    tensors with the listed dtypes and shapes; small files (config, tokenizer) match their sha256; every
    module's files are listed; config.json's quantization_config agrees with the manifest.
    deep=True also hashes the big files (seconds per GB; `omni-edge verify` does). Big files are not hashed
    at load so that loading stays fast; their NaN/Inf-prone small tensors (scales, norms, biases) are checked
    for finiteness as they are read (omni_edge.checkpoint.FINITE_CHECK_ELEMS)."""
    root = Path(path)
    manifest = read_manifest(root)
    files = manifest["files"]
    for rel, info in files.items():
        fpath = _safe_relpath(root, rel)
        owner = [m for m, spec in manifest["modules"].items() if rel in spec.get("files", ())]
        kind = special_file(fpath)
        if kind:
            raise BundleError(f"bundle {root}: {rel} is {kind}, not a regular file")
        if not fpath.is_file():
            what = f" (module {', '.join(owner)})" if owner else ""
            raise BundleError(f"bundle {root} is missing {rel}{what}, which its manifest lists")
        size = fpath.stat().st_size
        if size != info["bytes"]:
            raise BundleError(f"{rel}: {size} bytes, the manifest says {info['bytes']}: the file was changed or "
                              f"truncated after the bundle was written")
        if "tensors" in info:
            _check_tensors(rel, tensor_table(fpath), info["tensors"])
        if info.get("sha256") and (deep or (hash_small and size < HASH_ALWAYS_BELOW)):
            digest = sha256_of(fpath)
            if digest != info["sha256"]:
                raise BundleError(f"{rel}: sha256 {digest[:16]}..., the manifest says {info['sha256'][:16]}...: "
                                  f"the file was changed after the bundle was written")
    for module, spec in manifest["modules"].items():
        for rel in spec.get("files", ()):
            if rel not in files:
                raise BundleError(f"{root / MANIFEST}: module {module} names {rel}, which is not in \"files\"")
    _check_quant_config(root, manifest)
    return manifest


def verify(path, *, progress=None) -> dict:
    """Check every file of bundle `path` against the manifest, sha256 included (validate's quick checks first).

    Returns {"ok": bool, "files": [{"file", "bytes", "status": "ok" | "MISMATCH" | "NO HASH", "detail"}],
    "unlisted": [names of files in the folder the manifest does not list], "structure": "ok" or the first
    problem validate() found (a size, a tensor table, config.json)}. Missing files are rows with status "MISSING".
    Raises BundleError only when there is no readable manifest. `progress(rel, nbytes)` is called before each
    file is hashed."""
    root = Path(path)
    manifest = read_manifest(root)
    quick: str = ""
    try:
        validate(root, deep=False, hash_small=False)
    except BundleError as e:
        quick = str(e)
    rows = []
    for rel, info in sorted(manifest["files"].items()):
        fpath = _safe_relpath(root, rel)
        if special_file(fpath) or not fpath.is_file():
            rows.append({"file": rel, "bytes": info["bytes"], "status": "MISSING",
                         "detail": special_file(fpath) or "not in the folder"})
            continue
        if progress is not None:
            progress(rel, fpath.stat().st_size)
        want = info.get("sha256")
        if not want:
            rows.append({"file": rel, "bytes": info["bytes"], "status": "NO HASH",
                         "detail": "the manifest records no sha256 for it"})
            continue
        got = sha256_file(fpath)
        ok = got == want
        rows.append({"file": rel, "bytes": info["bytes"], "status": "ok" if ok else "MISMATCH",
                     "detail": "" if ok else f"sha256 {got[:16]}..., the manifest says {want[:16]}..."})
    listed = set(manifest["files"]) | {MANIFEST}
    unlisted = sorted(p.name for p in root.iterdir() if p.name not in listed)
    ok = not quick and all(r["status"] == "ok" for r in rows)
    return {"ok": ok, "files": rows, "unlisted": unlisted, "structure": quick or "ok"}


def _check_quant_config(root: Path, manifest: dict) -> None:
    quant = manifest.get("quantization")
    if not quant:
        return
    cpath = root / "config.json"
    try:
        config = json.loads(cpath.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise BundleError(f"bundle {root}: cannot read config.json: {e}") from None
    qc = config.get("quantization_config")
    if not isinstance(qc, dict):
        raise BundleError(f"{cpath}: no quantization_config, but the manifest says the backbone is quantized")
    for key in QUANT_KEYS:
        if key in quant and qc.get(key) != quant[key]:
            raise BundleError(f"{cpath}: quantization_config.{key} is {qc.get(key)!r}, the manifest says "
                              f"{quant[key]!r}")


def module_files(manifest: dict, module: str) -> list:
    spec = manifest["modules"].get(module)
    if spec is None:
        raise BundleError(f"the bundle has no module {module!r} (it has: {', '.join(manifest['modules'])})")
    return list(spec.get("files", ()))

