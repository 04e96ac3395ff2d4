"""Sibling layers: blocked layers reading the same one-row input, as one op call and one start of the team."""

import numpy as np
import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import qtorch
from qcore import PerChannel, PerGroup, QuantScheme
from qtorch import gemv, native_ops, siblings
from qtorch.layouts import blocked

W8 = QuantScheme(8, True, PerChannel(0))
W4 = QuantScheme(4, False, PerGroup(32))


def _layers(scheme, dtype, sizes, k=128, seed=0):
    torch.manual_seed(seed)
    out = []
    for n in sizes:
        q = qtorch.QuantLinear.from_linear(torch.nn.Linear(k, n, bias=False, dtype=dtype), scheme)
        assert q.quantized_weight.hold_layout("blocked", dtype)  # the layout under test, whatever the race chose
        out.append(q)
    return out


def _operands(q):
    b, spec = q.quantized_weight.buffers, q.quantized_weight.spec
    return b["qweight"], b["scale"], b["zero_point"], spec.group, blocked.container_bits(spec.bits), spec.out_features


def _traced(fn, *args):
    """``fn``'s graph of ops (fake tensors' shapes in every node's meta, as inductor's graphs have them)."""
    return make_fx(fn, tracing_mode="fake")(*args)


@pytest.mark.parametrize("scheme", [W8, W4], ids=["w8", "w4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_pass_groups_layers_reading_one_row_and_changes_no_bit(scheme, dtype):
    layers = _layers(scheme, dtype, (64, 128, 64, 192, 64))
    ints = [_operands(q)[3:] for q in layers]
    tensors = [t for q in layers for t in _operands(q)[:3]]
    op = torch.ops.qtorch.gemm_blocked_infer.default

    def f(x, y, xs, *ts):
        ops = [(*ts[3 * i:3 * i + 3], *ints[i]) for i in range(len(ints))]
        outs = [op(x.reshape(-1, x.shape[-1]), *o) for o in ops[:4]]  # four layers read x: grouped 2 + 2
        outs.append(op(y, *ops[4]))  # another input: alone
        outs.append(op(xs, *ops[0]))  # two rows: alone
        return outs

    x, y, xs = (torch.randn(1, 1, 128, dtype=dtype), torch.randn(1, 128, dtype=dtype),
                torch.randn(2, 128, dtype=dtype))
    gm = _traced(f, x, y, xs, *tensors)
    assert siblings.group_siblings(gm.graph) == 4
    gm.recompile()
    calls = [n.target for n in gm.graph.nodes if n.op == "call_function" and "qtorch" in str(n.target)]
    assert calls.count(torch.ops.qtorch.blocked_siblings2.default) == 2 and calls.count(op) == 2
    with torch.no_grad():
        want = f(x, y, xs, *tensors)
        for _ in range(3):  # the first call keeps each layer's plan and launch, the later ones chain them
            got = gm(x, y, xs, *tensors)
            assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_three_layers_take_one_call_and_different_ops_or_widths_stay_apart():
    w8 = _layers(W8, torch.bfloat16, (64, 32, 128))  # 32 columns: no one-row plan, so the call's other path
    w4 = _layers(W4, torch.bfloat16, (64,), seed=1)
    gemm, dot = torch.ops.qtorch.gemm_blocked_infer.default, torch.ops.qtorch.int8dot_blocked_infer.default
    layers = w8 + w4
    ints = [_operands(q)[3:] for q in layers]
    tensors = [t for q in layers for t in _operands(q)[:3]]

    def f(x, *ts):
        ops = [(*ts[3 * i:3 * i + 3], *ints[i]) for i in range(len(ints))]
        return [gemm(x, *o) for o in ops] + [dot(x, *ops[3])]

    x = torch.randn(1, 128, dtype=torch.bfloat16)
    gm = _traced(f, x, *tensors)
    assert siblings.group_siblings(gm.graph) == 3
    gm.recompile()
    assert [n.target for n in gm.graph.nodes if n.op == "call_function" and "siblings" in str(n.target)] == [
        torch.ops.qtorch.blocked_siblings3.default]
    with torch.no_grad():
        for _ in range(2):
            assert all(torch.equal(a, b) for a, b in zip(gm(x, *tensors), f(x, *tensors)))


def test_siblings_impl_chains_kept_launches_and_follows_a_replaced_scale():
    layers = _layers(W4, torch.bfloat16, (64, 128))
    members = [(*_operands(q)[:3], q.out_features) for q in layers]
    g, bits = layers[0].quantized_weight.spec.group, 4
    x = torch.randn(1, 128, dtype=torch.bfloat16)
    want = torch.cat([blocked.gemm_blocked_impl(x, *_operands(q), dot=True) for q in layers], 1)
    first = siblings.siblings_impl(x, members, g, bits, True)  # the layers' own ops: plans and launches kept
    assert torch.equal(first, want)
    assert torch.equal(siblings.siblings_impl(x, members, g, bits, True), want)  # by one chain
    chain = siblings._CHAINS[members[0][0]][(torch.bfloat16, True)]
    assert isinstance(chain, gemv.Chain) and len(chain.launchers) == 2
    assert torch.equal(siblings.siblings_impl(x, members, g, bits, True), want)
    assert siblings._CHAINS[members[0][0]][(torch.bfloat16, True)] is chain  # kept
    scale2 = members[1][1] * 2
    doubled = [members[0], (members[1][0], scale2, *members[1][2:])]
    siblings.siblings_impl(x, doubled, g, bits, True)  # a new plan for the second layer
    got = siblings.siblings_impl(x, doubled, g, bits, True)
    assert siblings._CHAINS[members[0][0]][(torch.bfloat16, True)] is not chain
    assert torch.equal(got[:, :64], want[:, :64])
    torch.testing.assert_close(got[:, 64:].float(), 2 * want[:, 64:].float(), rtol=1e-2, atol=1e-2)
    assert torch.equal(got[:, 64:], blocked.gemm_blocked_impl(x, members[1][0], scale2, *_operands(layers[1])[2:],
                                                              dot=True))


def test_a_chain_gives_each_launchers_own_bits_and_checks_its_layers():
    rng = np.random.default_rng(0)
    plans = []
    for n in (2, 3, 1):  # tiles of 64 columns
        wb = rng.integers(-128, 128, (n, 256, 64), dtype=np.int8)
        scale = rng.random((1, n * 64), dtype=np.float32)
        zp = np.zeros((0, 0), np.uint8)
        plans.append((wb, scale, zp, gemv.Plan(wb, scale, zp, 256, 8, wb.ctypes.data, scale.ctypes.data,
                                               zp.ctypes.data)))
    x = torch.randn(1, 256, dtype=torch.bfloat16)
    for kind, okind in ((1, 1), (0, 0)):
        xk = x if kind else x.float()
        launchers = [gemv.Launcher(p, kind, okind, False) for *_, p in plans]
        want = [torch.empty(1, p.N, dtype=xk.dtype) for *_, p in plans]
        for la, w in zip(launchers, want):
            la(xk.data_ptr(), w.data_ptr())
        out = torch.empty(1, sum(p.N for *_, p in plans), dtype=xk.dtype)
        at = [out.data_ptr() + 64 * i * out.element_size() for i in (0, 2, 5)]
        gemv.Chain(launchers)(xk.data_ptr(), at)
        assert torch.equal(out, torch.cat(want, 1))
    with pytest.raises(TypeError, match="Launchers"):
        gemv.Chain([])
    u8 = np.zeros((1, 256, 64), np.uint8)
    p8 = gemv.Plan(u8, np.ones((1, 64), np.float32), np.zeros((1, 64), np.uint8), 256, 8, u8.ctypes.data, 0, 0)
    with pytest.raises(ValueError, match="signed"):
        gemv.Chain([gemv.Launcher(plans[0][3], 0, 0, False), gemv.Launcher(p8, 0, 0, False)])


def test_inductor_options_adds_the_pass_and_keeps_one_already_there():
    assert siblings.inductor_options({"freezing": True}) == {"freezing": True,
                                                             "post_grad_custom_post_pass": siblings.PASS}
    mine = object()
    assert siblings.inductor_options({"post_grad_custom_post_pass": mine})["post_grad_custom_post_pass"] is mine
    assert siblings.PASS.uuid() == siblings.SiblingsPass().uuid()


class _Attention(torch.nn.Module):
    """Three projections of one input and one of another, as a transformer block's attention has them."""

    def __init__(self, layers):
        super().__init__()
        self.q, self.k, self.v, self.o = layers

    def forward(self, x):
        return self.q(x), self.k(x), self.v(x), self.o(x * 2), self.k(x)  # (x * 2: exact; math on outputs is
        # inductor's, rounded once in float32, not eager's)


@pytest.mark.parametrize("compiler", ["torch.compile", "qtorch.compile"])
def test_a_compiled_model_runs_its_siblings_as_one_call_with_the_same_bits(compiler):
    from torch._inductor.utils import run_and_get_code

    model = _Attention(_layers(W8, torch.bfloat16, (128, 128, 128, 128))).eval()
    x = torch.randn(1, 1, 128, dtype=torch.bfloat16)
    torch._dynamo.reset()
    if compiler == "torch.compile":
        fast = torch.compile(model, dynamic=False, options=siblings.inductor_options())
    else:
        fast = qtorch.compile(model, autotune=False)
    with torch.no_grad():
        want = model(x)
        model(x)  # the paths the trace takes
        (got, code) = run_and_get_code(fast, x)
        again = fast(x)
    calls = [line for line in "\n".join(code).splitlines() if "= torch.ops.qtorch." in line]
    # q, k, v and k again read x: two calls of two; o reads another tensor. Each op's C++ twin where it was built
    twin = "_native" if native_ops.library() is not None else ""
    assert sum(f"blocked_siblings2{twin}.default(" in c for c in calls) == 2
    assert sum(f"gemm_blocked_infer{twin}.default(" in c for c in calls) == 1
    for a, b, c in zip(got, again, want):
        assert torch.equal(a, c) and torch.equal(b, c)


def test_layers_of_signed_and_unsigned_codes_share_a_call_and_run_each_by_its_own_launch():
    layers = _layers(W8, torch.bfloat16, (64,)) + _layers(QuantScheme(8, False, PerChannel(0)), torch.bfloat16, (128,))
    assert {q.quantized_weight.buffers["qweight"].dtype for q in layers} == {torch.int8, torch.uint8}
    members = [(*_operands(q)[:3], q.out_features) for q in layers]
    x = torch.randn(1, 128, dtype=torch.bfloat16)
    want = torch.cat([blocked.gemm_blocked_impl(x, *_operands(q)) for q in layers], 1)
    for _ in range(3):  # the first call keeps the launches; no chain joins the two kernels
        assert torch.equal(siblings.siblings_impl(x, members, 128, 8, False), want)
    assert siblings._CHAINS.get(members[0][0], {}).get((torch.bfloat16, False)) is None
