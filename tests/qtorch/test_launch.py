"""qtorch._launch: one-row launches as one native call, the same bits as the Python launch, and every case it does
not serve left to the Python path."""

import numpy as np
import pytest
import torch
from qcore import _team

from qtorch import _launch, _omp, gemv

#: native launches are what these tests check (under QTORCH_NATIVE_LAUNCH=0 too)
pytestmark = pytest.mark.usefixtures("native_launches")

needs_team = pytest.mark.skipif(not _omp.available() or _team.gomp_parallel() is None or torch.get_num_threads() < 2,
                                reason="no OpenMP team of 2+ threads in this process")


def _plans(widths=(2, 3, 1), k=256, seed=0):
    rng = np.random.default_rng(seed)
    plans = []
    for n in widths:  # tiles of 64 columns
        wb = rng.integers(-128, 128, (n, k, 64), dtype=np.int8)
        scale = rng.random((1, n * 64), dtype=np.float32)
        zp = np.zeros((0, 0), np.uint8)
        plans.append((wb, scale, zp, gemv.Plan(wb, scale, zp, k, 8, wb.ctypes.data, scale.ctypes.data,
                                               zp.ctypes.data)))
    return plans


def _python(launcher):
    """A launcher of the same plan and flags that always takes the Python path."""
    twin = gemv.Launcher.__new__(gemv.Launcher)
    twin.plan, twin.template, twin.scratch, twin.free, twin.native = (launcher.plan, launcher.template,
                                                                      launcher.scratch, [], None)
    return twin


@needs_team
@pytest.mark.parametrize("kind", [0, 1], ids=["float32", "bfloat16"])
def test_a_native_launch_gives_the_python_launchs_bits(kind):
    dtype = torch.bfloat16 if kind else torch.float32
    x = torch.randn(1, 256, dtype=dtype)
    for *_, p in _plans():
        la = gemv.Launcher(p, kind, kind, True)
        if p.T < 2:  # one work unit: the caller runs it alone, never natively
            assert la.native is None
            continue
        assert la.native is not None
        want, got = torch.full((p.N,), 7.0, dtype=dtype), torch.full((p.N,), 7.0, dtype=dtype)
        _python(la)(x.data_ptr(), want.data_ptr())
        for _ in range(3):
            la(x.data_ptr(), got.data_ptr())
            assert torch.equal(got, want)
        assert not la.free  # never the Python path's blocks
        assert la.native.blocks[0][gemv._X] == x.data_ptr()


