"""The device-resident decode step (omni_edge/device_step.py) and its CUDA graph.

On the CPU: the step's body (device-indexed RoPE rows and K/V writes, preallocated attention workspace, lengths
never read back) against the Python layer loop it replaces, which stays the reference; the input checks; the
knob; the rebuild when the cache or a linear changes. The body runs the very ops of the layer loop with the
same kernels and split plan, so the comparison is bit-exact.

On a GPU (marked `cuda`): graph replay against the eager step at several positions, no synchronising torch
call and no allocation per replayed token, and the fallbacks (knob off, capture failing)."""

import pytest
import torch

from omni_edge import _native, knobs
from omni_edge.backbone import Backbone
from omni_edge.config import BackboneConfig
from omni_edge.device_step import DeviceStep
from omni_edge.ops import attention, q4
from omni_edge.testing import backbone_tensors

# GQA 7:1 like Qwen2.5-7B (28/4 there), odd vocab; the packed W_pack layout and the split q/k/v one.
SHAPE = dict(hidden_size=128, num_hidden_layers=3, num_attention_heads=7, num_key_value_heads=1, head_dim=32,
             intermediate_size=160, vocab_size=509)


def _cfg(packed=True):
    return BackboneConfig(**SHAPE, rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=256, qkv_bias=True,
                          packed_qkv=packed, tie_word_embeddings=False, torch_dtype="float32")


def _pair(packed=True, quant="none", device="cpu", dtype=torch.float32, seed=3):
    """Two backbones holding the same weights."""
    cfg = _cfg(packed)
    t = backbone_tensors(cfg, seed=seed)
    return cfg, [Backbone.from_tensors(cfg, t, device=device, dtype=dtype, quant=quant) for _ in range(2)]


@pytest.fixture
def python_loop():
    """The Python layer loop as the CPU reference (the native whole-step kernel off), restored afterwards."""
    with knobs.override(native_decode=False):
        yield


@pytest.fixture
def graphs():
    """`graphs(flag)` sets OMNI_EDGE_CUDA_GRAPH's Python equivalent for the rest of the test."""
    before = knobs.settings().cuda_graph
    yield lambda flag: knobs.set("cuda_graph", bool(flag))
    knobs.set("cuda_graph", before)


# ------------------------------------------------------------------------------------------------
# CPU: the step body against the Python layer loop
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("packed,quant,batch",
                         [(True, "none", 1), (False, "none", 2), (True, "rtn4", 1), (True, "rtn4", 2)])
@torch.no_grad()
def test_step_matches_layer_loop(python_loop, one_thread, packed, quant, batch):
    cfg, (ref, ours) = _pair(packed, quant)
    prompt = torch.randint(0, cfg.vocab_size, (batch, 9), generator=torch.Generator().manual_seed(4))
    for bb in (ref, ours):
        bb.allocate_cache(24, batch=batch)
        bb.forward(prompt, start=0)
    step = DeviceStep(ours)
    tok = torch.full((batch, 1), 5)
    for pos in range(9, 15):
        h_ref = ref.forward(tok, start=pos)
        l_ref = ref.logits(h_ref[:, -1])
        h, logits = step.run(pos, ids=tok)
        # Bit-exact: the same ops and kernels on the same inputs; only the indexing of the cache differs.
        assert torch.equal(h, h_ref) and torch.equal(logits, l_ref), pos
        tok = l_ref.argmax(-1, keepdim=True)
    assert torch.equal(ours.kv_cache[0], ref.kv_cache[0]) and torch.equal(ours.kv_cache[1], ref.kv_cache[1])
    # embeddings in (the speech path feeds audio rows), hidden states only
    e = torch.randn(batch, 1, cfg.hidden_size, generator=torch.Generator().manual_seed(5))
    h, none = step.run(15, embeds=e, logits=False)
    assert none is None and torch.equal(h, ref.forward(inputs_embeds=e, start=15))


