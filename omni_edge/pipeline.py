"""Where the stages meet: open a model folder and hand back a ready model.

    model = pipeline.load("path/to/checkpoint", device="cpu", quant="rtn4", max_context=4096)
    chat = model.session(system="Be brief.", seed=0)
    reply = chat.send("What is the capital of France?", SamplingParams(temperature=0), on_text=print)
    image = model.load_media("image", "photo.jpg")
    reply = chat.send([{"type": "image", "image": image}, {"type": "text", "text": "What is this?"}])

The backbone is built at load; the media stages (vision tower, audio encoder) are built on first use, so a
stage that is never used costs no memory (`describe()` says which stages are resident and which backend,
torch or ONNX, runs each). Media rows reach the backbone through `embed_media`, the one place that turns
prompt spans into backbone input rows.

`load` accepts a Baichuan-Omni-1.5 checkpoint (`model_type "omni"`), a plain HF Llama/Qwen2 checkpoint, or an
edge bundle (a folder with `omni_edge.json`; its safetensors are read the same way). It reads the config, the
tokenizer and its prompt format, checks every backbone tensor against the config, builds the backbone on the
device and allocates the KV cache once. Errors while loading are `ModelLoadError` (a ValueError) with one
line naming the folder and what is wrong.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from omni_edge import _native, backends
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


# Media kind -> the checkpoint stages it needs.
MEDIA_STAGES = {"image": ("visual", "visual_bridge"), "video": ("visual", "visual_bridge"),
                "audio": ("audio_encoder", "audio_bridge", "rvq", "audio_embed")}
# Spoken replies: the audio head over the backbone, and the decode chain from codes to mel (the vocoder, a
# separate file, comes on top: VOCODER_FILES in the model folder, or --vocoder PATH).
SPEECH_STAGES = ("audio_head", "audio_embed", "rvq", "audio_decoder", "flow_prenet", "flow_estimator")
VOCODER_FILES = ("vocoder.safetensors", "hift.pt")


@dataclass
class TextModel:
    """Tokenizer + prompt format + backbone (with its KV cache), as loaded from one folder, and the media
    stages it has, built on first use."""

    path: str
    config: object  # omni_edge.config.ModelConfig
    tokenizer: object  # omni_edge.tokenizer.Tokenizer
    prompt: object  # BaichuanPrompt | TemplatePrompt
    backbone: object  # omni_edge.backbone.Backbone, cache allocated
    device: object  # torch.device
    quant: str
    max_context: int
    checkpoint: object = None  # omni_edge.checkpoint.Checkpoint (memory-mapped), for stages built later
    manifest: Optional[dict] = None  # the bundle manifest, when `path` is an edge bundle
    backends: Dict[str, str] = field(default_factory=lambda: backends.parse(None))  # stage -> auto|torch|onnx
    threads: Optional[int] = None
    vocoder_path: Optional[str] = None  # the HiFT vocoder file (--vocoder, or found in the model folder)
    _stages: Dict[str, object] = field(default_factory=dict, repr=False)
    timings: Dict[str, float] = field(default_factory=dict, repr=False)  # stage parts of the last media call
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
                           vocab_size=self.config.backbone.vocab_size, system=system, seed=seed,
                           embed_media=self.embed_media if self.media_kinds() else None)

    # ---- media -------------------------------------------------------------------------------------

    def media_kinds(self) -> List[str]:
        """The media kinds this model takes (none for a plain HF text model)."""
        if self.kind != "omni" or self.checkpoint is None:
            return []
        have = self._present()
        return [k for k, need in MEDIA_STAGES.items() if all(st in have for st in need)]

    def _present(self) -> set:
        """The omni stages whose tensors are all in the checkpoint (checked once)."""
        have = self._stages.get("_present")
        if have is None:
            needed = {st for need in MEDIA_STAGES.values() for st in need} | set(SPEECH_STAGES)
            have = self._stages["_present"] = {st for st in needed if not self.checkpoint.missing(st)}
        return have

    def check_speech(self) -> None:
        """ValueError saying what is missing when this model cannot speak."""
        if self.kind != "omni" or self.checkpoint is None:
            raise ValueError(f"{self.path} is a plain text model: it has no speech output (spoken replies need a "
                             f"Baichuan-Omni checkpoint or bundle and its HiFT vocoder)")
        lacking = [st for st in SPEECH_STAGES if st not in self._present()]
        if lacking:
            raise ValueError(f"{self.path} cannot speak: its weights lack the {', '.join(lacking)} stage(s)")
        if self.vocoder_path is None:
            raise ValueError(f"{self.path} has no vocoder: spoken replies need the HiFT vocoder (hift.pt from the "
                             f"Baichuan-Omni-1.5 repository, third_party/cosy24k_vocoder); pass --vocoder PATH, or "
                             f"put it in the bundle with `omni-edge quantize --vocoder PATH`")

    def check_media(self, kind: str) -> None:
        if kind in self.media_kinds():
            return
        if self.kind != "omni":
            raise ValueError(f"{self.path} is a plain text model ({self.config.raw.get('model_type', '?')}): it "
                             f"takes no {kind} input; images, video and audio need a Baichuan-Omni checkpoint "
                             f"or bundle")
        raise ValueError(f"{self.path} has no {kind} stage (its weights lack "
                         f"{', '.join(MEDIA_STAGES[kind])}): it cannot take {kind} input")

    def load_media(self, kind: str, path):
        """Read and preprocess one media file into a prepared item for a message part. Raises ValueError
        (naming the file and the limit) for bad input; the model and any session are unaffected."""
        if kind not in MEDIA_STAGES:
            raise ValueError(f"media kind must be one of {', '.join(MEDIA_STAGES)}, got {kind!r}")
        self.check_media(kind)
        if kind == "image":
            from omni_edge.inputs import load_image

            return load_image(path, self.config.visual, max_tokens=self.max_context)
        if kind == "video":
            from omni_edge.inputs import load_video

            return load_video(path, self.config.video, max_tokens=self.max_context)
        from omni_edge.audio_in import load_audio

        return load_audio(path, self.config.audio, max_tokens=self.max_context)

    def stage(self, name: str):
        """A media stage, built on first use: "vision" or "audio_encoder"."""
        got = self._stages.get(name)
        if got is not None:
            return got
        kw = dict(device=self.device, dtype=self.backbone.dtype, backend=self.backends.get(name, "auto"),
                  bundle_dir=self.path if self.manifest is not None else None, manifest=self.manifest,
                  threads=self.threads)
        if name in ("audio_head", "speech", "vocoder"):
            self.check_speech()
        try:
            if name == "vision":
                from omni_edge.vision import VisionStage

                got = VisionStage.from_checkpoint(self.checkpoint, self.config, **kw)
            elif name == "audio_encoder":
                from omni_edge.audio_in import AudioEncoderStage

                got = AudioEncoderStage.from_checkpoint(self.checkpoint, self.config, **kw)
            elif name == "audio_head":
                from omni_edge.audio_head import AudioHead

                got = AudioHead.from_checkpoint(self.checkpoint, self.config, device=self.device,
                                                dtype=self.backbone.dtype)
            elif name == "speech":
                from omni_edge.speech import SpeechDecoder

                kw["backend"] = self.backends["audio_decoder"]
                got = SpeechDecoder.from_checkpoint(self.checkpoint, self.config, **kw)
            elif name == "vocoder":
                from omni_edge.vocoder import Vocoder

                got = Vocoder.from_file(self.vocoder_path, device=self.device).select_backend(
                    self.backends["vocoder"], kw["bundle_dir"], self.manifest, device=self.device,
                    threads=self.threads)
            else:
                raise ValueError(f"unknown stage {name!r}")
        except (OSError, KeyError) as e:
            raise ModelLoadError(f"{self.path}: cannot build the {name} stage: {_one_line(e)}") from None
        self._stages[name] = got
        return got

    def audio_embed_tables(self) -> List[torch.Tensor]:
        """The backbone's 8 audio embedding tables (cb_i + 1, C) (`model.audio_embed_layers.{i}.weight`)."""
        got = self._stages.get("audio_embed")
        if got is None:
            names = self.checkpoint.stage("audio_embed")
            t = self.checkpoint.tensors(names, dtype=self.backbone.dtype, device=self.device)
            got = self._stages["audio_embed"] = [t[n] for n in names]
        return got

    def audio_rows(self, codes: torch.Tensor) -> torch.Tensor:
        """Backbone input rows of audio frames: codes (n, 8) -> sum of the 8 tables' rows (n, C), summed in
        the model dtype (MODEL.md §1.4, §1.10)."""
        from omni_edge.audio_head import check_codes, embed_codes

        head = self._stages.get("audio_head")
        tables = head.embed if head is not None else self.audio_embed_tables()
        check_codes(codes, self.config.audio.codebook_sizes, eos_allowed=False)
        return embed_codes(tables, codes.to(device=self.device, dtype=torch.long))

    def embed_media(self, spans: Sequence) -> List[torch.Tensor]:
        """Backbone input rows for media spans (one tensor (n_tokens, C) per span, in order): images and
        video frames go through the vision stage in one batched call, audio through the audio encoder and
        its RVQ codes, generated speech ("audiogen", already codes) straight to the audio embeddings."""
        out: List[Optional[torch.Tensor]] = [None] * len(spans)
        visual = [i for i, sp in enumerate(spans) if sp.kind in ("image", "video")]
        if visual:
            rows = self.stage("vision").embed([spans[i].item for i in visual])
            for i, r in zip(visual, rows):
                out[i] = r.to(self.backbone.dtype)
        audio = [i for i, sp in enumerate(spans) if sp.kind == "audio"]
        if audio:
            stage = self.stage("audio_encoder")
            codes = stage.codes([spans[i].item for i in audio])
            for i, c in zip(audio, codes):
                out[i] = self.audio_rows(c)
            self.timings.update({f"audio_{k}": v for k, v in getattr(stage, "timings", {}).items()})
        for i, sp in enumerate(spans):
            if sp.kind == "audiogen":
                out[i] = self.audio_rows(sp.item)
        return out

    # ---- report ------------------------------------------------------------------------------------

    def stage_report(self) -> Dict[str, str]:
        """Each media stage of this model: resident with its backend, or not loaded yet."""
        names = {"image": "vision", "video": "vision", "audio": "audio_encoder"}
        wanted = [names[k] for k in self.media_kinds()]
        try:
            self.check_speech()
            wanted += ["audio_head", "speech", "vocoder"]
        except ValueError:
            pass
        report = {}
        for name in dict.fromkeys(wanted):
            st = self._stages.get(name)
            report[name] = st.describe() if st is not None else "not loaded (built on first use)"
        return report

    def speech_outputs(self, on_audio, *, first_codes: int = 10, seed: Optional[int] = None):
        """The audio head and a streaming decoder for `ChatSession.send_spoken`: returns (head, stream);
        `stream.push(codes)` / `stream.end_clause()` turn frames into 24 kHz chunks given to `on_audio`."""
        from omni_edge.speech import SpeechStream

        head = self.stage("audio_head")
        stream = SpeechStream(self.stage("speech"), self.stage("vocoder"), on_audio, first_codes=first_codes,
                              seed=0 if seed is None else int(seed))
        return head, stream

    def describe(self) -> Dict[str, object]:
        """What runs: model shape, device, dtype, quantisation, which kernels serve each op family, and the
        media stages (resident or not, and their backend)."""
        b = self.config.backbone
        stages = self.stage_report()
        return {
            "kind": "Baichuan-Omni" if self.kind == "omni" else f"HF {self.config.raw.get('model_type', '?')}",
            "layers": b.num_hidden_layers, "hidden": b.hidden_size, "heads": b.num_attention_heads,
            "kv_heads": b.num_key_value_heads, "head_dim": b.head_dim, "intermediate": b.intermediate_size,
            "vocab": b.vocab_size, "device": str(self.device), "dtype": str(self.backbone.dtype),
            "quant": self.quant_label, "max_context": self.max_context, "prompt_format": self.prompt.name,
            "inputs": ["text"] + self.media_kinds(), "stages": stages,
            "sampling": self.sampling_defaults.describe() if self.sampling_defaults is not None else None,
            **kernel_report(self.device, uses_q4=self._uses_q4(),
                            uses_rvq="audio_encoder" in stages or "speech" in stages),
        }

    def _uses_q4(self) -> bool:
        return any(lin.quantized for layer in self.backbone.layers for lin in layer.linears.values())


