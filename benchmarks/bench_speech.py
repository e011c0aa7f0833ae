"""Speech decode chain at the released sizes (random weights): real-time factor per stage and end to end.

    python benchmarks/bench_speech.py [--codes 30 60] [--threads 1] [--reps 3] [--skip-peer]

(One thread by default: on a machine shared with other jobs, OpenMP threads that wait for each other at
every op make 2-thread runs slower and noisier than 1-thread runs.)

Stages, per clause of N codes (N / 12.5 s of speech, 4N - 1 mel frames):
  decoder+prenet   codes -> mu: RVQ sum, proj_decoder, ConvT + 8 causal layers, 12 prenet layers
  cfm              mu -> mel: 10 Euler steps x 2 guided passes of the 71 M-parameter U-Net
  vocoder          mel -> 24 kHz wave (HiFT, fp32)
  chain            all three (offline decode of the clause)
  stream F C       the same clause pushed code by code through SpeechStream (preview after F = 10 codes or
                   none, each chunk decoded once when complete, the rest at the end; CFM chunk cache C = kv or
                   inputs): total compute, its ratio to our offline chain, and time to first audio

Peer (same run, same threads): the straightforward torch transcription of the reference formulation from
tests/test_speech.py and tests/test_vocoder.py: the two guidance passes run one after the other at batch 1,
masks multiplied in and an additive finfo.min chunk bias, plain softmax attention, weight norm recomputed
from g/v at every call. For streaming the peer is what the reference demo does: wait for the clause's EOS and
decode it whole (its time to first audio is the whole chain after the last code).

RTF = compute seconds / seconds of speech (lower is better; < 1 is faster than real time). Ours and the
peer run alternately (one warm-up each, then --reps rounds); medians, with min and max for ours; the
chain row sums the stage medians. The machine is shared, so absolute times move between runs; the
ratios come from the same run.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import statistics
import sys
import tempfile
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from omni_edge.config import parse_config  # noqa: E402
from omni_edge.flow import cfm_solve  # noqa: E402
from omni_edge.speech import NoiseBuffer, SpeechDecoder, SpeechStream, mel_frames  # noqa: E402
from omni_edge.testing import random_tensors, reference_config, write_tiny_vocoder  # noqa: E402
from omni_edge.vocoder import Vocoder, VocoderNoise  # noqa: E402


def _load(name, folder="tests"):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, folder, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def ab(ours, peer, reps):
    """Time `ours` and `peer` alternately (one warm-up each, then reps rounds of ours, peer), so load changes
    on the shared machine hit both alike. Returns (median, min, max) for each; peer None -> (stats, None)."""
    with torch.no_grad():
        ours()
        if peer is not None:
            peer()
        a, b = [], []
        for _ in range(reps):
            t0 = time.perf_counter()
            ours()
            a.append(time.perf_counter() - t0)
            if peer is not None:
                t0 = time.perf_counter()
                peer()
                b.append(time.perf_counter() - t0)

    def stats(ts):
        return statistics.median(ts), min(ts), max(ts)
    return stats(a), (stats(b) if b else None)


def row(name, secs, ours, peer=None):
    med, lo, hi = ours
    s = f"{name:<16} {secs:5.2f} s | ours {med:7.3f} s [{lo:.3f}-{hi:.3f}] RTF {med / secs:6.3f}"
    if peer is not None:
        pm = peer[0]
        s += f" | peer {pm:7.3f} s RTF {pm / secs:6.3f} | peer/ours x{pm / med:4.2f}"
    print(s, flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--codes", type=int, nargs="+", default=[30, 60])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--skip-peer", action="store_true")
    ap.add_argument("--skip-stream", action="store_true", help="only the offline chain (no streaming rows)")
    ap.add_argument("--onnx", action="store_true", help="also time the exported fp32 graphs in onnxruntime "
                    "(estimator and vocoder trunk; exported first, which takes minutes at these sizes)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    cfg = parse_config(reference_config())
    stages = ("rvq", "audio_decoder", "flow_prenet", "flow_estimator")
    t0 = time.perf_counter()
    weights = {k: v for k, v in random_tensors(cfg, stages=stages).items()
               if not k.endswith(("embed_avg", "cluster_size"))}
    speech = SpeechDecoder.from_tensors(cfg, weights)
    tmp = tempfile.mkdtemp(prefix="bench_speech_")
    st_path, pt_path = write_tiny_vocoder(tmp, base_channels=512, cond_channels=512)
    voc = Vocoder.from_file(st_path)

    def n_par(m):
        return sum(p.numel() for p in m.parameters()) / 1e6

    print(f"# omni-edge speech chain, released sizes, random weights (built in {time.perf_counter() - t0:.1f} s)")
    print(f"# {platform.machine()}, torch {torch.__version__}, {args.threads} threads, fp32, "
          f"load average {os.getloadavg()[0]:.1f} (shared machine)")
    print(f"# params: decoder {n_par(speech.decoder):.1f} M, prenet {n_par(speech.prenet):.1f} M, "
          f"estimator {n_par(speech.estimator):.1f} M, vocoder {n_par(voc):.1f} M")
    # the estimator's most common GEMM: one chunk of 100 frames x 2 guided passes through the fused q/k/v
    rate = _load("bench_vision", "benchmarks").matmul_rate(10, 200, 256, 1536)
    print(f"# fp32 matmul rate measured here (200x256 @ 256x1536, torch, {args.threads} threads): {rate:.1f} GFLOP/s")
    onnx_est = onnx_trunk = None
    if args.onnx:
        from omni_edge.backends import OnnxGraph
        spec = importlib.util.spec_from_file_location("export_speech", os.path.join(ROOT, "export", "speech.py"))
        ex = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(ex)
        t0 = time.perf_counter()
        entries = ex.export(tmp, None, "float32", speech=speech, vocoder=voc, lengths=(7,), est_lengths=(37,))
        print(f"# exported in {time.perf_counter() - t0:.1f} s: "
              + ", ".join(f"{k} max_rel {v['float32'].get('parity', {}).get('max_rel', float('nan')):.1e}"
                          for k, v in entries.items()))
        est = OnnxGraph(os.path.join(tmp, "flow_estimator.onnx"), threads=args.threads)
        trk = OnnxGraph(os.path.join(tmp, "vocoder.onnx"), threads=args.threads)
        onnx_est = lambda x, m, t: est.run(x=x, mu=m, t=t)[0]  # noqa: E731
        onnx_trunk = lambda m, s: trk.run(mel=m, s_stft=s)[0]  # noqa: E731
    ts = tv = None
    if not args.skip_peer:
        ts, tv = _load("test_speech"), _load("test_vocoder")

    for n in args.codes:
        g = torch.Generator().manual_seed(n)
        codes = torch.stack([torch.randint(0, c, (n,), generator=g) for c in speech.codebook_sizes], 1)
        frames = mel_frames(n)
        secs = frames * 480 / 24000
        z = NoiseBuffer(0).take(0, frames)
        print(f"\n## clause of {n} codes = {frames} mel frames = {secs:.2f} s of speech")
        with torch.no_grad():
            mu = speech.mu(codes)
            mel = speech.mel(codes, z)
        noise = VocoderNoise(0)
        phase, sn = noise.phase(), noise.take(0, frames * 480)

        peer_mu_fn = peer_cfm_fn = peer_voc_fn = None
        if ts is not None:
            def peer_cfm_fn():
                mask = torch.ones(1, 1, frames)
                t_span = 1 - torch.cos(torch.linspace(0, 1, 11) * 0.5 * torch.pi)
                x, t, dt = z[None].clone(), t_span[0], t_span[1] - t_span[0]
                for step in range(1, 11):
                    v = ts.ref_estimator(weights, cfg, x, mask, mu[None], t)
                    v0 = ts.ref_estimator(weights, cfg, x, mask, torch.zeros_like(mu[None]), t)
                    x = x + dt * (1.7 * v - 0.7 * v0)
                    t = t + dt
                    if step < 10:
                        dt = t_span[step + 1] - t
                return x

            def peer_mu_fn():
                return ts.ref_mu(weights, cfg, codes)

            def peer_voc_fn():
                return tv.ref_vocode(pt_path, mel, phase, sn)

        def ours_cfm_fn():  # the CFM alone, from the same mu (chunk by chunk, as SpeechDecoder.mel runs it)
            return speech.cfm(mu[None], z[None])

        ours_mu, peer_mu = ab(lambda: speech.mu(codes), peer_mu_fn, args.reps)
        row("decoder+prenet", secs, ours_mu, peer_mu)
        ours_cfm, peer_cfm = ab(ours_cfm_fn, peer_cfm_fn, args.reps)
        row("cfm", secs, ours_cfm, peer_cfm)
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            ours_cfm_fn()
        gf = fc.get_total_flops() / 1e9  # the estimator's linears and convolutions (attention is not counted)
        print(f"{'':16} cfm matmul work {gf:.0f} GFLOP (linears + convs, attention not counted): ours "
              f"{gf / ours_cfm[0]:.1f} GFLOP/s = {100 * gf / ours_cfm[0] / rate:.0f} % of the matmul rate"
              + ("" if peer_cfm is None else f", peer {gf / peer_cfm[0]:.1f} GFLOP/s = "
                 f"{100 * gf / peer_cfm[0] / rate:.0f} %"), flush=True)
        ours_voc, peer_voc = ab(lambda: voc(mel, phase=phase, source_noise=sn), peer_voc_fn, args.reps)
        row("vocoder", secs, ours_voc, peer_voc)
        chain = tuple(a + b + c for a, b, c in zip(ours_mu, ours_cfm, ours_voc))
        peer_chain = None if peer_mu is None else tuple(a + b + c for a, b, c in zip(peer_mu, peer_cfm, peer_voc))
        row("chain (offline)", secs, chain, peer_chain)
        if onnx_est is not None:
            def onnx_cfm_fn():
                p = speech.params
                return cfm_solve(onnx_est, mu[None], z[None], p.n_steps, p.cfg_rate, p.scheduler)
            o_cfm, _ = ab(onnx_cfm_fn, None, args.reps)
            row("cfm (onnxrt)", secs, o_cfm, ours_cfm)
            o_voc, _ = ab(lambda: voc(mel, phase=phase, source_noise=sn, trunk_fn=onnx_trunk), None, args.reps)
            row("vocoder (onnxrt)", secs, o_voc, ours_voc)
            print(f"{'':16} (for the onnxrt rows, 'peer' is our torch module)")

        # streaming: compute of every push, time to first audio; with a preview after 10 codes and without
        for first, cache in (() if args.skip_stream else ((10, "kv"), (None, "kv"), (10, "inputs"))):
            got = {"first": None, "calls": 0}

            def on_audio(chunk):
                got["calls"] += 1

            total = 0.0
            s = SpeechStream(speech, voc, on_audio, first_codes=first, cache=cache)
            with torch.no_grad():
                for i, frame in enumerate(codes):
                    t1 = time.perf_counter()
                    s.push(frame)
                    dt_ = time.perf_counter() - t1
                    total += dt_
                    if got["first"] is None and got["calls"]:
                        got["first"] = (dt_, i + 1)
                t1 = time.perf_counter()
                s.end_clause()
                dt_ = time.perf_counter() - t1
                total += dt_
                if got["first"] is None:  # nothing before the end of the clause
                    got["first"] = (dt_, n)
            name = f"stream {first or '-'} {cache}"
            row(name[:16], secs, (total, total, total), peer_chain)
            print(f"{'':16} stream / our offline chain x{total / chain[0]:4.2f}; CFM frames integrated "
                  f"{s.cfm_frames} for {frames} (x{s.cfm_frames / frames:4.2f}); chunk caches peak "
                  f"{s.cache_bytes / 2**20:.0f} MiB", flush=True)
            peer_ttfa = f"{peer_chain[0]:.3f} s after the last code" if peer_chain else "n/a"
            print(f"{'':16} time to first audio: ours {got['first'][0]:.3f} s after code {got['first'][1]}, "
                  f"reference demo {peer_ttfa}; {s.samples_out / 24000:.2f} s delivered in {got['calls']} "
                  f"chunks", flush=True)


if __name__ == "__main__":
    main()
