"""The CFM estimator (a causal 1-D U-Net) and the Euler solver that turns mu into a mel (MODEL.md §1.8).

`Estimator` is Baichuan's `ConditionalDecoder(causal=True)` with one channel level (`channels` = [256]):
time MLP -> down block (causal ResNet + n_blocks transformer blocks + causal conv k3) -> num_mid_blocks
mid blocks (ResNet + transformers) -> up block (concat skip, ResNet + transformers + causal conv k3) -> final
causal block -> 1x1 conv to 80 mel bins. Module and parameter names follow the checkpoint, so
`load_state_dict` takes the `conditional_decoder.` tensors directly. The time resolution never changes.

Semantics kept from the reference:
- CausalConv1d: left zero pad of k-1 frames. LayerNorm over channels per frame, then Mish.
- Transformer block (diffusers BasicTransformerBlock, layer_norm type): LN -> self-attention (q/k/v without
  bias, out with bias, scale 1/sqrt(head_dim)) -> +res -> LN -> Linear(4x) + exact GELU -> Linear -> +res.
- Attention mask: chunk-causal, `CHUNK` = 100 frames: frame i sees frames j < (i // 100 + 1) * 100
  (`subsequent_chunk_mask`); built in the forward from the length, so an exported graph computes it too.
- The sequence mask of the reference is all ones for one clause (batch of 1, no padding), so its
  multiplications are identities and are left out.
- Time embedding: SinusoidalPosEmb(160, scale 1000): `1000 * t` rounds in t's dtype (bf16 in the reference),
  then multiplies fp32 frequencies; the result is cast to the activations' dtype before the MLP.

`cfm_solve(estimator, mu, noise, ...)` is `ConditionalCFM.forward` with the start noise given: cosine t grid
1 - cos(pi/2 * k/n) computed in fp32 and cast to mu's dtype, `t` advanced by `dt` in that dtype, and the
guided velocity 1.7 * v(x, mu) - 0.7 * v(x, 0); both passes run as one batch of 2.

Chunk by chunk (`CfmStream`): the convolutions are causal and the attention chunk-causal, so the whole
10-step trajectory of the frames of chunk c depends only on frames < 100 (c + 1). Integrating chunk 0 over
all steps, then chunk 1, ... gives the same mel as one pass over the clause, provided each chunk's passes
see the earlier chunks' state at the same Euler step: per step, every attention layer keeps the K/V of the
finished chunks and every causal conv its last k - 1 input frames (`StepCache`). That is how a stream
decodes each chunk once (cost: 56 x 2 x 2 x 512 values per frame and step, 4.6 MB per mel frame in fp32,
freed with the clause; or a quarter of that when the layers' inputs are kept and K/V recomputed). The
offline decode needs no cache: one pass per Euler step over the whole clause (the linears and convolutions at
full length), whose attention runs chunk by chunk, the queries of chunk c against the keys < 100 (c + 1)
(`CHUNKED`: no T x T mask, fewer attention FLOPs than the masked pass, the same values).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

CHUNK = 100  # static_chunk_size = 2 * 25 * 2 mel frames (2 s)
CHUNKED = "chunked"  # the attention mask argument for "the chunk mask, computed chunk by chunk" (no T x T mask)


def attention(q, k, v, mask: Optional[torch.Tensor] = None, causal: bool = False) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask) v for (B, H, T, D); SDPA in torch, the plain formula in ONNX exports
    (the legacy exporter's SDPA upcasts fp16 scores and leaves mixed types behind)."""
    if not torch.onnx.is_in_onnx_export():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
    s = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
    if causal:
        t = q.shape[-2]
        mask = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(s, dim=-1), v)


class StepCache:
    """State of the finished frames for one sequence of calls (one Euler step of one clause, or the causal
    decoder + prenet): `store` maps a module to its cached K/V or conv context; `offset` is the absolute
    frame of the call's first frame (= frames already kept); `keep` the number of the call's frames whose
    state is kept (0 for a preview that will be recomputed)."""

    __slots__ = ("store", "offset", "keep", "mode")

    def __init__(self, mode: str = "kv"):
        if mode not in ("kv", "inputs"):
            raise ValueError(f"cache: expected 'kv' or 'inputs', got {mode!r}")
        self.store, self.offset, self.keep, self.mode = {}, 0, 0, mode

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for v in self.store.values()
                   for t in (v if isinstance(v, tuple) else (v,)))