def kernel_report(device, *, uses_q4: bool = True, uses_rvq: bool = False) -> Dict[str, object]:
    """For each kernel family (omni_edge.ops._dispatch.FAMILIES): "native" when omni_edge's own kernel runs on
    `device`, "torch" when its torch reference does, "unused" when this model has no use for it (q4 when every
    linear is dense, rvq without audio stages); plus the CPU instruction-set level the native kernels use."""
    from omni_edge.ops import _dispatch

    unused = {"q4": None if uses_q4 else "unused (dense weights)",
              "rvq": None if uses_rvq else "unused (no audio stages)"}
    kernels = {}
    for fam in _dispatch.FAMILIES:
        why = unused.get(fam)
        kernels[fam] = why or ("native" if _dispatch.native_enabled(fam, device) else "torch")
    isa = _native.lib().build_info()["isa_active"] if _native.available() else "n/a (not built)"
    return {"kernels": kernels, "isa": isa}


def set_threads(n: int) -> None:
    """CPU threads for torch and for the native kernels' pool (1 .. the cores this process may use): the
    OMNI_EDGE_THREADS switch (omni_edge/knobs.py). ValueError naming the limit otherwise."""
    from omni_edge import knobs

    if isinstance(n, bool) or not isinstance(n, int):
        raise ValueError(f"threads must be an integer from 1 to {knobs.cpu_count()} (the cores available), got {n!r}")
    knobs.set("threads", n)  # applies to the pool (once the library is loaded) and to torch
    torch.set_num_threads(n)


