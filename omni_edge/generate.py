"""Text generation: prefill, then one token at a time over the backbone's KV cache.

- `SamplingParams`: greedy (temperature 0) or sampling with temperature, top-k, top-p and a repetition
  penalty, in the order HF `generate` applies them (penalty, temperature, top-k, top-p). The defaults are the
  reference demo's text settings (MODEL.md §2.3): T 0.8, top-k 20, top-p 0.85, repetition penalty 1.1.
- `Sampler`: picks the next token on the backbone's device from one row of fp32 logits, with a seeded
  `torch.Generator` and a preallocated context buffer for the penalty; no host synchronisation inside.
- `ChatSession`: a conversation over one backbone. Each turn renders the whole conversation with the prompt
  format (a message is text, or text plus images, video and audio), keeps the longest prefix the KV cache
  already holds and prefills only the rest, then decodes until a stop token, a stop string or
  `max_new_tokens`, streaming text through a callback as it becomes complete. Prefill runs on token ids when
  the new positions are all text, and on input embeddings when they hold media rows (the stage's output
  replaces the pad embeddings). Cache reuse compares media by content digest, not by pad ids.

The decode loop reads one integer per token from the device (the sampled id, needed for stop checks and
streaming) and allocates nothing big on the host: the input id lives in a preallocated tensor.
"""

from __future__ import annotations

import dataclasses
import math
import time
import weakref
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from omni_edge.tokenizer import MediaSpan, Message, Rendered, StreamDecoder, Tokenizer, media_of


@dataclass
class SamplingParams:
    max_new_tokens: int = 1024  # the reference demo's text-only limit (MODEL.md §4)
    temperature: float = 0.8  # 0 = greedy
    top_k: int = 20  # 0 = off
    top_p: float = 0.85  # 1 = off
    repetition_penalty: float = 1.1  # 1 = off; HF rule: logit / p if positive, logit * p if negative
    stop_strings: Tuple[str, ...] = ()  # the reply ends before the first occurrence of any of these
    stop_ids: Tuple[int, ...] = ()  # extra stop tokens, besides the prompt format's (eos ...)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def validate(self) -> "SamplingParams":
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1] (1 = off), got {self.top_p!r}")
        if not (self.repetition_penalty > 0 and math.isfinite(self.repetition_penalty)):
            raise ValueError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty!r}")
        if any(not s for s in self.stop_strings):
            raise ValueError("stop_strings: empty strings are not allowed")
        return self


def seeded_generator(device, seed: Optional[int] = None) -> torch.Generator:
    """A torch.Generator on `device`, seeded with `seed` (a fresh random seed when None)."""
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(int(seed))
    return g


def apply_repetition_penalty(logits: torch.Tensor, context: torch.Tensor, penalty: float) -> torch.Tensor:
    """HF's rule, in place, on every token id in `context` (1-D int64; repeats are harmless): a positive logit
    is divided by the penalty, a negative one multiplied by it. Costs O(len(context)), not O(vocab)."""
    if penalty == 1.0 or context.numel() == 0:
        return logits
    vals = logits.index_select(0, context)
    logits.index_copy_(0, context, torch.where(vals > 0, vals / penalty, vals * penalty))
    return logits


