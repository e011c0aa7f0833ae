"""Sampling defaults taken from the checkpoint, with where each value came from.

The rule is Hugging Face `generate`'s, so that `omni-edge chat` with no sampling flags answers what
`model.generate(ids)` answers for the same folder:

- `generation_config.json` gives `do_sample`, `temperature`, `top_k`, `top_p`, `repetition_penalty`,
  `max_new_tokens` and `eos_token_id` when it has them. A key it lacks takes transformers' own default
  (`GenerationConfig()`): do_sample false, temperature 1.0, top_k 50, top_p 1.0, repetition_penalty 1.0 (no
  penalty unless asked). `do_sample` false means greedy whatever the temperature says (our temperature 0).
- Without the file, transformers builds the config from `config.json` (`GenerationConfig.from_model_config`):
  the same defaults, with `eos_token_id` read from config.json.
- `max_new_tokens`: transformers' fallback is `max_length` 20 counting the prompt, useless for a chat, so a
  missing `max_new_tokens` becomes 1024 (the reference demo's text-only limit, MODEL.md §4) and says so.
- Baichuan-Omni checkpoints (`model_type "omni"`) ship a generation config without sampling keys; for each
  key it lacks they take the reference demo's text settings (MODEL.md §2.3): sampling at T 0.8, top-k 20,
  top-p 0.85, repetition penalty 1.1.

`resolve(...)` lays command-line values over the defaults. `--temperature 0` alone is plain argmax: unless the
user also passes `--repetition-penalty`, the penalty is off.

Bad types in the file raise `GenerationConfigError` (a ValueError) naming the file and the key.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional, Tuple

GENERATION_CONFIG = "generation_config.json"
SAMPLING_KEYS = ("max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty")

# transformers' GenerationConfig() defaults for the keys we use (transformers 4.4x and 5.x agree)
HF_DEFAULTS = {"do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0, "repetition_penalty": 1.0}
# The Baichuan-Omni reference demo's text step (MODEL.md §2.3) and text-only length limit (MODEL.md §4)
OMNI_DEMO = {"do_sample": True, "temperature": 0.8, "top_k": 20, "top_p": 0.85, "repetition_penalty": 1.1}
DEFAULT_MAX_NEW_TOKENS = 1024

SRC_FILE = GENERATION_CONFIG
SRC_HF = "transformers default"
SRC_OMNI = "Baichuan-Omni demo text settings"
SRC_CLI = "command line"


class GenerationConfigError(ValueError):
    """generation_config.json cannot be read or holds a value of the wrong type."""


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


# key -> (check, what was expected); null is accepted for every key and means "absent", as in transformers
_CHECKS = {
    "do_sample": (lambda v: isinstance(v, bool), "true or false"),
    "temperature": (lambda v: _is_num(v) and v >= 0, "a number >= 0"),
    "top_k": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "top_p": (lambda v: _is_num(v) and 0 < v <= 1, "a number in (0, 1]"),
    "repetition_penalty": (lambda v: _is_num(v) and v > 0, "a number > 0"),
    "max_new_tokens": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "eos_token_id": (lambda v: (_is_int(v) and v >= 0)
                     or (isinstance(v, list) and all(_is_int(i) and i >= 0 for i in v)),
                     "a token id or a list of token ids"),
}


def read_generation_config(path) -> Dict[str, object]:
    """The keys of `path/generation_config.json` that matter here, type-checked; {} when there is no file.
    Keys set to null are left out (transformers treats them as unset)."""
    f = Path(path) / GENERATION_CONFIG
    if not f.is_file():
        return {}
    try:
        data = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise GenerationConfigError(f"{f}: cannot read it: {' '.join(str(e).split())}") from None
    if not isinstance(data, dict):
        raise GenerationConfigError(f"{f}: expected a JSON object, got {type(data).__name__}")
    out = {}
    for key, (ok, expected) in _CHECKS.items():
        v = data.get(key)
        if v is None:
            continue
        if not ok(v):
            raise GenerationConfigError(f"{f}: {key} must be {expected}, got {v!r}")
        out[key] = v
    return out


def _config_eos_ids(path: Path) -> List[int]:
    f = path / "config.json"
    try:
        data = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return []  # config.json problems are reported by omni_edge.config with more context
    eos = data.get("eos_token_id") if isinstance(data, dict) else None
    if _is_int(eos):
        return [eos]
    if isinstance(eos, list):
        return [i for i in eos if _is_int(i)]
    return []


def generation_eos_ids(path) -> List[int]:
    """eos ids as transformers' generate sees them: generation_config.json's eos_token_id (an id or a list),
    or config.json's when there is no generation_config.json."""
    path = Path(path)
    if (path / GENERATION_CONFIG).is_file():
        eos = read_generation_config(path).get("eos_token_id")
        if eos is None:
            return []
        return [eos] if isinstance(eos, int) else list(eos)
    return _config_eos_ids(path)


