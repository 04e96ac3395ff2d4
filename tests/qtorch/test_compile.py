"""torch.compile over the quantized layers: fullgraph tracing of every path, and qtorch.compile end to end."""

import re
import sys

import pytest
import torch
import torch._inductor.config as inductor_config

import qtorch
from qcore import PerChannel, PerGroup, QuantScheme
from qtorch.compile import CompiledModule, compile_options

COMPILE_MODULE = sys.modules["qtorch.compile"]  # (the module: qtorch.compile is also the function)


@pytest.mark.parametrize("layer,n,rows", [("W8A16Linear", 48, 2), ("W4A16Linear", 32, 300),
                                          ("W8A16Linear", 30, 3),  # numba op, tiles op, canonical dense
                                          ("W4A16Linear", 128, 1), ("W8A16Linear", 128, 1)])  # one-row kernel
def test_fullgraph_trace_has_no_graph_break(layer, n, rows, blocked_kernels):
    torch._dynamo.reset()
    q = getattr(qtorch, layer).from_linear(torch.nn.Linear(128, n, dtype=torch.bfloat16))
    x = torch.randn(rows, 128, dtype=torch.bfloat16)
    cq = torch.compile(q, fullgraph=True, backend="aot_eager")
    assert torch.equal(cq(x), q(x))


