"""GPTQ (Frantar, Ashkboos, Hoefler, Alistarh, 2022) and round-to-nearest on one linear layer.

A linear layer y = x @ W.T (W: (N, K), torch layout) is quantized against the Hessian of the layer-wise
squared error, H = 2/n * sum over n calibration tokens of x x^T  (K, K). GPTQ quantizes the input columns
one at a time and spreads each column's rounding error over the columns not yet quantized, using the upper
Cholesky factor of H^-1 (the paper's Algorithm 1):

  - dampening: H += damp * mean(diag H) * I (default 1 %),
  - dead inputs (diag H == 0, an input that is always zero) get H[k, k] = 1 and W[:, k] = 0,
  - lazy batch updates: columns are processed in blocks of `block_size`; inside a block the error is
    propagated column by column, to the rest of the matrix once per block,
  - optional act-order (desc_act): columns are processed in order of decreasing diag(H); with static groups
    the group grid is fixed from the original weight first, so g_idx stays k // group_size,
  - without act-order, group-aware order (`QuantSpec.group_order`, on by default): the groups are processed in
    order of decreasing largest diag(H), the columns inside each group in order of decreasing diag(H). Each
    group keeps its input rows, so g_idx stays k // group_size and the checkpoint is a plain grouped one, but
    the important columns are quantized while the most columns are left to absorb their error (about 20 %
    lower layer error than the natural order on SmolLM2's real Hessians; GPTQModel's act_group_aware),
  - a non-static group's grid is taken when its first column comes up, by default from the values at the
    start of the lazy-update block (`group_stats="block"`, the reference code's and GPTQModel's timing),
  - group grids: per `group_size` input rows (32/64/128/...), or per output channel (group_size -1).

The grid is GPTQ's min/max grid (see `grid_params`): asymmetric scale = (max - min) / maxq with an integer
zero point, symmetric scale = 2 * absmax / maxq with zero (maxq + 1) / 2; scales are rounded to fp16, as
stored, before any code is chosen, so the stored tensors dequantize to exactly the weight GPTQ worked with.

Results use the integer-code layout of `omni_edge.ops.q4` (q (K, N), zeros/scales (G, N), g_idx (K,)), which
`omni_edge.ops.q4.pack_gptq` turns into the standard checkpoint tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from omni_edge.ops import q4

__all__ = ["QuantSpec", "QuantResult", "HessianAccumulator", "grid_params", "gptq_quantize", "rtn_quantize",
           "quantize_layer", "output_error"]


CLIP_CHOICES = ("none", "mse", "hessian")
CLIP_GRID, CLIP_MAXSHRINK, CLIP_NORM = 100, 0.8, 2.4  # the GPTQ reference's Quantizer(mse=True) search


@dataclass(frozen=True)
class QuantSpec:
    """How one linear layer is quantized. `static_groups=None` means: static groups exactly when act_order."""

    bits: int = 4
    group_size: int = 128  # input rows per group; -1 = one group per output channel (per-channel)
    sym: bool = True
    act_order: bool = False
    static_groups: Optional[bool] = None
    damp: float = 0.01  # fraction of mean(diag H) added to the diagonal
    block_size: int = 128  # columns per lazy-update block
    # Where a non-static group's grid comes from: "current" = its columns' values as updated so far (every
    # earlier column's error included); "block" = the values at the start of the lazy-update block (the
    # reference GPTQ code and GPTQModel: earlier columns of the same block not yet applied).
    group_stats: str = "block"
    # Group-aware order (used when act_order is off): groups are processed in order of decreasing importance
    # (largest diag H in the group), the columns of each group in order of decreasing diag H. Each group still
    # holds the same input rows as without it (g_idx = k // group_size), so the checkpoint and the kernels
    # are those of a plain grouped layer.
    group_order: bool = True
    # Grid search (clipping) of each group's grid: "none" = the min/max grid; "mse" = GPTQ's grid search
    # (reference code and GPTQModel `mse=2.4`): shrink the range by p = 1, 0.99, ..., 0.2 and keep, per output
    # row, the grid with the least sum |q(w) - w|^2.4 over the group; "hessian" = the same shrink factors, each
    # column's squared error weighted by what GPTQ pays for it, 1 / [H^-1]_kk (the Cholesky factor's diagonal
    # squared, in processing order). "hessian" is the default: on SmolLM2 (group 32 sym) it takes the held-out
    # perplexity from 27.09 to 23.86 (fp32 20.45; README "GPTQ against GPTQModel").
    clip: str = "hessian"

    def __post_init__(self):
        if self.bits not in (2, 3, 4, 8):
            raise ValueError(f"bits: expected one of 2, 3, 4, 8, got {self.bits}")
        if not (self.group_size == -1 or self.group_size > 0):
            raise ValueError(f"group_size: expected -1 (per-channel) or a positive size, got {self.group_size}")
        if not (0.0 <= self.damp < 1.0):
            raise ValueError(f"damp: expected a fraction in [0, 1), got {self.damp}")
        if self.block_size <= 0:
            raise ValueError(f"block_size: expected a positive size, got {self.block_size}")
        if self.clip not in CLIP_CHOICES:
            raise ValueError(f"clip: expected one of {', '.join(CLIP_CHOICES)}, got {self.clip!r}")
        if self.group_stats not in ("current", "block"):
            raise ValueError(f"group_stats: expected 'current' or 'block', got {self.group_stats!r}")

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1

    @property
    def uses_static_groups(self) -> bool:
        return self.act_order if self.static_groups is None else bool(self.static_groups)

    def groups_for(self, k: int) -> int:
        gs = self.effective_group_size(k)
        return k // gs

    def effective_group_size(self, k: int) -> int:
        gs = k if self.group_size == -1 else self.group_size
        if k % gs:
            raise ValueError(f"group_size: the layer's input size K={k} is not a multiple of group_size={gs}")
        return gs


@dataclass
class QuantResult:
    """One quantized linear layer in the integer-code layout of omni_edge.ops.q4."""

    q: torch.Tensor  # (K, N) uint8 codes 0..maxq
    zeros: torch.Tensor  # (G, N) uint8 true zero points
    scales: torch.Tensor  # (G, N) fp16
    g_idx: torch.Tensor  # (K,) int32 group of each input row
    weight: torch.Tensor  # (N, K) fp32 dequantized weight (what the codes decode to), torch layout
    damp_used: float = 0.0  # the dampening that made H positive definite (>= spec.damp)


# ------------------------------------------------------------------------------------------------
# The grid
# ------------------------------------------------------------------------------------------------

def grid_params(wmin: torch.Tensor, wmax: torch.Tensor, *, bits: int = 4, sym: bool):
    """The grid of omni_edge.ops.q4.grid_params (the single implementation, shared with the runtime's RTN)."""
    return q4.grid_params(wmin, wmax, sym=sym, bits=bits)


def search_grid(w: torch.Tensor, *, bits: int, sym: bool, clip: str = "none",
                weights: Optional[torch.Tensor] = None):
    """Grid of each row of w (N, gs): the min/max grid, or with clip "mse"/"hessian" the best of the shrunk
    ranges p * [min, max], p in [1 - CLIP_MAXSHRINK, 1] (see QuantSpec.clip), searched coarse to fine: p = 1,
    0.95, ..., 0.2, then the best one +- 0.04 in steps of 0.01 (25 grids tried instead of all 81 steps of
    0.01; the same result on SmolLM2's layers within noise). weights (gs,): the column weights of "hessian".
    Returns fp32 (scale, zero), each (N,)."""
    wmin, wmax = w.amin(dim=1), w.amax(dim=1)
    if clip == "none":
        return grid_params(wmin, wmax, bits=bits, sym=sym)
    n = w.shape[0]
    lo = 1.0 - CLIP_MAXSHRINK
    fine_step = 1.0 / CLIP_GRID

    def best_of(p):  # p (C, 1) or (C, N) shrink factors -> (chosen p (N,), scale (N,), zero (N,))
        step = max(1, (1 << 22) // max(1, w.numel()))  # grids per pass: about 4 M values at a time
        best = p_best = s_best = z_best = None
        for c0 in range(0, p.shape[0], step):
            pc = p[c0:c0 + step]
            s, z = grid_params(pc * wmin, pc * wmax, bits=bits, sym=sym)  # (C, N)
            s3, z3 = s.unsqueeze(2), z.unsqueeze(2)
            d = s3 * (q4.quantize_codes(w, s3, z3, bits=bits) - z3) - w  # (C, N, gs)
            e = d.abs_().pow_(CLIP_NORM).sum(dim=2) if clip == "mse" else (d.square_() * weights).sum(dim=2)
            i = e.argmin(dim=0, keepdim=True)  # the first of equal costs: the widest range
            e = e.gather(0, i)[0]
            pi = pc.expand(-1, n).gather(0, i)[0]
            si, zi = s.gather(0, i)[0], z.gather(0, i)[0]
            if best is None:
                best, p_best, s_best, z_best = e, pi, si, zi
            else:
                better = e < best
                best = torch.where(better, e, best)
                p_best, s_best, z_best = (torch.where(better, a, b) for a, b in ((pi, p_best), (si, s_best),
                                                                                 (zi, z_best)))
        return p_best, s_best, z_best

    coarse = torch.arange(CLIP_GRID, round(lo * CLIP_GRID) - 1, -5, device=w.device, dtype=torch.float32)
    p, _, _ = best_of((coarse / CLIP_GRID).unsqueeze(1))
    offsets = torch.tensor([0, -4, -3, -2, -1, 1, 2, 3, 4], device=w.device, dtype=torch.float32) * fine_step
    fine = (p.unsqueeze(0) + offsets.unsqueeze(1)).clamp(lo, 1.0)  # (9, N), offset 0 first: ties keep it
    _, scale, zero = best_of(fine)
    return scale, zero


def _quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int):
    """Codes and dequantized values of w on the grid (scale, zero); all three broadcast together."""
    q = q4.quantize_codes(w, scale, zero, bits=maxq.bit_length())
    return q, scale * (q - zero)


# ------------------------------------------------------------------------------------------------
# Hessian
# ------------------------------------------------------------------------------------------------

class HessianAccumulator:
    """H = 2/n * sum_t x_t x_t^T over all calibration tokens fed to one linear layer (or a group of linears
    that read the same input, e.g. q/k/v or gate/up)."""

    def __init__(self, in_features: int, device="cpu"):
        self.in_features = in_features
        self._sum = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)  # (K, K)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        """x: (..., K) activations, any float dtype; accumulated in fp32."""
        if self._sum is None:
            raise ValueError("HessianAccumulator: add() after hessian() was taken")
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x: expected last dim {self.in_features}, got shape {tuple(x.shape)}")
        x2 = x.reshape(-1, self.in_features).to(device=self._sum.device, dtype=torch.float32)
        self._sum.addmm_(x2.t(), x2)
        self.tokens += x2.shape[0]

    def hessian(self) -> torch.Tensor:
        """2/n * sum x x^T. Scales the running sum in place (no second K x K copy), so call it once, after the
        last `add`."""
        if self.tokens == 0:
            raise ValueError("HessianAccumulator: no calibration tokens were added")
        if self._sum is None:
            raise ValueError("HessianAccumulator: hessian() was already taken")
        h, self._sum = self._sum.mul_(2.0 / self.tokens), None
        return h


