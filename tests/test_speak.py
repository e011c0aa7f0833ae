"""The spoken-turn driver (omni_edge/speak.py) against a plain reference loop written the way the demo runs.

The reference below follows `generate_response` + `GenerationAudioTokens._sample`: it keeps one growing
`sequence` list, re-runs a full forward over the whole sequence for every new token (no KV-cache reuse: the
embeddings of every position are rebuilt, audio pads from their frame's codes), samples with HF's processors
written out over the full vocabulary, re-runs the whole 8-slot audio head for each of the 8 codes, and applies
the demo's overwrites (last text token -> audiogen_start, last pad -> audiogen_end). Both sides draw from one
seeded generator in the same order with the same draw rule (one uniform per draw, inverted over the candidates in
descending probability), so sampled runs must agree token for token, code for code.

The tiny checkpoint's random backbone never chooses to stop, so the scripted case adds a fixed bias to the text
logits (eos, ",", audiogen_start) and to the head's end-of-audio logit: stateless, like an lm_head bias, and the
same on both sides. The case is checked to cover every branch: text steps ending by length, by a stop string and by
eos; audio segments ending by the end-of-audio code and by the frame cap; the final eos round.
"""

import re
from dataclasses import replace

import pytest
import torch

from omni_edge.audio_head import AudioHead
from omni_edge.backbone import Backbone
from omni_edge.checkpoint import Checkpoint
from omni_edge.speak import SpeakParams, speak
from omni_edge.tokenizer import BaichuanPrompt, Tokenizer


# ---- setup -------------------------------------------------------------------------------------------

class Model:
    def __init__(self, path):
        ckpt = Checkpoint.open(path)
        self.bb = Backbone.from_checkpoint(ckpt, dtype=torch.float32)
        self.bb.allocate_cache(256)
        self.tok = Tokenizer.from_dir(path)
        self.head = AudioHead.from_checkpoint(ckpt, dtype=torch.float32)
        self.vocab = min(self.tok.vocab_size, ckpt.config.backbone.vocab_size)
        t = self.tok.token_id
        self.ids = {k: t(k) for k in ("<|endoftext|>", "<audiogen_start_baichuan>", "<audiogen_end_baichuan>",
                                      "<audio_pad_baichuan>", "<audiotext_start_baichuan>", "<C_A>")}
        msgs = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Say hello."}]
        self.prompt = BaichuanPrompt(self.tok).render(msgs, add_generation_prompt=False) + [
            self.ids["<audiotext_start_baichuan>"], self.ids["<C_A>"]]
        self.bias = torch.zeros(ckpt.config.backbone.vocab_size)


class Biased:
    """The backbone with a constant bias on the text logits (the driver needs forward, logits, max_len)."""

    def __init__(self, m: Model):
        self.m, self.max_len, self.device = m, m.bb.max_len, m.bb.device

    def forward(self, *a, **k):
        return self.m.bb.forward(*a, **k)

    def logits(self, h):
        return self.m.bb.logits(h) + self.m.bias


@pytest.fixture(scope="module", autouse=True)
def _single_thread(one_thread):  # tests/conftest.py: tiny ops run single-threaded
    yield


@pytest.fixture(scope="module")
def model(tiny_omni):
    return Model(tiny_omni)


def scripted(m: Model):
    m.bias.zero_()
    m.bias[m.ids["<|endoftext|>"]] = 2.5
    m.bias[m.tok.encode(",")[0]] = 3.5
    m.bias[m.ids["<audiogen_start_baichuan>"]] = 3.0
    return 0.8  # added to the head's end-of-audio logit


def small_params() -> SpeakParams:
    p = SpeakParams()
    return replace(p, first_text=replace(p.first_text, max_new_tokens=8),
                   next_text=replace(p.next_text, max_new_tokens=6),
                   audio=replace(p.audio, max_new_tokens=5), max_rounds=5)


def prefill(m: Model):
    h = m.bb.forward(torch.tensor([m.prompt]), start=0)
    return Biased(m).logits(h[0, -1])


# ---- the plain reference -----------------------------------------------------------------------------

