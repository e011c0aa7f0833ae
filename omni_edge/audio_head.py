"""The audio output head: a 3-layer "depth" transformer over the 8 codebook slots of one 80 ms frame.

MODEL.md §1.6. For one frame the head sees a sequence of 8 slots (width C = hidden_size):
slot 0 = the backbone's last hidden state (after model.norm); slot j = sum_{k<j} E_k[c_k], the running sum of
the backbone's `model.audio_embed_layers` rows of the codes already chosen in this frame. Each layer:

    x -> RMSNorm -> MultiheadAttention (C // 128 heads of 128, in_proj and out_proj with bias, causal over the
    slots) -> + x -> RMSNorm (into the residual itself) -> slot-specific FFN (slot l: its own C -> 2C block of
    linear1, exact GELU, its own 2C -> C block of linear2; the stored biases are not used) -> + residual

then `headnorm` and 8 heads Linear(C -> cb_i + 1, with bias). Logit cb_0 of head 0 is end-of-audio; heads 1..7
drop their last logit.

The reference decode loop re-runs all 8 slots through the whole head for each of the 8 codes it samples. Because
attention is causal and the FFNs are per slot, slot l's output depends only on slots 0..l, so this module runs
the frame incrementally: sub-step l pushes only slot l through the layers, keeping each layer's keys and values of
the earlier slots in a small cache (layers, B, heads, 8, 128) allocated once. Per frame that reads every FFN
block and every head once (slot l uses only its own blocks and head l), while the attention projections and
norms (4C^2 per layer, about 11% of the head) are read once per sub-step: slot l's input needs code l-1, so they
cannot be shared across sub-steps. The reference reads all of it 8 times per frame.

Sampling (`AudioCodeSampler`) follows `GenerationAudioTokens._sample` of the reference demo: per codebook i,
HF's logits processors in HF order (repetition penalty over this segment's earlier codes of codebook i, then
temperature, top-k, top-p), with the segment history updated after the whole frame; greedy = penalty + argmax.
A frame whose code 0 is cb_0 is end-of-audio; its other 7 codes are still sampled, as in the reference.

    head = AudioHead.from_checkpoint(ckpt, cfg, device="cpu", dtype=torch.float32)
    sampler = AudioCodeSampler(head.codebook_sizes, AUDIO_SAMPLING, device="cpu", generator=g)
    codes = head.sample_frame(hidden_last, sampler)   # (8,) int64; codes[0] == head.eos_code ends the segment
    sampler.observe(codes)
    emb = head.embed_codes(codes[None])               # (1, C): the backbone input for the next <audio_pad>
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from omni_edge.config import ModelConfig
from omni_edge.generate import Sampler, SamplingParams, seeded_generator

HEAD_DIM = 128  # the reference asserts hidden_size % 128 == 0 and uses hidden_size // 128 heads
RMS_EPS = 1e-6  # RMSNorm default eps of the reference head (not the backbone's rms_norm_eps)

# MODEL.md §2.3: T 0.5, top-k 5, top-p 0.85, repetition penalty 1.3, at most 500 frames (40 s) per segment.
AUDIO_SAMPLING = SamplingParams(max_new_tokens=500, temperature=0.5, top_k=5, top_p=0.85, repetition_penalty=1.3)

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = RMS_EPS) -> torch.Tensor:
    """The reference RMSNorm: mean of squares in fp32, normalise, cast back to the input dtype, scale."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def embed_codes(tables: Sequence[torch.Tensor], codes: torch.Tensor) -> torch.Tensor:
    """Backbone input rows for audio frames: codes (N, 8) int64 -> (N, C) = E_0[c_0] + E_1[c_1] + ... + E_7[c_7],
    added one table at a time in the tables' dtype (as the reference does for `<audio_pad>` positions)."""
    if codes.dim() != 2 or codes.shape[1] != len(tables):
        raise ValueError(f"codes: expected shape (N, {len(tables)}), got {tuple(codes.shape)}")
    out = F.embedding(codes[:, 0], tables[0])
    for i in range(1, len(tables)):
        out = out + F.embedding(codes[:, i], tables[i])
    return out


class CodeError(ValueError):
    """Audio codes outside their codebook."""


