"""Which backend runs each dense stage: the torch module, or its ONNX graph in onnxruntime.

The dense stages (ARCHITECTURE.md "Backends for the dense stages") are the vision tower, the audio encoder,
the audio decoder + prenet, the CFM estimator and the vocoder's trunk. Each has a torch module (always there,
the reference) and, once `omni-edge export` has written it into a bundle, an ONNX graph listed in the
manifest's "graphs" table. This module is the one place where the choice is made:

    choices = backends.parse(["auto"])                 # or ["torch"], ["vision=onnx", "auto"], ...
    pick = backends.resolve("vision", choices["vision"], bundle_dir, manifest, device, dtype)
    pick.kind       # "torch" | "onnx"
    pick.reason     # why, for `describe()` and `omni-edge info`
    graph = pick.open(threads=2)                       # an OnnxGraph when kind == "onnx"

"auto" takes the ONNX graph when the bundle has one for the stage at the wanted precision and onnxruntime
imports; "onnx" insists (a clear error otherwise); "torch" never opens a graph. onnxruntime is imported only
when a graph is opened, so `import omni_edge.backends` stays cheap.

Manifest "graphs" table (written by `omni_edge.export`):

    "graphs": {"vision": {"float32": {"file": "vision.onnx", "data": ["vision.onnx.data"],
                                      "inputs": [...], "outputs": [...], "opset": 17,
                                      "parity": {"max_abs": ..., "max_rel": ..., "cases": [...]}},
                          "float16": {...}}, ...}
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Union

# Stage names as `--backend STAGE=KIND` spells them, in pipeline order.
STAGES = ("vision", "audio_encoder", "audio_decoder", "flow_estimator", "vocoder")
KINDS = ("auto", "torch", "onnx")
PRECISIONS = ("float32", "float16")


class BackendError(ValueError):
    """A backend request that cannot be met (unknown stage or kind, graph missing, onnxruntime missing)."""


def parse(specs: Union[None, str, Sequence[str]]) -> Dict[str, str]:
    """`--backend` values -> {stage: kind} for every stage.

    Each value is a kind for every stage ("auto", "torch", "onnx") or "STAGE=KIND" for one; later values win,
    so ["torch", "vision=onnx"] runs everything in torch but the vision tower. Commas separate several
    values in one string ("torch,vision=onnx")."""
    if specs is None:
        specs = ["auto"]
    elif isinstance(specs, str):
        specs = [specs]
    out = {s: "auto" for s in STAGES}
    for spec in specs:
        for item in str(spec).split(","):
            item = item.strip()
            if not item:
                continue
            stage, eq, kind = item.partition("=")
            if not eq:
                stage, kind = "", item
            stage, kind = stage.strip(), kind.strip()
            if kind not in KINDS:
                raise BackendError(f"--backend {item!r}: the backend must be one of {', '.join(KINDS)}")
            if stage and stage not in STAGES:
                raise BackendError(f"--backend {item!r}: unknown stage {stage!r} (stages: {', '.join(STAGES)})")
            for s in ([stage] if stage else STAGES):
                out[s] = kind
    return out


def onnxruntime_status() -> Optional[str]:
    """None when onnxruntime imports, else why not (one line)."""
    try:
        import onnxruntime  # noqa: F401
    except Exception as e:  # ImportError, or a broken install (e.g. onnxruntime and onnxruntime-gpu mixed)
        return f"onnxruntime does not import ({type(e).__name__}: {' '.join(str(e).split())[:120]})"
    return None


def precision_for(dtype, device="cpu") -> str:
    """The graph precision that matches a stage's torch dtype: fp16 stages take the fp16 graph; bf16 stages
    take it on GPUs and the fp32 graph on CPUs (onnxruntime's CPU provider has few fp16 kernels)."""
    name = str(dtype).replace("torch.", "")
    if name == "float16" or (name == "bfloat16" and str(device).startswith("cuda")):
        return "float16"
    return "float32"


def graph_entry(manifest: Optional[Mapping], stage: str, precision: str) -> Optional[dict]:
    if not manifest:
        return None
    entry = (manifest.get("graphs") or {}).get(stage) or {}
    got = entry.get(precision)
    return got if isinstance(got, dict) and isinstance(got.get("file"), str) else None


@dataclass
class Pick:
    stage: str
    kind: str  # "torch" | "onnx"
    reason: str
    precision: Optional[str] = None  # of the graph, when kind == "onnx"
    path: Optional[str] = None  # the .onnx file, when kind == "onnx"
    device: str = "cpu"

    def open(self, *, threads: Optional[int] = None) -> "OnnxGraph":
        if self.kind != "onnx":
            raise BackendError(f"{self.stage}: runs on torch ({self.reason}); there is no graph to open")
        return OnnxGraph(self.path, device=self.device, threads=threads)

    def describe(self) -> str:
        return f"{self.kind} ({self.reason})"


def resolve(stage: str, kind: str, bundle_dir, manifest: Optional[Mapping], device="cpu",
            dtype="float32") -> Pick:
    """Decide how `stage` runs. `manifest` is the bundle's (None for a plain checkpoint folder)."""
    if stage not in STAGES:
        raise BackendError(f"unknown stage {stage!r} (stages: {', '.join(STAGES)})")
    if kind not in KINDS:
        raise BackendError(f"{stage}: backend must be one of {', '.join(KINDS)}, got {kind!r}")
    dev = str(device)
    if kind == "torch":
        return Pick(stage, "torch", "asked for", device=dev)
    precision = precision_for(dtype, dev)
    entry = graph_entry(manifest, stage, precision)
    missing = None
    if entry is None:
        where = "this folder is not a bundle" if manifest is None else "the bundle has no such graph"
        missing = (f"no {precision} ONNX graph for {stage} ({where}; write one with "
                   f"`omni-edge export BUNDLE --stages {export_stage_of(stage)}`)")
    else:
        path = Path(bundle_dir) / entry["file"]
        if not path.is_file():
            missing = f"the manifest lists {entry['file']} for {stage}, but the file is missing"
    if missing is None:
        missing = onnxruntime_status()
    if missing is not None:
        if kind == "onnx":
            raise BackendError(f"--backend {stage}=onnx: {missing}")
        return Pick(stage, "torch", f"auto: {missing}", device=dev)
    return Pick(stage, "onnx", f"{kind}: {entry['file']} ({precision})", precision=precision,
                path=str(Path(bundle_dir) / entry["file"]), device=dev)


# Which `omni-edge export --stages` name writes each backend stage's graph.
EXPORT_STAGE = {"vision": "vision", "audio_encoder": "audio_encoder", "audio_decoder": "speech",
                "flow_estimator": "speech", "vocoder": "speech"}


def export_stage_of(stage: str) -> str:
    return EXPORT_STAGE.get(stage, stage)


def providers_for(device: str) -> List[str]:
    """onnxruntime execution providers for a torch device string: CUDA first when it is a cuda device and
    onnxruntime-gpu offers it, then CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    chosen = []
    if str(device).startswith("cuda") and "CUDAExecutionProvider" in available:
        chosen.append("CUDAExecutionProvider")
    chosen.append("CPUExecutionProvider")
    return chosen


class OnnxGraph:
    """One ONNX graph in an onnxruntime session. `run(**feeds)` takes torch tensors (or numpy arrays) by
    input name and returns torch tensors in output order, on the caller's device."""

    def __init__(self, path, *, device="cpu", threads: Optional[int] = None):
        import onnxruntime as ort

        self.path = str(path)
        self.device = str(device)
        opts = ort.SessionOptions()
        if threads is not None:
            opts.intra_op_num_threads = int(threads)
            opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self.session = ort.InferenceSession(self.path, sess_options=opts, providers=providers_for(self.device))
        except Exception as e:  # onnxruntime raises its own exception types
            raise BackendError(f"{self.path}: onnxruntime cannot load the graph: {' '.join(str(e).split())[:300]}") \
                from None
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.providers = self.session.get_providers()

    def run(self, **feeds) -> List["object"]:
        import numpy as np
        import torch

        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise BackendError(f"{Path(self.path).name}: missing input(s) {', '.join(missing)}")
        arrays = {}
        for name in self.input_names:
            x = feeds[name]
            if isinstance(x, torch.Tensor):
                x = x.detach().cpu().contiguous().numpy()
            arrays[name] = np.ascontiguousarray(x)
        outs = self.session.run(self.output_names, arrays)
        dev = torch.device(self.device)
        return [torch.from_numpy(o).to(dev) for o in outs]
