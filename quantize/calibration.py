"""Calibration and held-out text for quantization.

- Built-in sets (files beside this module, JSON lines like `--calib`): `data/calibration.jsonl`, bilingual
  English/Chinese requests and passages, and `data/heldout.jsonl`, different passages used only to measure
  perplexity. The two never share a text (a test checks it).
- `read_jsonl(path)`: a user's `--calib FILE`, one JSON object {"text": "..."} per line; blank lines are
  skipped, anything else wrong is a ValueError naming the file and the line.
- `build_calibration(...)`: texts -> token-id samples. Each text is wrapped as ONE user turn in the source's
  own prompt format (Baichuan `<B_SYS><C_Q>TEXT<C_A>`, or the HF chat template with the generation prompt),
  so the layers see the activations they see in chat; each sample is truncated to `seqlen` tokens. The
  choice and order of texts is a seeded shuffle, so a seed gives the same samples every time.
- Held-out perplexity uses the raw text (no template), the usual language-modelling perplexity.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Callable, List, Optional, Sequence

from omni_edge.safetensors_file import sha256_file

BUILTIN_CALIBRATION = "calibration.jsonl"
BUILTIN_HELDOUT = "heldout.jsonl"
DEFAULT_NSAMPLES = 128  # texts used when the caller does not say (all of the built-in set)


def _parse_jsonl(lines: Sequence[str], where: str) -> List[str]:
    texts = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise ValueError(f"{where} line {n}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{where} line {n}: expected a JSON object like {{\"text\": \"...\"}}, "
                             f"got {type(obj).__name__}")
        if "text" not in obj:
            raise ValueError(f"{where} line {n}: missing the \"text\" field (keys: {sorted(obj)})")
        text = obj["text"]
        if not isinstance(text, str):
            raise ValueError(f"{where} line {n}: \"text\" must be a string, got {type(text).__name__}")
        if not text.strip():
            raise ValueError(f"{where} line {n}: \"text\" is empty")
        texts.append(text)
    if not texts:
        raise ValueError(f"{where}: no texts (expected one JSON object {{\"text\": \"...\"}} per line)")
    return texts


def read_jsonl(path) -> List[str]:
    """Texts of a JSON-lines file, each line {"text": "..."}; clear errors naming the line."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ValueError(f"calibration file {path}: cannot read it ({e.strerror or e})") from None
    try:
        content = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ValueError(f"{path} line {line}: not valid UTF-8") from None
    return _parse_jsonl(content.splitlines(), str(path))


def _builtin(name: str) -> List[str]:
    content = resources.files(__package__).joinpath("data", name).read_text(encoding="utf-8")
    return _parse_jsonl(content.splitlines(), f"built-in {name}")


def builtin_calibration_texts() -> List[str]:
    return _builtin(BUILTIN_CALIBRATION)


def builtin_heldout_texts() -> List[str]:
    return _builtin(BUILTIN_HELDOUT)


file_sha256 = sha256_file  # the project's one file-hash helper


@dataclass
class CalibrationSet:
    """Token-id samples plus a description of where they came from (recorded in the manifest)."""

    samples: List[List[int]]  # one list of token ids per sample, each at most seqlen long
    source: str  # "built-in" or the file name
    source_sha256: str
    texts_available: int
    seqlen: int
    seed: int
    prompt_format: str  # "baichuan" or "chat_template"
    notes: List[str] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return sum(len(s) for s in self.samples)

    def describe(self) -> dict:
        return {"source": self.source, "sha256": self.source_sha256, "texts_available": self.texts_available,
                "nsamples": len(self.samples), "seqlen": self.seqlen, "tokens": self.tokens, "seed": self.seed,
                "wrapped_as": f"one user turn per text ({self.prompt_format})", "notes": list(self.notes)}


def select_texts(texts: Sequence[str], nsamples: int, seed: int) -> List[str]:
    """A seeded shuffle of the texts, the first `nsamples` of them (all when there are fewer)."""
    if nsamples <= 0:
        raise ValueError(f"nsamples: expected a positive number, got {nsamples}")
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    return [texts[i] for i in order[:nsamples]]


def build_calibration(render_user_turn: Callable[[str], List[int]], *, calib_file: Optional[str] = None,
                      nsamples: Optional[int] = None, seqlen: int = 512, seed: int = 0,
                      prompt_format: str = "") -> CalibrationSet:
    """Calibration samples: texts (built-in or `calib_file`) -> seeded choice -> one user turn each -> ids.
    nsamples None: up to DEFAULT_NSAMPLES texts, silently; a number the set cannot supply adds a note."""
    if seqlen < 2:
        raise ValueError(f"seqlen: expected at least 2 tokens, got {seqlen}")
    if calib_file is None:
        texts = builtin_calibration_texts()
        source = "built-in"
        digest = hashlib.sha256("\n".join(texts).encode("utf-8")).hexdigest()
    else:
        texts = read_jsonl(calib_file)
        source = Path(calib_file).name
        digest = file_sha256(calib_file)
    asked = nsamples is not None
    if nsamples is None:
        nsamples = DEFAULT_NSAMPLES
    chosen = select_texts(texts, nsamples, seed)
    samples = []
    for text in chosen:
        ids = list(render_user_turn(text))[:seqlen]
        if len(ids) >= 2:
            samples.append(ids)
    notes = []
    if asked and len(chosen) < nsamples:
        notes.append(f"asked for {nsamples} samples but the {source} set has {len(texts)} texts; using all of them")
    return CalibrationSet(samples=samples, source=source, source_sha256=digest, texts_available=len(texts),
                          seqlen=seqlen, seed=seed, prompt_format=prompt_format, notes=notes)


def heldout_samples(encode: Callable[[str], List[int]], *, max_tokens: int = 512) -> List[List[int]]:
    """Held-out texts as plain token ids (no template), each truncated to max_tokens, for perplexity."""
    out = []
    for text in builtin_heldout_texts():
        ids = list(encode(text))[:max_tokens]
        if len(ids) >= 2:
            out.append(ids)
    return out
