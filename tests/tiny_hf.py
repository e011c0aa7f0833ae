"""A tiny plain Hugging Face Qwen2 causal LM, written with transformers (random weights), for the real-format
lane of the quantize tests: config.json + model.safetensors + a small byte-level BPE tokenizer with a Qwen-style
chat template. Deterministic for a seed."""

from __future__ import annotations

import json
import os

CHAT_TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
                 "+ '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}"
                 "{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _train_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from omni_edge.quantize.calibration import builtin_calibration_texts

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(builtin_calibration_texts(), trainer=trainer)
    return tok


def write_tiny_qwen2(path, *, seed: int = 0, hidden_size: int = 64, intermediate_size: int = 128, layers: int = 2,
                     heads: int = 4, kv_heads: int = 2, vocab_size: int = 512, tie_word_embeddings: bool = False) -> str:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    os.makedirs(path, exist_ok=True)
    tok = _train_tokenizer(vocab_size - 32)
    tok.save(os.path.join(path, "tokenizer.json"))
    ids = {s: tok.token_to_id(s) for s in SPECIALS}
    with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>",
                   "pad_token": "<|endoftext|>", "bos_token": None, "chat_template": CHAT_TEMPLATE,
                   "model_max_length": 1024}, f, indent=1)
    cfg = Qwen2Config(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=1024, rope_theta=10000.0, rms_norm_eps=1e-6,
                      tie_word_embeddings=tie_word_embeddings, bos_token_id=ids["<|endoftext|>"],
                      eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():  # larger than the 0.02 init so the layers do something visible
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.mul_(4.0)
    model.save_pretrained(path, safe_serialization=True)
    return path
