"""The lm_head in its stored precision and its quantized forms: the fp16 / bf16 / q8 GEMV kernels against torch,
the native step's logits against the torch lm_head, `quantize --lm-head` bundles end to end, and the errors.

Tolerances.
- GEMV kernels (fp16 / bf16 / q8 weights, fp32 x): the weight converts to fp32 exactly (a q8 value is an fp16
  scale times an integer below 2^7: 11 + 7 significant bits), so the only error is fp32 accumulation over K,
  compared with the float64 product of the same upcast weight: |err| <= 1e-6 * sum_k |w x| (the bound the fp32
  GEMV test uses; blocked sums stay far below K * 2^-24).
- Native step logits vs torch: the same hidden state (bit-identical: same layer kernels) times the same weight;
  the logits differ by fp32 summation order only: 1e-5 of max |logit|.
- quantize_q8 round trip: |W - dequantized| <= scale / 2 per element (round to nearest with the stored scale).
- Greedy replies: identical tokens between the native-logits path and the Python forward + logits path.
"""

import json

import pytest
import torch

from omni_edge import _native, knobs
from omni_edge.backbone import LM_HEAD_FORMATS, Backbone
from omni_edge.checkpoint import Checkpoint
from omni_edge.config import BackboneConfig
from omni_edge.ops import gemv, q4
from omni_edge.testing import backbone_tensors, cpu_isa_levels

if not _native.available():
    pytest.skip("native extension not built", allow_module_level=True)

pytestmark = pytest.mark.usefixtures("native_decode")

SHAPES = [(1, 1), (3, 5), (7, 17), (9, 31), (33, 100), (129, 577), (211, 48), (100, 1536), (37, 96)]
CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


@pytest.fixture
def isa_levels(restore_isa):
    return list(cpu_isa_levels())


def _bound_ok(y, ref, mag):
    err = (y.double() - ref).abs()
    return bool((err <= 1e-6 * mag + 1e-30).all()), float(err.max())


@pytest.mark.parametrize("threads", [1, 2])
def test_gemv_16bit_weights_every_isa(isa_levels, threads):
    lib = _native.lib()
    prev = lib.num_threads()
    lib.set_num_threads(threads)
    gen = torch.Generator().manual_seed(11)
    try:
        for isa in isa_levels:
            lib.set_isa_cap(isa)
            for dt in (torch.float16, torch.bfloat16):
                for n, k in SHAPES:
                    w = torch.randn(n, k, generator=gen).to(dt)
                    x = torch.randn(k, generator=gen)
                    for bias in (None, torch.randn(n, generator=gen)):
                        y = torch.full((n,), float("nan"))
                        lib.gemv_cpu(w.data_ptr(), CODE[dt], x.data_ptr(), 0 if bias is None else bias.data_ptr(),
                                     n, k, y.data_ptr())
                        wd = w.double()
                        ref = wd @ x.double() + (0 if bias is None else bias.double())
                        mag = wd.abs() @ x.double().abs() + (0 if bias is None else bias.double().abs())
                        ok, e = _bound_ok(y, ref, mag)
                        assert ok, (isa, dt, n, k, e)
    finally:
        lib.set_num_threads(prev)


@pytest.mark.parametrize("threads", [1, 2])
def test_gemv_q8_every_isa(isa_levels, threads):
    """q8 kernel vs the float64 product of its dequantized weight, blocks 32, 8, 5 (tails inside a row) and K."""
    lib = _native.lib()
    prev = lib.num_threads()
    lib.set_num_threads(threads)
    gen = torch.Generator().manual_seed(12)
    try:
        for isa in isa_levels:
            lib.set_isa_cap(isa)
            for n, k in SHAPES:
                wf = torch.randn(n, k, generator=gen)
                x = torch.randn(k, generator=gen)
                for block in (32, 8, 5, -1):
                    w = gemv.quantize_q8(wf, block, bias=torch.randn(n, generator=gen) if block == 8 else None)
                    y = torch.full((n,), float("nan"))
                    lib.gemv_q8_cpu(w.codes.data_ptr(), w.scales.data_ptr(), w.block, x.data_ptr(),
                                    0 if w.bias is None else w.bias.data_ptr(), n, k, y.data_ptr())
                    wd = w.dequantize().double()
                    b = 0 if w.bias is None else w.bias.double()
                    ok, e = _bound_ok(y, wd @ x.double() + b, wd.abs() @ x.double().abs() + abs(b))
                    assert ok, (isa, n, k, block, e)
                    # the op (native, row by row) and its torch reference
                    y_op = gemv.q8_matmul(x[None], w, exact=True)[0]
                    y_ref = gemv.q8_matmul_ref(x[None], w)[0]
                    ok, e = _bound_ok(y_op, y_ref.double(), 2 * (wd.abs() @ x.double().abs() + abs(b)))
                    assert ok, (isa, n, k, block, "op vs ref", e)
                    if k % 32 == 0 and (block == -1 or block % 32 == 0):
                        # int8 activations: the exact product with the quantized x (d * xi, as the q4 INT8 mode)
                        xh = gemv.quantize_activations_ref(x).double()
                        y8 = torch.full((n,), float("nan"))
                        lib.gemv_q8_cpu(w.codes.data_ptr(), w.scales.data_ptr(), w.block, x.data_ptr(),
                                        0 if w.bias is None else w.bias.data_ptr(), n, k, y8.data_ptr(), 1)
                        ok, e = _bound_ok(y8, wd @ xh + b, 2 * (wd.abs() @ xh.abs() + abs(b)))
                        assert ok, (isa, n, k, block, "int8 activations", e)
                        assert not torch.equal(y8, y), "the int8 path must have run"
    finally:
        lib.set_num_threads(prev)


