"""The native CPU decode step (csrc/decode, `Backbone` with B == 1, T == 1, fp32) against the Python layer loop
it replaces, the dense GEMV against torch at every ISA level, and the error paths.

Tolerances. Both paths run the same q4 and attention kernels on the same inputs; they differ only in fp32
summation order (dense matmuls: torch's GEMV vs ours; RMSNorm's sum of squares), ~1e-7 relative per op. Over
the layers and 20+ decode steps that stays below 1e-5 of the hidden state's magnitude, the bound used here
(measured: < 2e-6). In the q4 INT8 mode an activation sitting on a rounding boundary of its int8 grid could
round differently after such a 1-ulp difference; that did not happen on these inputs, and the same 1e-5
bound holds there too. Greedy tokens must be identical."""


import pytest
import torch

from omni_edge import _native, knobs
from omni_edge.backbone import Backbone
from omni_edge.checkpoint import Checkpoint
from omni_edge.config import BackboneConfig
from omni_edge.ops import q4
from omni_edge.testing import backbone_tensors, cpu_isa_levels

if not _native.available():
    pytest.skip("native extension not built", allow_module_level=True)

TOL = 1e-5  # relative to max |h| (see the module docstring)
pytestmark = pytest.mark.usefixtures("native_decode")  # conftest: the native_decode switch is restored after each test


def _cfg(packed: bool, bias: bool = True) -> BackboneConfig:
    # odd-ish tiny widths, GQA 6/2, head_dim 16, K of the MLP down_proj (96) not a multiple of 64
    return BackboneConfig(hidden_size=48, num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=2,
                          head_dim=16, intermediate_size=96, vocab_size=211, rope_theta=1e4, rms_norm_eps=1e-6,
                          max_position_embeddings=256, qkv_bias=bias, packed_qkv=packed, tie_word_embeddings=False,
                          torch_dtype="float32")


_tensors = backbone_tensors  # omni_edge.testing (shared with the self-check)


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


class _Counter:
    """Counts native steps (so a test cannot pass by silently running the Python loop twice)."""

    def __init__(self, monkeypatch):
        self.n = 0
        orig = Backbone._native_step

        def counted(bb, h, start):
            self.n += 1
            return orig(bb, h, start)

        monkeypatch.setattr(Backbone, "_native_step", counted)


def _run(bb: Backbone, ids: torch.Tensor, prompt: int, native: bool, monkeypatch):
    """Prefill `prompt` tokens (Python path), then teacher-forced decode of the rest one token at a time."""
    knobs.set("native_decode", native)
    bb.allocate_cache(ids.shape[1] + 3)
    bb.forward(ids[:, :prompt], start=0)
    hs = [bb.forward(ids[:, i:i + 1], start=i) for i in range(prompt, ids.shape[1])]
    return torch.cat(hs, 1), bb.kv_cache[0].clone(), bb.kv_cache[1].clone()


@pytest.mark.parametrize("packed", [True, False], ids=["W_pack", "split_qkv"])
@pytest.mark.parametrize("quant,exact", [("none", False), ("rtn4", True), ("rtn4", False)],
                         ids=["dense", "rtn4-exact", "rtn4-int8"])
@torch.no_grad()
def test_native_step_equals_python_loop(packed, quant, exact, monkeypatch):
    cfg = _cfg(packed)
    bb = Backbone.from_tensors(cfg, _tensors(cfg), quant=quant)
    ids = torch.randint(0, cfg.vocab_size, (1, 29), generator=torch.Generator().manual_seed(3))
    count = _Counter(monkeypatch)
    with q4.exact_mode(exact):
        h_py, k_py, v_py = _run(bb, ids, 5, False, monkeypatch)
        assert count.n == 0
        h_nat, k_nat, v_nat = _run(bb, ids, 5, True, monkeypatch)
    assert count.n == 24  # 24 decode steps, all native
    assert bb.native_decode_supported() is None
    assert _rel(h_nat, h_py) < TOL
    assert _rel(k_nat, k_py) < TOL and _rel(v_nat, v_py) < TOL
    # the K/V cache is written at exactly the decoded positions: positions beyond are untouched (zero)
    assert k_nat[:, :, :, 29:].abs().max() == 0 and v_nat[:, :, :, 29:].abs().max() == 0


@torch.no_grad()
def test_plan_follows_replaced_linears(monkeypatch):
    """Quantizing layers after allocate_cache rebuilds the plan (it must not keep the old dense addresses)."""
    cfg = _cfg(False, bias=False)
    bb = Backbone.from_tensors(cfg, _tensors(cfg))
    ids = torch.randint(0, cfg.vocab_size, (1, 12), generator=torch.Generator().manual_seed(4))
    knobs.set("native_decode", True)
    bb.allocate_cache(16)
    plan = bb._decode_plan()
    bb.layers[1].quantize_rtn(32)
    with q4.exact_mode(True):
        h_nat = _run(bb, ids, 4, True, monkeypatch)[0]
        assert bb._decode_plan() is not plan
        h_py = _run(bb, ids, 4, False, monkeypatch)[0]
    assert _rel(h_nat, h_py) < TOL


