"""qcore.testing: every check catches the bug it is for, the adapters read each library right, and the command
prints the table. qcore itself keeping every promise is tests/qcore/test_quantize_properties.py."""

import subprocess
import sys

import numpy as np
import pytest
from hypothesis import strategies as st

from qcore import PerTensor, QuantScheme
from qcore.testing import PROMISES, Packer, Promises, Quantized, Quantizer, conformance_table, run_conformance
from qcore.testing import __main__ as cli
from qcore.testing import adapters
from qcore.testing.checks import ref_pack
from qcore.testing import Result, run_check  # as docs/testing.md imports them

FEW = 60  # examples per check: each broken quantizer below fails on many inputs (exact_zero on few: 25 missed it
# when another module had been imported first)


def affine(x, scheme, rnd=np.rint, zero_round=np.rint, check=True, zero_inside=False):
    """A plain per-tensor min-max quantizer, the base the broken ones below change one thing of."""
    xf = np.asarray(x).astype(np.float64)
    if check and not np.all(np.isfinite(xf)):
        raise ValueError("x has NaN or Inf")
    lo, hi = min(xf.min(initial=0.0), 0.0), max(xf.max(initial=0.0), 0.0)
    if scheme.symmetric:
        scale = np.float32(max(-lo, hi) / scheme.qmax)
        zero = 0.0
    else:
        scale = np.float32((hi - lo) / scheme.qmax)
        zero = zero_round(-lo / scale) if scale else 0.0
    scale = scale if scale > 0 else np.float32(np.finfo(np.float32).tiny)
    with np.errstate(over="ignore", invalid="ignore"):
        codes = rnd(xf / np.float64(scale) + zero) if zero_inside else rnd(xf / np.float64(scale)) + zero
        codes = np.clip(codes, scheme.qmin, scheme.qmax)
    return Quantized(codes, np.full(x.shape, scale), zero, scheme.qmin, scheme.qmax)


def dequant(q):
    return ((q.codes - q.zero) * q.scale).astype(np.float32)


def per_tensor(rank):
    return st.builds(lambda b, s: QuantScheme(b, s and b > 1, PerTensor()), st.integers(2, 8), st.booleans())


def quantizer(quantize=affine, dequantize=dequant, **kw):
    kw.setdefault("dtypes", (np.float32,))
    kw.setdefault("magnitudes", (1e-3, 1.0, 1e4))
    return Quantizer("test", quantize, dequantize, Promises(), schemes=per_tensor, **kw)


def _dither(x, scheme):
    noise = np.random.default_rng().uniform(-0.49, 0.49, np.shape(x))
    return affine(x, scheme, rnd=lambda v: np.rint(v + noise))


def _no_clip_range(x, scheme):
    q = affine(x, scheme)
    return Quantized(q.codes, q.scale, q.zero, q.qmin, q.qmax - 1)  # declares a narrower range than it uses


