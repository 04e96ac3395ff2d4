"""The C++ twins of the blocked, vnni and vnni8 layouts' inference ops: the same numbers as the Python ops, every
call they cannot run handed to those, the team's state kept, and compiled graphs calling them."""

import gc
import multiprocessing
import os
import subprocess
import sys

import pytest
import torch

import qtorch
from qcore import PerChannel, PerGroup, QuantScheme, _team
from qtorch import autotune, native_ops, vnni, vnni8
from qtorch.layouts import blocked

#: native launches are what these tests check (under QTORCH_NATIVE_LAUNCH=0 too)
pytestmark = pytest.mark.usefixtures("native_launches")

W8 = QuantScheme(8, True, PerChannel(0))
W4 = QuantScheme(4, False, PerGroup(32))
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(scope="module")
def lib():
    if native_ops._compiler() is None or _team.gomp_parallel() is None:
        pytest.skip("no C++ compiler or no OpenMP team here: the Python ops serve")
    lib = native_ops.library()
    assert lib is not None, native_ops.reason()  # a compiler is here: the build must work
    return lib


@pytest.fixture(autouse=True)
def two_threads():
    n = torch.get_num_threads()
    torch.set_num_threads(max(2, n))
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def gate(uncapped_team):
    """Every test here counts which way calls went: a team no late call caps (``conftest.uncapped_team``)."""
    yield uncapped_team


@pytest.fixture(autouse=True)
def held_layout(monkeypatch):
    """The layout under test held, not one raced on this machine (``QTORCH_LAYOUT``); a test sets another."""
    def hold(name):
        monkeypatch.setattr(autotune, "_DEFAULT", autotune.Dispatcher(cache_path=False, env={"QTORCH_LAYOUT": name}))
    hold("blocked")
    return hold


def _layer(scheme, dtype, n=256, k=128, seed=0, layout="blocked"):
    torch.manual_seed(seed)
    q = qtorch.QuantLinear.from_linear(torch.nn.Linear(k, n, bias=False, dtype=dtype), scheme)
    assert q.quantized_weight.hold_layout(layout, dtype)
    return q


def _operands(q):
    b, spec = q.quantized_weight.buffers, q.quantized_weight.spec
    return b["qweight"], b["scale"], b["zero_point"], spec.group, blocked.container_bits(spec.bits), spec.out_features


def _native(op):
    return getattr(torch.ops.qtorch, op.__name__.split(".")[0] + "_native").default


def _keep(op, x, ops):
    """The Python op's first two calls: the first keeps the weight's one-row plan, the second its launch (and
    registers it)."""
    op(x, *ops)
    return op(x, *ops)


