"""The backbone's one-position decode step with its state in device buffers, replayed as a CUDA graph on a GPU.

`Backbone.forward` with one new position on CUDA, and `Backbone.decode_step`, run through this. The Python
layer loop (`DecoderLayer.forward`) slices the KV cache and the RoPE tables by a host integer and checks the
attention lengths by reading them back, so on a GPU it synchronises with the host twice per layer and
allocates workspaces per call. Here everything a step depends on lives in buffers made once per cache:

    ids       (B,) int64          the token fed; clamped to [0, V) on the device, so an id out of range never
                                  indexes outside the embedding (ids given on the host are checked there)
    h_in      (B, 1, C)           its embedding row (or the caller's inputs_embeds row): the graph's input
    pos       (1,) int64          the position written (= start); RoPE rows and the K/V write index by it
    lengths   (B,) int32          start + 1, the decode attention's key count (its kernels clamp to [0, S])
    q4 / attention workspaces     sized for the cache capacity S (the worst case), see ops/q4, ops/attention

`start` is checked once per step on the host (a Python integer: no synchronisation) and written into `pos`
and `lengths` with fill_ (a kernel argument, not a copy from host memory). The body computes exactly what the
Python layer loop computes (same ops, same kernels, same split plan), so its results are bit-identical to it.

CUDA graph: with OMNI_EDGE_CUDA_GRAPH=1 (the default; omni_edge/knobs.py) the first step of each kind
(layers + final norm for `forward`, layers + final norm + lm_head for `decode_step`) runs once eagerly on a
side stream as warm-up (kernel loading, the kernels' self-check, cuBLAS setup), is captured into a torch.cuda.CUDAGraph,
and every later step only fills the input buffers and replays it: a whole token is one graph launch. The
graph bakes in the addresses of the weights, the cache and the workspaces; the Backbone builds a new
DeviceStep (dropping the graphs) whenever one of them changes (`DeviceStep.key`). Where capture is impossible
(the knob is off, an op family runs its torch reference, or the capture itself fails) the same body runs
eagerly, still without host synchronisation where the kernels are native, and `graph_reason()` (and
`describe()`, which `Backbone.decode_path()` returns) says why in one line.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from omni_edge import knobs
from omni_edge.ops import _dispatch, attention, q4

GRAPH_KINDS = {False: "layers + final norm", True: "layers + final norm + lm_head"}


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:200]}" if text else type(e).__name__


class DeviceStep:
    """The decode step of one Backbone for its current cache and weights (see the module docstring)."""

    def __init__(self, bb):
        if bb.kv_cache[0] is None:
            raise ValueError("decode step: no KV cache; call allocate_cache(max_len, batch) first")
        # ordinary tensors even when built inside an inference_mode region (a chat turn), so that steps run
        # outside one may still fill them
        with torch.inference_mode(False):
            self._setup(bb)

    def _setup(self, bb) -> None:
        cfg = bb.config
        dev, b = bb.device, bb.batch
        self.bb = bb
        self.key = self.key_of(bb)
        self.device = dev
        self._ids = torch.zeros(b, dtype=torch.int64, device=dev)  # (B,)
        self._h_in = torch.zeros(b, 1, cfg.hidden_size, dtype=bb.dtype, device=dev)  # (B, 1, C)
        self._pos = torch.zeros(1, dtype=torch.int64, device=dev)  # (1,)
        self._lengths = torch.ones(b, dtype=torch.int32, device=dev)  # (B,)
        lins = [lin for layer in bb.layers for lin in layer.linears.values()]
        qws = [lin.qweight for lin in lins if lin.quantized]
        self._q4_ws = None  # (bytes,) uint8, the largest activation staging any 4-bit decoder linear needs at M = B
        if qws and dev.type == "cuda" and _dispatch.native_enabled("q4", dev):
            self._q4_ws = torch.empty(q4.cuda_workspace_bytes(b, *qws), dtype=torch.uint8, device=dev)
        self._attn_ws = attention.decode_workspace(b, cfg.num_attention_heads, cfg.num_key_value_heads,
                                                   bb.max_len, cfg.head_dim, dev)
        self._uses_q4 = bool(qws) or bool(getattr(bb.lm_head, "quantized", False))
        self._graphs: Dict[bool, Tuple[torch.cuda.CUDAGraph, torch.Tensor, Optional[torch.Tensor]]] = {}
        self._failed: Optional[str] = None  # the capture's failure, once it failed
        self.last_static = False  # the last run returned the graph's own output buffers

    @staticmethod
    def key_of(bb) -> tuple:
        """What a DeviceStep (and its graphs) was built for: the layers and their linears, the cache and the
        other tensors the graph reads by address."""
        return (bb._layers_version(), id(bb.kv_cache[0]), id(bb.kv_cache[1]), id(bb.embed_tokens), id(bb.norm),
                id(bb.lm_head), id(getattr(bb.lm_head, "weight", None)), id(getattr(bb.lm_head, "qweight", None)))

    # ---- which path ---------------------------------------------------------------------------

    def graph_reason(self) -> Optional[str]:
        """None when this step can be (or is) replayed as a CUDA graph, else why not (one line)."""
        if self.device.type != "cuda":
            return f"device {self.device} (CUDA graphs need a GPU)"
        if not knobs.settings().cuda_graph:
            return "OMNI_EDGE_CUDA_GRAPH=0"
        if self._failed is not None:
            return self._failed
        d = self.bb.config.head_dim
        if d > attention.MAX_NATIVE_HEAD_DIM or not _dispatch.native_enabled("attention", self.device):
            return "attention runs its torch reference here (it reads the lengths on the host)"
        if self._uses_q4 and not _dispatch.native_enabled("q4", self.device):
            return "q4 runs its torch reference here (it dequantizes on every call)"
        return None

    def describe(self) -> str:
        """One line: how a decode step runs."""
        why = self.graph_reason()
        if why is None:
            kinds = ", ".join(GRAPH_KINDS[k] for k in sorted(self._graphs)) or "captured at the first step"
            return f"cuda graph, replayed per token ({kinds})"
        return f"eager device step (no cuda graph: {why})"

    # ---- one step -----------------------------------------------------------------------------

    @torch.no_grad()  # not inference_mode: the buffers and results stay ordinary tensors for any caller
    def run(self, start: int, *, ids: Optional[torch.Tensor] = None, embeds: Optional[torch.Tensor] = None,
            logits: bool = True) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Position `start` of every sequence: ids (B,) / (B, 1) integers, or embeds (B, 1, C) -> (hidden (B, 1, C)
        after the final norm, logits (B, V) fp32 or None). K/V are written at `start`. When `last_static` is
        True afterwards the tensors are the graph's output buffers, overwritten by the next replay."""
        bb = self.bb
        s = bb.max_len
        if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start < s:
            raise ValueError(f"start: position {start!r} is outside the allocated cache (max_len={s})")
        if (ids is None) == (embeds is None):
            raise ValueError("decode step: give exactly one of ids or embeds")
        if ids is not None:
            self._set_ids(ids)
        else:
            if not isinstance(embeds, torch.Tensor) or tuple(embeds.shape) != tuple(self._h_in.shape):
                raise ValueError(f"inputs_embeds: expected shape {tuple(self._h_in.shape)}, "
                                 f"got {tuple(getattr(embeds, 'shape', ()))}")
            self._h_in.copy_(embeds)
        self._pos.fill_(start)
        self._lengths.fill_(start + 1)
        if self.graph_reason() is None:
            graph = self._graphs.get(logits) or self._capture(logits)
            if graph is not None:
                g, h, lg = graph
                with torch.cuda.device(self.device):
                    g.replay()
                self.last_static = True
                return h, lg
        self.last_static = False
        return self._body(logits)

    def _set_ids(self, ids) -> None:
        bb = self.bb
        b, v = bb.batch, bb.config.vocab_size
        if not isinstance(ids, torch.Tensor) or ids.dtype.is_floating_point or ids.dtype.is_complex \
                or ids.dtype == torch.bool or ids.numel() != b:
            raise ValueError(f"input_ids: expected {b} integer token id(s) (shape ({b}, 1)), got "
                             f"{getattr(ids, 'dtype', type(ids).__name__)} of shape {tuple(getattr(ids, 'shape', ()))}")
        if ids.device.type == "cpu":  # host memory: checking costs no synchronisation
            lo, hi = int(ids.min()), int(ids.max())
            if lo < 0 or hi >= v:
                raise ValueError(f"input_ids: token ids must lie in [0, {v}) (the vocabulary), got [{lo}, {hi}]")
        self._ids.copy_(ids.reshape(b), non_blocking=True)
        torch.clamp(self._ids, 0, v - 1, out=self._ids)  # device ids (a sampler's output) are never read back
        torch.index_select(bb.embed_tokens, 0, self._ids, out=self._h_in.view(b, -1))

    # ---- the body (what the graph captures) ---------------------------------------------------

    def _linear(self, lin, x: torch.Tensor) -> torch.Tensor:
        if lin.quantized:
            return q4.matmul(x, lin.qweight, workspace=self._q4_ws)
        return F.linear(x, lin.weight, lin.bias)

    def _body(self, with_logits: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        from omni_edge.backbone import apply_rope, rms_norm

        bb = self.bb
        cfg = bb.config
        b, eps = bb.batch, cfg.rms_norm_eps
        k_all, v_all = bb.kv_cache  # (L, B, Hkv, S, D)
        cos_t, sin_t = bb.rope_tables  # (S, D) fp32
        cos, sin = cos_t.index_select(0, self._pos), sin_t.index_select(0, self._pos)  # (1, D)
        hq, hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        h = self._h_in
        for i, layer in enumerate(bb.layers):
            lin = layer.linears
            x = rms_norm(h, layer.input_layernorm, eps)
            if cfg.packed_qkv:
                # RoPE of the q and k heads in one pass over the [q | k] columns of W_pack's output: elementwise
                # per head, so the same numbers as two calls, in half the kernel launches
                qkv = self._linear(lin["self_attn.W_pack"], x)  # (B, 1, (Hq + 2 Hkv) D)
                qk = apply_rope(qkv[..., :cfg.q_size + cfg.kv_size].reshape(b, 1, hq + hkv, d), cos, sin)
                q, k = qk[:, :, :hq], qk[:, :, hq:]
                v = qkv[..., cfg.q_size + cfg.kv_size:].reshape(b, 1, hkv, d)
            else:
                q, k, v = (self._linear(lin["self_attn." + n], x) for n in ("q_proj", "k_proj", "v_proj"))
                q = apply_rope(q.reshape(b, 1, hq, d), cos, sin)
                k = apply_rope(k.reshape(b, 1, hkv, d), cos, sin)
                v = v.reshape(b, 1, hkv, d)
            kc, vc = k_all[i], v_all[i]  # (B, Hkv, S, D)
            kc.index_copy_(2, self._pos, k.transpose(1, 2))
            vc.index_copy_(2, self._pos, v.transpose(1, 2))
            q = q[:, 0] if b == 1 else q[:, 0].contiguous()  # (B, Hq, D); with B == 1 the slice is contiguous
            o = attention.decode(q, kc, vc, self._lengths, workspace=self._attn_ws, check_lengths=False)
            h = h + self._linear(lin["self_attn.o_proj"], o.reshape(b, 1, cfg.q_size))
            x = rms_norm(h, layer.post_attention_layernorm, eps)
            h = h + self._linear(lin["mlp.down_proj"],
                                 F.silu(self._linear(lin["mlp.gate_proj"], x)) * self._linear(lin["mlp.up_proj"], x))
        h = rms_norm(h, bb.norm, eps)
        # the Backbone's own lm_head call, whatever kind of head it holds (same numbers as forward + logits)
        return h, (bb.logits(h[:, -1]) if with_logits else None)

    # ---- capture ------------------------------------------------------------------------------

    def _capture(self, with_logits: bool):
        """Warm up, capture and keep the graph of this kind; None (and `reason` set) when capture fails. The
        inputs for the current step are already in the buffers, so the warm-up computes this very step (its
        K/V write is repeated, with the same values, by the replay that follows)."""
        dev = self.device
        with torch.cuda.device(dev):  # the capture stream and the graph belong to the weights' GPU
            side = torch.cuda.Stream(device=dev)
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side):
                self._body(with_logits)  # errors here are the step's own (bad weights...): they propagate
            torch.cuda.current_stream(dev).wait_stream(side)
            g = torch.cuda.CUDAGraph()
            try:
                # "relaxed": calls that are merely unsafe under capture (a lazily loaded kernel, a pointer-
                # attribute query in the native launchers) do not abort it; anything that synchronises does.
                with torch.cuda.graph(g, capture_error_mode="relaxed"):
                    h, lg = self._capture_body(with_logits)
                failure = None
            except Exception as e:  # capture impossible here: run eagerly from now on, say why
                failure = e
        if failure is not None:
            self._failed = f"capture failed: {_one_line(failure)}"
            try:
                g.reset()
            except Exception:
                pass
            return None
        self._graphs[with_logits] = (g, h, lg)
        return self._graphs[with_logits]

    def _capture_body(self, with_logits: bool):
        """The body as captured (a seam for tests that make capture fail)."""
        return self._body(with_logits)

    def reset(self) -> None:
        """Drop the captured graphs (their memory pools are freed with them)."""
        for g, _, _ in self._graphs.values():
            g.reset()
        self._graphs.clear()
