"""qcore._team and _parallel.run_chunks: the OpenMP team, and the thread and one-thread paths it falls back to,
give the same bytes; a forked child and QCORE_OMP_TEAM=0 work, and a child forked after a team call can start a team
of its own; torch loaded later moves qcore to torch's team."""

import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
from numba import carray

import qcore
import qcore._parallel as P
from qcore import PerChannel, PerGroup, PerTensor, QuantScheme, _team
from tests.qcore.reference import ref_quantize

HAS_TEAM = _team.gomp_parallel() is not None


def _work(bits):
    rng = np.random.default_rng(bits)
    x = rng.standard_normal((300, 1000)).astype(np.float32)  # several chunks of every kernel
    codes = rng.integers(0, 1 << bits, (300, 1000), dtype=np.uint8)
    odd = rng.integers(0, 1 << bits, (5000, 33), dtype=np.uint8)  # rows path
    out = [qcore.pack(codes, bits), qcore.pack(odd, bits), qcore.unpack(qcore.pack(codes, bits), bits, 1000)]
    for scheme in (QuantScheme(bits, False, PerGroup(100)), QuantScheme(bits, True, PerChannel(0)),
                   QuantScheme(bits, False, PerTensor())):
        qa = qcore.quantize(x, scheme)
        out += [qa.codes, qa.scale, qcore.dequantize(qa)]
    return out


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_team_threads_and_one_thread_give_the_same_bytes(threads, monkeypatch, bits):
    P_MIN = 1 << 10
    monkeypatch.setattr(qcore.packing, "_PARALLEL_MIN_CODES", P_MIN)  # many chunks even on small arrays
    threads(3)
    on_team = _work(bits)
    monkeypatch.setattr(_team, "gomp_parallel", lambda: None)  # as where no OpenMP runtime is found
    on_threads = _work(bits)
    threads(1)
    alone = _work(bits)
    for a, b, c in zip(on_team, on_threads, alone):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)


def test_team_results_equal_the_reference(threads):
    threads(2)
    x = np.random.default_rng(7).standard_normal((520, 768)).astype(np.float64)
    for scheme in (QuantScheme(8, True, PerTensor()), QuantScheme(4, False, PerGroup(64))):
        qa = qcore.quantize(x, scheme)
        codes, scale, _ = ref_quantize(x, scheme)
        np.testing.assert_array_equal(qa.codes, codes)
        np.testing.assert_array_equal(qa.scale, scale)


def test_run_chunks_covers_the_range_and_names_too_many_operands(threads):
    threads(2)
    with pytest.raises(ValueError, match="at most 13 operands"):
        P.run_chunks(qcore.packing._TEAM_PACK[4], tuple(range(14)), 10, 1)
    assert P.team_chunks(0, 1) == 1 and P.team_chunks(100, 1000) == 1
    assert P.team_chunks(1 << 30, 1) == P.TEAM_CHUNKS_PER_THREAD * P.NUM_THREADS


def test_own_spinners_count_only_right_after_a_team_call(monkeypatch):
    monkeypatch.setattr(_team, "_LAST_SIZE", 2)
    monkeypatch.setattr(_team, "_LAST_END", _team.time.monotonic())
    assert _team.own_spinners() == 1
    monkeypatch.setattr(_team, "_LAST_END", _team.time.monotonic() - 2 * _team.SPIN_WINDOW_S)
    assert _team.own_spinners() == 0


def test_on_torchs_team_the_whole_team_runs_whatever_the_load(monkeypatch):
    # torch's workers spin after each of its ops and read as busy cores; they are the workers a call runs on
    monkeypatch.setattr(_team, "_CAP", None)  # no starved call before (thread_cap: tests below)
    monkeypatch.setattr(_team, "_LEVEL", 0)
    monkeypatch.setattr(P, "NUM_THREADS", 4)
    monkeypatch.setattr(P, "busy_cores", lambda: 100.0)
    monkeypatch.setattr(_team, "team_threads", lambda: 4)
    monkeypatch.setattr(_team, "on_torch_team", lambda: True)
    assert P.threads(team=True) == 4
    monkeypatch.setattr(_team, "team_threads", lambda: 1)  # torch.set_num_threads(1)
    assert P.threads(team=True) == 1
    monkeypatch.setattr(_team, "team_threads", lambda: 4)
    monkeypatch.setattr(_team, "on_torch_team", lambda: False)
    assert P.threads(team=True) == 1 and P.threads() == 1


