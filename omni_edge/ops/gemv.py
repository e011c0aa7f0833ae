"""Dense GEMV with weights kept in their stored precision and fp32 activations (csrc/decode/gemv_lowp.h).

The embedding and the lm_head are the two (V, C) matrices of a language model; on the CPU they stay in the
dtype the checkpoint stores (fp16 in bundles, bf16 in Baichuan's checkpoint) while activations are fp32, so a
7B lm_head is read as 1.09 GB per token instead of 2.18 GB of an fp32 copy. Two weight forms:

- dense (N, K) fp32 / fp16 / bf16: `matmul(x, weight, bias)`;
- `Q8Weight`, the `--lm-head q8` format (quantize/FORMAT.md §4): int8 codes (N, K) with one fp16 scale per
  row and block of `block` consecutive inputs (block = K: one scale per row),
  W[n, k] = scales[n, k // block] * codes[n, k], codes in [-127, 127] (symmetric, absmax / 127).

Each op has a torch reference (`matmul_ref`, `q8_matmul_ref`: upcast the weight, fp32 matmul) that is also the
fallback off the CPU or without the native library. The native kernels take one row of x at a time; up to
NATIVE_MAX_ROWS rows are run row by row, more (a perplexity pass) go through torch on an upcast copy.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from omni_edge.ops import _check, _dispatch, q4

Q8_BLOCKS = (32, -1)  # the block sizes `--lm-head q8` offers: ggml Q8_0-like 32, or -1 = one scale per row
NATIVE_MAX_ROWS = 8  # rows of x run natively one by one; more use torch (the weight is re-read per row)

_lib = None


def _native_lib():
    global _lib
    if _lib is None:
        from omni_edge import _native
        _lib = _native.lib()
    return _lib


class Q8Weight:
    """int8 per-row-block weight of one linear: y = x W^T (+ bias), W (N, K) = scales ⊗ codes."""

    __slots__ = ("codes", "scales", "block", "bias")

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, block: int, bias: Optional[torch.Tensor] = None):
        _check.tensor("codes", codes, dtype=torch.int8, ndim=2)
        n, k = codes.shape
        if not isinstance(block, int) or not 1 <= block <= max(k, 1):
            raise ValueError(f"block: expected an integer in [1, K={k}], got {block!r}")
        g = -(-k // block) if k else 1
        _check.tensor("scales", scales, dtype=torch.float16, shape=(n, g), device=codes.device)
        if bias is not None:
            _check.tensor("bias", bias, dtype=torch.float32, shape=(n,), device=codes.device)
        self.codes = codes  # (N, K) int8  lm_head.q8_codes
        self.scales = scales  # (N, ceil(K / block)) fp16  lm_head.q8_scales
        self.block = block
        self.bias = bias  # (N,) fp32 or None

    @property
    def out_features(self) -> int:
        return self.codes.shape[0]

    @property
    def in_features(self) -> int:
        return self.codes.shape[1]

    @property
    def device(self) -> torch.device:
        return self.codes.device

    @property
    def nbytes(self) -> int:
        return self.codes.numel() + 2 * self.scales.numel()

    def dequantize(self) -> torch.Tensor:
        """(N, K) fp32: scale times code (exact in fp32: an fp16 scale times an integer below 2^7)."""
        s = self.scales.float().repeat_interleave(self.block, dim=1)[:, :self.in_features]
        return s * self.codes.float()

    def __repr__(self) -> str:
        return (f"Q8Weight(out={self.out_features}, in={self.in_features}, block={self.block}, "
                f"device={self.device})")


def quantize_q8(weight: torch.Tensor, block: int = 32, *, bias: Optional[torch.Tensor] = None) -> Q8Weight:
    """Round-to-nearest int8 of a dense (N, K) weight, symmetric per (row, block of `block` inputs); block -1 =
    one scale per row. The fp16 scale is rounded first and the codes computed with it, so dequantize() is the
    weight the kernels use; an all-zero block gets scale 0 and codes 0."""
    _check.tensor("weight", weight, dtype=_check.FLOAT_DTYPES, ndim=2, contiguous=False)
    n, k = weight.shape
    if block == -1:
        block = max(k, 1)
    if not isinstance(block, int) or block < 1:
        raise ValueError(f"block: expected a positive integer or -1 (per row), got {block!r}")
    block = min(block, max(k, 1))
    g = -(-k // block) if k else 1
    w = weight.detach().float()
    pad = g * block - k
    wp = F.pad(w, (0, pad)).view(n, g, block) if k else w.new_zeros(n, 1, block)
    amax = wp.abs().amax(dim=2)  # (N, G)
    scales = (amax / 127.0).to(torch.float16)
    s = scales.float()
    inv = torch.where(s > 0, 1.0 / s, torch.zeros_like(s))
    codes = torch.round(wp * inv[:, :, None]).clamp_(-127, 127).to(torch.int8).view(n, g * block)[:, :k]
    return Q8Weight(codes.contiguous(), scales.contiguous(), block,
                    None if bias is None else bias.detach().float().contiguous())


def matmul_ref(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The torch reference: fp32 matmul of the upcast weight; (..., K) -> (..., N) fp32."""
    y = x.float() @ weight.float().t()
    return y if bias is None else y + bias.float()


