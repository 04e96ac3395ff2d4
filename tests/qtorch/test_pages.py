import gc
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import qtorch
from qtorch import pages

applies = pytest.mark.skipif(not pages.on_huge_pages_applies() or pages.HUGE > 2 << 20,
                             reason="no transparent huge pages here (not Linux, mode never, or QTORCH_HUGE_PAGES=0), "
                                    "or pages larger than the tensors these tests move")


def _vma_field(ptr: int, field: str):
    """The value of ``field`` in /proc/self/smaps for the mapping holding address ``ptr`` (None if absent)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if head and "-" in head[0] and not head[0].endswith(":"):
                lo, hi = (int(v, 16) for v in head[0].split("-"))
                inside = lo <= ptr < hi
            elif inside and head and head[0] == field + ":":
                return int(head[1])
    return None


@applies
@pytest.mark.parametrize("dtype,shape", [(torch.uint8, (3 << 20,)), (torch.int8, (43, 2048, 128)),
                                         (torch.bfloat16, (1024, 1536)), (torch.float32, (700, 1024))])
def test_copy_keeps_values_shape_and_dtype_on_an_advised_aligned_mapping(dtype, shape):
    t = (torch.randn(shape) * 50).to(dtype)
    moved = pages.on_huge_pages(t)
    assert moved is not t and moved.data_ptr() != t.data_ptr()
    assert moved.dtype == dtype and moved.shape == t.shape and moved.is_contiguous()
    assert torch.equal(moved, t)
    assert moved.data_ptr() % pages.HUGE == 0
    assert pages.is_paged(moved) and not pages.is_paged(t)
    if os.path.exists("/proc/self/smaps") and _vma_field(moved.data_ptr(), "THPeligible") is not None:
        assert _vma_field(moved.data_ptr(), "THPeligible") == 1  # advised: huge pages where the kernel has them


@applies
def test_a_tensor_already_paged_is_not_copied_again_unless_asked():
    moved = pages.on_huge_pages(torch.ones(4 << 20, dtype=torch.uint8))
    assert pages.on_huge_pages(moved) is moved
    again = pages.on_huge_pages(moved, copy=True)
    assert again.data_ptr() != moved.data_ptr() and pages.is_paged(again) and torch.equal(again, moved)
    again[0] = 7  # a copy: the original is untouched
    assert moved[0].item() == 1


@pytest.mark.parametrize("make", [
    lambda: torch.ones(1000),                                   # smaller than a page
    lambda: torch.ones(2048, 2048).t(),                         # not contiguous
    lambda: torch.ones(1 << 20, requires_grad=True),            # a leaf to differentiate
    lambda: torch.ones(1 << 20, device="meta"),                 # not in memory
])
def test_what_stays_where_it_is(make):
    t = make()
    assert pages.on_huge_pages(t) is t
    c = pages.on_huge_pages(t, copy=True)
    assert c is not t and c.shape == t.shape


def test_non_tensor_is_a_type_error():
    with pytest.raises(TypeError, match="takes a tensor"):
        pages.on_huge_pages([1, 2, 3])


@applies
def test_the_mapping_is_released_with_the_tensor():
    moved = pages.on_huge_pages(torch.ones(3 << 20, dtype=torch.uint8))
    start = moved.data_ptr()
    assert start in pages._RANGES
    view = moved[10:]  # a view holds the storage too
    del moved
    gc.collect()
    assert start in pages._RANGES
    del view
    gc.collect()
    assert start not in pages._RANGES


@applies
def test_copies_pickle_deepcopy_and_save_like_any_tensor(tmp_path):
    import copy
    import pickle

    moved = pages.on_huge_pages(torch.arange(1 << 20, dtype=torch.int32))
    assert torch.equal(copy.deepcopy(moved), moved)
    assert torch.equal(pickle.loads(pickle.dumps(moved)), moved)
    torch.save(moved, tmp_path / "t.pt")
    assert torch.equal(torch.load(tmp_path / "t.pt"), moved)
    moved.share_memory_()  # moved into shared memory: no longer ours, still the same values
    assert moved.is_shared() and moved[5].item() == 5


def test_turned_off_by_the_environment():
    code = ("import torch; from qtorch import pages; t = torch.ones(4 << 20, dtype=torch.uint8); "
            "print(pages.on_huge_pages_applies(), pages.on_huge_pages(t) is t)")
    env = {**os.environ, "QTORCH_HUGE_PAGES": "0"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "True"]


@applies
@pytest.mark.parametrize("cls,dtype", [(qtorch.W8A16Linear, torch.float32), (qtorch.W8A16Linear, torch.bfloat16),
                                       (qtorch.W4A16Linear, torch.bfloat16)])
def test_a_large_layer_holds_its_codes_on_huge_pages_and_computes_the_same(cls, dtype):
    torch.manual_seed(0)
    lin = torch.nn.Linear(2048, 2048, bias=True).to(dtype)
    q = cls.from_linear(lin)
    codes = q._w.buffers["qweight"]
    assert codes.numel() * codes.element_size() >= pages.MIN_BYTES
    assert pages.is_paged(codes), q.weight_layout
    x = torch.randn(3, 2048).to(dtype)
    ref = F.linear(x.float(), q.dequantized_weight(torch.float32), lin.bias.float())
    for rows in (x[:1], x):
        got = q(rows)
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(got.float(), ref[:rows.shape[0]], rtol=tol, atol=tol * ref.abs().max().item())
    # a state dict round trip lands on pages again
    q2 = cls.from_linear(torch.nn.Linear(2048, 2048, bias=True).to(dtype))
    q2.load_state_dict(q.state_dict())
    assert pages.is_paged(q2._w.buffers["qweight"])
    assert torch.equal(q2(x), q(x))


def test_small_layers_are_left_alone():
    q = qtorch.W8A16Linear.from_linear(torch.nn.Linear(256, 256))
    assert not pages.is_paged(q._w.buffers["qweight"])


@applies
def test_deep_copies_and_unpickled_layers_hold_their_codes_on_huge_pages_too(tmp_path):
    import copy

    q = qtorch.W8A16Linear.from_linear(torch.nn.Linear(2048, 2048).to(torch.bfloat16))
    x = torch.randn(1, 2048, dtype=torch.bfloat16)
    for other in (copy.deepcopy(q), _saved_and_loaded(q, tmp_path)):
        codes = other._w.buffers["qweight"]
        assert pages.is_paged(codes) and codes.data_ptr() != q._w.buffers["qweight"].data_ptr()
        assert other._buffers["qweight"] is codes  # the module reads the same tensor its weight holds
        assert torch.equal(other(x), q(x))
    shallow = copy.copy(q._w)  # a shallow copy shares the tensors: nothing is copied
    assert shallow.buffers["qweight"] is q._w.buffers["qweight"]


def _saved_and_loaded(module, tmp_path):
    torch.save(module, tmp_path / "m.pt")
    return torch.load(tmp_path / "m.pt", weights_only=False)