@torch.no_grad()
def test_decode_step_is_forward_then_logits(one_thread):
    cfg, (ref, ours) = _pair()
    ids = torch.tensor([[7, 8, 9, 10]])
    for bb in (ref, ours):
        bb.allocate_cache(8)
        bb.forward(ids, start=0)
    h, logits = ours.decode_step(torch.tensor([[11]]), start=4)
    h_ref = ref.forward(torch.tensor([[11]]), start=4)
    # CPU: the hidden state is forward's exactly; the native step's lm_head GEMV sums in another order than
    # torch's matmul, so the logits agree to fp32 rounding (1e-5 of the largest)
    want = ref.logits(h_ref[:, -1])
    assert torch.equal(h, h_ref)
    torch.testing.assert_close(logits, want, rtol=0, atol=1e-5 * float(want.abs().max()))
    assert logits.shape == (1, cfg.vocab_size) and logits.dtype == torch.float32


def test_step_input_errors(one_thread):
    cfg, (bb, _) = _pair()
    with pytest.raises(ValueError, match="no KV cache"):
        bb.decode_step(torch.tensor([[1]]), start=0)
    with pytest.raises(ValueError, match="no KV cache"):
        DeviceStep(bb)
    bb.allocate_cache(6)
    step = DeviceStep(bb)
    for bad in (6, -1, 2.0, True):
        with pytest.raises(ValueError, match="start: position"):
            step.run(bad, ids=torch.tensor([1]))
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 509\)"):
        step.run(0, ids=torch.tensor([509]))
    with pytest.raises(ValueError, match="integer token id"):
        step.run(0, ids=torch.tensor([1.0]))
    with pytest.raises(ValueError, match="integer token id"):
        step.run(0, ids=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="inputs_embeds: expected shape"):
        step.run(0, embeds=torch.zeros(1, 2, cfg.hidden_size))
    with pytest.raises(ValueError, match="exactly one"):
        step.run(0)
    with pytest.raises(ValueError, match=r"input_ids: expected shape \(1, 1\)"):
        bb.decode_step(torch.tensor([[1, 2]]), start=0)
    with pytest.raises(ValueError, match="exactly one"):
        bb.decode_step(start=0)
    with pytest.raises(ValueError, match="exceed the allocated cache"):
        bb.decode_step(torch.tensor([[1]]), start=6)


def test_step_rebuilt_when_cache_or_linear_changes(one_thread):
    cfg, (bb, _) = _pair()
    bb.allocate_cache(6)
    s1 = bb._device_step()
    assert bb._device_step() is s1
    bb.layers[1].replace_linear("mlp.down_proj", bb.layers[1].linear("mlp.down_proj").weight.clone())
    s2 = bb._device_step()
    assert s2 is not s1
    bb.allocate_cache(7)
    assert bb._device_step() is not s2 and bb._device_step().key == DeviceStep.key_of(bb)
    bb.free_cache()
    assert bb._dstep is None and bb.decode_path() == "no KV cache allocated"


def test_decode_path_and_reason_on_cpu(one_thread, python_loop):
    cfg, (bb, _) = _pair()
    bb.allocate_cache(6)
    assert bb.decode_path().startswith("python layer loop (OMNI_EDGE_NATIVE_DECODE=0")
    with knobs.override(native_decode=True):
        if bb.native_decode_supported() is None:
            assert bb.decode_path() == "native cpu step (csrc/decode)"
    assert DeviceStep(bb).describe() == "eager device step (no cuda graph: device cpu (CUDA graphs need a GPU))"


def test_cuda_graph_knob():
    s = knobs._from_env({"OMNI_EDGE_CUDA_GRAPH": "0"})
    assert s.cuda_graph is False and s.source["cuda_graph"] == "environment" and not s.problems
    assert knobs._from_env({}).cuda_graph is True
    bad = knobs._from_env({"OMNI_EDGE_CUDA_GRAPH": "off"})
    assert bad.cuda_graph is True and bad.problems == ("OMNI_EDGE_CUDA_GRAPH='off' is not 0 or 1",)
    assert "OMNI_EDGE_CUDA_GRAPH" in [r["variable"] for r in knobs.table()]
    with knobs.override(cuda_graph=False):
        assert knobs.settings().cuda_graph is False
    with pytest.raises(ValueError, match="cuda_graph: expected True or False"):
        knobs.set("cuda_graph", "no")


