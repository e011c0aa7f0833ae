"""Where the stages meet: open a model folder and hand back a ready text model.

    model = pipeline.load("path/to/checkpoint", device="cpu", quant="rtn4", max_context=4096)
    chat = model.session(system="Be brief.", seed=0)
    reply = chat.send("What is the capital of France?", SamplingParams(temperature=0), on_text=print)

`load` accepts a Baichuan-Omni-1.5 checkpoint (`model_type "omni"`), a plain HF Llama/Qwen2 checkpoint, or an
edge bundle (a folder with `omni_edge.json`; its safetensors are read the same way). It reads the config, the
tokenizer and its prompt format, checks every backbone tensor against the config, builds the backbone on the
device and allocates the KV cache once. Errors while loading are `ModelLoadError` (a ValueError) with one
line naming the folder and what is wrong.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import torch

from omni_edge import _native
from omni_edge.sampling_defaults import from_checkpoint as sampling_defaults_of
from omni_edge.config import load_config
from omni_edge.generate import ChatSession
from omni_edge.tokenizer import Tokenizer, prompt_format

DEFAULT_MAX_CONTEXT = 4096  # KV cache positions when the caller does not say (capped by the model's limit)
QUANT_MODES = ("none", "rtn4")


class ModelLoadError(ValueError):
    """The model folder cannot be used: missing, malformed, or inconsistent with its config."""


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text or type(e).__name__


@dataclass
class TextModel:
    """Tokenizer + prompt format + backbone (with its KV cache), as loaded from one folder."""

    path: str
    config: object  # omni_edge.config.ModelConfig
    tokenizer: object  # omni_edge.tokenizer.Tokenizer
    prompt: object  # BaichuanPrompt | TemplatePrompt
    backbone: object  # omni_edge.backbone.Backbone, cache allocated
    device: object  # torch.device
    quant: str
    max_context: int
    sampling_defaults: object = None  # omni_edge.sampling_defaults.SamplingDefaults (generation_config.json)

    @property
    def kind(self) -> str:
        return self.config.kind

    @property
    def quant_label(self) -> str:
        """How the backbone's linears are held: rtn4 (rounded at load), the checkpoint's own 4-bit format
        (a bundle or GPTQ checkpoint), or dense."""
        if self.quant == "rtn4":
            from omni_edge.backbone import rtn_grid_of

            return f"rtn4 ({rtn_grid_of(self.backbone.layers)})"
        if self.quant != "none":
            return self.quant
        q = self.config.quantization
        if q:
            return f"{q.get('quant_method', 'gptq')} {q.get('bits', 4)}-bit (stored)"
        return "none"

    def session(self, *, system: Optional[str] = None, seed: Optional[int] = None):
        """A new conversation (it takes over the KV cache from any earlier session)."""
        return ChatSession(self.backbone, self.tokenizer, self.prompt, device=self.device,
                             vocab_size=self.config.backbone.vocab_size, system=system, seed=seed)

    def describe(self) -> Dict[str, object]:
        """What runs: model shape, device, dtype, quantisation, and which kernels serve each op family."""
        b = self.config.backbone
        return {
            "kind": "Baichuan-Omni" if self.kind == "omni" else f"HF {self.config.raw.get('model_type', '?')}",
            "layers": b.num_hidden_layers, "hidden": b.hidden_size, "heads": b.num_attention_heads,
            "kv_heads": b.num_key_value_heads, "head_dim": b.head_dim, "intermediate": b.intermediate_size,
            "vocab": b.vocab_size, "device": str(self.device), "dtype": str(getattr(self.backbone, "dtype", "?")),
            "quant": self.quant_label, "max_context": self.max_context, "prompt_format": self.prompt.name,
            "sampling": self.sampling_defaults.describe() if self.sampling_defaults is not None else None,
            **kernel_report(self.device, uses_q4=self._uses_q4()),
        }

    def _uses_q4(self) -> bool:
        return any(getattr(lin, "quantized", False) for layer in getattr(self.backbone, "layers", ())
                   for lin in getattr(layer, "linears", {}).values())


def kernel_report(device, *, uses_q4: bool = True) -> Dict[str, object]:
    """For each kernel family the backbone uses: "native" when omni_edge's own kernel runs on `device`,
    "torch" when its torch reference does ("unused" for q4 when every linear is dense); plus the CPU
    instruction-set level the native kernels use."""
    from omni_edge.ops import _dispatch

    kernels = {}
    for fam in ("q4", "attention"):
        if fam == "q4" and not uses_q4:
            kernels[fam] = "unused (dense weights)"
            continue
        module = importlib.import_module(f"omni_edge.ops.{fam}")
        # a family is native-capable once its module defines self_check (the contract of omni_edge.ops)
        native = hasattr(module, "self_check") and _dispatch.native_enabled(fam, device)
        kernels[fam] = "native" if native else "torch"
    isa = _native.lib().build_info()["isa_active"] if _native.available() else "n/a (not built)"
    return {"kernels": kernels, "isa": isa}


def set_threads(n: int) -> None:
    """CPU threads for torch and for the native kernels."""
    if n < 1:
        raise ValueError(f"threads must be >= 1, got {n}")
    torch.set_num_threads(n)
    if _native.available():
        _native.lib().set_num_threads(n)


def _open_weights(path: Path):
    """Checkpoint (or edge bundle, whose manifest is validated first) with every backbone tensor checked
    against the config."""
    from omni_edge import bundle
    from omni_edge.checkpoint import Checkpoint

    if bundle.is_bundle(path):
        bundle.validate(path)
    return Checkpoint.open(path)


def load(path, *, device="cpu", dtype=None, quant: str = "none", max_context: Optional[int] = None,
         threads: Optional[int] = None) -> TextModel:
    """Open a checkpoint or bundle folder as a text model with a KV cache of `max_context` positions
    (default min(4096, max_position_embeddings))."""
    from omni_edge.backbone import Backbone

    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"model path {path} does not exist")
    if not path.is_dir():
        raise ModelLoadError(f"model path {path} is not a folder (expected a checkpoint or bundle folder)")
    if quant not in QUANT_MODES:
        raise ModelLoadError(f"quant must be one of {QUANT_MODES}, got {quant!r}")
    if threads is not None:
        set_threads(threads)
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ModelLoadError(f"device {device!r}: {_one_line(e)}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("device cuda was asked for, but torch sees no CUDA GPU on this machine")
    if isinstance(dtype, str):
        if dtype not in ("float32", "float16", "bfloat16"):
            raise ModelLoadError(f"dtype must be float32, float16 or bfloat16, got {dtype!r}")
        dtype = getattr(torch, dtype)

    try:
        config = load_config(path)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{path}: {_one_line(e)}") from None
    try:
        defaults = sampling_defaults_of(path, config.kind)
        tokenizer = Tokenizer.from_dir(path)
        prompt = prompt_format(tokenizer, config.kind, eos_ids=defaults.eos_ids)
    except (OSError, ValueError) as e:
        raise ModelLoadError(_one_line(e)) from None

    limit = int(config.backbone.max_position_embeddings)
    if max_context is None:
        max_context = min(DEFAULT_MAX_CONTEXT, limit)
    if not isinstance(max_context, int) or max_context < 2:
        raise ModelLoadError(f"max_context must be an integer >= 2, got {max_context!r}")
    if max_context > limit:
        raise ModelLoadError(f"max_context {max_context} exceeds the model's max_position_embeddings ({limit})")

    try:
        ckpt = _open_weights(path)
        kwargs = {"device": device, "quant": quant}
        if dtype is not None:
            kwargs["dtype"] = dtype
        backbone = Backbone.from_checkpoint(ckpt, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"{path}: {_one_line(e)}") from None
    backbone.allocate_cache(max_context)
    return TextModel(path=str(path), config=config, tokenizer=tokenizer, prompt=prompt, backbone=backbone,
                     device=device, quant=quant, max_context=max_context, sampling_defaults=defaults)
