"""qtorch.dequant: tiles of the blocked layouts dequantized to float32, bit for bit the canonical values."""

import numpy as np
import pytest
import torch

from qtorch import _omp, dequant
from qtorch.layouts import blocked, codec

from .test_layouts import CASES, _random_canonical


@pytest.mark.parametrize("bits,sym,kind,g", CASES)
@pytest.mark.parametrize("tile", [16, 64, 128])
@pytest.mark.parametrize("team", [True, False])
@pytest.mark.parametrize("t0,t1", [(0, 3), (1, 3), (2, 2)])
def test_tiles_equal_the_canonical_dequantization(bits, sym, kind, g, tile, team, t0, t1, monkeypatch):
    if not team:
        monkeypatch.setattr(_omp, "_GOMP_PARALLEL", False)
    n, k = 3 * tile, 260
    q, s, z = _random_canonical(bits, sym, kind, n, k, g, seed=tile + bits)
    kw = dict(bits=bits, symmetric=sym, kind=kind, group=g, out_features=n, in_features=k)
    w = codec.dequantize_canonical(q, s, z, axis=0 if kind != "group" else 1, **kw)  # [n, k] float32
    wb, sb, zb = blocked.to_blocked(q, s, z, tile=tile, **kw)
    sp, zp = blocked.blocked_params(sb, zb, n)
    out = np.full((k, (t1 - t0) * tile), np.nan, np.float32)
    dequant.dequant_tiles(wb.numpy(), bits, sp.numpy(), zp.numpy(), t0, t1, out)
    assert torch.equal(torch.from_numpy(out), w[t0 * tile:t1 * tile].T.contiguous())  # bit for bit, every value
