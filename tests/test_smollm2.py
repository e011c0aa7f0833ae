"""Real-weights lane: SmolLM2-135M-Instruct (a plain HF Llama checkpoint with its own chat template)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from omni_edge import pipeline
from omni_edge.generate import SamplingParams

pytestmark = pytest.mark.slow

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def smol(smollm2_dir):
    return pipeline.load(smollm2_dir, dtype="float32", max_context=512)


def test_greedy_answer_fp32_matches_transformers(smol, smollm2_dir):
    reply = smol.session().send(QUESTION, SamplingParams(max_new_tokens=16, temperature=0, repetition_penalty=1.0))
    assert "Paris" in reply.text
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    ref = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    text = tok.apply_chat_template([{"role": "user", "content": QUESTION}], tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    assert ids.shape[1] == reply.prompt_tokens
    with torch.inference_mode():
        out = ref.generate(ids, max_new_tokens=16, do_sample=False, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.eos_token_id)
    ref_ids = out[0, ids.shape[1]:].tolist()
    if ref_ids and ref_ids[-1] == tok.eos_token_id:
        ref_ids = ref_ids[:-1]
    assert reply.ids == ref_ids


def test_multi_turn_chat_template_reuses_the_cache(smol):
    greedy = SamplingParams(max_new_tokens=6, temperature=0, repetition_penalty=1.0)
    s = smol.session()
    s.send(QUESTION, greedy)
    r2 = s.send("And what is the capital of Germany?", greedy)
    assert r2.prefilled_tokens < r2.prompt_tokens // 2  # the first turn came from the cache
    conv = smol.prompt.render(s.messages()[:-1])
    assert len(conv) == r2.prompt_tokens
    bb = smol.backbone  # reference: greedy decoding recomputing the whole conversation for every token
    ids = list(conv)
    with torch.inference_mode():
        for _ in range(len(r2.ids)):
            h = bb.forward(torch.tensor([ids]), start=0)
            ids.append(int(torch.argmax(bb.logits(h[:, -1])[0])))
    assert r2.ids == ids[len(conv):]


def test_greedy_answer_rtn4_through_the_cli(smollm2_dir):
    r = subprocess.run([sys.executable, "-m", "omni_edge", "chat", "--model", str(smollm2_dir), "--prompt", QUESTION,
                        "--temperature", "0", "--quant", "rtn4", "--max-new-tokens", "7", "--max-context", "128",
                        "--stats"],
                       capture_output=True, text=True, encoding="utf-8", timeout=300,
                       env=dict(os.environ, PYTHONIOENCODING="utf-8"))
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    assert "quant rtn4" in r.stderr and "stats: prompt_tokens=" in r.stderr