def cached_kv(module, k: torch.Tensor, v: torch.Tensor, cache: Optional[StepCache]):
    """Prepend the kept K/V of `module` (B, H, offset, D) and keep the first offset + keep frames."""
    if cache is None:
        return k, v
    past = cache.store.get(module)
    if past is not None:
        k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
    elif cache.keep:  # own storage: the projections are views into one q/k/v output that would stay alive
        k, v = k.contiguous(), v.contiguous()
    if cache.keep:
        n = cache.offset + cache.keep
        cache.store[module] = (k[:, :, :n], v[:, :, :n]) if n < k.shape[2] else (k, v)
    return k, v


def _version(t: torch.Tensor) -> int:
    try:
        return t._version  # bumped by in-place writes (load_state_dict copies into the same storage)
    except RuntimeError:  # an inference-mode tensor has no version counter
        return -1


def fused_qkv(module, x: torch.Tensor, projs) -> torch.Tensor:
    """x @ [Wq; Wk; Wv]^T (+ bias) in one GEMM; the stacked weight is built once (rebuilt if a weight changes)."""
    key = tuple((p.weight.data_ptr(), _version(p.weight), p.weight.dtype) for p in projs)
    if getattr(module, "_qkv_key", None) != key:
        w = torch.cat([p.weight for p in projs], 0)
        b = None
        if any(p.bias is not None for p in projs):
            b = torch.cat([p.bias if p.bias is not None else torch.zeros(p.out_features, dtype=w.dtype,
                                                                         device=w.device) for p in projs])
        module.__dict__["_qkv"] = (w, b)
        module.__dict__["_qkv_key"] = key
    w, b = module.__dict__["_qkv"]
    return F.linear(x, w, b)


def mish(x: torch.Tensor) -> torch.Tensor:
    """x * tanh(softplus(x)) as x * t / (t + 2), t = e^x (e^x + 2): one exp instead of exp, log1p and tanh,
    3-7x faster than F.mish on CPU and within 4e-7 relative of it (fp32 rounding; e^x is taken at
    min(x, 20), where t / (t + 2) is already 1 in fp32). fp32 only (t overflows fp16); ONNX exports and
    other dtypes keep F.mish."""
    if x.dtype != torch.float32 or torch.onnx.is_in_onnx_export() or torch.jit.is_tracing():
        return F.mish(x)
    n = torch.exp(torch.clamp(x, max=20.0))
    t = n.mul_(n + 2.0)
    return x * t.div_(t + 2.0)


def chunk_mask(t: int, device=None, chunk: int = CHUNK) -> torch.Tensor:
    """(t, t) bool: query i may attend key j iff j < (i // chunk + 1) * chunk."""
    pos = torch.arange(t, device=device)
    limit = (torch.div(pos, chunk, rounding_mode="floor") + 1) * chunk
    return pos[None, :] < limit[:, None]


class CausalConv1d(nn.Conv1d):
    """Conv1d with k-1 frames of zero padding on the left only (stride 1); with a cache, the left context is
    the last k-1 kept input frames."""

    def forward(self, x: torch.Tensor, cache: Optional[StepCache] = None) -> torch.Tensor:
        k = self.kernel_size[0] - 1
        if cache is None:
            return super().forward(F.pad(x, (k, 0)))
        left = cache.store.get(self)
        if left is None:
            left = x.new_zeros(x.shape[0], x.shape[1], k)
        xin = torch.cat([left, x], dim=-1)
        if cache.keep:
            cache.store[self] = xin[..., cache.keep:cache.keep + k].clone()
        return super().forward(xin)


class CausalBlock(nn.Module):
    """`block.0` CausalConv1d(k3) -> LayerNorm over channels (`block.2`) -> Mish; x (B, C, T)."""

    def __init__(self, dim: int, dim_out: int):
        super().__init__()
        # block.0.weight (dim_out, dim, 3), block.0.bias; block.2.{weight,bias} (dim_out,)
        self.block = nn.ModuleList([CausalConv1d(dim, dim_out, 3), nn.Identity(), nn.LayerNorm(dim_out)])

    def forward(self, x: torch.Tensor, cache: Optional[StepCache] = None) -> torch.Tensor:
        x = self.block[0](x, cache)
        x = self.block[2](x.transpose(1, 2)).transpose(1, 2)
        return mish(x)


