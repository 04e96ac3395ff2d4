"""The checks of the promises: each one a function ``check(quantizer, case)`` that raises :class:`PromiseBroken`
with the worst element, and the strategy of cases it runs on.

>>> from qcore.testing import adapters
>>> import numpy as np, qcore
>>> check_error_bound(adapters.qcore_quantizer(), (np.array([0.3, -1.0], np.float32), qcore.QuantScheme(4)))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from hypothesis import assume
from hypothesis import strategies as st

from . import strategies as S
from .promises import PromiseBroken, Quantizer


@dataclass(frozen=True)
class Packer:
    """A ``pack(codes, bits) -> bytes`` / ``unpack(bytes, bits, length) -> codes`` pair along the last axis."""

    pack: Callable
    unpack: Callable


def _f64(a) -> np.ndarray:
    return np.asarray(a).astype(np.float64)


def _quantize(qz: Quantizer, x, scheme):
    q = qz.quantize(x, scheme)
    y = np.asarray(qz.dequantize(q))
    if y.shape != x.shape:
        raise PromiseBroken(f"dequantize returned shape {y.shape} for input shape {x.shape}")
    return q, y


def _at(i, x, y, step) -> str:
    return (f"at index {tuple(int(v) for v in i)}: x={float(_f64(x)[i])!r}, dequantized={float(_f64(y)[i])!r}, "
            f"step={float(step[i])!r}")


def _where(mask: np.ndarray, x, y, step) -> str:
    """The first element where ``mask`` holds, described."""
    return _at(np.unravel_index(int(np.argmax(mask)), mask.shape), x, y, step)


def check_error_bound(qz: Quantizer, case) -> None:
    x, scheme = case
    q, y = _quantize(qz, x, scheme)
    xf, yf = _f64(x), _f64(y)
    step = np.abs(np.broadcast_to(_f64(q.scale), x.shape))
    span = S.group_reduce(np.maximum(xf, 0), scheme, np.max) - S.group_reduce(np.minimum(xf, 0), scheme, np.min)
    wide = (not scheme.symmetric) & (span > S.F32_MAX)  # numerics.md: such a group is shrunk, one step allowed
    bound = np.where(wide, step, step / 2)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        err = np.abs(xf - yf)
        bad = ~(err <= bound * (1 + 1e-6) + np.abs(xf) * 2e-7)  # float32 slack: the division and the product
        steps = np.where(step > 0, err / np.where(step > 0, step, 1), np.inf)
    if bad.any():
        i = np.unravel_index(int(np.argmax(np.where(bad, np.nan_to_num(steps, nan=np.inf), -1))), x.shape)
        allowed = "1" if wide[i] else "0.5"
        raise PromiseBroken(f"error {float(err[i])!r} = {float(steps[i]):.4g} steps (allowed {allowed}) "
                            + _at(i, x, y, step))


def check_requantize(qz: Quantizer, case) -> None:
    x, scheme = case
    q, y = _quantize(qz, x, scheme)
    if qz.requantize is not None:
        again = np.asarray(qz.requantize(y, q))
    else:
        s = np.broadcast_to(_f64(q.scale), x.shape)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            # a zero scale (GGUF's all-zero block) maps every value to the zero point, as its quantizer does
            ratio = np.where(s == 0, 0.0, _f64(y) / np.where(s == 0, 1.0, s))
            again = np.clip(np.rint(ratio + _f64(q.zero)), q.qmin, q.qmax)  # = rint(ratio) + zero for an integer zero
    bad = _f64(again) != _f64(q.codes)
    if bad.any():
        i = np.unravel_index(int(np.argmax(bad)), bad.shape)
        raise PromiseBroken(f"code {int(q.codes[i])} re-quantizes to {float(_f64(again)[i])!r} "
                            + _where(bad, x, y, np.broadcast_to(_f64(q.scale), x.shape)))


def check_exact_zero(qz: Quantizer, case) -> None:
    x, scheme = case
    q, y = _quantize(qz, x, scheme)
    bad = (_f64(x) == 0) & (_f64(y) != 0)
    if bad.any():
        raise PromiseBroken("0.0 does not dequantize to 0.0 " + _where(bad, x, y, np.broadcast_to(_f64(q.scale),
                                                                                                 x.shape)))


def check_zero_group(qz: Quantizer, case) -> None:
    x, scheme = case
    q, y = _quantize(qz, x, scheme)
    zero = S.group_reduce(np.abs(_f64(x)), scheme, np.max) == 0
    step = np.broadcast_to(_f64(q.scale), x.shape)
    bad = zero & ~np.isfinite(step)
    if bad.any():
        raise PromiseBroken("an all-zero group got a scale that is not finite " + _where(bad, x, y, step))
    bad = zero & (_f64(y) != 0)
    if bad.any():
        raise PromiseBroken("an all-zero group does not dequantize to exact zeros " + _where(bad, x, y, step))


def check_codes_in_range(qz: Quantizer, case) -> None:
    x, scheme = case
    q, _ = _quantize(qz, x, scheme)
    codes = np.asarray(q.codes)
    if codes.shape != x.shape:
        raise PromiseBroken(f"codes have shape {codes.shape} for input shape {x.shape}")
    bad = (codes < q.qmin) | (codes > q.qmax)
    if bad.any():
        i = np.unravel_index(int(np.argmax(bad)), bad.shape)
        raise PromiseBroken(f"code {codes[i]} at index {tuple(int(v) for v in i)} is outside [{q.qmin}, {q.qmax}]")


def check_finite_output(qz: Quantizer, case) -> None:
    x, scheme = case
    q, y = _quantize(qz, x, scheme)
    step = np.broadcast_to(_f64(q.scale), x.shape)
    for what, values in (("scale", step), ("dequantized value", _f64(y))):
        bad = ~np.isfinite(values)
        if bad.any():
            raise PromiseBroken(f"a {what} is not finite " + _where(bad, x, y, step))


def _same(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and np.array_equal(_f64(a), _f64(b), equal_nan=True)


def _parts(q):
    return (q.codes, np.broadcast_to(q.scale, np.shape(q.codes)), np.broadcast_to(q.zero, np.shape(q.codes)))


def check_views(qz: Quantizer, case) -> None:
    x, scheme = case
    q, y = _quantize(qz, np.ascontiguousarray(x), scheme)
    for how, v in S.views_of(x).items():
        qv, yv = _quantize(qz, v, scheme)
        for name, a, b in zip(("codes", "scale", "zero"), _parts(qv), _parts(q)):
            if not _same(a, b):
                raise PromiseBroken(f"the {how} view gives other {name} than its contiguous copy")
        if not _same(yv, y):
            raise PromiseBroken(f"the {how} view dequantizes differently from its contiguous copy")


def check_rejects_nonfinite(qz: Quantizer, case) -> None:
    x, scheme, where, bad = case
    x = x.copy()
    x.reshape(-1)[where % x.size] = bad
    try:
        qz.quantize(x, scheme)
    except ValueError:
        return
    except Exception as e:  # noqa: BLE001 - any other failure is what the promise rules out
        raise PromiseBroken(f"{bad} input raised {type(e).__name__} ({e}), not ValueError") from None
    raise PromiseBroken(f"{bad} input at flat index {where % x.size} was quantized without an error")


def check_deterministic(qz: Quantizer, case) -> None:
    x, scheme = case
    q1, y1 = _quantize(qz, x.copy(), scheme)
    q2, y2 = _quantize(qz, x.copy(), scheme)
    for name, a, b in zip(("codes", "scale", "zero", "dequantized values"), _parts(q1) + (y1,), _parts(q2) + (y2,)):
        if not _same(a, b):
            raise PromiseBroken(f"two calls on the same input gave different {name}")


def ref_pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """The LSB-first bit stream of docs/packing.md in plain NumPy: code ``i`` of a row -> stream bits
    ``[i*bits, (i+1)*bits)``; stream bit ``k`` -> bit ``k % 8`` of byte ``k // 8``; zero padding."""
    codes = np.asarray(codes, np.uint8)
    n = codes.shape[-1]
    per_code = np.unpackbits(codes[..., None], axis=-1, bitorder="little")[..., :bits]
    return np.packbits(per_code.reshape(codes.shape[:-1] + (n * bits,)), axis=-1, bitorder="little")


