"""What the stage exporters share: the export context, graph checks, parity figures, atomic writes into a bundle.

A stage exporter (`export/<stage>.py`) turns its torch module into ONNX with `torch.onnx.export`, then calls
`finish_graph(ctx, ...)`, which

1. re-saves the graph with its weights in one external data file when it is large (protobuf's 2 GB limit),
2. checks it: `onnx.checker` (full), strict shape inference, only ops TensorRT's ONNX parser takes, no op whose
   output shape depends on tensor values (so every shape follows from the input shapes),
3. measures parity against the torch module in onnxruntime (CPU provider) over the exporter's cases,
4. moves the files into the bundle folder (written in the folder under a temporary name, then renamed), and
   returns a `GraphFile` that `write_manifest` lists under the manifest's "graphs" (`omni_edge.backends`).

The manifest itself is rewritten atomically (temporary file in the folder, fsync, rename).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Sequence

DEFAULT_OPSET = 17
# Graphs bigger than this keep their weights in an external data file (`<name>.onnx.data`).
EXTERNAL_DATA_ABOVE = 256 << 20

# Ops whose output shapes depend on tensor values, control flow, sequences: not TensorRT-ready.
DATA_DEPENDENT_OPS = {"NonZero", "Unique", "Compress", "NonMaxSuppression", "Loop", "Scan", "If",
                      "SequenceConstruct", "SequenceAt", "SequenceInsert", "SequenceErase", "SequenceLength",
                      "SequenceEmpty", "ConcatFromSequence", "SplitToSequence", "Optional", "OptionalGetElement",
                      "OptionalHasElement", "StringNormalizer", "TfIdfVectorizer", "RandomNormal", "RandomUniform",
                      "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"}
# The standard-domain ops the exporters here may emit; all are supported by TensorRT's ONNX parser (opset 17).
TRT_OPS = {"Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "Reciprocal", "Neg", "Abs", "Exp", "Log", "Erf", "Tanh",
           "Sigmoid", "Relu", "LeakyRelu", "Elu", "Softplus", "Sin", "Cos", "Min", "Max", "Where", "Equal", "Less",
           "Greater", "LessOrEqual", "GreaterOrEqual", "Not", "And", "Or", "MatMul", "Gemm", "Conv", "ConvTranspose",
           "Softmax", "LayerNormalization", "ReduceMean", "ReduceSum", "ReduceMax", "Cast", "Reshape", "Transpose",
           "Unsqueeze", "Squeeze", "Concat", "Split", "Slice", "Gather", "Shape", "Constant", "ConstantOfShape",
           "Expand", "Identity", "Flatten", "Tile", "Range", "Clip", "Pad", "CumSum", "GroupNormalization",
           "InstanceNormalization", "Floor", "Ceil", "Round", "Mod", "Sign", "Einsum", "ScatterND", "GatherElements"}


class ExportError(ValueError):
    """An export that cannot be done or failed its checks; one line naming the stage and the problem."""


@dataclass
class GraphFile:
    """One written graph, as its manifest entry lists it."""
    stage: str  # backends stage name ("vision", ...)
    precision: str  # "float32" | "float16"
    file: str  # relative to the bundle folder
    data: List[str]  # external data files, relative
    inputs: List[str]
    outputs: List[str]
    opset: int
    parity: dict  # {"max_abs", "max_rel", "tolerance", "reference", "cases": [...]}
    extra: dict = field(default_factory=dict)

    def entry(self) -> dict:
        d = {"file": self.file, "data": list(self.data), "inputs": list(self.inputs), "outputs": list(self.outputs),
             "opset": self.opset, "precision": self.precision, "parity": self.parity}
        d.update(self.extra)
        return d


@dataclass
class ExportContext:
    bundle_dir: Path
    manifest: Optional[dict]  # the bundle's manifest (None: a plain checkpoint folder)
    ckpt: object  # omni_edge.checkpoint.Checkpoint over the bundle folder
    config: object  # ModelConfig
    precisions: Sequence[str] = ("float32", "float16")
    opset: int = DEFAULT_OPSET
    threads: Optional[int] = None
    external_data_above: int = EXTERNAL_DATA_ABOVE
    log: Callable[[str], None] = print


# ------------------------------------------------------------------------------------------------
# Checks
# ------------------------------------------------------------------------------------------------

def check_graph(path) -> None:
    """onnx.checker (full), strict shape inference, TensorRT-parsable standard ops, no data-dependent shapes."""
    import onnx

    path = str(path)
    try:
        onnx.checker.check_model(path, full_check=True)
    except Exception as e:
        raise ExportError(f"{Path(path).name}: onnx.checker rejects the graph: {' '.join(str(e).split())[:300]}") \
            from None
    model = onnx.load(path, load_external_data=False)
    try:
        inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    except Exception as e:
        raise ExportError(f"{Path(path).name}: strict shape inference fails: {' '.join(str(e).split())[:300]}") \
            from None
    bad = sorted({n.op_type for n in inferred.graph.node if n.domain not in ("", "ai.onnx")}
                 | {n.op_type for n in inferred.graph.node if n.op_type in DATA_DEPENDENT_OPS}
                 | {n.op_type for n in inferred.graph.node if n.domain in ("", "ai.onnx") and n.op_type not in TRT_OPS})
    if bad:
        raise ExportError(f"{Path(path).name}: ops that are not TensorRT-ready or have data-dependent shapes: "
                          f"{', '.join(bad)}")
    for out in inferred.graph.output:
        dims = out.type.tensor_type.shape.dim
        if not dims and out.type.tensor_type.elem_type == 0:
            raise ExportError(f"{Path(path).name}: output {out.name} has no inferred type")


def graph_io(path):
    """([(name, elem_type, [dims])] inputs, outputs) read from the graph file."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)

    def dims(v):
        return [d.dim_param if d.dim_param else d.dim_value for d in v.type.tensor_type.shape.dim]

    return ([(i.name, i.type.tensor_type.elem_type, dims(i)) for i in model.graph.input],
            [(o.name, o.type.tensor_type.elem_type, dims(o)) for o in model.graph.output])