class CausalResnet(nn.Module):
    """CausalResnetBlock1D: block1 -> + time MLP (Mish -> Linear `mlp.1`) -> block2 -> + 1x1 `res_conv`."""

    def __init__(self, dim: int, dim_out: int, tdim: int):
        super().__init__()
        self.mlp = nn.ModuleList([nn.Identity(), nn.Linear(tdim, dim_out)])  # mlp.1 (dim_out, tdim)
        self.block1 = CausalBlock(dim, dim_out)
        self.block2 = CausalBlock(dim_out, dim_out)
        self.res_conv = nn.Conv1d(dim, dim_out, 1)  # (dim_out, dim, 1)

    def forward(self, x: torch.Tensor, temb: torch.Tensor, cache: Optional[StepCache] = None) -> torch.Tensor:
        h = self.block1(x, cache)
        h = h + self.mlp[1](mish(temb)).unsqueeze(-1)
        h = self.block2(h, cache)
        return h + self.res_conv(x)


class _Proj(nn.Module):
    """diffusers GELU: `proj` Linear then exact GELU."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner)

    def forward(self, x):
        return F.gelu(self.proj(x))


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        inner = heads * head_dim
        self.heads, self.head_dim = heads, head_dim
        self.to_q = nn.Linear(dim, inner, bias=False)  # attn1.to_q (inner, dim)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim)])  # attn1.to_out.0 (dim, inner) + bias

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor],
                cache: Optional[StepCache] = None) -> torch.Tensor:
        b, t, _ = x.shape
        if torch.onnx.is_in_onnx_export() or torch.jit.is_tracing():
            qkv = [p(x) for p in (self.to_q, self.to_k, self.to_v)]
        else:
            qkv = fused_qkv(self, x, (self.to_q, self.to_k, self.to_v)).chunk(3, dim=-1)
        q, k, v = (y.reshape(b, t, self.heads, self.head_dim).transpose(1, 2) for y in qkv)
        if cache is not None and cache.mode == "inputs":  # keep the (normed) inputs, recompute K/V from them
            past = cache.store.get(self)
            if past is not None:
                inner = self.heads * self.head_dim
                kv = F.linear(past, self.__dict__["_qkv"][0][inner:])  # (B, offset, 2 inner)
                ko, vo = (y.reshape(b, -1, self.heads, self.head_dim).transpose(1, 2) for y in kv.chunk(2, -1))
                k, v = torch.cat([ko, k], dim=2), torch.cat([vo, v], dim=2)
            if cache.keep:
                xs = x if past is None else torch.cat([past, x], dim=1)
                cache.store[self] = xs[:, :cache.offset + cache.keep]
        else:
            k, v = cached_kv(self, k, v, cache)
        if mask is CHUNKED:  # chunk c's queries see keys < (c + 1) * CHUNK: one unmasked call per chunk
            o = torch.cat([attention(q[:, :, a:a + CHUNK], k[:, :, :a + CHUNK], v[:, :, :a + CHUNK])
                           for a in range(0, t, CHUNK)], dim=2)
        else:
            o = attention(q, k, v, mask)
        return self.to_out[0](o.transpose(1, 2).reshape(b, t, self.heads * self.head_dim))


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = _Attention(dim, heads, head_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = nn.Module()
        self.ff.net = nn.ModuleList([_Proj(dim, 4 * dim), nn.Identity(), nn.Linear(4 * dim, dim)])  # ff.net.{0.proj,2}

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor],
                cache: Optional[StepCache] = None) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x), mask, cache)
        h = self.norm3(x)
        return x + self.ff.net[2](self.ff.net[0](h))


class _TimeMLP(nn.Module):
    def __init__(self, cin: int, tdim: int):
        super().__init__()
        self.linear_1 = nn.Linear(cin, tdim)  # time_mlp.linear_1 (1024, 160)
        self.linear_2 = nn.Linear(tdim, tdim)  # time_mlp.linear_2 (1024, 1024)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


class Estimator(nn.Module):
    """The velocity field v(x, mu, t): x, mu (B, 80, T), t (B,) or () -> (B, 80, T)."""

    def __init__(self, in_channels: int, out_channels: int, channels, n_blocks: int, num_mid_blocks: int,
                 num_heads: int, head_dim: int):
        super().__init__()
        channels = list(channels)
        if len(channels) != 1:
            raise ValueError(f"flow_matching_config.channels: only one level is supported (the released [256]), "
                             f"got {channels}")
        c = channels[0]
        tdim = 4 * c
        self.in_channels = in_channels
        self.time_mlp = _TimeMLP(in_channels, tdim)

        def tblocks():
            return nn.ModuleList([TransformerBlock(c, num_heads, head_dim) for _ in range(n_blocks)])

        # down_blocks.0.{0 resnet (160->256), 1.j transformers, 2 CausalConv1d (256, 256, 3)}
        self.down_blocks = nn.ModuleList([nn.ModuleList([CausalResnet(in_channels, c, tdim), tblocks(),
                                                         CausalConv1d(c, c, 3)])])
        self.mid_blocks = nn.ModuleList([nn.ModuleList([CausalResnet(c, c, tdim), tblocks()])
                                         for _ in range(num_mid_blocks)])
        # up_blocks.0.{0 resnet (512->256), 1.j, 2 CausalConv1d}
        self.up_blocks = nn.ModuleList([nn.ModuleList([CausalResnet(2 * c, c, tdim), tblocks(),
                                                       CausalConv1d(c, c, 3)])])
        self.final_block = CausalBlock(c, c)
        self.final_proj = nn.Conv1d(c, out_channels, 1)  # (80, 256, 1)

    def time_embedding(self, t: torch.Tensor, dtype) -> torch.Tensor:
        half = self.in_channels // 2
        freq = torch.exp(torch.arange(half, device=t.device).float() * -(math.log(10000) / (half - 1)))
        e = (1000 * t.reshape(-1)).unsqueeze(1) * freq.unsqueeze(0)  # 1000 * t rounds in t's dtype
        return self.time_mlp(torch.cat((e.sin(), e.cos()), dim=-1).to(dtype))

    def forward(self, x: torch.Tensor, mu: torch.Tensor, t: torch.Tensor,
                cache: Optional[StepCache] = None) -> torch.Tensor:
        """cache: None (the whole clause, chunk mask built here) or the step's `StepCache`; then the frames
        of x lie in one chunk, start at `cache.offset` and see every kept frame (no mask needed)."""
        temb = self.time_embedding(t, x.dtype)
        n = x.shape[-1]
        if cache is None:
            if torch.onnx.is_in_onnx_export() or torch.jit.is_tracing():
                mask = chunk_mask(n, x.device)  # exported graphs build the mask from the length
            else:
                mask = None if n <= CHUNK else CHUNKED
        else:
            if cache.offset // CHUNK != (cache.offset + n - 1) // CHUNK:
                raise ValueError(f"estimator: a cached call covers one chunk, got frames [{cache.offset}, "
                                 f"{cache.offset + n})")
            mask = None
        h = torch.cat([x, mu], dim=1)

        def run(blocks, h):
            h = h.transpose(1, 2)
            for blk in blocks:
                h = blk(h, mask, cache)
            return h.transpose(1, 2)

        resnet, tf, down = self.down_blocks[0]
        h = run(tf, resnet(h, temb, cache))
        skip = h
        h = down(h, cache)
        for resnet, tf in self.mid_blocks:
            h = run(tf, resnet(h, temb, cache))
        resnet, tf, up = self.up_blocks[0]
        h = run(tf, resnet(torch.cat([h, skip], dim=1), temb, cache))
        h = up(h, cache)
        return self.final_proj(self.final_block(h, cache))


def time_grid(n_steps: int, dtype, device=None, scheduler: str = "cosine") -> torch.Tensor:
    """t_k, k = 0..n: linspace in fp32, cosine-warped, then cast to the model dtype (as the reference)."""
    t = torch.linspace(0, 1, n_steps + 1, device=device)
    if scheduler == "cosine":
        t = 1 - torch.cos(t * 0.5 * torch.pi)
    elif scheduler != "linear":
        raise ValueError(f"cfm_params.t_scheduler: expected 'cosine' or 'linear', got {scheduler!r}")
    return t.to(dtype)


def cfm_solve(estimator, mu: torch.Tensor, noise: torch.Tensor, n_steps: int = 10, cfg_rate: float = 0.7,
              scheduler: str = "cosine", caches=None) -> torch.Tensor:
    """Euler integration of dx/dt = v from x = noise at t = 0 to t = 1.

    mu, noise (1, 80, T) in the model dtype. `estimator(x, mu, t)` takes a batch of 2 (guided and unguided
    pass stacked); any callable with that signature works (a torch module or an ONNX session wrapper).
    caches: None, or one `StepCache` per step passed as the estimator's 4th argument (see `CfmStream`)."""
    t_span = time_grid(n_steps, mu.dtype, mu.device, scheduler)
    x = noise.to(mu.dtype)
    t, dt = t_span[0], t_span[1] - t_span[0]
    guided = cfg_rate > 0
    mu2 = torch.cat([mu, torch.zeros_like(mu)], dim=0) if guided else mu
    for step in range(1, n_steps + 1):
        extra = () if caches is None else (caches[step - 1],)
        if guided:
            v = estimator(torch.cat([x, x], dim=0), mu2, t.reshape(1).expand(2), *extra)
            v = (1.0 + cfg_rate) * v[:1] - cfg_rate * v[1:]
        else:
            v = estimator(x, mu2, t.reshape(1), *extra)
        x = x + dt * v
        t = t + dt
        if step < n_steps:
            dt = t_span[step + 1] - t
    return x


