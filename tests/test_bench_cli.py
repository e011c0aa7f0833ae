"""`omni-edge bench` on the tiny checkpoint (CPU): a well-formed table and JSON with positive figures, bytes per
token equal to an independent count from the config, and bad arguments refused in one line (exit code 2)."""

import json
import re

import pytest
import torch

from omni_edge import _native, bench
from omni_edge.cli import main
from omni_edge.config import load_config

# small and quick: the figures are checked for form and sign here, never for speed
ARGS = ["--prompt-tokens", "5", "--decode-tokens", "3", "--repeats", "2", "--threads", "1", "--bandwidth-mb", "16"]


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    m = _native.lib().num_threads() if _native.available() else None
    yield
    torch.set_num_threads(n)
    if m is not None:
        _native.lib().set_num_threads(m)


def _run(capsys, *argv):
    code = main(["bench", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def _expected_weight_bytes(cfg, head_bytes: int) -> int:
    """Bytes one decode step streams, counted from the config alone: per layer two norms, W_pack (+ bias),
    o_proj, gate/up/down in fp32; then the final norm, and the lm_head and one embedding row in the stored
    16-bit dtype they keep on the CPU (`head_bytes` per value)."""
    c, q, kv, i = cfg.hidden_size, cfg.q_size, cfg.kv_size, cfg.intermediate_size
    qkv = q + 2 * kv
    layer = 2 * c + qkv * c + (qkv if cfg.qkv_bias else 0) + c * q + 3 * i * c
    return 4 * (cfg.num_hidden_layers * layer + c) + head_bytes * (cfg.vocab_size * c + c)


def test_bench_json(tiny_omni, capsys, restore_threads):
    code, out, err = _run(capsys, "--model", str(tiny_omni), *ARGS, "--json")
    assert code == 0, err
    r = json.loads(out)
    cfg = load_config(tiny_omni).backbone
    assert (r["device"], r["threads"], r["prompt_tokens"], r["decode_tokens"], r["repeats"]) == ("cpu", 1, 5, 3, 2)
    for key in ("prefill_tok_s", "ttft_ms", "decode_tok_s", "decode_step_ms", "bandwidth_gb_s"):
        s = r[key]
        assert 0 < s["min"] <= s["median"] <= s["max"] < float("inf"), (key, s)
    # decode tok/s and step time are the same measurement seen two ways (median of an even count averages
    # the middle pair, so compare with the min/max, which are exact reciprocals)
    assert r["decode_tok_s"]["max"] == pytest.approx(1e3 / r["decode_step_ms"]["min"], rel=1e-9)
    b = r["bytes_per_token"]
    assert b["weights"] == _expected_weight_bytes(cfg, 2)  # the tiny checkpoint stores bf16
    keys = 5 + (3 + 1) / 2  # mean keys attended over decode positions 5, 6, 7
    assert b["kv"] == 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 4 * keys
    assert b["total"] == b["weights"] + b["kv"]
    assert r["achieved_gb_s"] == pytest.approx(b["total"] * r["decode_tok_s"]["median"] / 1e9)
    assert r["percent_of_bandwidth"] == pytest.approx(100 * r["achieved_gb_s"] / r["bandwidth_gb_s"]["median"])
    assert r["peak_memory"]["bytes"] > b["weights"] and r["peak_memory"]["kind"] == "process peak RSS"
    assert r["bandwidth_gb_s"]["streams"] == 8 and r["bandwidth_gb_s"]["reader_ceiling"] > 0
    assert r["decode_path"]


def test_bench_table(tiny_omni, capsys, restore_threads):
    code, out, err = _run(capsys, "--model", str(tiny_omni), *ARGS)
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[0] == f"omni-edge bench: {tiny_omni}"
    assert lines[1].startswith("device cpu (") and "1 thread(s), float32, quant none, lm_head bf16, 2 layers" in lines[1]
    assert lines[2].startswith("decode path: ")
    assert lines[3] == "| metric | median | min .. max | conditions |"
    rows = {line.split("|")[1].strip(): line for line in lines[5:]}
    want = {"prefill": "tok/s", "time to first token": "ms", "decode": "tok/s", "peak memory": "MiB",
            "bytes per decode token": "MB", "achieved": "GB/s", "measured bandwidth": "GB/s",
            "read loop ceiling": "GB/s"}
    assert set(rows) == set(want)
    for name, unit in want.items():
        cells = [c.strip() for c in rows[name].split("|")[1:-1]]
        assert len(cells) == 4, rows[name]
        m = re.fullmatch(r"([0-9.]+) " + re.escape(unit), cells[1])
        assert m and float(m.group(1)) > 0, rows[name]
    assert "% of the measured bandwidth" in rows["achieved"]


@pytest.mark.parametrize("argv,message", [
    (["--prompt-tokens", "0"], "argument --prompt-tokens: must lie in [1, 1048576], got 0"),
    (["--decode-tokens", "many"], "argument --decode-tokens: expected an integer, got 'many'"),
    (["--device", "tpu"], "argument --device: expected cpu, cuda or cuda:N, got 'tpu'"),
    (["--threads", "100000"], "argument --threads: must lie in [1, "),
    (["--repeats", "0"], "argument --repeats: must lie in [1, 100], got 0"),
])
def test_bench_bad_arguments(tiny_omni, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--model", str(tiny_omni), *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_bench_bad_model_and_context(tiny_omni, tmp_path, capsys):
    code, _, err = _run(capsys, "--model", str(tmp_path / "nowhere"))
    assert code == 2 and err.strip() == f"omni-edge bench: error: model path {tmp_path / 'nowhere'} does not exist"
    code, _, err = _run(capsys, "--model", str(tiny_omni), "--prompt-tokens", "9000", "--decode-tokens", "10")
    limit = load_config(tiny_omni).backbone.max_position_embeddings
    assert code == 2 and err.strip() == (f"omni-edge bench: error: --prompt-tokens + --decode-tokens = 9010 exceeds "
                                         f"the model's context of {limit} positions (max_position_embeddings)")
    with pytest.raises(SystemExit) as e:
        main(["bench"])
    assert e.value.code == 2 and "the following arguments are required: --model" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_bench_cuda_without_gpu(tiny_omni, capsys):
    code, _, err = _run(capsys, "--model", str(tiny_omni), "--device", "cuda")
    assert code == 2 and "no CUDA GPU" in err and len(err.strip().splitlines()) == 1


def test_cpu_read_bandwidth_shape():
    r = bench.cpu_read_bandwidth(2, total_bytes=8 << 20, streams=3, reps=2)
    assert r["streams"] == 6 and r["threads"] == 2 and r["bytes"] >= 6 << 20  # at least 1 MiB per array
    assert 0 < r["min"] <= r["median"] <= r["max"] and r["reader_ceiling"] > 0
    with pytest.raises(ValueError, match="threads, streams and reps must be >= 1"):
        bench.cpu_read_bandwidth(0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_bench_cuda(tiny_omni, capsys):
    code, out, err = _run(capsys, "--model", str(tiny_omni), "--device", "cuda", "--prompt-tokens", "5",
                          "--decode-tokens", "4", "--repeats", "2", "--bandwidth-mb", "64", "--json")
    assert code == 0, err
    r = json.loads(out)
    assert r["peak_memory"]["kind"] == "torch peak CUDA memory allocated" and r["peak_memory"]["bytes"] > 0
    assert r["bandwidth_gb_s"]["median"] > 0 and "CUDA events" in r["bandwidth_gb_s"]["kind"]
    assert 0 < r["decode_tok_s"]["min"] <= r["decode_tok_s"]["max"]
    if r["decode_path"].startswith("cuda graph"):  # the eager step measured beside the graph
        assert 0 < r["decode_tok_s_eager"]["min"] <= r["decode_tok_s_eager"]["max"]
        assert "decode, eager step (peer)" in bench.format_table(r)