@needs_team
@pytest.mark.parametrize("kind", [0, 1], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("layers", [1, 2, 3])
def test_a_native_chain_gives_each_layers_own_bits(kind, layers):
    dtype = torch.bfloat16 if kind else torch.float32
    plans = [p for *_, p in _plans((2, 3, 1)[:layers] if layers > 1 else (3,), seed=layers)]
    x = torch.randn(1, 256, dtype=dtype)
    launchers = [gemv.Launcher(p, kind, kind, False) for p in plans]
    want = [torch.empty(1, p.N, dtype=dtype) for p in plans]
    for la, w in zip(launchers, want):
        _python(la)(x.data_ptr(), w.data_ptr())
    chain = gemv.Chain(launchers)
    assert chain.native is not None
    out = torch.full((1, sum(p.N for p in plans)), 7.0, dtype=dtype)
    starts = np.cumsum([0] + [p.N for p in plans])[:-1]
    chain(x.data_ptr(), [out.data_ptr() + int(s) * out.element_size() for s in starts])
    assert torch.equal(out, torch.cat(want, 1))


def test_a_chain_of_more_layers_than_one_native_call_takes_runs_in_python():
    plans = [p for *_, p in _plans((2, 2, 2, 2))]
    chain = gemv.Chain([gemv.Launcher(p, 0, 0, False) for p in plans])
    assert chain.native is None
    x = torch.randn(1, 256)
    out = torch.empty(1, sum(p.N for p in plans))
    want = [torch.empty(1, p.N) for p in plans]
    for p, w in zip(plans, want):
        gemv.Launcher(p, 0, 0, False)(x.data_ptr(), w.data_ptr())
    chain(x.data_ptr(), [out.data_ptr() + 4 * 128 * i for i in range(4)])
    assert torch.equal(out, torch.cat(want, 1))
    with pytest.raises(ValueError, match="1 to 3 layers"):
        _launch.Native(plans[0].kernel(), [], (gemv._X, gemv._OUT, gemv._SCRATCH))


@needs_team
def test_a_launch_held_by_another_thread_or_under_a_thread_cap_goes_the_python_way(monkeypatch):
    *_, p = _plans((2,))[0]
    la = gemv.Launcher(p, 0, 0, False)
    x, want, got = torch.randn(1, 256), torch.empty(128), torch.empty(128)
    _python(la)(x.data_ptr(), want.data_ptr())
    la.native.state[0] = 1  # held: the native call answers -1 and touches nothing
    assert la.native(x.data_ptr(), got.data_ptr(), 0, 0, 2) == -1
    got.fill_(7.0)
    la(x.data_ptr(), got.data_ptr())
    assert torch.equal(got, want) and len(la.free) == 1  # the Python path's block, given back
    la.native.state[0] = 0
    monkeypatch.setattr(_team, "_CAP", (float("inf"), 1, 1.0))  # a cap in force: the team's size is Python's call
    assert _launch.start() is None
    got.fill_(7.0)
    la.free.clear()
    la(x.data_ptr(), got.data_ptr())
    assert torch.equal(got, want) and len(la.free) == 1
    monkeypatch.setattr(_team, "_CAP", None)
    monkeypatch.setattr(_team, "_IN_FORKED_CHILD", True)  # a forked child runs every launch on its caller
    assert _launch.start() is None


@needs_team
def test_a_late_native_launch_is_noted_as_a_team_call_would_be(monkeypatch):
    *_, p = _plans((3,))[0]
    la = gemv.Launcher(p, 0, 0, False)
    noted = []
    monkeypatch.setattr(_team, "LATE_S", 0.0)  # every call counts as late
    monkeypatch.setattr(_team, "_note_starved", lambda *a: noted.append(a))
    x, out = torch.randn(1, 256), torch.empty(192)
    la(x.data_ptr(), out.data_ptr())
    assert len(noted) == 1 and noted[0][0] == torch.get_num_threads() and noted[0][1] >= 0
    assert _team._LAST_SIZE == torch.get_num_threads()


def test_native_launches_can_be_switched_off(monkeypatch):
    monkeypatch.setattr(gemv, "NATIVE_LAUNCH", False)
    *_, p = _plans((2,))[0]
    la = gemv.Launcher(p, 0, 0, False)
    assert la.native is None
    x, out, want = torch.randn(1, 256), torch.empty(128), torch.empty(128)
    la(x.data_ptr(), out.data_ptr())
    gemv.run_plan(p, x.data_ptr(), 0, want.data_ptr(), 0, False)
    assert torch.equal(out, want)


@needs_team
def test_a_native_launch_keeps_the_templates_it_reads():
    """Each launch refills its blocks from the templates by address: a template the caller dropped (a temporary)
    must still be there, whatever memory came after it."""
    (wb, scale, zp, p), = _plans((3,), seed=9)
    la = gemv.Launcher(p, 0, 0, False)
    x = torch.randn(1, 256)
    want, got = torch.zeros(p.N), torch.zeros(p.N)
    _python(la)(x.data_ptr(), want.data_ptr())
    native = _launch.Native(p.kernel(), [(la.template.copy(), 0)], (gemv._X, gemv._OUT, gemv._SCRATCH))
    import gc
    gc.collect()
    junk = [np.full(la.template.size, -1, np.int64) for _ in range(64)]  # where a freed template would be reused
    assert native(x.data_ptr(), got.data_ptr(), 0, 0, 2) >= 0
    assert torch.equal(got, want) and len(junk) == 64
