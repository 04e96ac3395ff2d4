"""Hypothesis strategies for quantization inputs, with the hard values mixed in.

Magnitudes from float32 subnormals to the edge of the float32 range, exact ties at ``k + 0.5`` steps, all-zero
groups, odd and empty lengths, every supported dtype; schemes over bits, modes and granularities.

>>> from hypothesis import given
>>> @given(schemes_and_arrays())
... def test_my_quantizer(case):
...     x, scheme = case          # x: a NumPy array that fits scheme's granularity
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
from hypothesis import assume
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from qcore.scheme import PerChannel, PerGroup, PerTensor, QuantScheme

DTYPES = (np.float16, np.float32, np.float64, ml_dtypes.bfloat16)
F32_MAX = float(np.finfo(np.float32).max)
F32_TINY = float(np.finfo(np.float32).tiny)
# the group magnitudes drawn by default; SUBNORMAL and NEAR_MAX are the edges of float32
SUBNORMAL, NEAR_MAX = 1e-40, 3e38
DRAWN_ELEMENTS = 512  # arrays up to this size are drawn (and shrunk) element by element
MAGNITUDES = (1e-30, 1e-3, 1.0, 1e4, 1e30)
HARD_MAGNITUDES = MAGNITUDES + (SUBNORMAL, NEAR_MAX)


def granularities(rank: int, kinds=("tensor", "channel", "group"), sizes=(1, 2, 3, 4, 8), last_axis_only=False):
    """A strategy of granularities for arrays of ``rank`` dimensions."""
    axes = st.just(-1) if last_axis_only else st.integers(-rank, rank - 1)

    @st.composite
    def draw_one(draw):
        kind = draw(st.sampled_from(list(kinds)))
        if kind == "tensor":
            return PerTensor()
        axis = draw(axes)
        return PerChannel(axis) if kind == "channel" else PerGroup(draw(st.sampled_from(list(sizes))), axis)
    return draw_one()


def schemes(bits=st.integers(1, 8), symmetric=st.booleans(), rank: int = 2, **granularity_options):
    """A strategy of valid :class:`QuantScheme` values (1-bit schemes are asymmetric)."""
    @st.composite
    def draw_one(draw):
        b = draw(bits)
        return QuantScheme(b, b > 1 and draw(symmetric), draw(granularities(rank, **granularity_options)))
    return draw_one()


def _tie_elements(bits: int, symmetric: bool, magnitude: float):
    """Half-integer multiples of a power of two: a group reaching ``qmax * unit`` has scale ``unit`` exactly
    (a symmetric group) and its odd multiples of ``unit / 2`` are exact ties."""
    qmax = 2 ** (bits - 1) - 1 if symmetric else 2 ** bits - 1
    unit = 2.0 ** int(np.floor(np.log2(magnitude / qmax)))  # the ties stay within [-magnitude, magnitude]
    return st.integers(-2 * qmax, 2 * qmax).map(lambda k: k / 2 * unit)


@st.composite
def arrays_for(draw, scheme: QuantScheme, rank: int, dtypes=DTYPES, magnitudes=MAGNITUDES, max_side: int = 9,
               zero_groups: bool = True, min_side: int = 0):
    """An array that fits ``scheme`` (a group axis is a multiple of the group size; empty axes included).

    Elements are uniform in ``[-m, m]`` for a drawn magnitude ``m``, or exact ties, plus (when ``zero_groups``)
    the first group along the scheme's axis zeroed. Draws that do not fit the dtype are discarded."""
    shape = list(draw(hnp.array_shapes(min_dims=rank, max_dims=rank, min_side=min_side, max_side=max_side)))
    g = scheme.granularity
    if isinstance(g, PerGroup):
        shape[g.axis % rank] = g.size * draw(st.integers(min(min_side, 1), 4))
    dtype = draw(st.sampled_from(list(dtypes)))
    m = draw(st.sampled_from(list(magnitudes)))
    ties = draw(st.integers(0, 3)) == 0
    if int(np.prod(shape)) > DRAWN_ELEMENTS:  # Hypothesis draws element by element: large arrays come from a seed
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        if ties:
            qmax = 2 ** (scheme.bits - 1) - 1 if scheme.symmetric else 2 ** scheme.bits - 1
            unit = 2.0 ** int(np.floor(np.log2(m / qmax)))
            data = rng.integers(-2 * qmax, 2 * qmax + 1, shape) / 2 * unit
        else:
            data = rng.uniform(-1, 1, shape).astype(np.float32).astype(np.float64) * m
    else:
        elements = (_tie_elements(scheme.bits, scheme.symmetric, m) if ties
                    else st.floats(-1, 1, width=32).map(lambda v: v * m))
        data = draw(hnp.arrays(np.float64, tuple(shape), elements=elements))
    if zero_groups and data.size and draw(st.booleans()):
        data = zero_first_group(data, scheme)
    with np.errstate(over="ignore"):  # a magnitude the dtype cannot hold: such draws are discarded just below
        x = data.astype(dtype)
    # float64 beyond float32 max is a documented ValueError (the rejects_nonfinite kind of case), not a value to grid
    assume(np.all(np.abs(x.astype(np.float64)) <= F32_MAX))
    return x