def _greedy(bb: Backbone, prompt: torch.Tensor, steps: int, native: bool, monkeypatch):
    knobs.set("native_decode", native)
    t = prompt.shape[1]
    bb.allocate_cache(t + steps)
    nxt = bb.logits(bb.forward(prompt, start=0)[:, -1]).argmax(-1)
    out = [int(nxt)]
    for i in range(steps - 1):
        nxt = bb.logits(bb.forward(nxt[:, None], start=t + i)[:, -1]).argmax(-1)
        out.append(int(nxt))
    return out


@pytest.mark.parametrize("quant", ["none", "rtn4"])
@torch.no_grad()
def test_greedy_tokens_identical_tiny_omni(tiny_omni, quant, monkeypatch):
    """Packed W_pack with bias (the omni layout), default q4 mode (INT8): 32 greedy tokens identical."""
    bb = Backbone.from_checkpoint(Checkpoint.open(tiny_omni), quant=quant)
    prompt = torch.tensor([[9707, 151667, 1, 2, 151668, 17, 3]])
    count = _Counter(monkeypatch)
    py = _greedy(bb, prompt, 32, False, monkeypatch)
    nat = _greedy(bb, prompt, 32, True, monkeypatch)
    assert count.n == 31
    assert nat == py


@torch.no_grad()
def test_greedy_tokens_identical_smollm2(smollm2_dir, monkeypatch):
    """Split q/k/v without bias, tied embeddings (Llama / SmolLM2-135M, real weights): 32 greedy tokens, dense
    fp32 and then rtn4 (the same layers quantized in place, as quant="rtn4" does at load).

    The rtn4 comparison runs the q4 kernels on their exact path: on the default INT8-activation path the native
    step's own RMSNorm can round an activation block to other int8 values than torch's RMSNorm does, and on
    these real weights a greedy step with a 0.02 logit margin then flips (token 7 with the asymmetric group-32
    grid). On that path the two decode paths are held to the same error against the exact path instead.""" 
    from omni_edge.ops import q4

    bb = Backbone.from_checkpoint(Checkpoint.open(smollm2_dir))
    assert not bb.config.packed_qkv
    prompt = torch.tensor([[1, 9690, 198, 2683, 314, 253, 5356, 30]])
    count = _Counter(monkeypatch)
    for quant in ("none", "rtn4"):
        if quant == "rtn4":
            for layer in bb.layers:
                layer.quantize_rtn(128)
        with q4.exact_mode():
            py = _greedy(bb, prompt, 32, False, monkeypatch)
            nat = _greedy(bb, prompt, 32, True, monkeypatch)
        assert nat == py, quant
    assert count.n == 62
    def first_step(native: bool) -> torch.Tensor:  # one prefill and one native / Python decode step
        knobs.set("native_decode", native)
        bb.allocate_cache(prompt.shape[1] + 1)
        bb.forward(prompt, start=0)
        return bb.logits(bb.forward(torch.tensor([[198]]), start=prompt.shape[1])[0, -1])

    with q4.exact_mode():
        exact = first_step(False)
    # INT8 path: each decode path's error against the exact path is of the same size (with asymmetric grids the
    # two paths do not round identically, see the docstring); neither may be more than twice the other's
    err_py = float((first_step(False) - exact).abs().max())
    err_nat = float((first_step(True) - exact).abs().max())
    assert err_nat <= 2 * err_py and err_py <= 2 * err_nat, (err_py, err_nat)
    assert err_nat < 0.25 * float(exact.std())


@torch.no_grad()
def test_position_outside_cache_is_a_value_error(monkeypatch):
    knobs.set("native_decode", True)
    cfg = _cfg(True)
    bb = Backbone.from_tensors(cfg, _tensors(cfg), quant="rtn4")
    bb.allocate_cache(4)
    h = bb.embed(torch.tensor([[5]]))
    for pos in (4, 5, 1 << 40, -1):
        with pytest.raises(ValueError, match="outside the allocated cache"):
            bb.decode_step_native(h, pos)
    assert bb.kv_cache[0].abs().max() == 0 and bb.kv_cache[1].abs().max() == 0  # nothing written
    with pytest.raises(ValueError, match="exceed the allocated cache"):
        bb.forward(torch.tensor([[5]]), start=4)
    bb.decode_step_native(h, 3)  # the last position is fine
    assert bb.kv_cache[0][:, :, :, 3].abs().max() > 0
    with pytest.raises(ValueError, match="expected a float32 tensor of shape"):
        bb.decode_step_native(h[:, :, :-1], 0)


