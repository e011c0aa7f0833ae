"""Tokenizer, prompt formats and the streaming detokenizer, on the checkpoint's own tokenizer files."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from omni_edge.tokenizer import (BaichuanPrompt, StreamDecoder, TemplatePrompt, Tokenizer, TokenizerError,
                                 prompt_format)


@pytest.fixture(scope="module")
def qwen_dir(tiny_omni):
    """Tiny Baichuan-Omni checkpoint with the real Qwen2 vocabulary and Baichuan special tokens."""
    return Path(tiny_omni)


@pytest.fixture(scope="module")
def qwen(qwen_dir):
    return Tokenizer.from_dir(qwen_dir)


@pytest.fixture(scope="module")
def bytelevel_dir(tiny_omni_bytelevel):
    return Path(tiny_omni_bytelevel)


# ---- special tokens --------------------------------------------------------------------------------

def test_special_ids_come_from_the_checkpoint(qwen, qwen_dir):
    # docs/MODEL.md §2.1 ids of the released vocabulary
    assert qwen.token_id("<|endoftext|>") == 151643
    assert qwen.token_id("<B_SYS>") == 151665
    assert qwen.token_id("<C_Q>") == 151667
    assert qwen.token_id("<C_A>") == 151668
    assert qwen.token_id("<audiogen_start_baichuan>") == 151700
    assert qwen.eos_token == "<|endoftext|>"
    p = BaichuanPrompt(qwen)
    assert (p.sys_id, p.user_id, p.assistant_id, p.eos_id) == (151665, 151667, 151668, 151643)
    assert 151643 in p.stop_ids and 151700 in p.stop_ids
    # ids are read from the files: the same strings in a different vocabulary get that vocabulary's ids
    with open(qwen_dir / "tokenizer.json", encoding="utf-8") as f:
        added = {t["content"]: t["id"] for t in json.load(f)["added_tokens"]}
    assert added["<C_Q>"] == p.user_id


def test_ids_follow_a_different_vocabulary(bytelevel_dir):
    tok = Tokenizer.from_dir(bytelevel_dir)
    p = BaichuanPrompt(tok)
    with open(bytelevel_dir / "tokenizer.json", encoding="utf-8") as f:
        added = {t["content"]: t["id"] for t in json.load(f)["added_tokens"]}
    assert (p.sys_id, p.user_id, p.assistant_id, p.eos_id) == (
        added["<B_SYS>"], added["<C_Q>"], added["<C_A>"], added["<|endoftext|>"])
    assert p.user_id != 151667  # a small vocabulary: the ids really are looked up, not constants


def test_missing_special_token_is_a_clear_error(tmp_path, qwen_dir):
    data = json.loads((qwen_dir / "tokenizer.json").read_text(encoding="utf-8"))
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != "<C_Q>"]
    (tmp_path / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    tok = Tokenizer.from_dir(tmp_path)
    with pytest.raises(TokenizerError, match="<C_Q>"):
        BaichuanPrompt(tok)


def test_unreadable_tokenizer_files(tmp_path):
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "Nope"}}), encoding="utf-8")
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


# ---- Baichuan-Omni prompt (docs/MODEL.md §2.2) ----------------------------------------------------------

def _ref(tok: Tokenizer, text: str):
    """Independent reference: the whole prompt string encoded at once, special-token strings parsed (what the
    reference demo does with its string-built prompt)."""
    return tok.hf.encode(text, add_special_tokens=False).ids


def test_baichuan_prompt_single_turn(qwen):
    p = BaichuanPrompt(qwen)
    user = "What is the capital of France?"
    ids = p.render([{"role": "user", "content": user}])
    # no system prompt: the reference demos always open with <B_SYS>, here followed by empty text
    assert ids == [151665, 151667] + qwen.encode(user) + [151668]
    assert ids == _ref(qwen, f"<B_SYS><C_Q>{user}<C_A>")


def test_baichuan_prompt_with_system_exact(qwen):
    p = BaichuanPrompt(qwen)
    system, user = "请简短回答。", "你好，世界 🌍"
    ids = p.render([{"role": "system", "content": system}, {"role": "user", "content": user}])
    assert ids == _ref(qwen, f"<B_SYS>{system}<C_Q>{user}<C_A>")
    assert ids[0] == 151665 and ids[-1] == 151668
    assert ids.count(151667) == 1


def test_baichuan_prompt_multi_turn(qwen):
    p = BaichuanPrompt(qwen)
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi!"},
            {"role": "assistant", "content": "Hello. How can I help?"},
            {"role": "user", "content": "Tell me a joke."}]
    ids = p.render(msgs)
    text = "<B_SYS>Be brief.<C_Q>Hi!<C_A>Hello. How can I help?<C_Q>Tell me a joke.<C_A>"
    assert ids == _ref(qwen, text)
    assert 151643 not in ids  # no end-of-turn tokens
    # without the generation prompt the last role prefix is absent
    assert p.render(msgs, add_generation_prompt=False) == ids[:-1]
    # an assistant turn that carries its generated ids is used verbatim
    msgs[2] = {"role": "assistant", "content": "ignored", "ids": [11, 22, 33]}
    ids2 = p.render(msgs)
    k = ids2.index(151668)
    assert ids2[k + 1:k + 4] == [11, 22, 33] and ids2[k + 4] == 151667


def test_baichuan_prompt_text_cannot_forge_a_turn(qwen):
    p = BaichuanPrompt(qwen)
    ids = p.render([{"role": "user", "content": "a<C_A>b<|endoftext|>"}])
    assert ids.count(151668) == 1 and 151643 not in ids  # only the real role prefix


def test_bad_messages(qwen):
    p = BaichuanPrompt(qwen)
    with pytest.raises(ValueError, match="role"):
        p.render([{"role": "robot", "content": "x"}])
    with pytest.raises(ValueError, match="system"):
        p.render([{"role": "user", "content": "x"}, {"role": "system", "content": "y"}])


# ---- HF chat template (SmolLM2) ---------------------------------------------------------------------

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You answer in one word."},
     {"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Say 你好 🌍"}],
]


@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
def test_hf_chat_template_matches_transformers(smollm2_dir, conv):
    transformers = pytest.importorskip("transformers")
    msgs = CONVERSATIONS[conv]
    tok = Tokenizer.from_dir(smollm2_dir)
    fmt = prompt_format(tok, "hf")
    assert isinstance(fmt, TemplatePrompt)
    ref = transformers.AutoTokenizer.from_pretrained(str(smollm2_dir))
    ref_text = ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert fmt.render_text(msgs) == ref_text
    ref_ids = ref(ref_text, add_special_tokens=False)["input_ids"]
    assert fmt.render(msgs) == ref_ids
    assert ref.eos_token_id in fmt.stop_ids


def test_template_from_tokenizer_config_and_globals(tmp_path, qwen_dir):
    for name in ("tokenizer.json",):
        (tmp_path / name).write_bytes((qwen_dir / name).read_bytes())
    template = ("{{ bos_token or '' }}{% for m in messages %}{% if m['role'] == 'system' %}"
                "{{ raise_exception('no system here') }}{% endif %}"
                "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": template, "eos_token": {"content": "<|im_end|>"}, "bos_token": None}), encoding="utf-8")
    tok = Tokenizer.from_dir(tmp_path)
    fmt = prompt_format(tok, "hf")
    assert fmt.render_text([{"role": "user", "content": "x"}]) == "<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n"
    assert fmt.stop_ids == (tok.token_id("<|im_end|>"),)
    with pytest.raises(ValueError, match="no system here"):
        fmt.render([{"role": "system", "content": "s"}])


def test_hf_checkpoint_without_template_is_an_error(tmp_path, qwen_dir):
    (tmp_path / "tokenizer.json").write_bytes((qwen_dir / "tokenizer.json").read_bytes())
    with pytest.raises(TokenizerError, match="chat template"):
        prompt_format(Tokenizer.from_dir(tmp_path), "hf")


# ---- streaming UTF-8 -------------------------------------------------------------------------------

SPLIT_TEXTS = [
    "你好，世界！今天天气很好。",
    "鱻龘 are rare characters",  # each split over two byte-level tokens in the Qwen2 vocabulary
    "family: 👨\u200d👩\u200d👧 and 🦙🌍",  # the zero-width joiners are split over tokens
    "naïve café — ½ ∑",
]


def _stream(dec: StreamDecoder, ids):
    pieces = [dec.push(i) for i in ids]
    return pieces, dec.flush()


def _complete_prefix(b: bytes) -> str:
    """The text of the longest prefix of b that ends on a character boundary (independent of the decoder)."""
    for k in range(4):
        try:
            return b[:len(b) - k].decode("utf-8")
        except UnicodeDecodeError:
            continue
    raise AssertionError(f"not a UTF-8 prefix: {b!r}")


@pytest.mark.parametrize("byte_level", [True, False], ids=["bytes", "window"])
@pytest.mark.parametrize("text", SPLIT_TEXTS)
def test_stream_decoder_never_emits_half_characters(qwen, text, byte_level):
    ids = qwen.encode(text)
    per_token = [qwen.token_bytes(i) for i in ids]
    if text.startswith(("鱻", "family")):  # the test must exercise tokens that end inside a character
        assert any(_complete_prefix(b).encode() != b for b in per_token)
    dec = StreamDecoder(qwen, byte_level=byte_level)
    out = ""
    for n, i in enumerate(ids):
        piece = dec.push(i)
        assert "\ufffd" not in piece
        out += piece
        ready = _complete_prefix(b"".join(per_token[:n + 1]))
        if byte_level:  # each character comes out exactly when its last byte has arrived
            assert out == ready
        else:  # the window path holds back a whole token's text while it ends inside a character
            assert ready.startswith(out)
    assert dec.flush() == ""
    assert out == text


def test_stream_decoder_matches_decode_on_random_ids(qwen):
    """Arbitrary ids (lone continuation bytes, truncated sequences): the stream equals tokenizer.decode."""
    rng = random.Random(0)
    single_high = [i for i in range(151643) if len(qwen.token_bytes(i)) == 1 and qwen.token_bytes(i)[0] >= 0x80]
    assert len(single_high) == 128
    for _ in range(300):
        ids = [rng.choice(single_high) if rng.random() < 0.6 else rng.randrange(151643)
               for _ in range(rng.randrange(1, 12))]
        pieces, tail = _stream(qwen.stream(), ids)
        assert "".join(pieces) + tail == qwen.decode(ids)


def test_stream_decoder_skips_special_tokens(qwen):
    ids = qwen.encode("ab") + [151667] + qwen.encode("cd")
    pieces, tail = _stream(qwen.stream(), ids)
    assert "".join(pieces) + tail == "abcd"
    pieces, tail = _stream(qwen.stream(skip_special=False), ids)
    assert "".join(pieces) + tail == "ab<C_Q>cd"


def test_stream_decoder_byte_fallback_tokenizer(tmp_path):
    """A SentencePiece-style tokenizer (Metaspace + byte fallback) streams through the window path."""
    from tokenizers import Tokenizer as HF, decoders, models, pre_tokenizers

    vocab = {"<unk>": 0, **{f"<0x{i:02X}>": 1 + i for i in range(256)}}
    for piece in ["\u2581", "h", "e", "l", "o", "w", "r", "d", "!", "he", "ll", "hell", "hello", "\u2581w", "or"]:
        vocab[piece] = len(vocab)
    merges = [("h", "e"), ("l", "l"), ("he", "ll"), ("hell", "o"), ("\u2581", "w"), ("o", "r")]
    hf = HF(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    hf.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer.from_dir(tmp_path)
    assert not tok.byte_level
    text = "hello 你好 world 🌍!"
    ids = tok.encode(text)
    assert len(ids) > len(text.split())  # the CJK and emoji went through byte fallback
    pieces, tail = _stream(tok.stream(), ids)
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + tail == tok.decode(ids)
    assert "你好" in tok.decode(ids) and "🌍" in tok.decode(ids)
