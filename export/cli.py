"""`omni-edge export BUNDLE --stages vision[,audio_encoder,speech]`: write ONNX graphs into an edge bundle.

Each stage's graph is exported, checked (onnx checker, strict shape inference, TensorRT-ready ops) and
measured against its torch module in onnxruntime before it is moved into the bundle; the manifest's "graphs"
table then lists it (file, external data, inputs, outputs, opset, precision, parity) and is rewritten
atomically. A plain checkpoint folder (no `omni_edge.json`) is refused: the runtime finds graphs only through
a bundle's manifest, so write a bundle first with `omni-edge quantize`.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from omni_edge import cli_args


def _vision(ctx):
    from . import vision

    return vision.export(ctx)


def _graph_files(stage_entries, precision: str):
    """GraphFile records of the entries the standalone stage exporters return ({stage: entry})."""
    from .common import GraphFile

    out = []
    for stage, entry in stage_entries.items():
        if "file" not in entry:
            continue  # e.g. an fp16 graph that missed its error bound: not written
        rest = {k: v for k, v in entry.items() if k not in ("file", "data", "inputs", "outputs", "opset", "parity",
                                                            "precision")}
        out.append(GraphFile(stage=stage, precision=precision, file=entry["file"], data=list(entry.get("data", [])),
                             inputs=list(entry["inputs"]), outputs=list(entry["outputs"]), opset=entry["opset"],
                             parity=entry.get("parity", {}), extra=rest))
    return out


def _audio_encoder(ctx):
    from . import audio_encoder

    graphs = []
    for precision in ctx.precisions:
        ctx.log(f"audio_encoder: exporting {precision}")
        entry = audio_encoder.export(ctx.bundle_dir, None, precision, threads=ctx.threads)
        graphs += _graph_files({"audio_encoder": entry}, precision)
    return graphs


def _speech(ctx):
    import torch

    from omni_edge.speech import SpeechDecoder
    from omni_edge.vocoder import Vocoder

    from . import speech

    decoder = SpeechDecoder.from_checkpoint(ctx.ckpt, ctx.config, dtype=torch.float32, backend="torch")
    vocoder_file = ctx.bundle_dir / "vocoder.safetensors"
    vocoder = Vocoder.from_file(vocoder_file) if vocoder_file.is_file() else None
    if vocoder is None:
        ctx.log("speech: the bundle has no vocoder.safetensors: the vocoder graph is skipped")
    graphs = []
    for precision in ctx.precisions:
        ctx.log(f"speech: exporting {precision}")
        entries = speech.export(ctx.bundle_dir, None, precision, speech=decoder, vocoder=vocoder)
        for stage, by_prec in entries.items():
            entry = by_prec.get(precision, {})
            if "skipped" in entry:
                ctx.log(f"speech: {stage} {precision} not written: {entry['skipped']}")
            graphs += _graph_files({stage: entry}, precision)
    return graphs


# --stages name -> exporter `(ctx) -> List[GraphFile]` (each writes its graphs into the bundle folder).
STAGES = {
    "vision": _vision,
    "audio_encoder": _audio_encoder,
    "speech": _speech,
}
PRECISIONS = ("float32", "float16")


def add_arguments(p) -> None:
    p.add_argument("bundle", help="an edge bundle folder (with omni_edge.json), written by `omni-edge quantize`")
    p.add_argument("--stages", default="vision",
                   help=f"comma-separated stages to export (known: {', '.join(STAGES)}; default: vision)")
    p.add_argument("--precision", default="float32,float16",
                   help="comma-separated graph precisions: float32, float16 (default: both)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    cli_args.add_threads(p, " for tracing, the parity check's onnxruntime sessions and the native kernels")


def _split(value: str, known, what: str):
    items = [s.strip() for s in str(value).split(",") if s.strip()]
    bad = [s for s in items if s not in known]
    if not items or bad:
        raise ValueError(f"--{what}: expected a comma-separated subset of {', '.join(known)}, got {value!r}")
    return list(dict.fromkeys(items))


def export_bundle(bundle_dir, stages=("vision",), precisions=PRECISIONS, *, opset: int = 17, threads=None,
                  log=print, external_data_above=None) -> dict:
    """Export `stages` into `bundle_dir`; returns the rewritten manifest. ValueError subclasses on bad input."""
    from omni_edge import bundle
    from omni_edge.checkpoint import Checkpoint

    from .common import EXTERNAL_DATA_ABOVE, ExportContext, ExportError, write_manifest

    root = Path(bundle_dir)
    if not root.is_dir():
        raise ExportError(f"export: {root} is not a folder")
    if not bundle.is_bundle(root):
        raise ExportError(f"export: {root} is not an omni-edge bundle ({bundle.MANIFEST} is missing); write one "
                          f"with `omni-edge quantize CHECKPOINT {root.name}-bundle` and export into that")
    if not 17 <= opset <= 20:
        raise ExportError(f"export: --opset must lie in [17, 20] (LayerNormalization is an op from 17), got {opset}")
    manifest = bundle.validate(root)
    ckpt = Checkpoint.open(root)
    if ckpt.config.kind != "omni":
        raise ExportError(f"export: {root} holds a text-only model ({ckpt.config.kind}); it has no vision or "
                          f"audio stages to export")
    ctx = ExportContext(bundle_dir=root, manifest=manifest, ckpt=ckpt, config=ckpt.config,
                        precisions=tuple(precisions), opset=opset, threads=threads, log=log,
                        external_data_above=EXTERNAL_DATA_ABOVE if external_data_above is None else external_data_above)
    graphs = []
    try:
        for stage in stages:
            with warnings.catch_warnings():  # the tracer's notes on constant folding and Python scalars
                warnings.simplefilter("ignore")
                graphs += STAGES[stage](ctx)
    finally:
        ckpt.close()
    return write_manifest(root, graphs)


def run(args) -> int:
    from omni_edge.cli import CliError

    try:
        stages = _split(args.stages, STAGES, "stages")
        precisions = _split(args.precision, PRECISIONS, "precision")
        cli_args.apply_threads(args.threads)
        from omni_edge import knobs
        threads = knobs.settings().threads  # --threads, else OMNI_EDGE_THREADS, else None (every CPU)
        export_bundle(args.bundle, stages, precisions, opset=args.opset, threads=threads)
    except ImportError as e:
        raise CliError(f"export needs onnx and onnxruntime (pip install onnx onnxruntime): {e}") from None
    except ValueError as e:
        raise CliError(str(e)) from None
    return 0