# ------------------------------------------------------------------------------------------------
# Round to nearest
# ------------------------------------------------------------------------------------------------

def rtn_quantize(weight: torch.Tensor, spec: QuantSpec) -> QuantResult:
    """Round-to-nearest on the same grid and grouping GPTQ uses (act_order is ignored: RTN has no order)."""
    w = weight.detach().float()
    n, k = w.shape
    gs = spec.effective_group_size(k)
    groups = k // gs
    wg = w.reshape(n, groups, gs)
    scale, zero = grid_params(wg.amin(dim=2), wg.amax(dim=2), bits=spec.bits, sym=spec.sym)  # (N, G)
    q, dq = _quantize(wg, scale.unsqueeze(2), zero.unsqueeze(2), spec.maxq)
    g_idx = torch.arange(k, dtype=torch.int32, device=w.device) // gs
    return QuantResult(q=q.reshape(n, k).t().to(torch.uint8).contiguous(),
                       zeros=zero.t().to(torch.uint8).contiguous(),
                       scales=scale.t().to(torch.float16).contiguous(),
                       g_idx=g_idx, weight=dq.reshape(n, k))


# ------------------------------------------------------------------------------------------------
# GPTQ
# ------------------------------------------------------------------------------------------------

def _upper_cholesky_of_inverse(h: torch.Tensor, damp: float):
    """Upper Cholesky factor U of (H + lambda I)^-1 with lambda = damp * mean(diag H). If H + lambda I is not
    numerically positive definite, lambda grows (damp + 0.01, + 0.02, ...) until it is; returns (U, damp).

    Works in place on `h` (its diagonal ends up damped): for a K x K Hessian, at most two more K x K
    matrices exist at a time (18944^2 fp32 = 1.4 GB each for Qwen2.5-7B's down_proj)."""
    diag = h.diagonal()
    diag0 = diag.clone()
    mean_diag = torch.mean(diag0).item()
    tried = []
    d = damp
    for _ in range(50):
        diag.copy_(diag0 + d * mean_diag)
        lower, info = torch.linalg.cholesky_ex(h)
        if int(info) == 0:
            hinv = torch.cholesky_inverse(lower)
            del lower
            upper, info = torch.linalg.cholesky_ex(hinv, upper=True)
            del hinv
            if int(info) == 0 and torch.isfinite(upper).all():
                return upper, d
        tried.append(round(d, 4))
        d += 0.01
    raise ValueError(f"hessian: not positive definite even with dampening fractions {tried}; "
                     "the calibration activations may contain inf/nan")


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec) -> QuantResult:
    """Quantize one (or several stacked) linear weight(s) W (N, K) against the Hessian H (K, K) of its input.

    Rows are independent given H, so linears that read the same input (q/k/v, gate/up) may be stacked along
    N and quantized in one call with the same result as separately. Runs on the device of `hessian`."""
    device = hessian.device
    w = weight.detach().to(device=device, dtype=torch.float32).clone()  # (N, K), updated in place
    n, k = w.shape
    if hessian.shape != (k, k):
        raise ValueError(f"hessian: expected shape ({k}, {k}) for weight {tuple(weight.shape)}, "
                         f"got {tuple(hessian.shape)}")
    gs = spec.effective_group_size(k)
    groups = k // gs
    maxq = spec.maxq

    # Dead inputs: never nonzero in calibration, so their weights cannot matter there; quantize them to 0
    # (and give them H[k, k] = 1 below, which also places them for the column order).
    diag = torch.diagonal(hessian.detach()).to(torch.float32)  # (K,)
    dead = diag == 0
    diag = diag.masked_fill(dead, 1.0)
    w[:, dead] = 0.0

    static = spec.uses_static_groups
    scales = torch.empty(groups, n, dtype=torch.float32, device=device)
    zeros = torch.empty(groups, n, dtype=torch.float32, device=device)
    w_orig = w  # the (dead-zeroed) original weight: static grids come from it (below, before any update)

    in_groups = spec.group_order and not spec.act_order  # processing order permutes within and among groups
    if spec.act_order:
        perm = torch.argsort(diag, descending=True, stable=True)
    elif in_groups:
        dg = diag.reshape(groups, gs)
        inner = torch.argsort(dg, dim=1, descending=True, stable=True)  # (G, gs) columns by importance
        outer = torch.argsort(dg.amax(dim=1), descending=True, stable=True)  # (G,) groups by importance
        perm = (inner + torch.arange(groups, device=device).unsqueeze(1) * gs)[outer].reshape(-1)
    else:
        perm = torch.arange(k, device=device)
    if spec.act_order or in_groups:
        w = w[:, perm]
        # one gather straight into the permuted copy: no K x K intermediate
        h = hessian.detach()[perm.unsqueeze(1), perm.unsqueeze(0)].to(torch.float32)
        dead = dead[perm]
    else:
        h = hessian.detach().to(dtype=torch.float32).clone()
    didx = torch.nonzero(dead).flatten()
    h[didx, didx] = 1.0

    hinv, damp_used = _upper_cholesky_of_inverse(h, spec.damp)  # (K, K) upper triangular
    del h
    # "hessian" clip: what GPTQ pays per unit of squared error in each column, 1 / [H^-1]_kk (processing order)
    col_cost = hinv.diagonal().square().reciprocal() if spec.clip == "hessian" else None

    def group_grid(values, cols):
        return search_grid(values, bits=spec.bits, sym=spec.sym, clip=spec.clip,
                           weights=None if col_cost is None else col_cost[cols])

    if static:  # grids fixed from the original weight, one per group of original input rows
        pos = torch.argsort(perm)  # processing position of each original column
        for g in range(groups):
            scales[g], zeros[g] = group_grid(w_orig[:, g * gs:(g + 1) * gs], pos[g * gs:(g + 1) * gs])
    del w_orig

    codes = torch.empty(n, k, dtype=torch.uint8, device=device)  # in processing order
    deq = torch.empty(n, k, dtype=torch.float32, device=device)
    g_idx = torch.empty(k, dtype=torch.int32, device=device)
    perm_list = perm.tolist()
    scale = zero = None
    bs = spec.block_size
    for i1 in range(0, k, bs):
        i2 = min(i1 + bs, k)
        count = i2 - i1
        w1 = w[:, i1:i2].clone()  # this block, updated column by column
        err1 = torch.zeros(n, count, dtype=torch.float32, device=device)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(count):
            col = i1 + i  # position in processing order
            if static:
                g = perm_list[col] // gs
                scale, zero = scales[g], zeros[g]
            elif col % gs == 0:
                # A new group starts here (groups follow the processing order). Its grid comes from the
                # current values of its columns: those inside this block are up to date in w1; those past
                # the block still miss this block's pending update, which is applied here for the grid.
                g = perm_list[col] // gs if in_groups else col // gs
                end = col + gs
                cur = w1[:, i:min(count, i + gs)]
                if spec.group_stats == "block":
                    cur = w[:, col:end]
                elif end > i2:
                    rest = w[:, i2:end]
                    if i > 0:
                        rest = rest - err1[:, :i] @ hinv[i1:col, i2:end]
                    cur = torch.cat([cur, rest], dim=1)
                scale, zero = group_grid(cur, slice(col, end))
                scales[g], zeros[g] = scale, zero
            if not (static or in_groups):
                g_idx[perm_list[col]] = col // gs
            col_w = w1[:, i]
            q, dq = _quantize(col_w, scale, zero, maxq)
            codes[:, col] = q
            deq[:, col] = dq
            e = (col_w - dq) / hinv1[i, i]
            w1[:, i:] -= e.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]

    if static or in_groups:
        g_idx = torch.arange(k, dtype=torch.int32, device=device) // gs
    if spec.act_order or in_groups:
        inv = torch.argsort(perm)
        codes = codes[:, inv]
        deq = deq[:, inv]
    return QuantResult(q=codes.t().contiguous(), zeros=zeros.to(torch.uint8).contiguous(),
                       scales=scales.to(torch.float16).contiguous(), g_idx=g_idx.contiguous(),
                       weight=deq, damp_used=damp_used)