@pytest.mark.skipif(not HAS_TEAM, reason="no OpenMP runtime here")
def test_torch_set_num_threads_1_keeps_qcore_on_one_thread():
    pytest.importorskip("torch")
    out = _run("""
        import torch, qcore._parallel as P, qcore._team as T
        P.NUM_THREADS, P.DYNAMIC = 2, False
        torch.set_num_threads(1)
        a = P.threads(team=T.gomp_parallel() is not None)
        torch.set_num_threads(2)
        print(a, P.threads(team=T.gomp_parallel() is not None), T.on_torch_team())
    """)
    assert out.split() == ["1", "2", "True"]


def test_busy_cores_leaves_out_the_teams_own_spinners(monkeypatch):
    monkeypatch.setattr(_team, "_LOADAVG_FD", None)
    monkeypatch.setattr(_team.os, "open", lambda *a: 99)
    monkeypatch.setattr(_team.os, "pread", lambda fd, n, off: b"0.50 0.40 0.30 3/120 4242")  # 3 runnable: us + 2
    monkeypatch.setattr(_team, "own_spinners", lambda: 1)
    assert P.busy_cores() == 1
    monkeypatch.setattr(_team, "own_spinners", lambda: 0)
    assert P.busy_cores() == 2


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_packs_and_quantizes_without_the_parents_team(threads):
    threads(2)
    codes = np.random.default_rng(1).integers(0, 16, (1024, 1024), dtype=np.uint8)
    x = np.random.default_rng(2).standard_normal((512, 512)).astype(np.float32)
    packed, qa = qcore.pack(codes, 4), qcore.quantize(x, QuantScheme(4, False, PerGroup(64)))
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        import signal
        signal.alarm(60)  # a hang ends the child instead of the test run
        code = 3
        try:
            assert _team.gomp_parallel() is None
            same = (np.array_equal(qcore.pack(codes, 4), packed)
                    and np.array_equal(qcore.quantize(x, qa.scheme).codes, qa.codes))
            code = 0 if same else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


@pytest.mark.skipif(not HAS_TEAM or not hasattr(os, "register_at_fork"), reason="needs an OpenMP runtime and fork")
def test_a_child_forked_after_a_team_call_can_start_a_team_on_the_same_runtime():
    # GNU OpenMP keeps a team's idle workers in the pool of the thread that started it; a child forked from that
    # thread has the pool but not the threads, and its next 2-thread team (torch's, an OpenMP BLAS's) waited for
    # them forever. qcore releases them before the fork.
    out = _run("""
        import os, signal, numba, numpy as np, qcore, qcore._team as T, qcore._parallel as P
        P.NUM_THREADS, P.DYNAMIC = 2, False
        qcore.pack(np.random.default_rng(0).integers(0, 16, (2048, 2048), dtype=np.uint8), 4)  # a 2-thread team
        gomp, noop = T.gomp_parallel(), numba.cfunc("void(voidptr)")(lambda data: None)
        pid = os.fork()
        if pid == 0:
            signal.alarm(20)  # a hang ends the child (SIGALRM) instead of the test run
            gomp(noop.address, 0, 2, 0)  # another library's 2-thread team, on the runtime qcore used
            os._exit(7)
        _, status = os.waitpid(pid, 0)
        print(T._LAST_SIZE, os.waitstatus_to_exitcode(status))
        gomp(noop.address, 0, 2, 0)  # the parent's team starts again
    """, OMP_NUM_THREADS="2")  # a 2-thread team even on one core
    assert out.split() == ["2", "7"]


def _run(code: str, **env) -> str:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                         timeout=300, env={**os.environ, **env})
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_qcore_omp_team_0_uses_threads():
    out = _run("""
        import numpy as np, qcore, qcore._team as T, qcore._parallel as P
        P.NUM_THREADS, P.DYNAMIC = 2, False
        c = np.random.default_rng(0).integers(0, 4, (2048, 2048), dtype=np.uint8)
        assert np.array_equal(qcore.unpack(qcore.pack(c, 2), 2, 2048), c)
        print(T.gomp_parallel())
    """, QCORE_OMP_TEAM="0")
    assert out.strip() == "None"


@pytest.mark.skipif(not HAS_TEAM, reason="no OpenMP runtime here")
def test_torch_loaded_later_moves_qcore_to_torchs_team():
    pytest.importorskip("torch")
    out = _run("""
        import numpy as np, qcore, qcore._team as T, qcore._parallel as P
        P.NUM_THREADS, P.DYNAMIC = 2, False
        # the team is looked up again at most once a second: without this, an import of torch faster than that
        # (a warm page cache) left the second pack on the first lookup and the test depended on the clock
        T._RESOLVE_INTERVAL_S = 0.0
        c = np.random.default_rng(0).integers(0, 16, (2048, 2048), dtype=np.uint8)
        p = qcore.pack(c, 4)
        before = T._RESOLVED_WITH_TORCH
        import torch
        assert np.array_equal(qcore.pack(c, 4), p)
        print(before, T._RESOLVED_WITH_TORCH, T.gomp_parallel() is not None)
    """)
    assert out.split() == ["False", "True", "True"]