def ref_pick(logits, history, p, gen):
    """HF processors (repetition penalty on the history's unique ids, temperature, top-k, top-p) over the whole
    vocabulary, then greedy argmax or one uniform draw inverted over the candidates by descending probability."""
    x = logits.float().clone()
    if len(history):
        h = torch.tensor(sorted(set(int(i) for i in history if 0 <= i < x.numel())), dtype=torch.long)
        s = x[h]
        x[h] = torch.where(s < 0, s * p.repetition_penalty, s / p.repetition_penalty)
    if p.temperature == 0:
        return int(x.argmax())
    x = x / p.temperature
    kth = torch.topk(x, min(p.top_k, x.numel())).values[-1]
    x = x.masked_fill(x < kth, float("-inf"))
    srt, idx = torch.sort(x, descending=False)
    cum = torch.softmax(srt, dim=-1).cumsum(-1)
    drop = cum <= (1 - p.top_p)
    drop[-1] = False
    x[idx[drop]] = float("-inf")
    probs = torch.softmax(x, dim=-1)
    order = torch.argsort(probs, descending=True, stable=True)
    order = order[probs[order] > 0]
    cdf = torch.cumsum(probs[order].double(), dim=0)
    u = torch.rand(1, generator=gen, dtype=torch.float64) * cdf[-1]
    return int(order[torch.searchsorted(cdf, u, right=True).clamp(max=order.numel() - 1)])


def reference_turn(m: Model, params: SpeakParams, seed: int, eos_boost: float):
    E = m.ids
    seq = list(m.prompt)
    codes_at = {}  # position -> codes of the audio pad there
    gen = torch.Generator().manual_seed(seed)
    head = m.head
    bb = Biased(m)

    def last_hidden():
        rows = []
        for pos, t in enumerate(seq):
            if t == E["<audio_pad_baichuan>"] and pos in codes_at:
                rows.append(head.embed_codes(codes_at[pos][None])[0])
            else:
                rows.append(m.bb.embed(torch.tensor([[t]]))[0, 0])
        return m.bb.forward(inputs_embeds=torch.stack(rows)[None], start=0)[0, -1]

    def text_step(p):
        new = []
        while True:
            logits = bb.logits(last_hidden())[:m.vocab]
            t = ref_pick(logits, seq, p, gen)
            seq.append(t)
            new.append(t)
            decoded = m.tok.decode(new, skip_special=False)
            hit = any(s in decoded for s in p.stop_strings)
            if t == E["<|endoftext|>"] or hit or len(new) >= p.max_new_tokens:
                end = "eos" if t == E["<|endoftext|>"] else "stop" if hit else "length"
                return new, end, re.sub(r"<\|endoftext\|>|<audiogen_start_baichuan>|<audiogen_end_baichuan>", "",
                                        decoded)

    def audio_step():
        frames = []
        for _ in range(params.audio.max_new_tokens):
            h = last_hidden()[None]
            tokens = torch.zeros(1, 8, dtype=torch.long)
            for i in range(8):
                logits = head.full_logits(h, tokens)[i][0]
                if i == 0:
                    logits[head.eos_code] += eos_boost
                else:
                    logits = logits[:-1]
                tokens[0, i] = ref_pick(logits, [f[i] for f in frames], params.audio, gen)
            seq.append(E["<audio_pad_baichuan>"])
            codes_at[len(seq) - 1] = tokens[0].clone()
            frames.append(tokens[0].clone())
            if int(tokens[0, 0]) == head.eos_code:
                break
        n = next((k for k, f in enumerate(frames) if int(f[0]) == head.eos_code), len(frames))
        audio_ends.append("eos" if n < len(frames) else "length")
        return torch.stack(frames[:n]) if n else torch.zeros(0, 8, dtype=torch.long), len(frames)

    text, segs, n_frames, audio_ends = "", [], 0, []
    new, end, piece = text_step(params.first_text)
    text += piece
    ends, pieces, kinds = [end], [piece], ["text"]
    finish = "rounds"
    for _ in range(params.max_rounds):
        if new[-1] == E["<|endoftext|>"]:
            if len(new) > 1:
                seq[-1] = E["<audiogen_start_baichuan>"]
                seg, n = audio_step()
                segs.append(seg)
                kinds.append("audio")
                n_frames += n
            finish = "eos"
            break
        seq[-1] = E["<audiogen_start_baichuan>"]
        seg, n = audio_step()
        segs.append(seg)
        kinds.append("audio")
        n_frames += n
        seq[-1] = E["<audiogen_end_baichuan>"]
        new, end, piece = text_step(params.next_text)
        ends.append(end)
        pieces.append(piece)
        kinds.append("text")
        text += piece
    fed = [(t, tuple(codes_at[k].tolist())) if t == E["<audio_pad_baichuan>"] and k in codes_at else t
           for k, t in enumerate(seq) if len(m.prompt) <= k < len(seq) - 1]
    return dict(fed=fed, pending=seq[-1], segments=segs, text=text, finish=finish, frames=n_frames, ends=ends,
                audio_ends=audio_ends, pieces=pieces, kinds=kinds)


