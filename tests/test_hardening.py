"""Bad input, corpus by corpus: every loader refuses each item with one clear line (a ValueError subclass naming
the file or key and the problem), never a traceback from a library, a hang or an allocation driven by the bad
value. The corpora are counted (test_corpus_sizes) so that an item cannot silently drop out.

Corpora: safetensors files (SAFETENSORS), sharded-index files (INDEX), config.json values (CONFIG), special
files in place of checkpoint files (SPECIAL), non-finite weights (load and quantize), chat templates, bundles
(verify / inspect / copied files / stale partial folders), command-line arguments and environment switches,
and native-op arguments (the cases a fuzzer found)."""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from omni_edge import bundle, cli, cli_args, knobs
from omni_edge.checkpoint import Checkpoint
from omni_edge.config import load_config
from omni_edge.safetensors_file import SafetensorsFileError, read_header

# ------------------------------------------------------------------------------------------------
# A small valid plain-HF (Llama) checkpoint: config.json + model.safetensors
# ------------------------------------------------------------------------------------------------

CONFIG = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 16, "num_hidden_layers": 2,
          "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 24, "vocab_size": 40,
          "max_position_embeddings": 64, "rope_theta": 10000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
          "torch_dtype": "float32"}


def _tensors(cfg=CONFIG):
    g = torch.Generator().manual_seed(0)
    c, i, d = cfg["hidden_size"], cfg["intermediate_size"], cfg["hidden_size"] // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * d
    t = {"model.embed_tokens.weight": torch.randn(cfg["vocab_size"], c, generator=g), "model.norm.weight": torch.ones(c)}
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        t.update({p + "input_layernorm.weight": torch.ones(c), p + "post_attention_layernorm.weight": torch.ones(c),
                  p + "self_attn.q_proj.weight": torch.randn(c, c, generator=g),
                  p + "self_attn.k_proj.weight": torch.randn(kv, c, generator=g),
                  p + "self_attn.v_proj.weight": torch.randn(kv, c, generator=g),
                  p + "self_attn.o_proj.weight": torch.randn(c, c, generator=g),
                  p + "mlp.gate_proj.weight": torch.randn(i, c, generator=g),
                  p + "mlp.up_proj.weight": torch.randn(i, c, generator=g),
                  p + "mlp.down_proj.weight": torch.randn(c, i, generator=g)})
    return t


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("good") / "ckpt"
    root.mkdir()
    (root / "config.json").write_text(json.dumps(CONFIG))
    save_file(_tensors(), str(root / "model.safetensors"), metadata={"format": "pt"})
    return root


@pytest.fixture
def ckpt(good, tmp_path) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(good, dst)
    return dst


def _one_line_error(fn, *needles, exc=ValueError):
    """fn() must raise `exc` with a one-line message containing every needle."""
    with pytest.raises(exc) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg, msg
    assert "Traceback" not in msg
    for n in needles:
        assert n in msg, f"{n!r} not in {msg!r}"
    return msg


def test_the_good_checkpoint_loads(good):
    ck = Checkpoint.open(good)
    assert ck.get("model.norm.weight").shape == (16,)
    assert read_header(good / "model.safetensors")["__metadata__"] == {"format": "pt"}


# ------------------------------------------------------------------------------------------------
# safetensors corpus: bytes of model.safetensors -> bad bytes, and what the error must say
# ------------------------------------------------------------------------------------------------

def _split(data: bytes):
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def _join(header, body: bytes, pad: bool = True) -> bytes:
    raw = json.dumps(header).encode()
    if pad:
        raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + body


def _edit(fn):
    def apply(data):
        h, body = _split(data)
        out = fn(h, body)
        return out if isinstance(out, bytes) else _join(h, body)
    return apply


def _first(h):
    return sorted(k for k in h if k != "__metadata__")[0]


def _last_by_offset(h):
    return max((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][1])


