"""Residual vector quantisation: the audio tokenizer's 8-layer RVQ (docs/MODEL.md §1.4 encode, §1.7 decode).

Codebooks are a list of L tensors, layer l of shape (n_l, D), all one dtype (fp32, bf16 or fp16) on one
device; Baichuan-Omni-1.5 has L = 8 fp32 codebooks of 8192, 4096, 2048, 1024 x 5 rows and D = 5120
(`audio_tokenizer.audio_bridge_model.vq_list.{l}.codebook.embed`). A `Codebooks` object validates them once,
keeps the tensors in place (a pointer table, no copy) and precomputes the squared row norms encode needs;
every op accepts either the list or a `Codebooks`.

- `decode(codes, codebooks, *, check=True) -> out` (T, D) fp32: out[t] = sum over l of
  codebook[l][codes[t, l]], added in layer order in fp32. codes (T, L) int64 or int32. A code outside
  [0, n_l) raises ValueError naming it before any codebook row is read (the kernels check again themselves).
  `check=False` on CUDA skips that host check (it reads the codes back: one synchronisation per call), for
  codes a sampler just drew on the device: the kernel still never reads outside a codebook, and a frame with
  a bad code comes out NaN. CPU codes are always checked (host memory: nothing to synchronise).
- `encode(x, codebooks) -> codes` (T, L) **int64**: greedy residual nearest neighbour in fp32. x (T, D)
  fp32 / bf16 / fp16 (converted to fp32), finite with |x| <= MAX_ENCODE_ABS (1e9), else ValueError. r = x; at each layer the code is the argmin over rows i of
  sum_d (r_d - c_{i,d})^2, evaluated in float64 from the fp32 values (exact up to ~D * 2^-53 relative, far
  finer than fp32 resolution) with ties to the lowest index as torch.argmin; then r = r - c_code in fp32.
  The native kernels screen all rows with the fp32 expanded form ||c||^2 - 2 r.c and a rigorous bound on
  its rounding error, and recompute exactly every row whose screened value could still be the minimum
  (csrc/rvq/rvq.h), so near-ties are decided exactly as `encode_ref` decides them. On CPU the screen is a
  packed, register-tiled GEMM (6 frames x 2 vector registers of codebook rows, AVX2 / AVX-512 / scalar,
  the CPU pool over blocks of 128 rows), so a 30 s input (375 frames, ~75 GFLOP) runs near the matmul rate.

`decode_ref` / `encode_ref` are the same operations in plain torch; `self_check(device)` compares the native
kernels with them.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Union

import torch

from omni_edge._native import lib as _native_lib
from omni_edge.ops import _check, _dispatch

MAX_LAYERS = 16  # csrc/rvq/rvq.h OE_RVQ_MAX_LAYERS
CODES_DTYPE = torch.int64  # what encode returns
_CODE_DTYPES = (torch.int64, torch.int32)
# Largest |x| encode accepts. Far above any bridge activation (O(1..100)); below it the native kernels'
# tie-breaking matches encode_ref exactly, while at ~1e15 the fp32 residual arithmetic no longer can.
MAX_ENCODE_ABS = 1e9
_REF_CHUNK_ELEMS = 1 << 24  # fp64 elements per distance chunk in encode_ref (128 MiB)


class Codebooks:
    """L codebooks validated once: `tensors` (layer l: (n_l, D), contiguous), `sizes`, `dim`, `dtype`,
    `device`, and lazily the fp32 squared row norms (computed in fp64 and rounded once) for encode."""

    def __init__(self, codebooks: Union["Codebooks", Sequence[torch.Tensor]]):
        if isinstance(codebooks, Codebooks):
            codebooks = codebooks.tensors
        if isinstance(codebooks, torch.Tensor) or not isinstance(codebooks, Sequence):
            raise ValueError(f"codebooks: expected a list of (n_i, D) tensors or a Codebooks, got {type(codebooks).__name__}")
        if not 1 <= len(codebooks) <= MAX_LAYERS:
            raise ValueError(f"codebooks: expected 1 to {MAX_LAYERS} layers, got {len(codebooks)}")
        first = codebooks[0]
        _check.tensor("codebooks[0]", first, dtype=_check.FLOAT_DTYPES, ndim=2)
        d = first.shape[1]
        for i, cb in enumerate(codebooks):
            _check.tensor(f"codebooks[{i}]", cb, dtype=first.dtype, ndim=2, device=first.device)
            if cb.shape[1] != d or d < 1:
                raise ValueError(f"codebooks[{i}]: expected shape (*, {d}) like codebooks[0], got {tuple(cb.shape)}")
            if not 1 <= cb.shape[0] < 2**31:
                raise ValueError(f"codebooks[{i}]: expected 1 to 2^31-1 rows, got {cb.shape[0]}")
        if first.device.type not in ("cpu", "cuda"):
            raise ValueError(f"codebooks: tensors must live on cpu or cuda, got {first.device}")
        self.tensors = tuple(codebooks)
        self.sizes = tuple(int(cb.shape[0]) for cb in codebooks)
        self.dim = int(d)
        self.dtype = first.dtype
        self.device = first.device
        self._norms2: Optional[List[torch.Tensor]] = None
        self._finite: Optional[bool] = None

    @property
    def num_layers(self) -> int:
        return len(self.tensors)

    def norms2(self) -> List[torch.Tensor]:
        """||c_i||^2 per layer, (n_l,) fp32, each the fp64 sum of the exact squares rounded once."""
        if self._norms2 is None:
            out = []
            for cb in self.tensors:
                rows = max(1, _REF_CHUNK_ELEMS // self.dim)
                parts = [c.double().square().sum(-1).float() for c in cb.split(rows)]
                out.append(torch.cat(parts).contiguous())
            self._norms2 = out
        return self._norms2

    def check_finite(self) -> None:
        if self._finite is None:
            self._finite = all(bool(torch.isfinite(cb).all()) for cb in self.tensors)
        if not self._finite:
            raise ValueError("codebooks: contain NaN or infinite values; the nearest-neighbour search needs finite rows")

    def _table(self):
        return ([cb.data_ptr() for cb in self.tensors], list(self.sizes), self.dim, _check.DTYPE_CODE[self.dtype])


def _books(codebooks) -> Codebooks:
    return codebooks if isinstance(codebooks, Codebooks) else Codebooks(codebooks)


# ------------------------------------------------------------------------------------------------
# Torch references
# ------------------------------------------------------------------------------------------------

def decode_ref(codes: torch.Tensor, codebooks) -> torch.Tensor:
    books = _books(codebooks)
    out = torch.zeros(codes.shape[0], books.dim, dtype=torch.float32, device=books.device)
    for l, cb in enumerate(books.tensors):
        out += cb[codes[:, l].long()].float()
    return out


def encode_ref(x: torch.Tensor, codebooks) -> torch.Tensor:
    books = _books(codebooks)
    r = x.float().clone()
    t = r.shape[0]
    codes = torch.empty(t, books.num_layers, dtype=CODES_DTYPE, device=r.device)
    if t == 0:
        return codes
    for l, cb in enumerate(books.tensors):
        c = cb.float()
        rows = max(1, _REF_CHUNK_ELEMS // (t * books.dim))
        dist = torch.cat([((r.double()[:, None, :] - part.double()[None]) ** 2).sum(-1) for part in c.split(rows)], dim=1)
        idx = dist.argmin(dim=1)  # first minimum on ties
        codes[:, l] = idx
        r = r - c[idx]
    return codes


# ------------------------------------------------------------------------------------------------
# Public ops
# ------------------------------------------------------------------------------------------------

def _check_codes(codes: torch.Tensor, books: Codebooks, values: bool = True) -> None:
    _check.tensor("codes", codes, dtype=_CODE_DTYPES, ndim=2, device=books.device)
    if codes.shape[1] != books.num_layers:
        raise ValueError(f"codes: expected shape (*, {books.num_layers}) (one code per codebook), got {tuple(codes.shape)}")
    if codes.numel() == 0 or (not values and codes.device.type == "cuda"):
        return
    limit = torch.tensor(books.sizes, dtype=codes.dtype, device=codes.device)
    bad = (codes < 0) | (codes >= limit)
    if bool(bad.any()):
        t, l = (int(v) for v in bad.nonzero()[0])
        raise ValueError(f"codes[{t}, {l}] = {int(codes[t, l])} is outside [0, {books.sizes[l]}) "
                         f"(the size of codebook {l})")


def decode(codes: torch.Tensor, codebooks, *, check: bool = True) -> torch.Tensor:
    """Sum of the coded rows of every layer: codes (T, L) int64/int32 -> (T, D) fp32. `check=False`: see the
    module docstring (CUDA: no host read of the codes; a bad code gives a NaN frame, never a stray read)."""
    books = _books(codebooks)
    native = _dispatch.native_enabled("rvq", books.device)
    _check_codes(codes, books, values=check or not native)  # the torch reference would index out of bounds
    if not native:
        return decode_ref(codes, books)
    t = codes.shape[0]
    out = torch.empty(t, books.dim, dtype=torch.float32, device=books.device)
    if t == 0:
        return out
    ptrs, sizes, dim, dt = books._table()
    is64 = codes.dtype == torch.int64
    lib = _native_lib()
    if books.device.type == "cuda":
        # no device error flag (0): the codes were range-checked above (or check=False asked for no host read),
        # and reading a flag would sync the host; the kernel writes NaN for a frame with a bad code
        with torch.cuda.device(books.device):
            lib.rvq_decode_cuda(codes.data_ptr(), is64, t, ptrs, sizes, dim, dt, out.data_ptr(), 0,
                                _check.cuda_stream(books.device))
    else:
        lib.rvq_decode_cpu(codes.data_ptr(), is64, t, ptrs, sizes, dim, dt, out.data_ptr())
    return out


def encode(x: torch.Tensor, codebooks) -> torch.Tensor:
    """Greedy residual nearest-neighbour codes: x (T, D) -> (T, L) int64 (see the module docstring)."""
    books = _books(codebooks)
    _check.tensor("x", x, dtype=_check.FLOAT_DTYPES, ndim=2, device=books.device, contiguous=False)
    if x.shape[1] != books.dim:
        raise ValueError(f"x: expected shape (*, {books.dim}) (the codebook dim), got {tuple(x.shape)}")
    x = x.float().contiguous()
    if x.numel():
        amax = float(x.abs().max())  # NaN propagates through max
        if not amax <= MAX_ENCODE_ABS:
            what = "NaN or infinite values" if not math.isfinite(amax) else f"a value of magnitude {amax:.3g}"
            raise ValueError(f"x: contains {what}; encode takes finite inputs with |x| <= {MAX_ENCODE_ABS:g}")
    books.check_finite()
    if not _dispatch.native_enabled("rvq", books.device):
        return encode_ref(x, books)
    t = x.shape[0]
    codes = torch.empty(t, books.num_layers, dtype=CODES_DTYPE, device=books.device)
    if t == 0:
        return codes
    ptrs, sizes, dim, dt = books._table()
    norms = [n.data_ptr() for n in books.norms2()]
    lib = _native_lib()
    if books.device.type == "cuda":
        nbytes = lib.rvq_encode_cuda_workspace(t, ptrs, sizes, dim, dt)
        ws = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=books.device)
        with torch.cuda.device(books.device):
            lib.rvq_encode_cuda(x.data_ptr(), t, ptrs, sizes, dim, dt, norms, codes.data_ptr(), ws.data_ptr(), nbytes,
                                _check.cuda_stream(books.device))
    else:
        lib.rvq_encode_cpu(x.data_ptr(), t, ptrs, sizes, dim, dt, norms, codes.data_ptr())
    return codes


# ------------------------------------------------------------------------------------------------
# Self-check (run by omni_edge.ops._dispatch before a GPU's first native call)
# ------------------------------------------------------------------------------------------------

def _tie_books(d: int, dtype: torch.dtype, device) -> tuple:
    """Codebooks and inputs with an exact tie (duplicate rows), a symmetric tie and a near-tie."""
    g = torch.Generator().manual_seed(7)
    base = torch.randint(-8, 9, (3, 40, d), generator=g).float() / 8  # exactly representable in every dtype
    b0, b1, b2 = base[0].clone(), base[1].clone(), base[2].clone()
    b0[25] = b0[11]  # duplicate: a frame closest to row 11 must get 11, not 25
    x = torch.stack([b0[11] + 1 / 64, (b1[3] + b1[30]) / 2, b0[5]])  # symmetric tie between rows 3 and 30
    # near tie in layer 0: row 7 = row 5 moved by one step of 2^-20 in one coordinate
    b0[7] = b0[5]
    b0[7, 0] += 2.0**-20 if dtype == torch.float32 else 2.0**-6
    books = [b.to(dtype).to(device) for b in (b0, b1, b2)]
    return books, x.to(device)


def self_check(device: torch.device) -> None:
    """Run the native decode and encode kernels on `device` against decode_ref / encode_ref (random data and
    constructed exact ties and near-ties); AssertionError on any disagreement."""
    device = torch.device(device)
    g = torch.Generator().manual_seed(4321)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        sizes, d, t = (37, 16, 5, 64), 67, 19
        books = Codebooks([torch.randn(n, d, generator=g).to(dtype).to(device) for n in sizes])
        x = (torch.randn(t, d, generator=g) * 2).to(device)
        codes = encode(x, books)
        want = encode_ref(x, books)
        if not torch.equal(codes.cpu(), want.cpu()):
            raise AssertionError(f"rvq self-check: encode ({dtype}) codes differ from encode_ref at "
                                 f"{(codes.cpu() != want.cpu()).nonzero()[:4].tolist()}")
        for cdt in _CODE_DTYPES:
            got = decode(codes.to(cdt), books)
            ref = decode_ref(codes, books)
            err = (got - ref).abs().max().item()
            if not err <= 1e-5 * max(ref.abs().max().item(), 1e-30):
                raise AssertionError(f"rvq self-check: decode ({dtype}, {cdt}) differs from decode_ref by {err:.3g}")
        tie_books, tx = _tie_books(24, dtype, device)
        tcodes = encode(tx, tie_books)
        twant = encode_ref(tx, tie_books)
        if not torch.equal(tcodes.cpu(), twant.cpu()):
            raise AssertionError(f"rvq self-check: tie-breaking ({dtype}) gave {tcodes.cpu().tolist()}, "
                                 f"encode_ref {twant.cpu().tolist()}")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