@torch.no_grad()
def test_attention_decode_workspace_and_out(one_thread):
    """decode with a workspace made once and a preallocated output gives the same result as a plain call."""
    g = torch.Generator().manual_seed(6)
    b, hq, hkv, s, d = 2, 6, 2, 37, 24
    q = torch.randn(b, hq, d, generator=g)
    kc, vc = torch.randn(b, hkv, s, d, generator=g), torch.randn(b, hkv, s, d, generator=g)
    lengths = torch.tensor([5, 37], dtype=torch.int32)
    ws = attention.decode_workspace(b, hq, hkv, s, d, "cpu")
    out = torch.empty(b, hq, d)
    got = attention.decode(q, kc, vc, lengths, workspace=ws, out=out, check_lengths=False)
    assert got is out and torch.equal(out, attention.decode(q, kc, vc, lengths))
    with pytest.raises(ValueError, match=r"workspace: made for shapes"):
        attention.decode(q, kc, vc, lengths, workspace=attention.decode_workspace(b, hq, hkv, s + 1, d, "cpu"))
    with pytest.raises(ValueError, match=r"out: expected shape \(2, 6, 24\)"):
        attention.decode(q, kc, vc, lengths, out=torch.empty(b, hq, d + 1))
    # CPU lengths are host memory: still checked whatever check_lengths says (no synchronisation to save)
    with pytest.raises(ValueError, match=r"lengths: values must lie in \[0, 37\]"):
        attention.decode(q, kc, vc, torch.tensor([5, 38], dtype=torch.int32), check_lengths=False)
    with pytest.raises(ValueError, match="decode_workspace: kv heads must be a positive integer"):
        attention.decode_workspace(b, hq, 0, s, d, "cpu")
    with pytest.raises(ValueError, match="not a multiple"):
        attention.decode_workspace(b, 5, 2, s, d, "cpu")


class _StandInGraphs:
    """torch.cuda's stream and graph calls replaced, on the CPU, by stand-ins that keep their contract as the
    step uses it: capture records which graph holds which outputs; replay recomputes the captured body from
    the input buffers into those same output tensors. This runs the step's graph bookkeeping (capture once per
    kind, fill the buffers, replay, hand back the static outputs, fall back on a failed capture) without a GPU;
    what the real capture records is checked by the `cuda` tests below."""

    def __init__(self, monkeypatch):
        import contextlib

        self.captures = self.replays = 0
        self.step = None
        outer = self

        class Stream:
            def __init__(self, device=None):
                pass

            def wait_stream(self, other):
                pass

        class Graph:
            def replay(self):
                outer.replays += 1
                for kind, (g, h, lg) in outer.step._graphs.items():
                    if g is self:
                        nh, nl = outer.step._body(kind)
                        h.copy_(nh)
                        if lg is not None:
                            lg.copy_(nl)

            def reset(self):
                pass

        @contextlib.contextmanager
        def graph(g, capture_error_mode="global"):
            assert capture_error_mode == "relaxed"
            outer.captures += 1
            yield

        for name, value in (("Stream", Stream), ("current_stream", lambda device=None: Stream()),
                            ("stream", lambda s: contextlib.nullcontext()),
                            ("device", lambda d: contextlib.nullcontext()), ("CUDAGraph", Graph), ("graph", graph)):
            monkeypatch.setattr(torch.cuda, name, value)
        monkeypatch.setattr(DeviceStep, "graph_reason", lambda self: self._failed)  # as on a GPU with the knob on


@torch.no_grad()
def test_graph_bookkeeping_with_stand_ins(python_loop, one_thread, monkeypatch):
    fake = _StandInGraphs(monkeypatch)
    cfg, (ref, bb) = _pair()
    prompt = torch.randint(0, cfg.vocab_size, (1, 9), generator=torch.Generator().manual_seed(4))
    for b in (ref, bb):
        b.allocate_cache(24)
        b.forward(prompt, start=0)
    step = fake.step = DeviceStep(bb)
    assert step.describe() == "cuda graph, replayed per token (captured at the first step)"
    tok, first = torch.tensor([[5]]), None
    for pos in range(9, 15):
        h, logits = step.run(pos, ids=tok)
        assert step.last_static
        first = first or (h, logits)
        assert h is first[0] and logits is first[1]  # the same output buffers every step
        h_ref = ref.forward(tok, start=pos)
        l_ref = ref.logits(h_ref[:, -1])
        assert torch.equal(h, h_ref) and torch.equal(logits, l_ref), pos  # position and lengths taken each step
        tok = l_ref.argmax(-1, keepdim=True)
    assert (fake.captures, fake.replays) == (1, 6)
    h, none = step.run(15, ids=tok, logits=False)  # the hidden-states-only kind: its own graph
    assert none is None and (fake.captures, fake.replays) == (2, 7)
    assert torch.equal(h, ref.forward(tok, start=15))
    assert step.describe() == ("cuda graph, replayed per token (layers + final norm, "
                               "layers + final norm + lm_head)")

    def broken(self, with_logits):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(DeviceStep, "_capture_body", broken)
    step2 = fake.step = DeviceStep(bb)
    h, logits = step2.run(16, ids=tok)
    assert not step2.last_static and fake.replays == 7
    assert step2.describe() == ("eager device step (no cuda graph: capture failed: RuntimeError: operation not "
                                "permitted when stream is capturing)")
    h_ref = ref.forward(tok, start=16)
    assert torch.equal(logits, ref.logits(h_ref[:, -1]))
    step2.run(17, ids=tok)
    assert fake.captures == 3  # one failed try, then eager for good