def check_codes(codes: torch.Tensor, codebook_sizes: Sequence[int], *, eos_allowed: bool = True) -> None:
    """Codes (N, 8): code i must lie in [0, cb_i), code 0 may also be cb_0 (end of audio) when eos_allowed."""
    if codes.dim() != 2 or codes.shape[1] != len(codebook_sizes):
        raise CodeError(f"codes: expected shape (N, {len(codebook_sizes)}), got {tuple(codes.shape)}")
    if codes.dtype not in (torch.int64, torch.int32):
        raise CodeError(f"codes: expected an integer tensor, got {codes.dtype}")
    if codes.numel() == 0:
        return
    lo = codes.min(dim=0).values.tolist()
    hi = codes.max(dim=0).values.tolist()
    for i, n in enumerate(codebook_sizes):
        limit = n + 1 if (i == 0 and eos_allowed) else n
        if lo[i] < 0 or hi[i] >= limit:
            raise CodeError(f"codes[:, {i}]: values must lie in [0, {limit}), got min {lo[i]} max {hi[i]}")


@dataclass
class DepthLayer:
    """One CasualDepthTransformerLayer, prefix `audio_head.transformer_layers.N.` (C = hidden, S = 8 slots)."""
    ln1: torch.Tensor  # (C,) layernorm1.weight
    in_w: torch.Tensor  # (3C, C) self_attention.in_proj_weight, rows [q | k | v]
    in_b: torch.Tensor  # (3C,) self_attention.in_proj_bias
    out_w: torch.Tensor  # (C, C) self_attention.out_proj.weight
    out_b: torch.Tensor  # (C,) self_attention.out_proj.bias
    ln2: torch.Tensor  # (C,) layernorm2.weight
    w1: torch.Tensor  # (S, 2C, C) linear1.weight (2C, S*C) repacked once: w1[l] = slot l's C -> 2C block
    w2: torch.Tensor  # (S, C, 2C) linear2.weight (C, S*2C) repacked once: w2[l] = slot l's 2C -> C block
    # linear1.bias / linear2.bias are stored in the checkpoint but never used by the reference forward