def run_driver(m: Model, params, seed, eos_boost, **kw):
    logits = prefill(m)
    head = m.head
    head.heads_b[0][head.eos_code] += eos_boost
    try:
        return speak(Biased(m), head, m.tok, start=len(m.prompt), logits=logits, context=m.prompt,
                     params=params, seed=seed, **kw)
    finally:
        head.heads_b[0][head.eos_code] -= eos_boost


def compare(reply, ref):
    assert reply.fed == ref["fed"]
    assert reply.pending == ref["pending"]
    assert len(reply.segments) == len(ref["segments"])
    for a, b in zip(reply.segments, ref["segments"]):
        assert torch.equal(a, b)
    assert reply.text == ref["text"]
    assert reply.finish_reason == ref["finish"]
    assert reply.frames == ref["frames"]
    assert reply.text_ends == ref["ends"] and reply.audio_ends == ref["audio_ends"]
    assert [v for k, v in reply.parts if k == "text"] == ref["pieces"]
    assert [k for k, _ in reply.parts] == ref["kinds"]


# ---- tests -------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_sampled_turn_matches_reference_loop(model):
    """Seeded sampling with the demo's settings (small caps): the fed ids, pad codes, segment codes, text and
    finish are the reference's, and the scripted case walks every branch of the alternation."""
    boost = scripted(model)
    params = small_params()
    frames, texts, clause_ends = [], [], []
    reply = run_driver(model, params, 2, boost, on_text=texts.append, on_audio_frame=frames.append,
                       on_clause_end=lambda: clause_ends.append(len(frames)))
    ref = reference_turn(model, params, 2, boost)
    compare(reply, ref)
    # the script covers: text steps ended by length, by a stop string and by eos; segments ended by the
    # end-of-audio code (fewer frames than the cap) and by the cap; the final eos round with audio
    assert {"length", "stop", "eos"} <= set(ref["ends"]), ref["ends"]
    assert {"length", "eos"} <= set(ref["audio_ends"]), ref["audio_ends"]
    lens = [s.shape[0] for s in reply.segments]
    assert reply.finish_reason == "eos" and ref["ends"][-1] == "eos"
    # callbacks: every non-end frame once, in order; a clause end after each segment; text streamed whole
    assert torch.equal(torch.stack(frames), torch.cat(reply.segments))
    assert clause_ends == list(torch.cumsum(torch.tensor(lens), 0).tolist())
    assert "".join(texts) == reply.text
    # the KV cache holds prompt + fed: positions add up, and the last token is not fed
    assert reply.next_start == len(model.prompt) + len(reply.fed)
    ids = model.ids
    assert [f for f in reply.fed if isinstance(f, int)].count(ids["<audiogen_start_baichuan>"]) == len(lens)
    assert [p for p in reply.parts if p[0] == "audio"] == [("audio", i) for i in range(len(lens))]


def test_greedy_turn_matches_reference_loop(model):
    boost = scripted(model)
    model.bias[model.ids["<|endoftext|>"]] = -1e4  # greedy would end at once otherwise: walk two rounds
    params = replace(small_params(), max_rounds=2).greedy()
    reply = run_driver(model, params, 0, boost)
    ref = reference_turn(model, params, 0, boost)
    compare(reply, ref)
    assert reply.finish_reason == "rounds" and reply.rounds == 2 and len(reply.segments) == 2


