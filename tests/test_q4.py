"""q4: 4-bit GPTQ matmul. Bit-exact packing both ways (GPTQ and the kernels' tiled layout), the native CPU
kernels at every ISA level this CPU has against the scalar C++ reference and the torch reference on odd
shapes, the error paths, and (marked `cuda`, skipped without a GPU) the CUDA kernels.

Tolerance rules used below, with their reasons:
- Packing, act-order folding, round trips: bit-exact (pure integer rearrangements).
- EXACT path vs the C++ reference (double accumulation) and vs torch (fp32 matmul of `dequantize()`): the
  dequantized weights are exact in fp32 ((q - z) * s has at most 15 significant bits), so only the fp32
  summation order differs: |y - ref| <= 1e-5 * sum_k |x_k| |W_kn| (random rounding errors grow like
  sqrt(K) * 2^-24 ~ 2e-6 at K = 1000; we see ~3e-7).
- INT8 path vs the C++ reference in INT8 mode (same quantized activations, double accumulation): the same
  1e-5 rule (fp32 block sums in the kernel).
- INT8 path vs torch: the activation quantization error, rigorously |y - ref| <= sum_k |W_kn| * d_b(k) / 2
  (each x_k is rounded to d * round(x_k / d) with d = max|x| / 127 over its 32-row block), plus the fp32 rule.
- The bias is added in fp32, so |bias| joins the magnitude in the 1e-5 rule.
- Outputs in bf16 / fp16: both sides round an fp32 value to the output dtype, and values a hair apart can
  round to neighbours, so one output ulp (2^-7 |y| for bf16, 2^-10 |y| for fp16) is added.
"""

import subprocess
import sys

import pytest
import torch

from omni_edge import _native
from omni_edge.ops import q4

lib = _native.lib()
_LEVEL = {"scalar": 0, "neon": 1, "avx2": 2, "avx512": 3}
_AVAIL = lib.build_info()["isa_available"]
ISAS = [i for i in ("scalar", "neon", "avx2", "avx512") if _LEVEL[i] <= _LEVEL[_AVAIL]
        and (i != "neon" or _AVAIL == "neon") and (i not in ("avx2", "avx512") or _AVAIL != "neon")]
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
OUT_ULP = {torch.float32: 0.0, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}
MS = (1, 2, 3, 7, 8, 9, 17, 100)


@pytest.fixture
def restore_isa():
    before = lib.isa_active()
    yield
    lib.set_isa_cap(before)


