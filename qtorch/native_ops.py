"""The blocked and vnni layouts' decoding ops as C++ kernels for compiled graphs, built on the user's machine.

A compiled model calls one op per quantized layer and decoding step. Its kernel is fast, but the Python between
the graph and the kernel is not: the op's dispatch into Python, the kept launch looked up, the output allocated,
each on caches the previous layer's weights just streamed through. Measured on the 2-core Zen 3: 60 one-row
bfloat16 8-bit calls of 576x1536 and 1536x576 layers in turn took 3.4-4.1 ms through the Python op and 2.3-2.6 ms
through the C++ one (what the launches alone take); a compiled SmolLM2 step with every layer ``blocked`` and an
8-bit head, 22.9 -> 18.0 ms (w8a16) and 21.1 -> 14.0 ms (w4a16-g64).

So :func:`OPS` maps each inference op a compiled graph may hold (``qtorch::gemm_blocked_infer``, the ``int8dot`` /
``bf16dot`` ones, ``blocked_siblings2`` / ``3``, ``vnni_linear_infer``, ``vnni8_linear_infer``) to a twin of the
same schema and numbers, ``<name>_native``, whose C++ kernel (``native_ops.cpp``) runs the launch Python registered
for the call's operands (:func:`register`, :func:`register_vnni`, :func:`register_vnni8`:
:class:`qtorch._launch.Native`'s state, keyed by the layers' addresses, group size, width, row dtype, dot flag and
``K``) and hands every other call to the Python op. The siblings pass
(:mod:`qtorch.siblings`) puts the twins in the graph where :func:`library` could be built: with the C++ compiler
that ``torch.compile`` itself needs on the CPU (``$CXX``, else ``c++``), against the installed torch's headers,
once per machine (10-15 s), kept under ``$QTORCH_CACHE_DIR`` (default ``~/.cache/qtorch``) by a hash of the
source, the torch build and the compiler. Where it cannot be built, graphs keep the Python ops (same numbers);
``QTORCH_NATIVE_OPS=0`` keeps them too.

>>> import torch
>>> from qtorch import native_ops
>>> lib = native_ops.library()  # built at the first call on this machine, loaded at the next ones
>>> lib is None or torch.ops.qtorch.gemm_blocked_infer_native.default in native_ops.OPS().values()
True
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import threading
import warnings
import weakref

import numpy as np
import torch
from qcore import _team

from . import _launch
from .gemv import TORCH_KINDS

__all__ = ["OPS", "SOURCE", "enabled", "library", "reason", "register", "register_vnni", "register_vnni8",
           "registered", "runs", "set_enabled", "swap"]

#: the C++ source of the ops
SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "native_ops.cpp")
_TWINS = ("gemm_blocked_infer", "int8dot_blocked_infer", "bf16dot_blocked_infer", "blocked_siblings2",
          "blocked_siblings3", "vnni_linear_infer", "vnni8_linear_infer")
_LOCK = threading.Lock()
_LIB: list = []  # [the loaded library, or None where it could not be built], once tried
_REASON: list = []  # why not, where it could not
_FORGET = set()  # the addresses of registered launches with a finalizer (one each)


def enabled() -> bool:
    """Whether compiled graphs may take the C++ ops (``QTORCH_NATIVE_OPS=0``: never)."""
    return os.environ.get("QTORCH_NATIVE_OPS", "1") != "0"


def OPS() -> dict:
    """{inference op: its C++ twin}, the twins as ``torch.ops`` overloads (defined once :func:`library` loaded)."""
    q = torch.ops.qtorch
    return {getattr(q, name).default: getattr(q, name + "_native").default for name in _TWINS}


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _flags() -> list:
    root = os.path.dirname(os.path.abspath(torch.__file__))
    inc, lib = os.path.join(root, "include"), os.path.join(root, "lib")
    return ["-O2", "-std=c++17", "-shared", "-fPIC", "-w",
            f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
            "-I", inc, "-I", os.path.join(inc, "torch", "csrc", "api", "include"),
            "-L", lib, f"-Wl,-rpath,{lib}", "-lc10", "-ltorch_cpu"]


def _target(cxx: str) -> str:
    """Where the library built by ``cxx`` for this source and torch build lives."""
    h = hashlib.sha256()
    with open(SOURCE, "rb") as f:
        h.update(f.read())
    for part in (torch.__version__, str(torch.version.git_version), cxx, os.path.realpath(cxx), " ".join(_flags()),
                 sys.platform):
        h.update(part.encode() + b"\0")
    from .autotune import cache_dir
    return os.path.join(cache_dir(), f"native-ops-{h.hexdigest()[:20]}.so")


def _build(cxx: str, target: str) -> None:
    """Compile to a temporary file beside ``target``, then move it in place (processes building at once each
    write their own file; the last move wins, and every file is whole)."""
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = f"{target}.{os.getpid()}.{threading.get_ident()}.tmp"
    try:
        run = subprocess.run([cxx, SOURCE, "-o", tmp, *_flags()], capture_output=True, text=True, timeout=600)
        if run.returncode != 0:
            raise RuntimeError(f"{os.path.basename(cxx)} failed: {run.stderr.strip()[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def library():
    """The loaded C++ ops (a ``ctypes.CDLL`` of their registration functions), built at the first call where no
    build for this machine is kept; None where they cannot be had (switched off, no team to start, not Linux, no
    compiler, a failed build: :func:`reason` says which)."""
    if _LIB:
        return _LIB[0]
    with _LOCK:
        if not _LIB:
            lib = None
            try:
                lib = _load()
            except Exception as e:  # any failure leaves the Python ops, which give the same numbers
                _REASON.append(f"{type(e).__name__}: {e}")
                if enabled() and _compiler() is not None:  # (a compiler that fails is worth a word; no compiler
                    warnings.warn(f"qtorch's C++ decoding ops are not available ({_REASON[0][:500]}); compiled "
                                  "graphs use the Python ops (same results, slower one-row calls)", RuntimeWarning,
                                  stacklevel=2)  # or the switch set: the user knows)
            _LIB.append(lib)
    return _LIB[0]


def reason() -> str | None:
    """Why :func:`library` is None (None where it is not, or was not tried)."""
    return _REASON[0] if _REASON else None


def _load():
    if not enabled():
        raise RuntimeError("QTORCH_NATIVE_OPS=0")
    if not sys.platform.startswith("linux"):
        raise RuntimeError(f"not built on {sys.platform}")
    gomp = _launch._gomp_address()
    if not gomp:
        raise RuntimeError("no OpenMP team to start")
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler ($CXX, c++, g++, clang++)")
    target = _target(cxx)
    if not os.path.exists(target):
        _build(cxx, target)
    from .layouts import blocked, vnni, vnni8  # noqa: F401  (the Python ops the C++ ones fall back on)
    from . import siblings  # noqa: F401
    try:
        lib = ctypes.CDLL(target)
    except OSError:  # a kept file that does not load (truncated by a full disk, say): built again, once
        _build(cxx, target)
        lib = ctypes.CDLL(target)
    torch.ops.load_library(target)
    lib.qtorch_native_setup.argtypes = [ctypes.c_int64, ctypes.c_int64, ctypes.c_int64]
    lib.qtorch_native_register.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64]
    lib.qtorch_native_forget.argtypes = [ctypes.c_int64]
    lib.qtorch_native_forget.restype = ctypes.c_int64
    lib.qtorch_native_count.restype = ctypes.c_int64
    lib.qtorch_native_runs.restype = ctypes.c_int64
    lib.qtorch_native_enable.argtypes = [ctypes.c_int64]
    lib.qtorch_native_enable.restype = ctypes.c_int64
    lib.qtorch_native_setup(_launch._function_address(), _team.NATIVE.ctypes.data, _launch.FIRST_BLOCK)
    for name in _TWINS:
        torch.library.register_fake(f"qtorch::{name}_native", _fake(name), lib=_FAKES)
    return lib


_FAKES = torch.library.Library("qtorch", "FRAGMENT")


def _fake(name: str):
    layers = int(name[-1]) if name.startswith("blocked_siblings") else 1
    # where the output widths start after x
    first = 2 if name.startswith("vnni8") else 3 if name.startswith("vnni") else 3 * layers + 2

    def fake(x, *args):
        outs = args[first:first + layers]
        return x.new_empty((x.shape[0], sum(outs)))

    return fake


def runs() -> int:
    """Launches the C++ ops have run in this process (0 where the library is not loaded)."""
    lib = _LIB[0] if _LIB else None
    return int(lib.qtorch_native_runs()) if lib is not None else 0


def registered() -> int:
    """Keys with a registered launch (0 where the library is not loaded)."""
    lib = _LIB[0] if _LIB else None
    return int(lib.qtorch_native_count()) if lib is not None else 0


def set_enabled(on: bool) -> bool:
    """Whether the loaded C++ ops run their registered launches (True) or hand every call to the Python ops
    (False: to compare both in one process); the previous setting. False where the library is not loaded."""
    lib = _LIB[0] if _LIB else None
    return bool(lib.qtorch_native_enable(int(on))) if lib is not None else False


def register(native, dot: bool, group_size: int, bits: int, dtype: torch.dtype, k: int, layers) -> bool:
    """Let the C++ ops run ``native`` (a :class:`qtorch._launch.Native`) for one-row ``dtype`` calls of ``K``
    ``k`` on ``layers``: ``(qweight, scale, zero_point, out_features)`` per layer, as the op receives them (their
    addresses are the key), until ``native`` is collected. Nothing where the library is not loaded (never built
    here: eager decoding has no use for it); whether it was registered."""
    key = [len(layers), int(dot), group_size, bits, TORCH_KINDS[dtype], k]
    for q, s, z, n in layers:
        key += [q.data_ptr(), s.data_ptr(), z.data_ptr(), n]
    return _register(native, key)


def register_vnni(native, dtype: torch.dtype, k: int, qweight, scale, zero_point, n: int) -> bool:
    """:func:`register` for the vnni layout's op (``qtorch::vnni_linear_infer``: no group size, width or dot
    flag among its arguments; keyed as a call of 0 layers)."""
    return _register(native, [0, TORCH_KINDS[dtype], k, qweight.data_ptr(), scale.data_ptr(),
                              zero_point.data_ptr(), n])


def register_vnni8(native, dtype: torch.dtype, k: int, qweight, scale, n: int) -> bool:
    """:func:`register` for the vnni8 layout's op (``qtorch::vnni8_linear_infer``: codes and scales only; keyed
    with the tag -1)."""
    return _register(native, [-1, TORCH_KINDS[dtype], k, qweight.data_ptr(), scale.data_ptr(), n])


def _register(native, key: list) -> bool:
    lib = _LIB[0] if _LIB else None
    if lib is None or native is None:
        return False
    arr = np.array(key, np.int64)
    address = native.address
    if address not in _FORGET:
        _FORGET.add(address)
        weakref.finalize(native, _forget, lib, address)
    lib.qtorch_native_register(arr.ctypes.data, arr.size, address)
    return True


def _forget(lib, address: int) -> None:
    lib.qtorch_native_forget(address)
    _FORGET.discard(address)


def swap(graph: torch.fx.Graph) -> int:
    """Replace the inference ops of ``graph`` by their C++ twins where :func:`library` is available; how many."""
    if library() is None:
        return 0
    ops, n = OPS(), 0
    for node in graph.nodes:
        if node.op == "call_function" and node.target in ops:
            node.target = ops[node.target]
            n += 1
    return n
