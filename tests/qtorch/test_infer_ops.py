"""qtorch._infer_ops: every custom op has an inference twin with the same schema and result; compiled inference
calls the twin, and a call that needs a gradient the op with one."""

import pytest
import torch

import qtorch
from qcore import PerChannel, PerGroup, QuantScheme
from qtorch import amx
from qtorch.dequant_mm import WeightSpec, dequant_linear
from qtorch.layouts import blocked

W8 = QuantScheme(bits=8, symmetric=True, granularity=PerChannel(axis=0))
W4 = QuantScheme(bits=4, symmetric=False, granularity=PerGroup(64))
OPS = ["gemm_blocked", "tiles_blocked", "tiles_act_blocked", "amx_blocked", "bf16dot_blocked", "int8dot_blocked", "dequant_mm"]


@pytest.mark.parametrize("name", OPS)
def test_each_twin_has_the_schema_of_its_op(name):
    import qtorch.dequant_mm  # noqa: F401  (defines qtorch::dequant_mm)

    op = str(getattr(torch.ops.qtorch, name).default._schema)
    twin = str(getattr(torch.ops.qtorch, f"{name}_infer").default._schema)
    assert twin == op.replace(f"qtorch::{name}(", f"qtorch::{name}_infer(", 1)


@pytest.mark.parametrize("path", sorted(blocked._PATH_OPS))
def test_twin_and_op_give_the_same_result(path):
    if path == blocked.AMX and not amx.available():
        pytest.skip("this process cannot use AMX tiles")
    torch.manual_seed(0)
    q = qtorch.QuantLinear.from_linear(torch.nn.Linear(128, 64), W4)
    q.quantized_weight.hold_layout("blocked", torch.float32)
    b, spec = q.quantized_weight.buffers, q.quantized_weight.spec
    _, op, twin = blocked._PATH_OPS[path]
    x = torch.randn(5, 128)
    args = (b["qweight"], b["scale"], b["zero_point"], spec.group, 4, 64)
    with torch.no_grad():
        assert torch.equal(op(x, *args), twin(x, *args))


def _graphs(model, x):
    """The FX graphs dynamo hands to the backend for ``model(x)``, as code."""
    seen = []

    def backend(gm, inputs):
        seen.append(gm.code)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(model, backend=backend, fullgraph=True)(x)
    return "\n".join(seen)


@pytest.mark.parametrize("scheme", [W8, W4], ids=["w8", "w4"])
def test_compiled_inference_calls_the_twin_and_training_the_op(scheme):
    torch.manual_seed(1)
    q = qtorch.QuantLinear.from_linear(torch.nn.Linear(128, 64), scheme)
    q.quantized_weight.hold_layout("blocked", torch.float32)
    x = torch.randn(8, 128)
    with torch.no_grad():
        code = _graphs(q, x)
    assert "_blocked_infer" in code
    xg = x.clone().requires_grad_()
    code = _graphs(q, xg)
    assert "_blocked" in code and "_infer" not in code
    # the gradient flows through the op with one, as through F.linear on the dequantized weight
    y = torch.compile(q, backend="aot_eager", fullgraph=True)(xg)
    y.sum().backward()
    torch.testing.assert_close(xg.grad, q.dequantized_weight().sum(0).expand(8, 128), rtol=1e-4, atol=1e-4)


def test_dequant_linear_compiled_calls_the_twin_and_training_the_op():
    torch.manual_seed(2)
    q = qtorch.QuantLinear.from_linear(torch.nn.Linear(128, 64), W4)
    sd = q.state_dict()
    spec = WeightSpec.from_scheme(W4, 64, 128)

    def f(x):
        return dequant_linear(x, sd["qweight"], sd["scale"], sd["zero_point"], spec)

    x = torch.randn(8, 128)
    with torch.no_grad():
        assert "dequant_mm_infer" in _graphs(f, x)
        torch.testing.assert_close(torch.compile(f, backend="aot_eager")(x), f(x))
    xg = x.clone().requires_grad_()
    code = _graphs(f, xg)
    assert "dequant_mm" in code and "_infer" not in code
    torch.compile(f, backend="aot_eager")(xg).sum().backward()
    torch.testing.assert_close(xg.grad, q.dequantized_weight().sum(0).expand(8, 128), rtol=1e-4, atol=1e-4)


def test_constant_result_marks_as_dynamo_does_without_loading_it():
    import subprocess
    import sys

    from qtorch._infer_ops import constant_result
    from qtorch.layouts import blocked, int4pack

    def fresh():
        return 1

    marked = torch.compiler.assume_constant_result(fresh)  # Dynamo's own mark: the attribute constant_result sets
    assert marked.__dict__ == {"_dynamo_marked_constant": True}
    assert constant_result(lambda: 1)._dynamo_marked_constant is True
    assert blocked._traced_tiles._dynamo_marked_constant and int4pack.tile_width._dynamo_marked_constant
    code = "import sys, qtorch; print('torch._dynamo' in sys.modules, 'torch._inductor' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]  # import qtorch leaves them to the first compile (about 1 s)
