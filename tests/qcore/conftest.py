"""Fixtures shared by the qcore tests."""

import pytest

import qcore._parallel as P


@pytest.fixture
def threads(monkeypatch):
    """``threads(n)``: split every kernel call of this test into ``n`` threads, whatever the load."""
    def use(n):
        monkeypatch.setattr(P, "NUM_THREADS", n)
        monkeypatch.setattr(P, "DYNAMIC", False)
    return use