def _first_axis_grouping(x, scheme):  # groups the memory order, not the logical one: a view changes the result
    flat = np.ravel(x, order="K")
    q = affine(flat, scheme)
    half = max(1, flat.size // 2)
    codes = q.codes.copy()
    codes[:half] = affine(flat[:half], scheme).codes if flat.size else codes[:half]
    return Quantized(codes.reshape(x.shape, order="K" if x.flags.f_contiguous else "C"), q.scale.reshape(x.shape),
                     q.zero, q.qmin, q.qmax)


BROKEN = {
    "error_bound": quantizer(lambda x, s: affine(x, s, rnd=np.floor)),
    "requantize": quantizer(dequantize=lambda q: dequant(q) * np.float32(1.3)),
    # a float zero point rounded together with x (HQQ's way): 0.0 lands on the nearest code, not on the zero point
    "exact_zero": quantizer(lambda x, s: affine(x, s, zero_round=lambda v: v, zero_inside=True)),
    "zero_group": quantizer(lambda x, s: Quantized(*[getattr(affine(x, s), f) for f in ("codes",)],
                                                   np.full(x.shape, np.abs(x).max(initial=0.0) / s.qmax) /
                                                   (np.abs(x).max(initial=0.0) > 0), 0, s.qmin, s.qmax)),
    "codes_in_range": quantizer(_no_clip_range),
    "finite_output": quantizer(dequantize=lambda q: dequant(q).astype(np.float16), magnitudes=(1e30,)),
    "views": quantizer(_first_axis_grouping),
    "rejects_nonfinite": quantizer(lambda x, s: affine(x, s, check=False)),
    "deterministic": quantizer(_dither),
}


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the broken quantizers overflow and divide by zero
@pytest.mark.parametrize("promise", list(BROKEN))
def test_each_check_catches_the_bug_it_is_for(promise):
    result = run_check(promise, BROKEN[promise], max_examples=FEW, shrink=False)
    assert result.passed is False and result.counterexample, result
    assert run_check(promise, quantizer(), max_examples=FEW).passed  # and the correct quantizer passes it


def _msb_first_pack(codes, bits):
    codes = np.asarray(codes, np.uint8)
    per_code = np.unpackbits(codes[..., None], axis=-1, bitorder="little")[..., :bits][..., ::-1]
    return np.packbits(per_code.reshape(codes.shape[:-1] + (codes.shape[-1] * bits,)), axis=-1)


def _msb_first_unpack(packed, bits, n):
    per_code = np.unpackbits(packed, axis=-1, count=n * bits).reshape(packed.shape[:-1] + (n, bits))[..., ::-1]
    return (per_code.astype(np.uint16) << np.arange(bits, dtype=np.uint16)).sum(axis=-1).astype(np.uint8)


def test_packing_checks_catch_a_wrong_bit_order_and_a_lossy_packer():
    msb_first = Packer(_msb_first_pack, _msb_first_unpack)
    assert run_check("packing", msb_first, max_examples=FEW).passed
    assert not run_check("bit_order", msb_first, max_examples=FEW).passed
    lossy = Packer(lambda c, b: ref_pack(np.asarray(c) & 1, b), adapters.qcore_packer().unpack)
    assert not run_check("packing", lossy, max_examples=FEW).passed


def test_the_smallest_counterexample_is_reported():
    """Hypothesis shrinks: flooring fails on a single element array; the report shows it exactly."""
    result = run_check("error_bound", BROKEN["error_bound"], max_examples=FEW)
    assert "float32 (1,)" in result.counterexample, result.counterexample
    assert "steps (allowed 0.5)" in result.message


def test_unpromised_promises_are_not_run_and_say_so():
    silent = Quantizer("silent", lambda x, s: 1 / 0, dequant, Promises().without(*PROMISES))  # would crash if run
    results = run_conformance(silent)
    assert list(results) == list(PROMISES) and not any(r.promised for r in results.values())
    table = conformance_table({"silent": results, "ok": {"error_bound": Result(True, True)},
                               "bad": {"error_bound": Result(True, False, "too far", "float32 (1,) [0.5]")}})
    assert "| error_bound | not promised | passed | FAILED [1] |" in table
    assert "[1] bad, error_bound: too far\n    input: float32 (1,) [0.5]" in table


def test_a_crash_of_the_library_is_a_failure_with_its_type():
    boom = quantizer(lambda x, s: (_ for _ in ()).throw(RuntimeError("kernel died")))
    result = run_check("deterministic", boom, max_examples=FEW)
    assert result.passed is False and result.message.startswith("RuntimeError: kernel died")


def test_unknown_promise_names_are_a_value_error():
    with pytest.raises(ValueError, match="unknown promise.*'bounded'"):
        Promises().without("bounded")
    with pytest.raises(ValueError, match="unknown promise"):
        run_conformance(quantizer(), only=["bounded"])


# --- adapters ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0"])
def test_gguf_adapter_reads_the_blocks_as_gguf_dequantizes_them(kind):
    pytest.importorskip("gguf")
    qz = {q.name: q for q in adapters.gguf_quantizers()}[f"gguf-{kind.lower()}"]
    x = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    q = qz.quantize(x, None)
    assert q.codes.shape == x.shape and np.all((q.codes >= q.qmin) & (q.codes <= q.qmax))
    np.testing.assert_array_equal((q.codes.astype(np.float32) - np.float32(q.zero)) * q.scale, qz.dequantize(q))


def test_gguf_keeps_exact_zeros_and_its_code_range():
    pytest.importorskip("gguf")
    for qz in adapters.gguf_quantizers():
        results = run_conformance(qz, max_examples=10, only=["exact_zero", "codes_in_range", "deterministic"])
        assert all(r.passed for r in results.values()), (qz.name, results)


def test_adapters_registry():
    assert adapters.available(["qcore"]) == ["qcore"]
    with pytest.raises(ValueError, match="unknown library.*'tflite'"):
        adapters.available(["tflite"])


# --- the command ------------------------------------------------------------------------------------------------

def test_command_prints_the_table(capsys, monkeypatch):
    monkeypatch.setattr(adapters, "installed", lambda name, libraries=None: name == "qcore")
    argv = ["--against", "qcore,gguf", "--max-examples", "5", "--only", "error_bound,bit_order", "--ordinary"]
    assert cli.main(argv) == 0
    out, err = capsys.readouterr()
    assert "| promise | qcore |" in out and "| error_bound | passed |" in out and "| bit_order | passed |" in out
    assert "gguf: not installed, skipped" in err  # (the torch-based peers: tests/qtorch/test_conformance.py)


@pytest.mark.parametrize("argv, message", [(["--against", "tflite"], "unknown library"),
                                           (["--max-examples", "0"], "max-examples must be >= 1"),
                                           (["--only", "bounded"], "unknown promise")])
def test_command_rejects_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv + (["--against", "qcore"] if "--against" not in argv else []))
    assert e.value.code == 2 and message in capsys.readouterr().err


# --- imports ----------------------------------------------------------------------------------------------------

def _fresh(code):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


def test_import_qcore_does_not_import_hypothesis_and_qcore_testing_does_not_import_torch():
    out = _fresh("import sys, qcore; a = 'hypothesis' in sys.modules\n"
                 "import qcore.testing, qcore.testing.adapters\n"
                 "print(a, any(m == 'torch' or m.startswith('torch.') for m in sys.modules))")
    assert out.returncode == 0 and out.stdout.split() == ["False", "False"], out.stderr


def test_without_hypothesis_the_import_error_says_what_to_install():
    out = _fresh("import sys; sys.modules['hypothesis'] = None\nimport qcore.testing")
    assert out.returncode != 0 and "pip install hypothesis" in out.stderr, out.stderr