class AudioHead:
    """The audio head plus the backbone's audio embedding tables it reads its slot inputs from."""

    def __init__(self, hidden_size: int, codebook_sizes: Sequence[int], layers: Sequence[DepthLayer],
                 headnorm: torch.Tensor, heads_w: Sequence[torch.Tensor], heads_b: Sequence[torch.Tensor],
                 embed: Sequence[torch.Tensor]):
        c = hidden_size
        if c % HEAD_DIM:
            raise ValueError(f"hidden_size: the audio head needs a multiple of {HEAD_DIM}, got {c}")
        self.hidden_size = c
        self.codebook_sizes = [int(n) for n in codebook_sizes]
        self.depth = len(self.codebook_sizes)  # 8 slots
        self.num_heads = c // HEAD_DIM  # 28 at full size
        self.layers = list(layers)  # audio_head.transformer_layers.N
        self.headnorm = headnorm  # (C,) audio_head.headnorm.weight
        self.heads_w = list(heads_w)  # [(cb_i + 1, C)] audio_head.heads.i.weight
        self.heads_b = list(heads_b)  # [(cb_i + 1,)] audio_head.heads.i.bias
        self.embed = list(embed)  # [(cb_i + 1, C)] model.audio_embed_layers.i.weight (the backbone's tables)
        self.device = headnorm.device
        self.dtype = headnorm.dtype
        self._k: Optional[torch.Tensor] = None  # (layers, B, heads, S, 128) keys of the slots run so far
        self._v: Optional[torch.Tensor] = None

    @property
    def eos_code(self) -> int:
        """Code 0 value meaning end of audio: cb_0 (8192 at full size)."""
        return self.codebook_sizes[0]

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def from_tensors(cls, cfg: ModelConfig, tensors: Dict[str, torch.Tensor], *, device="cpu",
                     dtype: torch.dtype = torch.float32) -> "AudioHead":
        """Build from checkpoint-named tensors (stages audio_head + audio_embed), shapes checked against cfg."""
        if dtype not in _DTYPES:
            raise ValueError(f"dtype: expected torch.float32, float16 or bfloat16, got {dtype}")
        if cfg.audio is None:
            raise ValueError("config: the audio head needs an omni config with an audio_config section")
        c = cfg.backbone.hidden_size
        cbs = list(cfg.audio.codebook_sizes)
        s = len(cbs)

        def get(name, shape):
            t = tensors.get(name)
            if t is None:
                raise ValueError(f"{name}: missing from the tensors")
            if tuple(t.shape) != tuple(shape):
                raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")
            return t.to(device=device, dtype=dtype)

        layers = []
        for n in range(cfg.audio.audio_head_transformer_layers):
            p = f"audio_head.transformer_layers.{n}."
            w1 = get(p + "linear1.weight", (2 * c, s * c))
            w2 = get(p + "linear2.weight", (c, s * 2 * c))
            layers.append(DepthLayer(
                ln1=get(p + "layernorm1.weight", (c,)),
                in_w=get(p + "self_attention.in_proj_weight", (3 * c, c)).contiguous(),
                in_b=get(p + "self_attention.in_proj_bias", (3 * c,)),
                out_w=get(p + "self_attention.out_proj.weight", (c, c)).contiguous(),
                out_b=get(p + "self_attention.out_proj.bias", (c,)),
                ln2=get(p + "layernorm2.weight", (c,)),
                # the reference reshapes (2C, S*C) -> (2C, S, C) and contracts slot l with [:, l, :]
                w1=w1.view(2 * c, s, c).permute(1, 0, 2).contiguous(),
                w2=w2.view(c, s, 2 * c).permute(1, 0, 2).contiguous()))
        headnorm = get("audio_head.headnorm.weight", (c,))
        heads_w = [get(f"audio_head.heads.{i}.weight", (n + 1, c)).contiguous() for i, n in enumerate(cbs)]
        heads_b = [get(f"audio_head.heads.{i}.bias", (n + 1,)) for i, n in enumerate(cbs)]
        embed = [get(f"model.audio_embed_layers.{i}.weight", (n + 1, c)).contiguous() for i, n in enumerate(cbs)]
        return cls(c, cbs, layers, headnorm, heads_w, heads_b, embed)

    @classmethod
    def from_checkpoint(cls, ckpt, cfg: Optional[ModelConfig] = None, *, device="cpu",
                        dtype: torch.dtype = torch.float32) -> "AudioHead":
        """Load stages audio_head and audio_embed of a `Checkpoint` (one tensor at a time, then repacked)."""
        cfg = cfg or ckpt.config
        tensors = {}
        for stage in ("audio_head", "audio_embed"):
            for name in ckpt.stage(stage):
                if name.endswith(("linear1.bias", "linear2.bias")):
                    continue  # stored, unused by the reference
                tensors[name] = ckpt.get(name)
        return cls.from_tensors(cfg, tensors, device=device, dtype=dtype)

    # ---- compute ------------------------------------------------------------------------------

    def embed_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """(N, 8) codes -> (N, C) backbone input rows (see `embed_codes`); codes are range-checked."""
        check_codes(codes, self.codebook_sizes)
        return embed_codes(self.embed, codes.to(self.device, torch.long))

    def _ensure_cache(self, batch: int) -> None:
        if self._k is None or self._k.shape[1] != batch:
            # plain tensors (not inference tensors), so frames may run in or out of inference mode
            shape = (len(self.layers), batch, self.num_heads, self.depth, HEAD_DIM)
            with torch.inference_mode(False):
                self._k = torch.zeros(shape, dtype=self.dtype, device=self.device)
                self._v = torch.zeros(shape, dtype=self.dtype, device=self.device)

    def _attention(self, i: int, slot: int, x: torch.Tensor) -> torch.Tensor:
        """x (B, C) normed input of `slot` -> attention output (B, C); writes the slot's K/V into the cache."""
        layer = self.layers[i]
        b, c = x.shape
        h, d = self.num_heads, HEAD_DIM
        qkv = F.linear(x, layer.in_w, layer.in_b)  # (B, 3C)
        q, k, v = qkv.view(b, 3, h, d).unbind(1)  # each (B, H, D)
        self._k[i, :, :, slot] = k
        self._v[i, :, :, slot] = v
        keys = self._k[i, :, :, :slot + 1].float()  # (B, H, slot+1, D)
        vals = self._v[i, :, :, :slot + 1].float()
        scores = torch.einsum("bhd,bhsd->bhs", q.float(), keys) * (d ** -0.5)
        o = torch.einsum("bhs,bhsd->bhd", torch.softmax(scores, dim=-1), vals)
        return F.linear(o.reshape(b, c).to(x.dtype), layer.out_w, layer.out_b)

    def _ffn(self, i: int, slot: int, x: torch.Tensor) -> torch.Tensor:
        """Slot `slot`'s own FFN block of layer i: (B, C) -> (B, C), exact GELU, no bias."""
        layer = self.layers[i]
        return F.linear(F.gelu(F.linear(x, layer.w1[slot])), layer.w2[slot])

    def _head(self, slot: int, x: torch.Tensor) -> torch.Tensor:
        """Head `slot` on the headnorm-ed slot output: (B, C) -> (B, cb + 1) fp32 logits (all of them)."""
        return F.linear(x, self.heads_w[slot], self.heads_b[slot]).float()

    def slot_step(self, slot: int, x: torch.Tensor) -> torch.Tensor:
        """Push slot `slot`'s input x (B, C) through every layer and its head; slots 0..slot-1 of this frame
        must have been pushed already (their keys and values are in the cache). Returns the slot's logits
        (B, cb_slot + 1) fp32, the extra last entry included (the caller drops it for slots > 0)."""
        for i, layer in enumerate(self.layers):
            res = x + self._attention(i, slot, rms_norm(x, layer.ln1))
            res = rms_norm(res, layer.ln2)
            x = res + self._ffn(i, slot, res)
        return self._head(slot, rms_norm(x, self.headnorm))

    def _check_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        if hidden.dim() == 1:
            hidden = hidden[None]
        if hidden.dim() != 2 or hidden.shape[1] != self.hidden_size:
            raise ValueError(f"hidden: expected shape (B, {self.hidden_size}) or ({self.hidden_size},), "
                             f"got {tuple(hidden.shape)}")
        return hidden.to(device=self.device, dtype=self.dtype)

    @torch.no_grad()
    def run_frame(self, hidden: torch.Tensor, choose: Callable[[int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """One frame, incrementally: hidden (B, C) is slot 0's input; after slot l's logits `choose(l, logits)`
        returns its codes (B,) int64, which feed slot l+1. The logits passed are (B, cb_0 + 1) for slot 0
        and (B, cb_l) for the others (last logit dropped). Returns the codes (B, 8)."""
        x = self._check_hidden(hidden)
        b = x.shape[0]
        self._ensure_cache(b)
        codes = torch.zeros((b, self.depth), dtype=torch.long, device=self.device)
        acc = torch.zeros((b, self.hidden_size), dtype=torch.float32, device=self.device)
        for slot in range(self.depth):
            if slot > 0:
                # the reference's torch.cumsum over the stacked rows accumulates in fp32 and rounds each slot
                acc += F.embedding(codes[:, slot - 1], self.embed[slot - 1]).float()
                x = acc.to(self.dtype)
            logits = self.slot_step(slot, x)
            if slot > 0:
                logits = logits[:, :-1]
            codes[:, slot] = choose(slot, logits)
        return codes

    @torch.no_grad()
    def frame_logits(self, hidden: torch.Tensor, codes: torch.Tensor) -> List[torch.Tensor]:
        """Teacher-forced logits of one frame: hidden (B, C), codes (B, 8) known; returns the 8 logit tensors
        [(B, cb_0 + 1), (B, cb_1), ...] that the incremental run computes when it picks exactly `codes`."""
        hidden = self._check_hidden(hidden)
        check_codes(codes, self.codebook_sizes)
        codes = codes.to(self.device, torch.long)
        out: List[torch.Tensor] = []

        def choose(slot, logits):
            out.append(logits.clone())
            return codes[:, slot]

        self.run_frame(hidden, choose)
        return out

    @torch.no_grad()
    def sample_frame(self, hidden: torch.Tensor, sampler: "AudioCodeSampler") -> torch.Tensor:
        """Sample one frame's 8 codes for one sequence: hidden (C,) or (1, C) -> (8,) int64. Does not update the
        sampler's history (call `sampler.observe(codes)` after the frame, as the reference does)."""
        hidden = self._check_hidden(hidden)
        if hidden.shape[0] != 1:
            raise ValueError(f"hidden: sample_frame serves one sequence, got batch {hidden.shape[0]}")
        return self.run_frame(hidden, lambda slot, logits: sampler.pick(slot, logits[0]))[0]

    @torch.no_grad()
    def full_logits(self, hidden: torch.Tensor, codes: torch.Tensor) -> List[torch.Tensor]:
        """The reference's whole-head forward: all 8 slots at once (slot j>0 input = cumsum of E_k[codes_k],
        k < j), every layer and every head on every slot. Returns the 8 heads' logits [(B, cb_i + 1)] fp32,
        nothing dropped. The reference decode loop calls this 8 times per frame; kept as the benchmark's
        peer and as a second path in the tests."""
        x0 = self._check_hidden(hidden)
        b, c, s = x0.shape[0], self.hidden_size, self.depth
        codes = codes.to(self.device, torch.long)
        rows = torch.stack([F.embedding(codes[:, i], self.embed[i]) for i in range(s - 1)], dim=1)
        x = torch.cat([x0[:, None], torch.cumsum(rows, dim=1)], dim=1)  # (B, S, C)
        mask = torch.ones(s, s, dtype=torch.bool, device=self.device).triu(1)
        h, d = self.num_heads, HEAD_DIM
        for layer in self.layers:
            xn = rms_norm(x, layer.ln1)
            q, k, v = F.linear(xn, layer.in_w, layer.in_b).view(b, s, 3, h, d).permute(2, 0, 3, 1, 4).float()
            scores = (q @ k.transpose(-1, -2)) * (d ** -0.5)
            o = torch.softmax(scores.masked_fill(mask, float("-inf")), dim=-1) @ v  # (B, H, S, D)
            o = F.linear(o.transpose(1, 2).reshape(b, s, c).to(x.dtype), layer.out_w, layer.out_b)
            res = rms_norm(x + o, layer.ln2)
            f = torch.einsum("bld,ltd->blt", res, layer.w1)
            x = res + torch.einsum("blt,ldt->bld", F.gelu(f), layer.w2)
        x = rms_norm(x, self.headnorm)
        return [self._head(i, x[:, i]) for i in range(s)]

    def describe(self) -> str:
        n = sum(t.numel() for layer in self.layers for t in (layer.in_w, layer.out_w, layer.w1, layer.w2))
        n += sum(t.numel() for t in self.heads_w)
        return (f"audio head: {len(self.layers)} layers x {self.depth} slots, width {self.hidden_size}, "
                f"{self.num_heads} heads, {n / 1e6:.1f} M weights, {self.dtype}, {self.device}, incremental slot cache")


class AudioCodeSampler:
    """Per-codebook code choice for one audio segment (reference `GenerationAudioTokens._sample`).

    Codebook i has its own HF-style sampler whose repetition-penalty history is this segment's earlier codes of
    codebook i (the prompt and the text are not in it). All codebooks draw from one shared `torch.Generator`,
    in slot order. Logits for codebook 0 have cb_0 + 1 entries (the last is end-of-audio), the others cb_i."""

    def __init__(self, codebook_sizes: Sequence[int], params: SamplingParams = AUDIO_SAMPLING, *, device="cpu",
                 generator: Optional[torch.Generator] = None, seed: Optional[int] = None):
        self.params = params.validate()
        self.codebook_sizes = [int(n) for n in codebook_sizes]
        self.device = torch.device(device)
        if generator is None:
            generator = seeded_generator(self.device, seed)
        self.generator = generator
        cap = int(params.max_new_tokens) + 1
        self.samplers = []
        for i, n in enumerate(self.codebook_sizes):
            s = Sampler(replace(params, stop_strings=(), stop_ids=()), n + 1 if i == 0 else n, self.device,
                        capacity=cap, seed=0)
            s.generator = self.generator  # one stream of draws for the whole segment, in slot order
            self.samplers.append(s)

    def reset(self) -> None:
        """Start a new segment: the penalty histories are emptied (the generator keeps its state)."""
        for s in self.samplers:
            s.n = 0

    @property
    def frames(self) -> int:
        return self.samplers[0].n

    def pick(self, slot: int, logits: torch.Tensor) -> torch.Tensor:
        """logits (cb,) fp32 of codebook `slot` -> the chosen code, (1,) int64. Modifies logits in place."""
        return self.samplers[slot].sample(logits.float())

    def observe(self, codes: torch.Tensor) -> None:
        """Add one finished frame (8,) to the histories."""
        for i, s in enumerate(self.samplers):
            s.observe(codes[i:i + 1])
