"""Bit packing of 1..8-bit unsigned codes into uint8 (the layout of docs/packing.md).

Layout
------
Packing runs along the **last axis**; every row (every index of the leading axes) packs on its own
into ``ceil(n * bits / 8)`` bytes, so rows can be sliced and sharded without unpacking.

The row is one little-endian bit stream: element ``i`` occupies bits ``[i*bits, (i+1)*bits)`` of the
stream, least significant bit first, and stream bit ``k`` is bit ``k % 8`` of byte ``k // 8``.
Padding bits at the end of a row are zero. ``bits=8`` is the identity. For ``bits=4`` this is
``byte[j] = c[2j] | c[2j+1] << 4``; widths 3, 5, 6, 7 straddle byte boundaries.

Worked example, ``bits=3``, one row of 5 codes ``[5, 3, 7, 0, 6]`` (binary ``101 011 111 000 110``)::

    stream bit:   0 1 2 | 3 4 5 | 6 7 8 | 9 10 11 | 12 13 14 | 15
    from code:    c0=5  | c1=3  | c2=7  | c3=0    | c4=6     | pad
    bit value:    1 0 1 | 1 1 0 | 1 1 1 | 0 0  0  | 0  1  1  | 0

    byte 0 = stream bits 0..7  = 1,0,1,1,1,0,1,1 (LSB first) = 0b11011101 = 0xDD
    byte 1 = stream bits 8..15 = 1,0,0,0,0,1,1,0 (LSB first) = 0b01100001 = 0x61

so ``pack(np.array([5, 3, 7, 0, 6], np.uint8), 3)`` is ``[0xDD, 0x61]`` (2 bytes = ceil(5*3/8)), and
``unpack(np.array([0xDD, 0x61], np.uint8), 3, 5)`` gives the codes back.

Signed codes are stored with an offset of ``2**(bits-1)``; ``QuantizedArray.packed()`` /
``QuantizedArray.from_packed`` apply it, these functions only see unsigned codes.

A row whose length is a multiple of 32 / bits codes (bits 2, 4, 8), viewed as little-endian int32,
is the ``pack_to_int32`` layout of the compressed-tensors format that vLLM loads.

Speed: for widths 1, 2 and 4 a block of 64 codes becomes ``8 * bits`` bytes in a few vector
shifts, masks and one narrowing (LLVM vector IR); for the widths that straddle bytes a block of
64 codes becomes ``bits`` whole 64-bit words by shifts and ORs, so no loop is bit serial. When rows end on byte
boundaries the whole array is one contiguous stream, cut into chunks that threads claim (one long
row and many short rows alike); longer rows that end mid-byte are zero-padded to a byte boundary in
bounded chunks and take the same path; short ones use a row-by-row kernel. Chunks run on an OpenMP
team (``qcore._team``), or Python threads where there is none; the thread count follows the idle cores
at the call (like ``OMP_DYNAMIC``). The range check of ``pack`` costs no
extra pass: the kernels OR the codes together as they go, and the wrapper raises if any bit at or
above ``bits`` is set. The kernels never raise and only see arrays the wrapper has checked.
"""

from __future__ import annotations

import math
import operator
import sys

import numpy as np
from llvmlite import ir
from numba import carray, njit, types
from numba.core import cgutils
from numba.extending import intrinsic
from numba.np.arrayobj import populate_array

from . import _parallel, _team

__all__ = ["pack", "unpack", "packed_shape"]

_U64 = np.uint64
# The stream kernels read codes as native uint64 words; on a big-endian machine everything takes the
# byte-wise rows path, which builds its words explicitly little-endian.
_LITTLE_ENDIAN = sys.byteorder == "little"
# Work is split across threads only in parts of at least this many codes (smaller: thread
# hand-off costs more than it saves).
_PARALLEL_MIN_CODES = 1 << 19


# --------------------------------------------------------------------------------------------
# numba kernels. They receive checked, C-contiguous arrays of the right sizes only.
# Indices are uint64 on purpose: a signed index makes numba emit negative-index wraparound code,
# which stops LLVM from vectorising the loops.
# --------------------------------------------------------------------------------------------


@njit(inline="always")
def _lowmask(nbits):
    return (_U64(1) << _U64(nbits)) - _U64(1)


@njit(inline="always")
def _swar_pack(x, b):
    """8 codes, one per byte of ``x`` (each < 2**b), -> one ``8*b``-bit value, code i at bit i*b."""
    m1 = _lowmask(b) * _U64(0x0001000100010001)
    x = (x & m1) | ((x >> _U64(8 - b)) & (m1 << _U64(b)))
    m2 = _lowmask(2 * b) * _U64(0x0000000100000001)
    x = (x & m2) | ((x >> _U64(16 - 2 * b)) & (m2 << _U64(2 * b)))
    m3 = _lowmask(4 * b)
    x = (x & m3) | ((x >> _U64(32 - 4 * b)) & (m3 << _U64(4 * b)))
    return x