@pytest.mark.parametrize("layer", ["W8A16Linear", "W4A16Linear"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dynamic", [None, True])
def test_fullgraph_takes_new_row_counts_with_dynamic_shapes(layer, dtype, dynamic, blocked_kernels, monkeypatch):
    """A second row count makes torch trace with a symbolic one: the traced path's constant-result function got
    it and fullgraph failed ('Cannot convert argument of type SymNodeVariable to a Python constant'). Measuring on
    (as by default): a trace then asks the layout for its traced path."""
    from qtorch import autotune

    monkeypatch.setattr(autotune, "_DEFAULT", autotune.Dispatcher(cache_path=False, env={}))
    torch._dynamo.reset()
    q = getattr(qtorch, layer).from_linear(torch.nn.Linear(128, 48)).to(dtype)
    cq = torch.compile(q, fullgraph=True, dynamic=dynamic, backend="aot_eager")
    with torch.no_grad():
        for rows in (5, 7, 2, 33, 1):
            x = torch.randn(rows, 128, dtype=dtype)
            ref = torch.nn.functional.linear(x.float(), q.dequantized_weight(torch.float32), q.bias.float())
            torch.testing.assert_close(cq(x).float(), ref, **({} if dtype == torch.float32 else
                                                             {"rtol": 2e-2, "atol": 2e-2}))


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
    from qtorch.siblings import PASS

    assert compile_options("cpu") == {"freezing": True, "max_autotune": True, "coordinate_descent_tuning": True,
                                      "post_grad_custom_post_pass": PASS}
    assert compile_options("cuda")["triton.cudagraphs"] is True and "post_grad_custom_post_pass" not in \
        compile_options("cuda")
    assert compile_options("cpu", autotune=False) == {"freezing": True, "post_grad_custom_post_pass": PASS}
    mine = object()
    with inductor_config.patch(post_grad_custom_post_pass=mine):  # a pass of the caller's stays
        assert compile_options("cpu", autotune=False) == {"freezing": True}
    with pytest.raises(TypeError):
        qtorch.compile(lambda x: x)


# ---------------------------------------------------------------- what inductor gets to see under qtorch.compile

class FrozenConstants:
    """An inductor post-grad pass that records the graph's constants (name -> tensor) and call targets."""

    def __init__(self):
        self.constants, self.targets = {}, []

    def __call__(self, graph):
        gm = graph.owning_module
        for node in graph.nodes:
            if node.op == "get_attr":
                t = getattr(gm, node.target, None)
                if isinstance(t, torch.Tensor):
                    self.constants[node.target] = t
            elif node.op == "call_function":
                self.targets.append(str(node.target))

    def full_precision_bigger_than(self, numel):
        return [(k, t.dtype, tuple(t.shape)) for k, t in self.constants.items()
                if t.is_floating_point() and t.numel() >= numel]


def code_constants(code):
    """(name, dtype, numel) of each constant the generated module declares (its header names them all, the
    templates' pre-packed weights included)."""
    found = []
    for name, dtype, shape in re.findall(r"^(\w+) = None  # device\(type='\w+'.*?\) torch\.(\w+) \(([\d, ]*)\)", code,
                                         re.M):
        numel = 1
        for d in filter(None, (p.strip() for p in shape.split(","))):
            numel *= int(d)
        found.append((name, dtype, numel))
    return found


def assert_no_full_precision_weight(rec, code, n, k):
    """Neither the frozen graph nor the generated module holds a floating tensor of half the weight's size."""
    assert rec.full_precision_bigger_than(n * k // 2) == []
    consts = code_constants(code)
    assert consts, "the generated module declares no constant: nothing was frozen"
    assert [c for c in consts if c[2] >= n * k // 2 and c[1] not in ("int8", "uint8")] == []


def compile_and_record(model, x, **kw):
    """(output, FrozenConstants, generated code) of ``qtorch.compile(model, fullgraph=True, **kw)(x)``."""
    from torch._inductor.utils import run_and_get_code
    torch._dynamo.reset()
    rec = FrozenConstants()
    with inductor_config.patch(post_grad_custom_post_pass=rec, fx_graph_cache=False):
        cm = qtorch.compile(model, fullgraph=True, **kw)
        if cm._choose is not None:  # the first call chooses the layouts eagerly; the second compiles
            cm(x)
        y, code = run_and_get_code(cm, x)
    return y, rec, "\n".join(code)


def bf16_layer(cls, n=64, k=128, **kw):
    torch.manual_seed(0)
    return cls.from_linear(torch.nn.Linear(k, n, dtype=torch.bfloat16), **kw)


def test_weights_become_frozen_constants(torch_pack_kernels):
    """inductor's freezing must see the weights as constants (its dense pre-packing and weight-only templates
    need them so): the compiled call takes the input alone."""
    q = bf16_layer(qtorch.W8A16Linear)
    assert q.quantized_weight.layout.name == "int8pack"
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    y, rec, code = compile_and_record(q, x, autotune=False)
    assert torch.equal(y, q(x))
    qweight = q.quantized_weight.buffers["qweight"]
    assert any(t.dtype == torch.int8 and t.shape == qweight.shape for t in rec.constants.values())
    assert re.search(r"\n\s+\w+, = args\n", code)  # the compiled call takes x alone
    # the dense layer too: oneDNN gets its pre-packed weight where the CPU packs bfloat16 (AVX-512), inductor's
    # addmm its transpose elsewhere (AVX2); a constant either way, and the call takes x alone
    dense = torch.nn.Linear(128, 64, dtype=torch.bfloat16)
    y, rec, code = compile_and_record(dense, x, autotune=False)
    assert torch.allclose(y.float(), dense(x).float(), atol=1e-2, rtol=1e-2)
    assert any(t.shape in (dense.weight.shape, dense.weight.t().shape) for t in rec.constants.values())
    assert re.search(r"\n\s+\w+, = args\n", code)


def test_freezing_reaches_the_compilation_without_compile_callbacks(torch_pack_kernels, monkeypatch):
    """Where Dynamo runs no compile callbacks (older torch), the settings are made around every call instead."""
    monkeypatch.setattr(COMPILE_MODULE, "_HANDLER", [None])
    q = bf16_layer(qtorch.W8A16Linear)
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    y, rec, code = compile_and_record(q, x, autotune=False)
    assert torch.equal(y, q(x))
    assert any(t.dtype == torch.int8 for t in rec.constants.values())
    assert re.search(r"\n\s+\w+, = args\n", code)  # the compiled call takes x alone
    assert inductor_config.freezing is False


def test_later_calls_compile_nothing_again(torch_pack_kernels, monkeypatch):
    """With max-autotune the trace reads whether the weight-only templates are on (a global Dynamo guards the
    compiled code on): every call must see what the trace saw, or every call compiles again (from inductor's
    cache: 0.1 s a call of a 4096x4096 layer)."""
    forced_route(monkeypatch, "dequant_mm")  # an int8pack layer whose trace reads it
    torch._dynamo.reset()
    q = bf16_layer(qtorch.W8A16Linear)
    x = torch.randn(8, 128, dtype=torch.bfloat16)
    with torch.no_grad():
        q(x)  # keeps the route
    cm = qtorch.compile(q, fullgraph=True)
    with inductor_config.patch(max_autotune_gemm_backends="CPP,ATEN"):
        y = cm(x)
        with torch._dynamo.config.patch(error_on_recompile=True):
            for _ in range(3):
                assert torch.equal(cm(x), y)


def test_the_settings_are_the_compilations_alone(torch_pack_kernels):
    """A compiled call sets freezing only while Dynamo compiles inside it: a plain torch.compile of another model
    afterwards, in the same process, is not frozen (its weight stays an input), and nothing is left set."""
    q = bf16_layer(qtorch.W8A16Linear)
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    compile_and_record(q, x, autotune=False)  # (registers the callbacks, compiles, runs)
    assert inductor_config.freezing is False and not COMPILE_MODULE._SAVED
    assert COMPILE_MODULE._compile_start in torch._dynamo.callback_handler.start_callbacks
    dense = torch.nn.Linear(128, 64, dtype=torch.bfloat16)
    seen = []
    with inductor_config.patch(post_grad_custom_post_pass=None):
        with torch.no_grad():
            out = torch.compile(dense, backend=lambda gm, inputs: seen.append(len(inputs)) or gm.forward)(x)
    assert torch.allclose(out, dense(x)) and seen == [3]  # x, the weight and the bias: graph inputs
    assert inductor_config.freezing is False


@pytest.mark.parametrize("scheme,n", [(QuantScheme(8, True, PerChannel(0)), 30), (QuantScheme(4, False, PerGroup(32)), 30)])
def test_frozen_graph_holds_no_full_precision_weight(scheme, n):
    """A layer that dequantizes in the graph (the portable path: N = 30 fits no packed layout) keeps its codes as
    the constant: freezing must not fold the dequantized weight into a float32 copy."""
    torch.manual_seed(0)
    q = qtorch.QuantLinear.from_linear(torch.nn.Linear(128, n), scheme=scheme)
    assert q.quantized_weight.layout.name == "canonical"
    x = torch.randn(3, 128)
    y, rec, code = compile_and_record(q, x, autotune=False)
    assert torch.allclose(y, q(x), atol=1e-5, rtol=1e-5)
    assert_no_full_precision_weight(rec, code, n, 128)
    codes = [t for t in rec.constants.values() if t.dtype in (torch.int8, torch.uint8)]
    b = q.quantized_weight.buffers  # codes as stored: packed, never unpacked at compile time
    assert sum(t.numel() for t in codes) == sum(b[k].numel() for k in ("qweight", "zero_point") if b[k] is not None)


def forced_route(monkeypatch, path):
    """A dispatcher that sends every several-row call to ``path`` (as ``QTORCH_PATH`` does)."""
    from qtorch import autotune
    # the layout under test, not one chosen by measuring
    env = {"QTORCH_PATH": path, "QTORCH_LAYOUT": "int8pack"}
    monkeypatch.setattr(autotune, "_DEFAULT", autotune.Dispatcher(cache_path=False, env=env))


def test_int8pack_traces_its_woq_op_for_inductor_templates(monkeypatch, torch_pack_kernels):
    """With max-autotune, an int8pack layer whose calls were routed to ``dequant_mm`` (an opaque custom op) puts
    ``_weight_int8pack_mm`` into the graph instead, for inductor to weigh its AMX/AVX-512 template against the
    ATen kernel; a plain compile (no template) keeps the routed custom op."""
    forced_route(monkeypatch, "dequant_mm")
    q = bf16_layer(qtorch.W8A16Linear)
    x = torch.randn(8, 128, dtype=torch.bfloat16)
    with torch.no_grad():
        eager = q(x)  # keeps the route
    assert "dequant_mm" in str(q.quantized_weight._routes.values())
    y, rec, code = compile_and_record(q, x, autotune=False)
    assert "qtorch.dequant_mm" in " ".join(rec.targets) and torch.equal(y, eager)
    with inductor_config.patch(max_autotune_gemm_backends="CPP,ATEN"):
        y, rec, code = compile_and_record(q, x, autotune=True)
    assert "dequant_mm" not in code and "_weight_int8pack_mm" in " ".join(rec.targets)
    assert torch.allclose(y.float(), eager.float(), atol=2e-2, rtol=2e-2)
    assert_no_full_precision_weight(rec, code, 64, 128)


@pytest.mark.parametrize("layer,kw", [("W8A16Linear", {}), ("W4A16Linear", {"scheme": QuantScheme(4, False, PerGroup(32))})])
def test_woq_template_output_matches_eager(layer, kw, torch_pack_kernels):
    """inductor's C++ weight-only template (the only choice here) reads the int8pack / int4pack weight as
    qtorch laid it out: the compiled layer equals the eager one within bfloat16 rounding."""
    q = bf16_layer(getattr(qtorch, layer), **kw)
    assert q.quantized_weight.layout.name in ("int8pack", "int4pack")
    x = torch.randn(5, 128, dtype=torch.bfloat16)
    cap = torch.backends.cpu.get_cpu_capability()
    # inductor's int4 template needs AVX-512: elsewhere (AVX2) the ATen kernel is its one choice for that op
    template = cap != "DEFAULT" and (layer == "W8A16Linear" or cap.startswith("AVX512"))
    with inductor_config.patch(max_autotune_gemm_backends="CPP" if template else "CPP,ATEN"):
        y, rec, code = compile_and_record(q, x, autotune=True)
    if template:
        assert "micro_gemm" in code  # the template, not the ATen kernel
    ref = q(x).float()
    assert torch.allclose(y.float(), ref, atol=2e-2 * float(ref.abs().max()), rtol=2e-2)
    assert_no_full_precision_weight(rec, code, 64, 128)


def test_blocked_layout_keeps_its_custom_op(blocked_kernels):
    """No inductor template reads the blocked layout: its custom op stays in the graph, codes frozen as stored."""
    q = bf16_layer(qtorch.W4A16Linear, scheme=QuantScheme(4, False, PerGroup(32)))
    assert q.quantized_weight.layout.name == "blocked"
    x = torch.randn(5, 128, dtype=torch.bfloat16)
    y, rec, code = compile_and_record(q, x, autotune=False)
    assert "qtorch" in " ".join(rec.targets)
    assert torch.allclose(y.float(), q(x).float(), atol=1e-2, rtol=1e-2)
    assert_no_full_precision_weight(rec, code, 64, 128)


@pytest.mark.parametrize("scheme,template", [(QuantScheme(4, False, PerGroup(32)), "int4pack"),
                                             (QuantScheme(8, True, PerChannel(0)), "int8pack")], ids=str)
def test_unmeasured_choice_moves_weights_into_a_template_layout(torch_pack_kernels, scheme, template):
    """Unmeasured (``QTORCH_AUTOTUNE=0``, as in these tests) on a CPU whose static order puts PyTorch's kernels
    first, a blocked weight that a template layout can hold moves there before tracing; outputs and the
    state_dict stay what they were (tests/qtorch/test_compile_choice.py covers the measured choice)."""
    from qtorch.compile import choose_layouts

    q = bf16_layer(qtorch.QuantLinear, scheme=scheme)
    assert q.quantized_weight.hold_layout("blocked", torch.bfloat16)
    x = torch.randn(5, 128, dtype=torch.bfloat16)
    before, state = q(x), {k: v.clone() for k, v in q.state_dict().items()}
    assert list(choose_layouts(torch.nn.Sequential(q)).values()) == [template]
    assert q.quantized_weight.layout.name == template
    assert all(torch.equal(state[k], v) for k, v in q.state_dict().items())
    assert torch.allclose(q(x).float(), before.float(), atol=2e-2, rtol=2e-2)
