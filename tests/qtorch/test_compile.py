"""torch.compile over the quantized layers: fullgraph tracing of every path, and qtorch.compile end to end."""

import pytest
import torch
import torch._inductor.config as inductor_config

import qtorch
from qcore import PerGroup, QuantScheme
from qtorch.compile import CompiledModule, compile_options


@pytest.mark.parametrize("layer,n,rows", [("W8A16Linear", 48, 2), ("W4A16Linear", 32, 300),
                                          ("W8A16Linear", 30, 3),  # numba op, tiles op, canonical dense
                                          ("W4A16Linear", 128, 1), ("W8A16Linear", 128, 1)])  # one-row kernel
def test_fullgraph_trace_has_no_graph_break(layer, n, rows, blocked_kernels):
    torch._dynamo.reset()
    q = getattr(qtorch, layer).from_linear(torch.nn.Linear(128, n, dtype=torch.bfloat16))
    x = torch.randn(rows, 128, dtype=torch.bfloat16)
    cq = torch.compile(q, fullgraph=True, backend="aot_eager")
    assert torch.equal(cq(x), q(x))


def test_qtorch_compile_inductor_fullgraph_and_restores_nothing_global(torch_pack_kernels):
    torch._dynamo.reset()
    before = (inductor_config.freezing, inductor_config.max_autotune)
    m = torch.nn.Sequential(qtorch.W8A16Linear(64, 32), torch.nn.GELU(),
                            qtorch.QuantLinear(32, 16, scheme=QuantScheme(4, False, PerGroup(16))))
    m[0].quantize(torch.randn(32, 64))
    m[2].quantize(torch.randn(16, 32))
    cm = qtorch.compile(m, fullgraph=True, autotune=False)
    assert isinstance(cm, CompiledModule) and cm.training is False
    x = torch.randn(3, 64)
    y = cm(x)
    assert not y.requires_grad
    assert torch.allclose(y, m(x), atol=1e-5, rtol=1e-5)
    assert (inductor_config.freezing, inductor_config.max_autotune) == before
    assert set(cm.state_dict()) == {"_orig_mod." + k for k in m.state_dict()}
    # bfloat16: the torch._weight_int8pack_mm path goes through inductor's lowering too
    torch._dynamo.reset()
    qb = qtorch.W8A16Linear.from_linear(torch.nn.Linear(64, 64, dtype=torch.bfloat16))
    assert qb.weight_layout == "canonical" and qb.kernel_nbytes() == 64 * 2
    q4 = qtorch.W4A16Linear(64, 32, group_size=32, dtype=torch.bfloat16).quantize(torch.randn(32, 64))
    assert q4.weight_layout == "int4pack"  # torch._weight_int4pack_mm_for_cpu through inductor
    mb = torch.nn.Sequential(qb, q4)
    xb = torch.randn(2, 64, dtype=torch.bfloat16)
    assert torch.allclose(qtorch.compile(mb, fullgraph=True, autotune=False)(xb).float(), mb(xb).float(),
                          atol=1e-2, rtol=1e-2)


def test_compile_options():
    assert compile_options("cpu") == {"freezing": True, "max_autotune": True, "coordinate_descent_tuning": True}
    assert compile_options("cuda")["triton.cudagraphs"] is True
    assert compile_options("cpu", autotune=False) == {"freezing": True}
    with pytest.raises(TypeError):
        qtorch.compile(lambda x: x)