SAFETENSORS = {
    "empty file": (lambda d: b"", "too short"),
    "7 bytes": (lambda d: d[:7], "too short"),
    "truncated download (half the data)": (lambda d: d[:len(d) // 2 + 200], "truncated"),
    "last byte missing": (lambda d: d[:-1], "truncated"),
    "header length past the end": (lambda d: struct.pack("<Q", len(d)) + d[8:], "claims"),
    "header length huge": (lambda d: struct.pack("<Q", 2**63) + d[8:], "claims"),
    "header not UTF-8": (lambda d: struct.pack("<Q", 8) + b"\xff\xfe\xfd\xfc\xfb\xfa\xf9\xf8" + d[8:], "UTF-8"),
    "header not JSON": (lambda d: _join_raw(b"{not json", d), "not valid JSON"),
    "header a JSON array": (lambda d: _join_raw(b"[1, 2, 3]", d), "JSON object"),
    "deeply nested header": (lambda d: _join_raw(b"[" * 100000 + b"]" * 100000, d), "nested too deeply"),
    "entry is a string": (_edit(lambda h, b: h.__setitem__(_first(h), "x")), "must be an object"),
    "entry lacks shape": (_edit(lambda h, b: h[_first(h)].pop("shape")), "lacks \"shape\""),
    "entry lacks data_offsets": (_edit(lambda h, b: h[_first(h)].pop("data_offsets")), "lacks \"data_offsets\""),
    "unknown dtype": (_edit(lambda h, b: h[_first(h)].__setitem__("dtype", "F128")), "unknown dtype"),
    "negative dim": (_edit(lambda h, b: h[_first(h)].__setitem__("shape", [-1, 4])), "invalid shape"),
    "shape of strings": (_edit(lambda h, b: h[_first(h)].__setitem__("shape", ["4"])), "invalid shape"),
    "offsets of wrong length": (_edit(lambda h, b: h[_first(h)]["data_offsets"].__setitem__(
        1, h[_first(h)]["data_offsets"][1] - 4)), "span"),
    "offsets reversed": (_edit(lambda h, b: h[_first(h)].__setitem__(
        "data_offsets", h[_first(h)]["data_offsets"][::-1])), "invalid data_offsets"),
    "offsets past the end": (_edit(lambda h, b: _shift_last(h, 1 << 20)), "truncated"),
    "overlapping tensors": (_edit(lambda h, b: _overlap(h)), "overlaps"),
    "metadata not a string map": (_edit(lambda h, b: h.__setitem__("__metadata__", {"format": 1})), "__metadata__"),
    "bytes after the last tensor": (lambda d: d + b"\0" * 16, "no tensor covers"),
}


def _join_raw(raw: bytes, d: bytes) -> bytes:
    return struct.pack("<Q", len(raw)) + raw + d[8 + struct.unpack("<Q", d[:8])[0]:]


def _shift_last(h, by: int):
    """Grow the last tensor (shape and offsets consistent) so its data end lies `by` bytes past the file."""
    k = _last_by_offset(h)
    b, e = h[k]["data_offsets"]
    h[k]["data_offsets"] = [b, e + by]
    h[k]["shape"] = [(e + by - b) // 4]
    h[k]["dtype"] = "F32"


def _overlap(h):
    names = sorted((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][0])
    a, b = names[0], names[1]
    size_b = h[b]["data_offsets"][1] - h[b]["data_offsets"][0]
    start = h[a]["data_offsets"][0]
    h[b]["data_offsets"] = [start, start + size_b]


@pytest.mark.parametrize("case", sorted(SAFETENSORS))
def test_safetensors_corpus(case, ckpt):
    mutate, needle = SAFETENSORS[case]
    f = ckpt / "model.safetensors"
    f.write_bytes(mutate(f.read_bytes()))
    t0 = time.time()
    msg = _one_line_error(lambda: read_header(f), "model.safetensors", needle, exc=SafetensorsFileError)
    # the checkpoint loader, and the bundle reader, give the same verdict
    assert _one_line_error(lambda: Checkpoint.open(ckpt), needle) == msg
    _one_line_error(lambda: bundle.tensor_table(f), needle, exc=bundle.BundleError)
    assert time.time() - t0 < 10


# ------------------------------------------------------------------------------------------------
# sharded-index corpus
# ------------------------------------------------------------------------------------------------

def _index(ckpt: Path, content) -> None:
    raw = content if isinstance(content, (bytes, str)) else json.dumps(content)
    (ckpt / "model.safetensors.index.json").write_bytes(raw.encode() if isinstance(raw, str) else raw)


def _weight_map(ckpt: Path) -> dict:
    return {k: "model.safetensors" for k in _tensors()}


INDEX = {
    "a JSON array": (lambda c: _index(c, [1, 2]), "JSON object"),
    "not JSON": (lambda c: _index(c, "{weight_map: nope"), "not readable JSON"),
    "not UTF-8": (lambda c: _index(c, b"\xff\xfe{}"), "not readable JSON"),
    "no weight_map": (lambda c: _index(c, {"metadata": {}}), "no weight_map"),
    "weight_map a list": (lambda c: _index(c, {"weight_map": ["model.safetensors"]}), "no weight_map"),
    "shard name not a string": (lambda c: _index(c, {"weight_map": {"model.norm.weight": 3}}), "names a shard"),
    "shard outside the folder": (lambda c: _index(c, {"weight_map": {"model.norm.weight": "../x.safetensors"}}),
                                 "names a shard"),
    "shard missing": (lambda c: _index(c, {"weight_map": {"model.norm.weight": "other.safetensors"}}), "missing"),
    "tensor not in its shard": (lambda c: _index(c, {"weight_map": dict(_weight_map(c), extra="model.safetensors")}),
                                "not in their shard"),
    "deeply nested": (lambda c: _index(c, "[" * 100000 + "]" * 100000), "not readable JSON"),
}


@pytest.mark.parametrize("case", sorted(INDEX))
def test_index_corpus(case, ckpt):
    mutate, needle = INDEX[case]
    mutate(ckpt)
    _one_line_error(lambda: Checkpoint.open(ckpt), "model.safetensors.index.json" if needle != "missing"
                    else "other.safetensors", needle)


# ------------------------------------------------------------------------------------------------
# config.json corpus
# ------------------------------------------------------------------------------------------------

def _cfg(**kv):
    def mutate(ckpt: Path):
        d = dict(CONFIG)
        for k, v in kv.items():
            if v is _DROP:
                d.pop(k)
            else:
                d[k] = v
        (ckpt / "config.json").write_text(json.dumps(d))
    return mutate


_DROP = object()

CONFIG_CORPUS = {
    "rope_theta null": (_cfg(rope_theta=None), "rope_theta"),
    "rope_theta 'abc'": (_cfg(rope_theta="abc"), "rope_theta"),
    "rope_theta NaN": (_cfg(rope_theta=float("nan")), "rope_theta"),
    "rope_theta negative": (_cfg(rope_theta=-1.0), "rope_theta"),
    "rms_norm_eps 'tiny'": (_cfg(rms_norm_eps="tiny"), "rms_norm_eps"),
    "rms_norm_eps 0": (_cfg(rms_norm_eps=0), "rms_norm_eps"),
    "num_attention_heads 0": (_cfg(num_attention_heads=0), "num_attention_heads"),
    "num_attention_heads '2'": (_cfg(num_attention_heads="2"), "num_attention_heads"),
    "num_key_value_heads 0": (_cfg(num_key_value_heads=0), "num_key_value_heads"),
    "num_hidden_layers 10^9": (_cfg(num_hidden_layers=1_000_000_000), "num_hidden_layers"),
    "num_hidden_layers beyond the tensors": (_cfg(num_hidden_layers=5), "num_hidden_layers=5"),
    "max_position_embeddings 1": (_cfg(max_position_embeddings=1), "max_position_embeddings"),
    "hidden_size 2^40": (_cfg(hidden_size=2**40), "hidden_size"),
    "hidden_size 16.5": (_cfg(hidden_size=16.5), "hidden_size"),
    "vocab_size -1": (_cfg(vocab_size=-1), "vocab_size"),
    "vocab_size true": (_cfg(vocab_size=True), "vocab_size"),
    "intermediate_size missing": (_cfg(intermediate_size=_DROP), "intermediate_size"),
    "tie_word_embeddings 'yes'": (_cfg(tie_word_embeddings="yes"), "tie_word_embeddings"),
    "torch_dtype 'float8'": (_cfg(torch_dtype="float8"), "torch_dtype"),
    "model_type 'gpt2'": (_cfg(model_type="gpt2"), "model_type"),
    "a JSON array": (lambda c: (c / "config.json").write_text("[1]"), "JSON object"),
    "not JSON": (lambda c: (c / "config.json").write_text("{model_type: llama"), "not valid JSON"),
    "deeply nested": (lambda c: (c / "config.json").write_text("[" * 100000 + "]" * 100000), "not valid JSON"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CORPUS))
def test_config_corpus(case, ckpt):
    mutate, needle = CONFIG_CORPUS[case]
    mutate(ckpt)
    t0 = time.time()
    _one_line_error(lambda: Checkpoint.open(ckpt), needle)
    assert time.time() - t0 < 5  # nothing sized by the bad value was built


def test_heads_zero_is_named_not_a_missing_head_dim(ckpt):
    _cfg(num_attention_heads=0, head_dim=_DROP if "head_dim" in CONFIG else None)(ckpt)
    msg = _one_line_error(lambda: load_config(ckpt), "num_attention_heads")
    assert "head_dim" not in msg


# ------------------------------------------------------------------------------------------------
# special files in place of checkpoint files
# ------------------------------------------------------------------------------------------------

def _fifo(path: Path):
    path.unlink()
    os.mkfifo(path)


def _devlink(path: Path):
    path.unlink()
    path.symlink_to("/dev/zero")


SPECIAL = {
    "config.json is a FIFO": (lambda c: _fifo(c / "config.json"), "FIFO"),
    "config.json -> /dev/zero": (lambda c: _devlink(c / "config.json"), "character device"),
    "model.safetensors is a FIFO": (lambda c: _fifo(c / "model.safetensors"), "FIFO"),
    "model.safetensors -> /dev/zero": (lambda c: _devlink(c / "model.safetensors"), "character device"),
    "config.json a broken symlink": (lambda c: (c / "config.json").unlink() or (c / "config.json").symlink_to(
        c / "nowhere.json"), "broken symlink"),
    "index is a FIFO": (lambda c: os.mkfifo(c / "model.safetensors.index.json"), "FIFO"),
}


@pytest.mark.skipif(not hasattr(os, "mkfifo") or not os.path.exists("/dev/zero"), reason="POSIX special files")
@pytest.mark.parametrize("case", sorted(SPECIAL))
def test_special_file_corpus(case, ckpt):
    mutate, needle = SPECIAL[case]
    mutate(ckpt)
    t0 = time.time()
    _one_line_error(lambda: Checkpoint.open(ckpt), needle)
    assert time.time() - t0 < 5  # never blocked reading a FIFO or a device


def test_corpus_sizes():
    """The corpora in CI; a deleted entry shows up here."""
    assert (len(SAFETENSORS), len(INDEX), len(CONFIG_CORPUS), len(SPECIAL)) == (22, 10, 23, 6)


# ------------------------------------------------------------------------------------------------
# non-finite weights
# ------------------------------------------------------------------------------------------------

def _poison(ckpt: Path, name: str, value: float, index: int = 3) -> None:
    t = _tensors()
    t[name].view(-1)[index] = value
    save_file(t, str(ckpt / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_small_tensor_refused_at_load(ckpt, value):
    _poison(ckpt, "model.layers.1.post_attention_layernorm.weight", value)
    ck = Checkpoint.open(ckpt)  # headers only
    _one_line_error(lambda: ck.get("model.layers.1.post_attention_layernorm.weight"),
                    "model.layers.1.post_attention_layernorm.weight", "non-finite", "flat index 3")


def test_non_finite_large_tensor_checked_when_asked(ckpt, monkeypatch):
    from omni_edge import checkpoint as checkpoint_mod

    _poison(ckpt, "model.layers.0.mlp.up_proj.weight", float("inf"), index=100)
    monkeypatch.setattr(checkpoint_mod, "FINITE_CHECK_ELEMS", 64)  # make up_proj (384 values) a "large" tensor
    ck = Checkpoint.open(ckpt)
    assert torch.isinf(ck.get("model.layers.0.mlp.up_proj.weight")).any()  # default: large tensors not scanned
    ck.finite_check = "all"
    _one_line_error(lambda: ck.get("model.layers.0.mlp.up_proj.weight"), "mlp.up_proj.weight", "inf")


# ------------------------------------------------------------------------------------------------
# chat templates (TemplatePrompt)
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def byte_tokenizer(tmp_path_factory):
    from omni_edge.testing import write_tiny_checkpoint
    from omni_edge.tokenizer import Tokenizer
    root = tmp_path_factory.mktemp("tok")
    write_tiny_checkpoint(root, seed=0, tokenizer="bytelevel", layers=1)
    return Tokenizer.from_dir(root)


TEMPLATES = {
    "empty": ("", "empty prompt"),
    "whitespace only": ("{% for m in messages %}   {% endfor %}", "empty prompt"),
    "endless output": ("{% for i in range(100000) %}{% for j in range(100000) %}xxxxxxxx{% endfor %}{% endfor %}",
                       "characters"),
    "silent loop": ("{% for i in range(100000) %}{% for j in range(100000) %}{% set x = i * j %}{% endfor %}"
                    "{% endfor %}hi", "to render"),
}


@pytest.mark.parametrize("case", sorted(TEMPLATES))
def test_template_corpus(case, byte_tokenizer, monkeypatch):
    from omni_edge.tokenizer import TemplatePrompt, TokenizerError

    text, needle = TEMPLATES[case]
    # the bounds, shortened for the test: 0.5 s for the silent loop, 10^4 characters for the endless output
    monkeypatch.setattr(TemplatePrompt, "MAX_RENDER_SECONDS", 0.5 if case == "silent loop" else 30.0)
    monkeypatch.setattr(TemplatePrompt, "MAX_RENDER_CHARS", 10_000)
    p = TemplatePrompt(byte_tokenizer, text)
    t0 = time.time()
    _one_line_error(lambda: p.render([{"role": "user", "content": "Hi"}]), "chat template", needle,
                    exc=TokenizerError)
    assert time.time() - t0 < 10


def test_template_bound_leaves_good_templates_alone(byte_tokenizer):
    from omni_edge.tokenizer import TemplatePrompt
    p = TemplatePrompt(byte_tokenizer, "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}")
    assert p.render_text([{"role": "user", "content": "Hi"}]) == "[user]Hi"


# ------------------------------------------------------------------------------------------------
# command line: argument types, subcommand arguments, environment switches
# ------------------------------------------------------------------------------------------------

def _cli(capsys, *argv, env=None, monkeypatch=None):
    """Run `omni-edge argv` in-process; returns (exit code, stdout, stderr)."""
    try:
        rc = cli.main(list(argv))
    except SystemExit as e:  # argparse usage errors
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


ARG_TYPES = [
    (cli_args.threads, "0", "must lie in [1"), (cli_args.threads, "100000", "must lie in [1"),
    (cli_args.threads, "two", "thread count"), (cli_args.seed, "1e23", "integer seed"),
    (cli_args.seed, "-1", "2**63-1"), (cli_args.seed, str(2**63), "2**63-1"),
    (cli_args.device, "meta", "cpu, cuda or cuda:N"), (cli_args.device, "tpu", "cpu, cuda or cuda:N"),
    (cli_args.device, "cuda:x", "cpu, cuda or cuda:N"), (cli_args.finite_float(min=0.0), "inf", "finite"),
    (cli_args.finite_float(min=0.0), "nan", "finite"), (cli_args.finite_float(min=0.0), "-0.5", "must lie in"),
    (cli_args.finite_float(), "abc", "expected a number"), (cli_args.int_range(1, 8), "9", "[1, 8]"),
]


@pytest.mark.parametrize("parse,text,needle", ARG_TYPES)
def test_argument_types_refuse(parse, text, needle):
    import argparse
    with pytest.raises(argparse.ArgumentTypeError, match=None) as info:
        parse(text)
    assert needle in str(info.value)


def test_argument_types_accept():
    assert cli_args.threads("1") == 1 and cli_args.threads(str(cli_args.cpu_count())) == cli_args.cpu_count()
    assert cli_args.seed("0") == 0 and cli_args.seed(str(2**63 - 1)) == 2**63 - 1
    assert [cli_args.device(d) for d in ("cpu", "CUDA", "cuda:1")] == ["cpu", "cuda", "cuda:1"]
    assert cli_args.finite_float(min=0.0)("0.7") == 0.7


@pytest.mark.parametrize("argv,needle", [
    (["demo", "--threads", "0"], "--threads"), (["demo", "--max-new-tokens", "100000"], "--max-new-tokens"),
    (["demo", "--max-new-tokens", "0"], "--max-new-tokens"), (["demo", "--device", "tpu"], "--device"),
])
def test_demo_arguments(capsys, argv, needle):
    rc, out, err = _cli(capsys, *argv)
    assert rc == 2 and needle in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if "error" in line]) == 1


def test_bad_environment_switch_is_reported(capsys, monkeypatch):
    monkeypatch.setenv("OMNI_EDGE_ISA", "garbage")
    monkeypatch.setenv("OMNI_EDGE_NATIVE", "maybe")
    with pytest.warns(RuntimeWarning, match="OMNI_EDGE_ISA='garbage'"):  # the library warns once ...
        knobs.reload()
    try:
        assert any("OMNI_EDGE_ISA='garbage'" in p for p in knobs.settings().problems)
        rc, out, err = _cli(capsys, "inspect", "/nonexistent")
        assert rc == 2 and "OMNI_EDGE_ISA='garbage'" in err and "OMNI_EDGE_NATIVE='maybe'" in err
        assert len(err.strip().splitlines()) == 1
        rc, out, err = _cli(capsys, "info")
        assert rc == 1 and "INVALID: OMNI_EDGE_ISA='garbage'" in out
    finally:
        monkeypatch.delenv("OMNI_EDGE_ISA")
        monkeypatch.delenv("OMNI_EDGE_NATIVE")
        knobs.reload()


def test_switches_listed_and_overridable(capsys):
    names = {row["variable"] for row in knobs.table()}
    assert names == {"OMNI_EDGE_ISA", "OMNI_EDGE_NATIVE", "OMNI_EDGE_NATIVE_DECODE", "OMNI_EDGE_Q4_EXACT",
                     "OMNI_EDGE_CUDA_GRAPH", "OMNI_EDGE_CACHE", "OMNI_EDGE_THREADS"}
    rc, out, err = _cli(capsys, "info")
    for name in names:
        assert name in out
    before = knobs.settings()
    with knobs.override(native_decode=False, q4_exact=True):
        assert not knobs.settings().native_decode and knobs.settings().q4_exact
        assert knobs.settings().source["q4_exact"] == "set()"
    assert knobs.settings() == before
    with pytest.raises(ValueError, match="knob"):
        knobs.set("no_such_switch", 1)


def test_self_check_covers_gemv_and_decode_step():
    from omni_edge import info
    res = info.cpu_extra_checks()
    assert res == {"gemv": {"ok": True, "error": ""}, "decode_step": {"ok": True, "error": ""}}
    with knobs.override(native_decode=False):
        assert info.cpu_extra_checks()["decode_step"]["status"].startswith("skipped")


def test_self_check_says_skipped_without_native(capsys):
    with knobs.override(native=False):
        rc, out, err = _cli(capsys, "info", "--self-check")
    assert rc == 0 and "skipped (OMNI_EDGE_NATIVE=0" in out and " ok" not in out


# ------------------------------------------------------------------------------------------------
# native-op arguments (fuzzer findings): ValueError naming the argument
# ------------------------------------------------------------------------------------------------

def _codes(k=32, n=8, value=3):
    q = torch.full((k, n), value, dtype=torch.uint8)
    return q, torch.full((1, n), 8, dtype=torch.uint8), torch.ones(1, n, dtype=torch.float16), \
        torch.zeros(k, dtype=torch.int32)


def _qweight(q, z, s, g, group_size=32):
    from omni_edge.ops import q4
    return q4.QWeight(q, z, s, g, group_size, True)


NATIVE = {
    "QWeight code 16": (lambda: _qweight(*_codes(value=16)), "q:", "[0, 15]"),
    "QWeight code 255": (lambda: _qweight(*_codes(value=255)), "q:", "[0, 15]"),
    "QWeight zero 16": (lambda: _qweight(_codes()[0], torch.full((1, 8), 16, dtype=torch.uint8), *_codes()[2:]),
                        "zeros:", "[0, 15]"),
    "QWeight float codes": (lambda: _qweight(_codes()[0].float(), *_codes()[1:]), "q:", "dtype"),
    "QWeight empty": (lambda: _qweight(*_codes(k=0)), "q:", "non-empty"),
    "QWeight group size 2^31": (lambda: _qweight(*_codes(), group_size=2**31), "group_size", "2^31"),
    "from_gptq group size 2^31": (lambda: _from_gptq(2**31), "group_size", "2^31"),
    "from_gptq group size 2^40": (lambda: _from_gptq(2**40), "group_size", "2^31"),
    "from_gptq group size 1.5": (lambda: _from_gptq(1.5), "group_size", "integer"),
    "quantize_rtn empty rows": (lambda: _rtn(torch.empty(0, 32)), "weight", "non-empty"),
    "quantize_rtn empty columns": (lambda: _rtn(torch.empty(8, 0)), "weight", "non-empty"),
    "qweight_rtn empty": (lambda: _qrtn(torch.empty(0, 0)), "weight", "non-empty"),
    "quantize_rtn group 0 of K 0": (lambda: _rtn(torch.empty(8, 0), 0), "weight", "non-empty"),
    "attention prefill 0 kv heads": (lambda: _attn("prefill", hkv=0), "k_cache", "at least 1 head"),
    "attention decode 0 kv heads": (lambda: _attn("decode", hkv=0), "k_cache", "at least 1 head"),
    "attention prefill head_dim 0": (lambda: _attn("prefill", d=0), "q", "head_dim"),
    "attention varlen 0 heads": (lambda: _varlen(h=0), "q", "at least 1 head"),
    "attention scale inf": (lambda: _attn("prefill", scale=float("inf")), "scale", "finite"),
    "write_kv 0 kv heads": (lambda: _write_kv(), "k", "at least 1 head"),
    "rvq encode 1e15": (lambda: _rvq(1e15), "x", "magnitude"),
    "rvq encode -1e10": (lambda: _rvq(-1e10), "x", "magnitude"),
    "rvq encode NaN": (lambda: _rvq(float("nan")), "x", "NaN"),
    "rvq encode inf": (lambda: _rvq(float("inf")), "x", "NaN or infinite"),
}


def _from_gptq(group_size):
    from omni_edge.ops import q4
    qweight = torch.zeros(4, 8, dtype=torch.int32)
    return q4.QWeight.from_gptq(qweight, torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, 8), None,
                                group_size=group_size, sym=True)


def _rtn(w, group_size=128):
    from omni_edge.ops import q4
    return q4.quantize_rtn(w, group_size)


def _qrtn(w):
    from omni_edge.ops import q4
    return q4.qweight_rtn(w)


def _attn(kind, hkv=1, d=8, scale=None):
    from omni_edge.ops import attention
    hq = 2 if hkv else 2
    q = torch.randn(1, 1, hq, d)
    kc, vc = torch.zeros(1, hkv, 4, d), torch.zeros(1, hkv, 4, d)
    if kind == "prefill":
        return attention.prefill(q, kc, vc, start=0, scale=scale)
    return attention.decode(q[:, 0], kc, vc, torch.ones(1, dtype=torch.int32), scale=scale)


def _varlen(h):
    from omni_edge.ops import attention
    q = torch.randn(3, h, 8)
    return attention.varlen(q, q.clone(), q.clone(), torch.tensor([0, 3], dtype=torch.int32))


def _write_kv():
    from omni_edge.ops import attention
    return attention.write_kv(torch.zeros(1, 0, 4, 8), torch.zeros(1, 0, 4, 8), torch.zeros(1, 1, 0, 8),
                              torch.zeros(1, 1, 0, 8), 0)


def _rvq(value):
    from omni_edge.ops import rvq
    books = [torch.randn(5, 4, generator=torch.Generator().manual_seed(0)) for _ in range(2)]
    x = torch.zeros(3, 4)
    x[1, 2] = value
    return rvq.encode(x, books)


@pytest.mark.parametrize("case", sorted(NATIVE))
def test_native_op_corpus(case):
    fn, name, needle = NATIVE[case]
    msg = _one_line_error(fn, needle)
    assert msg.startswith(name) or f" {name}" in msg or name.rstrip(":") in msg


def test_native_corpus_size():
    assert len(NATIVE) == 23


def test_rvq_encode_accepts_up_to_its_bound():
    """Inputs up to MAX_ENCODE_ABS are encoded exactly as encode_ref encodes them (ties to the lowest index)."""
    from omni_edge.ops import rvq
    g = torch.Generator().manual_seed(0)
    books = [torch.randn(33, 7, generator=g) * s for s in (1e8, 1.0)]
    x = (torch.rand(11, 7, generator=g) * 2 - 1) * rvq.MAX_ENCODE_ABS
    assert torch.equal(rvq.encode(x, books), rvq.encode_ref(x, books))


# ------------------------------------------------------------------------------------------------
# bundles: verify, inspect, copied files, stale partial folders
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def src_with_extras(tmp_path_factory):
    """A tiny omni checkpoint whose folder also holds things a bundle must not carry."""
    from omni_edge.testing import write_tiny_checkpoint
    root = tmp_path_factory.mktemp("src") / "ckpt"
    write_tiny_checkpoint(root, seed=0, tokenizer="bytelevel", layers=1)
    secret = tmp_path_factory.mktemp("home") / "secret.env"
    secret.write_text("API_KEY=do-not-copy\n")
    (root / "credentials.txt").symlink_to(secret)
    (root / "notes.txt").write_text("private notes\n")
    (root / "LICENSE").write_text("licence text\n")
    (root / "README.md").symlink_to(secret)  # a wanted name, but through a symlink leaving the folder
    return root


@pytest.fixture(scope="module")
def rtn_bundle(src_with_extras, tmp_path_factory):
    from omni_edge.quantize.build import QuantizeOptions, quantize_checkpoint
    out = tmp_path_factory.mktemp("b") / "bundle"
    logs = []
    opts = QuantizeOptions(method="rtn", group_size=32, nsamples=2, seqlen=16, heldout=False, progress=False)
    manifest = quantize_checkpoint(src_with_extras, out, opts, log=logs.append)
    return out, manifest, logs


def test_bundle_copies_only_what_it_needs(rtn_bundle):
    out, manifest, logs = rtn_bundle
    names = {p.name for p in out.iterdir()}
    assert not {"credentials.txt", "notes.txt", "README.md"} & names
    assert "LICENSE" in names and "tokenizer.json" in names
    assert "API_KEY" not in "".join(p.read_text(errors="ignore") for p in out.iterdir() if p.is_file()
                                    and p.suffix != ".safetensors")
    from omni_edge.quantize.bundle_writer import SIDE_FILES
    written = {"config.json", bundle.MANIFEST, "model.safetensors.index.json"} | {
        n for n in names if n.endswith(".safetensors")}
    assert set(manifest["side_files"]) == names - written  # every other file is a listed side file ...
    assert set(manifest["side_files"]) <= set(SIDE_FILES) | {"LICENSE"}  # ... from the allow-list
    assert any("README.md" in line and "outside the source folder" in line for line in logs)


def test_verify_finds_an_edited_weight_file(rtn_bundle, tmp_path, capsys, monkeypatch):
    out, manifest, _ = rtn_bundle
    copy = tmp_path / "bundle"
    shutil.copytree(out, copy)
    rc, text, err = _cli(capsys, "verify", str(copy))
    assert rc == 0 and "OK" in text
    # set one layer-0 scale to +inf in place: same size, same header, so load-time checks of sizes pass
    f = copy / "backbone.safetensors"
    header = read_header(f)
    name = "model.layers.0.mlp.up_proj.scales"
    begin = header[name]["data_offsets"][0]
    data_start = 8 + struct.unpack("<Q", f.read_bytes()[:8])[0]
    raw = bytearray(f.read_bytes())
    raw[data_start + begin:data_start + begin + 2] = struct.pack("<e", math.inf)
    f.write_bytes(bytes(raw))
    monkeypatch.setattr(bundle, "HASH_ALWAYS_BELOW", 0)  # as for a real (multi-GB) weight file
    bundle.validate(copy)  # sizes and tables still agree: the load-time check cannot see it ...
    rc, text, err = _cli(capsys, "verify", str(copy))
    assert rc == 1 and "MISMATCH  backbone.safetensors" in text and "FAILED" in text
    # ... and loading reads the scales, which are small: the non-finite value is refused by name
    ck = Checkpoint.open(copy)
    _one_line_error(lambda: ck.get(name), name, "inf")


def test_verify_refuses_a_folder_that_is_not_a_bundle(tmp_path, capsys):
    rc, out, err = _cli(capsys, "verify", str(tmp_path))
    assert rc == 2 and "omni_edge.json is missing" in err and len(err.strip().splitlines()) == 1


def test_inspect_bundle_and_checkpoint(rtn_bundle, src_with_extras, capsys):
    out, manifest, _ = rtn_bundle
    rc, text, err = _cli(capsys, "inspect", str(out), "--json")
    assert rc == 0, err
    d = json.loads(text)
    assert d["type"] == "bundle" and d["source_fingerprint"] == manifest["source"]["fingerprint"]
    assert d["quantization"]["bits"] == 4 and d["bundle"]["method"] == "rtn"
    assert d["modules"]["backbone"]["precision"] == manifest["modules"]["backbone"]["precision"]
    assert d["files"]["backbone.safetensors"] == manifest["files"]["backbone.safetensors"]["bytes"]
    rc, text, err = _cli(capsys, "inspect", str(src_with_extras), "--json")
    s = json.loads(text)
    # the checkpoint's own fingerprint is the one quantize recorded for it
    assert s["type"] == "checkpoint" and s["source_fingerprint"] == manifest["source"]["fingerprint"]
    assert s["quantization"] is None and s["modules"]["backbone"]["tensors"] > 0
    rc, text, err = _cli(capsys, "inspect", str(out))
    assert rc == 0 and "source fingerprint: sha256:" in text and "backbone" in text and "4-bit GPTQ" in text


def test_quantize_refuses_non_finite_weights(src_with_extras, tmp_path):
    from omni_edge.quantize.build import QuantizeOptions, quantize_checkpoint
    from omni_edge.checkpoint import Checkpoint as C

    src = tmp_path / "src"
    shutil.copytree(src_with_extras, src, symlinks=True)
    ck = C.open(src)
    name = "model.layers.0.mlp.up_proj.weight"
    shard = Path(ck._files[name])
    from safetensors.torch import load_file
    tensors = load_file(str(shard))
    tensors[name].view(-1)[7] = float("nan")
    save_file(tensors, str(shard), metadata={"format": "pt"})
    opts = QuantizeOptions(method="rtn", group_size=32, nsamples=2, seqlen=16, heldout=False, progress=False)
    _one_line_error(lambda: quantize_checkpoint(src, tmp_path / "out", opts, log=lambda s: None), name, "nan")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))


