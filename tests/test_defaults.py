"""Sampling defaults come from the checkpoint, as transformers' generate() takes them.

The parity tests run `omni-edge chat` with its default sampling flags and transformers' `generate` with its
defaults on the same folder, and require the same reply. Greedy (and top-k 1 sampling, which is deterministic)
is compared token for token: both sides compute in fp32 and a random tiny model's logits are far apart
relative to fp32 rounding, so any difference in the rules (a repetition penalty applied when it should not
be, a missed eos id, a wrong length limit) shows up as a different reply, while numerics alone do not.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from omni_edge import cli, pipeline
from omni_edge.sampling_defaults import (GenerationConfigError, from_checkpoint, generation_eos_ids,
                                         read_generation_config)

PROMPTS = ["Hello, how are you?", "Tell me about the sea.", "Why is the sky blue? Answer in one line."]


def _edit_generation_config(path, **changes):
    f = os.path.join(path, "generation_config.json")
    data = json.load(open(f, encoding="utf-8")) if os.path.exists(f) else {}
    data.update(changes)
    for k in [k for k, v in changes.items() if v is None]:
        data.pop(k)
    with open(f, "w", encoding="utf-8") as fh:
        json.dump(data, fh)


def _write_tiny(path, arch: str, seed: int) -> str:
    """A random HF Qwen2 or Llama checkpoint whose vocabulary is exactly the tokenizer's, so that no lm_head row
    is padding (ChatSession never samples padding rows; transformers would)."""
    import transformers

    from tiny_hf import CHAT_TEMPLATE, SPECIALS, _train_tokenizer

    os.makedirs(path, exist_ok=True)
    tok = _train_tokenizer(480)
    tok.save(os.path.join(path, "tokenizer.json"))
    ids = {s: tok.token_to_id(s) for s in SPECIALS}
    with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>",
                   "pad_token": "<|endoftext|>", "bos_token": None, "chat_template": CHAT_TEMPLATE}, f)
    config_cls, model_cls = {"qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
                             "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM)}[arch]
    cfg = config_cls(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                     rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=arch == "llama",
                     bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                     pad_token_id=ids["<|endoftext|>"])
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    with torch.no_grad():  # larger than the 0.02 init so that the layers do something visible
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.mul_(4.0)
    model.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory):
    p = _write_tiny(str(tmp_path_factory.mktemp("defaults_qwen2")), "qwen2", seed=3)
    _edit_generation_config(p, max_new_tokens=12)  # transformers then generates 12 tokens at most, so do we
    return p


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return _write_tiny(str(tmp_path_factory.mktemp("defaults_llama")), "llama", seed=1)


def _hf_reply(path, prompt, **generate_kwargs):
    """transformers' reply text with generate()'s defaults (the folder's generation config)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **generate_kwargs)
    new = out[0, ids.shape[1]:].tolist()
    eos = set(model.generation_config.eos_token_id if isinstance(model.generation_config.eos_token_id, list)
              else [model.generation_config.eos_token_id])
    if new and new[-1] in eos:
        new = new[:-1]
    return tok.decode(new), new


def _chat_reply(capsys, path, prompt, *flags):
    rc = cli.main(["chat", "--model", str(path), "--prompt", prompt, *flags])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert out.out.endswith("\n")
    return out.out[:-1], out.err


def _check_parity(capsys, path, prompts, *flags, **hf_kwargs):
    """For each prompt: our token ids (the model's defaults, laid under `flags` as the CLI does) equal
    transformers' generate() ids, and `omni-edge chat` with those flags prints that same reply. Random byte-level
    tokens decode to partial characters, so ids are compared, and the CLI text against our own reply's text."""
    model = pipeline.load(path, max_context=256)
    names = {"--max-new-tokens": ("max_new_tokens", int), "--temperature": ("temperature", float),
             "--repetition-penalty": ("repetition_penalty", float)}
    given = {names[f][0]: names[f][1](v) for f, v in zip(flags[::2], flags[1::2]) if f in names}
    params = model.sampling_defaults.resolve(**given).params()
    ref_texts = []
    for prompt in prompts:
        ref_text, ref_ids = _hf_reply(path, prompt, **hf_kwargs)
        ref_texts.append(ref_text)
        reply = model.session(seed=5).send(prompt, params)
        assert reply.ids == ref_ids, prompt
        text, err = _chat_reply(capsys, path, prompt, *flags)
        assert text == reply.text, prompt
    return err, ref_texts


# ------------------------------------------------------------------------------------------------
# Parity with transformers' generate() defaults
# ------------------------------------------------------------------------------------------------

def test_default_flags_match_transformers_random_qwen2(qwen2_dir, capsys):
    """No sampling keys in the config: greedy, no repetition penalty, max_new_tokens from the file."""
    d = from_checkpoint(qwen2_dir, "hf")
    assert d.values["temperature"] == 0 and d.values["repetition_penalty"] == 1.0
    assert d.values["max_new_tokens"] == 12 and d.sources["max_new_tokens"] == "generation_config.json"
    err, _ = _check_parity(capsys, qwen2_dir, PROMPTS)
    assert "greedy: do_sample false (transformers default)" in err
    # the old default (penalty 1.1 under greedy) answers differently on at least one prompt: the comparison
    # above can tell the two rules apart
    model = pipeline.load(qwen2_dir, max_context=256)
    old = d.resolve(temperature=0, repetition_penalty=1.1).params()
    assert any(model.session().send(p, old).ids != _hf_reply(qwen2_dir, p)[1] for p in PROMPTS)


def test_checkpoint_penalty_and_eos_list_match_transformers_random_llama(llama_dir, capsys):
    """do_sample false with a repetition penalty in the file: transformers applies it under greedy; an eos list."""
    tok = json.load(open(os.path.join(llama_dir, "tokenizer.json"), encoding="utf-8"))
    vocab = tok["model"]["vocab"]
    extra_eos = vocab["."] if "." in vocab else vocab["Ġthe"]
    im_end = [t["id"] for t in tok["added_tokens"] if t["content"] == "<|im_end|>"][0]
    _edit_generation_config(llama_dir, do_sample=False, repetition_penalty=1.3, max_new_tokens=10,
                            eos_token_id=[im_end, extra_eos])
    d = from_checkpoint(llama_dir, "hf")
    assert d.values["repetition_penalty"] == 1.3 and d.sources["repetition_penalty"] == "generation_config.json"
    assert d.eos_ids == (im_end, extra_eos)
    _check_parity(capsys, llama_dir, PROMPTS)


def test_top_k_1_sampling_config_matches_transformers(llama_dir, capsys):
    """do_sample true with top_k 1 is deterministic on both sides: the whole sampling chain (penalty,
    temperature, top-k, top-p, in transformers' order) must pick transformers' token."""
    _edit_generation_config(llama_dir, do_sample=True, temperature=0.7, top_k=1, top_p=0.9,
                            repetition_penalty=1.2, max_new_tokens=10, eos_token_id=None)
    d = from_checkpoint(llama_dir, "hf")
    assert (d.values["temperature"], d.values["top_k"], d.values["top_p"]) == (0.7, 1, 0.9)
    _check_parity(capsys, llama_dir, PROMPTS[:2], "--seed", "5")


@pytest.mark.slow
def test_default_flags_match_transformers_smollm2(smollm2_dir, capsys):
    """Real weights. SmolLM2's generation config sets no sampling keys and no max_new_tokens (transformers'
    max_length 20 counts the prompt), so both sides get the same explicit length; everything else is default."""
    prompt = "Which planet is the largest in our solar system?"
    err, (ref_text,) = _check_parity(capsys, smollm2_dir, [prompt], "--max-new-tokens", "24", max_new_tokens=24)
    assert "Jupiter" in ref_text and "Europa" not in ref_text
    assert "repetition_penalty 1.0 [transformers default]" in err


# ------------------------------------------------------------------------------------------------
# The rules
# ------------------------------------------------------------------------------------------------

def test_omni_checkpoint_uses_the_demo_text_settings(tiny_omni):
    d = from_checkpoint(tiny_omni, "omni")
    assert d.values == {"temperature": 0.8, "top_k": 20, "top_p": 0.85, "repetition_penalty": 1.1,
                        "max_new_tokens": 2048}
    assert d.sources["temperature"] == "Baichuan-Omni demo text settings"
    assert d.sources["max_new_tokens"] == "generation_config.json"
    assert d.eos_ids == (151643,)
    model = pipeline.load(tiny_omni, max_context=64)
    desc = model.describe()["sampling"]
    assert desc["mode"] == "sampling" and desc["top_k"] == {"value": 20, "source": "Baichuan-Omni demo text settings"}


def test_command_line_overrides_and_plain_argmax(qwen2_dir):
    d = from_checkpoint(qwen2_dir, "hf")
    _edit = dict(d.values)
    r = d.resolve(temperature=0.0)
    assert r.values["repetition_penalty"] == 1.0 and r.sources["repetition_penalty"].startswith("off:")
    r = d.resolve(temperature=0.0, repetition_penalty=1.2)
    assert r.values["repetition_penalty"] == 1.2 and r.sources["repetition_penalty"] == "command line"
    r = d.resolve(temperature=0.5, top_k=7)
    assert (r.values["temperature"], r.values["top_k"], r.values["top_p"]) == (0.5, 7, 1.0)
    assert r.sources["top_p"] == "transformers default" and r.sources["top_k"] == "command line"
    assert d.values == _edit  # resolve returns a new object
    p = r.params(stop_strings=("x",))
    assert (p.temperature, p.top_k, p.max_new_tokens, p.stop_strings) == (0.5, 7, 12, ("x",))


def test_omni_with_explicit_greedy_drops_the_demo_penalty(tiny_omni):
    r = from_checkpoint(tiny_omni, "omni").resolve(temperature=0)
    assert r.values["repetition_penalty"] == 1.0


def test_no_generation_config_falls_back_to_config_json(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": [5, 7]}))
    assert generation_eos_ids(tmp_path) == [5, 7]
    d = from_checkpoint(tmp_path, "hf")
    assert d.eos_source.startswith("config.json") and d.values["temperature"] == 0
    assert d.values["max_new_tokens"] == 1024 and "omni-edge default" in d.sources["max_new_tokens"]


@pytest.mark.parametrize("key,value", [("temperature", "hot"), ("top_k", 2.5), ("top_k", True), ("top_p", 0),
                                       ("top_p", 1.5), ("repetition_penalty", -1), ("max_new_tokens", 0),
                                       ("do_sample", "yes"), ("eos_token_id", [1, "2"]), ("eos_token_id", -3)])
def test_bad_types_name_the_file_and_key(tmp_path, key, value):
    (tmp_path / "generation_config.json").write_text(json.dumps({key: value}))
    with pytest.raises(GenerationConfigError) as e:
        read_generation_config(tmp_path)
    msg = str(e.value)
    assert "generation_config.json" in msg and key in msg and "\n" not in msg


def test_null_values_are_unset_and_bad_json_is_one_line(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": None, "top_k": 3}))
    assert read_generation_config(tmp_path) == {"top_k": 3}
    (tmp_path / "generation_config.json").write_text("{not json")
    with pytest.raises(GenerationConfigError, match="cannot read it"):
        read_generation_config(tmp_path)
    (tmp_path / "generation_config.json").write_text("[1, 2]")
    with pytest.raises(GenerationConfigError, match="JSON object"):
        read_generation_config(tmp_path)


def test_bad_generation_config_is_a_load_error_and_a_cli_error(qwen2_dir, tmp_path, capsys):
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(qwen2_dir, bad)
    _edit_generation_config(str(bad), top_p=2)
    with pytest.raises(pipeline.ModelLoadError, match="top_p"):
        pipeline.load(bad)
    assert cli.main(["chat", "--model", str(bad), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert "top_p must be" in err and "Traceback" not in err and err.count("\n") == 1


def test_chat_help_shows_the_defaults_in_force(qwen2_dir, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["chat", "--model", str(qwen2_dir), "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "sampling defaults (flags left out)" in out
    assert f"sampling defaults for {qwen2_dir}:" in out
    assert "temperature 0 (greedy) [greedy: do_sample false (transformers default)]" in out
    assert "max_new_tokens 12 [generation_config.json]" in out
    with pytest.raises(SystemExit):
        cli.main(["chat", "--help"])
    assert "sampling defaults for" not in capsys.readouterr().out


def test_bad_flag_fails_before_loading(capsys):
    with pytest.raises(SystemExit) as e:  # argparse's own usage error, before anything loads
        cli.main(["chat", "--model", "/nonexistent/folder", "--top-p", "3"])
    assert e.value.code == 2 and "--top-p: must lie in [0, 1], got 3" in capsys.readouterr().err
    assert cli.main(["chat", "--model", "/nonexistent/folder", "--top-p", "0"]) == 2
    assert "top_p must lie in (0, 1]" in capsys.readouterr().err
