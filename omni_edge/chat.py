"""`omni-edge chat`: talk to a model, interactively or one-shot with --prompt.

One-shot prints only the reply on stdout (everything else goes to stderr). Interactive mode streams each
reply as it is generated and keeps the conversation in the KV cache, so a turn prefills only what is new.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Optional, TextIO

from omni_edge.cli import CliError

INTERACTIVE_HELP = '''\
interactive mode (no --prompt):
  Type a message and press Enter; the reply streams back as it is generated.
  Multi-line input: end a line with a backslash (\\) to continue on the next line, or
  start a line with """ to open a block that ends at the next line ending in """.
  /image PATH    attach an image to the next message (repeatable; also /video PATH and /audio PATH);
                 a message may then be empty (an audio question needs no text)
  /system TEXT   set the system prompt (/system alone removes it); the conversation is kept
  /reset         forget the conversation and start again (the system prompt is kept)
  /help          show this help
  /exit          quit (so do /quit and Ctrl-D)
  //TEXT         send "/TEXT" as a message (a message that itself begins with a slash)
  Ctrl-C stops the reply being written; the conversation goes on.
'''

NO_MODEL_HELP = """\
omni-edge chat needs a model: --model PATH (a checkpoint folder or an edge bundle).

  * Baichuan-Omni-1.5: download the Hugging Face repository baichuan-inc/Baichuan-Omni-1d5 with your own
    tools (for example `huggingface-cli download baichuan-inc/Baichuan-Omni-1d5 --local-dir Baichuan-Omni-1d5`);
    omni-edge never downloads weights. Then: omni-edge chat --model Baichuan-Omni-1d5
  * Make a 4-bit edge bundle from it (smaller and faster): omni-edge quantize Baichuan-Omni-1d5 omni-bundle
    and chat with: omni-edge chat --model omni-bundle
  * A plain Hugging Face Llama or Qwen2 checkpoint folder (config.json, safetensors, tokenizer.json and a
    chat template) works too.
  * No weights at hand? `omni-edge demo` builds a tiny random model and runs it end to end.
"""


SAMPLING_HELP = """\
sampling defaults (flags left out), as transformers' generate() uses them for the same folder:
  the model's generation_config.json gives do_sample, temperature, top_k, top_p, repetition_penalty,
  max_new_tokens and eos_token_id; a missing key takes transformers' default (do_sample false = greedy,
  top_k 50, top_p 1, no repetition penalty). Baichuan-Omni checkpoints, whose generation config has no
  sampling keys, use the reference demo's text settings (T 0.8, top-k 20, top-p 0.85, penalty 1.1).
  `omni-edge chat --model PATH --help` lists the values in force for PATH and where each comes from.
"""


class _ModelAction(argparse.Action):
    """--model PATH; also remembers PATH so that a --help after it can list PATH's sampling defaults."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        parser._help_model = values