def test_stale_partials_are_cleaned(tmp_path):
    from omni_edge.quantize.bundle_writer import clean_stale_partials
    out = tmp_path / "bundle"
    dead = tmp_path / ".bundle.partial-999999999"  # no such process
    live = tmp_path / f".bundle.partial-{os.getppid()}"  # a live process (our parent)
    other = tmp_path / ".other.partial-999999999"  # another OUT's
    for d in (dead, live, other):
        d.mkdir()
        (d / "backbone.safetensors").write_bytes(b"x")
    assert clean_stale_partials(out) == [dead.name]
    assert not dead.exists() and live.exists() and other.exists()


# ------------------------------------------------------------------------------------------------
# the commands a user runs, on an interrupted download: one line naming the file, exit code 2
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def truncated_omni(tmp_path_factory):
    from omni_edge.testing import write_tiny_checkpoint
    root = tmp_path_factory.mktemp("trunc") / "ckpt"
    write_tiny_checkpoint(root, seed=0, tokenizer="bytelevel", layers=1)
    shard = sorted(root.glob("*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[:len(data) * 2 // 3])  # the download stopped two thirds of the way
    return root, shard.name


@pytest.mark.parametrize("command", ["chat", "quantize", "inspect"])
def test_commands_on_a_truncated_checkpoint(truncated_omni, command, capsys, tmp_path):
    root, shard = truncated_omni
    argv = {"chat": ["chat", "--model", str(root), "--prompt", "Hi"],
            "quantize": ["quantize", str(root), str(tmp_path / "out"), "--method", "rtn", "--quiet", "--no-eval"],
            "inspect": ["inspect", str(root)]}[command]
    rc, out, err = _cli(capsys, *argv)
    assert rc == 2, (out, err)
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and shard in lines[0] and "truncated" in lines[0], err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


OMNI_CONFIG = {
    "audio_config.encoder_layers 10^9": (("audio_config", "encoder_layers"), 1_000_000_000, "encoder_layers"),
    "visual_config.depth -1": (("visual_config", "depth"), -1, "depth"),
    "flow num_mid_blocks 10^6": (("flow_matching_config", "num_mid_blocks"), 10**6, "num_mid_blocks"),
    "flow channels a number": (("flow_matching_config", "channels"), 256, "channels"),
    "codebook_sizes a number": (("audio_config", "vq_config", "codebook_sizes"), 8, "codebook_sizes"),
    "codebook_sizes 10^4 entries": (("audio_config", "vq_config", "codebook_sizes"), [4] * 10_000, "codebook_sizes"),
    "audio d_model 0": (("audio_config", "d_model"), 0, "d_model"),
    "visual patch_size 'x'": (("visual_config", "patch_size"), "x", "patch_size"),
}


@pytest.mark.parametrize("case", sorted(OMNI_CONFIG))
def test_omni_config_corpus(case):
    """Section values that size the omni stage tables are refused by name before any table is built."""
    import copy

    from omni_edge.config import parse_config
    from omni_edge.testing import tiny_config
    path, value, needle = OMNI_CONFIG[case]
    d = copy.deepcopy(tiny_config(_ids_for_tiny(), 300))
    parse_config(copy.deepcopy(d))  # the unmodified config parses
    node = d
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    t0 = time.time()
    _one_line_error(lambda: parse_config(d), needle)
    assert time.time() - t0 < 2
    assert len(OMNI_CONFIG) == 8


def _ids_for_tiny():
    from omni_edge.testing import _tokenizer_json, special_token_ids
    return special_token_ids(_tokenizer_json("bytelevel"))


def test_finite_check_is_exact_where_the_quick_sum_overflows():
    """The quick check is one fp32 sum; a sum that overflows on finite values must not be taken for corruption,
    and a NaN or Inf must be found (and its position named) in any dtype."""
    from omni_edge.checkpoint import check_finite
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        big = torch.full((1000,), float(torch.finfo(dtype).max) / 2, dtype=dtype)
        check_finite("big", big)  # finite values whose sum overflows: accepted
        for bad in (float("nan"), float("inf"), -float("inf")):
            t = big.clone()
            t[617] = bad
            _one_line_error(lambda: check_finite("w", t), "tensor w", "flat index 617")


def test_dispatch_reset_takes_its_device():
    from omni_edge.ops import _dispatch
    saved = dict(_dispatch._results)
    try:
        _dispatch._results["GPU X|sm_87|omni-edge 0"] = {"q4": {"ok": True, "error": ""}}
        _dispatch.reset(torch.device("cpu"))  # no CPU results are kept: nothing of the GPUs' is forgotten
        assert "GPU X|sm_87|omni-edge 0" in _dispatch._results
        _dispatch.reset()
        assert _dispatch._results == {}
    finally:
        _dispatch._results.update(saved)


def test_plan_validity_belongs_to_its_backbone():
    """Rebinding a layer of one backbone invalidates that backbone's decode plan only (no module-global epoch)."""
    from omni_edge import backbone as backbone_mod
    from omni_edge.backbone import Backbone
    from omni_edge.config import BackboneConfig
    from omni_edge.testing import backbone_tensors
    assert not hasattr(backbone_mod, "_layer_epoch")
    cfg = BackboneConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         head_dim=8, intermediate_size=24, vocab_size=40, rope_theta=1e4, rms_norm_eps=1e-6,
                         torch_dtype="float32").validate()
    a = Backbone.from_tensors(cfg, backbone_tensors(cfg, seed=0))
    b = Backbone.from_tensors(cfg, backbone_tensors(cfg, seed=1))
    before_a, before_b = a._layers_version(), b._layers_version()
    layer = a.layers[1]
    layer.replace_linear("mlp.up_proj", layer.linear("mlp.up_proj"))
    assert a._layers_version() != before_a and b._layers_version() == before_b