def test_quantize_q8_round_trip_and_zero_block():
    gen = torch.Generator().manual_seed(13)
    w = torch.randn(37, 70, generator=gen) * 3
    w[5, 32:64] = 0  # an all-zero block
    for block in (32, 7, -1):
        q = gemv.quantize_q8(w, block)
        assert q.codes.dtype == torch.int8 and q.scales.dtype == torch.float16
        assert int(q.codes.abs().max()) <= 127
        s = q.scales.float().repeat_interleave(q.block, 1)[:, :70]
        assert bool(((w - q.dequantize()).abs() <= s / 2 + 1e-12).all()), block
    q = gemv.quantize_q8(w, 32)
    assert float(q.scales[5, 1]) == 0.0 and int(q.codes[5, 32:64].abs().sum()) == 0


def test_gemv_errors():
    lib = _native.lib()
    x = torch.zeros(4)
    y = torch.zeros(3)
    w = torch.zeros(3, 4, dtype=torch.float16)
    with pytest.raises(ValueError, match="weight dtype must be"):
        lib.gemv_cpu(w.data_ptr(), 7, x.data_ptr(), 0, 3, 4, y.data_ptr())
    with pytest.raises(ValueError, match="block must be >= 1"):
        lib.gemv_q8_cpu(w.data_ptr(), w.data_ptr(), 0, x.data_ptr(), 0, 3, 4, y.data_ptr())
    with pytest.raises(ValueError, match="activation mode must be 0"):
        lib.gemv_q8_cpu(w.data_ptr(), w.data_ptr(), 4, x.data_ptr(), 0, 3, 4, y.data_ptr(), 2)
    with pytest.raises(ValueError, match=r"x: expected shape \(\.\.\., 4\)"):
        gemv.matmul(torch.zeros(5), w)
    with pytest.raises(ValueError, match="block: expected"):
        gemv.quantize_q8(torch.zeros(3, 4), 0)
    with pytest.raises(ValueError, match="scales: expected shape"):
        gemv.Q8Weight(torch.zeros(3, 64, dtype=torch.int8), torch.zeros(3, 1, dtype=torch.float16), 32)


# ------------------------------------------------------------------------------------------------
# The native step's logits
# ------------------------------------------------------------------------------------------------

def _cfg(tied: bool = False, vocab: int = 216, packed: bool = True) -> BackboneConfig:
    return BackboneConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
                          head_dim=16, intermediate_size=96, vocab_size=vocab, rope_theta=1e4, rms_norm_eps=1e-6,
                          max_position_embeddings=256, qkv_bias=True, packed_qkv=packed, tie_word_embeddings=tied,
                          torch_dtype="float32")


