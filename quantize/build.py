"""`quantize_checkpoint(src, out, options)`: source checkpoint -> edge bundle.

What the bundle holds (docs/ARCHITECTURE.md, "The edge bundle"):

- the decoder's linears in the standard GPTQ layout (qweight, qzeros, scales, g_idx, bias), under the source's
  own tensor names. checkpoint_format "gptq" (v1: stored zero = zero - 1) for symmetric grids; asymmetric grids
  default to "gptq_v2" (stored zero = zero), because v1 cannot tell an asymmetric zero point of 0 from the
  wrapped -1 that old packers wrote, so GPTQModel (and transformers through it) refuses asymmetric v1
  checkpoints from other producers. `checkpoint_format` overrides the choice;
- the backbone's other tensors (embed_tokens, norms, lm_head, audio_embed_layers) as fp16; with `--lm-head q8`
  or `q4` the lm_head instead as int8 / 4-bit (quantize/FORMAT.md §4; a tied embedding stays fp16 and the
  quantized lm_head is a copy), recorded in config.json's `quantization_config.omni_edge_lm_head` and the
  manifest. Such a bundle is read by omni-edge only (`--lm-head fp16` keeps it a plain GPTQ checkpoint);
- every other stage's tensors unchanged (audio head, vision, audio tokenizer/decoder/flow matching);
- config.json (the source's, plus `quantization_config`) and the side files the runtime reads (generation
  config, tokenizer files, chat template; licence / readme), copied by allow-list and listed in the manifest;
- `omni_edge.json`, the manifest (see omni_edge/bundle.py), written last.

Files: a plain HF source (Llama / Qwen2) gives one `model.safetensors`, so the bundle is at the same time a
GPTQ checkpoint that transformers + GPTQModel read. A Baichuan-Omni source gives `backbone.safetensors`
(backbone, lm_head, audio_embed_layers), `audio_head.safetensors`, `visual.safetensors` and
`audio_tokenizer.safetensors`, listed in `model.safetensors.index.json`.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

from omni_edge import __version__
from omni_edge import bundle as bundle_mod
from omni_edge.backbone import (LM_HEAD_Q4_GROUP, LM_HEAD_Q4_SYM, LM_HEAD_Q8_BLOCK, decoder_in_features,
                                model_group_size, rtn_group_size)
from omni_edge.checkpoint import (INDEX_FILE, LM_HEAD_QUANT_KEY, Checkpoint, Linear as LinearSpec, stage_specs,
                                  stages_of)

from .bundle_writer import (AtomicDir, SafetensorsWriter, clean_stale_partials, copy_side_files, file_entry,
                            source_fingerprint, write_json)
from .calibration import build_calibration, heldout_samples
from .gptq import QuantSpec
from .sequential import STORE_DTYPE, run_sequential

# stage -> bundle file, for Baichuan-Omni sources (plain HF sources put everything in model.safetensors)
OMNI_FILES = {
    "backbone": "backbone.safetensors", "lm_head": "backbone.safetensors", "audio_embed": "backbone.safetensors",
    "audio_head": "audio_head.safetensors",
    "visual": "visual.safetensors", "visual_bridge": "visual.safetensors",
    "audio_encoder": "audio_tokenizer.safetensors", "audio_bridge": "audio_tokenizer.safetensors",
    "rvq": "audio_tokenizer.safetensors", "audio_decoder": "audio_tokenizer.safetensors",
    "flow_prenet": "audio_tokenizer.safetensors", "flow_estimator": "audio_tokenizer.safetensors",
}
HF_FILE = "model.safetensors"
EXTRA_FILE = "extra.safetensors"  # tensors of an omni source that no stage table names, carried unchanged
FP16_STAGES = ("backbone", "lm_head", "audio_embed")  # unquantized tensors of these stages are stored as fp16
TORCH_DTYPE = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
               "float64": torch.float64, "int64": torch.int64, "int32": torch.int32, "int16": torch.int16,
               "int8": torch.int8, "uint8": torch.uint8, "bool": torch.bool}


LM_HEAD_CHOICES = ("fp16", "q8", "q4")  # `--lm-head`
LM_HEAD_DEFAULT = "q8"  # benchmarks/bench_lm_head.py: see the README's lm_head table

VOCODER_FILE = "vocoder.safetensors"  # what the runtime looks for in a bundle (omni_edge.pipeline.VOCODER_FILES)
VOCODER_SOURCES = ("hift.pt", "vocoder.safetensors")  # picked up from the source folder when --vocoder is absent


@dataclass
class QuantizeOptions:
    bits: int = 4
    group_size: int = 128
    sym: bool = True
    act_order: bool = False
    static_groups: Optional[bool] = None  # default: True with act_order
    damp: float = 0.01
    group_stats: str = "block"  # QuantSpec.group_stats
    group_order: bool = True  # QuantSpec.group_order (without act_order): same groups, better column order
    clip: str = "hessian"  # QuantSpec.clip: grid search of each group's range (GPTQ only)
    method: str = "gptq"  # "gptq" | "rtn"
    calib: Optional[str] = None  # JSON-lines file; None = the built-in set
    nsamples: Optional[int] = None  # None: the calibration set's default (calibration.DEFAULT_NSAMPLES)
    seqlen: int = 512
    device: str = "cpu"
    seed: int = 0
    force: bool = False
    heldout: bool = True  # measure perplexity on the built-in held-out text
    heldout_max_tokens: int = 512  # per held-out text
    checkpoint_format: Optional[str] = None  # "gptq" | "gptq_v2"; default: "gptq" if sym else "gptq_v2"
    progress: bool = True
    vocoder: Optional[str] = None  # HiFT vocoder (hift.pt or .safetensors); default: one found in the source
    lm_head: str = LM_HEAD_DEFAULT  # LM_HEAD_CHOICES

    @property
    def format(self) -> str:
        return self.checkpoint_format or ("gptq" if self.sym else "gptq_v2")

    def spec(self) -> QuantSpec:
        act_order = self.act_order and self.method == "gptq"  # RTN has no column order: recorded as desc_act off
        return QuantSpec(bits=self.bits, group_size=self.group_size, sym=self.sym, act_order=act_order,
                         static_groups=self.static_groups if act_order else None, damp=self.damp,
                         group_stats=self.group_stats, group_order=self.group_order and self.method == "gptq",
                         clip=self.clip if self.method == "gptq" else "none")


def _check_paths(src: Path, out: Path) -> None:
    if not src.is_dir():
        raise ValueError(f"SRC {src} is not a folder (expected a checkpoint with config.json and *.safetensors)")
    s, o = src.resolve(), out.absolute().resolve() if out.exists() else out.absolute()
    if s == o or s in o.parents or o in s.parents:
        raise ValueError(f"OUT {out} must lie outside SRC {src} (and not contain it)")


def _check_shapes(ckpt: Checkpoint, spec: QuantSpec) -> None:
    """Every decoder linear must fit the GPTQ layout and the group size, checked before any work."""
    cfg = ckpt.config.backbone
    seen = set()
    for s in stage_specs(ckpt.config, "backbone"):
        if not isinstance(s, LinearSpec):
            continue
        short = s.prefix.split(".", 3)[-1]
        key = (short, s.out_features, s.in_features)
        if key in seen:
            continue
        seen.add(key)
        n, k = s.out_features, s.in_features
        if k % 8 or n % 8:
            raise ValueError(f"{s.prefix}: the GPTQ layout needs in/out features that are multiples of 8, "
                             f"got out={n}, in={k}")
        if spec.group_size != -1 and k % spec.group_size:
            raise ValueError(f"group_size {spec.group_size} does not divide the input size K={k} of {s.prefix}")
    if cfg.num_hidden_layers < 1:
        raise ValueError("the checkpoint has no decoder layers")


def _gptq_parts(prefix: str, n: int, k: int, groups: int, bias: bool) -> Dict[str, Tuple[torch.dtype, Tuple]]:
    d = {prefix + ".qweight": (torch.int32, (k // 8, n)), prefix + ".qzeros": (torch.int32, (groups, n // 8)),
         prefix + ".scales": (torch.float16, (groups, n)), prefix + ".g_idx": (torch.int32, (k,))}
    if bias:
        d[prefix + ".bias"] = (STORE_DTYPE, (n,))
    return d


def lm_head_entry(fmt: str, k: int) -> Optional[dict]:
    """quantization_config["omni_edge_lm_head"] for `--lm-head fmt` and C = k inputs (None for fp16)."""
    if fmt == "q8":
        return {"format": "q8", "bits": 8, "block": min(LM_HEAD_Q8_BLOCK, k), "sym": True}
    if fmt == "q4":
        return {"format": "q4", "bits": 4, "group_size": rtn_group_size(k, LM_HEAD_Q4_GROUP), "sym": LM_HEAD_Q4_SYM,
                "desc_act": False, "checkpoint_format": "gptq_v2"}
    return None


def lm_head_tensors(weight: torch.Tensor, entry: dict):
    """Round-to-nearest q8 / q4 tensors of the lm_head weight (V, C) (source precision) under their bundle names,
    and the (V, C) fp32 weight they decode to."""
    from omni_edge.ops import gemv, q4

    if entry["format"] == "q8":
        w = gemv.quantize_q8(weight, entry["block"])
        return {"lm_head.q8_codes": w.codes, "lm_head.q8_scales": w.scales}, w.dequantize()
    qw = q4.qweight_rtn(weight, entry["group_size"], sym=entry["sym"])
    qweight, qzeros, scales, g_idx = qw.to_gptq(entry["checkpoint_format"])
    return ({"lm_head.qweight": qweight, "lm_head.qzeros": qzeros, "lm_head.scales": scales.to(torch.float16),
             "lm_head.g_idx": g_idx.to(torch.int32)}, qw.dequantize().t())


def _lm_head_specs(entry: dict, n: int, k: int) -> Dict[str, Tuple[torch.dtype, Tuple]]:
    if entry["format"] == "q8":
        return {"lm_head.q8_codes": (torch.int8, (n, k)),
                "lm_head.q8_scales": (torch.float16, (n, -(-k // entry["block"])))}
    return _gptq_parts("lm_head", n, k, -(-k // entry["group_size"]), False)


def _plan(ckpt: Checkpoint, spec: QuantSpec, head: Optional[dict] = None):
    """Which tensor goes to which file, with which dtype and shape; and which are converted.

    Returns files {file: {name: (dtype, shape)}}, copy {name: stored dtype} (tensors copied from the source,
    converted where needed; the rest come from the layer pass), modules {stage: set of files} and
    stage_names {stage: source tensor names}."""
    cfg = ckpt.config
    files: Dict[str, Dict[str, Tuple[torch.dtype, Tuple]]] = {}
    copy: Dict[str, torch.dtype] = {}  # name -> dtype to store (read from the source as is)
    modules: Dict[str, set] = {}
    stage_names: Dict[str, List[str]] = {}
    placed = set()

    def file_of(stage: str) -> str:
        return HF_FILE if cfg.kind == "hf" else OMNI_FILES[stage]

    for stage in stages_of(cfg):
        fname = file_of(stage)
        table = files.setdefault(fname, {})
        if stage == "lm_head" and head is not None:  # the quantized lm_head (a copy of a tied embedding)
            b = cfg.backbone
            table.update(_lm_head_specs(head, b.vocab_size, b.hidden_size))
            placed.update(n for n in ("lm_head.weight",) if ckpt.has(n))
            stage_names["lm_head"] = ["lm_head.weight" if ckpt.has("lm_head.weight") else "model.embed_tokens.weight"]
            modules.setdefault(stage, set()).add(fname)
            continue
        for s in stage_specs(cfg, stage):
            names = [n for n in ckpt.spec_names(s) if ckpt.has(n)]
            placed.update(names)
            stage_names.setdefault(stage, []).extend(names)
            is_layer = stage == "backbone" and s_name(s).startswith("model.layers.")
            if isinstance(s, LinearSpec) and is_layer:
                groups = spec.groups_for(s.in_features)
                parts = _gptq_parts(s.prefix, s.out_features, s.in_features, groups, s.bias)
                table.update(parts)
                continue
            for name in names:
                dtype = STORE_DTYPE if stage in FP16_STAGES else TORCH_DTYPE[ckpt.dtype(name)]
                table[name] = (dtype, ckpt.shape(name))
                if not is_layer:
                    copy[name] = dtype
        if stage_names.get(stage):
            modules.setdefault(stage, set()).add(fname)
    extra = [n for n in ckpt.names() if n not in placed]
    if extra:
        fname = HF_FILE if cfg.kind == "hf" else EXTRA_FILE
        table = files.setdefault(fname, {})
        for name in extra:
            dtype = TORCH_DTYPE[ckpt.dtype(name)]
            table[name] = (dtype, ckpt.shape(name))
            copy[name] = dtype
        modules.setdefault("extra", set()).add(fname)
        stage_names["extra"] = extra
    files = {f: t for f, t in files.items() if t}
    return files, copy, modules, stage_names


def _head_precision(entry: Optional[dict], tied: bool) -> str:
    if entry is None:
        return "float16"
    copy = " (a copy of the tied embedding, which stays float16)" if tied else ""
    if entry["format"] == "q8":
        return f"int8 round-to-nearest, symmetric, one float16 scale per row and {entry['block']} inputs{copy}"
    return (f"int4 round-to-nearest, {'sym' if entry['sym'] else 'asym'}, group {entry['group_size']}, "
            f"GPTQ layout ({entry['checkpoint_format']}){copy}")


def s_name(s) -> str:
    return s.prefix if isinstance(s, LinearSpec) else s.name


def _to_store(name: str, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if t.dtype == dtype:
        return t
    out = t.to(dtype)
    if dtype == torch.float16 and t.is_floating_point() and torch.isfinite(t).all() and not torch.isfinite(out).all():
        raise ValueError(f"{name}: values beyond the fp16 range (max |x| = {float(t.abs().max()):.4g}); "
                         "this tensor cannot be stored as fp16")
    return out


def _token_ids(src: Path) -> dict:
    """Special / added token ids from the source's own files (never constants)."""
    out: dict = {}
    tj = src / "tokenizer.json"
    if tj.is_file():
        data = json.loads(tj.read_text(encoding="utf-8"))
        out["added_tokens"] = {t["content"]: t["id"] for t in data.get("added_tokens", [])
                               if isinstance(t, dict) and "content" in t and "id" in t}
    for fname in ("generation_config.json",):
        p = src / fname
        if p.is_file():
            g = json.loads(p.read_text(encoding="utf-8"))
            for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
                if key in g:
                    out[key] = g[key]
    return out


