"""Audio input path at the released sizes, random weights: front end, encoder (+ bridge), RVQ encode.

Peers measured in the same run, same threads:
- encoder: omni-edge torch (varlen over the valid frames) and onnxruntime (audio_encoder.onnx, fp32) against
  transformers' WhisperEncoder on the same weights (which always runs the 30 s, 3000-frame window);
- RVQ encode (8 codebooks 8192/4096/2048/1024 x 5, dim 5120, fp32): achieved GFLOP/s of the 2 T D sum(n)
  screening work against this machine's fp32 matmul rate measured here, and torch's cdist + argmin (the
  reference's method) as a peer.

The encoder keeps the real widths (d 1280, 20 heads, FFN 5120, 128 mels) but only `--layers` of its 32 layers
(default 4) to keep the run short; per-layer time scales linearly, so the 32-layer time is about
conv + 8 x (4-layer time - conv). Usage:
    python benchmarks/bench_audio_in.py [--threads 2] [--layers 4] [--repeat 3] [--no-onnx]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from omni_edge import audio_in, audio_io  # noqa: E402
from omni_edge.ops import rvq  # noqa: E402

D_MODEL, HEADS, FFN, MELS, POOL = 1280, 20, 5120, 128, 4
SIZES = (8192, 4096, 2048, 1024, 1024, 1024, 1024, 1024)


def timeit(fn, repeat: int, warmup: int = 1):
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts), min(ts), max(ts)


def fmt(t):
    return f"{t[0] * 1e3:9.1f} ms (min {t[1] * 1e3:.1f}, max {t[2] * 1e3:.1f})"


def matmul_rate(repeat: int) -> float:
    a, b = torch.randn(384, 5120), torch.randn(4096, 5120)
    t = timeit(lambda: a @ b.t(), repeat, warmup=2)
    return 2 * 384 * 5120 * 4096 / t[0] / 1e9


def build_weights(layers: int):
    from omni_edge.testing import random_tensor, sinusoids

    p = "audio_tokenizer.audio_model."
    t = {p + "conv1.weight": (D_MODEL, MELS, 3), p + "conv1.bias": (D_MODEL,),
         p + "conv2.weight": (D_MODEL, D_MODEL, 3), p + "conv2.bias": (D_MODEL,),
         p + "layer_norm.weight": (D_MODEL,), p + "layer_norm.bias": (D_MODEL,)}
    for n in range(layers):
        q = f"{p}layers.{n}."
        for name in ("q_proj", "v_proj", "out_proj"):
            t[q + f"self_attn.{name}.weight"] = (D_MODEL, D_MODEL)
            t[q + f"self_attn.{name}.bias"] = (D_MODEL,)
        t[q + "self_attn.k_proj.weight"] = (D_MODEL, D_MODEL)
        for name in ("self_attn_layer_norm", "final_layer_norm"):
            t[q + name + ".weight"], t[q + name + ".bias"] = (D_MODEL,), (D_MODEL,)
        t[q + "fc1.weight"], t[q + "fc1.bias"] = (FFN, D_MODEL), (FFN,)
        t[q + "fc2.weight"], t[q + "fc2.bias"] = (D_MODEL, FFN), (D_MODEL,)
    b = "audio_tokenizer.audio_bridge_model."
    big = D_MODEL * POOL
    t.update({b + "gate_proj.weight": (big, D_MODEL, POOL), b + "up_proj.weight": (big, D_MODEL, POOL),
              b + "down_proj.weight": (big, big), b + "layer_norm.weight": (big,), b + "layer_norm.bias": (big,)})
    out = {k: random_tensor(k, s) for k, s in t.items()}
    out[p + "positional_embedding"] = sinusoids(1500, D_MODEL).bfloat16().float()
    return out


def hf_encoder(tensors, layers: int):
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    cfg = WhisperConfig(num_mel_bins=MELS, d_model=D_MODEL, encoder_layers=layers, encoder_attention_heads=HEADS,
                        encoder_ffn_dim=FFN, decoder_layers=1, decoder_attention_heads=HEADS, vocab_size=16,
                        pad_token_id=0, bos_token_id=0, eos_token_id=0, decoder_start_token_id=0)
    cfg._attn_implementation = "sdpa"
    enc = WhisperEncoder(cfg).eval()
    p = "audio_tokenizer.audio_model."
    sd = {("embed_positions.weight" if k == p + "positional_embedding" else k[len(p):]): v
          for k, v in tensors.items() if k.startswith(p)}
    enc.load_state_dict(sd)
    return enc


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-onnx", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from omni_edge import _native
    info = _native.lib().build_info()
    print(f"# audio input benchmark: threads {args.threads}, CPU ISA {info.get('isa_available')}, torch "
          f"{torch.__version__}, encoder layers {args.layers}/32 at real widths, random weights, fp32")
    rate = matmul_rate(args.repeat)
    print(f"fp32 matmul (384x5120 @ 5120x4096): {rate:.1f} GFLOP/s  <- ceiling for RVQ / encoder GEMMs\n")

    a_cfg = type("A", (), dict(num_mel_bins=MELS, d_model=D_MODEL, encoder_layers=args.layers,
                               encoder_attention_heads=HEADS, encoder_ffn_dim=FFN, avg_pooler=POOL))()
    tensors = build_weights(args.layers)
    enc = audio_in.load_encoder(tensors, a_cfg).eval()
    bridge = audio_in.load_bridge(tensors, a_cfg).eval()
    hf = hf_encoder(tensors, args.layers)
    g = torch.Generator().manual_seed(0)
    books = rvq.Codebooks([torch.randn(n, D_MODEL * POOL, generator=g) for n in SIZES])
    books.norms2()
    graph = None
    if not args.no_onnx:
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from export import audio_encoder as ax
        from omni_edge.backends import OnnxGraph
        tmp = tempfile.mkdtemp(prefix="bench_audio_")
        t0 = time.perf_counter()
        entry = ax.export_modules(enc, bridge, tmp, "float32", threads=args.threads, check_parity=False)
        graph = OnnxGraph(os.path.join(tmp, entry["file"]), threads=args.threads)
        print(f"(exported audio_encoder.onnx with {args.layers} layers in {time.perf_counter() - t0:.0f} s)\n")

    print(f"{'input':>6} | {'stage':<34} | {'time':>36} | ratio")
    for seconds in (5, 30):
        wave = torch.randn(44100 * seconds, generator=g) * 0.1
        fe = timeit(lambda: audio_in.audio_from_wave(wave, 44100, a_cfg).mels(), args.repeat)
        item = audio_in.audio_from_wave(wave, 44100, a_cfg)
        mels = item.mels()
        print(f"{seconds:>5}s | {'front end (44.1k->16k, log-mel)':<34} | {fmt(fe):>36} | RTF {fe[0] / seconds:.4f}")
        with torch.inference_mode():
            encs = enc(mels)
            ours_enc = timeit(lambda: enc(mels), args.repeat)
            ours_br = timeit(lambda: [bridge(e) for e in encs], args.repeat)
            full = audio_io.log_mel_padded(item.wave[:480000], MELS)[None]
            peer = timeit(lambda: hf(full), args.repeat)
        both = ours_enc[0] + ours_br[0]
        print(f"{'':>6} | {'encoder, omni-edge torch (varlen)':<34} | {fmt(ours_enc):>36} | 1.00")
        print(f"{'':>6} | {'encoder, transformers (3000 frames)':<34} | {fmt(peer):>36} | "
              f"{peer[0] / ours_enc[0]:.2f}x ours")
        print(f"{'':>6} | {'bridge, omni-edge torch':<34} | {fmt(ours_br):>36} |")
        if graph is not None:
            mel, mask, bias = audio_in.padded_inputs(mels)
            on = timeit(lambda: graph.run(mel=mel, mel_mask=mask, key_bias=bias), args.repeat)
            print(f"{'':>6} | {'encoder+bridge, onnxruntime fp32':<34} | {fmt(on):>36} | "
                  f"{both / on[0]:.2f}x faster than torch encoder+bridge")
        feats = torch.cat([bridge(e) for e in enc(mels)]).float().contiguous()
        tokens = feats.shape[0]
        flops = 2.0 * tokens * feats.shape[1] * sum(SIZES)
        # the ceiling, measured right beside: torch fp32 matmul of the same frames against the largest codebook
        big = books.tensors[0]
        mm = timeit(lambda: feats @ big.t(), args.repeat)
        mm_rate = 2.0 * tokens * feats.shape[1] * big.shape[0] / mm[0] / 1e9
        r = timeit(lambda: rvq.encode(feats, books), args.repeat)
        print(f"{'':>6} | {f'matmul {tokens}x5120 @ 5120x8192':<34} | {fmt(mm):>36} | {mm_rate:.1f} GFLOP/s")
        print(f"{'':>6} | {f'RVQ encode ({tokens} tokens, {flops / 1e9:.1f} GFLOP)':<34} | {fmt(r):>36} | "
              f"{flops / r[0] / 1e9:.1f} GFLOP/s = {flops / r[0] / 1e9 / mm_rate:.0%} of that matmul")

        def cdist_peer():
            res = feats.clone()
            for cb in books.tensors:
                idx = torch.cdist(res[None], cb[None])[0].argmin(1)
                res = res - cb[idx]
        c = timeit(cdist_peer, 1, warmup=0)
        print(f"{'':>6} | {'RVQ, torch cdist+argmin (peer)':<34} | {fmt(c):>36} | {c[0] / r[0]:.2f}x ours")
    print("\nnotes: the machine is shared; compare ratios within this run. transformers pads every input to 30 s.")


if __name__ == "__main__":
    main()
