"""`omni-edge chat` and `omni-edge demo` as a user runs them: subprocesses on the tiny checkpoint."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from omni_edge import pipeline
from omni_edge.chat import interactive, read_message
from omni_edge.generate import SamplingParams

ENV = dict(os.environ, PYTHONIOENCODING="utf-8")
GREEDY_ARGS = ["--temperature", "0", "--max-new-tokens", "6"]
GREEDY = SamplingParams(max_new_tokens=6, temperature=0, repetition_penalty=1.0)  # = GREEDY_ARGS: plain argmax


def omni_edge(*args, stdin: str = "", timeout: int = 120):
    return subprocess.run([sys.executable, "-m", "omni_edge", *args], input=stdin, capture_output=True,
                          text=True, encoding="utf-8", env=ENV, timeout=timeout)


@pytest.fixture(scope="module")
def tiny(tiny_omni_bytelevel):
    return Path(tiny_omni_bytelevel)


@pytest.fixture(scope="module")
def model(tiny):
    return pipeline.load(tiny, max_context=512)


def expected_replies(model, turns, *, system=None):
    """Replay a conversation in process: each turn is a message, ("system", text) or ("reset",)."""
    s = model.session(system=system)
    out = []
    for t in turns:
        if isinstance(t, tuple) and t[0] == "system":
            s.system = t[1]
        elif isinstance(t, tuple) and t[0] == "reset":
            s.reset()
        else:
            out.append(s.send(t, GREEDY).text)
    return out


# ---- one-shot ------------------------------------------------------------------------------------------

def test_one_shot_prints_only_the_reply(tiny, model):
    r = omni_edge("chat", "--model", str(tiny), "--prompt", "What is the capital of France?", *GREEDY_ARGS,
                  "--max-context", "512")
    assert r.returncode == 0, r.stderr
    (want,) = expected_replies(model, ["What is the capital of France?"])
    assert r.stdout == want + "\n"
    assert "Traceback" not in r.stderr


def test_one_shot_with_system_and_stats(tiny, model):
    r = omni_edge("chat", "--model", str(tiny), "--prompt", "Hi", "--system", "Be brief.", *GREEDY_ARGS,
                  "--max-context", "512", "--stats", "--threads", "1")
    assert r.returncode == 0, r.stderr
    (want,) = expected_replies(model, ["Hi"], system="Be brief.")
    assert r.stdout == want + "\n"
    # <B_SYS>Be brief.<C_Q>Hi<C_A>
    n_prompt = len(model.prompt.render([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]))
    stats = [line for line in r.stderr.splitlines() if line.startswith("stats:")]
    assert len(stats) == 1
    m = re.fullmatch(r"stats: prompt_tokens=(\d+) new_tokens=(\d+) prefill_tok_s=([\d.]+) decode_tok_s=([\d.]+|nan) "
                     r"peak_rss_mb=(\d+)", stats[0])
    assert m, stats[0]
    assert int(m.group(1)) == n_prompt
    assert 0 <= int(m.group(2)) <= 6
    assert float(m.group(3)) > 0 and int(m.group(5)) > 50


def test_one_shot_context_overflow_exits_2(tiny):
    r = omni_edge("chat", "--model", str(tiny), "--prompt", "word " * 200, "--max-context", "64",
                  "--max-new-tokens", "8")
    assert r.returncode == 2
    assert r.stdout == ""
    err = r.stderr.strip().splitlines()
    assert "max_new_tokens (8)" in err[-1] and "64 tokens" in err[-1]
    assert "Traceback" not in r.stderr


def test_bad_sampling_flag_exits_2(tiny):
    r = omni_edge("chat", "--model", str(tiny), "--prompt", "x", "--top-p", "0")
    assert r.returncode == 2 and "top_p" in r.stderr and "Traceback" not in r.stderr


# ---- interactive ---------------------------------------------------------------------------------------

def test_interactive_commands_multiline_and_reset(tiny, model):
    stdin = ("hello\n"
             "/system Be brief.\n"
             "line one \\\n"
             "line two\n"
             '"""\n'
             "block a\n"
             "\n"
             "block b\n"
             '"""\n'
             "/bogus\n"
             "/reset\n"
             "again\n"
             "/exit\n"
             "never sent\n")
    r = omni_edge("chat", "--model", str(tiny), *GREEDY_ARGS, "--max-context", "512", "--interactive",
                  stdin=stdin)
    assert r.returncode == 0, r.stderr
    want = expected_replies(model, ["hello", ("system", "Be brief."), "line one \nline two",
                                    "block a\n\nblock b", ("reset",), "again"])
    assert r.stdout == "".join(w + "\n" for w in want)
    assert "(system prompt set)" in r.stderr and "(conversation reset; the system prompt is kept)" in r.stderr
    assert "unknown command /bogus" in r.stderr


def test_interactive_ends_at_eof(tiny, model):
    r = omni_edge("chat", "--model", str(tiny), *GREEDY_ARGS, "--max-context", "512", "--interactive",
                  stdin="hello\nagain")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "".join(w + "\n" for w in expected_replies(model, ["hello", "again"]))