def _quantization_config(opts: QuantizeOptions, spec: QuantSpec) -> dict:
    return {
        "quant_method": "gptq", "checkpoint_format": opts.format, "bits": spec.bits, "group_size": spec.group_size,
        "desc_act": spec.act_order, "sym": spec.sym, "static_groups": spec.uses_static_groups,
        "true_sequential": True, "damp_percent": spec.damp, "lm_head": False, "pack_dtype": "int32",
        "meta": {"quantizer": [f"omni-edge:{__version__}"], "method": opts.method},
    }


def quantize_checkpoint(src, out, opts: QuantizeOptions, *, log: Callable[[str], None] = print) -> dict:
    """Quantize checkpoint folder `src` into bundle folder `out`; returns the manifest."""
    from omni_edge.tokenizer import Tokenizer, prompt_format

    src, out = Path(src), Path(out)
    t_start = time.time()
    if opts.bits != 4:
        raise ValueError(f"--bits {opts.bits}: bundles hold 4-bit weights (the runtime's q4 kernels); "
                         "the GPTQ code itself also does 2/3/8 bits")
    if opts.format not in ("gptq", "gptq_v2"):
        raise ValueError(f"--checkpoint-format must be gptq or gptq_v2, got {opts.format!r}")
    if opts.method not in ("gptq", "rtn"):
        raise ValueError(f"--method must be gptq or rtn, got {opts.method!r}")
    if opts.lm_head not in LM_HEAD_CHOICES:
        raise ValueError(f"--lm-head must be one of {', '.join(LM_HEAD_CHOICES)}, got {opts.lm_head!r}")
    _check_paths(src, out)
    target = AtomicDir(out, force=opts.force)
    target.check_target()
    for name in clean_stale_partials(out):
        log(f"note: removed {name}, the partial output of an earlier quantize run that was killed")
    if opts.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda: torch sees no CUDA GPU on this machine")
    torch.manual_seed(opts.seed)

    ckpt = Checkpoint.open(src)
    ckpt.finite_check = "all"  # a NaN / Inf weight is refused by name as it is read, never quantized
    cfg = ckpt.config
    if ckpt.gptq is not None or any(n.endswith(".qweight") for n in ckpt.names()):
        raise ValueError(f"{src} is already quantized (it has GPTQ tensors / a quantization_config)")
    for stage in ("backbone", "lm_head"):
        ckpt.require(stage)
    # One group size for the model (the GPTQ config records one): the asked one, or the largest that divides
    # every decoder linear's K (the same rule as `--quant rtn4`), said in the log and the manifest.
    asked_gs = opts.group_size
    gs = model_group_size(decoder_in_features(cfg.backbone), asked_gs)
    group_note = None
    if gs != asked_gs:
        group_note = (f"group size {asked_gs} does not divide every decoder input size K "
                      f"({', '.join(map(str, decoder_in_features(cfg.backbone)))}); using "
                      f"{gs if gs != -1 else 'per-channel (-1)'}, the largest that does")
        log(f"note: {group_note}")
        opts = dataclasses.replace(opts, group_size=gs)
    spec = opts.spec()
    _check_shapes(ckpt, spec)
    head_entry = lm_head_entry(opts.lm_head, cfg.backbone.hidden_size)
    if opts.lm_head == "q4" and (cfg.backbone.vocab_size % 8 or cfg.backbone.hidden_size % 8):
        raise ValueError(f"--lm-head q4: the GPTQ layout needs vocab_size and hidden_size that are multiples of 8, "
                         f"got {cfg.backbone.vocab_size} and {cfg.backbone.hidden_size}; use --lm-head q8")

    tok = Tokenizer.from_dir(src)
    prompt = prompt_format(tok, cfg.kind)
    calib = build_calibration(lambda text: prompt.render([{"role": "user", "content": text}]),
                              calib_file=opts.calib, nsamples=opts.nsamples, seqlen=opts.seqlen, seed=opts.seed,
                              prompt_format=prompt.name)
    for note in calib.notes:
        log(f"note: {note}")
    heldout = heldout_samples(tok.encode, max_tokens=opts.heldout_max_tokens) if opts.heldout else []
    log(f"quantizing {src} ({cfg.kind}, {cfg.backbone.num_hidden_layers} layers) with {opts.method.upper()} "
        f"{spec.bits}-bit, group {spec.group_size}, {'sym' if spec.sym else 'asym'}, act-order "
        f"{'on' if spec.act_order else 'off'}; calibration: {len(calib.samples)} samples, {calib.tokens} tokens "
        f"({calib.source}); device {opts.device}")

    files, copy, modules, stage_names = _plan(ckpt, spec, head_entry)
    fingerprint = source_fingerprint(src / "config.json", ((n, ckpt.dtype(n), ckpt.shape(n)) for n in ckpt.names()))

    with target as tmp:
        writers = {f: SafetensorsWriter(tmp / f, t, metadata={"format": "pt"}) for f, t in files.items()}
        where = {name: w for w in writers.values() for name in w.specs}
        try:
            for name, dtype in copy.items():  # everything outside the decoder layers, one tensor at a time
                where[name].write(name, _to_store(name, ckpt.get(name), dtype))
            head_source = "model.embed_tokens.weight" if cfg.backbone.tie_word_embeddings else "lm_head.weight"
            if head_entry is not None:  # from the source precision, before anything is rounded to fp16
                tensors, _ = lm_head_tensors(ckpt.get(head_source), head_entry)
                for name, t in tensors.items():
                    where[name].write(name, t.contiguous())
                del tensors

            def quantized_head():  # recomputed for the perplexity at the end (not held through the layer pass)
                return lm_head_tensors(ckpt.get(head_source), head_entry)[1]

            def on_layer(i: int, tensors: Dict[str, torch.Tensor]) -> None:
                for name, t in tensors.items():
                    where[name].write(name, t)

            result = run_sequential(ckpt, spec, method=opts.method, calibration=calib.samples, heldout=heldout,
                                    device=opts.device, checkpoint_format=opts.format, on_layer=on_layer,
                                    progress=opts.progress,
                                    quantized_head=None if head_entry is None else quantized_head)
            for w in writers.values():
                w.close()
        except BaseException:
            for w in writers.values():
                w.abort()
            raise
        ckpt.close()

        skipped: List[str] = []
        side = copy_side_files(src, tmp, skipped)
        for why in skipped:
            log(f"note: not copied into the bundle: {why}")
        vocoder = opts.vocoder or next((str(src / n) for n in VOCODER_SOURCES if (src / n).is_file()), None)
        if vocoder is not None and cfg.kind == "omni":
            from omni_edge.vocoder import convert

            convert(vocoder, tmp / VOCODER_FILE)  # checked, weight norm folded, safetensors (never a pickle)
            modules["vocoder"] = {VOCODER_FILE}
            stage_names["vocoder"] = []
            log(f"vocoder: {vocoder} -> {VOCODER_FILE}")
        config = dict(cfg.raw)
        config["quantization_config"] = _quantization_config(opts, spec)
        if head_entry is not None:
            config["quantization_config"][LM_HEAD_QUANT_KEY] = head_entry
        if cfg.kind == "hf":  # every float tensor of the bundle is fp16
            keys = [k for k in ("torch_dtype", "dtype") if k in config] or ["torch_dtype"]
            for key in keys:
                config[key] = "float16"
        write_json(tmp / "config.json", config)
        if len(writers) > 1:
            weight_map = {name: f for f, t in files.items() for name in sorted(t)}
            total = sum(w.total - w.data_start for w in writers.values())
            write_json(tmp / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})

        report = {
            "layers": [r.as_dict() for r in result.layers],
            "mean_output_error": sum(r.output_error for r in result.layers) / len(result.layers),
            "perplexity": None if result.ppl_source is None else {
                "heldout": "built-in held-out text (never used for calibration), plain text, no template",
                "tokens": result.heldout_tokens, "source": result.ppl_source, "quantized": result.ppl_quantized,
                "computed_with": "fp32 layer-by-layer pass; quantized weights dequantized exactly"},
            "seconds": round(time.time() - t_start, 1),
        }
        file_table = {}
        for p in sorted(tmp.iterdir()):
            if p.name != bundle_mod.MANIFEST:
                file_table[p.name] = file_entry(p, tensors=p.suffix == ".safetensors")
        precision = {}
        for stage, names in stage_names.items():
            if stage == "backbone":
                precision[stage] = (f"decoder linears: int{spec.bits} GPTQ ({opts.method}), group {spec.group_size}, "
                                    f"{'sym' if spec.sym else 'asym'}; embed_tokens, norms, biases: float16")
            elif stage == "lm_head" and head_entry is not None:
                precision[stage] = _head_precision(head_entry, cfg.backbone.tie_word_embeddings)
            elif stage == "vocoder":
                precision[stage] = "float32 (HiFT, weight norm folded)"
            elif stage in FP16_STAGES:
                precision[stage] = "float16"
            else:
                dts = sorted({ckpt.dtype(n) for n in names})
                precision[stage] = f"unchanged from the source ({', '.join(dts)})"
        manifest = {
            "format": bundle_mod.FORMAT, "format_version": bundle_mod.FORMAT_VERSION,
            "created_by": f"omni-edge {__version__} quantize",
            "source": {"kind": cfg.kind, "model_type": cfg.raw.get("model_type"),
                       "architectures": cfg.raw.get("architectures"), "fingerprint": fingerprint,
                       "fingerprint_of": "config.json and every tensor's name, dtype and shape",
                       "tensors": len(ckpt.names())},
            "modules": {stage: {"files": sorted(fs), "precision": precision[stage],
                                "quantized": stage == "backbone" or (stage == "lm_head" and head_entry is not None)}
                        for stage, fs in modules.items()},
            "files": file_table,
            "quantization": {
                "method": opts.method, "bits": spec.bits, "group_size": spec.group_size,
                "group_size_requested": asked_gs, "group_size_note": group_note, "sym": spec.sym,
                "desc_act": spec.act_order, "static_groups": spec.uses_static_groups, "damp_percent": spec.damp,
                "block_size": spec.block_size, "group_stats": spec.group_stats, "clip": spec.clip,
                "group_order": spec.group_order and not spec.act_order, "true_sequential": True,
                "checkpoint_format": opts.format,
                "quantized": "every decoder-layer linear (q/k/v or W_pack, o_proj, gate_proj, up_proj, down_proj)"
                             + ("" if head_entry is None else "; the lm_head (see lm_head)"),
                "lm_head": dict(head_entry or {"format": "fp16"},
                                precision=_head_precision(head_entry, cfg.backbone.tie_word_embeddings)),
                "unquantized": {"float16": ["embed_tokens", "norms", "q/k/v biases"]
                                + (["lm_head"] if head_entry is None else [])
                                + (["audio_embed_layers"] if cfg.kind == "omni" else []),
                                "unchanged": sorted(s for s in modules if s not in FP16_STAGES)},
                "calibration": calib.describe(), "seed": opts.seed, "device": opts.device,
            },
            "token_ids": _token_ids(src),
            "side_files": side,
            "report": report,
        }
        write_json(tmp / bundle_mod.MANIFEST, manifest)
        bundle_mod.validate(tmp)  # the bundle must pass its own check before it may appear
    return manifest