@pytest.mark.parametrize("bits", [1, 3, 4, 5, 7])
def test_streams_at_odd_byte_offsets(threads, monkeypatch, bits):
    # a tensor inside a checkpoint (or a row chunk) may start at any byte: the word kernels load unaligned
    threads(2)
    monkeypatch.setattr(qcore.packing, "_PARALLEL_MIN_CODES", 1 << 10)
    rng = np.random.default_rng(bits)
    codes = rng.integers(0, 1 << bits, 64 * 1000 + 9, dtype=np.uint8)
    packed = qcore.pack(codes, bits)
    for offset in (1, 3, 5):
        buf = np.zeros(codes.size + offset, np.uint8)
        buf[offset:] = codes
        np.testing.assert_array_equal(qcore.pack(buf[offset:], bits), packed)
        pbuf = np.zeros(packed.size + offset, np.uint8)
        pbuf[offset:] = packed
        np.testing.assert_array_equal(qcore.unpack(pbuf[offset:], bits, codes.size), codes)
    rows = rng.integers(0, 1 << bits, (300, 71), dtype=np.uint8)  # padded path: 71-code rows end mid-byte
    np.testing.assert_array_equal(qcore.unpack(qcore.pack(rows, bits), bits, 71), rows)


def test_misaligned_floats_are_quantized_like_aligned_ones_and_out_must_be_aligned(threads):
    threads(2)
    x = np.random.default_rng(3).standard_normal((256, 512)).astype(np.float32)
    buf = np.zeros(x.nbytes + 1, np.uint8)
    odd = np.frombuffer(buf[1:].data, np.float32).reshape(x.shape)  # a float32 view at an odd address
    odd[...] = x
    assert not odd.flags.aligned
    for scheme in (QuantScheme(4, False, PerGroup(64)), QuantScheme(8, True, PerTensor())):
        a, b = qcore.quantize(x, scheme), qcore.quantize(odd, scheme)
        np.testing.assert_array_equal(a.codes, b.codes)
        np.testing.assert_array_equal(a.scale, b.scale)
    qa = qcore.quantize(x, QuantScheme(4, False, PerGroup(64)))
    with pytest.raises(ValueError, match="aligned"):
        qcore.dequantize(qa, out=odd)