@torch.no_grad()
def test_unsupported_cases_use_the_python_loop(monkeypatch):
    cfg = _cfg(True)
    bb = Backbone.from_tensors(cfg, _tensors(cfg))
    bb.allocate_cache(8, batch=2)
    assert "batch" in bb.native_decode_supported()
    bb.allocate_cache(8)
    knobs.set("native_decode", False)
    assert bb.native_decode_supported() == "OMNI_EDGE_NATIVE_DECODE=0"
    knobs.set("native_decode", True)
    assert bb.native_decode_supported() is None
    b16 = Backbone.from_tensors(cfg, _tensors(cfg), dtype=torch.bfloat16)
    b16.allocate_cache(8)
    assert "dtype" in b16.native_decode_supported()
    b16.forward(torch.tensor([[1, 2]]), start=0)
    assert b16.forward(torch.tensor([[3]]), start=2).dtype == torch.bfloat16  # Python loop


def test_plan_validation_errors():
    lib = _native.lib()
    c, n_heads, kvh, d, inter, s = 16, 2, 1, 8, 24, 4
    f = lambda *shape: torch.zeros(*shape)
    norm, cos, sin = f(c), f(s, d), f(s, d)
    kc, vc = f(1, kvh, s, d), f(1, kvh, s, d)
    w = {"qkv": f((n_heads + 2 * kvh) * d, c), "o": f(c, n_heads * d), "gu": f(inter, c), "down": f(c, inter)}
    dense = lambda t: (1, t.data_ptr(), 0, t.shape[0], t.shape[1])
    lins = [dense(w["qkv"]), dense(w["o"]), dense(w["gu"]), dense(w["gu"]), dense(w["down"])]
    args = dict(hidden=c, heads=n_heads, kv_heads=kvh, head_dim=d, intermediate=inter, max_len=s, eps=1e-6,
                packed=True, cos=cos.data_ptr(), sin=sin.data_ptr(), final_norm=norm.data_ptr())
    layer = (norm.data_ptr(), norm.data_ptr(), lins, kc.data_ptr(), vc.data_ptr())
    plan = lib.DecodePlan(**args, layers=[layer], keepalive=[w, norm, cos, sin, kc, vc])
    x, y = f(c), f(c)
    plan.step(x.data_ptr(), y.data_ptr(), 0, q4.MODE_INT8)
    with pytest.raises(ValueError, match=r"position 4 is outside the allocated cache \[0, 4\)"):
        plan.step(x.data_ptr(), y.data_ptr(), 4, q4.MODE_INT8)
    with pytest.raises(ValueError, match="q4 mode"):
        plan.step(x.data_ptr(), y.data_ptr(), 0, 7)
    bad = list(lins)
    bad[1] = dense(w["gu"])  # o_proj with the MLP's shape
    with pytest.raises(ValueError, match=r"layer 0 o_proj: expected shape \(16, 16\), got \(24, 16\)"):
        lib.DecodePlan(**args, layers=[(layer[0], layer[1], bad, layer[3], layer[4])], keepalive=None)
    with pytest.raises(ValueError, match="expected 5 linears"):
        lib.DecodePlan(**args, layers=[(layer[0], layer[1], lins[:4], layer[3], layer[4])], keepalive=None)
    with pytest.raises(ValueError, match="caches must not be NULL"):
        lib.DecodePlan(**args, layers=[(layer[0], layer[1], lins, 0, layer[4])], keepalive=None)
    with pytest.raises(ValueError, match="head_dim must be even"):
        lib.DecodePlan(**{**args, "head_dim": 7}, layers=[layer], keepalive=None)
    with pytest.raises(ValueError, match="positive multiple of kv_heads"):
        lib.DecodePlan(**{**args, "kv_heads": 3}, layers=[layer], keepalive=None)


def test_plan_out_of_memory_is_a_memory_error():
    """A scratch workspace that cannot be allocated is reported as memory, not as a bad argument (the weights are
    not read when a plan is built, so a fake shape is enough)."""
    lib = _native.lib()
    c, n_heads, kvh, d, s, inter = 16, 2, 1, 8, 4, 2**40
    f = lambda *shape: torch.zeros(*shape)
    norm, cos, sin, kc, vc, w = f(c), f(s, d), f(s, d), f(1, kvh, s, d), f(1, kvh, s, d), f(8)
    dense = lambda n, k: (1, w.data_ptr(), 0, n, k)
    lins = [dense((n_heads + 2 * kvh) * d, c), dense(c, n_heads * d), dense(inter, c), dense(inter, c),
            dense(c, inter)]
    with pytest.raises(MemoryError, match="decode plan: out of memory for the scratch workspace"):
        lib.DecodePlan(hidden=c, heads=n_heads, kv_heads=kvh, head_dim=d, intermediate=inter, max_len=s, eps=1e-6,
                       packed=True, cos=cos.data_ptr(), sin=sin.data_ptr(), final_norm=norm.data_ptr(),
                       layers=[(norm.data_ptr(), norm.data_ptr(), lins, kc.data_ptr(), vc.data_ptr())],
                       keepalive=None)


