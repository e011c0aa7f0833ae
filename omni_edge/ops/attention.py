"""Fused attention over a preallocated KV cache, and block-diagonal attention for the encoders.

Layouts (B = batch, T = new tokens, S = cache capacity, Hq / Hkv = query / key-value heads, D = head dim;
Hq must be a multiple of Hkv: grouped-query attention, query head h reads kv head h // (Hq / Hkv)):

- `prefill(q, k_cache, v_cache, *, start, lengths=None, scale=None) -> out`
    q (B, T, Hq, D) are the queries of positions start .. start+T-1 whose keys and values are already written
    into k_cache / v_cache (B, Hkv, S, D). Causal: query t sees cache positions [0, start + t].
    `lengths` (B,) int32, optional: sequence b holds only lengths[b] valid positions; keys at positions >=
    lengths[b] are ignored and the outputs of queries at positions >= lengths[b] are zero.
    Returns (B, T, Hq, D) in q's dtype.
- `decode(q, k_cache, v_cache, lengths, *, scale=None, num_splits=None, workspace=None, out=None,
  check_lengths=True) -> out`
    One new query per sequence, q (B, Hq, D); sequence b attends to cache positions [0, lengths[b]) (the
    current token's key/value already written; lengths[b] == 0 gives zeros). Returns (B, Hq, D).
    `workspace` (from `decode_workspace`, sized once for a cache) and `out` let a decode loop allocate
    nothing; `check_lengths=False` skips reading CUDA `lengths` back to the host (see below).
- `varlen(q, k, v, cu_seqlens, *, scale=None) -> out`
    Non-causal attention inside each segment of a packed batch (the ViT's images, the audio encoder's
    chunks): q, k, v (N, H, D); segment i is rows cu_seqlens[i] .. cu_seqlens[i+1]-1 (int32, first 0, last N).
- `write_kv(k_cache, v_cache, k, v, start)`: copy k, v (B, T, Hkv, D) into the caches at start .. start+T-1.

q, caches and k/v share one dtype (fp32, bf16 or fp16) and one device (cpu or cuda) and are contiguous;
lengths and cu_seqlens are int32 on the same device. Scores, softmax and accumulation run in fp32 whatever
the input dtype; `scale` defaults to 1/sqrt(D). Each op has a `*_ref` twin in plain torch.

Native kernels (csrc/attention, dispatched by `omni_edge.ops._dispatch.native_enabled("attention", device)`):
head dims up to 256 (64, 80 and 128 are specialised on CUDA); larger ones use the references.
- CPU: one online-softmax tile loop over (batch, kv head, block of query rows), the query heads that share
  a kv head processed together so each key and value is read once per group; AVX-512 / AVX2 / portable
  micro-kernels chosen at run time; the CPU pool runs the groups and, for decode, splits of the keys.
- CUDA: prefill / varlen is a tiled flash-attention-style kernel (fp32 CUDA-core math, online softmax);
  decode splits each sequence's keys across blocks and merges the partial softmax states in a second kernel.
  Checking `lengths` reads them on the host (one synchronisation); it is skipped while a CUDA graph is being
  captured and with `check_lengths=False` (the backbone's decode step validates the position once, as a host
  integer, and keeps lengths in a device buffer), and the kernels clamp lengths to [0, S] so bad values never
  cause out-of-bounds reads. CPU lengths are always checked (reading host memory costs no synchronisation).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from omni_edge._native import lib as _native_lib
from omni_edge.ops import _check, _dispatch


def _scale(scale: Optional[float], d: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(d)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale: expected a finite number or None, got {scale!r}")
    return float(scale)


def _check_dims(name: str, shape, heads: int, d: int) -> None:
    """At least one head and head_dim >= 1 (0 would divide by zero in the GQA ratio and the default scale)."""
    if heads < 1 or d < 1:
        raise ValueError(f"{name}: expected at least 1 head and head_dim >= 1, got shape {tuple(shape)}")


# ------------------------------------------------------------------------------------------------
# Torch references
# ------------------------------------------------------------------------------------------------

def _attend_ref(q, k, v, mask, scale):
    """q (Hq, T, D), k/v (Hkv, S, D), mask (T, S) bool (True = attend) -> (Hq, T, D) fp32."""
    hq, hkv = q.shape[0], k.shape[0]
    if hkv < 1 or hq % hkv:
        raise ValueError(f"k: {hkv} kv heads for {hq} query heads (expected >= 1, dividing the query heads)")
    rep = hq // hkv
    k = k.float().repeat_interleave(rep, dim=0)
    v = v.float().repeat_interleave(rep, dim=0)
    s = (q.float() @ k.transpose(1, 2)) * scale
    s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, dim=-1)
    p = torch.nan_to_num(p, nan=0.0)  # rows with nothing to attend to give zeros
    return p @ v


def prefill_ref(q, k_cache, v_cache, *, start: int, lengths=None, scale=None):
    b, t, hq, d = q.shape
    sc = _scale(scale, d)
    out = torch.zeros(b, t, hq, d, dtype=torch.float32, device=q.device)
    end = start + t
    for i in range(b):
        n = end if lengths is None else min(end, int(lengths[i]))
        pos_q = torch.arange(start, end, device=q.device)
        pos_k = torch.arange(0, end, device=q.device)
        mask = (pos_k[None, :] <= pos_q[:, None]) & (pos_k[None, :] < n)
        o = _attend_ref(q[i].transpose(0, 1), k_cache[i, :, :end], v_cache[i, :, :end], mask, sc)
        o = o * (pos_q < n).view(1, t, 1)
        out[i] = o.transpose(0, 1)
    return out.to(q.dtype)


def decode_ref(q, k_cache, v_cache, lengths, *, scale=None):
    b, hq, d = q.shape
    sc = _scale(scale, d)
    out = torch.zeros(b, hq, d, dtype=torch.float32, device=q.device)
    for i in range(b):
        n = int(lengths[i])
        mask = torch.ones(1, n, dtype=torch.bool, device=q.device)
        out[i] = _attend_ref(q[i].unsqueeze(1), k_cache[i, :, :n], v_cache[i, :, :n], mask, sc)[:, 0]
    return out.to(q.dtype)


def varlen_ref(q, k, v, cu_seqlens, *, scale=None):
    n, h, d = q.shape
    sc = _scale(scale, d)
    out = torch.zeros(n, h, d, dtype=torch.float32, device=q.device)
    cu = [int(c) for c in cu_seqlens]
    for a, e in zip(cu[:-1], cu[1:]):
        if e == a:
            continue
        mask = torch.ones(e - a, e - a, dtype=torch.bool, device=q.device)
        o = _attend_ref(q[a:e].transpose(0, 1), k[a:e].transpose(0, 1), v[a:e].transpose(0, 1), mask, sc)
        out[a:e] = o.transpose(0, 1)
    return out.to(q.dtype)


# ------------------------------------------------------------------------------------------------
# Public ops (validated; native kernels where available)
# ------------------------------------------------------------------------------------------------

MAX_NATIVE_HEAD_DIM = 256  # csrc/attention/attention.h OE_ATTN_MAX_HEAD_DIM; larger head dims use the references


def _native(device: torch.device, d: int) -> bool:
    return d <= MAX_NATIVE_HEAD_DIM and _dispatch.native_enabled("attention", device)


def _check_cache(q, k_cache, v_cache, hq: int, d: int):
    _check.tensor("k_cache", k_cache, dtype=q.dtype, ndim=4)
    b, hkv, s, dk = k_cache.shape
    _check_dims("q", q.shape, hq, d)
    _check_dims("k_cache", k_cache.shape, hkv, dk)
    if dk != d:
        raise ValueError(f"k_cache: head_dim {dk} does not match q's head_dim {d}")
    _check.tensor("v_cache", v_cache, dtype=q.dtype, shape=(b, hkv, s, d))
    if hq % hkv:
        raise ValueError(f"q: {hq} query heads is not a multiple of the cache's {hkv} kv heads")
    _check.same_device(q=q, k_cache=k_cache, v_cache=v_cache)
    return b, hkv, s


def _check_lengths(lengths, b: int, s: int, device, values: bool = True) -> torch.Tensor:
    _check.tensor("lengths", lengths, dtype=torch.int32, shape=(b,))
    if lengths.device != device:
        raise ValueError(f"lengths: expected a tensor on {device}, got {lengths.device}")
    if b == 0:
        return lengths
    if device.type == "cuda" and (not values or torch.cuda.is_current_stream_capturing()):
        # Reading the values would synchronise (and break the capture); the CUDA kernels clamp lengths to
        # [0, S] themselves, so a bad value cannot cause an out-of-bounds read.
        return lengths
    lo, hi = int(lengths.min()), int(lengths.max())
    if lo < 0 or hi > s:
        raise ValueError(f"lengths: values must lie in [0, {s}] (the cache capacity), got [{lo}, {hi}]")
    return lengths


def write_kv(k_cache, v_cache, k, v, start: int) -> None:
    _check.tensor("k", k, dtype=_check.FLOAT_DTYPES, ndim=4, contiguous=False)
    b, t, hkv, d = k.shape
    _check_dims("k", k.shape, hkv, d)
    _check.tensor("v", v, dtype=k.dtype, shape=(b, t, hkv, d), contiguous=False)
    _check.tensor("k_cache", k_cache, dtype=k.dtype, ndim=4)
    _check.tensor("v_cache", v_cache, dtype=k.dtype, shape=tuple(k_cache.shape))
    if tuple(k_cache.shape[:2]) != (b, hkv) or k_cache.shape[3] != d:
        raise ValueError(f"k_cache: expected shape ({b}, {hkv}, *, {d}) to take k {tuple(k.shape)}, "
                         f"got {tuple(k_cache.shape)}")
    _check.same_device(k_cache=k_cache, v_cache=v_cache, k=k, v=v)
    if start < 0 or start + t > k_cache.shape[2]:
        raise ValueError(f"start: positions {start}..{start + t - 1} exceed the cache capacity {k_cache.shape[2]}")
    k_cache[:, :, start:start + t].copy_(k.transpose(1, 2))
    v_cache[:, :, start:start + t].copy_(v.transpose(1, 2))


def prefill(q, k_cache, v_cache, *, start: int, lengths=None, scale=None):
    _check.tensor("q", q, dtype=_check.FLOAT_DTYPES, ndim=4)
    b, t, hq, d = q.shape
    _, hkv, s = _check_cache(q, k_cache, v_cache, hq, d)
    if k_cache.shape[0] != b:
        raise ValueError(f"k_cache: batch {k_cache.shape[0]} does not match q's batch {b}")
    if not isinstance(start, int) or start < 0 or start + t > s:
        raise ValueError(f"start: positions {start}..{start + t - 1} exceed the cache capacity {s}")
    if lengths is not None:
        _check_lengths(lengths, b, s, q.device)
    if not _native(q.device, d):
        return prefill_ref(q, k_cache, v_cache, start=start, lengths=lengths, scale=scale)
    out = torch.empty_like(q)
    if out.numel() == 0:
        return out
    args = (q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), out.data_ptr(), b, t, hq, hkv, s, d, start,
            0 if lengths is None else lengths.data_ptr(), _scale(scale, d), _check.DTYPE_CODE[q.dtype])
    if q.device.type == "cuda":
        with torch.cuda.device(q.device):
            _native_lib().attention_prefill_cuda(*args, _check.cuda_stream(q.device))
    else:
        _native_lib().attention_prefill_cpu(*args)
    return out


class DecodeWorkspace(NamedTuple):
    """What a decode call on one cache shape needs besides its inputs, made once (`decode_workspace`).
    CUDA: the split count chosen for the device and cache capacity, and the fp32 buffer the splits' partial
    softmax states go to (None when one split needs none). CPU: the requested split count (0: from the
    thread count), no buffer."""
    shape: tuple  # (B, Hq, Hkv, S, D) it was sized for
    device: torch.device
    num_splits: int
    buffer: Optional[torch.Tensor]  # (nbytes / 4,) fp32 on the device, or None


def decode_workspace(b: int, hq: int, hkv: int, s: int, d: int, device, *,
                     num_splits: Optional[int] = None) -> DecodeWorkspace:
    """The split plan and scratch buffer of `decode` for caches (B, Hkv, S, D) and Hq query heads on `device`,
    sized for the worst case (every sequence at the full capacity S): allocate once with the cache, pass to
    every decode call (`decode(..., workspace=ws)`), which then allocates nothing but its output (or nothing
    with `out=`)."""
    device = torch.device(device)
    for name, v in (("batch", b), ("query heads", hq), ("kv heads", hkv), ("cache capacity", s), ("head_dim", d)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"decode_workspace: {name} must be a positive integer, got {v!r}")
    if hq % hkv:
        raise ValueError(f"decode_workspace: {hq} query heads is not a multiple of {hkv} kv heads")
    if num_splits is not None and (not isinstance(num_splits, int) or not 1 <= num_splits <= 1024):
        raise ValueError(f"num_splits: expected None or an integer in [1, 1024], got {num_splits!r}")
    if device.type != "cuda" or not _native(device, d):
        return DecodeWorkspace((b, hq, hkv, s, d), device, num_splits or 0, None)
    index = device.index if device.index is not None else torch.cuda.current_device()
    splits, nbytes = _native_lib().attention_decode_cuda_plan(b, hq, hkv, s, d, index, num_splits or 0)
    buf = torch.empty(max(nbytes // 4, 1), dtype=torch.float32, device=device) if nbytes else None
    return DecodeWorkspace((b, hq, hkv, s, d), torch.device("cuda", index), int(splits), buf)


def decode(q, k_cache, v_cache, lengths, *, scale=None, num_splits: Optional[int] = None,
           workspace: Optional[DecodeWorkspace] = None, out: Optional[torch.Tensor] = None,
           check_lengths: bool = True):
    """See the module docstring. `num_splits` (tuning and tests): how many pieces each sequence's keys are
    split into, each processed in parallel and merged by their softmax statistics; None chooses from the
    thread count (CPU) or the number of multiprocessors (CUDA). `workspace`: from `decode_workspace` for
    these shapes (then `num_splits` comes from it). `out`: a preallocated (B, Hq, D) result of q's dtype.
    `check_lengths=False`: CUDA lengths are not read back (no host synchronisation); the kernels clamp them
    to [0, S], so a wrong value gives wrong attention but never an out-of-bounds read."""
    _check.tensor("q", q, dtype=_check.FLOAT_DTYPES, ndim=3)
    b, hq, d = q.shape
    _, hkv, s = _check_cache(q, k_cache, v_cache, hq, d)
    if k_cache.shape[0] != b:
        raise ValueError(f"k_cache: batch {k_cache.shape[0]} does not match q's batch {b}")
    _check_lengths(lengths, b, s, q.device, values=check_lengths)
    if num_splits is not None and (not isinstance(num_splits, int) or not 1 <= num_splits <= 1024):
        raise ValueError(f"num_splits: expected None or an integer in [1, 1024], got {num_splits!r}")
    if workspace is not None:
        if not isinstance(workspace, DecodeWorkspace):
            raise ValueError(f"workspace: expected an attention.DecodeWorkspace, got {type(workspace).__name__}")
        if workspace.shape != (b, hq, hkv, s, d) or workspace.device.type != q.device.type or (
                q.device.type == "cuda" and workspace.device != _cuda_device(q.device)):
            raise ValueError(f"workspace: made for shapes (B, Hq, Hkv, S, D) = {workspace.shape} on "
                             f"{workspace.device}, got {(b, hq, hkv, s, d)} on {q.device}")
        num_splits = workspace.num_splits or None
    if out is not None:
        _check.tensor("out", out, dtype=q.dtype, shape=(b, hq, d), device=q.device)
    if not _native(q.device, d):
        ref = decode_ref(q, k_cache, v_cache, lengths, scale=scale)
        return ref if out is None else out.copy_(ref)
    if out is None:
        out = torch.empty_like(q)
    if out.numel() == 0:
        return out
    lib = _native_lib()
    args = (q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), out.data_ptr(), b, hq, hkv, s, d,
            lengths.data_ptr(), _scale(scale, d), _check.DTYPE_CODE[q.dtype])
    if q.device.type == "cuda":
        if workspace is None:
            index = q.device.index if q.device.index is not None else torch.cuda.current_device()
            splits, nbytes = lib.attention_decode_cuda_plan(b, hq, hkv, s, d, index, num_splits or 0)
            ws = torch.empty(max(nbytes // 4, 1), dtype=torch.float32, device=q.device)
        else:
            splits, ws = workspace.num_splits, workspace.buffer
            nbytes = 0 if ws is None else ws.numel() * 4
        with torch.cuda.device(q.device):
            lib.attention_decode_cuda(*args, splits, 0 if ws is None else ws.data_ptr(), nbytes,
                                      _check.cuda_stream(q.device))
    else:
        lib.attention_decode_cpu(*args, num_splits or 0)
    return out


def _cuda_device(device: torch.device) -> torch.device:
    return device if device.index is not None else torch.device("cuda", torch.cuda.current_device())


def varlen(q, k, v, cu_seqlens, *, scale=None):
    _check.tensor("q", q, dtype=_check.FLOAT_DTYPES, ndim=3)
    n, h, d = q.shape
    _check_dims("q", q.shape, h, d)
    _check.tensor("k", k, dtype=q.dtype, shape=(n, h, d))
    _check.tensor("v", v, dtype=q.dtype, shape=(n, h, d))
    _check.tensor("cu_seqlens", cu_seqlens, dtype=torch.int32, ndim=1)
    _check.same_device(q=q, k=k, v=v, cu_seqlens=cu_seqlens)
    cu = cu_seqlens.cpu()
    if cu.numel() < 2 or int(cu[0]) != 0 or int(cu[-1]) != n or bool((cu[1:] < cu[:-1]).any()):
        raise ValueError(f"cu_seqlens: expected non-decreasing offsets from 0 to {n} (rows of q), got {cu.tolist()}")
    if not _native(q.device, d):
        return varlen_ref(q, k, v, cu_seqlens, scale=scale)
    out = torch.empty_like(q)
    if out.numel() == 0:
        return out
    nseg = cu.numel() - 1
    args = (q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), n, h, d, cu_seqlens.data_ptr(), nseg)
    if q.device.type == "cuda":
        max_len = int((cu[1:] - cu[:-1]).max())
        with torch.cuda.device(q.device):
            _native_lib().attention_varlen_cuda(*args, max_len, _scale(scale, d), _check.DTYPE_CODE[q.dtype],
                                                _check.cuda_stream(q.device))
    else:
        _native_lib().attention_varlen_cpu(*args, _scale(scale, d), _check.DTYPE_CODE[q.dtype])
    return out


# ------------------------------------------------------------------------------------------------
# Self-check (run by omni_edge.ops._dispatch before a GPU's first native call)
# ------------------------------------------------------------------------------------------------

# Allowed max |native - ref| / max |ref| per dtype: the reference runs in fp32 on the same rounded inputs,
# so the difference is the output rounding of the dtype plus fp32 summation-order noise.
_SELF_CHECK_TOL = {torch.float32: 1e-4, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}


def _close(name: str, got: torch.Tensor, want: torch.Tensor, dtype) -> None:
    err = (got.float() - want.float()).abs().max().item()
    ref = max(want.float().abs().max().item(), 1e-6)
    if not err <= _SELF_CHECK_TOL[dtype] * ref:
        raise AssertionError(f"attention self-check: {name} ({dtype}) differs from the torch reference by "
                             f"{err:.3g} (max |ref| {ref:.3g}, tolerance {_SELF_CHECK_TOL[dtype]} relative)")


def self_check(device: torch.device) -> None:
    """Run the native prefill, decode (one and several KV splits) and varlen kernels on `device` against the
    torch references on small random inputs with odd sizes; AssertionError on disagreement."""
    device = torch.device(device)
    g = torch.Generator().manual_seed(1234)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for d in (64, 80, 128, 59):
            def rnd(*shape):
                return torch.randn(*shape, generator=g).to(dtype).to(device)

            b, t, hq, hkv, s, start = 2, 19, 6, 2, 44, 7
            q, kc, vc = rnd(b, t, hq, d), rnd(b, hkv, s, d), rnd(b, hkv, s, d)
            lengths = torch.tensor([start + 11, s], dtype=torch.int32, device=device)
            _close(f"prefill d={d}", prefill(q, kc, vc, start=start, lengths=lengths),
                   prefill_ref(q, kc, vc, start=start, lengths=lengths), dtype)

            s = 700
            q, kc, vc = rnd(3, 14, d), rnd(3, 2, s, d), rnd(3, 2, s, d)
            lengths = torch.tensor([1, 0, 677], dtype=torch.int32, device=device)
            want = decode_ref(q, kc, vc, lengths)
            for splits in (1, 5):
                _close(f"decode d={d} splits={splits}", decode(q, kc, vc, lengths, num_splits=splits), want, dtype)

            cu = torch.tensor([0, 0, 1, 18, 18, 83], dtype=torch.int32, device=device)
            q, k, v = rnd(83, 3, d), rnd(83, 3, d), rnd(83, 3, d)
            _close(f"varlen d={d}", varlen(q, k, v, cu), varlen_ref(q, k, v, cu), dtype)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
