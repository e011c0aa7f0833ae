"""4-bit GPTQ matmul.

Public surface (other code and outside checks call these):

- `QWeight.from_gptq(qweight, qzeros, scales, g_idx, *, bits=4, group_size, sym, checkpoint_format="gptq", bias=None)`
  takes the standard GPTQ tensors of one linear layer (see quantize/FORMAT.md):
    qweight int32 (K/8, N)   eight 4-bit codes per int32, packed along K, code j of a word in bits 4j..4j+3
    qzeros  int32 (G, N/8)   eight 4-bit zero points per int32, packed along N
    scales  fp16  (G, N)
    g_idx   int32 (K,)       group of each input row (act-order checkpoints permute it)
  and checkpoint_format "gptq" (v1: stored zero = zero - 1) or "gptq_v2" (stored zero = zero).
  W[k, n] = scales[g_idx[k], n] * (q[k, n] - zero[g_idx[k], n]);  y = x @ W + bias.
  It repacks them ONCE into the kernels' tiled layout (FORMAT.md §2) on the tensors' device and keeps only
  that layout (the GPTQ tensors are not retained; `to_gptq()` rebuilds them bit-exactly).
- `matmul(x, qweight, *, exact=None, out=None, workspace=None) -> y` for x (..., K) in fp32/bf16/fp16 -> y (..., N)
  in x's dtype; `out` and (CUDA) `workspace` (`cuda_workspace_bytes(m, *weights)` bytes, made once) let a
  decode loop allocate nothing.
- `QWeight.dequantize() -> (K, N)` fp32 weight (the transpose of torch's Linear weight).
- `quantize_rtn(weight, group_size, sym)`: round-to-nearest GPTQ tensors from a dense (N, K) Linear weight.
- `pack_gptq` / `unpack_gptq`: bit-exact conversions between integer codes and the packed GPTQ tensors;
  `pack_tiled` / `unpack_tiled`: the same for the kernels' tiled layout.

Which CPU path `matmul` takes (csrc/q4/q4.h states each path's contract):
- INT8 (the default, for decode and prefill): activations are quantized to int8 per 32-row block
  (scale max|x|/127, like llama.cpp's Q8_0 / ONNX Runtime MatMulNBits accuracy level 4) and multiplied with
  integer dot products (AVX-512 VNNI). Error bound per output: sum_k |W[k, n]| * d_block(k) / 2.
- EXACT: fp32 activations times the exactly dequantized weights, fp32 accumulation (matches the fp32
  matmul of `dequantize()` to ~1e-6 relative). Select it with the environment variable
  OMNI_EDGE_Q4_EXACT=1 (read once, omni_edge/knobs.py), `set_exact(True)`, `with exact_mode():`, or per call with
  `matmul(..., exact=True)`. Parity tests that compare a 4-bit model with its dequantized dense twin to
  ~1e-5 need the EXACT path; the INT8 path is within the bound above.
CUDA kernels always compute the EXACT contract (fp32 accumulation); the setting does not apply there.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from typing import Optional, Tuple

import torch

from omni_edge import knobs
from omni_edge.ops import _check, _dispatch

CHECKPOINT_FORMATS = ("gptq", "gptq_v2")

# Tiled layout constants; must equal csrc/q4/q4.h (tests compare them with _C.q4_layout()).
TILE_N = 16  # columns per tile
OCTET = 8  # rows per 32-bit code word
BLOCK_K = 32  # rows per activation-quantization block; each group is padded to a multiple of this
NIBBLE_ROW = (0, 4, 1, 5, 2, 6, 3, 7)  # nibble j of a tiled word holds row NIBBLE_ROW[j] of its octet

MODE_EXACT, MODE_INT8 = 0, 1

def set_exact(flag: bool) -> None:
    """Make `matmul` use the EXACT fp32 CPU path (True) or the INT8-activation fast path (False) by default
    (the knob OMNI_EDGE_Q4_EXACT, omni_edge/knobs.py)."""
    knobs.set("q4_exact", bool(flag))


def exact_default() -> bool:
    return knobs.settings().q4_exact


@contextlib.contextmanager
def exact_mode(flag: bool = True):
    """`with q4.exact_mode():` runs the enclosed CPU matmuls on the EXACT path (process-wide setting)."""
    with knobs.override(q4_exact=bool(flag)):
        yield


# ------------------------------------------------------------------------------------------------
# GPTQ packing (bit-exact, pure torch)
# ------------------------------------------------------------------------------------------------

def _pack_rows(codes: torch.Tensor) -> torch.Tensor:
    """(R, C) integer codes 0..15, R % 8 == 0 -> (R/8, C) int32, code j of word i at bits 4j..4j+3."""
    r, c = codes.shape
    c64 = codes.to(torch.int64).reshape(r // 8, 8, c)
    shifts = (torch.arange(8, dtype=torch.int64, device=codes.device) * 4).view(1, 8, 1)
    words = (c64 << shifts).sum(dim=1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _unpack_rows(words: torch.Tensor) -> torch.Tensor:
    """Inverse of _pack_rows: (R/8, C) int32 -> (R, C) uint8 codes."""
    r8, c = words.shape
    shifts = (torch.arange(8, dtype=torch.int32, device=words.device) * 4).view(1, 8, 1)
    codes = (words.view(r8, 1, c) >> shifts) & 0xF
    return codes.reshape(r8 * 8, c).to(torch.uint8)


def pack_gptq(q: torch.Tensor, zeros: torch.Tensor, *, checkpoint_format: str = "gptq"):
    """Integer codes q (K, N) in 0..15 and zero points (G, N) in 0..15 -> (qweight, qzeros).

    For checkpoint_format "gptq" (v1) the stored zero is zero - 1 (wrapping 0 to 15 as 4-bit arithmetic)."""
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise ValueError(f"checkpoint_format: expected one of {CHECKPOINT_FORMATS}, got {checkpoint_format!r}")
    k, n = q.shape
    if k % 8 or n % 8:
        raise ValueError(f"q: K and N must be multiples of 8 for GPTQ packing, got K={k}, N={n}")
    stored = zeros.to(torch.int64)
    if checkpoint_format == "gptq":
        stored = (stored - 1) & 0xF
    qweight = _pack_rows(q)
    qzeros = _pack_rows(stored.t().contiguous()).t().contiguous()
    return qweight, qzeros


def unpack_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, *, checkpoint_format: str = "gptq"):
    """(qweight, qzeros) -> integer codes q (K, N) uint8 and true zero points (G, N) uint8."""
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise ValueError(f"checkpoint_format: expected one of {CHECKPOINT_FORMATS}, got {checkpoint_format!r}")
    q = _unpack_rows(qweight)
    zeros = _unpack_zeros(qzeros, checkpoint_format)
    return q, zeros


def _unpack_zeros(qzeros: torch.Tensor, checkpoint_format: str) -> torch.Tensor:
    zeros = _unpack_rows(qzeros.t().contiguous()).t().contiguous()
    if checkpoint_format == "gptq":
        zeros = ((zeros.to(torch.int16) + 1) & 0xF).to(torch.uint8)
    return zeros


# ------------------------------------------------------------------------------------------------
# The kernels' tiled layout (quantize/FORMAT.md §2), bit-exact, pure torch, any device
# ------------------------------------------------------------------------------------------------

def fold_groups(g_idx: torch.Tensor, groups: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Act-order folding: layout row order = input rows sorted by group (stable), each group padded with
    rows of -1 to a multiple of BLOCK_K. Returns perm (Kp,) int32 (input row of each layout row, -1 = padding)
    and block_group (Kp/BLOCK_K,) int32 (group of each block)."""
    dev = g_idx.device
    g = g_idx.long()
    k = g.numel()
    counts = torch.bincount(g, minlength=groups)
    padded = (counts + BLOCK_K - 1) // BLOCK_K * BLOCK_K
    pstart = torch.cumsum(padded, 0) - padded
    cstart = torch.cumsum(counts, 0) - counts
    order = torch.argsort(g, stable=True)
    gs = g[order]
    dest = pstart[gs] + torch.arange(k, device=dev) - cstart[gs]
    kp = int(padded.sum())
    perm = torch.full((kp,), -1, dtype=torch.int32, device=dev)
    perm[dest] = order.to(torch.int32)
    block_group = torch.repeat_interleave(torch.arange(groups, dtype=torch.int32, device=dev), padded // BLOCK_K)
    return perm, block_group


def _is_identity(perm: torch.Tensor, k: int) -> bool:
    """True when perm is 0..K-1 followed by padding only: the kernels then read x directly (no gather)."""
    ar = torch.arange(k, dtype=torch.int32, device=perm.device)
    return bool(torch.equal(perm[:k], ar)) and bool((perm[k:] == -1).all())


def _tile_words(qrows: torch.Tensor) -> torch.Tensor:
    """(Kp, Nc) uint8 codes in layout row order, Kp % 8 == 0, Nc % 16 == 0 -> (Nc/16, Kp/8, 16) int32 words:
    byte b of word (t, o, l) = row 8o+b (bits 0..3) | row 8o+4+b (bits 4..7) of column 16t+l."""
    kp, nc = qrows.shape
    r = qrows.view(kp // OCTET, OCTET, nc // TILE_N, TILE_N)
    by = r[:, 0:4] | (r[:, 4:8] << 4)  # (Kp/8, 4, nt, 16) uint8
    return by.permute(2, 0, 3, 1).contiguous().view(torch.int32).view(nc // TILE_N, kp // OCTET, TILE_N)


def _untile_words(codes: torch.Tensor) -> torch.Tensor:
    """Inverse of _tile_words: (nt, Kp/8, 16) int32 -> (Kp, nt*16) uint8 codes in layout row order."""
    nt, o8, _ = codes.shape
    by = codes.contiguous().view(torch.uint8).view(nt, o8, TILE_N, 4)
    rows = torch.cat([by & 0xF, by >> 4], dim=3)  # (nt, Kp/8, 16, 8): rows 0..3 then 4..7 of each octet
    return rows.permute(1, 3, 0, 2).reshape(o8 * OCTET, nt * TILE_N)


def _tile_groups(t: torch.Tensor) -> torch.Tensor:
    """(G, N) per-group values -> (nt, G, 16), columns padded with zeros to a multiple of 16."""
    g, n = t.shape
    np_ = -(-n // TILE_N) * TILE_N
    if np_ != n:
        t = torch.cat([t, t.new_zeros(g, np_ - n)], dim=1)
    return t.view(g, np_ // TILE_N, TILE_N).permute(1, 0, 2).contiguous()


def _untile_groups(t: torch.Tensor, n: int) -> torch.Tensor:
    nt, g, _ = t.shape
    return t.permute(1, 0, 2).reshape(g, nt * TILE_N)[:, :n].contiguous()


def _check_little_endian() -> None:
    if sys.byteorder != "little":  # pragma: no cover - every supported target is little-endian
        raise RuntimeError("the q4 tiled layout is defined for little-endian machines")


def pack_tiled(q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor) -> dict:
    """Integer codes q (K, N) uint8, zeros (G, N) uint8 (true zero points), scales (G, N) fp16, g_idx (K,)
    -> the tiled layout: {"codes" (nt, Kp/8, 16) int32, "scales" (nt, G, 16) fp16, "zeros" (nt, G, 16) uint8,
    "perm" (Kp,) int32, "block_group" (Kp/32,) int32}."""
    _check_little_endian()
    k, n = q.shape
    groups = scales.shape[0]
    perm, block_group = fold_groups(g_idx, groups)
    return {"codes": _tile_codes(lambda n0, n1: q[:, n0:n1], k, n, perm), "scales": _tile_groups(scales),
            "zeros": _tile_groups(zeros), "perm": perm, "block_group": block_group}


def _tile_codes(columns, k: int, n: int, perm: torch.Tensor, chunk_codes: int = 1 << 24) -> torch.Tensor:
    """Tiled code words from `columns(n0, n1) -> (K, n1-n0) uint8 codes`, built a column chunk at a time so
    the transient memory stays near chunk_codes bytes whatever the matrix size."""
    kp = perm.numel()
    nt = -(-n // TILE_N)
    out = torch.empty(nt, kp // OCTET, TILE_N, dtype=torch.int32, device=perm.device)
    valid = perm >= 0
    src = perm[valid].long()
    step = max(TILE_N, (chunk_codes // max(kp, 1)) // TILE_N * TILE_N)
    for n0 in range(0, nt * TILE_N, step):
        n1 = min(n0 + step, nt * TILE_N)
        cols = columns(n0, min(n1, n))  # (K, <= n1-n0)
        rows = torch.zeros(kp, n1 - n0, dtype=torch.uint8, device=perm.device)
        rows[valid, : cols.shape[1]] = cols[src].to(torch.uint8)
        out[n0 // TILE_N: n1 // TILE_N] = _tile_words(rows)
    return out


def unpack_tiled(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, perm: torch.Tensor,
                 block_group: torch.Tensor, k: int, n: int):
    """Tiled layout -> (q (K, N) uint8, zeros (G, N) uint8, scales (G, N) fp16, g_idx (K,) int32)."""
    _check_little_endian()
    rows = _untile_words(codes)[:, :n]  # (Kp, N) layout row order
    valid = perm >= 0
    src = perm[valid].long()
    q = torch.empty(k, n, dtype=torch.uint8, device=codes.device)
    q[src] = rows[valid]
    g_idx = torch.empty(k, dtype=torch.int32, device=codes.device)
    g_idx[src] = block_group.repeat_interleave(BLOCK_K)[valid]
    return q, _untile_groups(zeros, n), _untile_groups(scales, n), g_idx


def _gptq_columns(qweight: torch.Tensor):
    """Column-chunk reader of a GPTQ qweight (K/8, N) -> (K, nc) uint8 codes."""
    def read(n0, n1):
        return _unpack_rows(qweight[:, n0:n1])
    return read


def _tile_gptq_words(qweight: torch.Tensor, chunk_words: int = 1 << 24) -> torch.Tensor:
    """GPTQ qweight (K/8, N) -> tiled codes when the layout keeps the row order (Kp == K, identity perm):
    word (t, o, l) holds the same 8 codes as qweight[o, 16t + l], only the nibbles move. On the little-endian
    bytes B0..B3 of a GPTQ word (row 2i in the low nibble of Bi, row 2i+1 in the high one), tiled byte b holds
    rows b and 4+b: byte0 = B0.lo | B2.lo << 4, byte1 = B0.hi | B2.hi << 4, byte2 = B1.lo | B3.lo << 4,
    byte3 = B1.hi | B3.hi << 4. Equal to _tile_codes on the unpacked codes (tests check it) and much faster."""
    k8, n = qweight.shape
    nt = -(-n // TILE_N)
    out = torch.zeros(nt, k8, TILE_N, dtype=torch.int32, device=qweight.device)
    step = max(TILE_N, (chunk_words // max(k8, 1)) // TILE_N * TILE_N)
    for n0 in range(0, n, step):
        n1 = min(n, n0 + step)
        b = qweight[:, n0:n1].contiguous().view(torch.uint8).view(k8, n1 - n0, 4)
        lo, hi = b & 0x0F, b >> 4
        t = torch.stack([lo[..., 0] | (lo[..., 2] << 4), hi[..., 0] | (hi[..., 2] << 4),
                         lo[..., 1] | (lo[..., 3] << 4), hi[..., 1] | (hi[..., 3] << 4)], dim=2)  # (K/8, nc, 4)
        words = t.view(torch.int32).view(k8, n1 - n0)
        full = (n1 - n0) // TILE_N * TILE_N
        if full:
            out[n0 // TILE_N: (n0 + full) // TILE_N] = words[:, :full].reshape(k8, full // TILE_N, TILE_N).permute(1, 0, 2)
        if full < n1 - n0:  # last, partial tile (N % 16 == 8): the rest stays zero
            out[(n0 + full) // TILE_N, :, : n1 - n0 - full] = words[:, full:]
    return out


def _repack_gptq(qweight: torch.Tensor, k: int, n: int, perm: torch.Tensor) -> torch.Tensor:
    """GPTQ qweight -> tiled codes: the native CPU repack when it is built (fast, bit-identical), else torch."""
    identity = _is_identity(perm, k)
    if qweight.device.type == "cpu" and _dispatch.native_requested():
        from omni_edge import _native
        qw = qweight.contiguous()
        codes = torch.empty(-(-n // TILE_N), perm.numel() // OCTET, TILE_N, dtype=torch.int32)
        _native.lib().q4_repack_gptq_cpu(qw.data_ptr(), k, n, 0 if identity else perm.data_ptr(), perm.numel(),
                                         codes.data_ptr())
        return codes
    if identity and perm.numel() == k:  # no reordering: shuffle nibbles inside each word
        return _tile_gptq_words(qweight)
    return _tile_codes(_gptq_columns(qweight), k, n, perm)


# ------------------------------------------------------------------------------------------------
# The weight object
# ------------------------------------------------------------------------------------------------

class QWeight:
    """One 4-bit linear layer, y = x @ W + bias with W (K, N), held in the kernels' tiled layout only
    (quantize/FORMAT.md §2; K = in_features, N = out_features, G groups, Kp layout rows, nt = ceil(N/16)):

      codes        (nt, Kp/8, 16) int32  4-bit codes, 8 rows of one column per word
      tile_scales  (nt, G, 16) fp16      per-group scales, tile-major
      tile_zeros   (nt, G, 16) uint8     per-group true zero points (0..15), tile-major
      perm         (Kp,) int32           input row of each layout row, -1 for padding (act-order folded)
      block_group  (Kp/32,) int32        group of each 32-row block
      bias         (N,) or None          as given; kernels read an fp32 copy

    `QWeight(q, zeros, scales, g_idx, group_size, sym, bias)` builds one from integer codes (the reference
    layout of the quantizer); `from_gptq` from checkpoint tensors. The properties `q`, `zeros`, `scales`
    and `g_idx` rebuild the integer-code tensors on demand (a copy; not used on the hot path)."""

    def __init__(self, q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
                 group_size: int, sym: bool, bias: Optional[torch.Tensor] = None):
        _check.tensor("q", q, dtype=_CODE_DTYPES, ndim=2, contiguous=False)
        k, n = q.shape
        if k == 0 or n == 0 or n % 8:
            raise ValueError(f"q: expected a non-empty (K, N) tensor with N a multiple of 8, got {tuple(q.shape)}")
        _check.tensor("scales", scales, dtype=_check.FLOAT_DTYPES, ndim=2, contiguous=False)
        groups = scales.shape[0]
        _check.tensor("zeros", zeros, dtype=_CODE_DTYPES, shape=(groups, n), contiguous=False)
        _check_codes("q", q)
        _check_codes("zeros", zeros)
        _check_group_size(group_size, k)
        _check.tensor("scales", scales, dtype=_check.FLOAT_DTYPES, shape=(groups, n), contiguous=False)
        _check.tensor("g_idx", g_idx, dtype=(torch.int32, torch.int64), shape=(k,), contiguous=False)
        _check_g_idx(g_idx, groups)
        packed = pack_tiled(q, zeros.to(torch.uint8), scales.to(torch.float16), g_idx)
        self._set(packed, k, n, group_size, sym, bias)

    @classmethod
    def _from_packed(cls, packed: dict, k: int, n: int, group_size: int, sym: bool, bias) -> "QWeight":
        self = cls.__new__(cls)
        self._set(packed, k, n, group_size, sym, bias)
        return self

    def _set(self, packed: dict, k: int, n: int, group_size: int, sym: bool, bias) -> None:
        self.codes = packed["codes"]
        self.tile_scales = packed["scales"]
        self.tile_zeros = packed["zeros"]
        self.perm = packed["perm"]
        self.block_group = packed["block_group"]
        self.in_features = int(k)
        self.out_features = int(n)
        self.group_size = int(group_size)
        self.sym = bool(sym)
        self.bias = bias
        self.identity_perm = _is_identity(self.perm, k)
        self._bias_f32 = None if bias is None else bias.to(device=self.codes.device, dtype=torch.float32).contiguous()
        self._handle = (self.codes.data_ptr(), self.tile_scales.data_ptr(), self.tile_zeros.data_ptr(),
                        0 if self.identity_perm else self.perm.data_ptr(), self.block_group.data_ptr(),
                        0 if self._bias_f32 is None else self._bias_f32.data_ptr(),
                        self.in_features, self.out_features, self.perm.numel(), self.tile_scales.shape[1])

    # ---- shape and storage ----

    @property
    def device(self) -> torch.device:
        return self.codes.device

    @property
    def groups(self) -> int:
        return self.tile_scales.shape[1]

    @property
    def padded_in_features(self) -> int:
        """Kp: layout rows (groups padded to multiples of 32)."""
        return self.perm.numel()

    @property
    def nbytes(self) -> int:
        """Bytes a matmul streams: codes + scales + zeros (+ perm, block_group)."""
        return sum(t.numel() * t.element_size()
                   for t in (self.codes, self.tile_scales, self.tile_zeros, self.perm, self.block_group))

    def to(self, device) -> "QWeight":
        """The same weight on `device` (the layout is the same on CPU and GPU: a plain copy)."""
        device = torch.device(device)
        if device == self.device:
            return self
        packed = {"codes": self.codes.to(device), "scales": self.tile_scales.to(device),
                  "zeros": self.tile_zeros.to(device), "perm": self.perm.to(device),
                  "block_group": self.block_group.to(device)}
        bias = None if self.bias is None else self.bias.to(device)
        return QWeight._from_packed(packed, self.in_features, self.out_features, self.group_size, self.sym, bias)

    def __repr__(self) -> str:
        return (f"QWeight(in_features={self.in_features}, out_features={self.out_features}, "
                f"group_size={self.group_size}, sym={self.sym}, act_order={not self.identity_perm}, "
                f"bias={self.bias is not None}, device={self.device})")

    # ---- integer-code views (rebuilt on demand) ----

    def _unpacked(self):
        return unpack_tiled(self.codes, self.tile_scales, self.tile_zeros, self.perm, self.block_group,
                            self.in_features, self.out_features)

    @property
    def q(self) -> torch.Tensor:
        """(K, N) uint8 codes (a copy)."""
        return self._unpacked()[0]

    @property
    def zeros(self) -> torch.Tensor:
        """(G, N) uint8 true zero points (a copy)."""
        return _untile_groups(self.tile_zeros, self.out_features)

    @property
    def scales(self) -> torch.Tensor:
        """(G, N) fp16 scales (a copy)."""
        return _untile_groups(self.tile_scales, self.out_features)

    @property
    def g_idx(self) -> torch.Tensor:
        """(K,) int32 group of each input row (a copy)."""
        return self._unpacked()[3]

    # ---- construction from checkpoints ----

    @classmethod
    def from_gptq(cls, qweight, qzeros, scales, g_idx=None, *, bits: int = 4, group_size: int,
                  sym: bool, checkpoint_format: str = "gptq", bias=None) -> "QWeight":
        """Standard GPTQ tensors -> QWeight, repacked once into the tiled layout on the tensors' device."""
        if bits != 4:
            raise ValueError(f"bits: only 4-bit weights run on the q4 kernels, got bits={bits}")
        if checkpoint_format not in CHECKPOINT_FORMATS:
            raise ValueError(f"checkpoint_format: expected one of {CHECKPOINT_FORMATS}, got {checkpoint_format!r}")
        _check.tensor("qweight", qweight, dtype=torch.int32, ndim=2, contiguous=False)
        k8, n = qweight.shape
        k = k8 * 8
        if k == 0 or n == 0:
            raise ValueError(f"qweight: expected a non-empty (K/8, N) tensor, got shape {tuple(qweight.shape)}")
        if group_size in (-1, 0, None):
            group_size = k
        _check_group_size(group_size, k)
        groups = -(-k // group_size)
        if n % 8:
            raise ValueError(f"qweight: N must be a multiple of 8, got N={n}")
        _check.tensor("qzeros", qzeros, dtype=torch.int32, shape=(groups, n // 8), contiguous=False)
        _check.tensor("scales", scales, dtype=(torch.float16, torch.bfloat16, torch.float32), shape=(groups, n),
                      contiguous=False)
        if g_idx is None:
            g_idx = torch.arange(k, dtype=torch.int32, device=qweight.device) // group_size
        _check.tensor("g_idx", g_idx, dtype=(torch.int32, torch.int64), shape=(k,), contiguous=False)
        if bias is not None:
            _check.tensor("bias", bias, dtype=_check.FLOAT_DTYPES, shape=(n,), contiguous=False)
        _check.same_device(qweight=qweight, qzeros=qzeros, scales=scales, g_idx=g_idx, bias=bias)
        _check_g_idx(g_idx, groups)
        _check_little_endian()
        perm, block_group = fold_groups(g_idx, groups)
        codes = _repack_gptq(qweight, k, n, perm)
        packed = {"codes": codes,
                  "scales": _tile_groups(scales.to(torch.float16)),
                  "zeros": _tile_groups(_unpack_zeros(qzeros, checkpoint_format)),
                  "perm": perm, "block_group": block_group}
        return cls._from_packed(packed, k, n, int(group_size), bool(sym), bias)

    def to_gptq(self, checkpoint_format: str = "gptq"):
        """Back to the standard tensors: (qweight, qzeros, scales, g_idx)."""
        q, zeros, scales, g_idx = self._unpacked()
        qweight, qzeros = pack_gptq(q, zeros, checkpoint_format=checkpoint_format)
        return qweight, qzeros, scales, g_idx

    def dequantize(self) -> torch.Tensor:
        """(K, N) fp32 weight, W[k, n] = scale * (q - zero) of k's group."""
        rows = _untile_words(self.codes)[:, : self.out_features].float()  # (Kp, N), layout row order
        gr = self.block_group.long().repeat_interleave(BLOCK_K)
        s = _untile_groups(self.tile_scales, self.out_features).float()[gr]
        z = _untile_groups(self.tile_zeros, self.out_features).float()[gr]
        valid = self.perm >= 0
        w = torch.empty(self.in_features, self.out_features, dtype=torch.float32, device=self.device)
        w[self.perm[valid].long()] = ((rows - z) * s)[valid]
        return w


_CODE_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _check_codes(name: str, t: torch.Tensor) -> None:
    """4-bit codes and zero points must lie in [0, 15] (they are packed into nibbles)."""
    if t.numel() and (int(t.min()) < 0 or int(t.max()) > 15):
        raise ValueError(f"{name}: 4-bit values must lie in [0, 15], got [{int(t.min())}, {int(t.max())}]")


def _check_group_size(group_size, k: int) -> None:
    if isinstance(group_size, bool) or not isinstance(group_size, int) or not 1 <= group_size < 2**31:
        raise ValueError(f"group_size: expected an integer in [1, 2^31) (or -1 for one group), got {group_size!r}")
    if k >= 2**31:
        raise ValueError(f"in_features: K={k} must be < 2^31")


def _check_g_idx(g_idx: torch.Tensor, groups: int) -> None:
    if g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= groups):
        raise ValueError(f"g_idx: values must lie in [0, {groups}), got [{int(g_idx.min())}, {int(g_idx.max())}]")


def quantize_rtn(weight: torch.Tensor, group_size: int = 128, *, sym: bool = True):
    """Round-to-nearest 4-bit quantization of a dense Linear weight (N, K) (torch layout).

    Returns integer codes q (K, N) uint8, zeros (G, N) uint8, scales (G, N) fp16 and g_idx (K,) int32, on the
    grid of `grid_params` (the one the GPTQ toolchain uses too; see quantize/FORMAT.md)."""
    _check.tensor("weight", weight, dtype=_check.FLOAT_DTYPES, ndim=2, contiguous=False)
    n, k = weight.shape
    if n == 0 or k == 0:
        raise ValueError(f"weight: expected a non-empty (N, K) tensor, got shape {tuple(weight.shape)}")
    if group_size in (-1, 0, None):
        group_size = k
    _check_group_size(group_size, k)
    if k % group_size:
        raise ValueError(f"group_size: K={k} must be a multiple of group_size={group_size}")
    w = weight.float().t().reshape(k // group_size, group_size, n)  # (G, g, N)
    scales, zeros = grid_params(w.amin(dim=1), w.amax(dim=1), sym=sym)
    q = quantize_codes(w, scales.unsqueeze(1), zeros.unsqueeze(1))
    g_idx = torch.arange(k, dtype=torch.int32, device=weight.device) // group_size
    return (q.reshape(k, n).to(torch.uint8), zeros.to(torch.uint8), scales.to(torch.float16), g_idx)


FP16_TINY = 2.0 ** -24  # smallest positive fp16 (subnormal): a scale that rounds to 0 in fp16 is lifted to it
FP16_MAX = 65504.0  # largest finite fp16: a larger scale is clamped to it (the group then saturates)


def grid_params(wmin: torch.Tensor, wmax: torch.Tensor, *, sym: bool, bits: int = 4):
    """Scale and zero point of the `bits`-bit grid for per-group minima/maxima (GPTQ's convention). The one
    implementation: round-to-nearest here, `--quant rtn4` and the GPTQ toolchain all call it.

    The range always contains 0. With maxq = 2^bits - 1: sym: scale = 2 * max(|min|, |max|) / maxq,
    zero = (maxq + 1) / 2 (8 for 4 bits). asym: scale = (max - min) / maxq, zero = round(-min / scale).
    Scales are rounded to fp16 first, as stored, so quantization and dequantization agree exactly. Edge cases
    (as ggml handles them): an all-zero group gets scale 1 (every code then decodes to exactly 0); a group so
    small that its scale rounds to 0 in fp16 gets the smallest fp16 subnormal (never a division by zero: its
    values, all below fp16's resolution, decode to 0 or the nearest subnormal multiple); a scale past fp16's
    range is clamped to 65504. Returns fp32 (scale, zero) of wmin's shape."""
    maxq = (1 << bits) - 1
    wmin = torch.minimum(wmin.float(), torch.zeros((), dtype=torch.float32, device=wmin.device))
    wmax = torch.maximum(wmax.float(), torch.zeros((), dtype=torch.float32, device=wmax.device))
    if sym:
        scale = torch.maximum(wmin.abs(), wmax) * 2 / maxq
    else:
        scale = (wmax - wmin) / maxq
    scale = torch.where(scale == 0, torch.ones_like(scale), scale).clamp_(max=FP16_MAX).half().float()
    scale = torch.where(scale == 0, torch.full_like(scale, FP16_TINY), scale)
    if sym:
        zero = torch.full_like(scale, float((maxq + 1) // 2))
    else:
        zero = torch.clamp(torch.round(-wmin / scale), 0, maxq)
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """fp32 codes clamp(round(w / scale) + zero, 0, 2^bits - 1) of w on the grid (scale, zero), all three
    broadcasting together; the value a code decodes to is scale * (code - zero)."""
    return torch.clamp(torch.round(w / scale) + zero, 0, (1 << bits) - 1)


def qweight_rtn(weight: torch.Tensor, group_size: int = 128, *, sym: bool = True, bias=None) -> QWeight:
    """Dense Linear weight (N, K) -> QWeight by round-to-nearest (the `--quant rtn4` path)."""
    q, zeros, scales, g_idx = quantize_rtn(weight, group_size, sym=sym)
    n, k = weight.shape
    return QWeight(q=q, zeros=zeros, scales=scales, g_idx=g_idx,
                   group_size=group_size if group_size not in (-1, 0, None) else k, sym=sym, bias=bias)


# ------------------------------------------------------------------------------------------------
# Ops
# ------------------------------------------------------------------------------------------------

def matmul_ref(x: torch.Tensor, w: QWeight) -> torch.Tensor:
    """Torch reference: fp32 matmul of x with the dequantized weight, cast back to x's dtype."""
    y = x.float() @ w.dequantize().to(x.device)
    if w.bias is not None:
        y = y + w.bias.float()
    return y.to(x.dtype)


class _Workspace(threading.local):
    cpu: Optional[torch.Tensor] = None


_ws = _Workspace()


def _cpu_workspace(nbytes: int) -> torch.Tensor:
    """A per-thread scratch buffer, grown on demand (steady-state decode allocates nothing here)."""
    buf = _ws.cpu
    if buf is None or buf.numel() < nbytes:
        buf = torch.empty(max(nbytes, 1 << 16), dtype=torch.uint8)
        _ws.cpu = buf
    return buf


_FLOAT_SET = frozenset(_check.FLOAT_DTYPES)
_lib = None


def _native_lib():
    global _lib
    if _lib is None:
        from omni_edge import _native
        _lib = _native.lib()
    return _lib


def matmul(x: torch.Tensor, w: QWeight, *, exact: Optional[bool] = None,
           out: Optional[torch.Tensor] = None, workspace: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y = x @ W + bias for x (..., K) fp32/bf16/fp16 -> (..., N) in x's dtype.

    Native kernel where available (CPU: INT8-activation path unless exact / OMNI_EDGE_Q4_EXACT=1 /
    set_exact(True); CUDA: fp32 accumulation), else the torch reference. `out`: an optional preallocated
    contiguous (..., N) tensor of x's dtype on x's device (a decode loop can then allocate nothing).
    `workspace` (CUDA): a preallocated uint8 device buffer of at least `cuda_workspace_bytes(m, w)` bytes
    (m = rows of x) that the kernel's activation staging uses instead of a fresh one per call; ignored on
    the CPU, whose per-thread scratch is grown once and reused."""
    if not isinstance(w, QWeight):
        raise ValueError(f"qweight: expected omni_edge.ops.q4.QWeight, got {type(w).__name__}")
    k = w.in_features
    # the checks of _check.tensor, inlined for the decode hot path; _check words the errors
    if not (isinstance(x, torch.Tensor) and x.dtype in _FLOAT_SET and x.is_contiguous()):
        _check.tensor("x", x, dtype=_check.FLOAT_DTYPES)
    if x.dim() == 0 or x.shape[-1] != k:
        raise ValueError(f"x: expected shape (..., {k}) (last dim = in_features), got {tuple(x.shape)}")
    if x.device != w.device:
        raise ValueError(f"x: expected a tensor on {w.device} (the weight's device), got {x.device}")
    shape = x.shape[:-1] + (w.out_features,)
    if out is not None:
        _check.tensor("out", out, dtype=x.dtype, shape=tuple(shape), device=x.device)
    if not _dispatch.native_enabled("q4", x.device):
        y = matmul_ref(x, w)
        return y if out is None else out.copy_(y)
    lib = _native_lib()
    m = x.numel() // k
    y = torch.empty(shape, dtype=x.dtype, device=x.device) if out is None else out
    if m == 0:
        return y
    dt = _check.DTYPE_CODE[x.dtype]
    if x.device.type == "cpu":
        mode = MODE_EXACT if (knobs.settings().q4_exact if exact is None else exact) else MODE_INT8
        nbytes = lib.q4_cpu_workspace_bytes(m, w.padded_in_features, mode)
        ws = _cpu_workspace(nbytes)
        lib.q4_matmul_cpu(w._handle, x.data_ptr(), dt, m, y.data_ptr(), mode, ws.data_ptr(), ws.numel())
    else:
        _cuda_matmul(lib, x, w, y, m, dt, 0, workspace)
    return y


def cuda_workspace_bytes(m: int, *weights: QWeight) -> int:
    """Bytes of the CUDA workspace `matmul(..., workspace=)` needs for m rows of x, the largest over
    `weights` (size one buffer for every linear of a model)."""
    if not weights:
        return 0
    return max(max(_native_lib().q4_cuda_workspace_bytes(m, w.padded_in_features) for w in weights), 16)


def _cuda_matmul(lib, x: torch.Tensor, w: QWeight, y: torch.Tensor, m: int, dt: int, kernel: int,
                 workspace: Optional[torch.Tensor] = None) -> None:
    nbytes = lib.q4_cuda_workspace_bytes(m, w.padded_in_features)
    if workspace is None:
        ws = torch.empty(max(nbytes, 16), dtype=torch.uint8, device=x.device)  # caching allocator: no sync
    else:
        if not (isinstance(workspace, torch.Tensor) and workspace.dtype == torch.uint8 and workspace.dim() == 1
                and workspace.device == x.device and workspace.is_contiguous()):
            raise ValueError(f"workspace: expected a contiguous 1-D uint8 tensor on {x.device}, got "
                             f"{getattr(workspace, 'dtype', type(workspace).__name__)} on "
                             f"{getattr(workspace, 'device', '?')}")
        if workspace.numel() < nbytes:
            raise ValueError(f"workspace: {workspace.numel()} bytes, this matmul (M={m}, "
                             f"Kp={w.padded_in_features}) needs {nbytes}")
        ws = workspace
    lib.q4_matmul_cuda(w._handle, x.data_ptr(), dt, m, y.data_ptr(), kernel, ws.data_ptr(), ws.numel(),
                       _check.cuda_stream(x.device))


def matmul_native_ref(x: torch.Tensor, w: QWeight, *, exact: bool = True) -> torch.Tensor:
    """The scalar C++ reference of the CPU kernel (tests compare against it): x (M, K) CPU -> (M, N)."""
    from omni_edge import _native
    _check.tensor("x", x, dtype=_check.FLOAT_DTYPES, ndim=2, shape=(None, w.in_features), device=w.device)
    if w.device.type != "cpu":
        raise ValueError(f"x: the C++ reference runs on cpu tensors, got {w.device}")
    y = torch.empty(x.shape[0], w.out_features, dtype=x.dtype)
    _native.lib().q4_matmul_ref_cpu(w._handle, x.data_ptr(), _check.DTYPE_CODE[x.dtype], x.shape[0], y.data_ptr(),
                                    MODE_EXACT if exact else MODE_INT8)
    return y


def int8_error_bound(x: torch.Tensor, w: QWeight) -> torch.Tensor:
    """Bound on |INT8 path - exact| per output (..., N): sum_k |W[k, n]| * d(k) / 2, d = the activation's
    per-block scale max|x|/127 over its 32-row block in the layout order."""
    k = w.in_features
    x2 = x.reshape(-1, k).float()
    valid = w.perm >= 0
    xl = torch.zeros(x2.shape[0], w.padded_in_features, dtype=torch.float32, device=x.device)
    xl[:, valid] = x2[:, w.perm[valid].long()]
    d = xl.abs().view(x2.shape[0], -1, BLOCK_K).amax(dim=2) / 127.0  # (M, nb)
    dk = torch.zeros_like(x2)
    dk[:, w.perm[valid].long()] = d.repeat_interleave(BLOCK_K, dim=1)[:, valid]
    return (0.5 * dk @ w.dequantize().abs()).reshape(*x.shape[:-1], w.out_features)


def self_check(device: torch.device) -> None:
    """Native kernels against matmul_ref on small random layers (act-order, asymmetric, odd shapes); raises
    AssertionError on disagreement. Tolerances as in tests/test_q4.py."""
    device = torch.device(device)
    gen = torch.Generator().manual_seed(1234)
    k, n, gs = 200, 40, 32  # K and N not multiples of the tiles; act-order g_idx
    q = torch.randint(0, 16, (k, n), generator=gen, dtype=torch.uint8)
    groups = -(-k // gs)
    zeros = torch.randint(0, 16, (groups, n), generator=gen, dtype=torch.uint8)
    scales = (torch.rand(groups, n, generator=gen) * 0.02 + 0.001).half()
    g_idx = (torch.randperm(k, generator=gen) // gs).to(torch.int32)
    bias = torch.randn(n, generator=gen)
    w = QWeight(q, zeros, scales, g_idx, gs, False, bias).to(device)
    modes = (True, False) if device.type == "cpu" else (True,)
    for m in (1, 3, 9, 33):
        x = torch.randn(m, k, generator=gen).to(device)
        ref = matmul_ref(x, w).float()
        mag = (x.float().abs() @ w.dequantize().abs()) + 1.0
        for exact in modes:
            y = matmul(x, w, exact=exact).float()
            tol = 1e-5 * mag if exact else int8_error_bound(x, w) * 1.001 + 1e-5 * mag
            bad = (y - ref).abs() > tol
            if bool(bad.any()):
                raise AssertionError(f"q4 {'exact' if exact else 'int8'} M={m} on {device}: max error "
                                     f"{float((y - ref).abs().max()):.3g} over tolerance at {int(bad.sum())} outputs")
        if device.type == "cuda":
            for dtype in (torch.float16, torch.bfloat16):
                xd = x.to(dtype)
                yd = matmul(xd, w).float()
                refd = matmul_ref(xd, w).float()
                tol = 1e-5 * mag + refd.abs() * (2**-7 if dtype == torch.bfloat16 else 2**-10)  # one output ulp
                if bool(((yd - refd).abs() > tol).any()):
                    raise AssertionError(f"q4 {dtype} M={m} on {device}: max error {float((yd - refd).abs().max()):.3g}")
