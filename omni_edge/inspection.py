"""`omni-edge inspect PATH`: what a checkpoint or edge bundle holds, without loading a weight.

Reads config.json, the safetensors headers (validated) and, for a bundle, its manifest; prints the model's
shape, each module (stage) with its tensor count, bytes and precision, the files and the source fingerprint
(sha256 over config.json and every tensor's name, dtype and shape: the same value `quantize` records in a
bundle it writes from this checkpoint). `--json` prints the same as one JSON object. Plain python: no torch.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", metavar="PATH", help="checkpoint folder or edge bundle folder")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB" if n >= 2**20 else f"{n / 1024:,.1f} KiB"


def describe(path) -> dict:
    """The facts `inspect` prints, as a dict (see the module docstring). ValueError on a folder that cannot
    be read as a checkpoint or bundle."""
    from omni_edge import bundle
    from omni_edge.checkpoint import Checkpoint, stage_specs, stages_of
    from omni_edge.safetensors_file import ITEMSIZE

    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"{path} is not a folder (expected a checkpoint or bundle folder)")
    manifest = bundle.read_manifest(root) if bundle.is_bundle(root) else None
    ckpt = Checkpoint.open(root, check=False)
    cfg, b = ckpt.config, ckpt.config.backbone

    def nbytes(name: str) -> int:
        dt, shape = ckpt._header[name]
        n = ITEMSIZE[dt]
        for s in shape:
            n *= s
        return n

    modules = {}
    placed = set()
    for stage in stages_of(cfg):
        names = [n for s in stage_specs(cfg, stage) for n in ckpt.spec_names(s) if ckpt.has(n)]
        placed.update(names)
        if not names:
            continue
        quant = any(n.endswith(".qweight") for n in names)
        dtypes = sorted({ckpt.dtype(n) for n in names if not n.endswith((".qweight", ".qzeros", ".g_idx"))})
        precision = (f"int{ckpt.gptq.bits} GPTQ linears (group {ckpt.gptq.group_size}), other tensors "
                     f"{'/'.join(dtypes)}" if quant and ckpt.gptq else "/".join(dtypes))
        if manifest and stage in manifest["modules"]:
            precision = manifest["modules"][stage].get("precision", precision)
        missing = ckpt.missing(stage)
        modules[stage] = {"tensors": len(names), "bytes": sum(nbytes(n) for n in names), "precision": precision,
                          "files": sorted({os.path.basename(ckpt._files[n]) for n in names}),
                          "missing_tensors": len(missing)}
    unknown = [n for n in ckpt.names() if n not in placed]
    if unknown:
        modules["other"] = {"tensors": len(unknown), "bytes": sum(nbytes(n) for n in unknown),
                            "precision": "/".join(sorted({ckpt.dtype(n) for n in unknown})),
                            "files": sorted({os.path.basename(ckpt._files[n]) for n in unknown}),
                            "missing_tensors": 0}
    files = {p.name: p.stat().st_size for p in sorted(root.iterdir()) if p.is_file() and not p.is_symlink()}
    out = {
        "path": str(root), "type": "bundle" if manifest else "checkpoint",
        "model": {"kind": cfg.kind, "model_type": cfg.raw.get("model_type"), "layers": b.num_hidden_layers,
                  "hidden": b.hidden_size, "heads": b.num_attention_heads, "kv_heads": b.num_key_value_heads,
                  "head_dim": b.head_dim, "intermediate": b.intermediate_size, "vocab": b.vocab_size,
                  "max_position_embeddings": b.max_position_embeddings},
        "modules": modules,
        "files": files,
        "total_bytes": sum(files.values()),
        "tensors": len(ckpt.names()),
        "quantization": None if ckpt.gptq is None else {
            "bits": ckpt.gptq.bits, "group_size": ckpt.gptq.group_size, "sym": ckpt.gptq.sym,
            "desc_act": ckpt.gptq.desc_act, "checkpoint_format": ckpt.gptq.checkpoint_format},
    }
    if manifest:
        src = manifest.get("source", {}) if isinstance(manifest.get("source"), dict) else {}
        out["bundle"] = {"format_version": manifest.get("format_version"), "created_by": manifest.get("created_by"),
                         "method": (manifest.get("quantization") or {}).get("method")}
        out["source_fingerprint"] = src.get("fingerprint")
    else:
        out["source_fingerprint"] = bundle.source_fingerprint(
            root / "config.json", ((n, ckpt.dtype(n), ckpt.shape(n)) for n in ckpt.names()))
    ckpt.close()
    return out


def format_text(d: dict) -> str:
    m = d["model"]
    lines = [f"{d['type']} {d['path']}"]
    if d["type"] == "bundle":
        bd = d["bundle"]
        lines.append(f"  bundle format {bd['format_version']}, written by {bd['created_by']}")
    lines.append(f"  model: {m['kind']} ({m['model_type']}), {m['layers']} layers, hidden {m['hidden']}, "
                 f"{m['heads']} heads / {m['kv_heads']} kv heads x {m['head_dim']}, MLP {m['intermediate']}, "
                 f"vocab {m['vocab']}, context {m['max_position_embeddings']}")
    q = d["quantization"]
    lines.append("  quantization: " + ("none" if q is None else
                 f"{q['bits']}-bit GPTQ, group {q['group_size']}, {'sym' if q['sym'] else 'asym'}, "
                 f"act-order {'on' if q['desc_act'] else 'off'}, format {q['checkpoint_format']}"
                 + (f", method {d['bundle']['method']}" if d.get("bundle", {}).get("method") else "")))
    lines.append(f"  source fingerprint: {d['source_fingerprint']}")
    lines.append(f"  modules ({d['tensors']} tensors):")
    for name, mod in d["modules"].items():
        miss = f", {mod['missing_tensors']} tensor(s) MISSING" if mod["missing_tensors"] else ""
        lines.append(f"    {name:15s} {mod['tensors']:6d} tensors {_mib(mod['bytes']):>14s}  {mod['precision']}"
                     f"  [{', '.join(mod['files'])}]{miss}")
    lines.append("  files:")
    for name, size in d["files"].items():
        lines.append(f"    {name:36s} {_mib(size):>14s}")
    lines.append(f"  total: {_mib(d['total_bytes'])}")
    return "\n".join(lines)


def run(args) -> int:
    from omni_edge.cli import CliError

    try:
        d = describe(args.path)
    except (OSError, ValueError) as e:
        raise CliError(" ".join(str(e).split())) from None
    print(json.dumps(d, indent=2) if args.json else format_text(d))
    return 0
