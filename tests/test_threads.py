"""The one CPU thread pool (csrc/common/pool.h) and the thread-count switch.

- The pool itself: every chunk runs exactly once (0, 1, many chunks, odd counts, capped jobs), an exception in
  a chunk reaches the caller and leaves the pool usable, concurrent callers run side by side (a second job is
  not queued behind a long first one), a forked child still computes.
- Every kernel family gives identical results at 1, 2 and 3 pool threads: each output element is computed by
  one thread in a fixed order whatever the chunking, so the comparison is bitwise. The one exception is
  attention decode with automatic splits (the split count follows the thread count): with the splits fixed
  it is bitwise, with automatic splits it is compared at fp32 summation-order tolerance.
- Two Python threads calling native kernels at once get the results of a quiet single call.
- OMNI_EDGE_THREADS / knobs.set("threads") / --threads parsing and application (OMP_NUM_THREADS has no say).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest
import torch

from omni_edge import _native, cli_args, knobs
from omni_edge.ops import attention as A
from omni_edge.ops import q4
from omni_edge.ops import rvq as R

lib = _native.lib()


@pytest.fixture
def pool_size():
    """`pool_size(n)` sets the pool's size for the rest of the test; the size before is restored afterwards."""
    before = lib.num_threads()
    yield lib.set_num_threads
    lib.set_num_threads(before)


def run_job(chunks, *, max_threads=0, fail_at=-1, work_us=0.0, helper_sleep_us=0.0):
    counts = torch.zeros(max(chunks, 1), dtype=torch.int64)
    used = lib.pool_test_job(counts.data_ptr(), chunks, max_threads, fail_at, work_us, helper_sleep_us)
    return counts[:chunks], used


def expected(chunks):
    return torch.arange(1, chunks + 1, dtype=torch.int64)


# ------------------------------------------------------------------------------------------------
# The pool
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [1, 2, 3])
@pytest.mark.parametrize("chunks", [0, 1, 2, 7, 1000, 20011])
def test_every_chunk_runs_once(pool_size, size, chunks):
    pool_size(size)
    counts, used = run_job(chunks)
    assert torch.equal(counts, expected(chunks))
    assert used <= max(1, min(size, chunks))


def test_job_cap_and_scoped_size(pool_size):
    pool_size(3)
    counts, used = run_job(64, max_threads=1, work_us=50.0)
    assert torch.equal(counts, expected(64)) and used == 1  # max_threads=1: the caller alone
    counts, used = run_job(64, max_threads=2, work_us=50.0)
    assert torch.equal(counts, expected(64)) and used <= 2
    assert lib.num_threads() == 3
    pool_size(0)  # back to the default: the CPUs this process may use
    assert lib.num_threads() == knobs.cpu_count() == lib.build_info()["threads_default"]


def test_workers_take_part(pool_size):
    """With two threads and chunks long enough for a worker to wake, some chunks run off the caller's thread
    (on a loaded machine the worker may be late for one job, so a few jobs are tried)."""
    pool_size(2)
    before = lib.pool_stats()["helped_chunks"]
    for _ in range(20):
        counts, used = run_job(200, work_us=100.0)
        assert torch.equal(counts, expected(200))
        if used == 2:
            break
    assert used == 2
    deadline = time.monotonic() + 5  # a worker adds its count after its last chunk, maybe after the caller returned
    while lib.pool_stats()["helped_chunks"] == before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert lib.pool_stats()["helped_chunks"] > before


def test_back_off_after_a_stalled_helper(pool_size):
    """A worker that holds a chunk while off its core (here it sleeps 20 ms inside its chunk) stalls its
    caller; the next jobs then run at half width (the caller alone at size 2), and a size change resets that."""
    pool_size(2)
    before = lib.pool_stats()
    for _ in range(20):  # the worker must take part to hold a chunk (on a loaded machine it may be late)
        counts, used = run_job(200, work_us=50.0, helper_sleep_us=20000.0)
        assert torch.equal(counts, expected(200))
        if used == 2:
            break
    assert used == 2
    stalled = lib.pool_stats()
    assert stalled["stalls"] > before["stalls"]
    counts, used = run_job(200, work_us=50.0)
    assert torch.equal(counts, expected(200)) and used == 1
    assert lib.pool_stats()["backoff_jobs"] > stalled["backoff_jobs"]
    pool_size(2)  # resets the back-off: workers take part again
    for _ in range(20):
        counts, used = run_job(200, work_us=100.0)
        assert torch.equal(counts, expected(200))
        if used == 2:
            break
    assert used == 2