@pytest.mark.parametrize("fmt", LM_HEAD_FORMATS)
@torch.no_grad()
def test_native_logits_match_torch(fmt, q4_exact):
    """decode_step (one native step with the lm_head) against forward + the float64 product of the lm_head's
    own weight (its dequantized form for q8 / q4), over 12 steps; and against the Python-path logits."""
    cfg = _cfg()
    bb = Backbone.from_tensors(cfg, backbone_tensors(cfg), quant="rtn4")
    bb.quantize_lm_head(fmt)
    assert bb.lm_head.format == fmt
    ids = torch.randint(0, cfg.vocab_size, (1, 16), generator=torch.Generator().manual_seed(4))
    w = bb.lm_head.dense_weight().double()

    def run(native: bool):
        knobs.set("native_decode", native)
        bb.allocate_cache(20)
        bb.forward(ids[:, :4], start=0)
        return [_step(bb, ids[:, i:i + 1], i) for i in range(4, 16)]

    nat, py = run(True), run(False)
    for (h, lg), (h_py, lg_py) in zip(nat, py):
        assert lg.shape == (cfg.vocab_size,) and lg.dtype == torch.float32
        ref = h[0, 0].double() @ w.t()
        tol = 1e-5 * float(ref.abs().max())
        assert float((lg.double() - ref).abs().max()) <= tol, fmt
        assert float((h - h_py).abs().max()) <= 1e-5 * float(h_py.abs().max())
        assert float((lg - lg_py).abs().max()) <= 1e-4 * float(ref.abs().max())


@torch.no_grad()
def test_decode_step_is_one_native_call(monkeypatch):
    """With a 16-bit lm_head the whole token runs in the plan: neither forward nor the torch lm_head is called."""
    cfg = _cfg()
    bb = Backbone.from_tensors(cfg, backbone_tensors(cfg))
    bb.quantize_lm_head("fp16")
    knobs.set("native_decode", True)
    bb.allocate_cache(8)
    bb.forward(torch.tensor([[1, 2, 3]]), start=0)
    calls = []
    monkeypatch.setattr(Backbone, "forward", lambda *a, **k: calls.append("forward"))
    monkeypatch.setattr(Backbone, "logits", lambda *a, **k: calls.append("logits"))
    h, lg = _step(bb, torch.tensor([[4]]), 3)
    assert calls == [] and bb._plan_head and lg.shape == (cfg.vocab_size,)


@torch.no_grad()
def test_16bit_embedding_stays_16bit(tmp_path):
    """A checkpoint stored in fp16: on the CPU under fp32 activations the embedding and lm_head stay fp16 (no
    fp32 copy); the lookup gives fp32 rows; the hidden states equal those of an fp32 load of the same values."""
    from safetensors.torch import save_file
    cfg = _cfg(packed=False)  # the plain Qwen2 layout (q/k/v with bias) of an hf config.json
    t = {k: v.half() for k, v in backbone_tensors(cfg).items()}
    save_file(t, str(tmp_path / "model.safetensors"))
    raw = {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_size": 48, "num_hidden_layers": 2,
           "num_attention_heads": 6, "num_key_value_heads": 2, "intermediate_size": 96, "vocab_size": 216,
           "head_dim": 16, "rope_theta": 1e4, "rms_norm_eps": 1e-6, "max_position_embeddings": 256, "tie_word_embeddings": False,
           "torch_dtype": "float16"}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    ckpt = Checkpoint.open(tmp_path)
    bb = Backbone.from_checkpoint(ckpt)
    assert bb.embed_tokens.dtype == torch.float16 and bb.lm_head.weight.dtype == torch.float16
    assert bb.dtype == torch.float32 and bb.embed(torch.tensor([[3]])).dtype == torch.float32
    ref = Backbone.from_tensors(cfg, {k: v.float() for k, v in t.items()})
    ids = torch.tensor([[5, 9, 2, 7]])
    for b in (bb, ref):
        b.allocate_cache(8)
    h, h_ref = bb.forward(ids, start=0), ref.forward(ids, start=0)
    assert torch.equal(h, h_ref)  # same fp32 values, same kernels
    lg, lg_ref = _step(bb, torch.tensor([[1]]), 4), _step(ref, torch.tensor([[1]]), 4)
    assert torch.equal(lg[0], lg_ref[0])
    assert float((lg[1] - lg_ref[1]).abs().max()) <= 1e-5 * float(lg_ref[1].abs().max())


def test_lm_head_format_errors():
    cfg = _cfg(vocab=211)
    bb = Backbone.from_tensors(cfg, backbone_tensors(cfg))
    with pytest.raises(ValueError, match="lm_head format: expected one of"):
        bb.quantize_lm_head("q3")
    with pytest.raises(ValueError, match="multiple of 8 rows, got 211; use q8"):
        bb.quantize_lm_head("q4")
    bb.quantize_lm_head("q8")  # any vocabulary
    bb.allocate_cache(4)
    with pytest.raises(ValueError, match=r"input_ids: expected shape \(1, 1\)"):
        _step(bb, torch.tensor([[1, 2]]), 0)