def _defaults_line(model: str) -> str:
    from pathlib import Path

    from omni_edge.config import load_config
    from omni_edge.sampling_defaults import from_checkpoint

    try:
        kind = load_config(Path(model)).kind
        d = from_checkpoint(model, kind)
    except (OSError, ValueError) as e:
        return f"sampling defaults for {model}: unavailable ({' '.join(str(e).split())})"
    return f"sampling defaults for {model}: {d.summary()}; eos ids {list(d.eos_ids)} [{d.eos_source}]"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from omni_edge import cli_args

    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = INTERACTIVE_HELP + "\n" + SAMPLING_HELP
    p.add_argument("--model", metavar="PATH", action=_ModelAction, help="checkpoint folder or edge bundle")
    plain_help = p.format_help

    def format_help() -> str:  # `chat --model PATH --help` adds the values in force for PATH
        model = getattr(p, "_help_model", None)
        return plain_help() + (f"\n{_defaults_line(model)}\n" if model else "")
    p.format_help = format_help
    p.add_argument("--prompt", metavar="TEXT",
                   help="one-shot: answer TEXT, print only the reply, and exit; '-' reads the whole of stdin as "
                        "the prompt. Without --prompt, piped stdin is one prompt (see --interactive)")
    p.add_argument("--prompt-file", metavar="FILE", help="one-shot: the prompt is the text of FILE (UTF-8)")
    p.add_argument("--interactive", action="store_true",
                   help="a conversation read line by line from stdin even when it is not a terminal (scripts)")
    p.add_argument("--json", action="store_true",
                   help="one-shot: print the reply, its token counts and timings as one JSON object on stdout")
    p.add_argument("--context-policy", choices=("drop-oldest", "refuse"), default="drop-oldest",
                   help="when a conversation fills the context: drop the oldest exchanges (the system prompt is "
                        "kept), or refuse the message and ask for /reset (default drop-oldest). A reply's length "
                        "is always clipped to the room left, with a notice")
    p.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="attach an image to the (first) message; repeatable. Media come before the text")
    p.add_argument("--video", action="append", default=[], metavar="PATH",
                   help="attach a video (1 frame per second, at most 32 frames); repeatable")
    p.add_argument("--audio", action="append", default=[], metavar="PATH",
                   help="attach audio (wav, flac, ogg, mp3, m4a, ...); repeatable. With --prompt \"\" the "
                        "audio alone is the question")
    p.add_argument("--speak", metavar="OUT.wav",
                   help="spoken replies (Baichuan-Omni with its vocoder): text and speech alternate per clause "
                        "and the speech streams as it is generated, into OUT.wav (24 kHz; interactively one "
                        "numbered file per reply: OUT-1.wav, OUT-2.wav, ...)")
    p.add_argument("--play", action="store_true",
                   help="with --speak: also play the speech through the sound card as it arrives (needs the "
                        "sounddevice package)")
    p.add_argument("--voice", metavar="TEXT", default=DEFAULT_VOICE,
                   help="with --speak: the system prompt that picks the voice (default: the reference demo's, "
                        f"{DEFAULT_VOICE}); --system, if given too, follows it")
    p.add_argument("--vocoder", metavar="PATH",
                   help="the HiFT vocoder for --speak (hift.pt or vocoder.safetensors; default: the one in the "
                        "model folder)")
    p.add_argument("--first-audio-frames", type=cli_args.int_range(1, 500), default=10, metavar="N",
                   help="with --speak: decode a clause's first audio after N frames of 80 ms (default 10)")
    p.add_argument("--backend", action="append", default=None, metavar="SPEC",
                   help="how the dense media stages run: auto (ONNX graph when the bundle has one and onnxruntime "
                        "imports, else torch), torch, onnx, or STAGE=KIND for one stage (e.g. vision=onnx); "
                        "repeatable, later values win (default auto)")
    p.add_argument("--system", metavar="TEXT", help="system prompt")
    p.add_argument("--max-new-tokens", type=cli_args.int_range(1, 1 << 20), metavar="N",
                   help="longest reply in tokens (default: the model's generation_config.json, else 1024)")
    p.add_argument("--temperature", type=cli_args.finite_float(min=0.0), metavar="T",
                   help="sampling temperature; 0 = greedy, plain argmax unless --repetition-penalty is also "
                        "given (default: the model's generation config; see 'sampling defaults' below)")
    p.add_argument("--top-k", type=cli_args.int_range(0, 1 << 31), metavar="K",
                   help="keep the K likeliest tokens; 0 = off (default: the model's generation config)")
    p.add_argument("--top-p", type=cli_args.finite_float(min=0.0, max=1.0), metavar="P",
                   help="nucleus sampling mass; 1 = off (default: the model's generation config)")
    p.add_argument("--repetition-penalty", type=cli_args.finite_float(min=0.0), metavar="R",
                   help="penalty on tokens already in the context; 1 = off (default: the model's generation "
                        "config, else none)")
    p.add_argument("--seed", type=cli_args.seed, metavar="S", help="random seed, for reproducible sampling")
    p.add_argument("--device", default="cpu", type=cli_args.device, metavar="DEV", help="cpu or cuda (cuda:N for another GPU); default cpu")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"),
                   help="activation / dense weight dtype (default: the backbone's choice for the device)")
    p.add_argument("--quant", choices=("none", "rtn4"), default="none",
                   help="rtn4: quantise dense backbone linears to 4-bit at load (round-to-nearest)")
    cli_args.add_lm_head(p)
    p.add_argument("--max-context", type=cli_args.int_range(2, 1 << 24), metavar="N",
                   help="KV cache size in tokens (default 4096, capped by the model's max positions)")
    p.add_argument("--threads", type=cli_args.threads, metavar="N",
                   help=f"CPU threads, 1..{cli_args.cpu_count()} (default: all cores)")
    p.add_argument("--stats", action="store_true",
                   help="print token counts, prefill/decode speed and peak memory to stderr after each reply")