@njit(inline="always")
def _swar_unpack(v, b):
    """Inverse of ``_swar_pack``: an ``8*b``-bit value -> 8 codes, one per byte."""
    m3 = _lowmask(4 * b)
    x = (v & m3) | ((v & (m3 << _U64(4 * b))) << _U64(32 - 4 * b))
    m2 = _lowmask(2 * b) * _U64(0x0000000100000001)
    x = (x & m2) | ((x & (m2 << _U64(2 * b))) << _U64(16 - 2 * b))
    m1 = _lowmask(b) * _U64(0x0001000100010001)
    x = (x & m1) | ((x & (m1 << _U64(b))) << _U64(8 - b))
    return x


# --- widths 3, 5, 6, 7: a block of 64 codes (8 input words) -> b output words ----------------
# The loops over k and i run over compile-time constants once b is a literal, so LLVM unrolls them
# into straight-line shifts and ORs.


@njit(inline="always")
def _pack_blocks(cw, ow, k0, k1, b):
    acc = _U64(0)
    for blk in range(_U64(k0), _U64(k1)):
        ib = _U64(8) * blk
        ob = _U64(b) * blk
        x0, x1, x2, x3 = cw[ib], cw[ib + _U64(1)], cw[ib + _U64(2)], cw[ib + _U64(3)]
        x4, x5, x6, x7 = cw[ib + _U64(4)], cw[ib + _U64(5)], cw[ib + _U64(6)], cw[ib + _U64(7)]
        acc |= ((x0 | x1) | (x2 | x3)) | ((x4 | x5) | (x6 | x7))
        vs = (_swar_pack(x0, b), _swar_pack(x1, b), _swar_pack(x2, b), _swar_pack(x3, b),
              _swar_pack(x4, b), _swar_pack(x5, b), _swar_pack(x6, b), _swar_pack(x7, b))
        for k in range(b):  # output word k takes every value whose 8*b bits overlap it
            w = _U64(0)
            for i in range(8):
                s = 8 * b * i - 64 * k
                if s > -8 * b and s < 64:
                    if s >= 0:
                        w |= vs[i] << _U64(s)
                    else:
                        w |= vs[i] >> _U64(-s)
            ow[ob + _U64(k)] = w
    return acc


@njit(inline="always")
def _unpack_blocks(pw, cw, k0, k1, b):
    vmask = _lowmask(8 * b)
    for blk in range(_U64(k0), _U64(k1)):
        ib = _U64(b) * blk
        ob = _U64(8) * blk
        for i in range(8):
            k = (8 * b * i) // 64
            s = (8 * b * i) % 64
            v = pw[ib + _U64(k)] >> _U64(s)
            if s + 8 * b > 64:
                v |= pw[ib + _U64(k + 1)] << _U64(64 - s)
            cw[ob + _U64(i)] = _swar_unpack(v & vmask, b)


@njit(inline="always")
def _pack_blocks_b(cw, ow, k0, k1, bits):
    if bits == 3:
        return _pack_blocks(cw, ow, k0, k1, 3)
    if bits == 5:
        return _pack_blocks(cw, ow, k0, k1, 5)
    if bits == 6:
        return _pack_blocks(cw, ow, k0, k1, 6)
    return _pack_blocks(cw, ow, k0, k1, 7)


@njit(inline="always")
def _unpack_blocks_b(pw, cw, k0, k1, bits):
    if bits == 3:
        _unpack_blocks(pw, cw, k0, k1, 3)
    elif bits == 5:
        _unpack_blocks(pw, cw, k0, k1, 5)
    elif bits == 6:
        _unpack_blocks(pw, cw, k0, k1, 6)
    else:
        _unpack_blocks(pw, cw, k0, k1, 7)


# --- widths 1, 2, 4: a block of 64 codes (64 bytes) <-> 8*b bytes, as LLVM vector IR. Portable IR that
# LLVM maps onto the host's vector unit: on AVX2 a block is two 32-byte registers, a few lane-wise shifts,
# ORs and ANDs, and one narrowing (pack) or widening (zero-extend) per block. 1.4-1.7x faster in cache than
# the SWAR word loops (uint64 shifts) these replaced, which LLVM vectorised but narrowed poorly; 1-bit
# packing is a compare-and-movemask that numba cannot express at all.

_I8, _I16, _I32, _I64IR = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)


def _splat(ty, n, value):
    return ir.Constant(ir.VectorType(ty, n), [value] * n)


def _byte_arrays(src, dst, k0, k1):
    return (isinstance(src, types.Array) and src.dtype == types.uint8 and isinstance(dst, types.Array)
            and dst.dtype == types.uint8 and k0 == types.int64 and k1 == types.int64)