def check_packing(packer: Packer, case) -> None:
    codes, bits = case
    back = np.asarray(packer.unpack(packer.pack(codes, bits), bits, codes.shape[-1]))
    if back.shape != codes.shape or not np.array_equal(back, codes):
        raise PromiseBroken(f"unpack(pack(codes)) differs from codes at {bits} bits, shape {codes.shape}")


def check_bit_order(packer: Packer, case) -> None:
    codes, bits = case
    packed = np.asarray(packer.pack(codes, bits))
    want = ref_pack(codes, bits)
    if packed.shape != want.shape or not np.array_equal(packed, want):
        raise PromiseBroken(f"packed bytes differ from the LSB-first stream at {bits} bits, shape {codes.shape}")


# --- the cases each check runs on -------------------------------------------------------------------------------

def cases(qz: Quantizer, zero_groups=False):
    """``(x, scheme)`` over the schemes and dtypes ``qz`` takes, hard magnitudes included."""
    return S.schemes_and_arrays(dtypes=qz.dtypes or S.DTYPES, magnitudes=qz.magnitudes or S.HARD_MAGNITUDES,
                                scheme_strategy=qz.schemes, max_side=qz.max_side, zero_groups=zero_groups,
                                min_side=qz.min_side, min_rank=qz.ranks[0], max_rank=qz.ranks[1])


def _with_zeros(case):
    x, scheme = case
    assume(x.size > 0)
    x = x.copy()
    x.reshape(-1)[:: max(1, x.size // 3)] = 0  # some zeros in most groups
    return x, scheme


def _with_zero_group(case):
    x, scheme = case
    assume(x.size > 0)
    return S.zero_first_group(x, scheme), scheme


def _nonfinite_cases(qz):
    return st.tuples(cases(qz), st.integers(0, 10**6), st.sampled_from([np.nan, np.inf, -np.inf])).filter(
        lambda c: c[0][0].size > 0).map(lambda c: (c[0][0], c[0][1], c[1], c[2]))


CHECKS = {
    "error_bound": (cases, check_error_bound),
    "requantize": (cases, check_requantize),
    "exact_zero": (lambda qz: cases(qz).map(_with_zeros), check_exact_zero),
    "zero_group": (lambda qz: cases(qz).map(_with_zero_group), check_zero_group),
    "codes_in_range": (cases, check_codes_in_range),
    "finite_output": (cases, check_finite_output),
    "views": (cases, check_views),
    "rejects_nonfinite": (_nonfinite_cases, check_rejects_nonfinite),
    "deterministic": (cases, check_deterministic),
    "packing": (lambda packer: S.codes_to_pack(), check_packing),
    "bit_order": (lambda packer: S.codes_to_pack(), check_bit_order),
}