@st.composite
def schemes_and_arrays(draw, max_rank=3, elements=None, dtypes=DTYPES, magnitudes=MAGNITUDES, scheme_strategy=None,
                       max_side=9, zero_groups=False, min_side=0, min_rank=1):
    """``(x, scheme)``: a scheme over a drawn rank and an array that fits it.

    ``elements`` (a strategy of floats) replaces the drawn magnitudes; ``scheme_strategy(rank)`` replaces
    :func:`schemes`; ``magnitudes=HARD_MAGNITUDES`` adds subnormals and values near the float32 maximum."""
    rank = draw(st.integers(min_rank, max_rank))
    scheme = draw(schemes(rank=rank) if scheme_strategy is None else scheme_strategy(rank))
    if elements is None:
        x = draw(arrays_for(scheme, rank, dtypes, magnitudes, max_side, zero_groups, min_side))
    else:
        shape = list(draw(hnp.array_shapes(min_dims=rank, max_dims=rank, min_side=0, max_side=max_side)))
        g = scheme.granularity
        if isinstance(g, PerGroup):
            shape[g.axis % rank] = g.size * draw(st.integers(0, 4))
        data = draw(hnp.arrays(np.float64, tuple(shape), elements=elements))
        with np.errstate(over="ignore"):
            x = data.astype(draw(st.sampled_from(list(dtypes))))
        assume(np.all(np.isfinite(x.astype(np.float64))))
    return x, scheme


@st.composite
def extreme_groups(draw):
    """Per-tensor schemes on values anywhere up to +-float32 max, ranges wider than float32 can hold included."""
    bits = draw(st.integers(1, 8))
    symmetric = bits > 1 and draw(st.booleans())
    ends = st.floats(0, 1).map(lambda u: u * F32_MAX)
    lo, hi = -draw(ends), draw(ends)
    fill = st.floats(0, 1).map(lambda u: lo + u * (hi - lo))
    x = np.array([lo, hi] + draw(st.lists(fill, max_size=6)), np.float32)
    return x, QuantScheme(bits, symmetric, PerTensor())


def zero_first_group(x: np.ndarray, scheme: QuantScheme) -> np.ndarray:
    """A copy of ``x`` whose first group (along the scheme's axis) is all zeros."""
    x = x.copy()
    g = scheme.granularity
    if isinstance(g, PerTensor):
        x[...] = 0
    else:
        index = [slice(None)] * x.ndim
        index[g.axis % x.ndim] = slice(0, g.size if isinstance(g, PerGroup) else 1)
        x[tuple(index)] = 0
    return x


def views_of(x: np.ndarray):
    """Non-contiguous views holding exactly ``x``'s values (same shape, so the scheme means the same data)."""
    return {
        "fortran": np.asfortranarray(x) if x.ndim > 1 else np.repeat(x, 2, axis=0)[::2],
        "reversed": np.ascontiguousarray(x[..., ::-1])[..., ::-1],
        "strided": np.repeat(x, 2, axis=0)[::2],
    }


# --- packing ----------------------------------------------------------------------------------------------------

ROW_LENGTHS = st.one_of(st.sampled_from([0, 1, 2, 3, 5, 7, 8, 9, 13, 31, 33, 63, 64, 65, 97, 127, 1000, 1021]),
                        st.integers(0, 300))
LEADING_SHAPES = st.one_of(st.lists(st.integers(0, 4), min_size=0, max_size=3),
                           st.lists(st.integers(1, 600), min_size=1, max_size=1))  # many rows


@st.composite
def codes_to_pack(draw, bits=st.integers(1, 8), lead=LEADING_SHAPES, n=ROW_LENGTHS):
    """``(codes, bits)``: uint8 codes below ``2**bits``, packed along the last axis."""
    b = draw(bits)
    shape = tuple(draw(lead)) + (draw(n),)
    seed = draw(st.integers(0, 2**32 - 1))
    return np.random.default_rng(seed).integers(0, 1 << b, shape, dtype=np.uint8), b


# --- per-group helpers ------------------------------------------------------------------------------------------

def grouped(x: np.ndarray, scheme: QuantScheme):
    """``x`` reshaped so that each group is reduced over the returned axes (keepdims broadcasts back)."""
    g = scheme.granularity
    if isinstance(g, PerTensor):
        return x, tuple(range(x.ndim))
    axis = g.axis % x.ndim
    if isinstance(g, PerChannel):
        return x, tuple(i for i in range(x.ndim) if i != axis)
    shape = x.shape[:axis] + (x.shape[axis] // g.size, g.size) + x.shape[axis + 1:]
    return x.reshape(shape), (axis + 1,)


def expand(params, x_shape, scheme: QuantScheme) -> np.ndarray:
    """Per-tensor, per-channel or per-group parameters (qcore's params shape) broadcast to the element shape."""
    params = np.asarray(params)
    g = scheme.granularity
    if isinstance(g, PerTensor):
        return np.broadcast_to(params, x_shape)
    if isinstance(g, PerChannel):
        axis = g.axis % len(x_shape)
        return np.broadcast_to(params.reshape([-1 if i == axis else 1 for i in range(len(x_shape))]), x_shape)
    return np.repeat(params, g.size, axis=g.axis)


def group_reduce(x: np.ndarray, scheme: QuantScheme, fn) -> np.ndarray:
    """``fn(group, axis=..., keepdims=True)`` of each element's group, broadcast to ``x.shape``."""
    xg, red = grouped(x, scheme)
    if xg.size == 0:
        return np.zeros(x.shape, np.float64)
    return np.broadcast_to(fn(xg, axis=red, keepdims=True), xg.shape).reshape(x.shape)
