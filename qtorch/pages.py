"""Large weight buffers on 2 MiB pages, which the 8-bit one-row kernel streams from memory 1.2x faster. A leaf.

A decoding step reads every layer's codes from memory once. On 4 KiB pages a core's loads and the hardware
prefetchers cross a page boundary every 4 KiB, each with its own translation; on 2 MiB pages (Linux's transparent
huge pages) there are 512 times fewer. Measured on the 2-core AVX-512/AMX Xeon, the blocked layout's one-row
kernel over 24 copies of a layer called in turn (each read from memory, as in a model), the same codes on either
kind of page: 5504x2048 8-bit 0.543 -> 0.427 ms a call (20.7 -> 26.4 GB/s), 2048x2048 8-bit 0.199 -> 0.155; a
plain float32 sum 25.3 -> 33.3 GB/s. The 4-bit kernels in groups and the AMX one-row path of ``vnni8`` read no
faster from them (docs/performance.md): they are held by their own instructions. PyTorch's allocator gives 2 MiB pages only when ``THP_MEM_ALLOC_ENABLE=1`` is set before it starts, and
Linux backs ``malloc``'d memory with them only where the system's mode is ``always``; most machines run
``madvise``, which needs the request.

:func:`on_huge_pages` copies a CPU tensor of at least :data:`MIN_BYTES` into a private anonymous mapping whose
2 MiB-aligned part is advised ``MADV_HUGEPAGE`` (the rest, at most one partial page at either end, stays on
small pages: no memory is used beyond the tensor's own bytes) and returns a tensor over it; the mapping lives
as long as that tensor's storage. The layouts' converted buffers and the race's copies of them go through it
(:mod:`qtorch.weight`), so a race times the pages a layer will run on. Where Linux's transparent huge pages are
off (``never``), on other systems, for smaller tensors or with ``QTORCH_HUGE_PAGES=0``, the tensor is returned
as it is. The kernel still falls back to small pages where no free 2 MiB page is at hand: the advice never fails
a load, it can only be slower to fault in. The cost is paid once, where a buffer is made: on the Xeon's VM a copy
into fresh 2 MiB pages faulted in by the copy itself took 21 ms per 16 MiB in most runs (1.6-23), so the mapping's
pages are faulted in first, in one call (``MADV_POPULATE_WRITE``, Linux 5.14): 3.1 ms, as into fresh small pages.

>>> import torch
>>> t = torch.arange(8)
>>> on_huge_pages(t) is t                          # too small to fill a page: left as it is
True
>>> big = torch.ones(4 << 20, dtype=torch.uint8)
>>> moved = on_huge_pages(big)
>>> bool(torch.equal(moved, big)) and moved.dtype == big.dtype
True
>>> moved.data_ptr() % HUGE == 0 if on_huge_pages_applies() else True
True
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys
import weakref

import torch

__all__ = ["HUGE", "MIN_BYTES", "on_huge_pages", "on_huge_pages_applies", "is_paged"]


def _pmd_size() -> int:
    # a transparent huge page's size: 2 MiB on x86-64 and on arm64 with 4 KiB pages, 512 MiB with 64 KiB pages
    try:
        with open("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size") as f:
            size = int(f.read().strip())
        return size if size > 0 and size & (size - 1) == 0 else 2 << 20
    except (OSError, ValueError):
        return 2 << 20


#: the size (and alignment) of a transparent huge page here (2 MiB on x86-64)
HUGE = _pmd_size()
#: tensors smaller than this stay where they are: they cannot fill one huge page of their own
MIN_BYTES = HUGE
_THP = "/sys/kernel/mm/transparent_hugepage/enabled"
#: ``madvise``'s MADV_POPULATE_WRITE (Linux 5.14; Python's ``mmap`` names it from 3.13 on)
_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)
_APPLIES: list = []
# the start and end address of every mapping made here, by start (to tell a tensor already on one)
_RANGES: dict = {}


def on_huge_pages_applies() -> bool:
    """Whether :func:`on_huge_pages` moves tensors here: Linux with transparent huge pages in ``always`` or
    ``madvise`` mode, Python's ``mmap`` able to advise, and ``QTORCH_HUGE_PAGES`` not ``0``."""
    if not _APPLIES:
        ok = (sys.platform.startswith("linux") and hasattr(mmap, "MADV_HUGEPAGE")
              and hasattr(mmap, "MAP_PRIVATE") and hasattr(mmap, "MAP_ANONYMOUS")
              and os.environ.get("QTORCH_HUGE_PAGES", "1").strip() != "0")
        if ok:
            try:
                with open(_THP) as f:
                    mode = f.read()
                ok = "[never]" not in mode  # e.g. "always [madvise] never"
            except OSError:
                ok = False
        _APPLIES.append(ok)
    return _APPLIES[0]


def is_paged(t: torch.Tensor) -> bool:
    """Whether ``t``'s data lies in a mapping :func:`on_huge_pages` made."""
    p = t.data_ptr()
    ranges = _RANGES.copy()  # (a finalizer run by the collector on another thread may remove one meanwhile)
    return any(a <= p < b for a, b in ranges.values())


def on_huge_pages(t: torch.Tensor, *, copy: bool = False) -> torch.Tensor:
    """``t``, or where it is a contiguous CPU tensor of :data:`MIN_BYTES` or more, not requiring a gradient, and
    :func:`on_huge_pages_applies`, a copy of it on 2 MiB pages (same shape, dtype and values; the module
    docstring). A tensor already on such a mapping is returned as it is, unless ``copy``: then the result is
    always a new tensor (on such pages where they apply, else a clone)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"on_huge_pages takes a tensor, got {type(t).__name__}")
    nbytes = t.numel() * t.element_size()
    if (nbytes < MIN_BYTES or t.device.type != "cpu" or not t.is_contiguous() or t.requires_grad
            or t.is_quantized or t.is_sparse or type(t) is not torch.Tensor or t.dtype == torch.bool
            or not on_huge_pages_applies() or (not copy and is_paged(t))):
        return t.clone() if copy else t
    try:
        m = mmap.mmap(-1, nbytes + HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except (OSError, ValueError):  # out of address space or a restricted mmap: the plain tensor serves
        return t.clone() if copy else t
    anchor = ctypes.c_char.from_buffer(m)
    base = ctypes.addressof(anchor)
    del anchor  # (an export held would keep the mapping from being released)
    off = (-base) % HUGE
    whole = nbytes // HUGE * HUGE  # advise only whole pages the tensor fills: its last partial page stays small
    try:
        m.madvise(mmap.MADV_HUGEPAGE, off, whole)
    except OSError:
        pass  # the kernel refused the advice: small pages, same bytes
    try:  # fault the tensor's pages in at once: the copy's own faults took 7x longer (the module docstring)
        m.madvise(_POPULATE_WRITE, off, -(-nbytes // mmap.PAGESIZE) * mmap.PAGESIZE)
    except OSError:
        pass  # before Linux 5.14: the copy faults them in
    out = torch.frombuffer(m, dtype=torch.uint8, count=nbytes, offset=off)
    start = base + off
    _RANGES[start] = (start, start + nbytes)
    weakref.finalize(m, _RANGES.pop, start, None)
    return out.view(t.dtype).view(t.shape).copy_(t)
