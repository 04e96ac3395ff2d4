"""qtorch on a CUDA device: every scheme's forward against F.linear(x, dequantized_weight()), quantizing a model
that lives on the GPU, save/load from it, moving layers between devices, and compiled inference (inductor's
Triton code, CUDA graphs). Skipped where torch sees no CUDA device; the CPU runs the same layers' other tests."""

import pytest
import torch
import torch.nn.functional as F

import qtorch
from qcore import PerChannel, PerGroup, QuantScheme

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")

SCHEMES = [
    QuantScheme(bits=8, symmetric=True, granularity=PerChannel(axis=0)),
    QuantScheme(bits=8, symmetric=False, granularity=PerGroup(64)),
    QuantScheme(bits=4, symmetric=False, granularity=PerGroup(128)),
    QuantScheme(bits=4, symmetric=True, granularity=PerGroup(32)),
    QuantScheme(bits=3, symmetric=False, granularity=PerGroup(64)),
    QuantScheme(bits=2, symmetric=False, granularity=PerGroup(64)),
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _tol(dtype):
    return {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}[dtype]


def _close(y, ref, dtype):
    scale = ref.float().abs().max().item() + 1e-6
    err = (y.float() - ref.float()).abs().max().item()
    assert err <= _tol(dtype) * scale, f"max error {err:.3g} against {scale:.3g}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: f"w{s.bits}-{'sym' if s.symmetric else 'asym'}")
@pytest.mark.parametrize("rows", [1, 7, 128])
def test_forward_matches_dequantized_linear(scheme, dtype, rows):
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 96, dtype=dtype, device="cuda")
    q = qtorch.QuantLinear.from_linear(lin, scheme)
    assert q.qweight.device.type == "cuda" and q.dtype == dtype
    x = torch.randn(rows, 256, dtype=dtype, device="cuda")
    with torch.no_grad():
        y = q(x)
        ref = F.linear(x, q.dequantized_weight(), q.bias)
    assert y.device.type == "cuda" and y.dtype == dtype and y.shape == (rows, 96)
    _close(y, ref, dtype)


def test_codes_are_the_same_on_both_devices():
    """Quantizing on the GPU and on the CPU gives the same codes and scales: the numerics are qcore's either way."""
    torch.manual_seed(1)
    lin = torch.nn.Linear(256, 64)
    scheme = QuantScheme(bits=4, symmetric=False, granularity=PerGroup(64))
    on_cpu = qtorch.QuantLinear.from_linear(lin, scheme)
    on_gpu = qtorch.QuantLinear.from_linear(lin.cuda(), scheme)
    cpu_sd, gpu_sd = on_cpu.state_dict(), on_gpu.state_dict()
    assert cpu_sd.keys() == gpu_sd.keys()
    for k in cpu_sd:
        assert torch.equal(cpu_sd[k], gpu_sd[k].cpu()), k


def test_quantize_model_on_gpu_keeps_lm_head_and_device():
    torch.manual_seed(2)
    model = torch.nn.Sequential()
    model.add_module("fc", torch.nn.Linear(128, 256))
    model.add_module("act", torch.nn.GELU())
    model.add_module("lm_head", torch.nn.Linear(256, 50))
    model = model.to("cuda", torch.bfloat16)
    x = torch.randn(4, 128, dtype=torch.bfloat16, device="cuda")
    with torch.no_grad():
        dense = model(x)
    report = qtorch.quantize_model(model, "w4a16-g64")
    assert type(model.fc).__name__ == "QuantLinear" and isinstance(model.lm_head, torch.nn.Linear)
    assert len(report.quantized) == 1
    assert all(t.device.type == "cuda" for t in model.state_dict().values())
    with torch.no_grad():
        y = model(x)
    assert y.device.type == "cuda"
    assert (y.float() - dense.float()).abs().max() < 0.25 * dense.float().abs().max()


def _mlp():
    return torch.nn.Sequential(torch.nn.Linear(128, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32))


