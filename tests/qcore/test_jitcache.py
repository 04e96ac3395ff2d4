"""numba's on-disk cache keyed on a package's kernel sources (``qcore._jitcache``): an edit to a helper a cached
kernel inlines from another file recompiles the kernel, where numba alone would load the stale machine code."""

import os
import subprocess
import sys
import textwrap

import pytest

from qcore import _jitcache, _kernels, _team

HELPER = '''
from numba import njit


@njit(inline="always")
def helper(x):
    return x + {add}
'''

KERNEL = '''
import os
import sys

from numba import njit

sys.path.insert(0, os.path.dirname(__file__))
from helper import helper  # noqa: E402
from qcore import _jitcache  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
cached = _jitcache.keyed_on([os.path.join(HERE, "helper.py"), os.path.join(HERE, "kernel.py")])


def keyed(x):
    return helper(x)


keyed = cached(njit(cache=True)(keyed))
print(keyed(1))
'''


def _run(folder) -> list:
    env = dict(os.environ, NUMBA_CACHE_DIR=str(folder / "cache"))
    out = subprocess.run([sys.executable, str(folder / "kernel.py")], capture_output=True, text=True, env=env,
                         timeout=300, check=True).stdout.split()
    return [int(v) for v in out]


def test_an_edit_to_an_inlined_helper_recompiles_a_keyed_kernel(tmp_path):
    (tmp_path / "kernel.py").write_text(KERNEL)
    (tmp_path / "helper.py").write_text(textwrap.dedent(HELPER.format(add=1)))
    assert _run(tmp_path) == [2]
    assert any(n.endswith(".nbi") for _, _, names in os.walk(tmp_path / "cache") for n in names)  # cached
    # numba's own key (the kernel's file, unchanged) would load the code of the old helper here (numba 0.6x)
    (tmp_path / "helper.py").write_text(textwrap.dedent(HELPER.format(add=10)))
    assert _run(tmp_path) == [11]


def test_the_fingerprint_follows_every_files_content(tmp_path):
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("x = 1\n")
    b.write_text("y = 2\n")
    before = _jitcache.fingerprint([str(a), str(b)])
    assert before == _jitcache.fingerprint([str(b), str(a)]) and before > 0
    b.write_text("y = 3\n")
    assert _jitcache.fingerprint([str(a), str(b)]) != before


def _numba_files(folder):
    for root, _, names in os.walk(folder):
        for n in names:
            if n.endswith(".py"):
                with open(os.path.join(root, n), encoding="utf-8") as f:
                    src = f.read()
                if "from numba" in src or "import numba" in src:
                    yield os.path.join(root, n)


def test_every_qcore_file_that_uses_numba_is_a_kernel_source():
    folder = os.path.dirname(_jitcache.__file__)
    assert set(_numba_files(folder)) <= set(_jitcache.KERNEL_SOURCES)


@pytest.mark.parametrize("fn", [_kernels.quantize_flat, _kernels.quantize_rows, _team.all_done])
def test_qcores_cached_kernels_are_keyed_on_its_sources(fn):
    assert isinstance(fn._cache, _jitcache.SourcesCache) and fn._cache._sources == _jitcache.cached.key
