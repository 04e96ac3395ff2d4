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


def test_an_unknown_attribute_is_still_an_attribute_error():
    with pytest.raises(AttributeError, match="module 'qcore' has no attribute 'gtpq'"):
        qcore.gtpq
    assert not hasattr(qcore, "no_such_thing")
