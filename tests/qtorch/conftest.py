"""Fixtures shared by the qtorch tests."""

import pytest

from qtorch import autotune, layouts


@pytest.fixture
def torch_pack_kernels(monkeypatch):
    """bfloat16 layers on PyTorch's int8pack / int4pack kernels (the choice on CPUs other than AVX2)."""
    monkeypatch.setattr(layouts, "TORCH_PACK_KERNELS", True)


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