@pytest.mark.parametrize("fail_at", [0, 5, 999])
def test_exception_reaches_caller_and_pool_stays_usable(pool_size, fail_at):
    pool_size(2)
    for _ in range(5):
        with pytest.raises(RuntimeError, match=f"chunk {fail_at} failed"):
            run_job(1000, fail_at=fail_at, work_us=2.0)
        counts, _ = run_job(1000, work_us=2.0)
        assert torch.equal(counts, expected(1000))
    with pytest.raises(RuntimeError, match="chunk 0 failed"):  # single chunk: runs inline on the caller
        run_job(1, fail_at=0)


def test_concurrent_callers_are_not_serialised(pool_size):
    """A short job started while a long one runs finishes long before the long one: it runs on its own
    caller's thread (and any idle worker) instead of waiting for the pool. The long job takes ~0.3-0.6 s of
    busy work; the short one ~5 ms, so the bound (a quarter of the long job) leaves room for a loaded machine."""
    pool_size(2)
    long_started = threading.Event()
    result = {}

    def long_job():
        long_started.set()
        t0 = time.perf_counter()
        result["long"] = run_job(300, work_us=2000.0)
        result["long_s"] = time.perf_counter() - t0

    t = threading.Thread(target=long_job)
    t.start()
    long_started.wait()
    time.sleep(0.02)  # the long job is now in the pool
    t0 = time.perf_counter()
    short, _ = run_job(50, work_us=100.0)
    short_s = time.perf_counter() - t0
    t.join(timeout=60)
    assert not t.is_alive()
    assert torch.equal(short, expected(50))
    assert torch.equal(result["long"][0], expected(300))
    assert short_s < result["long_s"] / 4, (short_s, result["long_s"])


