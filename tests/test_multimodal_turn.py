"""The multimodal turn, independent of any media stage: span expansion in the Baichuan prompt, prefill on
input embeddings with media rows replacing the pad rows, KV-cache reuse keyed by media content, the hidden-state
hand-out, and the errors of a text-only model. Media items here are stand-ins with a token count and a digest;
their rows come from a seeded generator per digest, so a wrong row placement or a stale cached row changes the
logits. The real vision and audio stages are tested end to end in their own files."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import List, Optional

import pytest
import torch

from omni_edge import pipeline
from omni_edge.generate import SamplingParams
from omni_edge.tokenizer import Rendered

GREEDY = SamplingParams(max_new_tokens=6, temperature=0, repetition_penalty=1.0)


@dataclass
class Item:
    source: str
    n_tokens: int
    frame_tokens: Optional[List[int]] = None

    @property
    def digest(self) -> str:
        return hashlib.sha256(f"{self.source}:{self.n_tokens}:{self.frame_tokens}".encode()).hexdigest()


class FakeStage:
    """Rows (n_tokens, C) drawn from a generator seeded by the digest; counts calls."""

    def __init__(self, hidden: int):
        self.hidden = hidden
        self.calls = 0

    def rows(self, digest: str, n: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(int(digest[:8], 16))
        return torch.randn(n, self.hidden, generator=g) * 0.5

    def __call__(self, spans):
        self.calls += 1
        return [self.rows(sp.digest, sp.n_tokens) for sp in spans]


@pytest.fixture(scope="module")
def model(tiny_omni):
    return pipeline.load(tiny_omni, dtype="float32", max_context=256)


def session(model, stage):
    s = model.session(seed=0)
    s.embed_media = stage
    return s


def image(name, n=4):
    return {"type": "image", "image": Item(name, n)}


def reference_greedy(model, stage, rendered: Rendered, n: int) -> List[int]:
    """Greedy decoding by whole-sequence forwards from position 0 on explicitly built embeddings."""
    bb = model.backbone
    ids = list(rendered.ids)
    out = []
    with torch.inference_mode():
        for _ in range(n):
            emb = bb.embed(torch.tensor([ids]))
            for sp in rendered.spans:
                rows, r = stage.rows(sp.digest, sp.n_tokens), 0
                for a, k in sp.segments:
                    emb[0, a:a + k] = rows[r:r + k]
                    r += k
            h = bb.forward(inputs_embeds=emb, start=0)
            t = int(torch.argmax(bb.logits(h[:, -1])[0]))
            out.append(t)
            ids.append(t)
    return out


def test_image_video_audio_spans_use_the_checkpoints_ids(model):
    tok, p = model.tokenizer, model.prompt
    video = Item("clip.mp4", 7, frame_tokens=[3, 4])
    msgs = [{"role": "user", "content": [image("a.png", 4), {"type": "video", "video": video},
                                         {"type": "audio", "audio": Item("q.wav", 5)},
                                         {"type": "text", "text": "hi"}], "speak": True}]
    r = p.render_spans(msgs)
    t = tok.token_id
    img = [t("<img_start_baichuan>")] + [t("<img_pad_baichuan>")] * 4 + [t("<img_end_baichuan>")]
    vid = ([t("<img_start_baichuan>")] + [t("<video_palce_baichuan>")] * 3 + [t("<img_end_baichuan>")]
           + [t("<img_start_baichuan>")] + [t("<video_palce_baichuan>")] * 4 + [t("<img_end_baichuan>")])
    aud = [t("<audio_start_baichuan>")] + [t("<audio_pad_baichuan>")] * 5 + [t("<audio_end_baichuan>")]
    want = ([t("<B_SYS>"), t("<C_Q>")] + img + vid + aud + tok.encode("hi")
            + [t("<audiotext_start_baichuan>"), t("<C_A>")])
    assert r.ids == want
    assert t("<video_start_baichuan>") not in r.ids and t("<video_end_baichuan>") not in r.ids
    assert [sp.kind for sp in r.spans] == ["image", "video", "audio"]
    assert r.spans[0].segments == [(3, 4)]
    assert r.spans[1].segments == [(9, 3), (14, 4)]
    assert r.spans[2].segments == [(20, 5)]
    for sp in r.spans:  # every span position holds a pad id
        pads = {r.ids[a] for a, n in sp.segments for a in range(a, a + n)}
        assert len(pads) == 1
    keys = r.keys()
    assert keys[3] == (t("<img_pad_baichuan>"), r.spans[0].digest, 0) and keys[0] == t("<B_SYS>")


def test_image_reply_equals_a_full_forward_on_explicit_embeddings(model):
    stage = FakeStage(model.config.backbone.hidden_size)
    s = session(model, stage)
    content = [image("cat.png", 6), {"type": "text", "text": "What is this?"}]
    rendered = s.render(content)
    reply = s.send(content, GREEDY)
    assert reply.ids == reference_greedy(model, stage, rendered, GREEDY.max_new_tokens)
    assert reply.media_tokens == {"image": 6} and stage.calls == 1


def test_different_image_same_ids_never_reuses_the_cache(model):
    stage = FakeStage(model.config.backbone.hidden_size)
    s = session(model, stage)
    s.send([image("one.png"), {"type": "text", "text": "Describe."}], GREEDY)
    first_prompt = s.render().ids[:-1]  # the conversation so far (turn 1 and its reply; no <C_A>)
    s.reset()
    # Same token ids, another image: the cache must be refilled from the first pad, not reused.
    s2 = session(model, stage)
    s2.send([image("one.png"), {"type": "text", "text": "Describe."}], GREEDY)
    s2.history[0]["content"][0] = image("two.png")  # an edited image with the same size
    content = [{"type": "text", "text": "And now?"}]
    rendered = s2.render(content)
    reply = s2.send(content, GREEDY)
    assert rendered.ids[:len(first_prompt)] == first_prompt
    pad0 = rendered.spans[0].segments[0][0]
    assert reply.prefilled_tokens == len(rendered.ids) - pad0
    assert reply.ids == reference_greedy(model, stage, rendered, GREEDY.max_new_tokens)


def test_same_image_next_turn_prefills_only_the_new_text(model):
    stage = FakeStage(model.config.backbone.hidden_size)
    s = session(model, stage)
    s.send([image("dog.png"), {"type": "text", "text": "Describe."}], GREEDY)
    calls = stage.calls
    content = "Shorter, please."
    rendered = s.render(content)
    reply = s.send(content, GREEDY)
    cached_len = len(rendered.ids) - reply.prefilled_tokens
    assert cached_len > rendered.spans[0].segments[0][0] + 4  # the image rows came from the cache
    assert stage.calls == calls  # and the stage did not run again
    assert reply.ids == reference_greedy(model, stage, rendered, GREEDY.max_new_tokens)


def test_on_hidden_hands_out_the_final_hidden_state_per_token(model):
    s = model.session(seed=0)
    seen = []
    reply = s.send("Hello there", GREEDY, on_hidden=lambda h: seen.append(h.clone()))
    assert len(seen) == reply.new_tokens
    ids = s.render().ids[:-1]  # prompt + reply (no trailing <C_A>)
    with torch.inference_mode():
        h = model.backbone.forward(torch.tensor([ids]), start=0)[0]
    first = len(ids) - reply.new_tokens - 1  # the last prompt position chose the first token
    for j, got in enumerate(seen):
        torch.testing.assert_close(got, h[first + j], rtol=1e-4, atol=1e-4)


def test_media_errors_leave_the_session_unchanged(model):
    s = model.session(seed=0)
    s.send("Hi", GREEDY)
    before = (list(s.cached), len(s.history))

    def broken(spans):
        raise ValueError("stage exploded")
    s.embed_media = broken
    with pytest.raises(ValueError, match="stage exploded"):
        s.send([image("x.png"), {"type": "text", "text": "?"}], GREEDY)
    assert len(s.history) == before[1]
    s.embed_media = FakeStage(model.config.backbone.hidden_size)
    reply = s.send("Still there?", GREEDY)
    assert reply.new_tokens == GREEDY.max_new_tokens


def test_bad_parts_are_clear_errors(model):
    s = model.session(seed=0)
    with pytest.raises(ValueError, match="part type must be one of"):
        s.send([{"type": "picture", "picture": 1}], GREEDY)
    with pytest.raises(ValueError, match="needs a prepared image item"):
        s.send([{"type": "image", "image": "cat.png"}], GREEDY)
    with pytest.raises(ValueError, match="unknown|must be one of"):
        model.load_media("hologram", "x")


def test_text_model_refuses_media_before_anything_runs(tmp_path):
    from tiny_hf import write_tiny_qwen2  # transformers, imported only here
    path = write_tiny_qwen2(str(tmp_path / "qwen2"))
    m = pipeline.load(path, dtype="float32", max_context=64)
    assert m.media_kinds() == []
    with pytest.raises(ValueError, match="plain text model"):
        m.load_media("image", tmp_path / "does-not-matter.png")
    s = m.session(seed=0)
    with pytest.raises(ValueError, match="text model"):
        s.send([image("a.png"), {"type": "text", "text": "hi"}], GREEDY)
    assert s.history == []