def _peak_rss_mb() -> float:
    import resource

    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
    return kb / (1024.0 if sys.platform != "darwin" else 1024.0 * 1024.0)


def stats_line(reply, timings=None) -> str:
    media = "".join(f" {k}_tokens={reply.media_tokens[k]}" for k in sorted(reply.media_tokens))
    media += "".join(f" {k}_stage_s={reply.media_s[k]:.3f}" for k in sorted(reply.media_s))
    if reply.media_s:  # a stage ran this turn: its parts (front end, encoder, RVQ ...)
        media += "".join(f" {k}={v:.3f}" for k, v in sorted((timings or {}).items()))
    return (f"stats: prompt_tokens={reply.prompt_tokens} new_tokens={reply.new_tokens}{media} "
            f"prefill_tok_s={reply.prefill_tok_s:.1f} decode_tok_s={reply.decode_tok_s:.1f} "
            f"peak_rss_mb={_peak_rss_mb():.0f}")


DEFAULT_VOICE = "请用【邻家女声】这个声音回答问题。"  # the reference demo's system prompt ("answer in the girl-next-door voice")
MEDIA_COMMANDS = {"/image": "image", "/video": "video", "/audio": "audio"}


class SpeechOut:
    """Spoken replies: streams 24 kHz chunks into a wav file (written under a temporary name and renamed when
    the reply is complete, so no half-written file is left) and, with `play`, to the sound card."""

    RATE = 24000

    def __init__(self, model, path: str, *, play: bool, first_frames: int, seed, err: TextIO):
        self.model, self.base, self.play, self.first_frames, self.seed, self.err = \
            model, path, play, first_frames, seed, err
        self.count = 0
        self.player = None
        if play:
            try:
                import sounddevice  # noqa: F401
            except ImportError:
                err.write("omni-edge: --play needs the sounddevice package (pip install sounddevice, and the "
                          "PortAudio library: apt-get install libportaudio2); writing the wav file only\n")
                self.play = False

    def path_for(self, numbered: bool) -> str:
        if not numbered:
            return self.base
        import os

        stem, ext = os.path.splitext(self.base)
        return f"{stem}-{self.count}{ext or '.wav'}"

    def send(self, session, content, params, *, write, numbered: bool, on_notice):
        import os
        import time
        import wave

        import numpy as np

        self.count += 1
        path = self.path_for(numbered)
        tmp = f"{path}.partial-{os.getpid()}"
        first = [None]
        samples = [0]
        clauses: list = [[]]  # 24 kHz chunks per clause, for the history (re-tokenised as the reference does)
        t0 = time.perf_counter()
        out = wave.open(tmp, "wb")
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(self.RATE)
        stream_out = None
        if self.play:
            import sounddevice

            stream_out = sounddevice.OutputStream(samplerate=self.RATE, channels=1, dtype="float32")
            stream_out.start()

        def on_audio(chunk):
            x = chunk.detach().float().cpu().numpy()
            if first[0] is None:
                first[0] = time.perf_counter() - t0
            samples[0] += x.size
            clauses[-1].append(chunk.detach().float().cpu())
            out.writeframes((np.clip(x, -1.0, 1.0) * 32767.0).round().astype("<i2").tobytes())
            if stream_out is not None:
                stream_out.write(x.reshape(-1, 1))

        ok = False
        try:
            head, stream = self.model.speech_outputs(on_audio, first_codes=self.first_frames, seed=self.seed)
            from omni_edge.speak import SpeakParams

            speak_params = SpeakParams().greedy() if params.greedy else SpeakParams()
            def clause_end():
                stream.end_clause()
                clauses.append([])

            reply = session.send_spoken(content, head, params=speak_params, max_new_tokens=params.max_new_tokens,
                                        on_text=write, on_audio_frame=stream.push, on_clause_end=clause_end,
                                        on_notice=on_notice)
            stream.close()
            self._keep_in_history(session, reply, clauses)
            ok = True
        finally:
            out.close()
            if stream_out is not None:
                stream_out.stop()
                stream_out.close()
            if ok:
                os.replace(tmp, path)
            elif os.path.exists(tmp):
                os.remove(tmp)
        reply.audio_path, reply.audio_seconds = path, samples[0] / self.RATE
        reply.first_audio_s, reply.wall_s = first[0], time.perf_counter() - t0
        return reply


    def _keep_in_history(self, session, reply, clauses) -> None:
        """The reference keeps past assistant speech as its wave, re-tokenised by the audio input path on the
        next turn: do the same when this model has that path (else the generated codes stay)."""
        if "audio" not in self.model.media_kinds():
            return
        import torch

        from omni_edge.audio_in import audio_from_wave

        waves = [torch.cat(c) if c else torch.zeros(0) for c, seg in zip(clauses, reply.segments)
                 if seg.shape[0] > 0]
        cfg = self.model.config.audio
        try:
            session.retokenize_spoken(waves, lambda w: audio_from_wave(w, self.RATE, cfg, source="spoken reply"))
        except ValueError as e:  # e.g. a segment too short to tokenise: its generated codes stay in the history
            self.err.write(f"omni-edge: the reply's speech stays in the history as its codes ({e})\n")


