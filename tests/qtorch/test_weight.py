"""qtorch.weight.QuantizedWeight and the layout registry: one conversion each way, the candidates step, plug-ins."""

import copy
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import qcore
import qtorch
from qcore import PerChannel, PerGroup, PerTensor, QuantScheme
from qtorch import layouts
from qtorch.layouts import Layout, WeightSpec
from qtorch.layouts.codec import dequantize_codes
from qtorch.weight import QuantizedWeight

SCHEMES = [QuantScheme(b, s, g) for b in (1, 2, 3, 4, 5, 8) for s in (True, False) if not (b == 1 and s)
           for g in (PerTensor(), PerChannel(0), PerGroup(16))]


def _qa(scheme, n=32, k=64, seed=0):
    w = np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32)
    return qcore.quantize(w, scheme)


@pytest.mark.parametrize("scheme", SCHEMES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_quantized_array_round_trip_in_every_layout(scheme, dtype):
    qa = _qa(scheme)
    w = QuantizedWeight.from_quantized_array(qa, compute_dtype=dtype)
    assert w.layout.name == w.candidates(dtype)[0]
    back = w.to_quantized_array()
    assert back.scheme == qa.scheme and back.codes.dtype == qa.codes.dtype
    assert np.array_equal(back.codes, qa.codes) and np.array_equal(back.scale, qa.scale)
    assert (qa.zero_point is None and back.zero_point is None) or np.array_equal(back.zero_point, qa.zero_point)
    assert torch.equal(w.dequantize(), torch.from_numpy(qcore.dequantize(qa)))
    x = torch.randn(3, 64, dtype=dtype)
    ref = F.linear(x.float(), w.dequantize())
    assert torch.allclose(w.linear(x).float(), ref, rtol=2e-2, atol=2e-2 * float(ref.abs().max()))


def test_the_array_is_copied_in_and_out():
    qa = _qa(QuantScheme(8, True, PerChannel(0)), n=30)  # canonical: the codes are the buffer itself
    w = QuantizedWeight.from_quantized_array(qa)
    before = w.dequantize()
    qa.codes[:] = 0
    assert torch.equal(w.dequantize(), before)


def test_candidates_are_the_eligible_layouts_in_preference_order(monkeypatch):
    w8 = QuantScheme(8, True, PerChannel(0))
    w4 = QuantScheme(4, False, PerGroup(32))
    cpu, bf16, f32 = torch.device("cpu"), torch.bfloat16, torch.float32

    def names(scheme, n, k, dtype, device=cpu):
        return [lay.name for lay in layouts.candidates(WeightSpec.of(scheme, n, k), device, dtype)]

    monkeypatch.setattr(layouts, "TORCH_PACK_KERNELS", True)
    # the vnni layouts where the CPU has AVX512-VNNI (4 bits) or AMX-INT8 (8 bits; N % 64 == K % 64 == 0),
    # registered after PyTorch's kernels and blocked
    vnni = ["vnni"] if qtorch.vnni.available() else []
    vnni8 = ["vnni8"] if qtorch.vnni8.available() else []
    assert names(w8, 64, 256, bf16) == ["int8pack", "blocked"] + vnni8 + ["canonical"]
    assert names(w4, 64, 256, bf16) == ["int4pack", "blocked"] + vnni + ["canonical"]
    assert names(w8, 64, 256, f32) == ["blocked"] + vnni8 + ["canonical"]
    assert names(w8, 64, 96, f32) == ["blocked", "canonical"]  # K % 64 != 0: no vnni8 step
    assert names(w8, 64, 100, bf16) == ["blocked", "canonical"]  # K % 16 != 0 would crash the int8 kernel
    assert names(w8, 30, 256, bf16) == ["int8pack", "canonical"]  # N = 30: no blocked tile
    # 3 bits: held in the blocked layout's 4-bit containers (the same kernels)
    assert names(QuantScheme(3, True, PerGroup(32)), 64, 256, f32) == ["blocked", "canonical"]
    assert names(QuantScheme(3, True, PerGroup(32)), 30, 256, f32) == ["canonical"]  # N = 30: no blocked tile
    assert names(w4, 64, 256, bf16, torch.device("cuda")) == ["canonical"]
    assert names(w4, 64, 256, bf16, torch.device("meta")) == ["canonical"]
    # the two steps: what can hold the weight (registration order), then the policy's order
    found = layouts.eligible(WeightSpec.of(w8, 64, 256), cpu, bf16)
    assert [lay.name for lay in found] == ["blocked", "int8pack"] + vnni8 + ["canonical"]
    assert [lay.name for lay in layouts.default_policy(found)] == ["int8pack", "blocked"] + vnni8 + ["canonical"]
    monkeypatch.setattr(layouts, "TORCH_PACK_KERNELS", False)
    assert [lay.name for lay in layouts.default_policy(found)] == ["blocked", "int8pack"] + vnni8 + ["canonical"]
    assert names(w8, 64, 256, bf16) == ["blocked", "int8pack"] + vnni8 + ["canonical"]
    assert names(w8, 30, 256, bf16) == ["int8pack", "canonical"]
    # a layer holds its first candidate, and says so
    q = qtorch.QuantLinear.from_linear(torch.nn.Linear(256, 64, dtype=bf16), w4)
    assert q.layout_candidates() == ["blocked", "int4pack"] + vnni + ["canonical"]
    assert q.quantized_weight.layout.name == "blocked"


def test_copies_keep_the_layout_object_and_their_own_buffers():
    q = qtorch.W4A16Linear.from_linear(torch.nn.Linear(256, 64))
    x = torch.randn(2, 256)
    for c in (copy.deepcopy(q), pickle.loads(pickle.dumps(q))):
        assert c.quantized_weight.layout is q.quantized_weight.layout
        assert c.quantized_weight.buffers is c._buffers and c._buffers["qweight"] is not q._buffers["qweight"]
        assert torch.equal(c(x), q(x))


class _Transposed(Layout):
    """A toy layout: 8-bit codes held ``[K, N]`` (float32 layers on CPU), to show what a new layout takes."""

    name = holds = "transposed"

    def eligible(self, spec, device, compute_dtype):
        return device.type == "cpu" and spec.bits == 8 and compute_dtype == torch.float32

    def path(self, device_type, dtype, rows, bits):
        return "transposed"

    def linear(self, weight, x2, path):
        return x2.float() @ weight.dequantize().t()

    def from_codes(self, spec, codes, scale, zero_point):
        return codes.t().contiguous(), scale, zero_point, None

    def to_codes(self, spec, qweight, scale, zero_point):
        return qweight.t().contiguous(), scale, zero_point


def test_a_new_layout_is_one_class_and_one_registration(monkeypatch):
    builtin = layouts.registered()
    monkeypatch.setattr(layouts, "_REGISTRY", {})
    layouts.register(_Transposed())  # ahead of the built-in ones: registration order is the preference order
    for lay in builtin:
        layouts.register(lay)
    with pytest.raises(ValueError, match="already registered"):
        layouts.register(_Transposed())
    with pytest.raises(TypeError, match="Layout instance"):
        layouts.register("transposed")
    lin = torch.nn.Linear(64, 32)
    q = qtorch.QuantLinear.from_linear(lin, QuantScheme(8, False, PerChannel(0)))
    assert q.weight_layout == "transposed" and q.qweight.shape == (64, 32)
    ref = qtorch.QuantLinear.from_linear(lin, QuantScheme(8, False, PerChannel(0)))
    sd = q.state_dict()
    assert sd["qweight"].shape == (32, 64) and torch.equal(q.dequantized_weight(), ref.dequantized_weight())
    x = torch.randn(3, 64)
    assert torch.allclose(q(x), F.linear(x, q.dequantized_weight(), q.bias), atol=1e-5)
    q.bfloat16()  # not eligible any more: the next candidate, converted through the codes
    assert q.weight_layout != "transposed" and torch.equal(q.state_dict()["qweight"], sd["qweight"])


def test_codes_dequantize_as_the_canonical_form():
    scheme = QuantScheme(3, True, PerGroup(16))
    qa = _qa(scheme)
    w = QuantizedWeight.from_quantized_array(qa)
    codes, s, z = w.codes()
    assert codes.shape == (32, 64) and int(codes.min()) >= 0
    assert torch.equal(dequantize_codes(codes, s, z, w.spec), w.dequantize())


def test_from_quantized_array_checks_its_input():
    with pytest.raises(TypeError, match="QuantizedArray"):
        QuantizedWeight.from_quantized_array(np.zeros((2, 2)))
    qa = qcore.quantize(np.ones(8, np.float32), QuantScheme())
    with pytest.raises(ValueError, match=r"2-D .* shape \[8\]"):
        QuantizedWeight.from_quantized_array(qa)
    qa2 = _qa(QuantScheme())
    w = QuantizedWeight.from_quantized_array(qa2)
    with pytest.raises(ValueError, match="does not fit"):
        w.load_quantized_array(_qa(QuantScheme(4, False, PerGroup(16))), torch.float32)
    with pytest.raises(ValueError, match=r"bias must be a tensor of shape \[32\]"):
        qtorch.QuantLinear.from_quantized_array(qa2, torch.zeros(3))


@pytest.mark.parametrize("scheme", [QuantScheme(4, False, PerGroup(32)), QuantScheme(8, True, PerChannel(0)),
                                    QuantScheme(2, False, PerTensor())], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_a_layer_from_a_quantized_array_equals_one_loaded_from_its_state(scheme, dtype):
    qa = _qa(scheme, n=64, k=128)
    bias = torch.randn(64)
    a = qtorch.QuantLinear.from_quantized_array(qa, bias, dtype=dtype)
    b = qtorch.QuantLinear(128, 64, scheme=scheme, dtype=dtype)
    b.load_state_dict(a.state_dict())
    assert a.weight_layout == b.weight_layout and a.bias.dtype == dtype
    for key, t in b._buffers.items():
        assert (t is None and a._buffers[key] is None) or torch.equal(a._buffers[key], t), key
    x = torch.randn(3, 128, dtype=dtype)
    assert torch.equal(a(x), b(x))


def _layer_in(layout, bits, bias, dtype=torch.bfloat16, k=256, n=128, seed=0):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(k, n, bias=bias)
    scheme = QuantScheme(8, True, PerChannel(0)) if bits == 8 else QuantScheme(4, False, PerGroup(64))
    q = qtorch.QuantLinear.from_linear(lin, scheme).to(dtype)
    if not q._w.hold_layout(layout, dtype):
        pytest.skip(f"{layout} does not hold this weight here")
    return q


DECODING = [("blocked", 8), ("blocked", 4), ("int8pack", 8), ("int4pack", 4)]


@pytest.mark.parametrize("layout,bits", DECODING)
@pytest.mark.parametrize("shape", [(256,), (1, 256), (1, 1, 256)])
@pytest.mark.parametrize("bias", [False, True])
def test_single_rows_take_the_decoder_with_the_same_bits(layout, bits, shape, bias, monkeypatch):
    # the first single-row call takes the full path and keeps the layout's decoder; later ones take it (the full
    # path would raise now): the same kernel, so the same bits, the same shape as F.linear's, the bias added
    q = _layer_in(layout, bits, bias)
    x = torch.randn(shape).to(torch.bfloat16)
    with torch.no_grad():
        first = q(x)
        assert callable(q._w._decoders[torch.bfloat16])
        with monkeypatch.context() as m:
            m.setattr(type(q._w.layout), "linear", lambda *a: pytest.fail("the full path ran"))
            again = q(x)
        wide = q(torch.cat([x.reshape(1, 256)] * 3))  # rows > 1 never take it
    assert again.shape == first.shape == shape[:-1] + (128,) and torch.equal(again, first)
    ref = F.linear(x.float(), q.dequantized_weight(torch.float32), None if q.bias is None else q.bias.float())
    assert torch.allclose(again.float(), ref, rtol=2e-2, atol=2e-2) and wide.shape == (3, 128)


@pytest.mark.parametrize("layout,bits", DECODING)
def test_a_strided_row_gives_the_decoder_its_own_values(layout, bits):
    # a row sliced from a wider tensor, a column of a transposed one, a [1, 1, K] view with odd strides
    q = _layer_in(layout, bits, True)
    wide = torch.randn(3, 700).to(torch.bfloat16)
    cols = torch.randn(256, 2).to(torch.bfloat16)
    with torch.no_grad():
        q(wide[0, :256])  # keeps the decoder
        for x in (wide[1:2, 100:356], cols.t()[:1], wide[:, 3:259][None, 2:3], cols[:, 1]):
            assert x.numel() == 256 and torch.equal(q(x), q(x.contiguous()))


@pytest.mark.parametrize("layout,bits", DECODING)
def test_a_kept_decoder_never_serves_k_values_of_another_shape_nor_autocast(layout, bits):
    # K values whose last dimension is not K are refused by name once a decoder is kept, and under autocast the row
    # is cast first, as nn.Linear computes it, then decoded
    q = _layer_in(layout, bits, True)
    x = torch.randn(1, 256).to(torch.bfloat16)
    with torch.no_grad():
        want = q(x)
        assert callable(q._w._decoders[torch.bfloat16])
        for bad in (x.reshape(2, 128), x.reshape(256, 1)):
            with pytest.raises(ValueError, match="in_features=256"):
                q(bad)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = q(x.float())
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)


@pytest.mark.parametrize("layout,bits", DECODING)
def test_a_replaced_buffer_is_never_read_by_a_stale_decoder(layout, bits):
    # a decoder made before the weight's buffers were replaced steps aside: the call takes the full path on the
    # new buffers (and keeps a decoder for them)
    q = _layer_in(layout, bits, False)
    x = torch.randn(1, 256).to(torch.bfloat16)
    with torch.no_grad():
        q(x), q(x)
        other = _layer_in(layout, bits, False, seed=1)
        q._buffers["qweight"] = other._buffers["qweight"].clone()
        q._buffers["scale"] = other._buffers["scale"].clone()
        if other._buffers["zero_point"] is not None:
            q._buffers["zero_point"] = other._buffers["zero_point"].clone()
        q._w.aux = other._w.aux
        fresh = copy.deepcopy(other)
        assert torch.equal(q(x), fresh(x)) and torch.equal(q(x), fresh(x))


def test_the_decoder_records_no_gradient_and_is_left_alone_when_one_is_needed():
    q = _layer_in("blocked", 4, True, dtype=torch.float32)
    x = torch.randn(1, 256, requires_grad=True)
    with torch.no_grad():
        q(x)
    assert callable(q._w._decoders[torch.float32])
    y = q(x)
    assert y.grad_fn is not None
    y.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape


@pytest.mark.parametrize("layout,bits", DECODING)
def test_copies_and_pickles_never_share_a_decoder(layout, bits):
    # a decoder reads the buffers of the layer that made it: a copy computes with its own, even after the
    # original's are changed in place
    q = _layer_in(layout, bits, False)
    x = torch.randn(1, 256).to(torch.bfloat16)
    with torch.no_grad():
        y = q(x)
        q(x)
        c, p = copy.deepcopy(q), pickle.loads(pickle.dumps(q))
        assert c._w._decoders == {} and p._w._decoders == {}
        for t in q._buffers.values():
            if t is not None and t.is_floating_point():
                t.mul_(2)
        if q._w.aux is not None:
            q._w.aux.mul_(2)
        assert torch.equal(c(x), y) and torch.equal(p(x), y) and torch.equal(c(x), y)
        assert not torch.equal(q(x), y)


@pytest.mark.parametrize("rows", [1, 4])
@pytest.mark.parametrize("grad", [False, True])
def test_int8pack_takes_rows_that_start_off_a_32_byte_boundary(rows, grad):
    # PyTorch's kernel reads x with aligned loads: a slice 16 bytes into a buffer killed the process
    q = _layer_in("int8pack", 8, True)
    buf = torch.randn(8192).to(torch.bfloat16)
    x = buf[8:8 + rows * 256].view(rows, 256)
    assert x.data_ptr() % 32
    ref = q(x.clone())
    with torch.set_grad_enabled(grad):
        x = x.requires_grad_(grad)
        for _ in range(2):  # the full path, then the decoder (one row)
            assert torch.equal(q(x), ref)


@pytest.mark.parametrize("layout,bits", DECODING)
def test_single_rows_under_a_default_device_and_with_many_dimensions(layout, bits):
    # the kernels write CPU memory whatever torch's default device is; inputs of 9+ dimensions of size 1
    q = _layer_in(layout, bits, True)
    x = torch.randn(256).to(torch.bfloat16)
    with torch.no_grad():
        ref = q(x)
        with torch.device("meta"):
            for _ in range(2):
                y = q(x)
                assert y.device.type == "cpu" and torch.equal(y, ref)
        x9 = x.reshape((1,) * 9 + (256,))
        for _ in range(2):
            assert q(x9).shape == (1,) * 9 + (128,) and torch.equal(q(x9).reshape(-1), ref)


def test_a_weight_pickled_without_decoders_loads_and_runs():
    # a module pickled whole by a version that had no decoders
    q = _layer_in("blocked", 4, False)
    x = torch.randn(1, 256).to(torch.bfloat16)
    with torch.no_grad():
        ref = q(x)
        del q._w.__dict__["_decoders"]
        state = q._w.__dict__.copy()
        q._w.__getstate__ = lambda: state  # what such a version pickled
        p = pickle.loads(pickle.dumps(q))
        assert torch.equal(p(x), ref) and torch.equal(p(x), ref)


@pytest.mark.parametrize("layout,bits", [("int8pack", 8), ("int4pack", 4)])
def test_vmap_of_single_rows_takes_the_ops(layout, bits):
    # torch.func's wrapped tensors have no storage: the decoders and the alignment check stay out of the way
    q = _layer_in(layout, bits, False)
    xs = torch.randn(3, 1, 256).to(torch.bfloat16)
    with torch.no_grad():
        q(xs[0])  # keeps a decoder
        y = torch.func.vmap(q)(xs)
        assert torch.equal(y, torch.stack([q(x) for x in xs]))


@pytest.mark.parametrize("layout,bits", DECODING)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 4])
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")  # torch.func's own
def test_forward_mode_ad_and_func_derivatives_are_those_of_f_linear(layout, bits, dtype, rows):
    """A dual input's tangent came back as zeros (the kernels carry none), and torch.func.grad failed on the
    blocked layout's autograd.Function: every derivative is now the one of F.linear on the dequantized weight."""
    import torch.autograd.forward_ad as fwAD

    q = _layer_in(layout, bits, True, dtype=dtype)
    w, b = q.dequantized_weight(dtype), q.bias.to(dtype)

    def ref(x):
        return torch.nn.functional.linear(x, w, b)

    torch.manual_seed(1)
    x, v = torch.randn(rows, 256, dtype=dtype), torch.randn(rows, 256, dtype=dtype)
    with torch.no_grad():
        y = q(x)  # keeps its decoder or route
    want = torch.func.jvp(ref, (x,), (v,))[1]
    assert torch.equal(torch.func.jvp(q, (x,), (v,))[1], want)
    with fwAD.dual_level():
        assert torch.equal(fwAD.unpack_dual(q(fwAD.make_dual(x, v))).tangent, want)
        with torch.no_grad():  # a plain input under an open level keeps the layer's own kernels
            assert torch.equal(q(x), q.forward(x.clone())) and torch.equal(q(x), y)
    assert torch.equal(torch.func.grad(lambda x: q(x).float().sum())(x),
                       torch.func.grad(lambda x: ref(x).float().sum())(x))
    assert torch.equal(torch.func.jacrev(q)(x[0]), torch.func.jacrev(ref)(x[0]))


