"""Fixtures shared by the qtorch tests."""

import pytest

from qtorch import autotune, layouts


@pytest.fixture
def torch_pack_kernels(monkeypatch):
    """bfloat16 layers on PyTorch's int8pack / int4pack kernels (the choice on CPUs other than AVX2)."""
    monkeypatch.setattr(layouts, "TORCH_PACK_KERNELS", True)


@pytest.fixture
def native_launches(monkeypatch):
    """One-row launches go natively where they can, whatever ``QTORCH_NATIVE_LAUNCH`` says: the tests of those
    launches check them in a process that turned them off too (read at import, applied where a plan is made)."""
    from qtorch import gemv

    monkeypatch.setattr(gemv, "NATIVE_LAUNCH", True)


@pytest.fixture
def blocked_kernels(monkeypatch):
    """bfloat16 layers on the blocked layout's kernels (the choice on AVX2 CPUs)."""
    monkeypatch.setattr(layouts, "TORCH_PACK_KERNELS", False)


@pytest.fixture(scope="session", autouse=True)
def no_measured_dispatch_in_shared_fixtures():
    """The same for module- and session-scoped fixtures, which are set up before any function-scoped one: a model
    quantized in such a fixture measured its paths (and read and wrote the user's dispatch file), so a test
    comparing it bit for bit with a model built inside the test compared two kernels."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(autotune, "_DEFAULT", autotune.Dispatcher(cache_path=False, env={"QTORCH_AUTOTUNE": "0"}))
        yield


@pytest.fixture(autouse=True)
def no_measured_dispatch(monkeypatch):
    """Every test runs the layouts' own paths, as with ``QTORCH_AUTOTUNE=0`` and no dispatch file: a measured
    choice differs between runs and machines. tests/qtorch/test_dispatch.py installs its own dispatchers."""
    monkeypatch.setattr(autotune, "_DEFAULT", autotune.Dispatcher(cache_path=False, env={"QTORCH_AUTOTUNE": "0"}))


@pytest.fixture(autouse=True)
def quiet_machine(monkeypatch):
    """Dispatchers see no other process's work (the test machine is shared): their decisions are written to their
    files as on a quiet machine. test_autotune.py tests the busy case with its own probe."""
    monkeypatch.setattr(autotune, "_others_running", lambda: 0)


@pytest.fixture
def uncapped_team(monkeypatch):
    """A team no late call caps (the machine is shared: a busy moment would cap it and close the native launches'
    gate, and tests that count which way calls went would fail), its native state restored after the test (some
    tests close the gate or make every launch late)."""
    from qcore import _team

    saved = _team.NATIVE.copy()
    monkeypatch.setattr(_team, "LATE_S", 1e9)
    monkeypatch.setattr(_team, "_CAP", None)
    monkeypatch.setattr(_team, "_LEVEL", 0)
    _team.NATIVE[_team.NATIVE_LATE_NS] = 1 << 62
    _team._sync_native()
    yield _team.NATIVE
    _team.NATIVE[:] = saved