# ------------------------------------------------------------------------------------------------
# Bundles: omni-edge quantize --lm-head
# ------------------------------------------------------------------------------------------------

FAST = dict(method="rtn", nsamples=4, seqlen=32, heldout_max_tokens=32, progress=False)


@pytest.fixture(scope="module")
def qwen2_srcs(tmp_path_factory):
    from tiny_hf import write_tiny_qwen2
    root = tmp_path_factory.mktemp("lmh")
    return {tied: write_tiny_qwen2(root / f"src{int(tied)}", tie_word_embeddings=tied, layers=1)
            for tied in (False, True)}


def _stored_head(out, fmt):
    """The (V, C) lm_head a bundle holds, decoded from its tensors by the pack functions (not the loader)."""
    from safetensors import safe_open
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        t = {k: f.get_tensor(k) for k in f.keys()}
    qc = json.loads((out / "config.json").read_text())["quantization_config"].get("omni_edge_lm_head")
    if fmt == "q8":
        b = qc["block"]
        return t["lm_head.q8_scales"].float().repeat_interleave(b, 1)[:, :t["lm_head.q8_codes"].shape[1]] \
            * t["lm_head.q8_codes"].float()
    if fmt == "q4":
        q, z = q4.unpack_gptq(t["lm_head.qweight"], t["lm_head.qzeros"], checkpoint_format=qc["checkpoint_format"])
        g = t["lm_head.g_idx"].long()
        return ((q.float() - z[g].float()) * t["lm_head.scales"].float()[g]).t()
    return t.get("lm_head.weight", t["model.embed_tokens.weight"]).float()


@pytest.mark.slow  # six tiny quantize runs
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("fmt", ["fp16", "q8", "q4"])
@torch.no_grad()
def test_bundle_round_trip(qwen2_srcs, tmp_path, fmt, tied, q4_exact):
    from omni_edge import bundle
    from omni_edge.quantize.build import QuantizeOptions, quantize_checkpoint
    src = qwen2_srcs[tied]
    out = tmp_path / "b"
    m = quantize_checkpoint(src, out, QuantizeOptions(group_size=32, lm_head=fmt, heldout=fmt == "q8", **FAST),
                            log=lambda s: None)
    # manifest and config record it
    assert m["quantization"]["lm_head"]["format"] == fmt
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (qc.get("omni_edge_lm_head") or {"format": "fp16"})["format"] == fmt
    assert m["modules"]["lm_head" if (fmt != "fp16" or not tied) else "backbone"]["files"] == ["model.safetensors"]
    if fmt == "q8":
        assert m["report"]["perplexity"]["quantized"] > 1.0
    assert bundle.verify(out)["ok"]
    from omni_edge.cli import main
    assert main(["verify", str(out)]) == 0 and main(["inspect", str(out)]) == 0
    ckpt = Checkpoint.open(out)
    assert ckpt.lm_head_format() == {"fp16": "dense"}.get(fmt, fmt)
    assert ckpt.unknown() == []
    bb = Backbone.from_checkpoint(ckpt)
    assert bb.lm_head.format == fmt and bb.embed_tokens.dtype == torch.float16
    w = _stored_head(out, fmt)
    assert torch.equal(bb.lm_head.dense_weight().float(), w)
    # the source's weight, rounded as documented (q8: half a step; q4: checked via its own grid in test_q4)
    from safetensors import safe_open
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        srcw = f.get_tensor("model.embed_tokens.weight" if tied else "lm_head.weight")
    if fmt == "q8":
        s = bb.lm_head.q8.scales.float().repeat_interleave(bb.lm_head.q8.block, 1)[:, :srcw.shape[1]]
        assert bool(((srcw - w).abs() <= s / 2 + 1e-12).all())
    # native logits = the stored weight's logits
    bb.allocate_cache(8)
    knobs.set("native_decode", True)
    bb.forward(torch.tensor([[3, 4, 5]]), start=0)
    h, lg = _step(bb, torch.tensor([[6]]), 3)
    assert bb._plan_head
    ref = h[0, 0].double() @ w.double().t()
    assert float((lg.double() - ref).abs().max()) <= 1e-5 * float(ref.abs().max())


