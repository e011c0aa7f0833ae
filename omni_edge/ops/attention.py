"""Fused attention over a preallocated KV cache, and block-diagonal attention for the encoders.

Layouts (B = batch, T = new tokens, S = cache capacity, Hq / Hkv = query / key-value heads, D = head dim;
Hq must be a multiple of Hkv: grouped-query attention, query head h reads kv head h // (Hq / Hkv)):

- `prefill(q, k_cache, v_cache, *, start, lengths=None, scale=None) -> out`
    q (B, T, Hq, D) are the queries of positions start .. start+T-1 whose keys and values are already written
    into k_cache / v_cache (B, Hkv, S, D). Causal: query t sees cache positions [0, start + t].
    `lengths` (B,) int32, optional: sequence b holds only lengths[b] valid positions; keys at positions >=
    lengths[b] are ignored and the outputs of queries at positions >= lengths[b] are zero.
    Returns (B, T, Hq, D) in q's dtype.
- `decode(q, k_cache, v_cache, lengths, *, scale=None) -> out`
    One new query per sequence, q (B, Hq, D); sequence b attends to cache positions [0, lengths[b]) (the
    current token's key/value already written). Returns (B, Hq, D).
- `varlen(q, k, v, cu_seqlens, *, scale=None) -> out`
    Non-causal attention inside each segment of a packed batch (the ViT's images, the audio encoder's
    chunks): q, k, v (N, H, D); segment i is rows cu_seqlens[i] .. cu_seqlens[i+1]-1 (int32, first 0, last N).
- `write_kv(k_cache, v_cache, k, v, start)`: copy k, v (B, T, Hkv, D) into the caches at start .. start+T-1.

Softmax runs in fp32 whatever the input dtype; `scale` defaults to 1/sqrt(D). Each op has a `*_ref` twin
in plain torch.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from omni_edge.ops import _check


def _scale(scale: Optional[float], d: int) -> float:
    return 1.0 / math.sqrt(d) if scale is None else float(scale)


# ------------------------------------------------------------------------------------------------
# Torch references
# ------------------------------------------------------------------------------------------------

def _attend_ref(q, k, v, mask, scale):
    """q (Hq, T, D), k/v (Hkv, S, D), mask (T, S) bool (True = attend) -> (Hq, T, D) fp32."""
    hq, hkv = q.shape[0], k.shape[0]
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

def _check_cache(q, k_cache, v_cache, hq: int, d: int):
    _check.tensor("k_cache", k_cache, dtype=q.dtype, ndim=4)
    b, hkv, s, dk = k_cache.shape
    _check.tensor("v_cache", v_cache, dtype=q.dtype, shape=(b, hkv, s, d))
    if dk != d:
        raise ValueError(f"k_cache: head_dim {dk} does not match q's head_dim {d}")
    if hq % hkv:
        raise ValueError(f"q: {hq} query heads is not a multiple of the cache's {hkv} kv heads")
    _check.same_device(q=q, k_cache=k_cache, v_cache=v_cache)
    return b, hkv, s


def _check_lengths(lengths, b: int, s: int, device) -> torch.Tensor:
    _check.tensor("lengths", lengths, dtype=torch.int32, shape=(b,))
    if lengths.device != device:
        raise ValueError(f"lengths: expected a tensor on {device}, got {lengths.device}")
    lo, hi = int(lengths.min()), int(lengths.max())
    if lo < 0 or hi > s:
        raise ValueError(f"lengths: values must lie in [0, {s}] (the cache capacity), got [{lo}, {hi}]")
    return lengths


def write_kv(k_cache, v_cache, k, v, start: int) -> None:
    b, t, hkv, d = k.shape
    if start < 0 or start + t > k_cache.shape[2]:
        raise ValueError(f"start: positions {start}..{start + t - 1} exceed the cache capacity {k_cache.shape[2]}")
    k_cache[:, :, start:start + t].copy_(k.transpose(1, 2))
    v_cache[:, :, start:start + t].copy_(v.transpose(1, 2))


def prefill(q, k_cache, v_cache, *, start: int, lengths=None, scale=None):
    _check.tensor("q", q, dtype=_check.FLOAT_DTYPES, ndim=4)
    b, t, hq, d = q.shape
    _, _, s = _check_cache(q, k_cache, v_cache, hq, d)
    if k_cache.shape[0] != b:
        raise ValueError(f"k_cache: batch {k_cache.shape[0]} does not match q's batch {b}")
    if start < 0 or start + t > s:
        raise ValueError(f"start: positions {start}..{start + t - 1} exceed the cache capacity {s}")
    if lengths is not None:
        _check_lengths(lengths, b, s, q.device)
    return prefill_ref(q, k_cache, v_cache, start=start, lengths=lengths, scale=scale)


def decode(q, k_cache, v_cache, lengths, *, scale=None):
    _check.tensor("q", q, dtype=_check.FLOAT_DTYPES, ndim=3)
    b, hq, d = q.shape
    _, _, s = _check_cache(q, k_cache, v_cache, hq, d)
    if k_cache.shape[0] != b:
        raise ValueError(f"k_cache: batch {k_cache.shape[0]} does not match q's batch {b}")
    _check_lengths(lengths, b, s, q.device)
    return decode_ref(q, k_cache, v_cache, lengths, scale=scale)


def varlen(q, k, v, cu_seqlens, *, scale=None):
    _check.tensor("q", q, dtype=_check.FLOAT_DTYPES, ndim=3)
    n, h, d = q.shape
    _check.tensor("k", k, dtype=q.dtype, shape=(n, h, d))
    _check.tensor("v", v, dtype=q.dtype, shape=(n, h, d))
    _check.tensor("cu_seqlens", cu_seqlens, dtype=torch.int32, ndim=1)
    _check.same_device(q=q, k=k, v=v, cu_seqlens=cu_seqlens)
    cu = cu_seqlens.cpu()
    if cu.numel() < 2 or int(cu[0]) != 0 or int(cu[-1]) != n or bool((cu[1:] < cu[:-1]).any()):
        raise ValueError(f"cu_seqlens: expected non-decreasing offsets from 0 to {n} (rows of q), got {cu.tolist()}")
    return varlen_ref(q, k, v, cu_seqlens, scale=scale)
