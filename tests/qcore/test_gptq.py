"""qcore.gptq: lower layer output error than min-max on correlated inputs, the format contract, determinism,
and the checks at the boundary."""

import hashlib

import numpy as np
import pytest

from qcore import PerChannel, PerGroup, PerTensor, QuantizedArray, QuantScheme, dequantize, quantize
from qcore.gptq import Hessian, gptq

SCHEMES = [QuantScheme(4, False, PerGroup(32, axis=1)), QuantScheme(4, True, PerGroup(16, axis=-1)),
           QuantScheme(3, False, PerChannel(0)), QuantScheme(4, True, PerTensor()), QuantScheme(8, True)]


def layer(n=48, k=96, samples=600, seed=0):
    """Correlated inputs (a random mixing of Gaussian features, a few of them large) and a weight."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((k, k)) / np.sqrt(k) + np.eye(k)
    x = rng.standard_normal((samples, k)) @ mix
    x[:, :4] *= 5  # outlier features, as activations have
    w = (rng.standard_normal((n, k)) * 0.1).astype(np.float32)
    return x, w


def out_error(x, w, qa):
    return float(np.linalg.norm(x @ (w.astype(np.float64) - dequantize(qa)).T))


@pytest.mark.parametrize("scheme", SCHEMES, ids=str)
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_output_error_is_lower_than_minmax(scheme, act_order):
    x, w = layer()
    qa = gptq(w, Hessian.of(x), scheme, act_order=act_order, block_size=20)
    assert out_error(x, w, qa) < 0.9 * out_error(x, w, quantize(w, scheme))


@pytest.mark.parametrize("scheme", SCHEMES, ids=str)
def test_gptq_keeps_the_format_contract(scheme):
    x, w = layer(seed=1)
    qa = gptq(w, Hessian.of(x), scheme, act_order=True, params="mse")
    assert isinstance(qa, QuantizedArray) and qa.shape == w.shape and qa.codes.dtype == scheme.code_dtype
    again = QuantizedArray.from_parts(qa.codes, qa.scale, qa.zero_point, scheme)  # codes, zero points, grid
    deq = dequantize(again)
    assert np.all(np.isfinite(deq))
    # every code sits on its group's grid: rounding the dequantized weight with the same params gives it back
    np.testing.assert_array_equal(quantize(deq, params=qa.params).codes, qa.codes)


def test_block_size_changes_only_the_order_of_arithmetic():
    x, w = layer(seed=2)
    scheme = QuantScheme(4, False, PerGroup(32, axis=1))
    a = gptq(w, Hessian.of(x), scheme, block_size=7)  # groups straddle blocks: pending updates are applied
    b = gptq(w, Hessian.of(x), scheme, block_size=96)
    # the lazy updates add the same terms in another order: scales agree to float32 rounding, and at most a
    # few codes round the other way
    np.testing.assert_allclose(a.scale, b.scale, rtol=1e-5)
    assert np.mean(a.codes != b.codes) < 0.01


def digest(qa):
    h = hashlib.sha256(qa.codes.tobytes())
    h.update(qa.scale.tobytes())
    if qa.zero_point is not None:
        h.update(qa.zero_point.tobytes())
    return h.hexdigest()


def test_gptq_is_deterministic():
    x, w = layer(seed=3)
    h = Hessian.of(x)
    scheme = QuantScheme(4, False, PerGroup(32, axis=1))
    first = digest(gptq(w, h, scheme, act_order=True))
    assert all(digest(gptq(w, h.copy(), scheme, act_order=True)) == first for _ in range(3))


def test_inputs_are_left_untouched_and_dead_columns_become_zero():
    x, w = layer(seed=4)
    x[:, 5] = 0.0  # an input that is always zero: its column of w never matters
    h = Hessian.of(x)
    w0, h0 = w.copy(), h.copy()
    qa = gptq(w, h, QuantScheme(4, False, PerGroup(32, axis=1)), act_order=True)
    np.testing.assert_array_equal(w, w0)
    np.testing.assert_array_equal(h, h0)
    assert np.all(dequantize(qa)[:, 5] == 0)


def test_hessian_accumulates_the_mean_in_batches():
    x, _ = layer(seed=5)
    acc = Hessian(x.shape[1])
    for part in np.array_split(x, 7):
        acc.add(part.astype(np.float32))
    np.testing.assert_allclose(acc.h, 2 * x.T @ x / len(x), rtol=1e-5, atol=1e-5)
    assert acc.count == len(x)


def test_bad_input_is_refused_by_name():
    x, w = layer()
    h = Hessian.of(x)
    s = QuantScheme(4, False, PerGroup(32, axis=1))
    with pytest.raises(ValueError, match=r"h must be a float \[K, K\] = \[96, 96\]"):
        gptq(w, h[:5, :5], s)
    with pytest.raises(ValueError, match=r"PerGroup\(size, axis=1\)"):
        gptq(w, h, QuantScheme(4, False, PerGroup(16, axis=0)))
    with pytest.raises(ValueError, match="does not divide"):
        gptq(w, h, QuantScheme(4, False, PerGroup(64, axis=1)))
    with pytest.raises(ValueError, match="damp must be"):
        gptq(w, h, s, damp=-1)
    with pytest.raises(ValueError, match="unknown params method 'nope'"):
        gptq(w, h, s, params="nope")
    bad = w.copy()
    bad[2, 3] = np.inf
    with pytest.raises(ValueError, match=r"index \(2, 3\)"):
        gptq(bad, h, s)
    with pytest.raises(ValueError, match="not positive definite"):
        gptq(w, -np.eye(96), s, damp=0)
    with pytest.raises(ValueError, match=r"shape \[..., 96\]"):
        Hessian(96).add(np.ones((3, 5)))