def test_bad_lm_head_values(qwen2_srcs, tmp_path, capsys):
    from omni_edge.quantize.build import QuantizeOptions, quantize_checkpoint
    with pytest.raises(ValueError, match="--lm-head must be one of fp16, q8, q4, got 'q3'"):
        quantize_checkpoint(qwen2_srcs[False], tmp_path / "x", QuantizeOptions(lm_head="q3", **FAST))
    from omni_edge.cli import main
    with pytest.raises(SystemExit) as e:
        main(["quantize", str(qwen2_srcs[False]), str(tmp_path / "y"), "--lm-head", "int8"])
    assert e.value.code == 2 and "--lm-head: invalid choice: 'int8'" in capsys.readouterr().err


@torch.no_grad()
def test_checkpoint_refuses_inconsistent_q8_head(tmp_path):
    """q8 tensors without the config entry, or with scales of the wrong shape: clear errors at open."""
    from safetensors.torch import save_file
    cfg = _cfg(packed=False)
    t = backbone_tensors(cfg)
    w = gemv.quantize_q8(t.pop("lm_head.weight"), 32)
    t["lm_head.q8_codes"], t["lm_head.q8_scales"] = w.codes, w.scales
    save_file(t, str(tmp_path / "model.safetensors"))
    raw = {"model_type": "qwen2", "hidden_size": 48, "num_hidden_layers": 2, "num_attention_heads": 6,
           "num_key_value_heads": 2, "intermediate_size": 96, "vocab_size": 216, "head_dim": 16, "rope_theta": 1e4,
           "rms_norm_eps": 1e-6, "max_position_embeddings": 256, "tie_word_embeddings": False}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="no omni_edge_lm_head of format q8"):
        Checkpoint.open(tmp_path)
    qc = {"quant_method": "gptq", "bits": 4, "group_size": 32, "omni_edge_lm_head": {"format": "q8", "block": 16}}
    (tmp_path / "config.json").write_text(json.dumps(dict(raw, quantization_config=qc)))
    with pytest.raises(ValueError, match=r"lm_head.q8_scales: expected shape \(216, 3\), got \(216, 2\)"):
        Checkpoint.open(tmp_path)
    qc["omni_edge_lm_head"] = {"format": "q8", "block": 32}
    (tmp_path / "config.json").write_text(json.dumps(dict(raw, quantization_config=qc)))
    bb = Backbone.from_checkpoint(Checkpoint.open(tmp_path))
    assert bb.lm_head.format == "q8" and torch.equal(bb.lm_head.q8.codes, w.codes)
    qc["omni_edge_lm_head"] = {"format": "q7"}
    (tmp_path / "config.json").write_text(json.dumps(dict(raw, quantization_config=qc)))
    with pytest.raises(ValueError, match="omni_edge_lm_head: expected an object with \"format\" fp16, q8 or q4"):
        Checkpoint.open(tmp_path)


# ------------------------------------------------------------------------------------------------
# Generation: the native-logits path against the Python path
# ------------------------------------------------------------------------------------------------

@pytest.mark.slow  # two models' worth of greedy replies
@pytest.mark.parametrize("fmt", ["fp16", "q8"])
@torch.no_grad()
def test_chat_greedy_identical_native_and_python(tiny_omni, fmt, monkeypatch):
    """ChatSession greedy replies (the generate loop) with the lm_head in the native step vs forward + logits:
    the same tokens and the same on_hidden states; the native run calls forward only for the prefill."""
    from omni_edge import pipeline
    from omni_edge.generate import SamplingParams
    model = pipeline.load(tiny_omni, max_context=256)
    model.backbone.quantize_lm_head(fmt)
    params = SamplingParams(temperature=0.0, max_new_tokens=20, repetition_penalty=1.0)
    calls = []
    orig = Backbone.forward
    monkeypatch.setattr(Backbone, "forward", lambda self, *a, **k: calls.append(1) or orig(self, *a, **k))

    def reply(native: bool):
        knobs.set("native_decode", native)
        calls.clear()
        hs = []
        r = model.session(seed=0).send("hello there", params, on_hidden=lambda h: hs.append(h.clone()))
        return r, hs, len(calls)

    r_py, h_py, n_py = reply(False)
    r_nat, h_nat, n_nat = reply(True)
    assert len(r_py.ids) >= 5 and r_nat.ids == r_py.ids
    assert n_py == n_nat + len(r_py.ids) - (r_py.finish_reason == "length")
    assert len(h_nat) == len(h_py)
    for a, b in zip(h_nat, h_py):
        assert float((a - b).abs().max()) <= 1e-5 * float(b.abs().max())


def _step(bb, ids, start):
    """Backbone.decode_step for one token: (hidden (1, 1, C), logits (V,))."""
    h, lg = bb.decode_step(ids, start=start)
    return h, lg[0]
