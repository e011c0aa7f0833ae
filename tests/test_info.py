"""The package surface that needs no model: light import, `omni-edge info`, dispatch switches."""

import json
import os
import subprocess
import sys

import pytest


def run_cli(*args, env=None, **kw):
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "omni_edge", *args], capture_output=True, text=True,
                          env=e, timeout=300, **kw)


def test_import_is_light():
    code = ("import sys, omni_edge; heavy = [m for m in ('torch', 'transformers', 'onnx', 'onnxruntime', "
            "'tensorrt', 'omni_edge._C') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_info_reports_build():
    r = run_cli("info")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    for field in ("CPU ISA features:", "CPU kernel level:", "CPU threads:", "CUDA kernels compiled:"):
        assert field in out, out
    from omni_edge import _native

    info = _native.lib().build_info()
    assert f"{info['isa_available']} available" in out
    if info["cuda_compiled"]:
        assert "sm_80" in out and "sm_87" in out
    assert ("GPU found:             no" in out) == (not _native.lib().cuda_devices())


def test_info_respects_isa_cap():
    r = run_cli("info", env={"OMNI_EDGE_ISA": "scalar"})
    assert r.returncode == 0, r.stderr
    assert "scalar used" in r.stdout


def test_help_lists_subcommands():
    r = run_cli("--help")
    assert r.returncode == 0
    for cmd in ("chat", "demo", "quantize", "info", "verify", "inspect"):
        assert cmd in r.stdout


def test_self_check_cache_roundtrip(tmp_path):
    from omni_edge import knobs
    from omni_edge.ops import _dispatch

    result = {f: {"ok": f != "rvq", "error": "" if f != "rvq" else "boom"} for f in _dispatch.FAMILIES}
    with knobs.override(cache_dir=tmp_path):  # the Python equivalent of OMNI_EDGE_CACHE
        _dispatch._store_cache("GPU X|sm_87|omni-edge 0", result)
    data = json.loads((tmp_path / "selfcheck.json").read_text())
    assert data["GPU X|sm_87|omni-edge 0"]["rvq"]["ok"] is False
    assert not list(tmp_path.glob("*.tmp*"))


def test_native_can_be_disabled():
    import torch

    from omni_edge import knobs
    from omni_edge.ops import _dispatch

    assert _dispatch.native_enabled("q4", torch.device("cpu"))
    with knobs.override(native=False):  # the Python equivalent of OMNI_EDGE_NATIVE=0
        assert not _dispatch.native_enabled("q4", torch.device("cpu"))
    assert _dispatch.native_enabled("q4", torch.device("cpu"))


@pytest.mark.cuda
def test_self_check_on_gpu():
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    r = run_cli("info", "--self-check")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "cuda:0" in r.stdout