def test_save_from_gpu_load_on_either_device(tmp_path):
    """A model saved from the GPU loads into a CPU model, and into a skeleton on ``meta`` placed on the GPU
    (``device=`` places what was on ``meta``; a built model keeps its device)."""
    torch.manual_seed(3)
    model = _mlp().cuda()
    qtorch.quantize_model(model, "w8a16", exclude=())
    path = tmp_path / "m.safetensors"
    qtorch.save_quantized(model, path)
    x = torch.randn(3, 128, device="cuda")
    with torch.no_grad():
        want = model(x)
    on_cpu = _mlp()
    qtorch.load_quantized(on_cpu, path)
    with qtorch.empty_weights():
        skeleton = _mlp()
    on_gpu = qtorch.load_quantized(skeleton, path, device="cuda")
    for device, fresh in (("cpu", on_cpu), ("cuda", on_gpu)):
        assert type(fresh[0]).__name__ == "QuantLinear"
        assert all(t.device.type == device for t in fresh.state_dict().values()), device
        with torch.no_grad():
            got = fresh(x.to(device))
        torch.testing.assert_close(got.cpu(), want.cpu(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("layer", ["W8A16Linear", "W4A16Linear"])
def test_moving_between_devices_keeps_every_tensor(layer):
    q = getattr(qtorch, layer).from_linear(torch.nn.Linear(256, 48))
    before = {k: v.clone() for k, v in q.state_dict().items()}
    x = torch.randn(2, 256)
    with torch.no_grad():
        y_cpu = q(x)
        y_gpu = q.cuda()(x.cuda())
    torch.testing.assert_close(y_gpu.cpu(), y_cpu, rtol=1e-4, atol=1e-5)
    q.cpu()
    after = q.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


@pytest.mark.parametrize("layer", ["W8A16Linear", "W4A16Linear"])
def test_memory_on_gpu_is_the_packed_size(layer):
    q = getattr(qtorch, layer).from_linear(torch.nn.Linear(1024, 512, dtype=torch.float16)).cuda()
    assert q.qweight.device.type == "cuda"
    bits = 8 if layer == "W8A16Linear" else 4
    assert q.qweight.numel() * q.qweight.element_size() == 1024 * 512 * bits // 8


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("preset", ["w8a16", "w4a16"])
def test_compiled_on_gpu_matches_eager(preset, dtype):
    torch.manual_seed(4)
    model = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.SiLU(), torch.nn.Linear(1024, 256))
    model = model.to("cuda", dtype)
    qtorch.quantize_model(model, preset, exclude=())
    x = torch.randn(8, 512, dtype=dtype, device="cuda")
    with torch.no_grad():
        eager = model(x)
        compiled = qtorch.compile(model, autotune=False)
        for _ in range(3):  # CUDA graphs record on a later call; every call must give the same answer
            got = compiled(x)
            _close(got, eager, dtype)


def test_torch_compile_fullgraph_on_gpu():
    """No graph breaks: the CUDA forward is plain torch ops that inductor fuses."""
    torch.manual_seed(5)
    q = qtorch.W4A16Linear.from_linear(torch.nn.Linear(512, 256, dtype=torch.bfloat16, device="cuda"))
    x = torch.randn(4, 512, dtype=torch.bfloat16, device="cuda")
    with torch.no_grad():
        want = q(x)
        got = torch.compile(q, fullgraph=True)(x)
    _close(got, want, torch.bfloat16)


@pytest.mark.parametrize("layer", ["W8A16Linear", "W4A16Linear"])
def test_an_eager_call_never_waits_for_the_gpu_after_the_first(layer):
    """Whether the scales keep every dequantized value inside bfloat16's range is read on the host once per weight
    (qtorch.layouts.codec.fits), not on every call: later calls queue their work without a sync."""
    q = getattr(qtorch, layer).from_linear(torch.nn.Linear(256, 128, dtype=torch.bfloat16, device="cuda"))
    x = torch.randn(4, 256, dtype=torch.bfloat16, device="cuda")
    with torch.no_grad():
        first = q(x)
        torch.cuda.set_sync_debug_mode("error")
        try:
            again = q(x)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    assert torch.equal(first, again)