OPS = ["gemm_blocked_infer", "int8dot_blocked_infer", "bf16dot_blocked_infer"]


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("scheme", [W8, W4], ids=["w8", "w4"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_registered_launch_runs_in_cpp_with_the_python_ops_bits(lib, name, scheme, dtype):
    q = _layer(scheme, dtype)
    ops = _operands(q)
    op = getattr(torch.ops.qtorch, name).default
    x = torch.randn(1, 128, dtype=dtype)
    with torch.no_grad():
        want = _keep(op, x, ops)
        before = native_ops.runs()
        got = _native(op)(x, *ops)
        assert native_ops.runs() == before + 1
        assert got.dtype == dtype and got.shape == (1, ops[-1])
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        # as F.linear of the dequantized weight, within the dtype's tolerance
        ref = torch.nn.functional.linear(x.float(), q.dequantized_weight().float())
        torch.testing.assert_close(got.float(), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())


def test_calls_it_cannot_run_go_to_the_python_op(lib):
    ops = _operands(_layer(W8, torch.bfloat16))
    op, nat = torch.ops.qtorch.gemm_blocked_infer.default, torch.ops.qtorch.gemm_blocked_infer_native.default
    x = torch.randn(1, 128, dtype=torch.bfloat16)
    with torch.no_grad():
        _keep(op, x, ops)
        cases = {
            "two rows": torch.randn(2, 128, dtype=torch.bfloat16),
            "a strided row": torch.randn(128, 2, dtype=torch.bfloat16).t()[:1],
            "another dtype than the launch's": x.float(),  # (the Python op's call keeps one for it)
        }
        for what, xi in cases.items():
            before = native_ops.runs()
            got = nat(xi, *ops)
            assert native_ops.runs() == before, what
            torch.testing.assert_close(got, op(xi, *ops), rtol=0, atol=0, msg=what)
        # the gate closed (a thread cap in force), switched off, one thread: the Python op, the same bits
        want = op(x, *ops)
        before = native_ops.runs()
        _team.NATIVE[_team.NATIVE_OPEN] = 0
        torch.testing.assert_close(nat(x, *ops), want, rtol=0, atol=0)
        _team.NATIVE[_team.NATIVE_OPEN] = 1
        native_ops.set_enabled(False)
        try:
            torch.testing.assert_close(nat(x, *ops), want, rtol=0, atol=0)
        finally:
            native_ops.set_enabled(True)
        torch.set_num_threads(1)
        torch.testing.assert_close(nat(x, *ops), want, rtol=0, atol=0)
        assert native_ops.runs() == before
        torch.set_num_threads(2)
        nat(x, *ops)
        assert native_ops.runs() == before + 1


def test_an_unregistered_weight_goes_to_the_python_op_which_registers_it(lib):
    ops = _operands(_layer(W4, torch.bfloat16, seed=3))
    nat = torch.ops.qtorch.int8dot_blocked_infer_native.default
    x = torch.randn(1, 128, dtype=torch.bfloat16)
    with torch.no_grad():
        before = native_ops.runs()
        outs = [nat(x, *ops) for _ in range(3)]
        assert native_ops.runs() == before + 1  # no launch kept for it at first: Python's calls keep one
    torch.testing.assert_close(outs[0], outs[2], rtol=0, atol=0)


def test_a_late_launch_closes_the_gate_until_python_learns_from_it(lib, monkeypatch):
    ops = _operands(_layer(W8, torch.float32))
    op, nat = torch.ops.qtorch.gemm_blocked_infer.default, torch.ops.qtorch.gemm_blocked_infer_native.default
    x = torch.randn(1, 128)
    notes = []
    monkeypatch.setattr(_team, "_note_starved", lambda *a: notes.append(a))
    with torch.no_grad():
        _keep(op, x, ops)
        _team.NATIVE[_team.NATIVE_LATE_NS] = 0  # every launch late
        _team.NATIVE[_team.NATIVE_NOTE_CLEAN] = 1  # and noted, whether or not it starved a thread
        before = native_ops.runs()
        nat(x, *ops)
        assert native_ops.runs() == before + 1
        assert _team.NATIVE[_team.NATIVE_NOTE] == 1 and _team.NATIVE[_team.NATIVE_OPEN] == 0
        nat(x, *ops)  # the gate closed: the Python op, whose launch learns from the note first
        assert native_ops.runs() == before + 1
        assert _team.NATIVE[_team.NATIVE_NOTE] == 0 and _team.NATIVE[_team.NATIVE_OPEN] == 1
    threads, starved, wall, waited = notes[0]
    assert threads == torch.get_num_threads() and starved >= 0 and wall >= 0 and waited in (True, False)


def test_the_last_native_launch_counts_as_the_teams_last_call(lib, monkeypatch):
    ops = _operands(_layer(W8, torch.float32))
    x = torch.randn(1, 128)
    monkeypatch.setattr(_team, "_LAST_END", 0.0)
    with torch.no_grad():
        _keep(torch.ops.qtorch.gemm_blocked_infer.default, x, ops)
        monkeypatch.setattr(_team, "_LAST_END", 0.0)
        torch.ops.qtorch.gemm_blocked_infer_native.default(x, *ops)
    assert _team.own_spinners() == torch.get_num_threads() - 1  # its workers may still spin: ours, not load
    assert _team._LAST_END > 0 and _team.NATIVE[_team.NATIVE_LAST_END_NS] == 0


def test_a_launch_is_forgotten_when_its_weight_goes(lib):
    gc.collect()
    before = native_ops.registered()
    q = _layer(W8, torch.bfloat16, seed=5)
    with torch.no_grad():
        _keep(torch.ops.qtorch.gemm_blocked_infer.default, torch.randn(1, 128, dtype=torch.bfloat16), _operands(q))
    assert native_ops.registered() == before + 1
    del q
    gc.collect()
    assert native_ops.registered() == before


@pytest.mark.parametrize("n", [2, 3])
def test_siblings_run_as_one_native_launch_with_each_layers_bits(lib, n):
    layers = [_layer(W8, torch.bfloat16, n=256 + 128 * i, seed=i) for i in range(n)]
    ops = [_operands(q) for q in layers]
    args = [t for o in ops for t in o[:3]] + [ops[0][3], ops[0][4]] + [o[5] for o in ops] + [False]
    x = torch.randn(1, 128, dtype=torch.bfloat16)
    py, nat = (getattr(torch.ops.qtorch, f"blocked_siblings{n}{s}").default for s in ("", "_native"))
    with torch.no_grad():
        py(x, *args)  # each layer's op keeps its plan
        py(x, *args)  # and its launch
        want = py(x, *args)  # the chain of them, registered
        before = native_ops.runs()
        got = nat(x, *args)
        assert native_ops.runs() == before + 1
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        alone = torch.cat([torch.ops.qtorch.gemm_blocked_infer.default(x, *o) for o in ops], dim=1)
        torch.testing.assert_close(got, alone, rtol=0, atol=0)


def test_a_compiled_model_calls_the_cpp_ops(lib):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(128, 256, bias=False), torch.nn.Linear(256, 384, bias=False))
    model = model.to(torch.bfloat16)
    qtorch.quantize_model(model, W8, exclude=())
    assert all(m.weight_layout == "blocked" for m in model)
    x = torch.randn(1, 128, dtype=torch.bfloat16)
    with torch.no_grad():
        want = model(x)
        compiled = qtorch.compile(model)
        compiled(x)  # eager: the layouts are chosen
        compiled(x)  # traced and run: each op keeps its plan
        compiled(x)  # and its launch
        before = native_ops.runs()
        got = compiled(x)
        assert native_ops.runs() == before + 2  # both layers' launches from C++
    torch.testing.assert_close(got, want, rtol=0, atol=0)


needs_vnni = pytest.mark.skipif(not vnni.available(), reason="the vnni layout needs AVX512-VNNI (not on this CPU)")


def _vnni_operands(q):
    b = q.quantized_weight.buffers
    return b["qweight"], b["scale"], b["zero_point"], q.out_features


@needs_vnni
@pytest.mark.parametrize("scheme", [W4, QuantScheme(4, True, PerGroup(64)), QuantScheme(4, True, PerChannel(0))],
                         ids=["asym-g32", "sym-g64", "sym-channel"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_registered_vnni_launch_runs_in_cpp_with_the_python_ops_bits(lib, scheme, dtype):
    q = _layer(scheme, dtype, k=256, layout="vnni")
    ops = _vnni_operands(q)
    op, nat = torch.ops.qtorch.vnni_linear_infer.default, torch.ops.qtorch.vnni_linear_infer_native.default
    x = torch.randn(1, 256, dtype=dtype)
    with torch.no_grad():
        before = native_ops.runs()
        first = nat(x, *ops)  # nothing registered for it yet: the Python op, which registers the weight's launch
        assert native_ops.runs() == before
        got = nat(x, *ops)
        assert native_ops.runs() == before + 1
        torch.testing.assert_close(got, op(x, *ops), rtol=0, atol=0)
        torch.testing.assert_close(got, first, rtol=0, atol=0)
        ref = torch.nn.functional.linear(x.float(), q.dequantized_weight().float())
        torch.testing.assert_close(got.float(), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())


@needs_vnni
def test_a_vnni_call_it_cannot_run_goes_to_the_python_op(lib):
    q = _layer(W4, torch.bfloat16, k=256, seed=7, layout="vnni")
    ops = _vnni_operands(q)
    op, nat = torch.ops.qtorch.vnni_linear_infer.default, torch.ops.qtorch.vnni_linear_infer_native.default
    x = torch.randn(1, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        op(x, *ops)  # registered
        for what, value in (("a NaN", float("nan")), ("an infinity", float("inf"))):
            xi = x.clone()
            xi[0, 3] = value  # the kernel's planes hold no such value: the launch runs, reports it, and the
            got = nat(xi, *ops)  # Python op takes the portable path
            torch.testing.assert_close(got, op(xi, *ops), rtol=0, atol=0, equal_nan=True, msg=what)
            assert not torch.isfinite(got).any(), what
        before = native_ops.runs()
        rows = torch.randn(3, 256, dtype=torch.bfloat16)
        torch.testing.assert_close(nat(rows, *ops), op(rows, *ops), rtol=0, atol=0)
        assert native_ops.runs() == before  # several rows: the Python op's AMX or dequantized path
        torch.testing.assert_close(nat(x, *ops), op(x, *ops), rtol=0, atol=0)  # a finite row again: natively
        assert native_ops.runs() == before + 1


@needs_vnni
def test_a_compiled_model_of_vnni_layers_calls_the_cpp_op(lib, held_layout):
    held_layout("vnni")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 128, bias=False), torch.nn.Linear(128, 256, bias=True))
    model = model.to(torch.bfloat16)
    qtorch.quantize_model(model, W4, exclude=())
    assert all(m.weight_layout == "vnni" for m in model)
    x = torch.randn(1, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        want = model(x)
        compiled = qtorch.compile(model)
        compiled(x)  # traced and run: each op keeps its plan and registers its launch
        before = native_ops.runs()
        got = compiled(x)
        assert native_ops.runs() == before + 2  # both layers' launches from C++
    torch.testing.assert_close(got, want, rtol=0, atol=0)


needs_vnni8 = pytest.mark.skipif(not vnni8.available(), reason="the vnni8 layout needs AMX-INT8 (not on this CPU)")


@needs_vnni8
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_registered_vnni8_launch_runs_in_cpp_with_the_python_ops_bits(lib, dtype):
    q = _layer(W8, dtype, k=256, seed=11, layout="vnni8")
    b = q.quantized_weight.buffers
    ops = (b["qweight"], b["scale"], q.out_features)
    op, nat = torch.ops.qtorch.vnni8_linear_infer.default, torch.ops.qtorch.vnni8_linear_infer_native.default
    x = torch.randn(1, 256, dtype=dtype)
    with torch.no_grad():
        before = native_ops.runs()
        first = nat(x, *ops)  # nothing registered for it yet: the Python op, which registers the weight's launch
        assert native_ops.runs() == before
        got = nat(x, *ops)
        assert native_ops.runs() == before + 1
        torch.testing.assert_close(got, op(x, *ops), rtol=0, atol=0)
        torch.testing.assert_close(got, first, rtol=0, atol=0)
        ref = torch.nn.functional.linear(x.float(), q.dequantized_weight().float())
        torch.testing.assert_close(got.float(), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())
        bad = x.clone()
        bad[0, 5] = float("nan")  # launched, reported, handed to the Python op (the portable path)
        torch.testing.assert_close(nat(bad, *ops), op(bad, *ops), rtol=0, atol=0, equal_nan=True)
        rows = torch.randn(3, 256, dtype=dtype)
        before = native_ops.runs()
        torch.testing.assert_close(nat(rows, *ops), op(rows, *ops), rtol=0, atol=0)
        assert native_ops.runs() == before  # several rows: the Python op


def _child(queue, ops, x):
    with torch.no_grad():
        before = native_ops.runs()
        y = torch.ops.qtorch.gemm_blocked_infer_native.default(x, *ops)
        queue.put((int(_team.NATIVE[_team.NATIVE_OPEN]), native_ops.runs() - before, y.tolist()))


def test_a_forked_child_takes_the_python_op(lib):
    ops = _operands(_layer(W8, torch.float32))
    x = torch.randn(1, 128)
    with torch.no_grad():
        want = _keep(torch.ops.qtorch.gemm_blocked_infer.default, x, ops)
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    p = ctx.Process(target=_child, args=(queue, ops, x))
    p.start()
    gate, ran, y = queue.get(timeout=120)
    p.join(timeout=60)
    assert p.exitcode == 0 and gate == 0 and ran == 0
    assert y == want.tolist()


def test_switched_off_by_the_environment(tmp_path):
    code = "from qtorch import native_ops; print(native_ops.library() is None, native_ops.reason())"
    env = dict(os.environ, QTORCH_NATIVE_OPS="0", QTORCH_CACHE_DIR=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.stdout.split() == ["True", "RuntimeError:", "QTORCH_NATIVE_OPS=0"], out.stderr
    assert not list(tmp_path.iterdir())  # nothing built


def test_a_failed_build_leaves_the_python_ops(tmp_path):
    code = ("import qtorch; from qtorch import native_ops; lib = native_ops.library(); "
            "print(lib is None, native_ops.reason() is not None)")
    env = dict(os.environ, CXX=str(tmp_path / "no-such-compiler"), PATH=str(tmp_path), QTORCH_CACHE_DIR=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.stdout.split() == ["True", "True"], out.stderr


def test_the_library_is_built_once_and_kept(lib):
    target = native_ops._target(native_ops._compiler())
    assert os.path.exists(target) and target.startswith(str(autotune.cache_dir()))


def test_a_clean_late_launch_leaves_the_gate_open(lib):
    ops = _operands(_layer(W8, torch.float32))
    op, nat = torch.ops.qtorch.gemm_blocked_infer.default, torch.ops.qtorch.gemm_blocked_infer_native.default
    x = torch.randn(1, 128)
    with torch.no_grad():
        _keep(op, x, ops)
        _team.NATIVE[_team.NATIVE_LATE_NS] = 0  # every launch late, noted only where it starved or kept waiting
        _team.NATIVE[_team.NATIVE_NOTE_CLEAN] = 0
        before = native_ops.runs()
        nat(x, *ops)
        assert native_ops.runs() == before + 1
        noted = _team.NATIVE[_team.NATIVE_NOTE] == 1
        assert _team.NATIVE[_team.NATIVE_OPEN] == (0 if noted else 1)
        if noted:  # (a busy machine starved a thread)
            assert _team.NATIVE[_team.NATIVE_NOTE_STARVED] > 0 or _team.NATIVE[_team.NATIVE_NOTE_WAITED] == 1


def test_settle_native_learns_from_a_note_as_from_a_team_call(monkeypatch):
    calls = []
    monkeypatch.setattr(_team, "_note_starved", lambda *a: calls.append(a))
    saved = _team.NATIVE.copy()
    try:
        nat = _team.NATIVE
        nat[_team.NATIVE_NOTE_THREADS], nat[_team.NATIVE_NOTE_STARVED] = 2, 1
        nat[_team.NATIVE_NOTE_WALL_NS], nat[_team.NATIVE_NOTE_WAITED] = 2_000_000, 1
        nat[_team.NATIVE_NOTE], nat[_team.NATIVE_OPEN] = 1, 0
        assert _team.thread_cap(2) in (1, 2)  # reads the note first
        assert calls == [(2, 1, 0.002, True)]
        assert nat[_team.NATIVE_NOTE] == 0
        assert nat[_team.NATIVE_OPEN] == int(_team._CAP is None and not _team._LEVEL)
    finally:
        _team.NATIVE[:] = saved


_BUILD_AND_RUN = """
import torch, qtorch
from qcore import PerChannel, QuantScheme
from qtorch import native_ops
assert native_ops.library() is not None, native_ops.reason()
torch.manual_seed(0)
q = qtorch.QuantLinear.from_linear(torch.nn.Linear(128, 256, bias=False), QuantScheme(8, True, PerChannel(0)))
assert q.quantized_weight.hold_layout("blocked", torch.float32)  # the op under test, whatever the race chose
b, spec = q.quantized_weight.buffers, q.quantized_weight.spec
ops = (b["qweight"], b["scale"], b["zero_point"], spec.group, 8, 256)
x = torch.randn(1, 128)
with torch.no_grad():
    want = [torch.ops.qtorch.gemm_blocked_infer.default(x, *ops) for _ in range(2)][-1]
    # the other process's build keeps a core busy, and late launches cap the team for a while (docs: threads):
    # the library is what is tested here, so no cap, and no launch counts as late
    from qcore import _team
    _team._CAP, _team._LEVEL = None, 0
    _team.NATIVE[_team.NATIVE_LATE_NS] = 1 << 62
    _team._sync_native()
    got = torch.ops.qtorch.gemm_blocked_infer_native.default(x, *ops)
print(native_ops.runs() > 0, torch.equal(got, want))
"""


def test_processes_building_at_once_each_load_a_whole_library(lib, tmp_path):
    # nothing built there yet: both build; native launches on in the children (the library is what is tested)
    env = dict(os.environ, QTORCH_CACHE_DIR=str(tmp_path), QTORCH_NATIVE_LAUNCH="1")
    procs = [subprocess.Popen([sys.executable, "-c", _BUILD_AND_RUN], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0 and out.split() == ["True", "True"], err[-2000:]
    names = [f.name for f in tmp_path.iterdir()]  # (the dispatch cache's files too)
    assert len([n for n in names if n.startswith("native-ops-") and n.endswith(".so")]) == 1
    assert not [n for n in names if n.endswith(".tmp")]  # no temporary left


def test_a_kept_library_that_does_not_load_is_built_again(lib, tmp_path):
    code = ("from qtorch import native_ops; import os; t = native_ops._target(native_ops._compiler()); "
            "os.makedirs(os.path.dirname(t), exist_ok=True); open(t, 'wb').write(b'not a library'); "
            "print(native_ops.library() is not None, os.path.getsize(t) > 1000)")
    env = dict(os.environ, QTORCH_CACHE_DIR=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert out.stdout.split() == ["True", "True"], out.stderr[-2000:]
