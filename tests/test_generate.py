"""Generation: greedy and sampling, stop conditions, context limits, and KV-cache reuse across turns, on the
tiny Baichuan-Omni checkpoint (real Qwen2 vocabulary, random weights) in fp32."""

from __future__ import annotations

import pytest
import torch

from omni_edge import pipeline
from omni_edge.generate import ChatSession, Sampler, SamplingParams, apply_repetition_penalty

N = 8
GREEDY = SamplingParams(max_new_tokens=N, temperature=0, repetition_penalty=1.0)


@pytest.fixture(scope="module")
def model(tiny_omni):
    return pipeline.load(tiny_omni, dtype="float32", max_context=256)


class Recorder:
    """Wraps a backbone and keeps a copy of every logits row the session computes."""

    def __init__(self, backbone, force=None):
        self.bb = backbone
        self.logits_seen = []
        self.force = force or {}  # call number -> token id to force (logit +1e9)

    @property
    def max_len(self):
        return self.bb.max_len

    def forward(self, *args, **kwargs):
        return self.bb.forward(*args, **kwargs)

    def logits(self, hidden):
        out = self.bb.logits(hidden)
        n = len(self.logits_seen)
        if n in self.force:
            out[..., self.force[n]] += 1e9
        self.logits_seen.append(out.detach().clone())
        return out


def session(model, backbone=None, **kw):
    return ChatSession(backbone or model.backbone, model.tokenizer, model.prompt, device="cpu",
                       vocab_size=model.config.backbone.vocab_size, **kw)


def argmax_loop(bb, ids, n):
    """Reference greedy decoding: recompute the whole sequence from position 0 for every token."""
    ids = list(ids)
    out = []
    with torch.inference_mode():
        for _ in range(n):
            h = bb.forward(torch.tensor([ids]), start=0)
            t = int(torch.argmax(bb.logits(h[:, -1])[0]))
            out.append(t)
            ids.append(t)
    return out


def fresh_logits(bb, ids):
    with torch.inference_mode():
        return bb.logits(bb.forward(torch.tensor([ids]), start=0)[:, -1])[0]


# ---- greedy and sampling -----------------------------------------------------------------------------

def test_greedy_equals_argmax_loop(model):
    s = session(model)
    reply = s.send("What is the capital of France?", GREEDY)
    assert reply.finish_reason == "length" and reply.new_tokens == N
    prompt = model.prompt.render([{"role": "user", "content": "What is the capital of France?"}])
    assert reply.ids == argmax_loop(model.backbone, prompt, N)
    assert reply.text == model.tokenizer.decode(reply.ids)
    assert len(reply.step_s) == N - 1  # one forward per token except the last, which is never fed


def test_sampling_is_reproducible_with_a_seed(model):
    p = SamplingParams(max_new_tokens=N, temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0)
    a = session(model, seed=123).send("Tell me a story.", p).ids
    b = session(model, seed=123).send("Tell me a story.", p).ids
    c = session(model, seed=7).send("Tell me a story.", p).ids
    assert a == b
    assert a != c  # random weights give a flat distribution: two seeds agreeing on 8 tokens is ~impossible
    s = session(model, seed=123)
    first = s.send("Tell me a story.", p).ids
    s.reset()  # the RNG restarts from the seed
    assert s.send("Tell me a story.", p).ids == first == a


def test_top_k_1_and_tiny_top_p_are_greedy(model):
    greedy = session(model).send("Hello!", GREEDY).ids
    for seed, p in ((0, SamplingParams(max_new_tokens=N, temperature=1.5, top_k=1, top_p=1.0, repetition_penalty=1.0)),
                    (1, SamplingParams(max_new_tokens=N, temperature=1.5, top_k=0, top_p=1e-6, repetition_penalty=1.0))):
        assert session(model, seed=seed).send("Hello!", p).ids == greedy