# ------------------------------------------------------------------------------------------------
# CUDA
# ------------------------------------------------------------------------------------------------

has_cuda = torch.cuda.is_available() and _native.available() and _native.lib().build_info()["cuda_compiled"]
needs_gpu = pytest.mark.skipif(not has_cuda, reason="needs an NVIDIA GPU and a CUDA build of omni_edge._C")


def _cuda_pair(quant="none", dtype=torch.float32, prompt_len=9, max_len=32, packed=True):
    cfg, pair = _pair(packed, quant, device="cuda", dtype=dtype)
    prompt = torch.randint(0, cfg.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(4)).cuda()
    for bb in pair:
        bb.allocate_cache(max_len)
        bb.forward(prompt, start=0)
    return cfg, pair


def _close(a, b, what):
    # Same kernels, same inputs: the graph replays exactly the launches of the eager step. cuBLAS may still
    # choose another reduction order on the capture stream, so allow fp32 summation-order noise (well below
    # anything a wrong position, length or stale buffer would give: those change values at O(1)).
    err = float((a.float() - b.float()).abs().max())
    assert err <= 1e-4 * max(float(b.float().abs().max()), 1.0), f"{what}: max |diff| {err:.3g}"


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("quant,dtype", [("none", torch.float32), ("rtn4", torch.float32), ("rtn4", torch.float16)])
@torch.no_grad()
def test_graph_replay_matches_eager_step(graphs, quant, dtype):
    cfg, (eager, graphed) = _cuda_pair(quant, dtype)
    tok = torch.tensor([[5]], device="cuda")
    for pos in range(9, 16):
        graphs(False)
        h_e, l_e = eager.decode_step(tok, start=pos)
        graphs(True)
        h_g, l_g = graphed.decode_step(tok, start=pos)
        assert graphed._dstep.last_static, graphed.decode_path()
        assert not eager._dstep.last_static
        tol = 1e-4 if dtype == torch.float32 else 2e-3  # fp16: one output ulp at the logits' scale
        err = float((l_g - l_e).abs().max())
        assert err <= tol * max(float(l_e.abs().max()), 1.0), (pos, err)
        if dtype == torch.float32:
            _close(h_g, h_e, f"hidden at {pos}")
        tok = l_e.argmax(-1, keepdim=True)
        assert torch.equal(l_g.argmax(-1, keepdim=True), tok), pos
    assert graphed.decode_path().startswith("cuda graph, replayed per token (layers + final norm + lm_head)")
    graphs(False)
    assert eager.decode_path() == "eager device step (no cuda graph: OMNI_EDGE_CUDA_GRAPH=0)"
    graphs(True)
    # forward (hidden states only) replays its own graph and hands back a copy that the next step cannot touch
    h1 = graphed.forward(tok, start=16)
    h1_copy = h1.clone()
    graphed.forward(tok, start=17)
    assert torch.equal(h1, h1_copy)
    graphs(False)
    _close(h1, eager.forward(tok, start=16), "forward at 16")


