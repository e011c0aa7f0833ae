"""RVQ decode / encode (csrc/rvq via omni_edge.ops.rvq) against the scalar C++ references and the torch
references, for every codebook dtype and every CPU instruction-set level.

Tolerance rules:
- encode: codes bit-exact (torch.equal) against encode_ref and the C++ reference, including constructed
  exact ties (lowest index wins, as torch.argmin) and near-ties finer than the fp32 screen can resolve.
- decode: fp32 sums within 1e-5 relative of decode_ref (the kernels add the rows in the same layer order, so
  in practice they are bit-identical; the C++ reference is compared bit-exactly).
"""

from __future__ import annotations

import pytest
import torch

from omni_edge import _native
from omni_edge.ops import _check, _dispatch
from omni_edge.ops import rvq as R
from omni_edge.testing import cpu_isa_levels

C = _native.lib()
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ISAS = cpu_isa_levels()
REAL_SIZES = (8192, 4096, 2048, 1024, 1024, 1024, 1024, 1024)  # docs/MODEL.md §1.4 vq_config codebook_sizes
REAL_DIM = 5120
has_cuda = torch.cuda.is_available() and C.build_info()["cuda_compiled"]


pytestmark = pytest.mark.usefixtures("restore_isa")  # conftest: the user's OMNI_EDGE_ISA cap comes back


def test_native_path_is_taken_on_cpu():
    assert _dispatch.native_enabled("rvq", torch.device("cpu"))


def make_books(sizes, d, dtype, seed, device="cpu", scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, d, generator=g) * scale).to(dtype).to(device) for n in sizes]


def cref_decode(codes, books: R.Codebooks):
    out = torch.empty(codes.shape[0], books.dim)
    ptrs, sizes, dim, dt = books._table()
    C.rvq_decode_ref(codes.data_ptr(), codes.dtype == torch.int64, codes.shape[0], ptrs, sizes, dim, dt, out.data_ptr())
    return out


def cref_encode(x, books: R.Codebooks):
    x = x.float().contiguous()
    codes = torch.empty(x.shape[0], books.num_layers, dtype=torch.int64)
    ptrs, sizes, dim, dt = books._table()
    C.rvq_encode_ref(x.data_ptr(), x.shape[0], ptrs, sizes, dim, dt, codes.data_ptr())
    return codes


def close_rel(got, want, rel=1e-5):
    err = (got - want).abs().max().item() if got.numel() else 0.0
    scale = want.abs().max().item() if want.numel() else 0.0
    assert err <= rel * max(scale, 1e-30), f"max error {err:.3g} > {rel} x {scale:.3g}"


# ------------------------------------------------------------------------------------------------
# Decode
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("t", (1, 3, 17))
def test_decode(dtype, t):
    sizes, d = (37, 16, 5, 64, 1), 67
    books = R.Codebooks(make_books(sizes, d, dtype, seed=t))
    g = torch.Generator().manual_seed(100 + t)
    codes = torch.stack([torch.randint(0, n, (t,), generator=g) for n in sizes], dim=1)
    codes[0] = torch.tensor([n - 1 for n in sizes])  # last rows
    want = R.decode_ref(codes, books)
    assert want.dtype == torch.float32 and want.shape == (t, d)
    assert torch.equal(cref_decode(codes, books), want)
    for isa in ISAS:
        C.set_isa_cap(isa)
        for cdt in (torch.int64, torch.int32):
            got = R.decode(codes.to(cdt), books)
            assert got.dtype == torch.float32 and got.shape == (t, d)
            close_rel(got, want)
    # the list form and the packed form agree
    assert torch.equal(R.decode(codes, list(books.tensors)), R.decode(codes, books))


def test_decode_empty():
    books = R.Codebooks(make_books((4, 5), 8, torch.float32, seed=1))
    assert R.decode(torch.empty(0, 2, dtype=torch.int64), books).shape == (0, 8)
    assert R.encode(torch.empty(0, 8), books).shape == (0, 2)


