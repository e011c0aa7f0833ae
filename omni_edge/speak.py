"""The spoken reply: text and audio segments alternating clause by clause over one KV cache.

MODEL.md §2.3 (reference: `generate_response` of the multiturn speech demo, with `GenerationAudioTokens`):

1. Text step 1: at most 50 new tokens, stop at the strings `<audiogen_start_baichuan>` / `<|endoftext|>` (or the
   eos token); T 0.8, top-k 20, top-p 0.85, repetition penalty 1.1.
2. The last sampled token is OVERWRITTEN by `<audiogen_start_baichuan>`, whatever it was (its text still counts
   in the reply text). Audio step: feed audiogen_start, then one `<audio_pad>` per frame whose input row is
   sum_i E_i[code_i] of the previous frame; after each backbone step the audio head samples 8 codes (no lm_head
   work on audio steps). A pad is appended to the sequence for every sampled frame, but the pad of the last
   frame (the end-of-audio frame, code_0 == cb_0, or frame 500) is never fed.
3. That last pad is OVERWRITTEN by `<audiogen_end_baichuan>`, which the next text step feeds first: at most 50
   tokens, stop at audiogen_start or any of `, ! ? ， 。 ！ ？ ". "`; T 0.3, top-k 20, top-p 0.85, penalty 1.05.
4. Rounds repeat (at most 100) until a text step ends with `<|endoftext|>`: if that step produced more than the
   eos token, the eos is overwritten by audiogen_start and one last audio segment is spoken; then the turn ends.

Every text step's repetition penalty looks at the whole sequence so far (HF counts the prompt): the prompt ids,
the turn's text tokens with the overwrites applied, the audio pad ids and the brackets. The audio head's penalty
looks only at the current segment's earlier codes, per codebook (see `omni_edge.audio_head`). Stop strings are
found on the decoded text (special tokens spelled out), as HF's stop-string criterion does; the reply text is the
decoded text of every sampled token (stop punctuation included) minus the strings `<|endoftext|>`,
`<audiogen_start_baichuan>`, `<audiogen_end_baichuan>`, as the demo shows it.

The driver needs only the backbone's `forward(input_ids= | inputs_embeds=, start=)` (final-normed hidden
states), `logits(hidden)` and `max_len`, the audio head, the tokenizer (ids looked up by name), the position
where the prompt ends (everything before it already in the KV cache; the prompt ends with
`<audiotext_start_baichuan><C_A>`) and the logits of the last prompt position. Callbacks: `on_text(str)`,
`on_audio_frame(codes (8,) int64)` for every frame before end-of-audio, `on_clause_end()` after each segment
(a decode chain plugs in here: `SpeechStream.push(codes)` / `end_clause()`).

History. The KV cache holds `prompt + reply.fed` (positions start..reply.next_start-1); `reply.pending` (the
last sampled token: eos, or the unfed pad of the final segment) is not in it. The reference does NOT keep these
tokens as the conversation history: it stores the assistant turn as its text pieces and audio files,
`text_1 <audiogen_start>{"path": wav_1}<audiogen_end> text_2 ...` (`reply.parts`), and the next turn re-renders
that: text pieces keep their overwritten last token's text, and each segment's 24 kHz wave is resampled to
16 kHz and re-encoded by the audio encoder + RVQ into `<audiogen_start> <audio_pad> x N <audiogen_end>`. The
re-rendered turn differs from `prompt + fed` from the first overwritten token on (at the latest), and text is
re-tokenised from its string, so a follow-up turn reuses the cache for the common prefix of the two id lists
(at least `start`) and prefills the rest from `reply.parts` once the audio input path can re-encode segments.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch

from omni_edge.audio_head import AUDIO_SAMPLING, AudioCodeSampler, AudioHead
from omni_edge.generate import Sampler, SamplingParams, seeded_generator, _TextOut
from omni_edge.tokenizer import Tokenizer

EOS = "<|endoftext|>"
AUDIOGEN_START = "<audiogen_start_baichuan>"
AUDIOGEN_END = "<audiogen_end_baichuan>"
AUDIO_PAD = "<audio_pad_baichuan>"
CLAUSE_STOPS = (",", "!", "?", "，", "。", "！", "？", ". ")  # the demo's later text steps stop at these

FIRST_TEXT = SamplingParams(max_new_tokens=50, temperature=0.8, top_k=20, top_p=0.85, repetition_penalty=1.1,
                            stop_strings=(AUDIOGEN_START, EOS))
NEXT_TEXT = SamplingParams(max_new_tokens=50, temperature=0.3, top_k=20, top_p=0.85, repetition_penalty=1.05,
                           stop_strings=(AUDIOGEN_START,) + CLAUSE_STOPS)

# A position of the reply in the KV cache: a token id, or (audio pad id, the 8 codes whose embedding it holds).
Fed = Union[int, Tuple[int, Tuple[int, ...]]]


@dataclass
class SpeakParams:
    first_text: SamplingParams = field(default_factory=lambda: FIRST_TEXT)
    next_text: SamplingParams = field(default_factory=lambda: NEXT_TEXT)
    audio: SamplingParams = field(default_factory=lambda: AUDIO_SAMPLING)  # max_new_tokens = the frame cap per segment (500 = 40 s)
    max_rounds: int = 100

    def greedy(self) -> "SpeakParams":
        """The same settings with every draw replaced by argmax (repetition penalties still apply, as in HF)."""
        return replace(self, first_text=replace(self.first_text, temperature=0.0),
                       next_text=replace(self.next_text, temperature=0.0),
                       audio=replace(self.audio, temperature=0.0))

    def validate(self) -> "SpeakParams":
        for p in (self.first_text, self.next_text, self.audio):
            p.validate()
        if not isinstance(self.max_rounds, int) or self.max_rounds < 1:
            raise ValueError(f"max_rounds must be a positive integer, got {self.max_rounds!r}")
        return self


@dataclass
class SpokenReply:
    text: str  # the reply text as the demo shows it
    fed: List[Fed]  # what this turn wrote into the KV cache, positions start .. next_start - 1
    pending: int  # the last token of the sequence, sampled or appended but never fed
    segments: List[torch.Tensor]  # per audio segment: (n, 8) int64 codes of the frames before end-of-audio
    parts: List[Tuple[str, object]]  # the turn as the reference history keeps it: ("text", str) / ("audio", i)
    finish_reason: str  # "eos" | "rounds" (max_rounds reached) | "context" (KV cache full)
    text_ends: List[str]  # per text step: "eos" | "stop" (a stop string) | "length" (max_new_tokens) | "context"
    audio_ends: List[str]  # per audio segment: "eos" (code_0 == cb_0) | "length" (the frame cap) | "context"
    start: int
    next_start: int
    rounds: int = 0
    text_tokens: int = 0
    frames: int = 0  # frames sampled, end-of-audio frames included
    text_s: float = 0.0  # wall time of text steps (forwards + lm_head + sampling)
    audio_s: float = 0.0  # wall time of audio steps (forwards + head + sampling + callbacks)
    first_frame_s: Optional[float] = None  # from the call to the first frame handed to on_audio_frame


class _ContextFull(Exception):
    pass


class _Turn:
    """State of one spoken turn (see `speak`)."""

    def __init__(self, backbone, head: AudioHead, tokenizer: Tokenizer, *, start: int, context: Sequence[int],
                 params: SpeakParams, generator: torch.Generator, vocab_size: int, on_text, on_audio_frame,
                 on_clause_end):
        self.bb, self.head, self.tok = backbone, head, tokenizer
        self.params = params
        self.gen = generator
        self.vocab_size = vocab_size
        self.on_text, self.on_audio_frame, self.on_clause_end = on_text, on_audio_frame, on_clause_end
        self.eos = tokenizer.token_id(EOS)
        self.gen_start = tokenizer.token_id(AUDIOGEN_START)
        self.gen_end = tokenizer.token_id(AUDIOGEN_END)
        self.pad = tokenizer.token_id(AUDIO_PAD)
        self.hidden_strip = {self.eos, self.gen_start, self.gen_end}  # removed from the reply text
        self.device = torch.device(getattr(backbone, "device", head.device))  # where the text logits live
        self.seq: List[int] = [int(i) for i in context]  # the reference's `sequences` (penalty context)
        self.start = self.pos = start  # next cache position to write
        self.fed: List[Fed] = []
        self.text_parts: List[str] = []
        self.parts: List[Tuple[str, object]] = []
        self.segments: List[torch.Tensor] = []
        self.audio = AudioCodeSampler(head.codebook_sizes, params.audio, device=head.device, generator=generator)
        self._input = torch.zeros((1, 1), dtype=torch.long, device=self.device)  # the text step's input id
        self.t0 = time.perf_counter()
        self.first_frame_s: Optional[float] = None
        self.text_s = self.audio_s = 0.0
        self.text_tokens = self.frames = 0
        self.text_ends: List[str] = []
        self.audio_ends: List[str] = []

    # ---- backbone steps -------------------------------------------------------------------------

    def _feed_id(self, tid: int) -> torch.Tensor:
        """Feed one token at the next position; returns its hidden state (C,)."""
        if self.pos >= self.bb.max_len:
            raise _ContextFull
        self._input.fill_(tid)
        h = self.bb.forward(self._input, start=self.pos)
        self.fed.append(tid)
        self.pos += 1
        return h[0, -1]

    def _feed_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Feed one `<audio_pad>` whose input row is the frame's summed audio embeddings."""
        if self.pos >= self.bb.max_len:
            raise _ContextFull
        emb = self.head.embed_codes(codes.view(1, -1)).view(1, 1, -1)
        h = self.bb.forward(inputs_embeds=emb, start=self.pos)
        self.fed.append((self.pad, tuple(int(c) for c in codes.tolist())))
        self.pos += 1
        return h[0, -1]

    # ---- text -----------------------------------------------------------------------------------

    def text_step(self, params: SamplingParams, logits: torch.Tensor) -> List[int]:
        """Sample until eos, a stop string or max_new_tokens; every sampled token but the last is fed. The
        sampled tokens are appended to `seq`; returns them."""
        t = time.perf_counter()
        sampler = Sampler(replace(params, stop_strings=(), stop_ids=()), self.vocab_size, self.device,
                          capacity=len(self.seq) + params.max_new_tokens + 1, seed=0)
        sampler.generator = self.gen
        sampler.set_context(self.seq)
        stops = _TextOut(params.stop_strings, None)
        stream = self.tok.stream(skip_special=False)
        text: List[str] = []
        new: List[int] = []
        end = "context"
        try:
            while True:
                token = sampler.sample(logits)
                tid = int(token)
                new.append(tid)
                self.seq.append(tid)
                self.text_tokens += 1
                piece = stream.push(tid)
                hit = stops.add(piece)
                if tid not in self.hidden_strip and piece:
                    text.append(piece)
                    if self.on_text is not None:
                        self.on_text(piece)
                if tid == self.eos or hit or len(new) >= params.max_new_tokens:
                    end = "eos" if tid == self.eos else "stop" if hit else "length"
                    break
                sampler.observe(token)
                logits = self.bb.logits(self._feed_id(tid))
        finally:
            rest = stream.flush()  # bytes of a character cut by the end of the step (decoded as U+FFFD)
            if rest:
                text.append(rest)
                if self.on_text is not None:
                    self.on_text(rest)
            self.text_ends.append(end)
            piece = "".join(text)
            self.text_parts.append(piece)
            self.parts.append(("text", piece))
            self.text_s += time.perf_counter() - t
        return new

    # ---- audio ----------------------------------------------------------------------------------

    def audio_step(self) -> None:
        """`seq[-1]` is audiogen_start (not fed yet): speak one segment. Appends one pad per frame to `seq`."""
        t = time.perf_counter()
        frames: List[torch.Tensor] = []
        self.audio.reset()
        cap = self.params.audio.max_new_tokens
        end = "context"
        try:
            hidden = self._feed_id(self.seq[-1])
            for n in range(cap):
                codes = self.head.sample_frame(hidden, self.audio)
                self.audio.observe(codes)
                self.seq.append(self.pad)
                self.frames += 1
                if int(codes[0]) == self.head.eos_code:
                    end = "eos"
                    break
                frames.append(codes)
                if self.first_frame_s is None:
                    self.first_frame_s = time.perf_counter() - self.t0
                if self.on_audio_frame is not None:
                    self.on_audio_frame(codes)
                if n == cap - 1:
                    end = "length"
                    break  # the frame cap: this frame's pad is not fed (the reference loop ends here too)
                hidden = self._feed_codes(codes)
        finally:
            seg = torch.stack(frames) if frames else torch.zeros((0, self.head.depth), dtype=torch.long)
            self.audio_ends.append(end)
            self.parts.append(("audio", len(self.segments)))
            self.segments.append(seg.cpu())
            self.audio_s += time.perf_counter() - t
        if self.on_clause_end is not None:
            self.on_clause_end()

    # ---- the turn -------------------------------------------------------------------------------

    def run(self, logits: torch.Tensor) -> Tuple[str, int]:
        p = self.params
        rounds = 0
        try:
            new = self.text_step(p.first_text, logits)
            for _ in range(p.max_rounds):
                if new[-1] == self.eos:
                    if len(new) > 1:  # text came before the eos: speak it, then the turn is over
                        self.seq[-1] = self.gen_start
                        self.audio_step()
                        rounds += 1
                    return "eos", rounds
                self.seq[-1] = self.gen_start
                self.audio_step()
                rounds += 1
                self.seq[-1] = self.gen_end
                logits = self.bb.logits(self._feed_id(self.gen_end))
                new = self.text_step(p.next_text, logits)
            return "rounds", rounds
        except _ContextFull:
            return "context", rounds