def quantize_layer(weight: torch.Tensor, hessian: Optional[torch.Tensor], spec: QuantSpec,
                   method: str = "gptq") -> QuantResult:
    """One entry point for both methods: 'gptq' needs the Hessian, 'rtn' ignores it."""
    if method == "gptq":
        if hessian is None:
            raise ValueError("hessian: GPTQ needs the Hessian of the layer's calibration inputs")
        return gptq_quantize(weight, hessian, spec)
    if method == "rtn":
        return rtn_quantize(weight, spec)
    raise ValueError(f"method: expected 'gptq' or 'rtn', got {method!r}")


def output_error(weight: torch.Tensor, weight_q: torch.Tensor, hessian: torch.Tensor, max_rows: int = 256) -> float:
    """Relative squared output error  sum_t ||(W - Wq) x_t||^2 / sum_t ||W x_t||^2  over the calibration tokens
    that built H, from H alone (tr(D H D^T) / tr(W H W^T)). For speed it uses at most `max_rows` evenly
    spaced output rows (all rows when N <= max_rows)."""
    n = weight.shape[0]
    rows = torch.arange(0, n, max(1, -(-n // max_rows)), device=hessian.device)
    w = weight.detach().to(hessian.device, torch.float32)[rows]
    d = w - weight_q.detach().to(hessian.device, torch.float32)[rows]
    num = ((d @ hessian) * d).sum()
    den = ((w @ hessian) * w).sum()
    return float(num / den) if float(den) > 0 else 0.0