def _block_ptr(builder, base, k, nbytes, vtype):
    """Address of block ``k`` of ``nbytes`` bytes, as a pointer to ``vtype``."""
    return builder.bitcast(builder.gep(base, [builder.mul(k, ir.Constant(_I64IR, nbytes))]), vtype.as_pointer())


def _pack_block_ir(builder, v, b):
    """64 codes (one a byte, each < 2**b) -> their 8*b packed bytes, code i at stream bit i*b."""
    if b == 1:  # bit 0 of each byte, gathered: trunc to i1 lanes + bitcast is a movemask of (byte << 7)
        return builder.bitcast(builder.trunc(v, ir.VectorType(ir.IntType(1), 64)), _I64IR)
    w = builder.bitcast(v, ir.VectorType(_I16, 32))  # lane j: c[2j] | c[2j+1] << 8
    if b == 4:  # low byte of w | w >> 4 is c[2j] | c[2j+1] << 4 (c[2j] >> 4 is 0 for valid codes)
        return builder.trunc(builder.or_(w, builder.lshr(w, _splat(_I16, 32, 4))), ir.VectorType(_I8, 32))
    # b == 2: first pairs into 4-bit values in i16 lanes, then pairs of those into bytes in i32 lanes
    w = builder.and_(builder.or_(w, builder.lshr(w, _splat(_I16, 32, 6))), _splat(_I16, 32, 0xF))
    d = builder.bitcast(w, ir.VectorType(_I32, 16))
    return builder.trunc(builder.or_(d, builder.lshr(d, _splat(_I32, 16, 12))), ir.VectorType(_I8, 16))