def make_codes(k, n, gs, *, act_order=False, sym=True, uneven=False, seed=0):
    """Random integer-code layer: q (K, N), zeros (G, N), scales (G, N) fp16, g_idx (K,) int32, group size."""
    gen = torch.Generator().manual_seed(seed)
    gs = k if gs in (-1, None) else gs
    groups = -(-k // gs)
    q = torch.randint(0, 16, (k, n), generator=gen, dtype=torch.uint8)
    if sym:
        zeros = torch.full((groups, n), 8, dtype=torch.uint8)
    else:
        zeros = torch.randint(0, 16, (groups, n), generator=gen, dtype=torch.uint8)
        zeros[0, :2] = torch.tensor([0, 15], dtype=torch.uint8)  # the v1 wrap-around edge cases
    scales = ((torch.rand(groups, n, generator=gen) * 0.02 + 0.001)
              * torch.where(torch.rand(groups, n, generator=gen) < 0.1, -1.0, 1.0)).half()
    if uneven:  # arbitrary group sizes: every group padded separately in the layout
        g_idx = torch.randint(0, groups, (k,), generator=gen, dtype=torch.int32)
    elif act_order:  # GPTQ desc_act: groups follow the activation-order permutation of the rows
        perm = torch.randperm(k, generator=gen)
        g_idx = torch.empty(k, dtype=torch.int32)
        g_idx[perm] = (torch.arange(k) // gs).to(torch.int32)
    else:
        g_idx = (torch.arange(k) // gs).to(torch.int32)
    return q, zeros, scales, g_idx, gs


def make_layer(k, n, gs, *, act_order=False, sym=True, fmt="gptq", bias=False, uneven=False, seed=0):
    q, zeros, scales, g_idx, gs = make_codes(k, n, gs, act_order=act_order, sym=sym, uneven=uneven, seed=seed)
    qweight, qzeros = q4.pack_gptq(q, zeros, checkpoint_format=fmt)
    b = torch.randn(n, generator=torch.Generator().manual_seed(seed + 1)) if bias else None
    w = q4.QWeight.from_gptq(qweight, qzeros, scales, g_idx, group_size=-1 if gs == k else gs, sym=sym,
                             checkpoint_format=fmt, bias=b)
    return w, (q, zeros, scales, g_idx)


def _tol_exact(x, w, ref, dtype):
    """1e-5 of the magnitude of the sum (sum_k |x_k| |W_kn| + |bias_n|) plus one output ulp."""
    mag = x.float().abs().reshape(-1, w.in_features) @ w.dequantize().abs()
    if w.bias is not None:
        mag = mag + w.bias.float().abs().to(mag.device)
    return 1e-5 * mag.reshape(ref.shape) + OUT_ULP[dtype] * ref.float().abs()


# ------------------------------------------------------------------------------------------------
# Layout and packing: bit-exact
# ------------------------------------------------------------------------------------------------

def test_layout_constants_match_the_kernels():
    c = lib.q4_layout()
    assert (c["tile_n"], c["octet"], c["block_k"]) == (q4.TILE_N, q4.OCTET, q4.BLOCK_K)
    assert tuple(c["nibble_row"]) == q4.NIBBLE_ROW


@pytest.mark.parametrize("fmt", q4.CHECKPOINT_FORMATS)
def test_gptq_pack_unpack_bit_exact_both_ways(fmt):
    gen = torch.Generator().manual_seed(1)
    q = torch.randint(0, 16, (64, 24), generator=gen, dtype=torch.uint8)
    zeros = torch.randint(0, 16, (4, 24), generator=gen, dtype=torch.uint8)
    q[:8] = 0  # an all-zero word
    zeros[1] = 0
    qweight, qzeros = q4.pack_gptq(q, zeros, checkpoint_format=fmt)
    assert qweight.dtype == qzeros.dtype == torch.int32 and qweight.shape == (8, 24) and qzeros.shape == (4, 3)
    # the GPTQ word formula, written out with Python integers
    for (i, n) in [(0, 0), (3, 5), (7, 23)]:
        word = sum(int(q[8 * i + j, n]) << (4 * j) for j in range(8))
        assert int(qweight[i, n]) & 0xFFFFFFFF == word
        stored = [(int(zeros[i % 4, 8 * (n // 8) + j]) - (1 if fmt == "gptq" else 0)) & 0xF for j in range(8)]
        assert int(qzeros[i % 4, n // 8]) & 0xFFFFFFFF == sum(s << (4 * j) for j, s in enumerate(stored))
    q2, z2 = q4.unpack_gptq(qweight, qzeros, checkpoint_format=fmt)
    assert torch.equal(q2, q) and torch.equal(z2, zeros)
    # and from arbitrary words back to the same words
    words = torch.randint(-2**31, 2**31 - 1, (8, 24), generator=gen, dtype=torch.int32)
    zwords = torch.randint(-2**31, 2**31 - 1, (4, 3), generator=gen, dtype=torch.int32)
    qa, za = q4.unpack_gptq(words, zwords, checkpoint_format=fmt)
    wb, zb = q4.pack_gptq(qa, za, checkpoint_format=fmt)
    assert torch.equal(wb, words) and torch.equal(zb, zwords)


def test_tiled_word_layout_by_formula():
    """FORMAT.md §2 byte by byte: word (t, o, l) byte b = row 8o+b (low nibble) | row 8o+4+b (high nibble)."""
    q, zeros, scales, g_idx, gs = make_codes(64, 40, 32, sym=False, seed=2)
    p = q4.pack_tiled(q, zeros, scales, g_idx)
    codes = p["codes"]
    assert codes.shape == (3, 8, 16) and codes.dtype == torch.int32  # N=40 -> 3 tiles, K=64 -> 8 octets
    raw = codes.contiguous().view(torch.uint8).view(3, 8, 16, 4)
    for t in range(3):
        for o in range(8):
            for l in range(16):
                n = 16 * t + l
                for b in range(4):
                    want = (int(q[8 * o + b, n]) | int(q[8 * o + 4 + b, n]) << 4) if n < 40 else 0
                    assert int(raw[t, o, l, b]) == want
    # per-group values are tile-major, zero-padded columns
    assert torch.equal(p["scales"][1, :, :8], scales[:, 16:24]) and torch.equal(p["zeros"][2, :, 8:], torch.zeros(2, 8, dtype=torch.uint8))
    assert p["perm"].tolist() == list(range(64)) and p["block_group"].tolist() == [0, 1]
    # the worked example of FORMAT.md: codes 1..8 in rows 0..7 of column 0
    q1 = torch.zeros(32, 8, dtype=torch.uint8)
    q1[:8, 0] = torch.arange(1, 9, dtype=torch.uint8)
    z1, s1, g1 = torch.zeros(1, 8, dtype=torch.uint8), torch.ones(1, 8).half(), torch.zeros(32, dtype=torch.int32)
    assert int(q4.pack_gptq(q1, z1, checkpoint_format="gptq_v2")[0][0, 0]) & 0xFFFFFFFF == 0x87654321
    assert int(q4.pack_tiled(q1, z1, s1, g1)["codes"][0, 0, 0]) & 0xFFFFFFFF == 0x84736251


@pytest.mark.parametrize("case", ["plain", "act_order", "per_channel_padded", "uneven_groups"])
def test_tiled_pack_unpack_bit_exact_both_ways(case):
    k, n, gs = {"plain": (128, 48, 32), "act_order": (256, 24, 64), "per_channel_padded": (200, 16, -1),
                "uneven_groups": (264, 8, 32)}[case]
    q, zeros, scales, g_idx, gs = make_codes(k, n, gs, act_order=case == "act_order", sym=False,
                                             uneven=case == "uneven_groups", seed=3)
    p = q4.pack_tiled(q, zeros, scales, g_idx)
    kp = p["perm"].numel()
    assert kp % 32 == 0 and kp >= k
    back = q4.unpack_tiled(p["codes"], p["scales"], p["zeros"], p["perm"], p["block_group"], k, n)
    for a, b in zip(back, (q, zeros, scales, g_idx)):
        assert torch.equal(a, b)
    again = q4.pack_tiled(*back)
    for key in p:
        assert torch.equal(again[key], p[key]), key


@pytest.mark.parametrize("k,n,gs,act", [(64, 24, 32, False), (256, 40, 64, True), (200, 16, 200, False),
                                        (264, 8, 32, True)])
def test_load_time_repack_native_equals_torch_spec(k, n, gs, act):
    """from_gptq's repack (native C++ on CPU, torch nibble shuffle or gather elsewhere) is the spec, bit for bit."""
    gen = torch.Generator().manual_seed(25)
    qw = torch.randint(-2**31, 2**31 - 1, (k // 8, n), generator=gen, dtype=torch.int32)
    g = ((torch.randperm(k, generator=gen) if act else torch.arange(k)) // gs).to(torch.int32)
    perm, _ = q4.fold_groups(g, -(-k // gs))
    spec = q4._tile_codes(lambda n0, n1: q4.unpack_gptq(qw[:, n0:n1], torch.zeros(1, 1, dtype=torch.int32))[0],
                          k, n, perm)
    assert torch.equal(q4._repack_gptq(qw, k, n, perm), spec)
    if perm.numel() == k and not act:
        assert torch.equal(q4._tile_gptq_words(qw), spec)


def test_act_order_folding():
    _, _, _, g_idx, _ = make_codes(256, 8, 32, act_order=True, seed=4)
    perm, block_group = q4.fold_groups(g_idx, 8)
    assert perm.numel() == 256 and sorted(perm.tolist()) == list(range(256))  # a permutation, no padding
    assert block_group.tolist() == list(range(8))
    for r in range(256):  # every layout row sits in the block of its own group
        assert int(g_idx[perm[r]]) == int(block_group[r // 32])
    # uneven groups are padded to whole blocks with -1 rows
    g = torch.tensor([1] * 5 + [0] * 40 + [2] * 3, dtype=torch.int32)
    perm, block_group = q4.fold_groups(g, 3)
    assert block_group.tolist() == [0, 0, 1, 2]
    assert perm[:40].tolist() == list(range(5, 45)) and perm[40:64].tolist() == [-1] * 24
    assert perm[64:69].tolist() == list(range(5)) and perm[96:99].tolist() == [45, 46, 47]


@pytest.mark.parametrize("fmt", q4.CHECKPOINT_FORMATS)
@pytest.mark.parametrize("act_order", [False, True])
def test_from_gptq_to_gptq_round_trip(fmt, act_order):
    q, zeros, scales, g_idx, gs = make_codes(384, 56, 128, act_order=act_order, sym=False, seed=5)
    qweight, qzeros = q4.pack_gptq(q, zeros, checkpoint_format=fmt)
    w = q4.QWeight.from_gptq(qweight, qzeros, scales, g_idx, group_size=gs, sym=False, checkpoint_format=fmt)
    qw2, qz2, s2, g2 = w.to_gptq(fmt)
    assert torch.equal(qw2, qweight) and torch.equal(qz2, qzeros) and torch.equal(s2, scales) and torch.equal(g2, g_idx)
    assert torch.equal(w.q, q) and torch.equal(w.zeros, zeros) and torch.equal(w.g_idx, g_idx)
    assert w.identity_perm == (not act_order)
    # dequantize is the GPTQ formula
    ref = scales.float()[g_idx.long()] * (q.float() - zeros.float()[g_idx.long()])
    assert torch.equal(w.dequantize(), ref)


def test_qweight_keeps_only_the_tiled_codes():
    w, _ = make_layer(512, 64, 128, bias=True)
    kp, np_ = w.padded_in_features, 64
    assert w.codes.numel() * 4 == kp * np_ // 2  # 4 bits per weight, once
    held = [v for v in vars(w).values() if isinstance(v, torch.Tensor)]
    code_bytes = sum(t.numel() * t.element_size() for t in held if t.dtype in (torch.int32, torch.uint8))
    assert code_bytes == w.codes.numel() * 4 + w.tile_zeros.numel() + w.perm.numel() * 4 + w.block_group.numel() * 4
    assert (w.in_features, w.out_features, w.group_size, w.sym, w.device.type) == (512, 64, 128, True, "cpu")


def test_rtn_helpers_still_work():
    gen = torch.Generator().manual_seed(6)
    dense = torch.randn(48, 256, generator=gen)
    w = q4.qweight_rtn(dense, 64, sym=False)
    q, zeros, scales, g_idx = q4.quantize_rtn(dense, 64, sym=False)
    assert torch.equal(w.q, q) and torch.equal(w.zeros, zeros) and torch.equal(w.scales, scales)
    rel = (w.dequantize().t() - dense).norm() / dense.norm()
    assert 0.01 < float(rel) < 0.2  # 4-bit RTN: coarse but close


# ------------------------------------------------------------------------------------------------
# Numerics: native kernels (every ISA level, both CPU paths) vs the C++ and torch references
# ------------------------------------------------------------------------------------------------

LAYERS = {
    # name: (K, N, group size, act_order, sym, checkpoint_format, bias, uneven groups)
    "g32_sym_v1_bias": (352, 88, 32, False, True, "gptq", True, False),
    "g64_actorder_asym_v2": (320, 40, 64, True, False, "gptq_v2", False, False),
    "g128_actorder_sym_v2_bias": (384, 72, 128, True, True, "gptq_v2", True, False),
    "g128_asym_v1": (512, 24, 128, False, False, "gptq", False, False),
    "perchannel_asym_v1_Kpad": (200, 56, -1, False, False, "gptq", True, False),
    "perchannel_actorder_sym_v2": (1064, 16, -1, True, True, "gptq_v2", False, False),
    "g32_actorder_asym_v1_N8": (96, 8, 32, True, False, "gptq", False, False),
    "uneven_groups_asym_v2": (264, 24, 32, False, False, "gptq_v2", True, True),
}


@pytest.mark.parametrize("name", list(LAYERS))
def test_native_matches_references(name, restore_isa):
    k, n, gs, act, sym, fmt, bias, uneven = LAYERS[name]
    w, _ = make_layer(k, n, gs, act_order=act, sym=sym, fmt=fmt, bias=bias, uneven=uneven, seed=7)
    gen = torch.Generator().manual_seed(8)
    for i, m in enumerate(MS):
        dtype = DTYPES[i % 3]
        x = (torch.randn(m, k, generator=gen) * torch.rand(m, 1, generator=gen) * 3).to(dtype)
        ref = q4.matmul_ref(x, w).float()
        tol = _tol_exact(x, w, ref, dtype)
        bound = q4.int8_error_bound(x, w)
        cref_exact = q4.matmul_native_ref(x, w, exact=True).float()
        cref_int8 = q4.matmul_native_ref(x, w, exact=False).float()
        assert ((cref_exact - ref).abs() <= tol).all(), f"C++ reference vs torch, M={m} {dtype}"
        assert ((cref_int8 - ref).abs() <= bound * 1.001 + tol).all(), f"C++ int8 reference, M={m} {dtype}"
        for isa in ISAS:
            lib.set_isa_cap(isa)
            ye = q4.matmul(x, w, exact=True).float()
            yi = q4.matmul(x, w, exact=False).float()
            where = f"{name} isa={isa} M={m} {dtype}"
            assert ((ye - cref_exact).abs() <= tol).all(), f"exact vs C++ ref: {where}, max {(ye - cref_exact).abs().max()}"
            assert ((ye - ref).abs() <= tol).all(), f"exact vs torch: {where}"
            assert ((yi - cref_int8).abs() <= tol).all(), f"int8 vs C++ int8 ref: {where}, max {(yi - cref_int8).abs().max()}"
            assert ((yi - ref).abs() <= bound * 1.001 + tol).all(), f"int8 vs torch bound: {where}"
            if dtype == torch.float32:
                assert not torch.equal(yi, ye), f"int8 path gave the exact result: {where}"  # it really quantized


def test_int8_activation_quantization_contract():
    """The INT8 mode is x_hat @ W with x_hat from the documented per-block rule (re-derived here in torch)."""
    w, _ = make_layer(256, 32, 64, act_order=True, sym=False, seed=9)
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(3, 256, generator=gen) * torch.tensor([[1.0], [1e-3], [50.0]])
    x[0, :40] = 0.0  # an all-zero block
    x[1, 5] = 0.5  # a block dominated by one value
    valid = w.perm >= 0
    xl = torch.zeros(3, w.padded_in_features)
    xl[:, valid] = x[:, w.perm[valid].long()]
    blocks = xl.view(3, -1, 32)
    amax = blocks.abs().amax(dim=2, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    xi = torch.clamp(torch.round(blocks * inv), -127, 127)  # round half to even, as the kernels
    xhat_l = (xi * (amax / 127.0)).view(3, -1)
    xhat = torch.zeros_like(x)
    xhat[:, w.perm[valid].long()] = xhat_l[:, valid]
    want = xhat.double() @ w.dequantize().double()
    got = q4.matmul_native_ref(x, w, exact=False).double()
    err = (got - want).abs() / (xhat.abs().double() @ w.dequantize().abs().double())
    assert err.max() < 1e-6, err.max(dim=1)


def test_real_qwen_shapes():
    """Qwen2.5-7B (docs/MODEL.md §1.5): hidden 3584, q+k+v = 3584 + 512 + 512 = 4608 (W_pack), intermediate
    18944 (down_proj input; a 128-column slice keeps the test fast), group 128, act-order, asymmetric."""
    gen = torch.Generator().manual_seed(11)
    for k, n in ((3584, 4608), (18944, 128)):
        w, _ = make_layer(k, n, 128, act_order=True, sym=False, fmt="gptq", bias=True, seed=12)
        x = torch.randn(2, k, generator=gen)
        ref = q4.matmul_ref(x, w)
        tol = _tol_exact(x, w, ref, torch.float32)
        assert ((q4.matmul(x, w, exact=True) - ref).abs() <= tol).all()
        assert ((q4.matmul(x, w, exact=False) - ref).abs() <= q4.int8_error_bound(x, w) * 1.001 + tol).all()


def test_huge_page_advice_keeps_results(monkeypatch):
    """The first call on a codes buffer of >= 4 MiB advises it onto 2 MiB pages (MADV_HUGEPAGE + MADV_COLLAPSE:
    the kernel copies the pages, so a wrong range or a bug there would show as changed bytes or outputs).
    Two copies of one layer, one left alone (OMNI_EDGE_Q4_HUGEPAGES=0 when first seen) and one advised, give
    bit-identical outputs, both within the documented bounds of the torch reference, and the codes are intact."""
    k, n = 4096, 2048 + 8  # 4.2 MB of codes; N not a multiple of 16 (a partial last tile)
    w, _ = make_layer(k, n, 128, sym=False, bias=True, seed=31)
    codes_before = w.codes.clone()
    twin = q4.QWeight._from_packed({"codes": w.codes.clone(), "scales": w.tile_scales, "zeros": w.tile_zeros,
                                    "perm": w.perm, "block_group": w.block_group}, k, n, 128, False, w.bias)
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(32))
    monkeypatch.setenv("OMNI_EDGE_Q4_HUGEPAGES", "0")
    plain = q4.matmul(x, twin, exact=False)
    monkeypatch.delenv("OMNI_EDGE_Q4_HUGEPAGES")
    advised = q4.matmul(x, w, exact=False)
    assert torch.equal(advised, plain)
    assert torch.equal(w.codes, codes_before)
    ref = q4.matmul_ref(x, w)
    tol = _tol_exact(x, w, ref, torch.float32)
    assert ((advised - ref).abs() <= q4.int8_error_bound(x, w) * 1.001 + tol).all()
    assert ((q4.matmul(x, w, exact=True) - ref).abs() <= tol).all()


def test_leading_dims_empty_and_threads():
    w, _ = make_layer(128, 40, 32, act_order=True, sym=False, bias=True, seed=13)
    x = torch.randn(2, 3, 128, generator=torch.Generator().manual_seed(14))
    for exact in (True, False):
        y = q4.matmul(x, w, exact=exact)
        assert y.shape == (2, 3, 40)
        assert torch.equal(y.reshape(6, 40), q4.matmul(x.reshape(6, 128), w, exact=exact))
    out = torch.full((2, 3, 40), float("nan"))
    assert q4.matmul(x, w, out=out) is out and torch.equal(out, q4.matmul(x, w))
    with pytest.raises(ValueError, match=r"out: expected shape \(2, 3, 40\)"):
        q4.matmul(x, w, out=torch.empty(6, 40))
    with pytest.raises(ValueError, match="out: expected dtype float32"):
        q4.matmul(x, w, out=torch.empty(2, 3, 40, dtype=torch.float16))
    assert q4.matmul(torch.zeros(0, 128), w).shape == (0, 40)
    assert q4.matmul(torch.zeros(4, 0, 128), w).shape == (4, 0, 40)
    # each output tile is computed by one thread: results do not depend on the thread count
    threads = lib.num_threads()
    try:
        x2 = torch.randn(9, 128, generator=torch.Generator().manual_seed(15))
        lib.set_num_threads(1)
        one = q4.matmul(x2, w)
        lib.set_num_threads(max(2, threads))
        assert torch.equal(q4.matmul(x2, w), one)
    finally:
        lib.set_num_threads(threads)


def test_thread_pool_concurrent_callers_and_thread_counts():
    """Several Python threads calling at once (the pool serves one job at a time) and changing thread counts
    give the same results as one quiet call."""
    import threading
    layers = [make_layer(k, n, 32, act_order=a, seed=26 + i)[0] for i, (k, n, a) in
              enumerate([(256, 200, True), (96, 40, False), (512, 24, False)])]
    gen = torch.Generator().manual_seed(27)
    xs = [torch.randn(m, w.in_features, generator=gen) for m, w in zip((1, 5, 33), layers)]
    want = [q4.matmul(x, w) for x, w in zip(xs, layers)]
    errors = []

    def hammer(i):
        for j in range(30):
            k = (i + j) % 3
            if not torch.equal(q4.matmul(xs[k], layers[k]), want[k]):
                errors.append((i, j))

    threads = lib.num_threads()
    try:
        for n in (3, 1, 2):
            lib.set_num_threads(n)
            ts = [threading.Thread(target=hammer, args=(i,)) for i in range(4)]
            for t in ts:
                t.start()
            for t in ts:
                t.join()
    finally:
        lib.set_num_threads(threads)
    assert not errors


def test_default_path_and_switches():
    w, _ = make_layer(128, 16, 32, seed=16)
    x = torch.randn(1, 128, generator=torch.Generator().manual_seed(17))
    ye, yi = q4.matmul(x, w, exact=True), q4.matmul(x, w, exact=False)
    assert not torch.equal(ye, yi)
    assert not q4.exact_default()
    assert torch.equal(q4.matmul(x, w), yi)  # INT8 by default
    with q4.exact_mode():
        assert torch.equal(q4.matmul(x, w), ye)
    assert torch.equal(q4.matmul(x, w), yi)
    code = "from omni_edge.ops import q4; print(q4.exact_default())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**__import__("os").environ, "OMNI_EDGE_Q4_EXACT": "1"})
    assert out.stdout.strip() == "True"


def test_self_check_runs_and_can_fail(monkeypatch):
    q4.self_check(torch.device("cpu"))
    monkeypatch.setattr(q4, "matmul_ref", lambda x, w: torch.zeros(x.shape[0], w.out_features))
    with pytest.raises(AssertionError, match="q4"):
        q4.self_check(torch.device("cpu"))


# ------------------------------------------------------------------------------------------------
# Errors: clean ValueErrors naming what was expected
# ------------------------------------------------------------------------------------------------

def test_matmul_rejects_bad_inputs():
    w, _ = make_layer(64, 16, 32, seed=18)
    with pytest.raises(ValueError, match="x: expected dtype"):
        q4.matmul(torch.zeros(1, 64, dtype=torch.int32), w)
    with pytest.raises(ValueError, match=r"x: expected shape \(\.\.\., 64\)"):
        q4.matmul(torch.zeros(1, 63), w)
    with pytest.raises(ValueError, match="contiguous"):
        q4.matmul(torch.zeros(64, 2).t(), w)
    with pytest.raises(ValueError, match="expected a tensor on cpu"):
        q4.matmul(torch.zeros(1, 64, device="meta"), w)
    with pytest.raises(ValueError, match="QWeight"):
        q4.matmul(torch.zeros(1, 64), torch.zeros(64, 16))


def test_from_gptq_rejects_bad_tensors():
    q, zeros, scales, g_idx, _ = make_codes(64, 16, 32, seed=19)
    qw, qz = q4.pack_gptq(q, zeros)
    ok = dict(group_size=32, sym=True)
    with pytest.raises(ValueError, match="bits"):
        q4.QWeight.from_gptq(qw, qz, scales, g_idx, bits=8, **ok)
    with pytest.raises(ValueError, match=r"qzeros: expected shape \(2, 2\)"):
        q4.QWeight.from_gptq(qw, qz[:1], scales, g_idx, **ok)
    with pytest.raises(ValueError, match=r"scales: expected shape \(2, 16\)"):
        q4.QWeight.from_gptq(qw, qz, scales[:, :8], g_idx, **ok)
    with pytest.raises(ValueError, match="N must be a multiple of 8"):
        q4.QWeight.from_gptq(qw[:, :12], qz, scales, g_idx, **ok)
    with pytest.raises(ValueError, match=r"g_idx: values must lie in \[0, 2\)"):
        q4.QWeight.from_gptq(qw, qz, scales, g_idx + 1, **ok)
    with pytest.raises(ValueError, match="qweight: expected dtype int32"):
        q4.QWeight.from_gptq(qw.to(torch.int64), qz, scales, g_idx, **ok)
    with pytest.raises(ValueError, match="checkpoint_format"):
        q4.QWeight.from_gptq(qw, qz, scales, g_idx, checkpoint_format="awq", **ok)
    with pytest.raises(ValueError, match="bias: expected shape"):
        q4.QWeight.from_gptq(qw, qz, scales, g_idx, bias=torch.zeros(15), **ok)


def test_kernel_rejects_corrupted_layout_and_workspace():
    w, _ = make_layer(96, 16, 32, act_order=True, seed=20)
    x = torch.randn(1, 96)

    def corrupted(**changes):
        packed = {"codes": w.codes, "scales": w.tile_scales, "zeros": w.tile_zeros, "perm": w.perm.clone(),
                  "block_group": w.block_group.clone()}
        packed.update(changes)
        return q4.QWeight._from_packed(packed, 96, 16, 32, True, None)

    bad_perm = w.perm.clone()
    bad_perm[3] = 1000
    bad_group = w.block_group.clone()
    bad_group[1] = 7
    for exact in (True, False):
        with pytest.raises(ValueError, match=r"perm.*outside \[-1, K=96\)"):
            q4.matmul(x, corrupted(perm=bad_perm), exact=exact)
        with pytest.raises(ValueError, match=r"block_group\[1\] = 7 outside \[0, 3\)"):
            q4.matmul(x, corrupted(block_group=bad_group), exact=exact)
    with pytest.raises(ValueError, match=r"perm.*outside"):
        q4.matmul_native_ref(x, corrupted(perm=bad_perm))
    y = torch.empty(1, 16)
    with pytest.raises(ValueError, match="workspace needs"):
        lib.q4_matmul_cpu(w._handle, x.data_ptr(), 0, 1, y.data_ptr(), 1, 0, 0)
    with pytest.raises(ValueError, match="mode must be"):
        lib.q4_matmul_cpu(w._handle, x.data_ptr(), 0, 1, y.data_ptr(), 5, 0, 0)
    with pytest.raises(ValueError, match="dtype code"):
        lib.q4_matmul_ref_cpu(w._handle, x.data_ptr(), 7, 1, y.data_ptr(), 0)


# ------------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU)
# ------------------------------------------------------------------------------------------------

def _gpu_ready() -> bool:
    return torch.cuda.is_available() and lib.build_info()["cuda_compiled"] and bool(lib.cuda_devices())




@pytest.mark.parametrize("kernel", ["gemv", "gemm"])
@pytest.mark.parametrize("name", ["g32_sym_v1_bias", "g128_actorder_sym_v2_bias", "perchannel_asym_v1_Kpad",
                                  "uneven_groups_asym_v2", "g32_actorder_asym_v1_N8"])
@pytest.mark.cuda
@pytest.mark.skipif(not _gpu_ready(), reason="needs an NVIDIA GPU and the CUDA kernels")
def test_cuda_kernels_match_reference(name, kernel):
    k, n, gs, act, sym, fmt, bias, uneven = LAYERS[name]
    w_cpu, _ = make_layer(k, n, gs, act_order=act, sym=sym, fmt=fmt, bias=bias, uneven=uneven, seed=21)
    dev = torch.device("cuda")
    w = w_cpu.to(dev)
    gen = torch.Generator().manual_seed(22)
    ms = (1, 2, 3, 7, 8) if kernel == "gemv" else (1, 9, 17, 100, 130)
    for m in ms:
        for dtype in DTYPES:
            x = torch.randn(m, k, generator=gen).to(dtype)
            ref = q4.matmul_ref(x, w_cpu).float()
            y = torch.empty(m, n, dtype=dtype, device=dev)
            xd = x.to(dev)
            q4._cuda_matmul(lib, xd, w, y, m, {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}[dtype],
                            1 if kernel == "gemv" else 2)
            torch.cuda.synchronize()
            err = (y.float().cpu() - ref).abs()
            assert (err <= _tol_exact(x, w_cpu, ref, dtype)).all(), f"{name} {kernel} M={m} {dtype}: max {err.max()}"


@pytest.mark.cuda
@pytest.mark.skipif(not _gpu_ready(), reason="needs an NVIDIA GPU and the CUDA kernels")
def test_cuda_dispatch_self_check_and_round_trip():
    dev = torch.device("cuda")
    q4.self_check(dev)
    w_cpu, _ = make_layer(384, 72, 128, act_order=True, sym=False, bias=True, seed=23)
    w = w_cpu.to(dev)
    assert w.device.type == "cuda" and torch.equal(w.to("cpu").codes, w_cpu.codes)
    x = torch.randn(3, 5, 384, device=dev)
    y = q4.matmul(x, w)
    ref = q4.matmul_ref(x.cpu(), w_cpu)
    assert y.shape == (3, 5, 72) and (y.cpu() - ref).abs().max() <= 1e-4 * ref.abs().max()
    with pytest.raises(ValueError, match="expected a tensor on cuda"):
        q4.matmul(x.cpu(), w)
    qw, qz = q4.pack_gptq(*make_codes(256, 16, 64, sym=False, seed=24)[:2])
    wg = q4.QWeight.from_gptq(qw.to(dev), qz.to(dev), make_codes(256, 16, 64, sym=False, seed=24)[2].to(dev), None,
                              group_size=64, sym=False)
    assert wg.codes.device.type == "cuda"


# ------------------------------------------------------------------------------------------------
# NEON (AArch64): cross-compiled and run under qemu when the tools are installed
# ------------------------------------------------------------------------------------------------

NEON_CHECK_CPP = r"""
// q4 NEON kernels vs the portable scalar kernels vs the scalar reference, on random layers (odd shapes,
// per-channel with K padding, act-order perm), both CPU modes. Built for AArch64 and run under qemu-aarch64
// by test_neon_kernels_under_qemu when a cross compiler and qemu are installed.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>
#include "common/cpu_features.h"
#include "common/half.h"
#include "q4/q4.h"
static uint32_t rng = 12345;
static uint32_t rnd() { rng = rng * 1664525u + 1013904223u; return rng >> 8; }
int main() {
  int fails = 0;
  const int64_t shapes[][3] = {{96, 24, 32}, {200, 40, 200}, {384, 72, 128}};
  for (auto& sh : shapes) {
    const int64_t K = sh[0], N = sh[1], gs = sh[2];
    const int64_t Kp = (K + 31) / 32 * 32, nt = (N + 15) / 16, G = (K + gs - 1) / gs;
    std::vector<uint32_t> codes(nt * Kp / 8 * 16);
    for (auto& v : codes) v = rnd() ^ (rnd() << 16);
    std::vector<uint16_t> sc(nt * G * 16); std::vector<uint8_t> z(nt * G * 16);
    for (auto& v : sc) v = oe::f32_to_f16((rnd() % 1000) * 2e-5f + 1e-3f);
    for (auto& v : z) v = rnd() % 16;
    std::vector<int32_t> bg(Kp / 32), perm(Kp);
    for (int64_t b = 0; b < Kp / 32; ++b) bg[b] = std::min<int64_t>(G - 1, b * 32 / gs);
    for (int64_t r = 0; r < Kp; ++r) perm[r] = r < K ? (int32_t)((r * 7) % K) : -1;  // a permutation when gcd(7,K)=1
    std::vector<float> bias(N); for (auto& v : bias) v = (rnd() % 100) * 0.01f;
    for (int use_perm = 0; use_perm < 2; ++use_perm) {
      oe_q4_weight w{codes.data(), sc.data(), z.data(), use_perm ? perm.data() : nullptr, bg.data(), bias.data(), K, N, Kp, G};
      for (int M : {1, 3, 5, 9}) {
        std::vector<float> x(M * K); for (auto& v : x) v = ((int)(rnd() % 2001) - 1000) * 1e-3f;
        for (int mode = 0; mode < 2; ++mode) {
          std::vector<float> yn(M * N), ys(M * N), yr(M * N);
          std::vector<uint8_t> ws(oe_q4_cpu_workspace_bytes(M, Kp, mode));
          oe::isa_set_cap(oe::Isa::Neon);
          if (oe::isa_active() != oe::Isa::Neon) { printf("neon not active\n"); return 2; }
          if (oe_q4_matmul_cpu(&w, x.data(), 0, M, yn.data(), mode, ws.data(), ws.size())) { printf("err %s\n", oe_last_error()); return 3; }
          oe::isa_set_cap(oe::Isa::Scalar);
          oe_q4_matmul_cpu(&w, x.data(), 0, M, ys.data(), mode, ws.data(), ws.size());
          oe_q4_matmul_ref_cpu(&w, x.data(), 0, M, yr.data(), mode);
          double worst = 0;
          for (int64_t m = 0; m < M; ++m)
            for (int64_t n = 0; n < N; ++n) {
              double mag = 1e-6;  // sum_k |x_k| * max|w| (scales < 0.021, |q - z| <= 15)
              for (int64_t k = 0; k < K; ++k) mag += std::fabs(x[m * K + k]) * 0.02 * 15;
              const double e = std::max(std::fabs(yn[m * N + n] - yr[m * N + n]), std::fabs(ys[m * N + n] - yr[m * N + n])) / mag;
              worst = std::max(worst, e);
            }
          const bool ok = worst < 1e-6;
          fails += !ok;
          printf("K=%ld N=%ld g=%ld perm=%d M=%d mode=%d  max err / sum|x||w| = %.2e %s\n", (long)K, (long)N, (long)gs, use_perm, M, mode, worst, ok ? "ok" : "FAIL");
        }
      }
    }
  }
  printf(fails ? "FAILED %d\n" : "all ok\n", fails);
  return fails != 0;
}
"""


def test_neon_kernels_under_qemu(tmp_path):
    """The NEON file cannot run natively on x86; build it with the kernel sources for AArch64 and run the
    harness above (NEON vs scalar vs reference, both modes, tolerance 1e-6 of sum |x| max|w|)."""
    import shutil
    from pathlib import Path
    cxx, qemu = shutil.which("aarch64-linux-gnu-g++"), shutil.which("qemu-aarch64")
    root = Path(__file__).resolve().parents[1]
    if not (cxx and qemu and (root / "csrc" / "q4" / "q4_neon.cpp").exists()):
        pytest.skip("needs aarch64-linux-gnu-g++, qemu-aarch64 and a source checkout")
    src = [root / "csrc" / "common" / p for p in ("cpu_features.cpp", "oe.cpp", "pool.cpp")]
    src += [p for p in sorted((root / "csrc" / "q4").glob("*.cpp")) if "_avx" not in p.name]
    harness = tmp_path / "q4_neon_check.cpp"
    harness.write_text(NEON_CHECK_CPP)
    exe = tmp_path / "q4_neon_check"
    subprocess.run([cxx, "-std=c++17", "-O2", "-static", "-pthread", "-DOE_ARCH_ARM64=1",
                    f"-I{root / 'csrc'}", *map(str, src), str(harness), "-o", str(exe)],
                   check=True, capture_output=True, timeout=300)
    out = subprocess.run([qemu, str(exe)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "all ok" in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]