def test_candidates_match_transformers_warpers():
    """Independent reference: transformers' logits processors (repetition penalty, temperature, top-k, top-p)."""
    lp = pytest.importorskip("transformers.generation.logits_process")
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        vocab = 50
        logits = torch.randn(vocab, generator=g) * 3
        context = torch.randint(0, vocab, (12,), generator=g)
        top_k = [0, 1, 5, 20][trial % 4]
        top_p = [1.0, 0.85, 0.5, 0.3, 0.99][trial % 5]
        params = SamplingParams(temperature=0.7, top_k=top_k, top_p=top_p, repetition_penalty=1.3)
        sampler = Sampler(params, vocab, "cpu", capacity=32)
        sampler.set_context(context.tolist())
        values, index = sampler.candidates(logits.clone())
        ours = torch.zeros(vocab)
        ours[index] = torch.softmax(values, dim=-1)

        scores = logits.clone()[None]
        scores = lp.RepetitionPenaltyLogitsProcessor(1.3)(context[None], scores)
        scores = lp.TemperatureLogitsWarper(0.7)(context[None], scores)
        if top_k:
            scores = lp.TopKLogitsWarper(top_k)(context[None], scores)
        if top_p < 1:
            scores = lp.TopPLogitsWarper(top_p)(context[None], scores)
        ref = torch.softmax(scores[0], dim=-1)
        assert torch.equal(ours > 0, ref > 0), f"trial {trial}: different candidate sets"
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


def test_sampling_frequencies_follow_the_nucleus():
    # probabilities 0.5, 0.3, 0.15, 0.05: top-p 0.85 keeps the first three (the tokens above the fourth hold 0.95)
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    params = SamplingParams(temperature=1.0, top_k=0, top_p=0.85, repetition_penalty=1.0)
    sampler = Sampler(params, 4, "cpu", capacity=4, seed=0)
    n = 20000
    counts = torch.zeros(4)
    for _ in range(n):
        counts[int(sampler.sample(probs.log().clone()))] += 1
    assert counts[3] == 0
    expected = probs[:3] / probs[:3].sum()
    # binomial standard error at n=20000 is <= 0.0036: 0.015 is > 4 sigma
    torch.testing.assert_close(counts[:3] / n, expected, atol=0.015, rtol=0)


def test_repetition_penalty_hand_computed():
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0, -4.0])
    out = apply_repetition_penalty(logits.clone(), torch.tensor([0, 1, 1, 4]), 2.0)
    assert torch.equal(out, torch.tensor([1.0, -2.0, 0.5, 3.0, -8.0]))
    # greedy with the penalty: token 3 (3.0) wins at first; once it is in the context it drops to 1.5 < 2.0
    params = SamplingParams(temperature=0, repetition_penalty=2.0)
    s = Sampler(params, 5, "cpu", capacity=8)
    s.set_context([1])
    assert int(s.sample(logits.clone())) == 3
    s.observe(torch.tensor([3]))
    assert int(s.sample(logits.clone())) == 0


def test_sampling_params_validation():
    for bad in (dict(temperature=-1), dict(top_k=-1), dict(top_p=0), dict(top_p=1.5), dict(max_new_tokens=0),
                dict(repetition_penalty=0), dict(stop_strings=("",))):
        with pytest.raises(ValueError):
            SamplingParams(**bad).validate()


# ---- stop conditions -----------------------------------------------------------------------------------

def test_stop_on_eos_from_the_checkpoint(model):
    eos = model.tokenizer.token_id("<|endoftext|>")
    rec = Recorder(model.backbone, force={4: eos})  # prefill = call 0, so the 5th token is eos
    pieces = []
    reply = session(model, rec).send("Hi", GREEDY, on_text=pieces.append)
    assert reply.finish_reason == "stop" and reply.new_tokens == 4
    assert eos not in reply.ids and "<|endoftext|>" not in reply.text
    assert "".join(pieces) == reply.text
    assert len(reply.step_s) == 4  # each of the 4 reply tokens was fed to get the next logits