# ------------------------------------------------------------------------------------------------
# Encode
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("t", (1, 3, 17, 70))  # 70 > one 64-frame screening tile
def test_encode_random(dtype, t):
    sizes, d = (37, 16, 5, 64, 1), 67
    books = R.Codebooks(make_books(sizes, d, dtype, seed=t + 7))
    g = torch.Generator().manual_seed(t)
    x = torch.randn(t, d, generator=g) * 1.5
    want = R.encode_ref(x, books)
    assert want.dtype == torch.int64 and want.shape == (t, len(sizes))
    assert torch.equal(cref_encode(x, books), want)
    for isa in ISAS:
        C.set_isa_cap(isa)
        got = R.encode(x, books)
        assert got.dtype == R.CODES_DTYPE == torch.int64
        assert torch.equal(got, want), f"[{isa}] codes differ at {(got != want).nonzero()[:5].tolist()}"
    # low-precision x is converted to fp32 first
    assert torch.equal(R.encode(x.to(dtype), books), R.encode_ref(x.to(dtype).float(), books))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_encode_blocking_edges(dtype):
    # The screening GEMM's blocking (csrc/rvq/rvq_cpu.cpp): 384 frames per pass, register tiles of 6 frames,
    # 128-row work items packed in panels of 16 (AVX2) / 32 (AVX-512) rows, 256-dim slices. 389 frames,
    # dim 300 (one full and one partial slice) and 130 / 17 / 1 rows put every edge in play.
    sizes, d, t = (130, 17, 1, 129), 300, 389
    books = R.Codebooks(make_books(sizes, d, dtype, seed=77))
    g = torch.Generator().manual_seed(78)
    x = torch.randn(t, d, generator=g) * 1.2
    want = R.encode_ref(x, books)
    for isa in ISAS:
        C.set_isa_cap(isa)
        got = R.encode(x, books)
        assert torch.equal(got, want), f"[{isa}] codes differ at {(got != want).nonzero()[:5].tolist()}"


def grid_values(g, shape, denom=16):
    """Random values on a coarse binary grid: exact in every dtype, so sums of squares are exact in fp64."""
    return torch.randint(-2 * denom, 2 * denom + 1, shape, generator=g).float() / denom


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_encode_exact_ties(dtype):
    g = torch.Generator().manual_seed(3)
    d = 40
    b0, b1 = grid_values(g, (30, d)), grid_values(g, (12, d))
    b0[21] = b0[4]                      # duplicate rows: the lower index must win
    b1[9] = b1[2]
    x = torch.stack([
        b0[4] + 1 / 64,                     # nearest to rows 4 and 21 (equal) -> 4
        (b0[6] + b0[17]) / 2,               # exactly midway between rows 6 and 17 -> 6 (if nothing is closer)
        torch.zeros(d),
    ])
    x[2] = b0[4]
    books = R.Codebooks([b0.to(dtype), b1.to(dtype)])
    want = R.encode_ref(x, books)
    assert want[0, 0] == 4 and want[2, 0] == 4
    d6 = ((x[1].double() - b0[6].double()) ** 2).sum()
    d17 = ((x[1].double() - b0[17].double()) ** 2).sum()
    assert d6 == d17
    assert torch.equal(cref_encode(x, books), want)
    for isa in ISAS:
        C.set_isa_cap(isa)
        assert torch.equal(R.encode(x, books), want), isa


@pytest.mark.parametrize("flip", (False, True))
def test_encode_near_ties_below_fp32_screen_resolution(flip):
    # Rows a and b differ in one coordinate by one fp32 ulp; their distances to x differ by ~1e-6, far below
    # one fp32 ulp of the screened values ||c||^2 - 2 x.c (~5e4 here), so the screen cannot order them. The
    # exact re-evaluation must pick the truly nearer one, whichever index it has.
    g = torch.Generator().manual_seed(11)
    d = 512
    base = torch.randn(d, generator=g) * 10
    rows = torch.randn(50, d, generator=g) * 10 + 40  # far away
    a = base + torch.randn(d, generator=g) * 0.01
    b = a.clone()
    b[0] = torch.nextafter(a[0], torch.tensor(float("inf")))
    x = base.clone()
    x[0] = a[0] + 1.0  # x[0] > b[0] > a[0]: b is nearer
    rows[10], rows[30] = (b, a) if flip else (a, b)
    books = R.Codebooks([rows])
    da = ((x.double() - a.double()) ** 2).sum()
    db = ((x.double() - b.double()) ** 2).sum()
    screen_ulp = torch.finfo(torch.float32).eps * float((a.double() ** 2).sum())
    assert 0 < float(da - db) < 1e-3 * screen_ulp
    expected = 10 if flip else 30
    assert int(R.encode_ref(x[None], books)) == expected
    assert int(cref_encode(x[None], books)) == expected
    for isa in ISAS:
        C.set_isa_cap(isa)
        assert int(R.encode(x[None], books)) == expected, isa