GEMV_SHAPES = [(1, 1), (3, 5), (4, 16), (7, 17), (9, 31), (33, 100), (129, 577), (576, 576), (100, 1536)]


@pytest.fixture
def isa_levels(restore_isa):
    return list(cpu_isa_levels())


@pytest.mark.parametrize("threads", [1, 2])
def test_dense_gemv_matches_torch_every_isa(isa_levels, threads):
    """fp32 GEMV vs the float64 product: error <= 1e-6 * sum_k |W x| + tiny (fp32 accumulation over K)."""
    lib = _native.lib()
    prev = lib.num_threads()
    lib.set_num_threads(threads)
    gen = torch.Generator().manual_seed(5)
    try:
        for isa in isa_levels:
            lib.set_isa_cap(isa)
            for n, k in GEMV_SHAPES:
                w = torch.randn(n, k, generator=gen)
                x = torch.randn(k, generator=gen)
                for bias in (None, torch.randn(n, generator=gen)):
                    y = torch.full((n,), float("nan"))
                    lib.gemv_f32_cpu(w.data_ptr(), x.data_ptr(), 0 if bias is None else bias.data_ptr(), n, k,
                                     y.data_ptr())
                    ref = w.double() @ x.double() + (0 if bias is None else bias.double())
                    mag = w.double().abs() @ x.double().abs() + (0 if bias is None else bias.double().abs())
                    err = (y.double() - ref).abs()
                    assert bool((err <= 1e-6 * mag + 1e-30).all()), (isa, n, k, float(err.max()))
    finally:
        lib.set_num_threads(prev)


def test_native_step_every_isa(isa_levels, monkeypatch):
    """The whole step at each ISA level (GEMV, q4 and attention kernels all dispatch on it)."""
    cfg = _cfg(True)
    bb = Backbone.from_tensors(cfg, _tensors(cfg))
    bb.layers[0].quantize_rtn(32)  # mixed dense / 4-bit
    ids = torch.randint(0, cfg.vocab_size, (1, 10), generator=torch.Generator().manual_seed(6))
    lib = _native.lib()
    with torch.no_grad(), q4.exact_mode(True):
        for isa in isa_levels:
            lib.set_isa_cap(isa)
            h_py = _run(bb, ids, 3, False, monkeypatch)[0]
            h_nat = _run(bb, ids, 3, True, monkeypatch)[0]
            assert _rel(h_nat, h_py) < TOL, isa


@pytest.mark.parametrize("threads", [1, 2])
@torch.no_grad()
def test_long_context_step(threads, monkeypatch):
    """A step deep into a long cache (the threaded attention branch: over 1 MB of K/V per layer), the cache
    filled with random K/V instead of a long prefill."""
    lib = _native.lib()
    prev = lib.num_threads()
    lib.set_num_threads(threads)
    try:
        cfg = _cfg(False)
        bb = Backbone.from_tensors(cfg, _tensors(cfg), quant="rtn4")
        pos = 4700  # 4701 positions * 2 kv heads * 16 * 2 (K, V) * 4 bytes > 1 MiB
        bb.allocate_cache(pos + 1)
        k, v = bb.kv_cache
        gen = torch.Generator().manual_seed(8)
        k[:, :, :, :pos] = torch.randn(k[:, :, :, :pos].shape, generator=gen)
        v[:, :, :, :pos] = torch.randn(v[:, :, :, :pos].shape, generator=gen)
        h = bb.embed(torch.tensor([[7]]))
        with q4.exact_mode(True):
            knobs.set("native_decode", False)
            h_py = bb.forward(inputs_embeds=h, start=pos)
            kv_py = (k[:, :, :, pos].clone(), v[:, :, :, pos].clone())
            k[:, :, :, pos] = 0
            v[:, :, :, pos] = 0
            knobs.set("native_decode", True)
            h_nat = bb.decode_step_native(h, pos)
        assert _rel(h_nat, h_py) < TOL
        assert _rel(k[:, :, :, pos], kv_py[0]) < TOL and _rel(v[:, :, :, pos], kv_py[1]) < TOL
    finally:
        lib.set_num_threads(prev)