@dataclass(frozen=True)
class SamplingDefaults:
    """Defaults in force for one model (or after command-line overrides), with a source per value.

    `values` holds SamplingParams fields (max_new_tokens, temperature, top_k, top_p, repetition_penalty;
    temperature 0 = greedy); `sources` names where each came from."""

    values: Dict[str, object]
    sources: Dict[str, str]
    eos_ids: Tuple[int, ...] = ()
    eos_source: str = ""

    def params(self, **extra):
        """A validated SamplingParams (extra fields such as stop_strings pass through)."""
        from omni_edge.generate import SamplingParams

        return SamplingParams(**self.values, **extra).validate()

    def resolve(self, *, max_new_tokens: Optional[int] = None, temperature: Optional[float] = None,
                top_k: Optional[int] = None, top_p: Optional[float] = None,
                repetition_penalty: Optional[float] = None) -> "SamplingDefaults":
        """These defaults with the values the user gave (None = not given) laid over them. An explicit
        temperature 0 without an explicit repetition penalty is plain argmax (penalty off)."""
        given = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_k": top_k, "top_p": top_p,
                 "repetition_penalty": repetition_penalty}
        values, sources = dict(self.values), dict(self.sources)
        for k, v in given.items():
            if v is not None:
                values[k], sources[k] = v, SRC_CLI
        if temperature == 0 and repetition_penalty is None:
            values["repetition_penalty"] = 1.0
            sources["repetition_penalty"] = "off: --temperature 0 is plain argmax"
        return replace(self, values=values, sources=sources)

    def summary(self) -> str:
        """One line: each value with its source, e.g. for chat's startup message and --help."""
        v, s = self.values, self.sources
        parts = []
        for k in SAMPLING_KEYS:
            if v["temperature"] == 0 and k in ("top_k", "top_p"):
                continue  # unused under greedy
            val = "0 (greedy)" if k == "temperature" and v[k] == 0 else v[k]
            parts.append(f"{k} {val} [{s[k]}]")
        return ", ".join(parts)

    def describe(self) -> Dict[str, object]:
        out: Dict[str, object] = {k: {"value": self.values[k], "source": self.sources[k]} for k in SAMPLING_KEYS}
        out["mode"] = "greedy" if self.values["temperature"] == 0 else "sampling"
        out["eos_token_ids"] = {"value": list(self.eos_ids), "source": self.eos_source}
        return out


def from_checkpoint(path, kind: str) -> SamplingDefaults:
    """The defaults for the checkpoint (or bundle) folder `path`; `kind` is ModelConfig.kind ("omni" for
    Baichuan-Omni, anything else follows transformers)."""
    path = Path(path)
    gen = read_generation_config(path)
    has_file = (path / GENERATION_CONFIG).is_file()
    base, base_src = (OMNI_DEMO, SRC_OMNI) if kind == "omni" else (HF_DEFAULTS, SRC_HF)
    values: Dict[str, object] = {}
    sources: Dict[str, str] = {}
    for k in ("temperature", "top_k", "top_p", "repetition_penalty"):
        values[k], sources[k] = (gen[k], SRC_FILE) if k in gen else (base[k], base_src)
    do_sample, do_sample_src = (gen["do_sample"], SRC_FILE) if "do_sample" in gen else (base["do_sample"], base_src)
    if not do_sample:  # transformers: greedy whatever the temperature
        values["temperature"] = 0.0
        sources["temperature"] = f"greedy: do_sample false ({do_sample_src})"
    if "max_new_tokens" in gen:
        values["max_new_tokens"], sources["max_new_tokens"] = gen["max_new_tokens"], SRC_FILE
    else:
        values["max_new_tokens"] = DEFAULT_MAX_NEW_TOKENS
        sources["max_new_tokens"] = "omni-edge default (no max_new_tokens in generation_config.json)"
    values["top_k"] = int(values["top_k"])
    for k in ("temperature", "top_p", "repetition_penalty"):
        values[k] = float(values[k])
    eos = generation_eos_ids(path)
    eos_src = SRC_FILE if has_file else "config.json (no generation_config.json)"
    return SamplingDefaults(values=values, sources=sources, eos_ids=tuple(eos), eos_source=eos_src)