def test_interactive_error_keeps_the_session(tiny, model):
    stdin = "word " * 200 + "\nhello\n"
    r = omni_edge("chat", "--model", str(tiny), *GREEDY_ARGS, "--max-context", "64", "--interactive",
                  stdin=stdin)
    assert r.returncode == 0, r.stderr
    assert "error:" in r.stderr and "64 tokens" in r.stderr
    (want,) = expected_replies(model, ["hello"])
    assert r.stdout == want + "\n"


def _wait_for(cond, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return False


def test_ctrl_c_stops_the_reply_not_the_session(tiny_omni):
    """SIGINT while a long reply streams stops that reply; the next message is answered (and stopped the same
    way, so the test stays short); /exit then ends with code 0."""
    proc = subprocess.Popen([sys.executable, "-m", "omni_edge", "chat", "--model", str(tiny_omni),
                             "--max-new-tokens", "1500", "--max-context", "2048", "--seed", "0", "--interactive"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    out, err = bytearray(), bytearray()

    def pump(stream, buf):
        while chunk := stream.read1(4096):
            buf.extend(chunk)

    readers = [threading.Thread(target=pump, args=(proc.stdout, out), daemon=True),
               threading.Thread(target=pump, args=(proc.stderr, err), daemon=True)]
    for t in readers:
        t.start()
    try:
        for n, message in enumerate((b"Tell me a long story.\n", b"Hi\n"), start=1):
            before = len(out)
            proc.stdin.write(message)
            proc.stdin.flush()
            assert _wait_for(lambda: len(out) > before + 1, 120), f"reply {n} did not start: {err.decode()}"
            proc.send_signal(signal.SIGINT)
            assert _wait_for(lambda: err.count(b"(reply stopped)") == n, 60), err.decode()
        proc.stdin.write(b"/exit\n")
        proc.stdin.flush()
        assert proc.wait(timeout=60) == 0, err.decode()
    finally:
        if proc.poll() is None:
            proc.kill()
    for t in readers:
        t.join(timeout=10)
    assert b"Traceback" not in err


def test_interactive_loop_in_process_interrupt(model):
    """The loop itself: a KeyboardInterrupt while writing a reply ends that reply only."""

    class Out(io.StringIO):
        calls = 0

        def write(self, s):
            Out.calls += 1
            if Out.calls == 2:
                raise KeyboardInterrupt
            return super().write(s)

    lines = iter(["first", "second"])
    out, err = Out(), io.StringIO()
    s = model.session()
    rc = interactive(s, GREEDY, lambda prompt: next(lines, None), out, err)
    assert rc == 0
    assert "(reply stopped)" in err.getvalue()
    assert [m["role"] for m in s.history] == ["user", "assistant", "user", "assistant"]
    assert s.history[2]["content"] == "second"


def test_read_message_forms():
    def feed(*lines):
        it = iter(lines)
        return read_message(lambda prompt: next(it, None))

    assert feed("plain") == "plain"
    assert feed("a \\", "b\\", "c") == "a \nb\nc"
    assert feed('"""one line"""') == "one line"
    assert feed('"""', "x", "y", '"""') == "x\ny"
    assert feed('"""start', "end\"\"\"") == "start\nend"
    assert feed() is None
    assert feed('"""', "unterminated") == "unterminated"


# ---- errors: one line on stderr, exit code 2 ----------------------------------------------------------

def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _error_line(r) -> str:
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr
    return lines[0]


def test_error_missing_path(tmp_path):
    line = _error_line(omni_edge("chat", "--model", str(tmp_path / "nope"), "--prompt", "x"))
    assert "does not exist" in line


def test_error_not_a_folder(tmp_path):
    f = tmp_path / "file.txt"
    f.write_text("x")
    assert "not a folder" in _error_line(omni_edge("chat", "--model", str(f), "--prompt", "x"))


def test_error_malformed_config(tmp_path, tiny):
    d = _copy(tiny, tmp_path / "m")
    (d / "config.json").write_text("{ this is not json", encoding="utf-8")
    assert "config.json" in _error_line(omni_edge("chat", "--model", str(d), "--prompt", "x"))


def test_error_config_missing_key(tmp_path, tiny):
    d = _copy(tiny, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text(encoding="utf-8"))
    del cfg["num_hidden_layers"]
    (d / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
    assert "num_hidden_layers" in _error_line(omni_edge("chat", "--model", str(d), "--prompt", "x"))


def test_error_tensor_mismatch(tmp_path, tiny):
    d = _copy(tiny, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text(encoding="utf-8"))
    cfg["intermediate_size"] = cfg["intermediate_size"] * 2  # the stored MLP weights no longer fit
    (d / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
    line = _error_line(omni_edge("chat", "--model", str(d), "--prompt", "x"))
    assert "mlp" in line and str(cfg["intermediate_size"]) in line


def test_error_unreadable_tokenizer(tmp_path, tiny):
    d = _copy(tiny, tmp_path / "m")
    (d / "tokenizer.json").write_text("{ broken", encoding="utf-8")
    assert "tokenizer.json" in _error_line(omni_edge("chat", "--model", str(d), "--prompt", "x"))


def test_error_missing_tokenizer(tmp_path, tiny):
    d = _copy(tiny, tmp_path / "m")
    (d / "tokenizer.json").unlink()
    assert "tokenizer.json" in _error_line(omni_edge("chat", "--model", str(d), "--prompt", "x"))


def test_no_model_prints_guidance():
    r = omni_edge("chat")
    assert r.returncode == 2 and r.stdout == ""
    assert "baichuan-inc/Baichuan-Omni-1d5" in r.stderr
    assert "omni-edge quantize" in r.stderr and "omni-edge demo" in r.stderr
    assert "never downloads" in r.stderr


def test_help_documents_interactive_input():
    r = omni_edge("chat", "--help")
    assert r.returncode == 0
    for word in ("/system", "/reset", "/exit", '"""', "backslash", "Ctrl-C", "--temperature", "--stats"):
        assert word in r.stdout


# ---- demo ----------------------------------------------------------------------------------------------

def test_demo_runs():
    r = omni_edge("demo", timeout=600)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "RANDOM weights" in out and "gibberish" in out
    assert "[quant none]" in out and "[quant rtn4]" in out
    assert re.search(r"\[quant none\] kernels: q4 unused \(dense weights\), attention (native|torch)", out)
    assert re.search(r"\[quant rtn4\] kernels: q4 (native|torch), attention (native|torch)", out)
    assert re.search(r"CPU kernel level (avx512|avx2|neon|scalar)", out)
    assert len(re.findall(r"decode \d+ steps at [\d.]+ tok/s", out)) == 2
    assert re.search(r"\[image \+ audio in\] \d+ image tokens, 25 audio tokens", out)  # 2 s -> 25 tokens
    assert re.search(r"\[spoken reply\] \d+ text tokens, \d+ audio frames", out)
    assert "stages built on first use: vision, audio_encoder, audio_head, speech, vocoder" in out


# ---- scripting: stdin, files, JSON, pipes, escapes ------------------------------------------------------

def test_prompt_from_stdin_file_and_pipe_is_one_prompt(tiny, model, tmp_path):
    text = "first line\nsecond line"
    (want,) = expected_replies(model, [text])
    f = tmp_path / "prompt.txt"
    f.write_text(text, encoding="utf-8")
    for args, stdin in ((["--prompt", "-"], text), (["--prompt-file", str(f)], ""), ([], text)):
        r = omni_edge("chat", "--model", str(tiny), *GREEDY_ARGS, *args, stdin=stdin)
        assert r.returncode == 0, (args, r.stderr)
        assert r.stdout == want + "\n", args


def test_json_reply_for_scripts(tiny, model):
    (want,) = expected_replies(model, ["Hello"])
    r = omni_edge("chat", "--model", str(tiny), *GREEDY_ARGS, "--prompt", "Hello", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["reply"] == want and out["new_tokens"] == 6 and out["finish_reason"] == "length"
    assert out["prompt_tokens"] > 0 and out["decode_tok_s"] > 0


def test_reader_closing_the_pipe_ends_quietly(tiny):
    cmd = (f"{shlex_quote(sys.executable)} -m omni_edge chat --model {shlex_quote(str(tiny))} --temperature 0 "
           f"--max-new-tokens 200 --prompt 'Tell me a long story' | head -c 1")
    r = subprocess.run(["bash", "-c", "set -o pipefail; " + cmd], capture_output=True, env=ENV, timeout=120)
    err = r.stderr.decode("utf-8", "replace")  # `head -c 1` may cut a character in half on stdout
    assert "Traceback" not in err and "BrokenPipe" not in err, err
    assert r.returncode == 0, err


def shlex_quote(s: str) -> str:
    import shlex
    return shlex.quote(s)


def test_slash_escape_and_empty_prompt(tiny, model):
    (want,) = expected_replies(model, ["/usr/bin is a folder"])
    r = omni_edge("chat", "--model", str(tiny), *GREEDY_ARGS, "--interactive", stdin="//usr/bin is a folder\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout == want + "\n" and "unknown command" not in r.stderr
    r = omni_edge("chat", "--model", str(tiny), *GREEDY_ARGS, "--prompt", "  ")
    assert r.returncode == 2 and "the prompt is empty" in r.stderr


def test_media_on_a_text_model_is_refused_before_loading_media(tiny, tmp_path):
    # The byte-level tiny model is omni but its image is unreadable: the error names the file and the
    # conversation never starts; a plain HF model is refused for taking media at all (test_multimodal_turn).
    bad = tmp_path / "zero.png"
    bad.write_bytes(b"")
    r = omni_edge("chat", "--model", str(tiny), *GREEDY_ARGS, "--prompt", "What is this?", "--image", str(bad))
    assert r.returncode == 2 and "zero.png" in r.stderr and "Traceback" not in r.stderr