@torch.inference_mode()
def speak(backbone, head: AudioHead, tokenizer: Tokenizer, *, start: int, logits: torch.Tensor,
          context: Sequence[int], params: Optional[SpeakParams] = None,
          generator: Optional[torch.Generator] = None, seed: Optional[int] = None,
          vocab_size: Optional[int] = None,
          on_text: Optional[Callable[[str], None]] = None,
          on_audio_frame: Optional[Callable[[torch.Tensor], None]] = None,
          on_clause_end: Optional[Callable[[], None]] = None) -> SpokenReply:
    """Generate one spoken reply after a prompt that is already in the backbone's KV cache.

    start: the prompt's length (the next cache position); logits: the lm_head logits (vocab,) of the last
    prompt position; context: the prompt's token ids (the text steps' repetition penalty counts them; pads of
    media count by their pad ids). All draws (text tokens and audio codes, in order) come from `generator`
    (else a new one seeded with `seed`). `vocab_size` limits text sampling to the tokenizer's vocabulary
    (default: min of the tokenizer's size and the logits' length; rows past it are lm_head padding).
    The KV cache ends up holding prompt + reply.fed; see the module docstring for what the history keeps."""
    params = (params or SpeakParams()).validate()
    if not isinstance(start, int) or start < 1:
        raise ValueError(f"start: expected the prompt length (an integer >= 1), got {start!r}")
    if start > backbone.max_len:
        raise ValueError(f"start: {start} exceeds the KV cache of {backbone.max_len} positions")
    if len(context) != start:
        raise ValueError(f"context: expected the {start} prompt ids the cache holds, got {len(context)}")
    if logits.dim() != 1:
        raise ValueError(f"logits: expected the last prompt position's logits (vocab,), got {tuple(logits.shape)}")
    if vocab_size is None:
        vocab_size = min(tokenizer.vocab_size, logits.numel())
    if generator is None:
        generator = seeded_generator(head.device, seed)
    turn = _Turn(backbone, head, tokenizer, start=start, context=context, params=params, generator=generator,
                 vocab_size=int(vocab_size), on_text=on_text, on_audio_frame=on_audio_frame,
                 on_clause_end=on_clause_end)
    finish, rounds = turn.run(logits.float().clone())
    return SpokenReply(text="".join(turn.text_parts), fed=turn.fed, pending=turn.seq[-1],
                       segments=turn.segments, parts=turn.parts, finish_reason=finish,
                       text_ends=turn.text_ends, audio_ends=turn.audio_ends, start=start,
                       next_start=turn.pos, rounds=rounds, text_tokens=turn.text_tokens, frames=turn.frames,
                       text_s=turn.text_s, audio_s=turn.audio_s, first_frame_s=turn.first_frame_s)