def q8_matmul_ref(x: torch.Tensor, w: Q8Weight) -> torch.Tensor:
    y = x.float() @ w.dequantize().t()
    return y if w.bias is None else y + w.bias


def _rows(x: torch.Tensor, k: int, device: torch.device) -> Optional[int]:
    """Rows of x when the native kernels should serve it (fp32 contiguous CPU, few rows), else None."""
    if x.dim() == 0 or x.shape[-1] != k:
        raise ValueError(f"x: expected shape (..., {k}) (last dim = in_features), got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"x: expected a tensor on {device} (the weight's device), got {x.device}")
    if device.type != "cpu" or x.dtype != torch.float32 or not x.is_contiguous():
        return None
    m = x.numel() // k if k else 0
    if m > NATIVE_MAX_ROWS or not _dispatch.native_enabled("gemv", device):
        return None
    return m


def matmul(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y = x W^T + bias with W (N, K) fp32 / fp16 / bf16 and x (..., K): (..., N) fp32, W read as stored."""
    _check.tensor("weight", weight, dtype=_check.FLOAT_DTYPES, ndim=2)
    n, k = weight.shape
    m = _rows(x, k, weight.device)
    if m is None or (bias is not None and bias.dtype != torch.float32):
        return matmul_ref(x, weight, bias)
    y = torch.empty(x.shape[:-1] + (n,), dtype=torch.float32)
    lib, code = _native_lib(), _check.DTYPE_CODE[weight.dtype]
    xf, yf = x.reshape(m, k), y.view(m, n)
    for i in range(m):
        lib.gemv_cpu(weight.data_ptr(), code, xf[i].data_ptr(), 0 if bias is None else bias.data_ptr(), n, k,
                     yf[i].data_ptr())
    return y


def q8_matmul(x: torch.Tensor, w: Q8Weight, *, exact: Optional[bool] = None) -> torch.Tensor:
    """y = x W^T + bias for a Q8Weight: (..., K) -> (..., N) fp32. Natively, x is quantized to int8 per 32
    inputs first (the q4 INT8 mode's rule, ggml's Q8_0 x Q8_0) unless `exact` (default: the q4 mode in force,
    `omni_edge.ops.q4.exact_default()`) or K / the block are not multiples of 32; the torch path is exact."""
    if not isinstance(w, Q8Weight):
        raise ValueError(f"w: expected omni_edge.ops.gemv.Q8Weight, got {type(w).__name__}")
    n, k = w.out_features, w.in_features
    m = _rows(x, k, w.device)
    if m is None:
        return q8_matmul_ref(x, w)
    y = torch.empty(x.shape[:-1] + (n,), dtype=torch.float32)
    lib = _native_lib()
    mode = q4.MODE_EXACT if (q4.exact_default() if exact is None else exact) else q4.MODE_INT8
    xf, yf = x.reshape(m, k), y.view(m, n)
    for i in range(m):
        lib.gemv_q8_cpu(w.codes.data_ptr(), w.scales.data_ptr(), w.block, xf[i].data_ptr(),
                        0 if w.bias is None else w.bias.data_ptr(), n, k, yf[i].data_ptr(), mode)
    return y


def quantize_activations_ref(x: torch.Tensor) -> torch.Tensor:
    """x (K,) fp32, K a multiple of 32 -> the values the int8 path multiplies: per 32 inputs d = max |x| / 127,
    xi = round-half-even(x * (127 / max |x|)) (0 for an all-zero block), returned as d * xi (fp32)."""
    xb = x.float().reshape(-1, 32)
    amax = xb.abs().amax(dim=1, keepdim=True)
    inv = torch.where(amax > 0, torch.tensor(127.0) / amax, torch.zeros_like(amax))
    xi = torch.round(xb * inv)
    return (xi * (amax / 127.0)).reshape(x.shape)