@pytest.mark.parametrize("layout,bits", DECODING)
@pytest.mark.parametrize("rows", [1, 4])
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")  # torch.func's own
def test_func_grad_with_respect_to_a_bias_swapped_in_by_functional_call(layout, bits, rows):
    """x is a plain tensor and only the bias is torch.func's: the kernels ran on the plain x and wrote into a
    tensor made inside the transform, which has no storage ('Cannot access data pointer')."""
    q = _layer_in(layout, bits, True, dtype=torch.float32)
    w = q.dequantized_weight(torch.float32)
    torch.manual_seed(2)
    x, b, u = torch.randn(rows, 256), torch.randn(q.out_features), torch.randn(rows, q.out_features)
    with torch.no_grad():
        q(x)  # keeps its decoder or route

    def loss(bias, fn):
        return (fn(bias) * u).sum()

    got = torch.func.grad(loss)(b, lambda bias: torch.func.functional_call(q, {"bias": bias}, (x,)))
    want = torch.func.grad(loss)(b, lambda bias: torch.nn.functional.linear(x, w, bias))
    assert torch.allclose(got, want) and torch.allclose(got, u.sum(0))
    y = torch.func.functional_call(q, {"bias": b}, (x,))
    assert torch.allclose(y, torch.nn.functional.linear(x, w, b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout,bits", DECODING)
@pytest.mark.parametrize("rows", [1, 4])
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")  # torch.func's own
def test_func_grad_with_respect_to_the_scale_is_that_of_the_dequantized_weight(layout, bits, rows):
    """torch.func.grad with respect to a scale swapped in by functional_call came back as zeros: the kernels' ops
    carry no gradient for it. Now it is the gradient of F.linear on the weight dequantized from that scale."""
    q = _layer_in(layout, bits, True, dtype=torch.float32)
    b, spec, lay = q._w.buffers, q._w.spec, q._w.layout
    torch.manual_seed(3)
    x, u = torch.randn(rows, 256), torch.randn(rows, q.out_features)
    with torch.no_grad():
        q(x)  # keeps its decoder or route

    def loss(scale):
        return (torch.func.functional_call(q, {"scale": scale}, (x,)) * u).sum()

    s = b["scale"].detach().clone()
    got = torch.func.grad(loss)(s)
    sr = s.clone().requires_grad_()
    w = lay.dequantize(spec, b["qweight"], sr, b["zero_point"], torch.float32)
    (torch.nn.functional.linear(x, w, q.bias) * u).sum().backward()
    assert got.shape == s.shape and float(got.abs().sum()) > 0
    assert torch.allclose(got, sr.grad, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # and the layer itself is as it was
        assert torch.equal(q(x), q.forward(x.clone()))


@pytest.mark.parametrize("layout,bits", DECODING)
@pytest.mark.parametrize("rows", [1, 4])
def test_a_scale_that_requires_grad_gets_the_dequantized_weights_gradient(layout, bits, rows):
    """A scale set to require grad failed in the kernel ('Can't call numpy() on Tensor that requires grad'); one
    row took the decoder and recorded nothing. Both now give the gradient of F.linear on the dequantized weight."""
    q = _layer_in(layout, bits, True, dtype=torch.float32)
    b, spec, lay = q._w.buffers, q._w.spec, q._w.layout
    torch.manual_seed(4)
    x, u = torch.randn(rows, 256), torch.randn(rows, q.out_features)
    with torch.no_grad():
        y0 = q(x)  # keeps its decoder or route
    sr = b["scale"].detach().clone().requires_grad_()
    w = lay.dequantize(spec, b["qweight"], sr, b["zero_point"], torch.float32)
    (torch.nn.functional.linear(x, w, q.bias) * u).sum().backward()
    b["scale"].requires_grad_()
    try:
        y = q(x)
        (y * u).sum().backward()
        assert torch.allclose(y.detach(), y0, rtol=1e-5, atol=1e-5)
        assert torch.allclose(b["scale"].grad, sr.grad, rtol=1e-5, atol=1e-5)
        with torch.no_grad():  # no gradient asked for: the layer's own kernels again
            assert torch.equal(q(x), y0)
    finally:
        b["scale"].requires_grad_(False)
        b["scale"].grad = None


def test_jit_trace_of_a_single_row_records_the_op():
    # a traced call must record what computes, not the kernel's direct write into an empty tensor
    q = _layer_in("blocked", 4, True, dtype=torch.float32)
    x, x2 = torch.randn(1, 256), torch.randn(1, 256)
    with torch.no_grad():
        q(x)  # keeps a decoder
        traced = torch.jit.trace(q, x, check_trace=False)
        assert torch.equal(traced(x2), q(x2))


def test_int8pack_under_torch_compile_copies_a_misaligned_row():
    # the traced graph copies x before PyTorch's kernel (the eager backend runs that copy)
    q = _layer_in("int8pack", 8, False)
    c = torch.compile(q, backend="eager", fullgraph=True)
    buf = torch.randn(8192).to(torch.bfloat16)
    x = buf[8:8 + 256].view(1, 256)
    with torch.no_grad():
        assert torch.equal(c(x), q(x.clone()))


def test_functional_call_with_the_state_dict_names_the_buffers_form():
    """state_dict() holds the canonical form and the buffers the layout's: functional_call with it failed deep in
    a kernel ('not enough values to unpack', or an IndexError for one row)."""
    q = _layer_in("blocked", 8, True, dtype=torch.float32)
    for rows in (1, 4):
        x = torch.randn(rows, 256)
        q(x)  # keeps its decoder or route
        with pytest.raises(ValueError, match=r"buffer 'qweight' is int8 \[128, 256\], where the layer holds it as "
                                             r"int8 \[1, 256, 128\] \(the blocked layout\).*named_buffers\(\)"):
            torch.func.functional_call(q, q.state_dict(), (x,))
        assert torch.equal(torch.func.functional_call(q, dict(q.named_buffers()), (x,)), q(x))
