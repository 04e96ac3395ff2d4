"""Fixtures shared by the qtorch tests."""

import pytest

from qtorch import layouts


@pytest.fixture
def torch_pack_kernels(monkeypatch):
    """bfloat16 layers on PyTorch's int8pack / int4pack kernels (the choice on CPUs other than AVX2)."""
    monkeypatch.setattr(layouts, "TORCH_PACK_KERNELS", True)


@pytest.fixture
def blocked_kernels(monkeypatch):
    """bfloat16 layers on the blocked layout's kernels (the choice on AVX2 CPUs)."""
    monkeypatch.setattr(layouts, "TORCH_PACK_KERNELS", False)