@pytest.mark.cuda
@needs_gpu
@torch.no_grad()
def test_graph_matches_cpu_reference(python_loop):
    """Graph replay against the CPU Python layer loop on the same weights: greedy tokens identical."""
    cfg, (cpu, _) = _pair()
    _, (gpu, _) = _cuda_pair(prompt_len=9)
    prompt = torch.randint(0, cfg.vocab_size, (1, 9), generator=torch.Generator().manual_seed(4))
    cpu.allocate_cache(32)
    tok_c = cpu.logits(cpu.forward(prompt, start=0)[:, -1]).argmax(-1, keepdim=True)
    tok_g = tok_c.cuda()
    for pos in range(9, 20):
        h = cpu.forward(tok_c, start=pos)
        tok_c = cpu.logits(h[:, -1]).argmax(-1, keepdim=True)
        _, logits = gpu.decode_step(tok_g, start=pos)
        tok_g = logits.argmax(-1, keepdim=True)
        assert int(tok_g) == int(tok_c), pos


@pytest.mark.cuda
@needs_gpu
@torch.no_grad()
def test_no_sync_no_allocation_per_token(graphs):
    cfg, (bb, eager) = _cuda_pair("rtn4")
    tok = torch.tensor([[3]], device="cuda")
    bb.decode_step(tok, start=9)  # warm-up + capture (these synchronise, once)
    graphs(False)
    eager.decode_step(tok, start=9)  # warm-up of the eager path (kernel self-checks)
    graphs(True)
    torch.cuda.synchronize()
    allocations = lambda: torch.cuda.memory_stats()["allocation.all.allocated"]  # noqa: E731 (a running count)
    new = []
    torch.cuda.set_sync_debug_mode("error")  # any synchronising torch call raises from here
    try:
        for pos in range(10, 14):
            before = allocations()
            _, logits = bb.decode_step(tok, start=pos)
            new.append(allocations() - before)
            tok = logits.argmax(-1, keepdim=True)
        graphs(False)
        _, logits = eager.decode_step(tok, start=10)  # eager: allocates activations, but never synchronises
    finally:
        torch.cuda.set_sync_debug_mode(0)
        graphs(True)
    assert new == [0, 0, 0, 0]
    assert logits.shape == (1, cfg.vocab_size)


@pytest.mark.cuda
@needs_gpu
@torch.no_grad()
def test_capture_failure_falls_back(graphs, monkeypatch):
    cfg, (bb, ref) = _cuda_pair()
    graphs(True)

    def broken(self, with_logits):
        self._body(with_logits)  # part of the step is captured, then capture becomes impossible
        raise RuntimeError("injected capture failure")

    monkeypatch.setattr(DeviceStep, "_capture_body", broken)
    tok = torch.tensor([[5]], device="cuda")
    h, logits = bb.decode_step(tok, start=9)
    assert not bb._dstep.last_static
    assert bb.decode_path() == ("eager device step (no cuda graph: capture failed: RuntimeError: injected "
                                "capture failure)")
    graphs(False)
    h_ref, l_ref = ref.decode_step(tok, start=9)
    _close(logits, l_ref, "logits after a failed capture")
    graphs(True)
    h2, l2 = bb.decode_step(tok, start=10)  # stays eager, still right
    graphs(False)
    _, l2_ref = ref.decode_step(tok, start=10)
    _close(l2, l2_ref, "next step")


@pytest.mark.cuda
@needs_gpu
@torch.no_grad()
def test_cuda_workspaces():
    """Workspaces made once give the same results as per-call ones; a too-small q4 workspace is refused."""
    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(7)
    b, hq, hkv, s, d = 1, 14, 2, 700, 64
    q = torch.randn(b, hq, d, generator=g).to(dev)
    kc, vc = torch.randn(b, hkv, s, d, generator=g).to(dev), torch.randn(b, hkv, s, d, generator=g).to(dev)
    lengths = torch.tensor([613], dtype=torch.int32, device=dev)
    ws = attention.decode_workspace(b, hq, hkv, s, d, dev)
    out = torch.empty_like(q)
    got = attention.decode(q, kc, vc, lengths, workspace=ws, out=out, check_lengths=False)
    assert got is out and torch.equal(out, attention.decode(q, kc, vc, lengths))
    w = q4.qweight_rtn(torch.randn(96, 200, generator=g), 40, sym=False).to(dev)  # groups padded, partial tile
    x = torch.randn(1, 200, generator=g).to(dev)
    need = q4.cuda_workspace_bytes(1, w)
    y = q4.matmul(x, w, workspace=torch.empty(need, dtype=torch.uint8, device=dev))
    assert torch.equal(y, q4.matmul(x, w))
    with pytest.raises(ValueError, match="workspace: .* bytes, this matmul"):
        q4.matmul(x, w, workspace=torch.empty(8, dtype=torch.uint8, device=dev))
    with pytest.raises(ValueError, match="workspace: expected a contiguous 1-D uint8 tensor"):
        q4.matmul(x, w, workspace=torch.empty(need, dtype=torch.float32, device=dev))


