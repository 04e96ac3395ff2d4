"""The int4pack layout's paths: PyTorch's kernel, and for 2+ rows the blocked layout's tile kernels run on the same
packed bytes where this CPU's int4pack layout is those tiles. Each path gives F.linear's numbers, the tile paths the
blocked layout's own bits, with an input gradient; a layout that is not tiles offers none."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import qcore
from qcore import PerGroup, QuantScheme
from qtorch import autotune
from qtorch.layouts import blocked, int4pack
from qtorch.weight import QuantizedWeight

EPS = 2.0**-6  # bfloat16's rounding of a dot product


def _weights(n, k, scheme, seed=0):
    """The same codes held as int4pack and as blocked (None where int4pack cannot take them on this CPU)."""
    rng = np.random.default_rng(seed)
    qa = qcore.quantize(rng.standard_normal((n, k)).astype(np.float32), scheme)
    held = []
    for name in ("int4pack", "blocked"):
        w = QuantizedWeight.from_quantized_array(qa, compute_dtype=torch.bfloat16)
        if not w.hold_layout(name, torch.bfloat16):
            return None
        held.append(w)
    return held


def _assert_close(y, x, w):
    ref = F.linear(x, w.dequantize(torch.bfloat16))
    bound = F.linear(x.float().abs(), w.dequantize(torch.float32).abs())
    assert y.dtype == x.dtype and y.shape == ref.shape
    err = (y.float() - ref.float()).abs()
    assert torch.all(err <= EPS * bound + 1e-6), float((err - EPS * bound).max())


def test_tile_width_matches_the_packed_bytes():
    n, k = 192, 64
    nt = int4pack.tile_width(n)
    assert nt in (0,) + blocked.TILE_WIDTHS
    if not nt:
        pytest.skip("this CPU's int4pack layout is not the blocked tiles")
    codes = torch.randint(0, 16, (n, k), dtype=torch.int32)
    packed = torch._convert_weight_to_int4pack_for_cpu(codes, 1).view(torch.uint8).reshape(n // nt, k, nt // 2)
    w = nt // 2
    for t in (0, n // nt - 1):  # channel j in the low nibble of byte j, channel j + NT/2 in its high nibble
        tile = codes[t * nt:(t + 1) * nt].T
        assert torch.equal((packed[t] & 15).to(torch.int32), tile[:, :w])
        assert torch.equal((packed[t] >> 4).to(torch.int32), tile[:, w:])


def test_a_layout_that_is_not_tiles_offers_no_tile_path(monkeypatch):
    held = _weights(128, 64, QuantScheme(4, False, PerGroup(32)))
    if held is None:
        pytest.skip("int4pack does not serve this shape here")
    spec = held[0].spec
    base, stride, offset, hi = int4pack.int4pack_map(128, 2)
    monkeypatch.setattr(int4pack, "_TILE_WIDTHS", {})
    monkeypatch.setattr(int4pack, "int4pack_map", lambda n, k: (base, stride, offset.flip(0), hi))  # rows moved
    assert int4pack.tile_width(128) == 0
    assert int4pack.INT4PACK.paths("cpu", torch.bfloat16, 16, 4, spec=spec) == ("int4pack",)


def test_paths_offered():
    held = _weights(128, 64, QuantScheme(4, False, PerGroup(32)))
    if held is None:
        pytest.skip("int4pack does not serve this shape here")
    spec, lay = held[0].spec, int4pack.INT4PACK
    assert lay.tuned
    assert lay.paths("cpu", torch.bfloat16, 1, 4, spec=spec) == ("int4pack",)  # one row: PyTorch's kernel
    assert lay.paths("cpu", torch.float32, 16, 4, spec=spec) == ("dense",)
    offered = ("int4pack",) + tuple(p for p in int4pack.TILE_PATHS if p in blocked._tile_kernels_offered(
        "cpu", torch.bfloat16, 16, 4, None) or p == blocked.TILES_ACT)
    # no spec: every path the CPU has (the dispatch file's fingerprint lists them), as for the blocked layout
    assert lay.paths("cpu", torch.bfloat16, 16, 4) == offered
    assert lay.paths("cpu", torch.bfloat16, 16, 4, spec=spec) == (offered if int4pack.tile_width(128) else
                                                                ("int4pack",))
    fp = autotune.fingerprint()["paths"]
    assert all(f"int4pack:{p}" in fp for p in offered)


@pytest.mark.parametrize("n", [192, 128, 1536])  # blocked's own tiles: 64, 128, 128 channels wide
@pytest.mark.parametrize("sym,g,k", [(False, 64, 576), (False, 32, 100), (True, 128, 256)])
@pytest.mark.parametrize("rows", [2, 16, 41])
def test_every_path_gives_f_linear_and_the_tile_paths_blockeds_bits(n, sym, g, k, rows):
    held = _weights(n, k, QuantScheme(4, sym, PerGroup(g)))
    if held is None:
        pytest.skip("int4pack does not serve this shape here")
    w4, wb = held
    torch.manual_seed(rows)
    x = torch.randn(rows, k, dtype=torch.bfloat16)
    paths = w4.layout.paths("cpu", torch.bfloat16, rows, 4, spec=w4.spec)
    with torch.no_grad():
        for p in paths:
            y = w4.layout.linear(w4, x, p)
            _assert_close(y, x, w4)
            if p != "int4pack":  # the same kernel on the same codes
                assert torch.equal(y, wb.layout.linear(wb, x, p)), p


@pytest.mark.parametrize("sym", [False, True])
def test_scale_and_zero_point_are_held_as_the_tile_kernels_read_them(sym):
    # group-major: the [G, N] transposes the tile paths pass are views (no copy per call); the canonical form that
    # state_dict, files and other layouts get stays contiguous and the same values
    n, k, g = 192, 576, 64
    qa = qcore.quantize(np.random.default_rng(1).standard_normal((n, k)).astype(np.float32),
                        QuantScheme(4, sym, PerGroup(g)))
    w = QuantizedWeight.from_quantized_array(qa, compute_dtype=torch.bfloat16)
    if not w.hold_layout("int4pack", torch.bfloat16):
        pytest.skip("int4pack does not serve this shape here")
    held = [t for t in (w.buffers["scale"], w.buffers["zero_point"]) if t is not None and t.numel()]
    assert len(held) == (1 if sym else 2)
    for t in held:
        assert t.shape == (n, k // g) and t.t().is_contiguous()
    _, s, z = w.canonical()
    assert s.is_contiguous() and torch.equal(s, torch.from_numpy(np.ascontiguousarray(qa.scale)).reshape(n, -1))
    if not sym:
        assert z.is_contiguous() and torch.equal(z, torch.from_numpy(np.ascontiguousarray(qa.zero_point))
                                                 .reshape(n, -1))
    assert all(t.is_contiguous() for t in w.codes() if t is not None)


def test_a_tile_path_has_an_input_gradient():
    held = _weights(192, 256, QuantScheme(4, False, PerGroup(64)))
    if held is None or len(held[0].layout.paths("cpu", torch.bfloat16, 16, 4, spec=held[0].spec)) < 2:
        pytest.skip("no tile path here")
    w4 = held[0]
    x = torch.randn(16, 256, dtype=torch.bfloat16, requires_grad=True)
    for p in w4.layout.paths("cpu", torch.bfloat16, 16, 4, spec=w4.spec)[1:]:
        x.grad = None
        w4.layout.linear(w4, x, p).float().sum().backward()
        expect = w4.dequantize(torch.float32).sum(0).expand(16, -1)
        torch.testing.assert_close(x.grad.float(), expect, rtol=2.0**-7, atol=1e-2)


def test_a_kept_tile_path_traces_as_one_opaque_op():
    held = _weights(192, 256, QuantScheme(4, False, PerGroup(64)))
    if held is None or len(held[0].layout.paths("cpu", torch.bfloat16, 16, 4, spec=held[0].spec)) < 2:
        pytest.skip("no tile path here")
    w4 = held[0]
    x = torch.randn(16, 256, dtype=torch.bfloat16)
    for p in w4.layout.paths("cpu", torch.bfloat16, 16, 4, spec=w4.spec)[1:]:
        w4._routes = {("cpu", torch.bfloat16, autotune.bucket_index(16)): p}  # as the dispatcher keeps it
        torch._dynamo.reset()
        with torch.no_grad():
            y = torch.compile(w4.linear, backend="aot_eager", fullgraph=True)(x)
            assert torch.equal(y, w4.linear(x)), p


def test_a_reloaded_layer_traces_its_kept_tile_route_whole(monkeypatch):
    # a pickled weight keeps its routes; in a new process the tile width is not known yet when the first call is
    # traced: Dynamo runs its probe instead of tracing it (fullgraph)
    held = _weights(192, 256, QuantScheme(4, False, PerGroup(64)))
    if held is None or len(held[0].layout.paths("cpu", torch.bfloat16, 16, 4, spec=held[0].spec)) < 2:
        pytest.skip("no tile path here")
    w4 = held[0]
    p = w4.layout.paths("cpu", torch.bfloat16, 16, 4, spec=w4.spec)[1]
    w4._routes = {("cpu", torch.bfloat16, autotune.bucket_index(16)): p}
    x = torch.randn(16, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        ref = w4.linear(x)
        monkeypatch.setattr(int4pack, "_TILE_WIDTHS", {})
        monkeypatch.setattr(int4pack, "_INT4_MAPS", {})
        torch._dynamo.reset()
        assert torch.equal(torch.compile(w4.linear, backend="aot_eager", fullgraph=True)(x), ref)


def test_a_kept_tile_route_where_the_bytes_are_not_tiles_takes_pytorchs_kernel(monkeypatch):
    held = _weights(192, 256, QuantScheme(4, False, PerGroup(64)))
    if held is None:
        pytest.skip("int4pack does not serve this shape here")
    w4 = held[0]
    x = torch.randn(16, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        ref = w4.layout.linear(w4, x, "int4pack")
        monkeypatch.setattr(int4pack, "_TILE_WIDTHS", {192: 0})  # a route kept on another CPU
        assert torch.equal(w4.layout.linear(w4, x, blocked.TILES_ACT), ref)


def test_qtorch_compiles_templates_trace_pytorchs_op_whatever_route_is_kept(monkeypatch):
    held = _weights(192, 256, QuantScheme(4, False, PerGroup(64)))
    if held is None or len(held[0].layout.paths("cpu", torch.bfloat16, 16, 4, spec=held[0].spec)) < 2:
        pytest.skip("no tile path here")
    w4 = held[0]
    w4._routes = {("cpu", torch.bfloat16, autotune.bucket_index(16)):
                  w4.layout.paths("cpu", torch.bfloat16, 16, 4, spec=w4.spec)[1]}
    x = torch.randn(16, 256, dtype=torch.bfloat16)
    for templates in (True, False):
        monkeypatch.setattr(int4pack, "_woq_templates", lambda t=templates: t)
        seen = []

        def backend(gm, inputs):
            seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
            return gm

        torch._dynamo.reset()
        with torch.no_grad():
            torch.compile(w4.linear, backend=backend, fullgraph=True)(x)
        took = [t for t in seen if "int4pack_mm" in t or "qtorch." in t]
        assert took and all(("int4pack_mm" in t) == templates for t in took), (templates, took)
