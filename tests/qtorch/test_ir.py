"""qtorch's cached kernels are keyed on all of its kernel sources (``qtorch._ir.KERNEL_SOURCES``), team kernels
and cfuncs included: an edit to one file a kernel inlines from recompiles the kernel."""

import os

import pytest

from qcore import _jitcache
from qtorch import _ir, _omp, bf16dot, gemm, gemv


def test_every_qtorch_file_that_uses_numba_is_a_kernel_source():
    folder = os.path.dirname(_ir.__file__)
    used = set()
    for root, _, names in os.walk(folder):
        for n in names:
            if n.endswith(".py"):
                with open(os.path.join(root, n), encoding="utf-8") as f:
                    src = f.read()
                if "@njit" in src or "@intrinsic" in src or "cfunc(" in src:
                    used.add(os.path.join(root, n))
    assert used <= set(_ir.KERNEL_SOURCES)
    assert all(os.path.exists(p) for p in _ir.KERNEL_SOURCES)


@pytest.mark.parametrize("fn", [gemv._gemv_range, gemm._gemm_units, bf16dot._dp_units])
def test_qtorchs_cached_kernels_are_keyed_on_its_sources(fn):
    assert isinstance(fn._cache, _jitcache.SourcesCache) and fn._cache._sources == _ir.cached.key


def test_qtorchs_team_kernels_are_keyed_on_its_sources():
    assert _omp.TeamKernel(lambda data: None).sources == _ir.cached.key
    assert all(k.sources == _ir.cached.key for k in gemv._TEAM_KERNELS.values())
