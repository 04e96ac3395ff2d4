"""LLVM IR types and helpers shared by the vector kernels (``gemv``, ``gemm``, ``dequant``, ``amx``). A leaf:
imports llvmlite and numba (its config, to tell the CPU it compiles for; its IR utilities).

>>> str(V8F), str(vec(ir.HalfType(), 16)), str(vec(BF16, 16))
('<8 x float>', '<16 x half>', '<16 x bfloat>')
"""

import os

from llvmlite import binding, ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from qcore import _jitcache

_HERE = os.path.dirname(os.path.abspath(__file__))
#: qtorch's files that hold numba kernels or code the kernels inline, and qcore's team code they inline
#: (``tests/qtorch/test_ir.py`` checks that every file of the package that uses numba is listed)
KERNEL_SOURCES = tuple(os.path.join(_HERE, f) for f in (
    "_ir.py", "_launch.py", "_omp.py", "_stack_cache.py", "amx.py", "amx_rows.py", "bf16dot.py", "dequant.py",
    "dequant_rows.py", "gemm.py", "gemv.py", "planes.py", "vnni.py", "vnni_amx.py", "vnni_bf16.py", "vnni_lut.py",
    "vnni8.py",
    os.path.join("layouts", "int4pack.py"))) + tuple(
    p for p in _jitcache.KERNEL_SOURCES if os.path.basename(p) in ("_parallel.py", "_team.py", "_jitcache.py"))
#: the decorator of qtorch's cached kernels: keyed on all of :data:`KERNEL_SOURCES` (numba alone checks the
#: function's own file, and these kernels inline code from several)
cached = _jitcache.keyed_on(KERNEL_SOURCES)


class BFloatType(ir.Type):
    """LLVM's ``bfloat`` (llvmlite's IR builder has no such type; LLVM itself has had it since version 11)."""

    null = "0.0"
    intrinsic_name = "bf16"

    def __str__(self):
        return "bfloat"

    def __eq__(self, other):
        return isinstance(other, BFloatType)

    def __hash__(self):
        return hash(BFloatType)


I8 = ir.IntType(8)
I16 = ir.IntType(16)
I32 = ir.IntType(32)
I64 = ir.IntType(64)
F32 = ir.FloatType()
F16 = ir.HalfType()
BF16 = BFloatType()
V8F = ir.VectorType(F32, 8)  # 8 float32 lanes: one AVX2 register
V8I = ir.VectorType(I32, 8)
V8B = ir.VectorType(I8, 8)  # 8 codes, widened to V8I before conversion


def vec(elem: ir.Type, lanes: int) -> ir.VectorType:
    """``<lanes x elem>``: the kernels pick 16 lanes (one AVX-512 register of float32) where a row allows."""
    return ir.VectorType(elem, lanes)


def host_has(feature: str) -> bool:
    """Whether numba compiles for this CPU (no ``NUMBA_CPU_NAME``) and it has ``feature`` (LLVM's name, e.g.
    ``avx512bf16``; ``NUMBA_CPU_FEATURES``, where set, is the list): an instruction chosen by it then exists
    wherever the compiled (and cached) code runs."""
    from numba.core import config

    if config.CPU_NAME:
        return False
    if config.CPU_FEATURES is not None:
        return f"+{feature}" in config.CPU_FEATURES.split(",")
    try:
        return bool(binding.get_host_cpu_features().get(feature, False))
    except RuntimeError:  # pragma: no cover - LLVM cannot tell on this platform
        return False


def prefetch_l2(builder, ptr) -> None:
    """IR: prefetch the line holding ``ptr`` into L2 (``llvm.prefetch``: a read, locality 2). A prefetch never
    faults, so an address past the end of an array is harmless."""
    sig = ir.FunctionType(ir.VoidType(), [I8.as_pointer(), I32, I32, I32])
    fn = cgutils.get_or_insert_function(builder.module, sig, "llvm.prefetch.p0")
    builder.call(fn, [builder.bitcast(ptr, I8.as_pointer()), ir.Constant(I32, 0), ir.Constant(I32, 2),
                      ir.Constant(I32, 1)])


class _VolatileLoad(ir.LoadInstr):
    """``load volatile``: llvmlite's builder writes no such load; LLVM neither drops nor merges it."""

    def descr(self, buf):
        super().descr(buf)
        buf[-1] = buf[-1].replace("load ", "load volatile ", 1)


def touch(builder, ptr) -> None:
    """IR: read the 4 bytes at ``ptr`` and discard them (a volatile load, which LLVM keeps). A second read of a line
    that a kernel's vector load reads once is what starts the L1 prefetcher on the next line (see
    :mod:`qtorch.prefetch`)."""
    instr = _VolatileLoad(builder.block, builder.bitcast(ptr, I32.as_pointer()))
    instr.align = 4
    builder._insert(instr)


@intrinsic
def prefetch_at(typingctx, arr, off):
    """Prefetch the line holding element ``off`` of the C-contiguous ``arr`` (flat index) into L2."""
    def codegen(context, builder, sig, args):
        a = context.make_array(sig.args[0])(context, builder, args[0])
        prefetch_l2(builder, builder.gep(a.data, [context.cast(builder, args[1], sig.args[1], types.int64)]))
        return context.get_dummy_value()

    return types.void(arr, off), codegen


class X86AMXType(ir.Type):
    """LLVM's ``x86_amx``: one AMX tile register's value (llvmlite's IR builder has no such type). Values of it
    exist only between ``llvm.x86.*.internal`` tile intrinsics inside one function; LLVM configures the tiles."""

    def __str__(self):
        return "x86_amx"

    def __eq__(self, other):
        return isinstance(other, X86AMXType)

    def __hash__(self):
        return hash(X86AMXType)


AMX_TILE = X86AMXType()


def to_bf16x32(builder, h0, h1, native: bool):
    """``<32 x i16>``: bfloat16 bits of two ``<16 x float>`` (``h0`` the low half), rounded to nearest even:
    ``native``, one ``vcvtne2ps2bf16`` (AVX512-BF16; it reads float32 subnormals as zero), else integer rounding
    (exact for subnormals too). One instruction for 32 values measured 1.2x faster than LLVM's ``fptrunc``, which
    emits two ``vcvtneps2bf16``."""
    v16f, v16i = vec(F32, 16), vec(I32, 16)
    if native:  # its second operand fills the low half
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vec(BF16, 32), [v16f, v16f]),
                                            "llvm.x86.avx512bf16.cvtne2ps2bf16.512")
        return builder.bitcast(builder.call(fn, [h1, h0]), vec(I16, 32))
    halves = []
    for f in (h0, h1):
        u = builder.bitcast(f, v16i)
        odd = builder.and_(builder.lshr(u, ir.Constant(v16i, [16] * 16)), ir.Constant(v16i, [1] * 16))
        u = builder.add(builder.add(u, ir.Constant(v16i, [0x7FFF] * 16)), odd)
        halves.append(builder.trunc(builder.lshr(u, ir.Constant(v16i, [16] * 16)), vec(I16, 16)))
    return builder.shuffle_vector(halves[0], halves[1], ir.Constant(vec(I32, 32), list(range(32))))