def speech_stats_line(reply) -> str:
    first = "n/a" if reply.first_audio_s is None else f"{reply.first_audio_s:.2f}"
    rtf = reply.wall_s / reply.audio_seconds if reply.audio_seconds else float("nan")
    return (f"stats: prompt_tokens={reply.prompt_tokens} text_tokens={reply.text_tokens} audio_frames={reply.frames} "
            f"segments={len(reply.segments)} audio_s={reply.audio_seconds:.2f} first_audio_s={first} "
            f"rtf={rtf:.2f} peak_rss_mb={_peak_rss_mb():.0f}")


def message_content(model, text: str, media) -> object:
    """A message's content: the text alone, or the media parts first (as the reference demos place them)
    then the text. `media` is [(kind, path)]; each file is read and checked here (ValueError naming it)."""
    if not media:
        return text
    import time

    parts = []
    model.timings.clear()
    for kind, path in media:
        t0 = time.perf_counter()
        parts.append({"type": kind, kind: model.load_media(kind, path)})
        key = f"{kind}_load_s"  # decoding, resampling / resizing: the front end before the stage
        model.timings[key] = model.timings.get(key, 0.0) + time.perf_counter() - t0
    if text:
        parts.append({"type": "text", "text": text})
    return parts


def read_message(read_line: Callable[[str], Optional[str]]) -> Optional[str]:
    """One user message from `read_line(prompt)` (None at end of input), with backslash continuations and
    triple-quote blocks. Returns None at end of input."""
    line = read_line(">>> ")
    if line is None:
        return None
    if line.lstrip().startswith('"""'):
        rest = line.lstrip()[3:]
        if rest.rstrip().endswith('"""'):
            return rest.rstrip()[:-3]
        parts = [rest]
        while True:
            more = read_line("... ")
            if more is None:
                break
            if more.rstrip().endswith('"""'):
                parts.append(more.rstrip()[:-3])
                break
            parts.append(more)
        return "\n".join(parts).strip("\n")
    parts = []
    while line is not None and line.endswith("\\"):
        parts.append(line[:-1])
        line = read_line("... ")
    if line is not None:
        parts.append(line)
    return "\n".join(parts)