def test_stop_on_extra_stop_token(model):
    ref = session(model).send("Hi", GREEDY).ids
    k = next(i for i in range(1, len(ref)) if ref[i] not in ref[:i])
    p = SamplingParams(max_new_tokens=N, temperature=0, repetition_penalty=1.0, stop_ids=(ref[k],))
    reply = session(model).send("Hi", p)
    assert reply.ids == ref[:k] and reply.finish_reason == "stop"


def test_stop_string_is_cut_and_never_streamed(model):
    ref = session(model).send("Tell me a story.", GREEDY)
    text = ref.text
    assert len(text) > 12
    a = len(text) // 2
    stop = text[a:a + 4]
    a = text.index(stop)  # first occurrence
    p = SamplingParams(max_new_tokens=N, temperature=0, repetition_penalty=1.0, stop_strings=("zzzqqq", stop))
    pieces = []
    reply = session(model).send("Tell me a story.", p, on_text=pieces.append)
    assert reply.text == text[:a] and reply.finish_reason == "stop"
    assert "".join(pieces) == text[:a]


def test_max_new_tokens(model):
    reply = session(model).send("Hi", SamplingParams(max_new_tokens=3))
    assert reply.new_tokens == 3 and reply.finish_reason == "length"


# ---- context ---------------------------------------------------------------------------------------------

def test_context_overflow_is_a_clear_error_and_the_session_goes_on(model):
    s = session(model)
    long_prompt = "word " * 300
    n = len(model.prompt.render([{"role": "user", "content": long_prompt}]))
    with pytest.raises(ValueError) as e:
        s.send(long_prompt, GREEDY)
    msg = str(e.value)
    assert f"{n} tokens" in msg and f"max_new_tokens ({N})" in msg and "256 tokens" in msg
    assert s.history == []
    assert s.send("Hi", GREEDY).new_tokens == N  # still usable


def test_reply_budget_is_clipped_to_the_context_with_a_notice(model):
    s = session(model)
    seen = []
    reply = s.send("Hi", SamplingParams(max_new_tokens=1000, temperature=0, repetition_penalty=1.0),
                   on_notice=seen.append)
    n = reply.prompt_tokens
    assert reply.max_new_tokens == 256 - n and seen == reply.notices
    assert seen == [f"reply limited to {256 - n} tokens: the prompt takes {n} of the 256-token context"]
    assert reply.new_tokens <= 256 - n


def test_full_context_drops_the_oldest_exchange_or_refuses(model):
    s = session(model, system="Be brief.")
    for text in ("first " * 90, "second " * 90):
        s.send(text, GREEDY)
    third = "third " * 90
    s.context_policy = "refuse"
    with pytest.raises(ValueError, match="/reset"):
        s.send(third, GREEDY)
    assert len(s.history) == 4  # unchanged
    s.context_policy = "drop-oldest"
    reply = s.send(third, GREEDY)
    assert any("dropped the oldest 1 exchange" in t for t in reply.notices)
    assert [m["content"] for m in s.history if m["role"] == "user"] == ["second " * 90, third]
    # the reply equals a fresh session's reply to the kept conversation
    fresh = session(model, system="Be brief.")
    fresh.history = s.history[:2]
    assert fresh.send(third, GREEDY).ids == reply.ids


def test_non_finite_logits_are_an_error_not_an_empty_reply(model):
    class Poisoned(Recorder):
        def logits(self, hidden):
            return torch.full_like(self.bb.logits(hidden), float("nan"))

    s = session(model, backbone=Poisoned(model.backbone))
    with pytest.raises(ValueError, match="non-finite logits"):
        s.send("Hi", GREEDY)
    assert s.history == []