def test_many_concurrent_callers(pool_size):
    """More callers than job slots (8): every job completes correctly (the overflow runs on its caller),
    no deadlock, bounded time."""
    pool_size(2)
    errors = []

    def hammer(i):
        for j in range(15):
            n = 1 + (i * 37 + j * 11) % 300
            counts, _ = run_job(n, work_us=5.0)
            if not torch.equal(counts, expected(n)):
                errors.append((i, j))

    ts = [threading.Thread(target=hammer, args=(i,)) for i in range(12)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in ts)
    assert not errors


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_forked_child_computes(pool_size):
    pool_size(2)
    run_job(100, work_us=10.0)  # the workers exist in the parent
    code = ("import os, torch\n"
            "from omni_edge import _native\n"
            "lib = _native.lib(); lib.set_num_threads(2)\n"
            "c = torch.zeros(100, dtype=torch.int64); lib.pool_test_job(c.data_ptr(), 100, 0, -1, 10.0)\n"
            "pid = os.fork()\n"
            "if pid == 0:\n"
            "    c.zero_(); lib.pool_test_job(c.data_ptr(), 500, 0, -1, 5.0) if False else None\n"
            "    d = torch.zeros(500, dtype=torch.int64); lib.pool_test_job(d.data_ptr(), 500, 0, -1, 5.0)\n"
            "    os._exit(0 if bool((d == torch.arange(1, 501)).all()) else 3)\n"
            "_, st = os.waitpid(pid, 0)\n"
            "raise SystemExit(os.waitstatus_to_exitcode(st))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


# ------------------------------------------------------------------------------------------------
# Every kernel family: the same results at 1, 2 and 3 threads
# ------------------------------------------------------------------------------------------------

def at_sizes(pool_size, fn, sizes=(1, 2, 3)):
    out = []
    for n in sizes:
        pool_size(n)
        out.append(fn())
    return out


def assert_all_equal(results):
    first = results[0]
    for r in results[1:]:
        if isinstance(first, (tuple, list)):
            for a, b in zip(first, r):
                assert torch.equal(a, b)
        else:
            assert torch.equal(first, r)


def q4_layer(k, n, seed):
    gen = torch.Generator().manual_seed(seed)
    return q4.qweight_rtn(torch.randn(n, k, generator=gen) * 0.05, group_size=32,
                          bias=torch.randn(n, generator=gen))


@pytest.mark.parametrize("exact", [True, False])
def test_q4_matmul_bitwise_across_thread_counts(pool_size, exact):
    w = q4_layer(160, 1000, seed=1)  # N = 1000: 63 column tiles, the last one partial
    x = torch.randn(7, 160, generator=torch.Generator().manual_seed(2))
    with q4.exact_mode(exact):
        assert_all_equal(at_sizes(pool_size, lambda: (q4.matmul(x[:1], w), q4.matmul(x, w))))


def test_q4_repack_bitwise_across_thread_counts(pool_size):
    k, n = 96, 296  # 19 column tiles, the last one partial
    gen = torch.Generator().manual_seed(3)
    qweight = torch.randint(-2**31, 2**31 - 1, (k // 8, n), dtype=torch.int32, generator=gen)
    perm = torch.randperm(k, generator=gen).to(torch.int32)

    def repack():
        codes = torch.empty(-(-n // 16), k // 8, 16, dtype=torch.int32)
        lib.q4_repack_gptq_cpu(qweight.data_ptr(), k, n, perm.data_ptr(), k, codes.data_ptr())
        return codes

    results = at_sizes(pool_size, repack)
    assert_all_equal(results)
    assert torch.equal(results[0], q4._tile_codes(q4._gptq_columns(qweight), k, n, perm.long()))  # the torch spec


def test_gemv_bitwise_across_thread_counts(pool_size):
    gen = torch.Generator().manual_seed(4)
    n, k = 1003, 131
    W, x, b = torch.randn(n, k, generator=gen), torch.randn(k, generator=gen), torch.randn(n, generator=gen)

    def gemv():
        y = torch.empty(n)
        lib.gemv_f32_cpu(W.data_ptr(), x.data_ptr(), b.data_ptr(), n, k, y.data_ptr())
        return y

    results = at_sizes(pool_size, gemv)
    assert_all_equal(results)
    # and it is the product: fp32 sums of 131 terms against float64, relative to the magnitude of the terms
    ref = (W.double() @ x.double() + b.double())
    mag = W.double().abs() @ x.double().abs() + b.double().abs()
    assert ((results[0].double() - ref).abs() <= 1e-5 * mag + 1e-6).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_bitwise_across_thread_counts(pool_size, dtype):
    gen = torch.Generator().manual_seed(5)
    b, t, hq, hkv, s, d = 2, 37, 6, 2, 700, 80

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    q, k_cache, v_cache = rnd(b, t, hq, d), rnd(b, hkv, s, d), rnd(b, hkv, s, d)
    qd = rnd(b, hq, d)
    lengths = torch.tensor([700, 333], dtype=torch.int32)
    cu = torch.tensor([0, 5, 5, 61, 90], dtype=torch.int32)
    qv, kv, vv = rnd(90, 3, d), rnd(90, 3, d), rnd(90, 3, d)

    def fixed():
        return (A.prefill(q, k_cache, v_cache, start=600, lengths=lengths),
                A.decode(qd, k_cache, v_cache, lengths, num_splits=1),
                A.decode(qd, k_cache, v_cache, lengths, num_splits=3),
                A.varlen(qv, kv, vv, cu))

    assert_all_equal(at_sizes(pool_size, fixed))
    # Automatic splits follow the thread count, so the summation order differs: fp32 accumulation noise
    # (1e-5 relative) before the output's own rounding (one bf16 ulp, 2^-8 relative).
    auto = at_sizes(pool_size, lambda: A.decode(qd, k_cache, v_cache, lengths).float())
    tol = 1e-5 if dtype == torch.float32 else 2.0 ** -7
    for r in auto[1:]:
        assert ((r - auto[0]).abs() <= tol * (1 + auto[0].abs())).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rvq_bitwise_across_thread_counts(pool_size, dtype):
    gen = torch.Generator().manual_seed(6)
    d = 1300  # two dims chunks in decode, the second partial
    books = R.Codebooks([(torch.randn(n, d, generator=gen) * 0.3).to(dtype) for n in (300, 129, 1)])
    x = torch.randn(45, d, generator=gen)
    codes = torch.stack([torch.randint(0, n, (45,), generator=gen) for n in (300, 129, 1)], dim=1)
    ptrs, sizes, dim, dt = books._table()

    def own_norms():  # norms computed in the kernel (the pool's norm loop)
        out = torch.empty(45, 3, dtype=torch.int64)
        lib.rvq_encode_cpu(x.data_ptr(), 45, ptrs, sizes, dim, dt, [0, 0, 0], out.data_ptr())
        return out

    results = at_sizes(pool_size, lambda: (R.decode(codes, books), R.decode(codes[:1], books),
                                           R.encode(x, books), own_norms()))
    assert_all_equal(results)
    assert torch.equal(results[0][2], R.encode_ref(x, books))
    assert torch.equal(results[0][3], results[0][2])


def test_native_kernels_from_two_python_threads(pool_size):
    """An encoder-like caller (RVQ encode + attention varlen) and a decoder-like one (q4 GEMV + attention
    decode) on two Python threads at once: each gets exactly the results of its quiet single-threaded run."""
    pool_size(2)
    gen = torch.Generator().manual_seed(7)
    w = q4_layer(256, 600, seed=8)
    xs = torch.randn(1, 256, generator=gen)
    k_cache, v_cache = torch.randn(1, 2, 512, 64, generator=gen), torch.randn(1, 2, 512, 64, generator=gen)
    qd, lengths = torch.randn(1, 8, 64, generator=gen), torch.tensor([500], dtype=torch.int32)
    books = R.Codebooks([torch.randn(256, 128, generator=gen) for _ in range(4)])
    xe = torch.randn(64, 128, generator=gen)
    qv = torch.randn(120, 4, 64, generator=gen)
    cu = torch.tensor([0, 50, 120], dtype=torch.int32)

    def decoder():
        return q4.matmul(xs, w), A.decode(qd, k_cache, v_cache, lengths, num_splits=2)

    def encoder():
        return R.encode(xe, books), A.varlen(qv, qv, qv, cu)

    want = {"dec": decoder(), "enc": encoder()}
    errors = []

    def loop(name, fn):
        for i in range(25):
            got = fn()
            if not all(torch.equal(a, b) for a, b in zip(got, want[name])):
                errors.append((name, i))

    ts = [threading.Thread(target=loop, args=("dec", decoder)), threading.Thread(target=loop, args=("enc", encoder))]
    t0 = time.perf_counter()
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in ts), "deadlock: a caller did not return"
    assert not errors
    assert time.perf_counter() - t0 < 120


# ------------------------------------------------------------------------------------------------
# The switch: OMNI_EDGE_THREADS, knobs.set("threads"), --threads
# ------------------------------------------------------------------------------------------------

def test_knob_parsing():
    n = knobs.cpu_count()
    assert knobs._from_env({"OMNI_EDGE_THREADS": "1"}).threads == 1
    assert knobs._from_env({"OMNI_EDGE_THREADS": f" {n} "}).threads == n
    s = knobs._from_env({})
    assert s.threads is None and s.source["threads"] == "default" and not s.problems
    for bad in ("0", "-1", "two", "1.5", str(n + 1), "1e3"):
        s = knobs._from_env({"OMNI_EDGE_THREADS": bad})
        assert s.threads is None and s.source["threads"] == "default"
        assert len(s.problems) == 1 and s.problems[0].startswith(f"OMNI_EDGE_THREADS={bad!r}"), s.problems
        assert f"1 to {n}" in s.problems[0] or f"[1, {n}]" in s.problems[0], s.problems
    for bad in (0, n + 1, "x", 1.5, True):
        with pytest.raises(ValueError, match="threads"):
            knobs.set("threads", bad)
    row = [r for r in knobs.table() if r["name"] == "threads"][0]
    assert row["variable"] == "OMNI_EDGE_THREADS"


def test_knob_sizes_pool_and_torch(pool_size):
    torch_before = torch.get_num_threads()
    try:
        with knobs.override(threads=1):
            assert lib.num_threads() == 1 and torch.get_num_threads() == 1
            counts, used = run_job(100, work_us=20.0)
            assert torch.equal(counts, expected(100)) and used == 1
        assert knobs.settings().threads is None
        assert lib.num_threads() == knobs.cpu_count()  # unset again: the CPUs this process may use
    finally:
        torch.set_num_threads(torch_before)


@pytest.mark.slow  # two fresh interpreters importing torch: ~5-15 s on a loaded 2-core machine
def test_environment_sets_pool_and_omp_does_not():
    code = ("from omni_edge import _native; import torch; lib = _native.lib(); "
            "print(lib.num_threads(), torch.get_num_threads())")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("OMNI_EDGE_THREADS", None)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert int(r.stdout.split()[0]) == knobs.cpu_count()  # OMP_NUM_THREADS has no say over the pool
    env = dict(env, OMNI_EDGE_THREADS="1", OMP_NUM_THREADS=str(knobs.cpu_count()))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["1", "1"]


@pytest.mark.parametrize("command", [["chat", "--model", "MODEL"], ["demo"], ["quantize", "SRC", "OUT"], ["export", "BUNDLE"]])
def test_threads_option_on_computing_commands(command, capsys):
    from omni_edge.cli import build_parser
    parser = build_parser()
    args = parser.parse_args(command + ["--threads", "1"])
    assert args.threads == 1
    assert parser.parse_args(command).threads is None
    for bad in ("0", str(knobs.cpu_count() + 1), "x"):
        with pytest.raises(SystemExit) as e:
            parser.parse_args(command + ["--threads", bad])
        assert e.value.code == 2
        assert "--threads" in capsys.readouterr().err


def test_apply_threads(pool_size):
    torch_before = torch.get_num_threads()
    settings_before = knobs.settings()
    try:
        cli_args.apply_threads(None)
        assert knobs.settings().threads == settings_before.threads
        cli_args.apply_threads(1)
        assert knobs.settings().threads == 1 and lib.num_threads() == 1 and torch.get_num_threads() == 1
    finally:
        knobs.set("threads", settings_before.threads)
        torch.set_num_threads(torch_before)


def test_command_sets_passive_openmp_waiting(monkeypatch, capsys):
    """`omni-edge` asks torch's OpenMP threads to sleep rather than spin while waiting (what keeps a 2-thread
    prefill from collapsing when another process takes a core); a value the user set is kept."""
    from omni_edge.cli import main
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    main(["info"])
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    main(["info"])
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"
    capsys.readouterr()