def interactive(session, params, read_line: Callable[[str], Optional[str]], out: TextIO, err: TextIO,
                *, stats: bool = False, model=None, speech: Optional[SpeechOut] = None) -> int:
    """The read-reply loop. Errors in a turn are reported and the session goes on; EOF or /exit ends it.
    `/image PATH` (and /video, /audio) attach media to the next message; `model` loads them."""
    pending = []  # [(kind, path)] attached to the next message
    while True:
        try:
            text = read_message(read_line)
        except KeyboardInterrupt:
            err.write("\n(input cleared; /exit or Ctrl-D quits)\n")
            continue
        if text is None:
            err.write("\n")
            return 0
        cmd = text.strip()
        if not cmd and not pending:
            continue
        if cmd.startswith("//"):
            text = text.lstrip()[1:]  # the escape: the message is the rest, slash included
        elif cmd.startswith("/"):
            name, _, arg = cmd.partition(" ")
            if name in ("/exit", "/quit"):
                return 0
            if name in MEDIA_COMMANDS:
                kind, path = MEDIA_COMMANDS[name], arg.strip()
                if not path:
                    err.write(f"usage: {name} PATH\n")
                elif model is None:
                    err.write(f"{name}: this session cannot take media\n")
                else:
                    try:
                        model.check_media(kind)
                    except ValueError as e:
                        err.write(f"error: {e}\n")
                        continue
                    pending.append((kind, path))
                    err.write(f"({kind} {path} attached to the next message)\n")
            elif name == "/reset":
                session.reset()
                pending = []
                err.write("(conversation reset; the system prompt is kept)\n")
            elif name == "/system":
                session.system = arg.strip() or None
                err.write("(system prompt set)\n" if session.system else "(system prompt removed)\n")
            elif name == "/help":
                err.write(INTERACTIVE_HELP)
            else:
                err.write(f"unknown command {name}; /help lists the commands\n")
            continue
        started = False

        def write(piece: str) -> None:
            nonlocal started
            started = True
            out.write(piece)
            out.flush()

        try:
            content = message_content(model, text, pending) if pending else text
        except ValueError as e:
            err.write(f"error: {e}\n(the attachments were dropped; the conversation is unchanged)\n")
            pending = []
            continue
        pending = []
        try:
            if speech is not None:
                reply = speech.send(session, content, params, write=write, numbered=True,
                                    on_notice=lambda t: err.write(f"({t})\n"))
            else:
                reply = session.send(content, params, on_text=write,
                                     on_notice=lambda t: err.write(f"({t})\n"))
        except KeyboardInterrupt:
            out.write("\n")
            out.flush()
            err.write("(reply stopped)\n")
            continue
        except ValueError as e:
            if started:
                out.write("\n")
            err.write(f"error: {e}\n")
            continue
        out.write("\n")
        out.flush()
        if speech is not None:
            err.write(f"(speech: {reply.audio_path}, {reply.audio_seconds:.1f} s)\n")
        if stats:
            err.write((speech_stats_line(reply) if speech is not None
                       else stats_line(reply, model.timings if model is not None else None)) + "\n")


def _stdin_reader(interactive_tty: bool) -> Callable[[str], Optional[str]]:
    if interactive_tty:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass

        def read(prompt: str) -> Optional[str]:
            try:
                return input(prompt)
            except EOFError:
                return None
        return read

    def read_pipe(prompt: str) -> Optional[str]:
        line = sys.stdin.readline()
        if not line:
            return None
        return line[:-1] if line.endswith("\n") else line
    return read_pipe


def _one_shot_prompt(args) -> Optional[str]:
    """The one-shot prompt: --prompt TEXT, --prompt - (all of stdin), --prompt-file FILE, or piped stdin when
    neither --prompt nor --interactive is given; None for an interactive session."""
    if args.prompt is not None and args.prompt_file is not None:
        raise CliError("give --prompt or --prompt-file, not both")
    if args.prompt_file is not None:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                return f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise CliError(f"--prompt-file {args.prompt_file}: {e.strerror if isinstance(e, OSError) else e}") \
                from None
    if args.prompt == "-" or (args.prompt is None and not args.interactive and not sys.stdin.isatty()):
        try:
            return sys.stdin.read()
        except UnicodeDecodeError as e:
            raise CliError(f"stdin is not UTF-8 text: {e}") from None
    return args.prompt


def _reply_json(reply, model) -> str:
    import json

    return json.dumps({
        "reply": reply.text, "finish_reason": reply.finish_reason, "prompt_tokens": reply.prompt_tokens,
        "prefilled_tokens": reply.prefilled_tokens, "new_tokens": reply.new_tokens,
        "max_new_tokens": reply.max_new_tokens, "media_tokens": reply.media_tokens,
        "media_s": {k: round(v, 6) for k, v in reply.media_s.items()},
        "prefill_s": round(reply.prefill_s, 6), "decode_s": round(reply.decode_s, 6),
        "prefill_tok_s": None if reply.prefill_s <= 0 else round(reply.prefill_tok_s, 3),
        "decode_tok_s": None if not reply.step_s else round(reply.decode_tok_s, 3),
        "notices": reply.notices, "model": model.path, "quant": model.quant_label,
    }, ensure_ascii=False)