def test_multi_turn_reuses_the_cache_and_matches_a_fresh_prefill(model):
    rec = Recorder(model.backbone)
    s = session(model, rec, system="Be brief.")
    r1 = s.send("What is the capital of France?", GREEDY)
    n1 = len(rec.logits_seen)
    r2 = s.send("And of Germany?", GREEDY)
    assert r2.prompt_tokens > r1.prompt_tokens + r1.new_tokens
    # only the last reply token (never fed), "<C_Q>And of Germany?<C_A>" are prefilled
    turn = model.prompt.render([{"role": "user", "content": "And of Germany?"}])[1:]  # drop <B_SYS>
    assert r2.prefilled_tokens == 1 + len(turn)
    conv = model.prompt.render(s.messages()[:-1])  # the conversation up to the second question
    assert len(conv) == r2.prompt_tokens
    # logits after the cached prefill == logits of a fresh prefill of the whole conversation
    torch.testing.assert_close(rec.logits_seen[n1][0], fresh_logits(model.backbone, conv), rtol=1e-4, atol=1e-4)
    assert r2.ids == argmax_loop(model.backbone, conv, N)


def test_interrupted_reply_keeps_the_session_consistent(model):
    rec = Recorder(model.backbone)
    s = session(model, rec)
    count = 0

    def stop_after_three(piece):
        nonlocal count
        count += 1
        if count == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        s.send("Tell me a story.", GREEDY, on_text=stop_after_three)
    assert s.history[-1]["role"] == "assistant" and 1 <= len(s.history[-1]["ids"]) <= N
    n = len(rec.logits_seen)
    r = s.send("Go on.", GREEDY)
    conv = model.prompt.render(s.messages()[:-1])
    torch.testing.assert_close(rec.logits_seen[n][0], fresh_logits(model.backbone, conv[:r.prompt_tokens]),
                               rtol=1e-4, atol=1e-4)


def test_two_sessions_share_one_cache_safely(model):
    a, b = session(model), session(model)
    a.send("First question?", GREEDY)
    b.send("Something else entirely.", GREEDY)
    r = a.send("Second question?", GREEDY)
    assert r.prefilled_tokens == r.prompt_tokens  # b overwrote the cache: a re-prefills its conversation
    conv = model.prompt.render(a.messages()[:-1])
    assert r.ids == argmax_loop(model.backbone, conv[:r.prompt_tokens], N)


def test_system_prompt_change_reprefills_from_the_change(model):
    s = session(model, system="Be brief.")
    s.send("Hi", GREEDY)
    s.system = "Be verbose."
    r = s.send("Hi again", GREEDY)
    shared = model.prompt.render([{"role": "system", "content": "Be"}], add_generation_prompt=False)
    assert shared == model.prompt.render([{"role": "system", "content": "Be verbose."}])[:len(shared)]
    assert r.prefilled_tokens == r.prompt_tokens - len(shared)  # "<B_SYS>Be" is kept, the rest re-prefilled


@pytest.mark.usefixtures("q4_exact")
def test_rtn4_session_runs(tiny_omni):
    m = pipeline.load(tiny_omni, dtype="float32", quant="rtn4", max_context=128)
    r = m.session(seed=0).send("Hi", GREEDY)
    # the reply is the 4-bit model's own greedy continuation, recomputed from position 0 for every token, up to
    # the first stop token (excluded from ids) or N tokens
    ref = argmax_loop(m.backbone, m.prompt.render([{"role": "user", "content": "Hi"}]), N)
    assert r.ids == ref[:len(r.ids)]
    if r.finish_reason == "stop":
        assert ref[len(r.ids)] in m.prompt.stop_ids
    else:
        assert r.finish_reason == "length" and len(r.ids) == N
    assert m.describe()["quant"] == "rtn4 (asym, group 32)"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_cuda_greedy_matches_cpu_and_sampling_is_seeded(tiny_omni, model):
    m = pipeline.load(tiny_omni, device="cuda", dtype="float32", max_context=256)
    q = "What is the capital of France?"
    # fp32 on both devices; random-weight logits are well separated, so greedy tokens agree exactly
    assert m.session().send(q, GREEDY).ids == session(model).send(q, GREEDY).ids
    p = SamplingParams(max_new_tokens=N)
    assert m.session(seed=5).send(q, p).ids == m.session(seed=5).send(q, p).ids
    s = m.session()
    s.send(q, GREEDY)
    r2 = s.send("And of Germany?", GREEDY)
    assert r2.prefilled_tokens < r2.prompt_tokens