def test_run_chunks_uses_the_chunk_count_it_is_given(threads):
    threads(2)
    codes = np.random.default_rng(0).integers(0, 16, 64 * 100, dtype=np.uint8)
    out = np.empty(codes.size // 2, np.uint8)
    res = P.run_chunks(qcore.packing._TEAM_PACK[4], (4, codes.ctypes.data, 1, codes.size, out.ctypes.data, out.size),
                       100, 1, keep=(codes, out), nchunks=3)
    assert res.shape == (3,)
    np.testing.assert_array_equal(out, qcore.pack(codes, 4))


def test_torch_half_imported_is_asked_again_later():
    # a qcore call while another thread is still importing torch (torch in sys.modules, libtorch_cpu not yet
    # mapped) must not settle on a team of its own for good
    pytest.importorskip("torch")
    out = _run("""
        import sys, time, types, qcore._team as T
        stub = types.ModuleType("torch")
        stub.__file__ = "torch/__init__.py"   # torch's import under way
        sys.modules["torch"] = stub
        T.gomp_parallel()
        before = T._RESOLVED_WITH_TORCH, T.on_torch_team()
        del sys.modules["torch"]
        import torch
        time.sleep(T._RESOLVE_INTERVAL_S)
        T.gomp_parallel()
        print(*before, T._RESOLVED_WITH_TORCH, T.on_torch_team())
    """)
    assert out.split() == ["False", "False", "True", "True"]


def test_a_hidden_or_stub_torch_is_no_torch_and_costs_no_rescans():
    out = _run("""
        import sys, types, qcore._team as T
        sys.modules["torch"] = None   # the usual way to hide torch
        T.gomp_parallel()
        first = T._LAST_RESOLVE
        for _ in range(100):
            T.gomp_parallel()
        print(T._LAST_RESOLVE == first, T.on_torch_team())
    """)
    assert out.split() == ["True", "False"]


@pytest.mark.skipif(not HAS_TEAM, reason="no OpenMP runtime here")
def test_a_torch_without_openmp_is_not_called_torchs_team():
    pytest.importorskip("torch")
    out = _run("""
        import qcore._team as T
        T.torch_gomp_parallel = lambda: None   # as a torch built on TBB or its native pool
        import torch
        print(T.gomp_parallel() is not None, T.on_torch_team(), T.team_threads() >= 1)
    """)
    assert out.split() == ["True", "False", "True"]


def _claims_without_counting(data):  # a kernel compiled against an older block layout: no done count
    head = carray(data, _team.HEADER, np.int64)
    block = carray(data, _team.HEADER + head[1], np.int64)
    while _team.claim(block) < head[1]:
        pass


def test_thread_path_waits_only_for_claimed_chunks_and_names_a_stale_kernel(threads, monkeypatch):
    threads(2)
    monkeypatch.setattr(_team, "gomp_parallel", lambda: None)  # the Python-thread path
    gate, started = threading.Event(), []

    class LatePool:  # a pool thread that gets no core until the test lets it
        def submit(self, fn, *args):
            def late():
                gate.wait(20)
                started.append(1)
                fn(*args)
            threading.Thread(target=late).start()

    monkeypatch.setattr(P, "_pool", LatePool)
    codes = np.random.default_rng(0).integers(0, 16, 64 * 1000, dtype=np.uint8)
    out = np.empty(codes.size // 2, np.uint8)
    P.run_chunks(qcore.packing._TEAM_PACK[4], (4, codes.ctypes.data, 1, codes.size, out.ctypes.data, out.size),
                 1000, 10, keep=(codes, out))
    assert not started  # the caller ran every chunk itself and did not wait for the late thread
    gate.set()
    np.testing.assert_array_equal(out, qcore.pack(codes, 4))
    monkeypatch.setattr(P, "_pool", lambda: __import__("concurrent.futures").futures.ThreadPoolExecutor(1))
    with pytest.raises(RuntimeError, match="delete qcore/__pycache__"):
        P.run_chunks(_team.TeamKernel(_claims_without_counting), (), 1000, 10)


@pytest.mark.skipif(not HAS_TEAM, reason="no OpenMP runtime here")
def test_torchs_thread_count_holds_on_every_python_thread():
    # libgomp keeps the count per thread; torch's setting is read from torch
    pytest.importorskip("torch")
    out = _run("""
        import threading, torch, qcore._team as T
        torch.set_num_threads(1)
        seen = []
        t = threading.Thread(target=lambda: seen.append(T.team_threads()))
        t.start(); t.join()
        print(T.team_threads(), *seen)
    """)
    assert out.split() == ["1", "1"]


def test_no_more_threads_than_chunks(threads, monkeypatch):
    threads(4)
    monkeypatch.setattr(_team, "gomp_parallel", lambda: None)
    submitted = []

    class CountingPool:
        def submit(self, fn, *args):
            submitted.append(1)
            threading.Thread(target=fn, args=args).start()

    monkeypatch.setattr(P, "_pool", CountingPool)
    codes = np.random.default_rng(0).integers(0, 16, 64 * 100, dtype=np.uint8)
    out = np.empty(codes.size // 2, np.uint8)
    P.run_chunks(qcore.packing._TEAM_PACK[4], (4, codes.ctypes.data, 1, codes.size, out.ctypes.data, out.size),
                 100, 1, keep=(codes, out), nchunks=2)
    assert len(submitted) == 1  # two chunks: the caller and one pool thread
    np.testing.assert_array_equal(out, qcore.pack(codes, 4))


# --- the block's operands, and a kernel compiled against an older block layout


def test_operands_pack_named_typed_fields_and_name_what_is_wrong():
    spec = _team.Operands("demo", n=_team.I64, a=_team.F64, x=_team.ADDR)
    x = np.zeros(3)
    assert spec.pack(n=3, a=0.5, x=x) == (3, int(np.float64(0.5).view(np.int64)), x.ctypes.data)
    assert spec.pack(a=-2, x=7, n=np.int64(4)) == (4, int(np.float64(-2).view(np.int64)), 7)  # any order
    assert [spec.slot(f) for f in ("n", "a", "x")] == [3, 4, 5]
    with pytest.raises(TypeError, match=r"missing \['x'\], unknown \['y'\]"):
        spec.pack(n=1, a=0.0, y=2)
    with pytest.raises(ValueError, match="at most 13 operands; big has 14"):
        _team.Operands("big", **{f"f{i}": _team.I64 for i in range(14)})
    with pytest.raises(ValueError, match="demo.n is of kind 'int32'"):
        _team.Operands("demo", n="int32")
    with pytest.raises(ValueError, match="demo._n"):
        _team.Operands("demo", _n=_team.I64)


def _axpy_chunk(o, i, lo, hi, _a, _b):  # out[k] = a * x[k] + n over the chunk; the result: the chunk's length
    x, out = carray(o.x, o.n, np.float64), carray(o.out, o.n, np.float64)
    for k in range(lo, hi):
        out[k] = o.a * x[k] + o.n
    return hi - lo


_AXPY = _team.Operands("axpy", n=_team.I64, a=_team.F64, x=_team.ADDR, out=_team.ADDR)
_axpy_read = _AXPY.read
_axpy_chunk = __import__("numba").njit(inline="always")(_axpy_chunk)


def _axpy(data):
    _team.claim_operands(data, _axpy_read, _axpy_chunk, 0, 0)


_AXPY_KERNEL = _team.TeamKernel(_axpy)


@pytest.mark.parametrize("team", [True, False])
def test_a_kernel_reads_its_operands_by_name(threads, monkeypatch, team):
    threads(2)
    if not team:
        monkeypatch.setattr(_team, "gomp_parallel", lambda: None)
    x, out = np.arange(1000.0), np.zeros(1000)
    res = P.run_chunks(_AXPY_KERNEL, _AXPY.pack(n=x.size, a=0.5, x=x, out=out), x.size, 10, keep=(x, out), nchunks=7)
    np.testing.assert_array_equal(out, 0.5 * x + 1000)
    assert res.sum() == 1000 and res.shape == (7,)


def _axpy_first(o, i, lo, hi, _a, _b):  # the axpy chunk; the result: the chunk's first index
    _axpy_chunk(o, i, lo, hi, _a, _b)
    return lo


_axpy_first = __import__("numba").njit(inline="always")(_axpy_first)


def _axpy_lanes(data):
    _team.claim_operands(data, _axpy_read, _axpy_first, 0, 0, True)


_AXPY_LANES_KERNEL = _team.TeamKernel(_axpy_lanes)


@pytest.mark.parametrize("nchunks", [1, 2, 7, 9, 64])
@pytest.mark.parametrize("team", [True, False])
def test_a_kernel_claiming_in_lanes_runs_every_chunk_once_and_stores_its_result_at_its_index(threads, monkeypatch,
                                                                                               team, nchunks):
    threads(2)
    if not team:
        monkeypatch.setattr(_team, "gomp_parallel", lambda: None)
    x, out = np.arange(1000.0), np.zeros(1000)
    res = P.run_chunks(_AXPY_LANES_KERNEL, _AXPY.pack(n=x.size, a=0.5, x=x, out=out), x.size, 10, keep=(x, out),
                       nchunks=nchunks)
    np.testing.assert_array_equal(out, 0.5 * x + 1000)
    assert res.tolist() == [1000 * j // nchunks for j in range(nchunks)]


def test_lane_order_is_a_bijection_that_walks_each_lane_front_to_back():
    for team in range(0, 6):
        for nchunks in range(0, 41):
            order = [_team.lane_chunk(i, nchunks, team) for i in range(nchunks)]
            assert sorted(order) == list(range(nchunks)), (nchunks, team)
            if team < 2:
                assert order == list(range(nchunks))
                continue
            for lane in range(team):  # claims in turn: lane l gets claims l, l + team, ...: one contiguous run
                run = order[lane::team]
                assert run == list(range(run[0], run[0] + len(run))) if run else True
            # the lanes cut the chunks into runs of sizes differing by at most one
            sizes = [len(order[lane::team]) for lane in range(team)]
            assert max(sizes) - min(sizes) <= 1


_STALE_MODULE = """
import numpy as np
from numba import carray, njit
from qcore import _team


@njit(inline="always")
def _chunk(head, i, lo, hi, _a, _b):  # dst[k] = src[k] + 1; the result: the chunk's first index
    src, dst = carray(_team.as_ptr(head[3]), head[5], np.int64), carray(_team.as_ptr(head[4]), head[5], np.int64)
    for k in range(lo, hi):
        dst[k] = src[k] + 1
    return lo


def kernel(data):
    _team.claim_loop(data, _chunk, 0, 0)


KERNEL = _team.TeamKernel(kernel)
"""


def test_a_kernel_cached_against_an_older_block_layout_is_compiled_again(tmp_path):
    # numba's cache only notices edits to a kernel's own file, not to the _team layout it inlines: before, such a
    # kernel ran against the new layout (its results and done count landed elsewhere) until its cache files
    # were deleted by hand
    (tmp_path / "stale_kernel.py").write_text(_STALE_MODULE)
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
           "NUMBA_CACHE_DIR": str(tmp_path / "cache")}
    _run("""
        import qcore._team as T
        T.HEADER, T.FINGERPRINT = 20, 12345   # an older _team: a longer header, another fingerprint
        import stale_kernel
        stale_kernel.KERNEL.ctypes()   # compiled, and cached against that layout
    """, **env)
    check = """
        import numpy as np, qcore._parallel as P, stale_kernel
        P.NUM_THREADS, P.DYNAMIC = 2, False
        src, dst = np.arange(1000), np.zeros(1000, np.int64)
        res = P.run_chunks(stale_kernel.KERNEL, (src.ctypes.data, dst.ctypes.data, 1000), 1000, 10,
                           keep=(src, dst), nchunks=4)
        print(res.tolist() == [0, 250, 500, 750], np.array_equal(dst, src + 1), stale_kernel.KERNEL.from_cache)
    """
    assert _run(check, **env).split() == ["True", "True", "False"]  # not loaded from the cache: compiled again
    assert _run(check, **env).split() == ["True", "True", "True"]  # and the cache now holds the new one


def test_a_kernel_that_answers_another_layout_when_probed_is_compiled_again(tmp_path):
    # the second guard: a cache entry under the current key, yet compiled against another layout
    (tmp_path / "stale_kernel.py").write_text(_STALE_MODULE)
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
           "NUMBA_CACHE_DIR": str(tmp_path / "cache")}
    _run("""
        import qcore._team as T
        real = T.FINGERPRINT
        T._LayoutCache._index_key = lambda self, sig, codegen: (T.SourcesCache._index_key(self, sig, codegen), real)
        T.HEADER, T.FINGERPRINT = 20, 12345   # compiled against an older layout, cached under today's key
        import stale_kernel
        stale_kernel.KERNEL.ctypes()
    """, **env)
    check = """
        import numpy as np, qcore._parallel as P, stale_kernel
        P.NUM_THREADS, P.DYNAMIC = 2, False
        src, dst = np.arange(1000), np.zeros(1000, np.int64)
        res = P.run_chunks(stale_kernel.KERNEL, (src.ctypes.data, dst.ctypes.data, 1000), 1000, 10,
                           keep=(src, dst), nchunks=4)
        print(res.tolist() == [0, 250, 500, 750], np.array_equal(dst, src + 1), stale_kernel.KERNEL.from_cache)
    """
    assert _run(check, **env).split() == ["True", "True", "False"]  # the probe found it stale: compiled again
    assert _run(check, **env).split() == ["True", "True", "True"]  # in its place in the cache


def test_qtorch_omp_team_0_is_a_deprecated_alias_of_qcore_omp_team_0():
    out = _run("""
        import warnings
        warnings.simplefilter("always")
        with warnings.catch_warnings(record=True) as seen:
            import qcore._team as T
        print(T.gomp_parallel(), any(issubclass(w.category, DeprecationWarning) and "QCORE_OMP_TEAM" in str(w.message)
                                     for w in seen))
    """, QTORCH_OMP_TEAM="0")
    assert out.split() == ["None", "True"]


# --- under load: a team thread that another process keeps off its core


@__import__("numba").njit(inline="always")
def _late_chunk(head, i, lo, hi, _a, _b):
    # chunk 0's thread waits (bounded) until every chunk is claimed: as a thread that got its core late
    if i == 0:
        for _ in range(2_000_000_000):
            if _team._load_acquire(head, 0) > head[1]:
                break
    return 0


def _late(data):
    _team.claim_loop(data, _late_chunk, 0, 0)


_LATE_KERNEL = _team.TeamKernel(_late)


@pytest.fixture
def clock(monkeypatch):
    """A fake clock for the under-load guard, starting with no cap and no evidence of load: ``clock[0]`` is now."""
    now = [100.0]
    monkeypatch.setattr(_team, "_now", lambda: now[0])
    monkeypatch.setattr(_team, "_CAP", None)
    monkeypatch.setattr(_team, "_LEVEL", 0)
    monkeypatch.setattr(_team, "running_tasks", lambda: None)  # the machine's real load stays out of these tests
    return now


@pytest.mark.skipif(not HAS_TEAM, reason="no OpenMP runtime here")
def test_a_call_that_starved_a_thread_caps_the_team_for_a_while(monkeypatch, clock):
    monkeypatch.setattr(_team, "LATE_S", 0.0)  # however short the wait for it (the fake clock stands still)
    block = _team.new_block(16, 16)
    assert _team.run(_LATE_KERNEL, block, 2, 16)
    assert block[_team.HEADER + 16 + _team.STARVED] == 1  # one thread ran 1 chunk of 16, under a quarter of 8
    assert _team.thread_cap(2) == 1 and _team.thread_cap(1) == 1
    monkeypatch.setattr(P, "NUM_THREADS", 2)
    monkeypatch.setattr(_team, "team_threads", lambda: 2)
    assert P.threads(team=True) == 1
    monkeypatch.setattr(P, "DYNAMIC", False)  # a fixed thread count is kept whatever happened
    assert P.threads(team=True) == 2


def test_one_stall_on_a_quiet_machine_caps_the_team_briefly(clock):
    # before: one stall (a page fault, another process's burst) capped the team for 0.1 s: on a quiet machine about
    # 1 in 300 dequantize calls did, and the 20 calls after it ran on one thread
    _team._note_starved(2, 1, 0.004)
    assert _team.thread_cap(2) == 1  # at once: the next calls do not wait for that core
    clock[0] += 0.02
    assert _team.thread_cap(2) == 2  # 20 ms later the whole team is tried again
    _team._note_starved(2, 0, 0.001)  # and nobody waited: the load is gone, nothing is left of it
    assert _team._CAP is None and _team._LEVEL == 0
    clock[0] += 1.0
    _team._note_starved(2, 1, 0.004)  # the next stall, much later, is again a lone one
    assert _team._CAP[2] == _team.CAP_FIRST_S


def test_a_core_that_stays_busy_caps_the_team_longer_each_time_up_to_the_longest_hold(clock):
    holds = []
    for _ in range(_team.MAX_LEVEL + 2):
        _team._note_starved(4, 1, 0.005)  # the whole team, and a thread starved again
        until, threads, hold = _team._CAP
        assert threads == 3 and _team.thread_cap(4) == 3 and _team.thread_cap(2) == 2
        holds.append(hold)
        clock[0] = until  # the cap is over: the next call tries the whole team
        assert _team.thread_cap(4) == 4
    assert holds[:3] == [_team.CAP_FIRST_S, 2 * _team.CAP_FIRST_S, 4 * _team.CAP_FIRST_S]
    assert holds[-3:] == [_team.CAP_MAX_S] * 3 and holds == sorted(holds)
    assert _team.CAP_FIRST_S <= 0.02 and _team.CAP_MAX_S >= 1.0  # tried again soon, and at most ~once a second


def test_a_lucky_call_under_load_does_not_start_the_doubling_again(clock):
    # a busy core that the scheduler sometimes hands over at once (a busy loop free to move between cores): before,
    # one call where nobody waited lifted the cap and forgot the load, and the next late call capped for the first,
    # shortest hold again: the whole team was tried, and waited for, every 0.1 s
    for _ in range(5):
        _team._note_starved(2, 1, 0.005)
        clock[0] = _team._CAP[0]
    _team._note_starved(2, 0, 0.001)  # lucky: the whole team ran and nobody waited
    assert _team._CAP is None and _team.thread_cap(2) == 2
    _team._note_starved(2, 1, 0.005)  # the next call waited again
    assert _team._CAP[2] == 16 * _team.CAP_FIRST_S  # where it was: the fifth hold
    for _ in range(_team.MAX_LEVEL):  # the load is gone: calls of the whole team where nobody waits
        clock[0] = _team._CAP[0] if _team._CAP else clock[0] + 0.001
        _team._note_starved(2, 0, 0.001)
    assert _team._LEVEL == 0 and _team._CAP is None


def test_what_a_capped_or_short_call_tells(clock):
    _team._note_starved(4, 1, 0.005)
    assert _team._CAP[1] == 3
    _team._note_starved(3, 0, 0.001)  # the capped team ran well: no news about the fourth core
    assert _team._CAP[1] == 3 and _team._LEVEL == 1
    _team._note_starved(3, 1, 0.005)  # the capped team waited too: fewer still, and for longer
    assert _team._CAP[1:] == (2, 2 * _team.CAP_FIRST_S)
    _team._note_starved(2, 1, 0.0001)  # a short call that starved a thread waited little: no news
    assert _team._CAP[1:] == (2, 2 * _team.CAP_FIRST_S) and _team._LEVEL == 2
    _team._note_starved(4, 0, 0.001)  # the whole team (a fixed thread count), and nobody waited: lifted
    assert _team._CAP is None and _team._LEVEL == 1


def test_a_cap_holds_on_without_trying_the_team_while_other_tasks_plainly_take_the_cores(clock, monkeypatch):
    # trying the whole team on a busy core costs a scheduler slice (5-15 ms measured on the shared 2-core machine);
    # /proc/loadavg's running count, read when a cap ends, shows such a core for ~2 us
    monkeypatch.setattr(_team, "_CPUS", 2)
    monkeypatch.setattr(_team, "team_threads", lambda: 2)
    monkeypatch.setattr(_team, "_LAST_SIZE", 2)
    monkeypatch.setattr(_team, "_FROM_TORCH", True)  # one team, torch's: no second set of workers to count
    running = [3]
    monkeypatch.setattr(_team, "running_tasks", lambda: running[0])
    _team._note_starved(2, 1, 0.005)
    clock[0] = _team._CAP[0]
    # 3 running: at most 2 ours (the caller, a spinning worker), so another task holds a core: the cap holds on
    assert _team.thread_cap(2) == 1
    assert _team._LEVEL == 2 and _team._CAP[2] == 2 * _team.CAP_FIRST_S
    clock[0] = _team._CAP[0]
    running[0] = 2  # maybe only ours: try the whole team
    assert _team.thread_cap(2) == 2 and _team._LEVEL == 2
    running[0] = None  # no /proc/loadavg: try the whole team
    assert _team.thread_cap(2) == 2
    monkeypatch.setattr(_team, "_CPUS", 8)
    monkeypatch.setattr(_team, "team_threads", lambda: 8)
    running[0] = 8
    assert _team.thread_cap(8) == 8  # all 8 may be ours: no core is surely taken by others
    running[0] = 9
    assert _team.thread_cap(8) == 1 and _team._LEVEL == 3
    monkeypatch.setattr(_team, "_LEVEL", _team.MAX_LEVEL)  # after the longest hold the team is tried regardless:
    clock[0] = _team._CAP[0]  # the running count also holds tasks of low priority, which yield a core at once
    assert _team.thread_cap(8) == 8


def _fake_team(monkeypatch, clock, trailer: dict, wall_s: float):
    """A GOMP_parallel that runs nothing: it writes ``trailer`` into the block and takes ``wall_s`` of the fake
    clock, as a team call whose threads left those counts would."""
    def parallel(address, data, nthreads, flags):
        nchunks = int(carray_at(data, 2)[1])
        t = carray_at(data, _team.HEADER + nchunks + _team.TRAILER)[_team.HEADER + nchunks:]
        for k, v in trailer.items():
            t[k] = v
        clock[0] += wall_s

    monkeypatch.setattr(_team, "gomp_parallel", lambda: parallel)


def carray_at(address, n):
    import ctypes
    return np.ctypeslib.as_array((ctypes.c_int64 * n).from_address(address))


def test_run_learns_from_the_trailer_the_threads_left(monkeypatch, clock):
    stall = {_team.STARVED: 1, _team.FIRST_IN: 1000, _team.FIRST_OUT: 2000, _team.LAST_OUT: 2100}
    _fake_team(monkeypatch, clock, stall, wall_s=0.005)
    assert _team.run(lambda: 0, _team.new_block(16, 16), 2, 16)
    assert _team.thread_cap(2) == 1 and _team._LEVEL == 1
    clock[0] += _team.CAP_FIRST_S
    straggler = {_team.FIRST_IN: 1000, _team.FIRST_OUT: 2000, _team.LAST_OUT: 2600}  # waited 600 of 1000 cycles
    _fake_team(monkeypatch, clock, straggler, wall_s=0.005)
    assert _team.run(lambda: 0, _team.new_block(16, 16), 2, 16)
    assert _team.thread_cap(2) == 1 and _team._LEVEL == 2
    clock[0] += 2 * _team.CAP_FIRST_S
    quiet = {_team.FIRST_IN: 1000, _team.FIRST_OUT: 2000, _team.LAST_OUT: 2050}
    _fake_team(monkeypatch, clock, quiet, wall_s=0.0001)  # short and clean: still news while load was seen
    assert _team.run(lambda: 0, _team.new_block(16, 16), 2, 16)
    assert _team._CAP is None and _team._LEVEL == 1
    _fake_team(monkeypatch, clock, straggler, wall_s=0.005)
    assert _team.run(lambda: 0, _team.new_block(6, 6), 2, 6)  # 3 chunks a thread: its last chunk is no straggler
    assert _team._CAP is None


def test_threads_that_waited_for_a_straggler_longer_than_half_their_work_cap_the_team(monkeypatch):
    def trailer(first_in, first_out, last_out):
        t = np.zeros(_team.TRAILER, np.int64)
        t[_team.FIRST_IN], t[_team.FIRST_OUT], t[_team.LAST_OUT] = first_in, first_out, last_out
        return t

    assert not _team._waited(trailer(0, 1000, 1400))  # the last chunk: a short wait
    assert _team._waited(trailer(0, 1000, 1600))  # a straggler kept the others waiting 600 of 1000 cycles' work
    assert not _team._waited(trailer(0, 0, 0))  # no cycle counter on this CPU
    monkeypatch.setattr(_team, "_CAP", None)
    monkeypatch.setattr(_team, "_LEVEL", 0)
    _team._note_starved(2, 0, 0.001, waited=True)
    assert _team.thread_cap(2) == 1
