"""qcore._parallel.run_split, and the quantize kernels when one call is split across threads."""

import threading

import numpy as np
import pytest

import qcore
import qcore._parallel as P
from qcore import PerChannel, PerGroup, PerTensor, QuantScheme
from tests.qcore.reference import ref_dequantize, ref_quantize


@pytest.mark.parametrize("n", [1, 2, 4])
@pytest.mark.parametrize("total,min_part", [(0, 1), (1, 1), (7, 2), (1000, 10), (100, 1000)])
def test_chunks_cover_the_range_once_in_order(threads, n, total, min_part):
    threads(n)
    seen = []
    lock = threading.Lock()

    def kernel(tag, lo, hi):
        with lock:
            seen.append((lo, hi))
        return (tag, lo, hi)

    results = P.run_split(kernel, ("t",), total, min_part)
    spans = [(lo, hi) for _, lo, hi in results]
    assert spans[0][0] == 0 and spans[-1][1] == total
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))  # contiguous, in chunk order
    assert sorted(seen) == sorted(spans)


def test_a_kernel_error_reaches_the_caller(threads):
    threads(2)

    def kernel(lo, hi):
        if lo > 0:
            raise RuntimeError("boom")
        return lo

    with pytest.raises(RuntimeError, match="boom"):
        P.run_split(kernel, (), 100, 10)


@pytest.mark.parametrize("scheme", [QuantScheme(8, True, PerChannel(0)), QuantScheme(4, False, PerGroup(64)),
                                    QuantScheme(8, True, PerTensor()), QuantScheme(3, False, PerTensor())])
def test_split_calls_equal_the_reference(threads, scheme):
    threads(2)
    x = np.random.default_rng(5).standard_normal((520, 768)).astype(np.float32)  # several chunks of 2^16
    qa = qcore.quantize(x, scheme)
    codes, scale, zp = ref_quantize(x, scheme)
    np.testing.assert_array_equal(qa.codes, codes)
    np.testing.assert_array_equal(qa.scale, scale)
    np.testing.assert_array_equal(qcore.dequantize(qa), ref_dequantize(codes, scale, zp, scheme))
    x[517, 3] = np.nan  # a bad value in the last chunk is still found
    with pytest.raises(ValueError, match=r"index \(517, 3\)"):
        qcore.quantize(x, scheme)