class CfmStream:
    """Chunk-by-chunk CFM over a growing mu (see the module docstring): `run(mu, noise, keep)` integrates the
    frames [done, done + n) and returns their mel; with keep=True their state is kept and `done` advances
    (the frames must then end on a chunk boundary unless the clause ends there), with keep=False it is a
    preview of a partial chunk that a later call recomputes. Frames are split at chunk boundaries, so each
    estimator call sees one chunk and needs no mask.

    cache: "kv" keeps each attention layer's K/V of the finished frames (56 blocks x 10 steps x 2 passes x
    2 x 512 values: 4.6 MB per mel frame in fp32, 230 MB per second of speech) and computes nothing twice;
    "inputs" keeps the layers' 256-wide normed inputs instead (1.15 MB per frame) and recomputes their K/V
    at each later chunk (a quarter of a transformer block's work per earlier frame); it is the default: a
    40 s clause holds 1.15 GB instead of 4.6 GB."""

    def __init__(self, estimator: Estimator, n_steps: int = 10, cfg_rate: float = 0.7, scheduler: str = "cosine",
                 chunk: int = CHUNK, cache: str = "inputs"):
        self.estimator, self.n_steps, self.cfg_rate, self.scheduler, self.chunk = \
            estimator, n_steps, cfg_rate, scheduler, chunk
        self.caches = [StepCache(cache) for _ in range(n_steps)]
        self.done = 0
        self.frames_computed = 0  # estimator frames integrated (x 2 passes x n_steps), for cost accounting

    def nbytes(self) -> int:
        return sum(c.nbytes() for c in self.caches)

    def run(self, mu: torch.Tensor, noise: torch.Tensor, keep: bool = True) -> torch.Tensor:
        """mu, noise (1, 80, n) for frames [done, done + n) -> mel (1, 80, n) in mu's dtype."""
        n = mu.shape[-1]
        if self.done % self.chunk:
            raise ValueError(f"CfmStream: the kept frames ended mid-chunk at {self.done} (the clause ended); "
                             f"start a new CfmStream")
        if not keep and self.done // self.chunk != (self.done + max(n, 1) - 1) // self.chunk:
            raise ValueError(f"CfmStream: a preview covers at most one chunk, got frames [{self.done}, "
                             f"{self.done + n})")
        out, pos, start = [], 0, self.done
        while pos < n:
            a = start + pos
            b = min(start + n, (a // self.chunk + 1) * self.chunk)
            for c in self.caches:  # a kept piece that ends mid-chunk ends the clause: nothing to store
                c.offset, c.keep = a, (b - a) if keep and b % self.chunk == 0 else 0
            out.append(cfm_solve(self.estimator, mu[..., pos:pos + b - a], noise[..., pos:pos + b - a],
                                 self.n_steps, self.cfg_rate, self.scheduler, caches=self.caches))
            self.frames_computed += b - a
            pos = b - start
            if keep:
                self.done = b
        return torch.cat(out, dim=-1) if out else mu[..., :0]
