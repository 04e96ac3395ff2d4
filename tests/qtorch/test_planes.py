"""qtorch.planes: a row of activations as signed-byte planes per block, the one rounding the integer kernels make."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from qtorch import planes


def _split(x, bsize, parts):
    nb = x.shape[0] // bsize
    xq, xm, xs = np.empty((parts, x.shape[0]), np.int8), np.empty(nb, np.float32), np.empty((nb, 2), np.int32)
    ok = planes.split_row(x, bsize, planes.P[parts], parts, xq, xm, xs)
    return ok, xq.astype(np.int64), xm.astype(np.float64), xs.astype(np.int64)


@given(st.lists(st.floats(-2.0 ** 100, 2.0 ** 100, width=32), min_size=64, max_size=64), st.sampled_from([8, 32, 64]),
       st.sampled_from([2, 3]))
def test_the_planes_hold_x_rounded_within_half_a_step_of_its_block(values, bsize, parts):
    x = np.array(values, np.float32)
    ok, xq, xm, xs = _split(x, bsize, parts)
    assert ok
    P = planes.P[parts]
    q = xq[0] * 256 + xq[1] if parts == 2 else (xq[0] * 256 + xq[1]) * 256 + xq[2]
    step = np.repeat(xm, bsize)  # 2^(e - P) per block, |x| < 2^e
    assert np.all(np.abs(q) <= 2 ** P)
    assert np.all(np.abs(q * step - x.astype(np.float64)) <= step / 2)
    sums = q.reshape(-1, bsize).sum(1)
    if parts == 2:
        assert np.array_equal(xs[:, 0], sums)
    else:  # sum h, and sum (256 m + l)
        assert np.array_equal(xs[:, 0], xq[0].reshape(-1, bsize).sum(1))
        assert np.array_equal(65536 * xs[:, 0] + xs[:, 1], sums)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_row_with_a_nan_or_an_infinity_is_not_split(bad):
    x = np.ones(64, np.float32)
    x[40] = bad
    assert not _split(x, 32, 2)[0]


def test_block_size_is_the_largest_multiple_of_8_up_to_128_dividing_the_group():
    assert [planes.block_size(g) for g in (8, 40, 64, 96, 128, 192, 4096, 12, 4)] == [8, 40, 64, 96, 128, 96, 128, 0, 0]
