"""numba's on-disk cache keyed on every kernel source file of a package, not only on the function's own file.

numba checks a cached function against its own file alone. A kernel that inlines code from another module (an
``@njit(inline="always")`` helper, an ``@intrinsic``'s code generator, a called ``@njit`` function) would go on
loading the machine code built from that module's old source after the source changed: wrong results, silently, in
a fork or an editable install after a pull. Kernels declared through :func:`keyed_on`'s decorator carry a fingerprint
of all of their package's kernel sources in their cache key instead: an edit to any of those files compiles them
anew (once; the new entries are cached beside the old ones).

>>> cached = keyed_on([__file__])
>>> cached.key == fingerprint([__file__]) and cached.key > 0
True
"""

from __future__ import annotations

import hashlib
import os

from numba.core.caching import FunctionCache

__all__ = ["fingerprint", "keyed_on", "keyed_cfunc", "SourcesCache", "cached", "KERNEL_SOURCES"]

_HERE = os.path.dirname(os.path.abspath(__file__))
#: qcore's files that hold numba kernels or code the kernels inline (``tests/qcore/test_jitcache.py`` checks that
#: every file of the package that uses numba is listed)
KERNEL_SOURCES = tuple(os.path.join(_HERE, f) for f in (
    "_jitcache.py", "_kernels.py", "_parallel.py", "_team.py", "gptq.py", "hqq.py", "metrics.py", "packing.py",
    "search.py"))


def fingerprint(paths) -> int:
    """A positive 62-bit hash of the names and contents of ``paths`` (a missing file hashes as such)."""
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(os.path.basename(p).encode() + b"\0")
        try:
            with open(p, "rb") as f:
                h.update(f.read())
        except OSError:  # pragma: no cover - no source (a frozen install): the name alone
            h.update(b"\0missing\0")
    return (int.from_bytes(h.digest()[:8], "little") >> 2) | 1


class SourcesCache(FunctionCache):
    """numba's cache of one function, its entries keyed on a sources fingerprint too."""

    def __init__(self, py_func, sources: int):
        super().__init__(py_func)
        self._sources = sources

    def _index_key(self, sig, codegen):
        return super()._index_key(sig, codegen), self._sources


def keyed_on(paths):
    """A decorator for ``@njit(cache=True)`` functions: their cache entries keyed on the :func:`fingerprint` of
    ``paths`` (computed once, here); its ``key`` attribute is that fingerprint (for cfuncs and team kernels)."""
    key = fingerprint(paths)

    def cached(dispatcher):
        dispatcher._cache = SourcesCache(dispatcher.py_func, key)  # before the first compilation or cache load
        return dispatcher

    cached.key = key
    return cached


def keyed_cfunc(pyfunc, sig, key: int, **options):
    """``numba.cfunc(sig, cache=True, **options)(pyfunc)``, its cache entry keyed on the sources fingerprint
    ``key`` (a decorator's ``key``); compiled, or loaded from the cache, here."""
    from numba.core.ccallback import CFunc

    compiled = CFunc(pyfunc, (sig.args, sig.return_type), {}, options)
    compiled._cache = SourcesCache(pyfunc, key)
    compiled.compile()
    return compiled


#: the decorator of qcore's own kernels
cached = keyed_on(KERNEL_SOURCES)