def _open_weights(path: Path):
    """Checkpoint (or edge bundle, whose manifest is validated first) with every backbone tensor checked
    against the config."""
    from omni_edge import bundle
    from omni_edge.checkpoint import Checkpoint

    manifest = bundle.validate(path) if bundle.is_bundle(path) else None
    return Checkpoint.open(path), manifest


def load(path, *, device="cpu", dtype=None, quant: str = "none", max_context: Optional[int] = None,
         threads: Optional[int] = None, backend=None, vocoder=None, lm_head: Optional[str] = None) -> TextModel:
    """Open a checkpoint or bundle folder as a model with a KV cache of `max_context` positions (default
    min(4096, max_position_embeddings)). `lm_head`: convert the lm_head at load ("fp16", "bf16", "q8", "q4";
    default: as stored). `backend`: `--backend` values for the dense media stages
    ("auto", "torch", "onnx", "vision=onnx", ...; see omni_edge.backends); stages are built on first use.
    `vocoder`: the HiFT vocoder file for spoken replies (default: vocoder.safetensors or hift.pt in `path`)."""
    from omni_edge.backbone import Backbone

    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"model path {path} does not exist")
    if not path.is_dir():
        raise ModelLoadError(f"model path {path} is not a folder (expected a checkpoint or bundle folder)")
    if quant not in QUANT_MODES:
        raise ModelLoadError(f"quant must be one of {QUANT_MODES}, got {quant!r}")
    try:
        stage_backends = backends.parse(backend)
    except backends.BackendError as e:
        raise ModelLoadError(str(e)) from None
    if threads is not None:
        try:
            set_threads(threads)
        except ValueError as e:
            raise ModelLoadError(str(e)) from None
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ModelLoadError(f"device {device!r}: {_one_line(e)}") from None
    if device.type not in ("cpu", "cuda"):
        raise ModelLoadError(f"device {str(device)!r}: omni-edge runs on cpu or cuda[:N] only")
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
        ckpt, manifest = _open_weights(path)
        kwargs = {"device": device, "quant": quant}
        if dtype is not None:
            kwargs["dtype"] = dtype
        if lm_head is not None:
            kwargs["lm_head"] = lm_head
        backbone = Backbone.from_checkpoint(ckpt, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"{path}: {_one_line(e)}") from None
    backbone.allocate_cache(max_context)
    return TextModel(path=str(path), config=config, tokenizer=tokenizer, prompt=prompt, backbone=backbone,
                     device=device, quant=quant, max_context=max_context, checkpoint=ckpt, manifest=manifest,
                     backends=stage_backends, threads=threads, sampling_defaults=defaults,
                     vocoder_path=_vocoder_file(path, vocoder))


def _vocoder_file(path: Path, given) -> Optional[str]:
    if given is not None:
        if not Path(given).is_file():
            raise ModelLoadError(f"--vocoder {given}: no such file")
        return str(given)
    for name in VOCODER_FILES:
        if (path / name).is_file():
            return str(path / name)
    return None