class Sampler:
    """Next-token choice for one sequence, on the logits' device, with no host synchronisation.

    `set_context(ids)` gives the tokens the repetition penalty looks at (HF counts the prompt too);
    `observe(token)` adds a generated one; `sample(logits)` returns a (1,) int64 tensor. The context lives in
    a buffer allocated once (`capacity` ids), so a decode step allocates nothing vocabulary-sized besides the
    logits it is given, which it modifies in place."""

    def __init__(self, params: SamplingParams, vocab_size: int, device, *, capacity: int,
                 seed: Optional[int] = None):
        self.params = params.validate()
        self.vocab_size = vocab_size
        self.context = torch.zeros(capacity, dtype=torch.long, device=device)  # (capacity,) token ids
        self.n = 0
        self.generator = seeded_generator(device, seed)

    def set_context(self, ids: Sequence[int]) -> None:
        ids = [i for i in ids if 0 <= i < self.vocab_size]
        if len(ids) > self.context.numel():
            raise ValueError(f"context: {len(ids)} ids exceed the sampler's capacity {self.context.numel()}")
        self.n = len(ids)
        if ids:
            self.context[:self.n].copy_(torch.tensor(ids, dtype=torch.long))

    def observe(self, token: torch.Tensor) -> None:
        if self.n < self.context.numel():
            self.context[self.n:self.n + 1].copy_(token.view(1))
            self.n += 1

    def candidates(self, logits: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Processed logits of the tokens that may be drawn, and their ids: repetition penalty, then
        temperature, top-k and top-p (HF's order; top-p after top-k works on the renormalised top k). Tokens
        cut by top-p get -inf. Sampling mode only; modifies `logits` in place."""
        p = self.params
        logits = apply_repetition_penalty(logits, self.context[:self.n], p.repetition_penalty)
        logits = logits.div_(p.temperature)
        vocab = logits.numel()
        if 0 < p.top_k < vocab:
            values, index = torch.topk(logits, p.top_k)  # sorted, largest first
            probs = torch.softmax(values, dim=-1)
        elif p.top_p < 1.0:
            # Top-p alone: rather than sorting the whole vocabulary (tens of ms at 152k entries on a CPU), take
            # the top k for growing k until they hold top_p of the mass; the nucleus is then inside them. This
            # reads one number back per try (a host sync), which only this setting pays.
            full = torch.softmax(logits, dim=-1)
            k = min(256, vocab)
            while True:
                values, index = torch.topk(logits, k)
                probs = full[index]
                if k == vocab or float(probs.sum()) >= p.top_p:
                    break
                k = min(4 * k, vocab)
        else:  # no truncation: every token is a candidate, in vocabulary order
            return logits, torch.arange(vocab, device=logits.device)
        if p.top_p < 1.0:
            # drop a token when the tokens ranked above it already hold top_p of the mass; the first always stays
            before = torch.cumsum(probs, dim=-1) - probs
            values = values.masked_fill(before >= p.top_p, float("-inf"))
        return values, index

    def _draw(self, logits: torch.Tensor) -> torch.Tensor:
        """One index drawn from softmax(logits) by inverting the CDF with a single uniform number (cheaper
        than torch.multinomial or a Gumbel race over a 152k vocabulary, and free of host syncs)."""
        cdf = torch.cumsum(torch.softmax(logits, dim=-1), dim=-1, dtype=torch.float64)
        u = torch.rand(1, generator=self.generator, dtype=torch.float64, device=logits.device) * cdf[-1]
        return torch.searchsorted(cdf, u, right=True).clamp_(max=logits.numel() - 1)

    def sample(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits[: self.vocab_size]
        if logits.dtype != torch.float32:
            logits = logits.float()
        p = self.params
        if p.greedy:
            logits = apply_repetition_penalty(logits, self.context[:self.n], p.repetition_penalty)
            return torch.argmax(logits).view(1)
        if p.top_k == 0 and p.top_p == 1.0:  # plain sampling over the whole vocabulary
            logits = apply_repetition_penalty(logits, self.context[:self.n], p.repetition_penalty)
            return self._draw(logits.div_(p.temperature))
        values, index = self.candidates(logits)
        return index[self._draw(values)]


class _TextOut:
    """Reply text with stop strings: text that could be the start of a stop string is held back until it is
    known not to be one, so the caller never sees part of a stop string."""

    def __init__(self, stop_strings: Sequence[str], on_text: Optional[Callable[[str], None]]):
        self.stops = tuple(stop_strings)
        self.on_text = on_text
        self.text = ""
        self.emitted = 0

    def _emit(self, upto: int) -> None:
        if upto > self.emitted:
            piece = self.text[self.emitted:upto]
            self.emitted = upto
            if self.on_text is not None:
                self.on_text(piece)

    def add(self, piece: str) -> bool:
        """Append text; True when a stop string has appeared (the text is cut just before it)."""
        if not piece:
            return False
        before = len(self.text)
        self.text += piece
        if self.stops:
            hits = [i for s in self.stops
                    if (i := self.text.find(s, max(0, before - len(s) + 1))) >= 0]
            if hits:
                self.text = self.text[:min(hits)]
                self._emit(len(self.text))
                return True
            hold = 0
            for k in range(min(len(self.text), max(len(s) for s in self.stops) - 1), 0, -1):
                tail = self.text[-k:]
                if any(s.startswith(tail) for s in self.stops):
                    hold = k
                    break
            self._emit(max(self.emitted, len(self.text) - hold))
        else:
            self._emit(len(self.text))
        return False

    def finish(self) -> None:
        self._emit(len(self.text))


CONTEXT_POLICIES = ("drop-oldest", "refuse")
MIN_REPLY_TOKENS = 32  # the reply room a turn must have (or max_new_tokens, if smaller) before it starts


class NonFiniteLogitsError(ValueError):
    """The backbone produced NaN or Inf logits: bad weights or a dtype overflow, never a normal reply."""


@dataclass
class Reply:
    text: str
    ids: List[int]  # generated tokens, stop token excluded
    finish_reason: str  # "stop" (stop token or string), "length" (max_new_tokens), "interrupted"
    prompt_tokens: int  # tokens of the whole conversation prompt
    prefilled_tokens: int  # of which were prefilled this turn (the rest came from the KV cache)
    prefill_s: float  # prefill forward + the first sample
    decode_s: float  # wall time of the decode loop (forwards, sampling and streaming)
    step_s: List[float] = field(default_factory=list)  # per decode step: forward + logits + sample + read id
    media_s: Dict[str, float] = field(default_factory=dict)  # stage time per media kind this turn (encode)
    media_tokens: Dict[str, int] = field(default_factory=dict)  # prompt positions per media kind
    notices: List[str] = field(default_factory=list)  # what the session changed to fit the context
    max_new_tokens: int = 0  # the reply budget in force (max_new_tokens, clipped to what the context holds)

    @property
    def new_tokens(self) -> int:
        return len(self.ids)

    @property
    def prefill_tok_s(self) -> float:
        return self.prefilled_tokens / self.prefill_s if self.prefill_s > 0 else float("nan")

    @property
    def decode_tok_s(self) -> float:
        return len(self.step_s) / self.decode_s if self.decode_s > 0 and self.step_s else float("nan")


def _replace_spans(ids: List[int], spans: Sequence[MediaSpan], new: Sequence[Tuple[int, object, str]]):
    """A message's ids and spans with each span's pad run (one segment each, in order) replaced by n pads of a new
    "audio" item: `new` holds (n, item, digest) per span."""
    out_ids: List[int] = []
    out_spans: List[MediaSpan] = []
    i = 0
    for sp, (n, item, digest) in zip(spans, new):
        (a, k), = sp.segments
        out_ids += ids[i:a]
        out_spans.append(MediaSpan("audio", item, digest, [(len(out_ids), n)]))
        out_ids += [ids[a]] * n
        i = a + k
    return out_ids + ids[i:], out_spans


def _notifier(notices: List[str], on_notice: Optional[Callable[[str], None]]) -> Callable[[str], None]:
    """A notice callback that records into `notices` and forwards to `on_notice`."""
    def notice(text: str) -> None:
        notices.append(text)
        if on_notice is not None:
            on_notice(text)
    return notice


class _Bounded:
    """A backbone seen with a shorter cache: the spoken-reply driver stops at `max_len` as at a full context."""

    def __init__(self, backbone, max_len: int):
        self._bb, self.max_len = backbone, max_len

    def __getattr__(self, name):
        return getattr(self._bb, name)


# The KV cache belongs to the backbone, so one session at a time holds its conversation there: a session
# that finds another one used the cache since its own last turn re-prefills its whole conversation.
_CACHE_USER: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


class ChatSession:
    """A conversation with one backbone; the backbone's KV cache holds the conversation so far.

    `cached` holds one key per position whose keys and values are in the cache (the token id, or
    (id, digest, row) for a media row; see `Rendered.keys`). A turn renders the whole conversation, reuses the
    longest common prefix with `cached` and prefills the rest from there (positions past it are simply
    overwritten), so editing the system prompt, a template that re-renders earlier turns differently, or an
    image swapped for another of the same size stays correct, and the usual case prefills only the new turn.

    `embed_media(spans) -> [Tensor (n_tokens, C)]` turns media spans into backbone input rows (the pipeline
    gives it; it runs the vision or audio stage). Rows are kept per digest while their message is in the
    conversation, so a re-prefill does not re-run a stage."""

    def __init__(self, backbone, tokenizer: Tokenizer, prompt, *, device, vocab_size: int,
                 system: Optional[str] = None, seed: Optional[int] = None, prefill_chunk: int = 512,
                 embed_media: Optional[Callable[[Sequence[MediaSpan]], List[torch.Tensor]]] = None,
                 context_policy: str = "drop-oldest"):
        if context_policy not in CONTEXT_POLICIES:
            raise ValueError(f"context_policy must be one of {', '.join(CONTEXT_POLICIES)}, got {context_policy!r}")
        self.context_policy = context_policy
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.prompt = prompt  # BaichuanPrompt | TemplatePrompt
        self.device = torch.device(device)
        self.system = system
        self.seed = seed
        self.prefill_chunk = prefill_chunk
        self.embed_media = embed_media
        self.history: List[Message] = []
        self.cached: List[object] = []
        self._media_rows: Dict[str, torch.Tensor] = {}  # digest -> (n_tokens, C) backbone input rows
        # lm_head rows past the tokenizer's vocabulary are padding (152064 vs 151702 for Baichuan-Omni):
        # never sample them
        self.vocab_size = min(tokenizer.vocab_size, int(vocab_size))
        self._input = torch.zeros((1, 1), dtype=torch.long, device=self.device)  # the decode step's input id
        self._generator_state = None
        self._reseed()

    @property
    def max_len(self) -> int:
        return int(self.backbone.max_len)

    def _reseed(self) -> None:
        self._generator_state = seeded_generator(self.device, self.seed).get_state()

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays); the RNG restarts from the seed."""
        self.history = []
        self.cached = []
        self._media_rows = {}
        self._reseed()

    def messages(self, user=None, *, speak: bool = False) -> List[Message]:
        msgs: List[Message] = []
        if self.system is not None:
            msgs.append({"role": "system", "content": self.system})
        msgs += self.history
        if user is not None:
            msgs.append(self._user_message(user, speak))
        return msgs

    @staticmethod
    def _user_message(user, speak: bool) -> Message:
        m: Message = {"role": "user", "content": user if isinstance(user, str) else list(user)}
        if speak:
            m["speak"] = True
        return m

    # ---- prefill --------------------------------------------------------------------------------

    def _rows_for(self, spans: Sequence[MediaSpan], media_s: Dict[str, float]) -> Dict[str, torch.Tensor]:
        """Backbone input rows of every span, from the per-digest store or the stage (timed per kind)."""
        todo = [sp for sp in spans if sp.digest not in self._media_rows]
        if todo:
            if self.embed_media is None:
                raise ValueError("this model has no stage for media input (images, video or audio)")
            t0 = time.perf_counter()
            rows = self.embed_media(todo)
            dt = time.perf_counter() - t0
            for sp, r in zip(todo, rows):
                if r.shape[0] != sp.n_tokens:
                    raise RuntimeError(f"{sp.kind} stage returned {r.shape[0]} rows for {sp.n_tokens} positions")
                self._media_rows[sp.digest] = r
            for kind in {sp.kind for sp in todo}:  # one batched call: charge its time to each kind it served
                media_s[kind] = media_s.get(kind, 0.0) + dt / len({sp.kind for sp in todo})
        return {sp.digest: self._media_rows[sp.digest] for sp in spans}

    def _prefill(self, rendered: Rendered, keep: int, media_s: Dict[str, float]) -> torch.Tensor:
        """Run positions keep.. of the rendered prompt; returns the last position's hidden state (1, C)."""
        ids = rendered.ids
        spans = [sp for sp in rendered.spans if any(a + n > keep for a, n in sp.segments)]
        new = torch.tensor([ids[keep:]], dtype=torch.long, device=self.device)
        embeds = None
        if spans:
            rows = self._rows_for(spans, media_s)
            embeds = self.backbone.embed(new)
            for sp in spans:
                r, row = rows[sp.digest], 0
                for a, n in sp.segments:
                    lo, hi = max(a, keep), a + n
                    if hi > lo:
                        embeds[0, lo - keep:hi - keep] = r[row + lo - a:row + n].to(embeds.dtype)
                    row += n
        hidden = None
        for a in range(0, len(ids) - keep, self.prefill_chunk):
            if embeds is None:
                hidden = self.backbone.forward(new[:, a:a + self.prefill_chunk], start=keep + a)
            else:
                hidden = self.backbone.forward(inputs_embeds=embeds[:, a:a + self.prefill_chunk], start=keep + a)
        return hidden[:, -1]

    def render(self, user=None, *, speak: bool = False) -> Rendered:
        return self.prompt.render_spans(self.messages(user, speak=speak))

    def _keep(self, keys: Sequence[object]) -> int:
        """Length of the cached prefix that the rendered keys share (at least one position is left to run)."""
        keep = 0
        limit = min(len(self.cached), len(keys) - 1)
        while keep < limit and self.cached[keep] == keys[keep]:
            keep += 1
        return keep

    @torch.inference_mode()
    def send_spoken(self, user, head, *, params=None, max_new_tokens: Optional[int] = None,
                    on_text: Optional[Callable[[str], None]] = None,
                    on_audio_frame: Optional[Callable[[torch.Tensor], None]] = None,
                    on_clause_end: Optional[Callable[[], None]] = None,
                    on_notice: Optional[Callable[[str], None]] = None):
        """One turn with a spoken reply (MODEL.md §2.3): `<audiotext_start_baichuan>` before `<C_A>`, then text
        and audio alternate per clause (`omni_edge.speak.speak`, with the audio `head`). Audio frames (8 codes
        each) go to `on_audio_frame` as they are sampled and `on_clause_end` marks the end of each segment (the
        speech decoder streams from there). The history keeps what the KV cache holds: the fed ids with each
        audio segment as an "audiogen" span of its codes, so a later turn reuses the cache, and a re-prefill
        rebuilds the same rows from the codes. `max_new_tokens` bounds the positions the reply may fill (text
        tokens and audio frames together; the reply ends as at a full context). Returns
        `omni_edge.speak.SpokenReply` with `notices` and `prefill_s` added."""
        import hashlib

        from omni_edge.speak import SpeakParams, speak

        params = params or SpeakParams()
        self._claim_cache()
        notices: List[str] = []
        rendered, _ = self._fit(user, SamplingParams(max_new_tokens=MIN_REPLY_TOKENS), _notifier(notices, on_notice),
                                speak=True)
        ids, keys = rendered.ids, rendered.keys()
        keep = self._keep(keys)
        self.history.append(self._user_message(user, True))
        generator = torch.Generator(device=self.device)
        generator.set_state(self._generator_state)
        t0 = time.perf_counter()
        reply = None
        try:
            self.cached = self.cached[:keep]
            hidden = self._prefill(rendered, keep, {})
            logits = self.backbone.logits(hidden)[0]
            if not bool(torch.isfinite(logits).all()):
                raise NonFiniteLogitsError(self._nonfinite_message(len(ids) - 1))
            self.cached = list(keys)
            prefill_s = time.perf_counter() - t0
            bb = self.backbone
            if max_new_tokens is not None and len(ids) + max_new_tokens < bb.max_len:
                bb = _Bounded(bb, len(ids) + max_new_tokens)
            reply = speak(bb, head, self.tokenizer, start=len(ids), logits=logits, context=ids,
                          params=params, generator=generator, vocab_size=self.vocab_size, on_text=on_text,
                          on_audio_frame=on_audio_frame, on_clause_end=on_clause_end)
        finally:
            self._generator_state = generator.get_state()
            if reply is None:
                self.history.pop()
        fed_ids: List[int] = []
        spans: List[MediaSpan] = []
        run: List[Tuple[int, ...]] = []

        def close_run():
            if run:
                codes = torch.tensor(run, dtype=torch.long)
                digest = hashlib.sha256(codes.numpy().tobytes()).hexdigest()
                spans.append(MediaSpan("audiogen", codes, digest, [(len(fed_ids) - len(run), len(run))]))
                run.clear()

        for f in reply.fed:
            if isinstance(f, tuple):
                fed_ids.append(int(f[0]))
                run.append(tuple(int(c) for c in f[1]))
            else:
                close_run()
                fed_ids.append(int(f))
        close_run()
        self.history.append({"role": "assistant", "content": reply.text, "ids": fed_ids, "spans": spans})
        after = self.prompt.render_spans(self.messages(), add_generation_prompt=False).keys()
        self.cached = after[:len(ids) + len(fed_ids)]
        reply.notices = notices
        reply.prefill_s = prefill_s
        reply.prompt_tokens = len(ids)
        reply.prefilled_tokens = len(ids) - keep
        return reply

    def _claim_cache(self) -> None:
        user_ref = _CACHE_USER.get(self.backbone)
        if user_ref is None or user_ref() is not self:
            self.cached = []
            _CACHE_USER[self.backbone] = weakref.ref(self)

    @torch.inference_mode()
    def send(self, user, params: Optional[SamplingParams] = None,
             on_text: Optional[Callable[[str], None]] = None,
             on_hidden: Optional[Callable[[torch.Tensor], None]] = None,
             on_notice: Optional[Callable[[str], None]] = None) -> Reply:
        """One turn: the user's message in (a string, or a list of text and media parts), the assistant's reply
        out (streamed through `on_text`). `on_hidden(h)`, when given, receives the final-normed hidden state
        (C,) of the position whose logits chose each token (nothing extra is computed when it is None).

        Context: the reply budget is clipped to what the context holds (a notice says so); when the
        conversation leaves less than MIN_REPLY_TOKENS of room, the "drop-oldest" policy drops the oldest
        turns (the system prompt stays) and "refuse" raises ValueError naming /reset. A message that does not
        fit on its own raises ValueError. Notices go to `on_notice` and `Reply.notices`. Errors leave the
        conversation unchanged. Non-finite logits raise NonFiniteLogitsError. If interrupted
        (KeyboardInterrupt from `on_text` or the user), the reply so far is kept and the exception propagates."""
        params = (params or SamplingParams()).validate()
        self._claim_cache()
        notices: List[str] = []
        rendered, budget = self._fit(user, params, _notifier(notices, on_notice))
        ids, keys = rendered.ids, rendered.keys()
        stop_ids = frozenset(self.prompt.stop_ids) | frozenset(params.stop_ids)
        if budget < params.max_new_tokens:
            params = dataclasses.replace(params, max_new_tokens=budget)
        sampler = Sampler(params, self.vocab_size, self.device, capacity=self.max_len)
        sampler.generator.set_state(self._generator_state)

        keep = self._keep(keys)

        media_s: Dict[str, float] = {}
        media_tokens: Dict[str, int] = {}
        for sp in rendered.spans:
            media_tokens[sp.kind] = media_tokens.get(sp.kind, 0) + sp.n_tokens
        self.history.append(self._user_message(user, False))
        reply_ids: List[int] = []
        out = _TextOut(params.stop_strings, on_text)
        stream: StreamDecoder = self.tokenizer.stream()
        finish = "interrupted"
        stopped_by_string = False
        step_s: List[float] = []
        t0 = time.perf_counter()
        prefill_s = 0.0
        t_decode = t0
        try:
            self.cached = self.cached[:keep]
            hidden = self._prefill(rendered, keep, media_s)
            logits = self.backbone.logits(hidden)[0]
            if not bool(torch.isfinite(logits).all()):
                raise NonFiniteLogitsError(self._nonfinite_message(len(ids) - 1))
            self.cached = list(keys)
            sampler.set_context(ids)
            token = sampler.sample(logits)
            tid = int(token)
            if on_hidden is not None:
                on_hidden(hidden[0])
            prefill_s = time.perf_counter() - t0
            t_decode = time.perf_counter()
            decode_step = getattr(self.backbone, "decode_step", None)
            while True:
                if tid in stop_ids:
                    finish = "stop"
                    break
                reply_ids.append(tid)
                if out.add(stream.push(tid)):
                    finish, stopped_by_string = "stop", True
                    break
                if len(reply_ids) >= params.max_new_tokens:
                    finish = "length"
                    break
                ts = time.perf_counter()
                sampler.observe(token)
                self._input.copy_(token.view(1, 1))
                if decode_step is not None:  # layers + lm_head in one step (CPU: one native call; CUDA: a graph)
                    hidden, logits = decode_step(self._input, start=len(self.cached))
                    logits = logits[0]
                else:
                    hidden = self.backbone.forward(self._input, start=len(self.cached))
                    logits = self.backbone.logits(hidden[:, -1])[0]
                self.cached.append(tid)
                token = sampler.sample(logits)
                tid = int(token)
                if not math.isfinite(float(logits[tid])):  # NaN/Inf weights poison every logit, the chosen too
                    finish = "error"
                    raise NonFiniteLogitsError(self._nonfinite_message(len(self.cached) - 1))
                if on_hidden is not None:
                    on_hidden(hidden[0, -1])
                step_s.append(time.perf_counter() - ts)
            if not stopped_by_string:
                out.add(stream.flush())  # bytes of an unfinished character, if the reply ended inside one
            out.finish()
        finally:
            self._generator_state = sampler.generator.get_state()
            if finish in ("interrupted", "error") and not reply_ids:
                self.history.pop()  # nothing was generated: forget the turn (the cache is still consistent)
            else:
                self.history.append({"role": "assistant", "content": out.text, "ids": list(reply_ids)})
            self._forget_unused_media()
        return Reply(text=out.text, ids=reply_ids, finish_reason=finish, prompt_tokens=len(ids),
                     prefilled_tokens=len(ids) - keep, prefill_s=prefill_s,
                     decode_s=time.perf_counter() - t_decode, step_s=step_s, media_s=media_s,
                     media_tokens=media_tokens, notices=notices, max_new_tokens=params.max_new_tokens)

    def retokenize_spoken(self, waves: Sequence[torch.Tensor], to_item: Callable[[torch.Tensor], object]) -> None:
        """Keep the last spoken reply's audio in the history as the reference does (MODEL.md §2.2): each segment's
        24 kHz wave (`waves`, one per "audiogen" span, in order) re-tokenised through the audio input path
        (`to_item(wave)` -> a prepared audio item; its pads are filled by the audio encoder's RVQ codes). The pad
        counts change, so the next turn re-prefills from the first such segment, as the reference re-encodes."""
        if not self.history or self.history[-1]["role"] != "assistant":
            return
        m = self.history[-1]
        old = list(m.get("spans", ()))
        if not old or any(sp.kind != "audiogen" for sp in old):
            return
        if len(waves) != len(old):
            raise ValueError(f"retokenize_spoken: {len(waves)} waves for {len(old)} audio segments")
        items = [to_item(w) for w in waves]
        m["ids"], m["spans"] = _replace_spans(list(m["ids"]), old, [(int(it.n_tokens), it, it.digest)
                                                                    for it in items])

    def _nonfinite_message(self, position: int) -> str:
        return (f"the model produced non-finite logits (NaN or Inf) at position {position}: its weights likely "
                f"hold NaN or Inf values (check the files with `omni-edge verify`), or the activations overflowed "
                f"in {getattr(self.backbone, 'dtype', 'this dtype')} (try --dtype float32)")

    def _fit(self, user, params: SamplingParams, notice: Callable[[str], None], *,
             speak: bool = False) -> Tuple[Rendered, int]:
        """Render the turn so that the prompt leaves room for a reply: drop the oldest turns (policy
        "drop-oldest") or refuse, then clip the reply budget to the room left. Returns (rendered, budget)."""
        want = min(params.max_new_tokens, MIN_REPLY_TOKENS)
        dropped = 0
        while True:
            rendered = self.render(user, speak=speak)
            n = len(rendered.ids)
            if n + want <= self.max_len:
                break
            if not self.history:
                raise ValueError(f"the prompt ({n} tokens, conversation so far included) plus max_new_tokens "
                                 f"({params.max_new_tokens}) needs {n + params.max_new_tokens} positions, more "
                                 f"than the context of {self.max_len} tokens allocated for this session (a "
                                 f"reply needs at least {want} of them): shorten the message or raise --max-context")
            if self.context_policy == "refuse":
                raise ValueError(f"the conversation ({n} tokens with this message) leaves no room for a reply in "
                                 f"the context of {self.max_len} tokens: /reset starts a new conversation (the "
                                 f"system prompt is kept), or raise --max-context")
            # drop the oldest exchange: a user turn and the assistant turn that answered it
            cut = 2 if len(self.history) > 1 and self.history[1]["role"] == "assistant" else 1
            del self.history[:cut]
            dropped += 1
        if dropped:
            notice(f"the conversation outgrew the context of {self.max_len} tokens: dropped the oldest "
                   f"{dropped} exchange(s) (the system prompt is kept)")
            self._forget_unused_media()
        budget = min(params.max_new_tokens, self.max_len - n)
        if budget < params.max_new_tokens:
            notice(f"reply limited to {budget} tokens: the prompt takes {n} of the {self.max_len}-token context")
        return rendered, budget

    def _forget_unused_media(self) -> None:
        """Drop stored rows of media no longer in the conversation."""
        if not self._media_rows:
            return
        live = set()
        for m in self.history:
            live.update(item.digest for _, item in media_of(m.get("content", "")))
            live.update(sp.digest for sp in m.get("spans", ()))
        for d in [d for d in self._media_rows if d not in live]:
            del self._media_rows[d]