def test_encode_large_residual_norm():
    # Codebook rows much smaller than the input (the deep layers' situation reversed): the screen's error
    # bound grows with ||r|| ||c||, many rows become candidates and must still be decided exactly.
    g = torch.Generator().manual_seed(5)
    books = R.Codebooks([torch.randn(300, 96, generator=g) * 1e-3, torch.randn(40, 96, generator=g) * 1e-4])
    x = torch.randn(9, 96, generator=g) * 1e3
    want = R.encode_ref(x, books)
    for isa in ISAS:
        C.set_isa_cap(isa)
        assert torch.equal(R.encode(x, books), want), isa


def test_real_size():
    # The released model's codebook sizes and dim (fp32), a few frames: encode bit-exact, decode within 1e-5.
    g = torch.Generator().manual_seed(2024)
    books = R.Codebooks([torch.randn(n, REAL_DIM, generator=g) * 0.05 for n in REAL_SIZES])
    x = torch.randn(3, REAL_DIM, generator=g)
    want = R.encode_ref(x, books)
    for isa in ISAS[-2:]:
        C.set_isa_cap(isa)
        codes = R.encode(x, books)
        assert torch.equal(codes, want), isa
    close_rel(R.decode(codes, books), R.decode_ref(codes, books))
    assert torch.equal(R.decode(codes, books), cref_decode(codes, books))


def test_self_check_cpu():
    R.self_check(torch.device("cpu"))


# ------------------------------------------------------------------------------------------------
# Clean errors
# ------------------------------------------------------------------------------------------------

def test_out_of_range_codes():
    books = R.Codebooks(make_books((8, 4, 2), 16, torch.float32, seed=2))
    good = torch.tensor([[7, 3, 1], [0, 0, 0]])
    R.decode(good, books)
    for bad_value, where in ((-1, (1, 2)), (4, (0, 1)), (2**40, (1, 0))):
        codes = good.clone()
        codes[where] = bad_value
        n = books.sizes[where[1]]
        with pytest.raises(ValueError, match=rf"codes\[{where[0]}, {where[1]}\] = {bad_value} is outside \[0, {n}\)"):
            R.decode(codes, books)
        # the kernels check too, before reading any row (called directly, without the Python check)
        ptrs, sizes, dim, dt = books._table()
        out = torch.empty(2, 16)
        for fn in (C.rvq_decode_cpu, C.rvq_decode_ref):
            with pytest.raises(ValueError, match=rf"codes\[{where[0]}, {where[1]}\] = {bad_value} is outside"):
                fn(codes.data_ptr(), True, 2, ptrs, sizes, dim, dt, out.data_ptr())
    i32 = good.to(torch.int32)
    i32[1, 1] = 4
    with pytest.raises(ValueError, match=r"codes\[1, 1\] = 4 is outside \[0, 4\)"):
        R.decode(i32, books)


