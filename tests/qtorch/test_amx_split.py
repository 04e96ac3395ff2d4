"""The split of x into bfloat16 parts in A tiles (``qtorch.amx.split_into``), which the ``amx`` and ``bf16dot``
paths both run before their kernels: on torch's thread team a row block per chunk where x is large, on the calling
thread below ``TEAM_SPLIT_MIN``; the same bits either way, padding rows zero. Plain vector code: runs on any CPU."""

import numpy as np
import pytest
import torch

from qtorch import amx

PARTS = {torch.float32: 3, torch.float16: 2, torch.bfloat16: 1}


def _split(dtype, x, via):
    M, K = x.shape
    buf = np.full(PARTS[dtype] * -(-M // 16) * 16 * K, 0x7F7F, np.int16)  # garbage where the padding goes
    via(buf)
    return torch.from_numpy(buf).view(torch.bfloat16).reshape(PARTS[dtype], -1, 16 * K)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(150, 1536), (128, 4096), (17, 12288)], ids=str)
def test_the_team_split_equals_the_serial_one_and_sums_to_x(dtype, shape, monkeypatch):
    M, K = shape
    x = (torch.randn(M, K) * torch.logspace(-8, 8, K)).to(dtype)
    serial = _split(dtype, x, lambda b: amx._splitter(dtype)(x.data_ptr(), b.ctypes.data, M, K))

    def not_serial(_dtype):
        raise AssertionError("a large x was split on the calling thread")

    monkeypatch.setattr(amx, "_splitter", not_serial)
    team = _split(dtype, x, lambda b: amx.split_into(dtype, x.data_ptr(), b.ctypes.data, M, K))
    assert torch.equal(team.view(torch.int16), serial.view(torch.int16))
    p = amx.tile_rows(team, K)
    assert torch.equal(p[:, :M].double().sum(0), x.double()) and not p[:, M:].any()


def test_a_small_x_is_split_on_the_calling_thread(monkeypatch):
    calls = []
    real = amx._splitter
    monkeypatch.setattr(amx, "_splitter", lambda dt: calls.append(dt) or real(dt))
    x = torch.randn(40, 384)  # 3 parts x 40 x 384 values: below TEAM_SPLIT_MIN
    assert 3 * x.numel() < amx.TEAM_SPLIT_MIN
    split = _split(torch.float32, x, lambda b: amx.split_into(torch.float32, x.data_ptr(), b.ctypes.data, 40, 384))
    assert calls == [torch.float32]
    assert torch.equal(amx.tile_rows(split, 384)[:, :40].double().sum(0), x.double())


def test_one_thread_splits_every_block(monkeypatch):
    # torch on one thread (DataLoader workers, one process per core): the team kernel claims every chunk itself
    x = torch.randn(100, 2048)
    want = _split(torch.float32, x, lambda b: amx._splitter(torch.float32)(x.data_ptr(), b.ctypes.data, 100, 2048))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        got = _split(torch.float32, x, lambda b: amx.split_into(torch.float32, x.data_ptr(), b.ctypes.data, 100, 2048))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))
