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
- `matmul(x, qweight) -> y` for x (..., K) in fp32/bf16/fp16 -> y (..., N) in x's dtype.
- `QWeight.dequantize() -> (K, N)` fp32 weight (the transpose of torch's Linear weight).
- `quantize_rtn(weight, group_size, sym)`: round-to-nearest GPTQ tensors from a dense (N, K) Linear weight.
- `pack_gptq` / `unpack_gptq`: bit-exact conversions between integer codes and the packed tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from omni_edge.ops import _check

CHECKPOINT_FORMATS = ("gptq", "gptq_v2")


# ------------------------------------------------------------------------------------------------
# Packing (bit-exact, pure torch)
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
    zeros = _unpack_rows(qzeros.t().contiguous()).t().contiguous()
    if checkpoint_format == "gptq":
        zeros = ((zeros.to(torch.int16) + 1) & 0xF).to(torch.uint8)
    return q, zeros


# ------------------------------------------------------------------------------------------------
# The weight object
# ------------------------------------------------------------------------------------------------

@dataclass
class QWeight:
    """One 4-bit linear layer, y = x @ W + bias with W (K, N).

    Reference storage (kernels repack from it once, at load; see quantize/FORMAT.md):"""

    q: torch.Tensor  # (K, N) uint8 codes 0..15
    zeros: torch.Tensor  # (G, N) uint8 true zero points (v2 convention)
    scales: torch.Tensor  # (G, N) fp16
    g_idx: torch.Tensor  # (K,) int32 group of each input row
    group_size: int  # rows per group; K for per-channel
    sym: bool
    bias: Optional[torch.Tensor] = None  # (N,) or None

    @property
    def in_features(self) -> int:
        return self.q.shape[0]

    @property
    def out_features(self) -> int:
        return self.q.shape[1]

    @property
    def device(self) -> torch.device:
        return self.q.device

    @classmethod
    def from_gptq(cls, qweight, qzeros, scales, g_idx=None, *, bits: int = 4, group_size: int,
                  sym: bool, checkpoint_format: str = "gptq", bias=None) -> "QWeight":
        if bits != 4:
            raise ValueError(f"bits: only 4-bit weights run on the q4 kernels, got bits={bits}")
        _check.tensor("qweight", qweight, dtype=torch.int32, ndim=2)
        k8, n = qweight.shape
        k = k8 * 8
        if group_size in (-1, 0, None):
            group_size = k
        _check.positive("group_size", int(group_size))
        groups = -(-k // group_size)
        _check.tensor("qzeros", qzeros, dtype=torch.int32, shape=(groups, n // 8))
        if n % 8:
            raise ValueError(f"qweight: N must be a multiple of 8, got N={n}")
        _check.tensor("scales", scales, dtype=(torch.float16, torch.bfloat16, torch.float32), shape=(groups, n))
        if g_idx is None:
            g_idx = torch.arange(k, dtype=torch.int32, device=qweight.device) // group_size
        _check.tensor("g_idx", g_idx, dtype=(torch.int32, torch.int64), shape=(k,))
        g_idx = g_idx.to(torch.int32)
        if k and (int(g_idx.min()) < 0 or int(g_idx.max()) >= groups):
            raise ValueError(f"g_idx: values must lie in [0, {groups}), got [{int(g_idx.min())}, {int(g_idx.max())}]")
        if bias is not None:
            _check.tensor("bias", bias, dtype=_check.FLOAT_DTYPES, shape=(n,))
        _check.same_device(qweight=qweight, qzeros=qzeros, scales=scales, g_idx=g_idx, bias=bias)
        q, zeros = unpack_gptq(qweight, qzeros, checkpoint_format=checkpoint_format)
        return cls(q=q, zeros=zeros, scales=scales.to(torch.float16).contiguous(), g_idx=g_idx.contiguous(),
                   group_size=int(group_size), sym=bool(sym), bias=bias)

    def to_gptq(self, checkpoint_format: str = "gptq"):
        """Back to the standard tensors: (qweight, qzeros, scales, g_idx)."""
        qweight, qzeros = pack_gptq(self.q, self.zeros, checkpoint_format=checkpoint_format)
        return qweight, qzeros, self.scales, self.g_idx

    def dequantize(self) -> torch.Tensor:
        """(K, N) fp32 weight."""
        g = self.g_idx.long()
        s = self.scales.float()[g]
        z = self.zeros.float()[g]
        return (self.q.float() - z) * s


def quantize_rtn(weight: torch.Tensor, group_size: int = 128, *, sym: bool = True):
    """Round-to-nearest 4-bit quantization of a dense Linear weight (N, K) (torch layout).

    Returns integer codes q (K, N) uint8, zeros (G, N) uint8, scales (G, N) fp16 and g_idx (K,) int32, the
    same grid the GPTQ toolchain uses (asymmetric: min/max per group; symmetric: zero 8, scale amax/7.5... see
    quantize/FORMAT.md)."""
    _check.tensor("weight", weight, dtype=_check.FLOAT_DTYPES, ndim=2, contiguous=False)
    n, k = weight.shape
    if group_size in (-1, 0, None):
        group_size = k
    if k % group_size:
        raise ValueError(f"group_size: K={k} must be a multiple of group_size={group_size}")
    w = weight.float().t().reshape(k // group_size, group_size, n)  # (G, g, N)
    scales, zeros = grid_params(w.amin(dim=1), w.amax(dim=1), sym=sym)
    q = torch.clamp(torch.round(w / scales.unsqueeze(1)) + zeros.unsqueeze(1), 0, 15)
    g_idx = torch.arange(k, dtype=torch.int32, device=weight.device) // group_size
    return (q.reshape(k, n).to(torch.uint8), zeros.to(torch.uint8), scales.to(torch.float16), g_idx)


def grid_params(wmin: torch.Tensor, wmax: torch.Tensor, *, sym: bool):
    """Scale and zero point of the 4-bit grid for per-group min/max (GPTQ's convention).

    sym: scale = max(|min|, |max|) * 2 / 15, zero = 8. asym: scale = (max - min) / 15, zero = round(-min / scale).
    Scales are rounded to fp16 first, as stored, so quantization and dequantization agree exactly."""
    wmin = torch.minimum(wmin, torch.zeros_like(wmin))
    wmax = torch.maximum(wmax, torch.zeros_like(wmax))
    if sym:
        amax = torch.maximum(wmin.abs(), wmax)
        scale = amax * 2 / 15
        scale = torch.where(scale == 0, torch.ones_like(scale), scale).half().float()
        zero = torch.full_like(scale, 8.0)
    else:
        scale = (wmax - wmin) / 15
        scale = torch.where(scale == 0, torch.ones_like(scale), scale).half().float()
        zero = torch.clamp(torch.round(-wmin / scale), 0, 15)
    return scale, zero


def qweight_rtn(weight: torch.Tensor, group_size: int = 128, *, sym: bool = True, bias=None) -> QWeight:
    """Dense Linear weight (N, K) -> QWeight by round-to-nearest (the `--quant rtn4` path)."""
    q, zeros, scales, g_idx = quantize_rtn(weight, group_size, sym=sym)
    n, k = weight.shape
    return QWeight(q=q, zeros=zeros, scales=scales, g_idx=g_idx, group_size=group_size if group_size > 0 else k,
                   sym=sym, bias=bias)


# ------------------------------------------------------------------------------------------------
# Ops
# ------------------------------------------------------------------------------------------------

def matmul_ref(x: torch.Tensor, w: QWeight) -> torch.Tensor:
    """Torch reference: fp32 matmul of x with the dequantized weight, cast back to x's dtype."""
    y = x.float() @ w.dequantize().to(x.device)
    if w.bias is not None:
        y = y + w.bias.float()
    return y.to(x.dtype)


def matmul(x: torch.Tensor, w: QWeight) -> torch.Tensor:
    """y = x @ W + bias for x (..., K). Native kernel where available, else the torch reference."""
    if not isinstance(w, QWeight):
        raise ValueError(f"qweight: expected omni_edge.ops.q4.QWeight, got {type(w).__name__}")
    _check.tensor("x", x, dtype=_check.FLOAT_DTYPES, contiguous=False)
    if x.dim() == 0 or x.shape[-1] != w.in_features:
        raise ValueError(f"x: expected last dim K={w.in_features}, got shape {tuple(x.shape)}")
    _check.same_device(x=x, qweight=w.q)
    return matmul_ref(x, w)
