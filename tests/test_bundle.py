"""End-to-end quantize into edge bundles (tiny omni checkpoint, tiny HF Qwen2), the manifest and its validation,
atomic writing, calibration input handling and the `omni-edge quantize` command."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from omni_edge import bundle
from omni_edge.ops import q4
from omni_edge.quantize import build, calibration
from omni_edge.quantize.build import QuantizeOptions, quantize_checkpoint

from tiny_hf import write_tiny_qwen2

# lm_head fp16: these tests check the plain GPTQ layout (q8 / q4 lm_heads: tests/test_lm_head.py)
FAST = dict(nsamples=8, seqlen=64, heldout_max_tokens=48, progress=False, lm_head="fp16")


def quiet(_):
    pass


@pytest.fixture(scope="module")
def qwen2_src(tmp_path_factory):
    return write_tiny_qwen2(tmp_path_factory.mktemp("qwen2") / "src")


@pytest.fixture(scope="module")
def omni_bundle(tiny_omni_bytelevel, tmp_path_factory):
    from omni_edge.testing import write_tiny_vocoder

    root = tmp_path_factory.mktemp("omni")
    _, hift = write_tiny_vocoder(root / "vocoder")  # the CosyVoice-style hift.pt (weight-norm pairs, torch.save)
    out = root / "bundle"
    manifest = quantize_checkpoint(tiny_omni_bytelevel, out, QuantizeOptions(group_size=32, vocoder=hift, **FAST),
                                   log=quiet)
    return out, manifest


@pytest.fixture(scope="module")
def qwen2_bundle(qwen2_src, tmp_path_factory):
    out = tmp_path_factory.mktemp("qwen2b") / "bundle"
    opts = QuantizeOptions(group_size=32, sym=False, act_order=True, **FAST)
    manifest = quantize_checkpoint(qwen2_src, out, opts, log=quiet)
    return out, manifest


def tensors_of(folder):
    names = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                names[k] = (f.name, h.get_tensor(k))
    return names


# ------------------------------------------------------------------------------------------------
# End to end
# ------------------------------------------------------------------------------------------------

def _runtime_checks(out, manifest, src):
    from omni_edge import pipeline
    from omni_edge.generate import SamplingParams
    from omni_edge.quantize.report import runtime_perplexity

    assert bundle.validate(out, deep=True) == manifest
    model = pipeline.load(out, device="cpu")
    assert all(lin.quantized for layer in model.backbone.layers for lin in layer.linears.values())
    # The runtime, reading the bundle from disk, gives the perplexity the layer-by-layer pass measured.
    held = calibration.heldout_samples(model.tokenizer.encode, max_tokens=FAST["heldout_max_tokens"])
    ppl = manifest["report"]["perplexity"]
    assert runtime_perplexity(model.backbone, held) == pytest.approx(ppl["quantized"], rel=1e-4)
    source = pipeline.load(src, device="cpu")
    assert runtime_perplexity(source.backbone, held) == pytest.approx(ppl["source"], rel=1e-4)
    question = "What is the capital of France?"
    # the reply is the bundle model's greedy continuation over the tokenizer's vocabulary (embedding rows past it
    # are padding the generator never samples), recomputed from position 0 for every token; both on the exact q4
    # path, since the int8-activation path rounds a decode step and a full recompute differently
    with q4.exact_mode():
        reply = model.session(seed=0).send(question, SamplingParams(temperature=0.0, max_new_tokens=8,
                                                                    repetition_penalty=1.0))
    ids, ref = list(model.prompt.render([{"role": "user", "content": question}])), []
    with torch.inference_mode(), q4.exact_mode():
        for _ in range(8):
            h = model.backbone.forward(torch.tensor([ids]), start=0)
            vocab = min(model.tokenizer.vocab_size, model.backbone.config.vocab_size)
            ref.append(int(torch.argmax(model.backbone.logits(h[:, -1])[0][:vocab])))
            ids.append(ref[-1])
    assert reply.ids == ref[:len(reply.ids)]
    assert (reply.finish_reason == "stop" and ref[len(reply.ids)] in model.prompt.stop_ids) or reply.ids == ref
    return model


@pytest.mark.usefixtures("q4_exact")
def test_omni_bundle_end_to_end(omni_bundle, tiny_omni_bytelevel):
    out, manifest = omni_bundle
    _runtime_checks(out, manifest, tiny_omni_bytelevel)
    names = tensors_of(out)
    src = tensors_of(tiny_omni_bytelevel)
    for name, (_, t) in src.items():
        if name.startswith(("audio_head.", "model.visual", "audio_tokenizer.")):  # other stages: unchanged
            assert name in names and names[name][1].dtype == t.dtype and torch.equal(names[name][1], t), name
        elif name.startswith(("model.embed_tokens", "lm_head", "model.audio_embed_layers", "model.norm")):
            assert names[name][0] == "backbone.safetensors" and torch.equal(names[name][1], t.half()), name
    assert names["model.layers.0.self_attn.W_pack.qweight"][0] == "backbone.safetensors"
    assert names["model.layers.0.self_attn.W_pack.bias"][1].dtype == torch.float16
    assert "model.layers.0.self_attn.W_pack.weight" not in names
    assert manifest["modules"]["audio_head"]["files"] == ["audio_head.safetensors"]
    assert manifest["modules"]["backbone"]["quantized"] and not manifest["modules"]["visual"]["quantized"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["bits"] == 4 and cfg["quantization_config"]["group_size"] == 32
    assert (out / "tokenizer.json").read_bytes() == (Path(tiny_omni_bytelevel) / "tokenizer.json").read_bytes()
    ids = manifest["token_ids"]["added_tokens"]
    assert {"<B_SYS>", "<C_Q>", "<C_A>", "<|endoftext|>"} <= set(ids)
    assert manifest["quantization"]["calibration"]["wrapped_as"].endswith("(baichuan)")
    assert manifest["source"]["fingerprint"].startswith("sha256:")
    # the vocoder came along, checked, folded and as safetensors; the runtime finds it there
    assert manifest["modules"]["vocoder"]["files"] == ["vocoder.safetensors"] and "vocoder.safetensors" in manifest["files"]
    from omni_edge import pipeline
    from omni_edge.vocoder import Vocoder
    m = pipeline.load(out, max_context=64)
    assert m.vocoder_path == str(out / "vocoder.safetensors")
    m.check_speech()
    assert isinstance(m.stage("vocoder"), Vocoder)


@pytest.mark.usefixtures("q4_exact")
def test_hf_bundle_is_a_gptq_checkpoint(qwen2_bundle, qwen2_src):
    out, manifest = qwen2_bundle
    _runtime_checks(out, manifest, qwen2_src)
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    names = tensors_of(out)
    src = tensors_of(qwen2_src)
    for name in src:  # every source name survives, linears as their GPTQ parts
        if name.endswith("_proj.weight") and ".layers." in name:
            base = name[: -len(".weight")]
            assert {base + s for s in (".qweight", ".qzeros", ".scales", ".g_idx")} <= set(names)
        else:
            assert name in names, name
    k, n = src["model.layers.0.mlp.down_proj.weight"][1].shape[::-1]
    assert names["model.layers.0.mlp.down_proj.qweight"][1].shape == (k // 8, n)
    assert names["model.layers.0.mlp.down_proj.qzeros"][1].shape == (k // 32, n // 8)
    assert names["model.layers.0.self_attn.q_proj.bias"][1].dtype == torch.float16
    cfg = json.loads((out / "config.json").read_text())
    qc = cfg["quantization_config"]
    # asymmetric grids default to gptq_v2 (other tools refuse asymmetric v1 from other producers)
    assert (qc["quant_method"], qc["checkpoint_format"], qc["bits"], qc["desc_act"], qc["sym"]) == \
        ("gptq", "gptq_v2", 4, True, False)
    assert cfg["dtype"] == "float16"
    from transformers import AutoConfig  # transformers reads it as a GPTQ config
    assert AutoConfig.from_pretrained(out).quantization_config["bits"] == 4


@pytest.mark.usefixtures("q4_exact")
def test_asym_v1_on_request(qwen2_src, tmp_path):
    from omni_edge import pipeline
    from omni_edge.quantize.report import runtime_perplexity

    out = tmp_path / "v1"
    m = quantize_checkpoint(qwen2_src, out, QuantizeOptions(group_size=32, sym=False, checkpoint_format="gptq",
                                                            **FAST), log=quiet)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["checkpoint_format"] == "gptq"
    model = pipeline.load(out)
    held = calibration.heldout_samples(model.tokenizer.encode, max_tokens=FAST["heldout_max_tokens"])
    assert runtime_perplexity(model.backbone, held) == pytest.approx(m["report"]["perplexity"]["quantized"], rel=1e-4)


def test_one_decoder_layer_in_memory_at_a_time(qwen2_src, tmp_path, monkeypatch):
    import gc
    import weakref

    from omni_edge.backbone import DecoderLayer
    from omni_edge.quantize import sequential

    alive = weakref.WeakSet()
    real = DecoderLayer.from_checkpoint.__func__
    peak = []

    def tracking(cls, *args, **kw):
        gc.collect()
        peak.append(len(alive))  # layers still alive when the next one is loaded
        layer = real(cls, *args, **kw)
        alive.add(layer)
        return layer

    monkeypatch.setattr(sequential.DecoderLayer, "from_checkpoint", classmethod(tracking))
    quantize_checkpoint(qwen2_src, tmp_path / "b", QuantizeOptions(group_size=32, **FAST), log=quiet)
    assert len(peak) == 2 and max(peak) == 0


def test_deterministic_for_a_seed(qwen2_src, qwen2_bundle, tmp_path):
    out, manifest = qwen2_bundle
    again = quantize_checkpoint(qwen2_src, tmp_path / "again",
                                QuantizeOptions(group_size=32, sym=False, act_order=True, **FAST), log=quiet)
    assert again["files"]["model.safetensors"]["sha256"] == manifest["files"]["model.safetensors"]["sha256"]


def test_rtn_method_and_report(qwen2_src, qwen2_bundle, tmp_path):
    _, gptq = qwen2_bundle
    rtn = quantize_checkpoint(qwen2_src, tmp_path / "rtn",
                              QuantizeOptions(group_size=32, sym=False, act_order=True, method="rtn", **FAST),
                              log=quiet)
    assert rtn["quantization"]["method"] == "rtn"
    g, r = gptq["report"], rtn["report"]
    assert g["mean_output_error"] < r["mean_output_error"]
    for lg, lr in zip(g["layers"], r["layers"]):
        for name in lg["linears"]:
            assert lg["linears"][name] < lr["linears"][name], (lg["layer"], name)
    from omni_edge.quantize.report import format_report
    text = format_report(gptq)
    assert "perplexity on" in text and "down_proj" in text


# ------------------------------------------------------------------------------------------------
# Manifest validation
# ------------------------------------------------------------------------------------------------

@pytest.fixture
def bundle_copy(qwen2_bundle, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(qwen2_bundle[0], dst)
    return dst


def test_validation_missing_file(bundle_copy):
    (bundle_copy / "model.safetensors").unlink()
    with pytest.raises(bundle.BundleError, match=r"missing model\.safetensors \(module backbone"):
        bundle.validate(bundle_copy)
    from omni_edge import pipeline
    with pytest.raises(pipeline.ModelLoadError, match=r"missing model\.safetensors"):
        pipeline.load(bundle_copy)


def test_validation_truncated_file(bundle_copy):
    f = bundle_copy / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:-16])
    with pytest.raises(bundle.BundleError, match=r"model\.safetensors: \d+ bytes, the manifest says \d+"):
        bundle.validate(bundle_copy)


def test_validation_tampered_shape(bundle_copy):
    """Swap the two dims of one tensor in the safetensors header (same file size): caught by name."""
    f = bundle_copy / "model.safetensors"
    raw = bytearray(f.read_bytes())
    header = bundle.safetensors_header(f)
    name = "model.layers.1.mlp.up_proj.scales"
    a, b = header[name]["shape"]
    old = f'"{name}":{{"dtype":"F16","shape":[{a},{b}]'.encode()
    new = f'"{name}":{{"dtype":"F16","shape":[{b},{a}]'.encode()
    hlen = int.from_bytes(raw[:8], "little")
    start = raw.index(old, 0, 8 + hlen)
    raw[start:start + len(old)] = new
    f.write_bytes(bytes(raw))
    with pytest.raises(bundle.BundleError, match=rf"tensor {name} is F16 \({b}, {a}\), the manifest says F16 "
                                                 rf"\({a}, {b}\)"):
        bundle.validate(bundle_copy)


def test_validation_edited_small_file_and_config(bundle_copy):
    cfg = json.loads((bundle_copy / "config.json").read_text())
    cfg["quantization_config"]["group_size"] = 64
    (bundle_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(bundle.BundleError, match=r"config\.json: .*the file was changed"):
        bundle.validate(bundle_copy)
    # with the hash updated too, the quantization settings still disagree with the manifest
    m = json.loads((bundle_copy / bundle.MANIFEST).read_text())
    m["files"]["config.json"] = {"bytes": (bundle_copy / "config.json").stat().st_size,
                                 "sha256": bundle.sha256_of(bundle_copy / "config.json")}
    (bundle_copy / bundle.MANIFEST).write_text(json.dumps(m))
    with pytest.raises(bundle.BundleError, match=r"quantization_config\.group_size is 64, the manifest says 32"):
        bundle.validate(bundle_copy)


def test_validation_manifest_itself(bundle_copy, tmp_path):
    with pytest.raises(bundle.BundleError, match="is not an omni-edge bundle"):
        bundle.validate(tmp_path)
    m = json.loads((bundle_copy / bundle.MANIFEST).read_text())
    m["format_version"] = bundle.FORMAT_VERSION + 1
    (bundle_copy / bundle.MANIFEST).write_text(json.dumps(m))
    with pytest.raises(bundle.BundleError, match="newer than this omni-edge reads"):
        bundle.validate(bundle_copy)
    m["format_version"] = 1
    m["files"]["../escape.bin"] = {"bytes": 1}
    (bundle_copy / bundle.MANIFEST).write_text(json.dumps(m))
    with pytest.raises(bundle.BundleError, match="must be a plain path inside the bundle"):
        bundle.validate(bundle_copy)


# ------------------------------------------------------------------------------------------------
# Atomic writing
# ------------------------------------------------------------------------------------------------

def _crash_in_layer(monkeypatch, exc):
    real = build.run_sequential

    def crashing(*args, on_layer=None, **kw):
        def hook(i, tensors):
            on_layer(i, tensors)
            if i == 1:
                raise exc
        return real(*args, on_layer=hook, **kw)

    monkeypatch.setattr(build, "run_sequential", crashing)


@pytest.mark.parametrize("exc", [RuntimeError("simulated crash"), KeyboardInterrupt()])
def test_interrupted_write_leaves_no_bundle(qwen2_src, tmp_path, monkeypatch, exc):
    _crash_in_layer(monkeypatch, exc)
    out = tmp_path / "out"
    with pytest.raises(type(exc)):
        quantize_checkpoint(qwen2_src, out, QuantizeOptions(group_size=32, **FAST), log=quiet)
    assert not out.exists()
    assert os.listdir(tmp_path) == []  # no partial folder left behind either


def test_interrupted_force_keeps_the_old_bundle(qwen2_bundle, tmp_path, monkeypatch, qwen2_src):
    out = tmp_path / "b"
    shutil.copytree(qwen2_bundle[0], out)
    _crash_in_layer(monkeypatch, RuntimeError("simulated crash"))
    with pytest.raises(RuntimeError):
        quantize_checkpoint(qwen2_src, out, QuantizeOptions(group_size=32, force=True, **FAST), log=quiet)
    assert bundle.validate(out) == qwen2_bundle[1]
    assert sorted(os.listdir(tmp_path)) == ["b"]


def test_existing_output_and_force(qwen2_src, qwen2_bundle, tmp_path):
    from omni_edge.cli import main

    out = tmp_path / "b"
    shutil.copytree(qwen2_bundle[0], out)
    args = [str(qwen2_src), str(out), "--group-size", "32", "--nsamples", "4", "--seqlen", "32", "--no-eval",
            "--quiet", "--method", "rtn"]
    assert main(["quantize", *args]) == 2  # refuses to overwrite
    assert bundle.validate(out)["quantization"]["method"] == "gptq"
    assert main(["quantize", *args, "--force"]) == 0
    assert bundle.validate(out)["quantization"]["method"] == "rtn"
    other = tmp_path / "not_a_bundle"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    assert main(["quantize", *args[:1], str(other), *args[2:], "--force"]) == 2
    assert (other / "notes.txt").read_text() == "keep me"


def test_cli_errors(qwen2_src, tmp_path, capsys):
    from omni_edge.cli import main

    assert main(["quantize", str(qwen2_src), str(tmp_path / "o"), "--group-size", "0", "--quiet"]) == 2
    assert "--group-size must be -1 (per-channel) or positive" in capsys.readouterr().err
    assert main(["quantize", str(tmp_path / "nope"), str(tmp_path / "o")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert main(["quantize", str(qwen2_src), str(Path(qwen2_src) / "inside")]) == 2
    assert "must lie outside SRC" in capsys.readouterr().err
    bad = tmp_path / "calib.jsonl"
    bad.write_text('{"text": "fine"}\n{"txt": "oops"}\n')
    assert main(["quantize", str(qwen2_src), str(tmp_path / "o"), "--group-size", "32", "--calib", str(bad)]) == 2
    assert "calib.jsonl line 2: missing the \"text\" field" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------------
# Calibration input
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("content,message", [
    ('{"text": "a"}\n{"text": "b"\n', "line 2: not valid JSON"),
    ('{"text": "a"}\n\n["text"]\n', "line 3: expected a JSON object"),
    ('{"text": 5}\n', "line 1: \"text\" must be a string"),
    ('{"text": "  "}\n', "line 1: \"text\" is empty"),
    ('\n\n', "no texts"),
])
def test_calib_file_errors(tmp_path, content, message):
    f = tmp_path / "c.jsonl"
    f.write_text(content)
    with pytest.raises(ValueError, match=message):
        calibration.read_jsonl(f)


def test_calib_file_not_utf8(tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n')
    with pytest.raises(ValueError, match="line 2: not valid UTF-8"):
        calibration.read_jsonl(f)


def test_builtin_sets_are_bilingual_and_disjoint():
    cal, held = calibration.builtin_calibration_texts(), calibration.builtin_heldout_texts()
    assert len(cal) >= 64 and len(held) >= 16
    assert not set(cal) & set(held)
    cjk = lambda t: any("\u4e00" <= c <= "\u9fff" for c in t)
    for texts in (cal, held):
        zh = sum(map(cjk, texts))
        assert 0.3 < zh / len(texts) < 0.7
    # no long passage shared between the two sets either
    grams = {t[i:i + 40] for t in cal for i in range(0, max(1, len(t) - 40), 20)}
    assert not any(t[i:i + 40] in grams for t in held for i in range(len(t) - 40))


def test_calibration_samples_are_user_turns_and_seeded(tiny_omni_bytelevel):
    from omni_edge.tokenizer import Tokenizer, prompt_format

    tok = Tokenizer.from_dir(tiny_omni_bytelevel)
    prompt = prompt_format(tok, "omni")
    render = lambda text: prompt.render([{"role": "user", "content": text}])
    a = calibration.build_calibration(render, nsamples=5, seqlen=10_000, seed=1)
    b = calibration.build_calibration(render, nsamples=5, seqlen=10_000, seed=1)
    c = calibration.build_calibration(render, nsamples=5, seqlen=10_000, seed=2)
    assert a.samples == b.samples and a.samples != c.samples
    b_sys, c_q, c_a = (tok.token_id(t) for t in ("<B_SYS>", "<C_Q>", "<C_A>"))
    for s in a.samples:
        assert s[:2] == [b_sys, c_q] and s[-1] == c_a
    short = calibration.build_calibration(render, nsamples=3, seqlen=16, seed=1)
    assert all(len(s) == 16 for s in short.samples)
    many = calibration.build_calibration(render, nsamples=10_000, seqlen=16, seed=1)
    assert len(many.samples) == len(calibration.builtin_calibration_texts()) and many.notes