def test_bad_inputs():
    books = R.Codebooks(make_books((8, 4), 16, torch.float32, seed=2))
    with pytest.raises(ValueError, match=r"codes: expected shape \(\*, 2\)"):
        R.decode(torch.zeros(3, 3, dtype=torch.int64), books)
    with pytest.raises(ValueError, match="codes: expected dtype int64, int32"):
        R.decode(torch.zeros(3, 2), books)
    with pytest.raises(ValueError, match="codes: expected 2 dims"):
        R.decode(torch.zeros(2, dtype=torch.int64), books)
    with pytest.raises(ValueError, match="codes: expected a contiguous tensor"):
        R.decode(torch.zeros(2, 3, dtype=torch.int64).t(), books)
    with pytest.raises(ValueError, match=r"x: expected shape \(\*, 16\)"):
        R.encode(torch.zeros(3, 15), books)
    with pytest.raises(ValueError, match="x: expected dtype"):
        R.encode(torch.zeros(3, 16, dtype=torch.float64), books)
    with pytest.raises(ValueError, match="x: contains NaN"):
        R.encode(torch.tensor([[float("nan")] * 16]), books)
    with pytest.raises(ValueError, match=r"codebooks\[1\]: expected shape \(\*, 16\)"):
        R.Codebooks([torch.zeros(4, 16), torch.zeros(4, 15)])
    with pytest.raises(ValueError, match=r"codebooks\[1\]: expected dtype float32"):
        R.Codebooks([torch.zeros(4, 16), torch.zeros(4, 16, dtype=torch.float16)])
    with pytest.raises(ValueError, match="expected 1 to 16 layers"):
        R.Codebooks([])
    with pytest.raises(ValueError, match="expected 1 to 16 layers"):
        R.Codebooks([torch.zeros(2, 4)] * 17)
    with pytest.raises(ValueError, match=r"codebooks\[0\]: expected 1 to 2\^31-1 rows"):
        R.Codebooks([torch.zeros(0, 4)])
    with pytest.raises(ValueError, match="expected a list"):
        R.Codebooks(torch.zeros(2, 4))
    nan_books = [torch.zeros(4, 16), torch.full((4, 16), float("inf"))]
    with pytest.raises(ValueError, match="codebooks: contain NaN or infinite"):
        R.encode(torch.zeros(1, 16), nan_books)
    # the encode kernel checks x itself
    ptrs, sizes, dim, dt = books._table()
    x = torch.tensor([[0.0] * 15 + [float("inf")]])
    with pytest.raises(ValueError, match=r"x\[0, 15\] is not finite"):
        C.rvq_encode_cpu(x.data_ptr(), 1, ptrs, sizes, dim, dt, [], torch.empty(1, 2, dtype=torch.int64).data_ptr())


# ------------------------------------------------------------------------------------------------
# CUDA (same checks on the GPU; skipped without one)
# ------------------------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.skipif(not has_cuda, reason="needs an NVIDIA GPU and a CUDA build")
def test_cuda_self_check():
    R.self_check(torch.device("cuda"))


@pytest.mark.cuda
@pytest.mark.skipif(not has_cuda, reason="needs an NVIDIA GPU and a CUDA build")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_encode_decode(dtype):
    dev = torch.device("cuda")
    with _dispatch.force_native():
        sizes, d = (37, 16, 5, 64, 1), 67
        books = R.Codebooks(make_books(sizes, d, dtype, seed=1, device=dev))
        x = (torch.randn(70, d, generator=torch.Generator().manual_seed(1)) * 1.5).to(dev)
        codes = R.encode(x, books)
        assert torch.equal(codes.cpu(), R.encode_ref(x.cpu(), R.Codebooks([b.cpu() for b in books.tensors])))
        close_rel(R.decode(codes, books).cpu(), R.decode_ref(codes, books).cpu())
        # the kernel never reads a bad code's row: NaN output and the flag names the position
        bad = codes.clone()
        bad[5, 2] = 5
        out = torch.empty(70, d, device=dev)
        flag = torch.zeros(1, dtype=torch.int32, device=dev)
        ptrs, szs, dim, dt = books._table()
        C.rvq_decode_cuda(bad.data_ptr(), True, 70, ptrs, szs, dim, dt, out.data_ptr(), flag.data_ptr(),
                          _check.cuda_stream(dev))
        torch.cuda.synchronize()
        assert int(flag) == 1 + 5 * len(sizes) + 2
        assert bool(out[5].isnan().all()) and bool(out[4].isfinite().all())


@pytest.mark.cuda
@pytest.mark.skipif(not has_cuda, reason="needs an NVIDIA GPU and a CUDA build")
def test_cuda_real_size():
    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(2024)
    cpu_books = [torch.randn(n, REAL_DIM, generator=g) * 0.05 for n in REAL_SIZES]
    x = torch.randn(5, REAL_DIM, generator=g)
    with _dispatch.force_native():
        books = R.Codebooks([b.to(dev) for b in cpu_books])
        codes = R.encode(x.to(dev), books)
        assert torch.equal(codes.cpu(), R.encode_ref(x, cpu_books))
        close_rel(R.decode(codes, books).cpu(), R.decode_ref(codes.cpu(), cpu_books))
