"""Attention kernels (csrc/attention via omni_edge.ops.attention) against the scalar C++ reference and the
torch references, on odd shapes, every dtype and every CPU instruction-set level.

Tolerance rules (the project's rule: attention at most 2x the error of a same-precision torch version):
- vs the fp32 torch reference (`*_ref` on the inputs upcast to fp32, i.e. the exact same rounded values):
  max error of ours <= 2 * max error of torch's scaled_dot_product_attention run in the input dtype, + 1e-5.
  The 1e-5 floor (values are O(1)) covers fp32, where both errors are fp32 summation-order noise and torch's
  can be smaller than ours by chance.
- vs the scalar C++ reference: both compute in fp32 and differ only in summation order (~1e-6 relative),
  so after rounding to the output dtype they agree to one unit in the last place: rtol = machine epsilon of
  the dtype (fp32: 1e-5), atol 1e-5.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from omni_edge import _native
from omni_edge.ops import _check, _dispatch
from omni_edge.ops import attention as A
from omni_edge.testing import cpu_isa_levels

C = _native.lib()
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ISAS = cpu_isa_levels()
EPS = {torch.float32: 1e-5, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}
FLOOR = 1e-5

has_cuda = torch.cuda.is_available() and C.build_info()["cuda_compiled"]


pytestmark = pytest.mark.usefixtures("restore_isa")  # conftest: the user's OMNI_EDGE_ISA cap comes back


def test_native_path_is_taken_on_cpu():
    # Without this the comparisons below would compare the torch reference with itself.
    assert _dispatch.native_enabled("attention", torch.device("cpu"))


def rnd(g, shape, dtype, device="cpu"):
    return torch.randn(*shape, generator=g).to(dtype).to(device)


# ------------------------------------------------------------------------------------------------
# Same-precision torch versions (the peers of the tolerance rule) and the C++ reference callers
# ------------------------------------------------------------------------------------------------

def sdpa_prefill(q, kc, vc, start, lengths):
    b, t, hq, d = q.shape
    rep = hq // kc.shape[1]
    end = start + t
    outs = []
    for i in range(b):
        n = end if lengths is None else min(end, int(lengths[i]))
        pq = torch.arange(start, end)
        pk = torch.arange(end)
        mask = (pk[None, :] <= pq[:, None]) & (pk[None, :] < n)
        k = kc[i, :, :end].repeat_interleave(rep, 0)
        v = vc[i, :, :end].repeat_interleave(rep, 0)
        o = F.scaled_dot_product_attention(q[i].transpose(0, 1), k, v, attn_mask=mask.to(q.device))
        o = o * (pq < n).to(q.device).view(1, t, 1).to(o.dtype)
        outs.append(o.transpose(0, 1))
    return torch.stack(outs)


def sdpa_decode(q, kc, vc, lengths):
    b, hq, d = q.shape
    rep = hq // kc.shape[1]
    outs = []
    for i in range(b):
        n = int(lengths[i])
        k = kc[i, :, :n].repeat_interleave(rep, 0)
        v = vc[i, :, :n].repeat_interleave(rep, 0)
        if n == 0:
            outs.append(torch.zeros_like(q[i]))
            continue
        outs.append(F.scaled_dot_product_attention(q[i].unsqueeze(1), k, v)[:, 0])
    return torch.stack(outs)


def sdpa_varlen(q, k, v, cu):
    out = torch.zeros_like(q)
    cu = [int(c) for c in cu]
    for a, e in zip(cu[:-1], cu[1:]):
        if e > a:
            out[a:e] = F.scaled_dot_product_attention(
                q[a:e].transpose(0, 1), k[a:e].transpose(0, 1), v[a:e].transpose(0, 1)).transpose(0, 1)
    return out


def cref_prefill(q, kc, vc, start, lengths):
    b, t, hq, d = q.shape
    out = torch.empty_like(q)
    C.attention_prefill_ref(q.data_ptr(), kc.data_ptr(), vc.data_ptr(), out.data_ptr(), b, t, hq, kc.shape[1],
                            kc.shape[2], d, start, 0 if lengths is None else lengths.data_ptr(), 1 / math.sqrt(d),
                            _check.DTYPE_CODE[q.dtype])
    return out


def cref_decode(q, kc, vc, lengths):
    b, hq, d = q.shape
    out = torch.empty_like(q)
    C.attention_decode_ref(q.data_ptr(), kc.data_ptr(), vc.data_ptr(), out.data_ptr(), b, hq, kc.shape[1],
                           kc.shape[2], d, lengths.data_ptr(), 1 / math.sqrt(d), _check.DTYPE_CODE[q.dtype])
    return out


def cref_varlen(q, k, v, cu):
    n, h, d = q.shape
    out = torch.empty_like(q)
    C.attention_varlen_ref(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), n, h, d, cu.data_ptr(),
                           cu.numel() - 1, 1 / math.sqrt(d), _check.DTYPE_CODE[q.dtype])
    return out


def check_vs_fp32(ours, ref32, peer, what):
    err = (ours.float() - ref32).abs().max().item()
    peer_err = (peer.float() - ref32).abs().max().item()
    assert err <= 2 * peer_err + FLOOR, f"{what}: error {err:.3g} > 2 x torch same-precision error {peer_err:.3g} + {FLOOR}"


def check_vs_cref(ours, cref, what):
    torch.testing.assert_close(ours.float(), cref.float(), rtol=EPS[ours.dtype], atol=1e-5, msg=lambda m: f"{what}: {m}")


# ------------------------------------------------------------------------------------------------
# Prefill
# ------------------------------------------------------------------------------------------------

# (B, T, Hq, Hkv, S, D, start, lengths or None)
PREFILL_CASES = [
    (1, 1, 4, 4, 1, 64, 0, None),                 # one token, one key
    (2, 3, 7, 1, 9, 59, 6, [8, 9]),               # odd head dim, GQA 7, lengths cut inside the new tokens
    (2, 17, 4, 2, 40, 80, 5, [22, 0]),            # GQA 2, a sequence with no valid positions
    (1, 97, 14, 2, 100, 128, 3, None),            # GQA 7 at head dim 128, start offset
    (2, 129, 2, 2, 129, 64, 0, [129, 100]),       # GQA 1, T not a multiple of any tile
]
# every case in every dtype, plus a long prompt in bf16 only (to keep the file fast)
PREFILL_PARAMS = [(c, dt) for c in PREFILL_CASES for dt in DTYPES] + [((1, 1025, 2, 1, 1025, 64, 0, None), torch.bfloat16)]


@pytest.mark.parametrize("case,dtype", PREFILL_PARAMS,
                         ids=lambda v: f"B{v[0]}T{v[1]}H{v[2]}/{v[3]}S{v[4]}D{v[5]}" if isinstance(v, tuple) else str(v))
def test_prefill(case, dtype):
    b, t, hq, hkv, s, d, start, lens = case
    g = torch.Generator().manual_seed(t * 31 + d)
    q, kc, vc = rnd(g, (b, t, hq, d), dtype), rnd(g, (b, hkv, s, d), dtype), rnd(g, (b, hkv, s, d), dtype)
    lengths = None if lens is None else torch.tensor(lens, dtype=torch.int32)
    ref32 = A.prefill_ref(q.float(), kc.float(), vc.float(), start=start, lengths=lengths)
    peer = sdpa_prefill(q, kc, vc, start, lengths)
    cref = cref_prefill(q, kc, vc, start, lengths)
    check_vs_fp32(cref, ref32, peer, "C++ reference")
    for isa in ISAS:
        C.set_isa_cap(isa)
        ours = A.prefill(q, kc, vc, start=start, lengths=lengths)
        assert ours.dtype == dtype and ours.shape == q.shape
        check_vs_fp32(ours, ref32, peer, f"prefill[{isa}]")
        check_vs_cref(ours, cref, f"prefill[{isa}] vs C++ reference")
        if lengths is not None:  # queries at positions >= lengths[b] give exact zeros
            for i in range(b):
                first_pad = max(0, int(lengths[i]) - start)
                if first_pad < t:
                    assert ours[i, first_pad:].abs().max().item() == 0


def test_prefill_matches_decode_steps():
    # Prefill of T tokens equals T decode steps with growing lengths (the cache is shared).
    g = torch.Generator().manual_seed(5)
    b, t, hq, hkv, s, d = 2, 9, 28, 4, 16, 128
    q, kc, vc = rnd(g, (b, t, hq, d), torch.float32), rnd(g, (b, hkv, s, d), torch.float32), rnd(g, (b, hkv, s, d), torch.float32)
    out = A.prefill(q, kc, vc, start=2)
    for i in range(t):
        step = A.decode(q[:, i].contiguous(), kc, vc, torch.full((b,), 2 + i + 1, dtype=torch.int32))
        torch.testing.assert_close(out[:, i], step, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Decode
# ------------------------------------------------------------------------------------------------

# (Hq, Hkv, S, D, lengths)
DECODE_CASES = [
    (4, 4, 1, 64, [1]),
    (7, 1, 3, 59, [3, 2]),
    (14, 2, 17, 80, [17, 1, 0]),
    (28, 4, 97, 128, [97]),
    (6, 3, 129, 64, [129, 128]),
    (28, 4, 1025, 128, [1025, 1, 700]),
]


@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: f"H{c[0]}/{c[1]}S{c[2]}D{c[3]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decode(case, dtype):
    hq, hkv, s, d, lens = case
    b = len(lens)
    g = torch.Generator().manual_seed(s * 7 + d)
    q, kc, vc = rnd(g, (b, hq, d), dtype), rnd(g, (b, hkv, s, d), dtype), rnd(g, (b, hkv, s, d), dtype)
    lengths = torch.tensor(lens, dtype=torch.int32)
    ref32 = A.decode_ref(q.float(), kc.float(), vc.float(), lengths)
    peer = sdpa_decode(q, kc, vc, lengths)
    cref = cref_decode(q, kc, vc, lengths)
    check_vs_fp32(cref, ref32, peer, "C++ reference")
    for isa in ISAS:
        C.set_isa_cap(isa)
        for splits in (None, 1, 3, 16):  # 16 splits of 1025 keys: each split a few tiles, some empty
            ours = A.decode(q, kc, vc, lengths, num_splits=splits)
            check_vs_fp32(ours, ref32, peer, f"decode[{isa}, splits={splits}]")
            check_vs_cref(ours, cref, f"decode[{isa}, splits={splits}] vs C++ reference")
        if bool((lengths == 0).any()):
            assert ours[lengths == 0].abs().max().item() == 0


# ------------------------------------------------------------------------------------------------
# Varlen (block-diagonal, non-causal)
# ------------------------------------------------------------------------------------------------

VARLEN_CASES = [
    ([0, 0, 1, 18, 18, 115], 3, 80),   # empty and length-1 segments, ViT head dim
    ([0, 129, 130, 227], 2, 64),       # audio-encoder head dim, a segment longer than a query block
    ([0, 5, 9], 1, 59),                # generic head dim
    ([0, 0], 2, 128),                  # no rows at all
]


@pytest.mark.parametrize("case", VARLEN_CASES, ids=lambda c: f"N{c[0][-1]}H{c[1]}D{c[2]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_varlen(case, dtype):
    cu_list, h, d = case
    n = cu_list[-1]
    g = torch.Generator().manual_seed(n + d)
    q, k, v = rnd(g, (n, h, d), dtype), rnd(g, (n, h, d), dtype), rnd(g, (n, h, d), dtype)
    cu = torch.tensor(cu_list, dtype=torch.int32)
    ref32 = A.varlen_ref(q.float(), k.float(), v.float(), cu)
    peer = sdpa_varlen(q, k, v, cu)
    cref = cref_varlen(q, k, v, cu)
    for isa in ISAS:
        C.set_isa_cap(isa)
        ours = A.varlen(q, k, v, cu)
        assert ours.shape == q.shape and ours.dtype == dtype
        if n:
            check_vs_fp32(ours, ref32, peer, f"varlen[{isa}]")
            check_vs_cref(ours, cref, f"varlen[{isa}] vs C++ reference")


def test_varlen_segments_do_not_leak():
    # Changing keys in one segment must not change the outputs of another.
    g = torch.Generator().manual_seed(3)
    q, k, v = (rnd(g, (40, 2, 64), torch.float32) for _ in range(3))
    cu = torch.tensor([0, 15, 40], dtype=torch.int32)
    a = A.varlen(q, k, v, cu)
    k2, v2 = k.clone(), v.clone()
    k2[20:] += 3.0
    v2[20:] -= 1.0
    b = A.varlen(q, k2, v2, cu)
    assert torch.equal(a[:15], b[:15])
    assert not torch.allclose(a[15:], b[15:])


def test_scale_and_large_scores():
    # A large explicit scale stresses the online-softmax rescaling (scores ~ 1e3 apart). The softmax then
    # amplifies fp32 rounding of the scores, so the truth is computed in fp64 and the peer is torch's fp32 SDPA.
    g = torch.Generator().manual_seed(9)
    q, kc, vc = rnd(g, (1, 33, 4, 64), torch.float32), rnd(g, (1, 2, 70, 64), torch.float32), rnd(g, (1, 2, 70, 64), torch.float32)
    pq, pk = torch.arange(37, 70), torch.arange(70)
    mask = pk[None, :] <= pq[:, None]
    k, v = kc[0].repeat_interleave(2, 0), vc[0].repeat_interleave(2, 0)
    truth = F.scaled_dot_product_attention(q[0].transpose(0, 1).double(), k.double(), v.double(), attn_mask=mask, scale=20.0)
    peer = F.scaled_dot_product_attention(q[0].transpose(0, 1), k, v, attn_mask=mask, scale=20.0)
    peer_err = (peer.double() - truth).abs().max().item()
    for isa in ISAS:
        C.set_isa_cap(isa)
        ours = A.prefill(q, kc, vc, start=37, scale=20.0)[0].transpose(0, 1)
        err = (ours.double() - truth).abs().max().item()
        assert err <= 2 * peer_err + FLOOR, f"[{isa}] error {err:.3g} vs torch fp32 {peer_err:.3g}"


def test_write_kv_then_decode():
    g = torch.Generator().manual_seed(11)
    kc = torch.zeros(1, 4, 32, 128, dtype=torch.bfloat16)
    vc = torch.zeros_like(kc)
    k, v = rnd(g, (1, 5, 4, 128), torch.bfloat16), rnd(g, (1, 5, 4, 128), torch.bfloat16)
    A.write_kv(kc, vc, k, v, 3)
    assert torch.equal(kc[0, :, 3:8], k[0].transpose(0, 1))
    q = rnd(g, (1, 28, 128), torch.bfloat16)
    lengths = torch.tensor([8], dtype=torch.int32)
    torch.testing.assert_close(A.decode(q, kc, vc, lengths).float(), A.decode_ref(q, kc, vc, lengths).float(),
                               rtol=EPS[torch.bfloat16], atol=1e-5)


def test_self_check_cpu():
    A.self_check(torch.device("cpu"))


# ------------------------------------------------------------------------------------------------
# Clean errors
# ------------------------------------------------------------------------------------------------

def test_errors():
    q = torch.randn(1, 4, 28, 128)
    kc = torch.randn(1, 4, 16, 128)
    with pytest.raises(ValueError, match="q: expected dtype"):
        A.prefill(q.to(torch.float64), kc, kc, start=0)
    with pytest.raises(ValueError, match="v_cache: expected dtype"):
        A.prefill(q, kc, kc.half(), start=0)
    with pytest.raises(ValueError, match="exceed the cache capacity 16"):
        A.prefill(q, kc, kc, start=13)
    with pytest.raises(ValueError, match="not a multiple"):
        A.prefill(torch.randn(1, 4, 6, 128), kc, kc, start=0)
    with pytest.raises(ValueError, match="head_dim 128 does not match"):
        A.prefill(torch.randn(1, 4, 28, 64), kc, kc, start=0)
    with pytest.raises(ValueError, match="v_cache: expected shape"):
        A.prefill(q, kc, kc[:, :, :8].contiguous(), start=0)
    with pytest.raises(ValueError, match="contiguous"):
        A.prefill(q.transpose(1, 2).contiguous().transpose(1, 2), kc, kc, start=0)
    with pytest.raises(ValueError, match=r"lengths: values must lie in \[0, 16\]"):
        A.decode(q[:, 0].contiguous(), kc, kc, torch.tensor([17], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"lengths: values must lie in \[0, 16\]"):
        A.decode(q[:, 0].contiguous(), kc, kc, torch.tensor([-1], dtype=torch.int32))
    with pytest.raises(ValueError, match="lengths: expected dtype int32"):
        A.decode(q[:, 0].contiguous(), kc, kc, torch.tensor([3]))
    with pytest.raises(ValueError, match="num_splits"):
        A.decode(q[:, 0].contiguous(), kc, kc, torch.tensor([3], dtype=torch.int32), num_splits=0)
    v = torch.randn(10, 2, 64)
    with pytest.raises(ValueError, match="cu_seqlens: expected non-decreasing offsets from 0 to 10"):
        A.varlen(v, v, v, torch.tensor([0, 6, 4, 10], dtype=torch.int32))
    with pytest.raises(ValueError, match="cu_seqlens: expected non-decreasing offsets from 0 to 10"):
        A.varlen(v, v, v, torch.tensor([0, 9], dtype=torch.int32))
    with pytest.raises(ValueError, match="k_cache: expected shape"):
        A.write_kv(kc, kc.clone(), torch.randn(1, 2, 3, 128), torch.randn(1, 2, 3, 128), 0)


def test_kernel_checks_its_own_arguments():
    # The C entry points validate user data themselves (not only the Python op): bad lengths / cu_seqlens
    # are refused before any key is read.
    q = torch.randn(2, 8, 64)
    kc = torch.randn(2, 2, 16, 64)
    out = torch.empty_like(q)
    bad = torch.tensor([3, 17], dtype=torch.int32)
    for fn in (C.attention_decode_cpu, C.attention_decode_ref):
        extra = (0,) if fn is C.attention_decode_cpu else ()
        with pytest.raises(ValueError, match=r"lengths\[1\] = 17 is outside \[0, 16\]"):
            fn(q.data_ptr(), kc.data_ptr(), kc.data_ptr(), out.data_ptr(), 2, 8, 2, 16, 64, bad.data_ptr(), 0.125, 0, *extra)
    with pytest.raises(ValueError, match="head_dim must be in"):
        C.attention_decode_cpu(q.data_ptr(), kc.data_ptr(), kc.data_ptr(), out.data_ptr(), 2, 8, 2, 16, 300,
                               bad.data_ptr(), 0.125, 0, 0)
    v = torch.randn(10, 2, 64)
    cu = torch.tensor([0, 6, 4, 10], dtype=torch.int32)
    with pytest.raises(ValueError, match="cu_seqlens decreases"):
        C.attention_varlen_cpu(v.data_ptr(), v.data_ptr(), v.data_ptr(), v.data_ptr(), 10, 2, 64, cu.data_ptr(), 3, 0.1, 0)


# ------------------------------------------------------------------------------------------------
# CUDA (same checks on the GPU; skipped without one)
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", (64, 80, 128, 59))
@pytest.mark.cuda
@pytest.mark.skipif(not has_cuda, reason="needs an NVIDIA GPU and a CUDA build")
def test_cuda_prefill_decode_varlen(dtype, d):
    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(d)
    with _dispatch.force_native():
        for (b, t, hq, hkv, s, start, lens) in [(2, 97, 28, 4, 130, 3, [100, 60]), (1, 1, 7, 7, 1, 0, None),
                                                (1, 129, 2, 2, 1025, 896, None)]:
            q, kc, vc = rnd(g, (b, t, hq, d), dtype, dev), rnd(g, (b, hkv, s, d), dtype, dev), rnd(g, (b, hkv, s, d), dtype, dev)
            lengths = None if lens is None else torch.tensor(lens, dtype=torch.int32, device=dev)
            ref32 = A.prefill_ref(q.float(), kc.float(), vc.float(), start=start, lengths=lengths)
            check_vs_fp32(A.prefill(q, kc, vc, start=start, lengths=lengths), ref32,
                          sdpa_prefill(q, kc, vc, start, lengths), f"cuda prefill T={t}")
        for (hq, hkv, s, lens) in [(28, 4, 8192, [8192, 1, 0, 5000]), (7, 7, 3, [3]), (16, 1, 1025, [1025, 97])]:
            b = len(lens)
            q, kc, vc = rnd(g, (b, hq, d), dtype, dev), rnd(g, (b, hkv, s, d), dtype, dev), rnd(g, (b, hkv, s, d), dtype, dev)
            lengths = torch.tensor(lens, dtype=torch.int32, device=dev)
            ref32 = A.decode_ref(q.float(), kc.float(), vc.float(), lengths)
            peer = sdpa_decode(q, kc, vc, lengths)
            for splits in (None, 1, 7):
                check_vs_fp32(A.decode(q, kc, vc, lengths, num_splits=splits), ref32, peer,
                              f"cuda decode S={s} splits={splits}")
        cu = torch.tensor([0, 0, 1, 18, 18, 115, 1140], dtype=torch.int32, device=dev)
        q, k, v = (rnd(g, (1140, 3, d), dtype, dev) for _ in range(3))
        check_vs_fp32(A.varlen(q, k, v, cu), A.varlen_ref(q.float(), k.float(), v.float(), cu),
                      sdpa_varlen(q, k, v, cu), "cuda varlen")


@pytest.mark.cuda
@pytest.mark.skipif(not has_cuda, reason="needs an NVIDIA GPU and a CUDA build")
def test_cuda_self_check():
    A.self_check(torch.device("cuda"))