def test_step_built_in_inference_mode_runs_outside(one_thread):
    """A chat turn (inference_mode) may build the step; a later call outside one must still run it."""
    cfg, (bb, ref) = _pair()
    for b in (bb, ref):
        b.allocate_cache(6)
    with torch.inference_mode():
        h1, _ = bb._device_step().run(0, ids=torch.tensor([3]))
    h2, _ = bb._device_step().run(1, ids=torch.tensor([4]))
    with torch.no_grad():
        ref.forward(torch.tensor([[3, 4]]), start=0)
        want = ref.forward(torch.tensor([[4]]), start=1)
    assert torch.allclose(h2, want, rtol=1e-5, atol=1e-5)  # prefill vs decode kernels: fp32 summation order


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("quant", ["none", "rtn4"])
@torch.no_grad()
def test_graph_on_tiny_checkpoint(tiny_omni, graphs, quant):
    """The tiny omni checkpoint (real tensor names, Qwen vocabulary): graph replay == eager step, 6 positions."""
    from omni_edge.checkpoint import Checkpoint

    ckpt = Checkpoint.open(tiny_omni)
    eager, graphed = (Backbone.from_checkpoint(ckpt, device="cuda", quant=quant) for _ in range(2))
    prompt = torch.tensor([[9707, 151667, 1, 2, 151668]], device="cuda")
    for bb in (eager, graphed):
        bb.allocate_cache(16)
        bb.forward(prompt, start=0)
    tok = torch.tensor([[42]], device="cuda")
    for pos in range(5, 11):
        graphs(False)
        _, l_e = eager.decode_step(tok, start=pos)
        graphs(True)
        _, l_g = graphed.decode_step(tok, start=pos)
        assert graphed._dstep.last_static, graphed.decode_path()
        _close(l_g, l_e, f"logits at {pos}")
        tok = l_e.argmax(-1, keepdim=True)


# ------------------------------------------------------------------------------------------------
# RVQ decode without a host read of the codes
# ------------------------------------------------------------------------------------------------

def _books(device):
    g = torch.Generator().manual_seed(8)
    return [torch.randn(n, 40, generator=g).to(device) for n in (16, 9, 5)]


def test_rvq_decode_unchecked_still_checked_on_cpu():
    from omni_edge.ops import rvq
    books = _books("cpu")
    codes = torch.tensor([[3, 8, 4], [15, 0, 0]])
    assert torch.equal(rvq.decode(codes, books, check=False), rvq.decode(codes, books))
    with pytest.raises(ValueError, match=r"codes\[1, 1\] = 9 is outside \[0, 9\)"):
        rvq.decode(torch.tensor([[3, 8, 4], [15, 9, 0]]), books, check=False)  # host memory: checked anyway


@pytest.mark.cuda
@needs_gpu
def test_rvq_decode_unchecked_cuda():
    from omni_edge.ops import rvq
    books = _books("cuda")
    codes = torch.tensor([[3, 8, 4], [15, 9, 0], [0, 1, 2]], device="cuda")  # row 1: code 9 >= 9 rows
    from omni_edge.ops import _dispatch
    _dispatch.native_enabled("rvq", codes.device)  # the kernels' first-use self-check synchronises: before
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = rvq.decode(codes, books, check=False)  # no host read of the codes
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isnan(out[1]).all()  # the bad frame is NaN; nothing outside a codebook was read
    good = codes[[0, 2]]
    # gathers and fp32 adds in layer order on both sides: bit-exact
    assert torch.equal(out[[0, 2]], rvq.decode_ref(good, books))
    with pytest.raises(ValueError, match=r"codes\[1, 1\] = 9 is outside \[0, 9\)"):
        rvq.decode(codes, books)