def run(args) -> int:
    if not args.model:
        sys.stderr.write(NO_MODEL_HELP)
        return 2

    from omni_edge import pipeline
    from omni_edge.generate import SamplingParams

    flags = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_k": args.top_k,
             "top_p": args.top_p, "repetition_penalty": args.repetition_penalty}
    try:  # bad flags fail before the model loads; the values in force are resolved against it below
        SamplingParams(**{k: v for k, v in flags.items() if v is not None}).validate()
    except ValueError as e:
        raise CliError(str(e)) from None
    prompt = _one_shot_prompt(args)
    if args.json and prompt is None:
        raise CliError("--json prints one reply: give --prompt, --prompt-file or piped stdin")
    media = [("image", p) for p in args.image] + [("video", p) for p in args.video] + \
            [("audio", p) for p in args.audio]
    if media and prompt is None:
        raise CliError("--image, --video and --audio attach media to a one-shot --prompt; interactively, use "
                       "/image PATH, /video PATH or /audio PATH")
    if prompt is not None and not prompt.strip() and not media:
        raise CliError("the prompt is empty (an empty prompt is allowed only with --image, --video or --audio)")
    if args.play and not args.speak:
        raise CliError("--play plays spoken replies: give --speak OUT.wav too")
    if args.json and args.speak:
        raise CliError("--json describes text replies; drop it with --speak")
    try:
        model = pipeline.load(args.model, device=args.device, dtype=args.dtype, quant=args.quant,
                              max_context=args.max_context, threads=args.threads, backend=args.backend,
                              vocoder=args.vocoder, lm_head=args.lm_head)
    except pipeline.ModelLoadError as e:
        raise CliError(str(e)) from None
    speech = None
    if args.speak:
        try:
            model.check_speech()
        except ValueError as e:
            raise CliError(f"--speak: {e}") from None
        speech = SpeechOut(model, args.speak, play=args.play, first_frames=args.first_audio_frames,
                           seed=args.seed, err=sys.stderr)
        args.system = args.voice + (args.system or "")
    for kind in dict.fromkeys(k for k, _ in media):
        try:
            model.check_media(kind)
        except ValueError as e:
            raise CliError(str(e)) from None
    try:
        sampling = model.sampling_defaults.resolve(**flags)
        params = sampling.params()
    except ValueError as e:
        raise CliError(str(e)) from None
    d = model.describe()
    sys.stderr.write(f"omni-edge: {d['kind']} model, {d['layers']} layers x {d['hidden']} wide, "
                     f"{d['device']} {d['dtype']}, quant {d['quant']}, context {d['max_context']} tokens\n")
    sys.stderr.write(f"omni-edge: sampling {sampling.summary()}\n")
    session = model.session(system=args.system, seed=args.seed)
    session.context_policy = args.context_policy

    if prompt is not None:
        def write(piece: str) -> None:
            sys.stdout.write(piece)
            sys.stdout.flush()

        notice = lambda t: sys.stderr.write(f"omni-edge: {t}\n")  # noqa: E731
        try:
            content = message_content(model, prompt, media)
            if speech is not None:
                reply = speech.send(session, content, params, write=write, numbered=False, on_notice=notice)
            else:
                reply = session.send(content, params, on_text=None if args.json else write, on_notice=notice)
        except ValueError as e:
            raise CliError(str(e)) from None
        sys.stdout.write(_reply_json(reply, model) + "\n" if args.json else "\n")
        sys.stdout.flush()
        if speech is not None:
            sys.stderr.write(f"omni-edge: speech written to {reply.audio_path} ({reply.audio_seconds:.1f} s)\n")
        if args.stats:
            sys.stderr.write((speech_stats_line(reply) if speech is not None else stats_line(reply, model.timings))
                             + "\n")
        return 0

    tty = sys.stdin.isatty()
    if tty:
        sys.stderr.write('Type a message; /help for commands, """ for multi-line, Ctrl-D to quit.\n')
    return interactive(session, params, _stdin_reader(tty), sys.stdout, sys.stderr, stats=args.stats, model=model,
                       speech=speech)
