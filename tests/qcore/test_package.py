"""The ``qcore`` package itself: what ``import qcore`` loads, and the submodules reached through it."""

import subprocess
import sys

import pytest

import qcore


def test_submodules_that_import_qcore_leaves_out_are_reached_as_attributes_in_a_fresh_process():
    # the README writes qcore.gptq.gptq(...) and qcore.convert.quantize_checkpoint(...) after a plain import qcore
    code = ("import sys, qcore; lazy = ['qcore.gptq', 'qcore.convert', 'qcore.testing']; "
            "before = [m in sys.modules for m in lazy]; "
            "assert callable(qcore.gptq.gptq) and callable(qcore.convert.quantize_checkpoint); "
            "print(before, 'hypothesis' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["[False,", "False,", "False]", "False"]  # none loaded by import qcore, nor hypothesis


def test_an_unknown_attribute_is_still_an_attribute_error_and_dir_lists_the_lazy_ones():
    with pytest.raises(AttributeError, match="module 'qcore' has no attribute 'gtpq'"):
        qcore.gtpq
    assert not hasattr(qcore, "no_such_thing")
    assert {"gptq", "convert", "testing", "quantize"} <= set(dir(qcore))


def test_a_lazy_submodule_that_cannot_import_is_an_attribute_error_naming_why(monkeypatch):
    """hasattr() catches AttributeError only: without hypothesis, hasattr(qcore, "testing") raised ImportError."""
    import builtins

    real = builtins.__import__

    def no_hypothesis(name, *args, **kwargs):
        if name == "hypothesis" or name.startswith("hypothesis."):
            raise ModuleNotFoundError("No module named 'hypothesis'")
        return real(name, *args, **kwargs)

    for mod in [m for m in sys.modules if m == "qcore.testing" or m.startswith("qcore.testing.")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.delattr(qcore, "testing", raising=False)  # an imported submodule is an attribute of its package
    monkeypatch.setattr(builtins, "__import__", no_hypothesis)
    assert not hasattr(qcore, "testing")
    with pytest.raises(AttributeError, match="has no attribute 'testing': .*hypothesis"):
        qcore.testing
