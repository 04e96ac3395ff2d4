"""qcore.testing: the property suite as a product, a conformance suite any quantizer can run.

The promises of docs/numerics.md and docs/packing.md as checks over a quantize/dequantize pair given as callables,
the Hypothesis strategies that find the hard cases (all-zero groups, ties at k+0.5, subnormals, values near the
float32 range, odd lengths, non-contiguous views), and adapters for qcore and its peers. Needs Hypothesis, a test
dependency that ``import qcore`` never imports::

    >>> from qcore.testing import adapters, run_conformance
    >>> results = run_conformance(adapters.qcore_quantizer(), max_examples=5, only=["error_bound", "exact_zero"])
    >>> {name: r.passed for name, r in results.items()}
    {'error_bound': True, 'exact_zero': True}

See docs/testing.md for wrapping one's own quantizer.
"""

try:
    import hypothesis  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised in a subprocess by tests/qcore/test_testing.py
    raise ImportError("qcore.testing needs Hypothesis, a test dependency: pip install hypothesis") from e

from .promises import PROMISES, Promises, PromiseBroken, Quantized, Quantizer
from .checks import CHECKS, Packer
from .conformance import Result, conformance_table, run_check, run_conformance
from . import strategies

__all__ = ["PROMISES", "Promises", "PromiseBroken", "Quantized", "Quantizer", "CHECKS", "Packer", "Result",
           "conformance_table", "run_check", "run_conformance", "strategies"]
