"""torch <-> NumPy conversion, bfloat16 included (through ``ml_dtypes``), without copies where possible.

NumPy has no bfloat16; ``ml_dtypes.bfloat16`` has the same bit layout, so a bf16 tensor travels as its raw
16-bit pattern and is viewed on the other side. Values are preserved bit for bit.

>>> import torch
>>> a = to_numpy(torch.tensor([1.5, -2.0], dtype=torch.bfloat16)); a.dtype.name, a.tolist()
('bfloat16', [1.5, -2.0])
>>> from_numpy(a).dtype
torch.bfloat16
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import torch

__all__ = ["to_numpy", "from_numpy", "numpy_dtype", "torch_dtype"]

_BF16 = np.dtype(ml_dtypes.bfloat16)

_TORCH_TO_NUMPY = {
    torch.float32: np.dtype(np.float32), torch.float16: np.dtype(np.float16), torch.float64: np.dtype(np.float64),
    torch.bfloat16: _BF16, torch.int8: np.dtype(np.int8), torch.uint8: np.dtype(np.uint8),
    torch.int16: np.dtype(np.int16), torch.int32: np.dtype(np.int32), torch.int64: np.dtype(np.int64),
    torch.bool: np.dtype(np.bool_),
}
_NUMPY_TO_TORCH = {v: k for k, v in _TORCH_TO_NUMPY.items()}


def numpy_dtype(dtype: torch.dtype) -> np.dtype:
    """NumPy dtype for a torch dtype (bfloat16 -> ``ml_dtypes.bfloat16``); ``TypeError`` if there is none."""
    try:
        return _TORCH_TO_NUMPY[dtype]
    except KeyError:
        raise TypeError(f"torch dtype {dtype} has no NumPy equivalent here; supported: "
                        f"{sorted(str(d) for d in _TORCH_TO_NUMPY)}") from None


def torch_dtype(dtype) -> torch.dtype:
    """torch dtype for a NumPy dtype (``ml_dtypes.bfloat16`` -> ``torch.bfloat16``)."""
    d = np.dtype(dtype)
    try:
        return _NUMPY_TO_TORCH[d]
    except KeyError:
        raise TypeError(f"NumPy dtype {d} has no torch equivalent here") from None


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A NumPy array with the values of ``t`` (detached, moved to CPU; shares memory when ``t`` is on CPU)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(t).__name__}")
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(_BF16)
    numpy_dtype(t.dtype)  # raises TypeError for unsupported dtypes
    return t.numpy()


def from_numpy(a: np.ndarray, device=None) -> torch.Tensor:
    """A tensor with the values of ``a`` (shares memory on CPU when ``a`` is writeable and aligned)."""
    a = np.asarray(a)
    if a.dtype == _BF16:
        t = torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16)
    else:
        torch_dtype(a.dtype)
        if not a.flags.writeable:
            a = a.copy()
        t = torch.from_numpy(np.ascontiguousarray(a))
    t = t.reshape(a.shape)  # np.ascontiguousarray makes 0-d arrays 1-d; keep per-tensor parameters 0-d
    return t if device is None else t.to(device)