def _unpack_block_ir(builder, p, b):
    """The 8*b packed bytes of 64 codes -> the 64 codes, one a byte."""
    v64 = ir.VectorType(_I8, 64)
    if b == 1:  # byte j/8 to lanes j, keep bit j % 8, compare to 0
        rep = builder.shuffle_vector(p, ir.Constant(p.type, None),
                                     ir.Constant(ir.VectorType(_I32, 64), [j // 8 for j in range(64)]))
        sel = builder.and_(rep, ir.Constant(v64, [1 << (j % 8) for j in range(64)]))
        return builder.zext(builder.icmp_unsigned("!=", sel, ir.Constant(v64, [0] * 64)), v64)
    if b == 4:  # i16 lane j holds byte j: (p | p << 4) & 0x0F0F is the low nibble, then the high one
        w = builder.zext(p, ir.VectorType(_I16, 32))
        w = builder.and_(builder.or_(w, builder.shl(w, _splat(_I16, 32, 4))), _splat(_I16, 32, 0x0F0F))
        return builder.bitcast(w, v64)
    # b == 2: byte j -> its two nibbles in the i16 halves of i32 lane j, then each nibble -> two bytes
    d = builder.zext(p, ir.VectorType(_I32, 16))
    d = builder.and_(builder.or_(d, builder.shl(d, _splat(_I32, 16, 12))), _splat(_I32, 16, 0x000F000F))
    w = builder.bitcast(d, ir.VectorType(_I16, 32))
    w = builder.and_(builder.or_(w, builder.shl(w, _splat(_I16, 32, 6))), _splat(_I16, 32, 0x0303))
    return builder.bitcast(w, v64)


def _pack_loop(b):
    """Intrinsic ``(src u8[], dst u8[], k0, k1) -> acc``: pack the 64-code blocks ``[k0, k1)`` of ``src``
    into ``dst``. ``acc`` is the OR of all the codes spread over the 8 bytes of a word (the range check)."""
    @intrinsic
    def loop(typingctx, src, dst, k0, k1):
        if not _byte_arrays(src, dst, k0, k1):
            return None

        def codegen(context, builder, sig, args):
            s = context.make_array(sig.args[0])(context, builder, args[0])
            d = context.make_array(sig.args[1])(context, builder, args[1])
            v64 = ir.VectorType(_I8, 64)
            accp = cgutils.alloca_once_value(builder, ir.Constant(v64, [0] * 64))
            with cgutils.for_range(builder, builder.sub(args[3], args[2])) as lp:
                k = builder.add(args[2], lp.index)
                v = builder.load(_block_ptr(builder, s.data, k, 64, v64), align=1)
                builder.store(builder.or_(builder.load(accp), v), accp)
                out = _pack_block_ir(builder, v, b)
                builder.store(out, _block_ptr(builder, d.data, k, 8 * b, out.type), align=1)
            words = builder.bitcast(builder.load(accp), ir.VectorType(_I64IR, 8))
            acc = builder.extract_element(words, ir.Constant(_I32, 0))
            for lane in range(1, 8):
                acc = builder.or_(acc, builder.extract_element(words, ir.Constant(_I32, lane)))
            return acc

        return types.uint64(src, dst, k0, k1), codegen
    return loop


def _unpack_loop(b):
    """Intrinsic ``(src u8[], dst u8[], k0, k1)``: unpack the blocks ``[k0, k1)`` (8*b bytes each) of
    ``src`` into 64 codes each in ``dst``."""
    @intrinsic
    def loop(typingctx, src, dst, k0, k1):
        if not _byte_arrays(src, dst, k0, k1):
            return None

        def codegen(context, builder, sig, args):
            s = context.make_array(sig.args[0])(context, builder, args[0])
            d = context.make_array(sig.args[1])(context, builder, args[1])
            vin, v64 = ir.VectorType(_I8, 8 * b), ir.VectorType(_I8, 64)
            with cgutils.for_range(builder, builder.sub(args[3], args[2])) as lp:
                k = builder.add(args[2], lp.index)
                p = builder.load(_block_ptr(builder, s.data, k, 8 * b, vin), align=1)
                builder.store(_unpack_block_ir(builder, p, b), _block_ptr(builder, d.data, k, 64, v64), align=1)
            return context.get_dummy_value()

        return types.void(src, dst, k0, k1), codegen
    return loop


_pack1_loop, _pack2_loop, _pack4_loop = _pack_loop(1), _pack_loop(2), _pack_loop(4)
_unpack1_loop, _unpack2_loop, _unpack4_loop = _unpack_loop(1), _unpack_loop(2), _unpack_loop(4)


# --- rows (any alignment) and stream tails: byte-wise loads, 8 codes at a time. `b` is a runtime
# value here (not specialised per width): these paths are rarer and this keeps compile time low.


@njit(inline="always")
def _load_bytes(a, i, nbytes):
    x = _U64(0)
    for k in range(nbytes):
        x |= _U64(a[i + _U64(k)]) << _U64(8 * k)
    return x


@njit(inline="always")
def _store_bytes(a, i, x, nbytes):
    for k in range(nbytes):
        a[i + _U64(k)] = np.uint8((x >> _U64(8 * k)) & _U64(0xFF))


@njit(inline="always")
def _pack_row_b(c, o, b):
    n = _U64(c.size)
    ng = n // _U64(8)
    acc = _U64(0)
    for g in range(ng):
        x = _load_bytes(c, _U64(8) * g, 8)
        acc |= x
        _store_bytes(o, _U64(b) * g, _swar_pack(x, b), b)
    # tail of r < 8 codes: r*b < 64 bits, into ceil(r*b/8) bytes, padding bits zero
    r = n - _U64(8) * ng
    v = _U64(0)
    for i in range(r):
        x = _U64(c[_U64(8) * ng + i])
        acc |= x
        v |= x << (_U64(b) * i)
    nbytes = (r * _U64(b) + _U64(7)) // _U64(8)
    base = _U64(b) * ng
    for k in range(nbytes):
        o[base + k] = np.uint8((v >> (_U64(8) * k)) & _U64(0xFF))
    return acc


@njit(inline="always")
def _unpack_row_b(p, c, b):
    n = _U64(c.size)
    ng = n // _U64(8)
    for g in range(ng):
        v = _load_bytes(p, _U64(b) * g, b)
        _store_bytes(c, _U64(8) * g, _swar_unpack(v, b), 8)
    r = n - _U64(8) * ng
    nbytes = (r * _U64(b) + _U64(7)) // _U64(8)
    base = _U64(b) * ng
    v = _U64(0)
    for k in range(nbytes):
        v |= _U64(p[base + k]) << (_U64(8) * k)
    m = _lowmask(b)
    for i in range(r):
        c[_U64(8) * ng + i] = np.uint8((v >> (_U64(b) * i)) & m)


# --- team kernels (qcore._team): one cfunc per width for each direction, plus one for the rows path, each
# compiled on first use (a user of 4-bit codes compiles only those). Stream chunks are 64-code blocks; rows
# chunks are rows.

_ROWS = 0  # the key of the rows kernels in _TEAM_PACK / _TEAM_UNPACK (their width comes from the block)
#: every packing kernel's operands: ``rows`` rows of ``src_len`` bytes at ``src`` into rows of ``dst_len`` at ``dst``
OPERANDS = _team.Operands("packing", bits=_team.I64, src=_team.ADDR, rows=_team.I64, src_len=_team.I64,
                          dst=_team.ADDR, dst_len=_team.I64)
_read = OPERANDS.read


@njit(inline="always")
def _stream_bytes(o):
    return carray(o.src, o.src_len, np.uint8), carray(o.dst, o.dst_len, np.uint8)


@intrinsic
def _u64_words(typingctx, addr, n):
    """``n`` uint64 words at byte address ``addr`` (a pointer or an int) as an array typed *unaligned* (numba then
    loads and stores them with alignment 1): a stream may start at any byte (a checkpoint's tensor, a chunk of
    rows)."""
    aryty = types.Array(types.uint64, 1, "C", aligned=False)
    is_ptr = isinstance(addr, types.RawPointer)

    def codegen(context, builder, sig, args):
        ary = context.make_array(aryty)(context, builder)
        itemsize = context.get_constant(types.intp, 8)
        u64p = context.get_value_type(types.uint64).as_pointer()
        data = builder.bitcast(args[0], u64p) if is_ptr else builder.inttoptr(args[0], u64p)
        populate_array(ary, data=data,
                       shape=cgutils.pack_array(builder, [args[1]]), strides=cgutils.pack_array(builder, [itemsize]),
                       itemsize=itemsize, meminfo=None)
        return ary._getvalue()

    return aryty(addr, n), codegen


@njit(inline="always")
def _stream_words(o):
    return _u64_words(o.src, o.src_len // 8), _u64_words(o.dst, o.dst_len // 8)


@njit(inline="always")
def _row_arrays(o):
    return carray(o.src, (o.rows, o.src_len), np.uint8), carray(o.dst, (o.rows, o.dst_len), np.uint8)


# One chunk function per kernel and width, so that each cfunc holds only its own code: a cfunc that
# dispatched on the width at run time compiled every width's unrolled code, 30 s each.

@njit(inline="always")
def _pack_rows_chunk(o, i, lo, hi, _x, _y):
    c2, o2 = _row_arrays(o)
    acc = _U64(0)
    for r in range(lo, hi):
        acc |= _pack_row_b(c2[r], o2[r], o.bits)
    return acc


@njit(inline="always")
def _unpack_rows_chunk(o, i, lo, hi, _x, _y):
    p2, c2 = _row_arrays(o)
    for r in range(lo, hi):
        _unpack_row_b(p2[r], c2[r], o.bits)
    return _U64(0)


@njit(inline="always")
def _pack1_chunk(o, i, lo, hi, _x, _y):
    src, dst = _stream_bytes(o)
    return _pack1_loop(src, dst, lo, hi)


@njit(inline="always")
def _pack2_chunk(o, i, lo, hi, _x, _y):
    src, dst = _stream_bytes(o)
    return _pack2_loop(src, dst, lo, hi)


@njit(inline="always")
def _pack4_chunk(o, i, lo, hi, _x, _y):
    src, dst = _stream_bytes(o)
    return _pack4_loop(src, dst, lo, hi)


@njit(inline="always")
def _pack3_chunk(o, i, lo, hi, _x, _y):
    src, dst = _stream_words(o)
    return _pack_blocks(src, dst, lo, hi, 3)


@njit(inline="always")
def _pack5_chunk(o, i, lo, hi, _x, _y):
    src, dst = _stream_words(o)
    return _pack_blocks(src, dst, lo, hi, 5)


@njit(inline="always")
def _pack6_chunk(o, i, lo, hi, _x, _y):
    src, dst = _stream_words(o)
    return _pack_blocks(src, dst, lo, hi, 6)


@njit(inline="always")
def _pack7_chunk(o, i, lo, hi, _x, _y):
    src, dst = _stream_words(o)
    return _pack_blocks(src, dst, lo, hi, 7)


@njit(inline="always")
def _unpack1_chunk(o, i, lo, hi, _x, _y):
    src, dst = _stream_bytes(o)
    _unpack1_loop(src, dst, lo, hi)
    return _U64(0)


@njit(inline="always")
def _unpack2_chunk(o, i, lo, hi, _x, _y):
    src, dst = _stream_bytes(o)
    _unpack2_loop(src, dst, lo, hi)
    return _U64(0)


@njit(inline="always")
def _unpack4_chunk(o, i, lo, hi, _x, _y):
    src, dst = _stream_bytes(o)
    _unpack4_loop(src, dst, lo, hi)
    return _U64(0)


@njit(inline="always")
def _unpack3_chunk(o, i, lo, hi, _x, _y):
    src, dst = _stream_words(o)
    _unpack_blocks(src, dst, lo, hi, 3)
    return _U64(0)


@njit(inline="always")
def _unpack5_chunk(o, i, lo, hi, _x, _y):
    src, dst = _stream_words(o)
    _unpack_blocks(src, dst, lo, hi, 5)
    return _U64(0)


@njit(inline="always")
def _unpack6_chunk(o, i, lo, hi, _x, _y):
    src, dst = _stream_words(o)
    _unpack_blocks(src, dst, lo, hi, 6)
    return _U64(0)


@njit(inline="always")
def _unpack7_chunk(o, i, lo, hi, _x, _y):
    src, dst = _stream_words(o)
    _unpack_blocks(src, dst, lo, hi, 7)
    return _U64(0)


def _pack_rows(data):
    _team.claim_operands(data, _read, _pack_rows_chunk, 0, 0)


def _pack_1(data):
    _team.claim_operands(data, _read, _pack1_chunk, 0, 0)


def _pack_2(data):
    _team.claim_operands(data, _read, _pack2_chunk, 0, 0)


def _pack_3(data):
    _team.claim_operands(data, _read, _pack3_chunk, 0, 0)


def _pack_4(data):
    _team.claim_operands(data, _read, _pack4_chunk, 0, 0)


def _pack_5(data):
    _team.claim_operands(data, _read, _pack5_chunk, 0, 0)


def _pack_6(data):
    _team.claim_operands(data, _read, _pack6_chunk, 0, 0)


def _pack_7(data):
    _team.claim_operands(data, _read, _pack7_chunk, 0, 0)


def _unpack_rows(data):
    _team.claim_operands(data, _read, _unpack_rows_chunk, 0, 0)


def _unpack_1(data):
    _team.claim_operands(data, _read, _unpack1_chunk, 0, 0)


def _unpack_2(data):
    _team.claim_operands(data, _read, _unpack2_chunk, 0, 0)


def _unpack_3(data):
    _team.claim_operands(data, _read, _unpack3_chunk, 0, 0)


def _unpack_4(data):
    _team.claim_operands(data, _read, _unpack4_chunk, 0, 0)


def _unpack_5(data):
    _team.claim_operands(data, _read, _unpack5_chunk, 0, 0)


def _unpack_6(data):
    _team.claim_operands(data, _read, _unpack6_chunk, 0, 0)


def _unpack_7(data):
    _team.claim_operands(data, _read, _unpack7_chunk, 0, 0)


_TEAM_PACK = {b: _team.TeamKernel(f) for b, f in enumerate(
    (_pack_rows, _pack_1, _pack_2, _pack_3, _pack_4, _pack_5, _pack_6, _pack_7))}
_TEAM_UNPACK = {b: _team.TeamKernel(f) for b, f in enumerate(
    (_unpack_rows, _unpack_1, _unpack_2, _unpack_3, _unpack_4, _unpack_5, _unpack_6, _unpack_7))}


# --------------------------------------------------------------------------------------------
# Python wrappers: all validation lives here.
# --------------------------------------------------------------------------------------------

def _check_bits(bits) -> int:
    if isinstance(bits, (bool, np.bool_)) or not isinstance(bits, (int, np.integer)):
        raise ValueError(f"bits must be an integer in 1..8, got {bits!r} ({type(bits).__name__})")
    bits = int(bits)
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    return bits


def _check_length(length) -> int:
    if isinstance(length, (bool, np.bool_)):
        raise ValueError(f"length must be a non-negative integer, got {length!r}")
    try:
        length = operator.index(length)
    except TypeError:
        raise ValueError(
            f"length must be a non-negative integer, got {length!r} ({type(length).__name__})"
        ) from None
    if length < 0:
        raise ValueError(f"length must be a non-negative integer, got {length}")
    return length


def _packed_len(n: int, bits: int) -> int:
    return (n * bits + 7) // 8


def packed_shape(shape, bits) -> tuple:
    """Shape of ``pack(codes, bits)`` for codes of ``shape``: the last axis ``n`` becomes
    ``ceil(n * bits / 8)``, e.g. ``packed_shape((4096, 4096), 4) == (4096, 2048)``."""
    bits = _check_bits(bits)
    if isinstance(shape, (int, np.integer)) and not isinstance(shape, (bool, np.bool_)):
        shape = (shape,)
    try:
        shape = tuple(operator.index(d) for d in shape)
    except TypeError:
        raise ValueError(f"shape must be a sequence of non-negative integers, got {shape!r}") from None
    if len(shape) == 0:
        raise ValueError("shape must have at least one axis (packing runs along the last axis), got ()")
    if any(d < 0 for d in shape):
        raise ValueError(f"shape must be a sequence of non-negative integers, got {shape!r}")
    return shape[:-1] + (_packed_len(shape[-1], bits),)


def _first_bad(codes: np.ndarray, mask: np.ndarray):
    flat = int(np.flatnonzero(mask.reshape(-1))[0])
    idx = tuple(int(i) for i in np.unravel_index(flat, codes.shape))
    return idx, codes[idx]


def _raise_too_large(codes: np.ndarray, bits: int):
    idx, val = _first_bad(codes, codes >= (1 << bits))
    raise ValueError(
        f"code {int(val)} at index {idx} does not fit in {bits} bits (allowed 0..{(1 << bits) - 1})"
    )


def _as_uint8_codes(codes, bits: int) -> np.ndarray:
    codes = np.asarray(codes)
    if codes.dtype == np.uint8:
        pass
    elif codes.dtype.kind in "iu":
        # wider or signed integers: check the range here, then narrow (uint8 is the fast path)
        if codes.dtype.kind == "i" and codes.size and (codes < 0).any():
            idx, val = _first_bad(codes, codes < 0)
            raise ValueError(
                f"code {int(val)} at index {idx} is negative; codes must be unsigned in "
                f"0..{(1 << bits) - 1} (offset signed codes by {1 << (bits - 1)} first)"
            )
        if codes.size and (codes >= (1 << bits)).any():
            _raise_too_large(codes, bits)
        codes = codes.astype(np.uint8)
    else:
        raise TypeError(
            f"codes must be an integer array (uint8 preferred), got dtype {codes.dtype}"
        )
    if codes.ndim == 0:
        raise ValueError("codes must have at least one axis (packing runs along the last axis), got a scalar")
    return codes


def pack(codes, bits) -> np.ndarray:
    """Pack unsigned ``bits``-bit codes along the last axis into uint8 (layout: module docstring).

    ``codes``: integer array of any shape and strides (uint8 is the fast path), every value in
    ``0..2**bits - 1``. Returns a new C-contiguous uint8 array of ``packed_shape(codes.shape, bits)``.

    >>> pack(np.array([5, 3, 7, 0, 6], np.uint8), 3)
    array([221,  97], dtype=uint8)
    """
    bits = _check_bits(bits)
    codes = np.ascontiguousarray(_as_uint8_codes(codes, bits))
    n = codes.shape[-1]
    out = np.empty(codes.shape[:-1] + (_packed_len(n, bits),), np.uint8)
    if codes.size == 0:
        return out  # rows of length 0 pack to 0 bytes; no rows at all is an empty result
    if bits == 8:
        np.copyto(out, codes)
        return out
    nrows = codes.size // n
    if _LITTLE_ENDIAN and (nrows == 1 or (n * bits) % 8 == 0):
        # rows end on byte boundaries, so the whole array is one contiguous bit stream
        acc = _pack_stream(codes.reshape(-1), out.reshape(-1), bits)
    elif _LITTLE_ENDIAN and n >= _PAD_MIN_LENGTH:
        acc = _pack_padded(codes.reshape(nrows, n), out.reshape(nrows, -1), bits)
    else:
        acc = 0
        c2, o2 = codes.reshape(nrows, n), out.reshape(nrows, -1)
        for a in _run(_TEAM_PACK[_ROWS], OPERANDS.pack(bits=bits, src=c2, rows=nrows, src_len=n, dst=o2,
                                                       dst_len=o2.shape[1]),
                      nrows, _min_rows(n), (c2, o2)):
            acc |= int(a)
    # acc is the OR of all codes (spread over the 8 bytes of a word): any bit at or above `bits`
    # means some code does not fit. The kernels never raise; the error is raised here.
    allowed = ((1 << bits) - 1) * 0x0101010101010101
    if acc & ~allowed:
        _raise_too_large(codes, bits)
    return out


def unpack(packed, bits, length) -> np.ndarray:
    """Inverse of :func:`pack`: uint8 ``packed`` (last axis ``ceil(length * bits / 8)`` bytes) ->
    uint8 codes with last axis ``length``. Padding bits are ignored, so any bytes unpack to codes
    in ``0..2**bits - 1``.

    >>> unpack(np.array([0xDD, 0x61], np.uint8), 3, 5)
    array([5, 3, 7, 0, 6], dtype=uint8)
    """
    bits = _check_bits(bits)
    length = _check_length(length)
    packed = np.asarray(packed)
    if packed.dtype != np.uint8:
        raise TypeError(f"packed must be a uint8 array, got dtype {packed.dtype}")
    if packed.ndim == 0:
        raise ValueError("packed must have at least one axis, got a scalar")
    m = _packed_len(length, bits)
    if packed.shape[-1] != m:
        raise ValueError(
            f"packed last axis has {packed.shape[-1]} bytes but {length} codes of {bits} bits "
            f"need ceil({length}*{bits}/8) = {m}"
        )
    out = np.empty(packed.shape[:-1] + (length,), np.uint8)
    if out.size == 0:
        return out
    packed = np.ascontiguousarray(packed)
    if bits == 8:
        np.copyto(out, packed)
        return out
    nrows = out.size // length
    if _LITTLE_ENDIAN and (nrows == 1 or (length * bits) % 8 == 0):
        _unpack_stream(packed.reshape(-1), out.reshape(-1), bits)
    elif _LITTLE_ENDIAN and length >= _PAD_MIN_LENGTH:
        _unpack_padded(packed.reshape(nrows, m), out.reshape(nrows, length), bits)
    else:
        p2, c2 = packed.reshape(nrows, m), out.reshape(nrows, length)
        _run(_TEAM_UNPACK[_ROWS], OPERANDS.pack(bits=bits, src=p2, rows=nrows, src_len=m, dst=c2, dst_len=length),
             nrows, _min_rows(length), (p2, c2))
    return out


# --- rows that end mid-byte: zero-pad each row to the next length whose bits fill whole bytes
# (a multiple of 8 / gcd(bits, 8) codes), in bounded chunks of rows, and the rows are one stream
# again. For 1, 2, 4 bits the padded row packs to exactly the same bytes; for 3, 5, 6, 7 it packs
# to up to `bits` extra bytes, dropped by a copy. Extra strided copies, yet several times faster
# than the row-by-row kernel, which remains for short rows.

_PAD_CHUNK_CODES = 1 << 22
_PAD_MIN_LENGTH = 64  # NumPy's strided copy of very short rows costs more than the row kernel


def _padded_len(n: int, bits: int) -> int:
    step = 8 // math.gcd(bits, 8)
    return -(-n // step) * step


def _pack_padded(c2: np.ndarray, o2: np.ndarray, bits: int) -> int:
    (nrows, n), m = c2.shape, o2.shape[1]
    npad = _padded_len(n, bits)
    mpad = npad * bits // 8
    step = max(1, _PAD_CHUNK_CODES // npad)
    tmp = np.zeros((min(step, nrows), npad), np.uint8)  # the padding columns stay zero
    tout = None if mpad == m else np.empty((min(step, nrows), mpad), np.uint8)
    acc = 0
    for r0 in range(0, nrows, step):
        r1 = min(nrows, r0 + step)
        tmp[: r1 - r0, :n] = c2[r0:r1]
        if tout is None:
            acc |= _pack_stream(tmp[: r1 - r0].reshape(-1), o2[r0:r1].reshape(-1), bits)
        else:
            acc |= _pack_stream(tmp[: r1 - r0].reshape(-1), tout[: r1 - r0].reshape(-1), bits)
            o2[r0:r1] = tout[: r1 - r0, :m]
    return acc


def _unpack_padded(p2: np.ndarray, c2: np.ndarray, bits: int) -> None:
    (nrows, n), m = c2.shape, p2.shape[1]
    npad = _padded_len(n, bits)
    mpad = npad * bits // 8
    step = max(1, _PAD_CHUNK_CODES // npad)
    tmp = np.empty((min(step, nrows), npad), np.uint8)
    tin = None if mpad == m else np.zeros((min(step, nrows), mpad), np.uint8)
    for r0 in range(0, nrows, step):
        r1 = min(nrows, r0 + step)
        src = p2[r0:r1]
        if tin is not None:  # codes decoded from the extra zero bytes land past n and are dropped
            tin[: r1 - r0, :m] = src
            src = tin[: r1 - r0]
        _unpack_stream(src.reshape(-1), tmp[: r1 - r0].reshape(-1), bits)
        c2[r0:r1] = tmp[: r1 - r0, :n]


# --- work splitting: qcore._parallel runs a team kernel on an OpenMP team, or on threads ------------


def _run(team_kernel, operands: tuple, total: int, min_part: int, keep: tuple):
    return _parallel.run_chunks(team_kernel, operands, total, min_part, keep=keep)


def _min_rows(n: int) -> int:
    return -(-_PARALLEL_MIN_CODES // max(n, 1))


def _pack_stream(c: np.ndarray, o: np.ndarray, bits: int) -> int:
    """Pack the contiguous codes ``c`` into ``o`` as one bit stream: whole 64-code blocks split across
    threads, then the tail (under 64 codes) as one row. Returns the OR of the codes (see ``pack``)."""
    nblocks = c.size // 64
    acc = 0
    if nblocks:
        operands = OPERANDS.pack(bits=bits, src=c, rows=1, src_len=64 * nblocks, dst=o, dst_len=8 * bits * nblocks)
        for a in _run(_TEAM_PACK[bits], operands, nblocks, _PARALLEL_MIN_CODES // 64, (c, o)):
            acc |= int(a)
    if c.size > 64 * nblocks:
        tail, otail = c[64 * nblocks:], o[8 * bits * nblocks:]
        operands = OPERANDS.pack(bits=bits, src=tail, rows=1, src_len=tail.size, dst=otail, dst_len=otail.size)
        acc |= int(_run(_TEAM_PACK[_ROWS], operands, 1, 1, (tail, otail))[0])
    return acc


def _unpack_stream(p: np.ndarray, c: np.ndarray, bits: int) -> None:
    nblocks = c.size // 64
    if nblocks:
        operands = OPERANDS.pack(bits=bits, src=p, rows=1, src_len=8 * bits * nblocks, dst=c, dst_len=64 * nblocks)
        _run(_TEAM_UNPACK[bits], operands, nblocks, _PARALLEL_MIN_CODES // 64, (p, c))
    if c.size > 64 * nblocks:
        ptail, tail = p[8 * bits * nblocks:], c[64 * nblocks:]
        _run(_TEAM_UNPACK[_ROWS], OPERANDS.pack(bits=bits, src=ptail, rows=1, src_len=ptail.size, dst=tail,
                                               dst_len=tail.size), 1, 1, (ptail, tail))