def parity(got, want) -> dict:
    """max |got - want| and the same relative to max |want| (fp32 arithmetic)."""
    got, want = got.float(), want.float()
    err = (got - want).abs().max().item() if got.numel() else 0.0
    ref = want.abs().max().item() if want.numel() else 0.0
    return {"max_abs": err, "max_rel": err / max(ref, 1e-12)}


# ------------------------------------------------------------------------------------------------
# Files
# ------------------------------------------------------------------------------------------------

def externalize(src: Path, dst: Path, data_name: str, above: int) -> List[str]:
    """Re-save graph `src` as `dst` (same folder as its future data file); weights in `data_name` when the graph
    is bigger than `above` bytes. Returns the data file names written beside `dst`."""
    import onnx

    total = sum(f.stat().st_size for f in src.parent.iterdir() if f.is_file())
    model = onnx.load(str(src), load_external_data=True)
    if total > above:
        onnx.save_model(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_name, size_threshold=1024)
        return [data_name]
    onnx.save_model(model, str(dst))
    return []


def scratch_dir(bundle_dir: Path, stage: str) -> Path:
    """A temporary folder inside the bundle (same file system, so the final renames are atomic)."""
    return Path(tempfile.mkdtemp(prefix=f".export-{stage}-", dir=str(bundle_dir)))


def _fsync(path: Path) -> None:
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def install_files(scratch: Path, bundle_dir: Path, names: Sequence[str]) -> None:
    """Move `names` from the scratch folder into the bundle: data files first, the graph last, each by rename."""
    for name in names:
        _fsync(scratch / name)
    for name in names:
        os.replace(scratch / name, bundle_dir / name)


def write_manifest(bundle_dir: Path, graphs: Sequence[GraphFile]) -> dict:
    """Add `graphs` to the bundle's manifest ("graphs" and "files"), rewritten atomically. Returns the manifest."""
    from omni_edge import bundle

    mpath = bundle_dir / bundle.MANIFEST
    manifest = bundle.read_manifest(bundle_dir)
    table = manifest.setdefault("graphs", {})
    for g in graphs:
        table.setdefault(g.stage, {})[g.precision] = g.entry()
        for rel in [g.file] + list(g.data):
            manifest["files"][rel] = {"bytes": (bundle_dir / rel).stat().st_size, "sha256": bundle.sha256_of(
                bundle_dir / rel)}
    fd, tmp = tempfile.mkstemp(prefix=".omni_edge.json.", dir=str(bundle_dir))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2, ensure_ascii=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, mpath)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return manifest


def remove_scratch(scratch: Path) -> None:
    shutil.rmtree(scratch, ignore_errors=True)