def test_audio_frame_cap_and_end_of_audio(model):
    """A segment stops at the frame cap (the last frame's pad is not fed) or at code_0 == cb_0 (the end frame is
    neither returned nor handed to on_audio_frame); no lm_head call happens during audio steps."""
    scripted(model)
    model.bias[model.ids["<|endoftext|>"]] = -1e4  # no early end of the turn
    calls = []

    class Counting(Biased):
        def logits(self, h):
            calls.append(1)
            return super().logits(h)

    params = replace(small_params(), max_rounds=1, audio=replace(small_params().audio, max_new_tokens=3))
    logits = prefill(model)
    model.head.heads_b[0][model.head.eos_code] -= 1e4  # never end: the cap decides
    try:
        r = speak(Counting(model), model.head, model.tok, start=len(model.prompt), logits=logits,
                  context=model.prompt, params=params, seed=1)
    finally:
        model.head.heads_b[0][model.head.eos_code] += 1e4
    assert [s.shape[0] for s in r.segments] == [3] and r.frames == 3
    assert r.finish_reason == "rounds" and r.rounds == 1 and r.audio_ends == ["length"]
    pads = [f for f in r.fed if isinstance(f, tuple)]
    assert len(pads) == 2  # frames 1 and 2 fed; frame 3's pad became audiogen_end
    gs, ge = model.ids["<audiogen_start_baichuan>"], model.ids["<audiogen_end_baichuan>"]
    k = r.fed.index(gs)
    assert r.fed[k + 1:k + 3] == pads and r.fed[k + 3] == ge
    assert len(calls) == r.text_tokens - 1  # one lm_head call per fed text position (the first came given)

    model.head.heads_b[0][model.head.eos_code] += 1e4  # end at once
    try:
        seen = []
        r = speak(Biased(model), model.head, model.tok, start=len(model.prompt), logits=logits,
                  context=model.prompt, params=params, seed=1, on_audio_frame=seen.append)
    finally:
        model.head.heads_b[0][model.head.eos_code] -= 1e4
    assert [s.shape[0] for s in r.segments] == [0] and r.frames == 1 and seen == []
    k = r.fed.index(gs)
    assert r.fed[k + 1] == ge  # the end frame's pad is never fed: overwritten by audiogen_end


def test_context_full_stops_cleanly(model):
    scripted(model)
    logits = prefill(model)
    small = Biased(model)
    small.max_len = len(model.prompt) + 4
    r = speak(small, model.head, model.tok, start=len(model.prompt), logits=logits, context=model.prompt,
              params=small_params(), seed=0)
    assert r.finish_reason == "context" and r.next_start == small.max_len == len(model.prompt) + len(r.fed)


def test_bad_arguments(model):
    logits = prefill(model)
    bb = Biased(model)
    with pytest.raises(ValueError, match="context: expected the"):
        speak(bb, model.head, model.tok, start=len(model.prompt), logits=logits, context=model.prompt[:-1])
    with pytest.raises(ValueError, match="logits: expected"):
        speak(bb, model.head, model.tok, start=len(model.prompt), logits=logits[None], context=model.prompt)
    with pytest.raises(ValueError, match="max_rounds"):
        speak(bb, model.head, model.tok, start=len(model.prompt), logits=logits, context=model.prompt,
              params=replace(SpeakParams(), max_rounds=0))
    with pytest.raises(ValueError, match="exceeds the KV cache"):
        speak(bb, model.head, model.tok, start=10_000, logits=logits, context=[0] * 10_000)


def test_default_settings_are_the_demo_settings():
    """MODEL.md §2.3: the numbers the reference demo passes to generate."""
    p = SpeakParams()
    f, n, a = p.first_text, p.next_text, p.audio
    assert (f.max_new_tokens, f.temperature, f.top_k, f.top_p, f.repetition_penalty) == (50, 0.8, 20, 0.85, 1.1)
    assert f.stop_strings == ("<audiogen_start_baichuan>", "<|endoftext|>")
    assert (n.max_new_tokens, n.temperature, n.top_k, n.top_p, n.repetition_penalty) == (50, 0.3, 20, 0.85, 1.05)
    assert n.stop_strings == ("<audiogen_start_baichuan>", ",", "!", "?", "，", "。", "！", "？", ". ")
    assert (a.max_new_tokens, a.temperature, a.top_k, a.top_p, a.repetition_penalty) == (500, 0.5, 5, 0.85, 1.3)
    assert p.max_rounds == 100
    g = p.greedy()
    assert g.first_text.temperature == g.next_text.temperature == g.audio.temperature == 0
    assert g.audio.repetition_penalty == 1.3  # HF applies the penalty in greedy mode too
