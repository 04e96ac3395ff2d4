"""Ragged last groups in qtorch: every layout serves them or is ineligible, every path of the layers that hold them
equals ``F.linear(x, dequantized_weight())``, quantize_model takes the default ``w4a16`` on in_features 576."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import qcore
import qtorch
from qcore import PerGroup, QuantScheme
from qtorch import layouts
from qtorch.dequant_mm import WeightSpec as MMSpec
from qtorch.dequant_mm import dequant_linear
from qtorch.layouts.base import WeightSpec


def _qa(n, k, scheme, seed=0):
    w = np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32)
    return qcore.quantize(w, scheme)


SCHEMES = [QuantScheme(4, False, PerGroup(128)), QuantScheme(4, True, PerGroup(32)),
           QuantScheme(8, True, PerGroup(64)), QuantScheme(3, False, PerGroup(16)),
           QuantScheme(4, False, PerGroup(5, axis=0))]


@pytest.mark.parametrize("scheme", SCHEMES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_eligible_layout_and_path_equals_dense(scheme, dtype):
    n, k = 48, 200  # 200 = 128 + 72, 6 * 32 + 8, 3 * 64 + 8, 12 * 16 + 8; 48 = 9 * 5 + 3
    qa = _qa(n, k, scheme)
    want_w = torch.from_numpy(qcore.dequantize(qa))
    spec = WeightSpec.of(scheme, n, k)
    names = [lay.name for lay in layouts.eligible(spec, "cpu", dtype)]
    # the tiled layouts complete the last group (codes that dequantize to 0, x padded with zeros)
    assert ("int4pack" in names) == (dtype == torch.bfloat16 and scheme.bits == 4 and spec.axis == 1
                                     and spec.group in (32, 64, 128, 256)), names
    assert ("blocked" in names) == (spec.axis == 1), names  # 3 bits too, in 4-bit containers
    q0, s0, z0 = qtorch.QuantLinear.from_quantized_array(qa, dtype=dtype)._w.canonical()
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    for name in names:
        layer = qtorch.QuantLinear.from_quantized_array(qa, dtype=dtype)
        if not layer._w.hold_layout(name, dtype):
            continue
        torch.testing.assert_close(layer.dequantized_weight(torch.float32), want_w, rtol=0, atol=0)
        for got, ref in zip(layer._w.canonical(), (q0, s0, z0)):  # the state_dict never sees the completion
            assert (got is None and ref is None) or torch.equal(got, ref), name
        w_, lay = layer._w, layer._w.layout
        for rows in (1, 5, 40):  # the one-row kernel, the small-batch ones, bfloat16's dequantized AMX panels
            x = torch.randn(rows, k).to(dtype)
            want = F.linear(x.float(), layer.dequantized_weight(torch.float32))
            for path in lay.paths("cpu", dtype, rows, scheme.bits, spec=spec):
                got = lay.linear(w_, x, path).float()
                torch.testing.assert_close(got, want, rtol=tol, atol=tol * float(want.abs().max()),
                                           msg=f"{name}/{path} at {rows} rows")
            torch.testing.assert_close(layer(x).float(), want, rtol=tol, atol=tol * float(want.abs().max()))


@pytest.mark.parametrize("scheme", SCHEMES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequant_mm_serves_ragged_groups_exactly(scheme, dtype):
    n, k = 40, 100
    qa = _qa(n, k, scheme, seed=1)
    layer = qtorch.QuantLinear.from_quantized_array(qa)
    q, s, z = layer._w.canonical()
    spec = MMSpec.from_scheme(scheme, n, k)
    w = torch.from_numpy(qcore.dequantize(qa))
    torch.testing.assert_close(qtorch.dequant_mm.dequantize(q, s, z, spec, dtype), w.to(dtype), rtol=0, atol=0)
    x = torch.randn(7, k).to(dtype)
    for block_rows in (0, 16):
        got = dequant_linear(x, q, s, z, spec, block_rows=block_rows)
        tol = 1e-5 if dtype == torch.float32 else 3e-2
        torch.testing.assert_close(got.float(), F.linear(x.float(), w.to(dtype).float()), rtol=tol,
                                   atol=tol * float(w.abs().max()) * 10)


def test_ragged_layer_save_load_round_trip(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(100, 24), torch.nn.ReLU(), torch.nn.Linear(24, 8))
    qtorch.quantize_model(model, "w4a16-g32", exclude=())
    assert model[0].scale.shape == (24, 4)  # 3 groups of 32 and one of 4
    x = torch.randn(3, 100)
    y = model(x)
    path = tmp_path / "m.safetensors"
    qtorch.save_quantized(model, path)
    fresh = torch.nn.Sequential(torch.nn.Linear(100, 24), torch.nn.ReLU(), torch.nn.Linear(24, 8))
    qtorch.load_quantized(fresh, path)
    torch.testing.assert_close(fresh[0].dequantized_weight(), model[0].dequantized_weight(), rtol=0, atol=0)
    torch.testing.assert_close(fresh(x), y, rtol=0, atol=0)


def _tiny_llama(hidden=576):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=192, num_hidden_layers=1,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=32)
    return LlamaForCausalLM(cfg).eval()


def test_quantize_model_default_w4a16_on_hidden_576():
    """SmolLM2's width: every Linear takes w4a16 (g128), 576 = 4 * 128 + 64; the logits follow the dequantized
    weights."""
    model = _tiny_llama()
    ids = torch.tensor([[1, 5, 9, 3]])
    report = qtorch.quantize_model(model, "w4a16")
    quantized = [m for m in model.modules() if isinstance(m, qtorch.QuantLinear)]
    assert len(quantized) == 7, report  # q, k, v, o, gate, up, down (lm_head excluded by default)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert q_proj.state_dict()["scale"].shape == (576, 5)
    # served by qtorch's kernels (the layout completes the last group), not by dequantizing the weight per call
    assert q_proj.quantized_weight.layout.name == "blocked"
    with torch.no_grad():
        logits = model(ids).logits
        dense = _tiny_llama()
        for name, m in model.named_modules():
            if isinstance(m, qtorch.QuantLinear):
                dense.get_submodule(name).weight.copy_(m.dequantized_weight())
        torch.testing.assert_close(logits, dense(ids).logits, rtol=1e-4, atol=1e-4)


def test_qtorch_quantize_cli_w4a16_on_hidden_576(tmp_path, capsys):
    import transformers

    from qtorch.cli import main
    from tests.qtorch.model_folders import VOCAB, add_tokenizer

    src = tmp_path / "src"
    cfg = transformers.LlamaConfig(hidden_size=576, intermediate_size=192, num_hidden_layers=1, num_attention_heads=9,
                                   num_key_value_heads=3, vocab_size=VOCAB, max_position_embeddings=64,
                                   bos_token_id=101, eos_token_id=102, pad_token_id=0, tie_word_embeddings=False,
                                   architectures=["LlamaForCausalLM"])
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(src)
    add_tokenizer(src)
    out = tmp_path / "out"
    assert main(["quantize", str(src), "--scheme", "w4a16", "-o", str(out), "--rounds", "1"]) == 0
    assert "incompatible" not in capsys.readouterr().out
    tensors = qcore.checkpoint.load(out)
    qa = tensors["model.layers.0.mlp.up_proj.weight"]
    assert qa.scheme == QuantScheme(4, False, PerGroup(128)) and qa.scale.shape == (192, 5)
    assert sum(isinstance(v, qcore.QuantizedArray) for v in tensors.values()) == 7
    model = qtorch.from_pretrained(out)
    assert sum(isinstance(m, qtorch.QuantLinear) for m in model.modules()) == 7


# ----------------------------------------------------------------------------------------------------------------
# compressed-tensors: ceil(K / g) groups, as the package allocates them
# ----------------------------------------------------------------------------------------------------------------

def _ct_llama(folder):
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=160, intermediate_size=200, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                   tie_word_embeddings=False, architectures=["LlamaForCausalLM"])
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).eval().save_pretrained(folder)
    return str(folder)


CT_IDS = torch.tensor([[1, 5, 9, 33, 70, 2]])


def _ct_export(tmp_path, scheme):
    import transformers

    from qtorch.pretrained import save_folder

    src = _ct_llama(tmp_path / "src")
    model = transformers.LlamaForCausalLM.from_pretrained(src).eval()
    qtorch.quantize_model(model, scheme)
    out = tmp_path / "ct"
    save_folder(model, src, str(out), format="compressed-tensors")
    return src, model, out


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_compressed_tensors_export_of_ragged_groups_has_the_packages_shapes(tmp_path, symmetric):
    """in_features 160 and 200 in groups of 64: 3 and 4 groups, the scale shapes compressed-tensors itself
    allocates for these layers (``initialize_module_for_quantization``); qtorch reads the folder back exactly."""
    ct = pytest.importorskip("compressed_tensors")
    import transformers
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig, QuantizationScheme,
                                                 apply_quantization_config)

    from qcore import checkpoint as ck

    src, model, out = _ct_export(tmp_path, QuantScheme(4, symmetric, PerGroup(64)))
    ours = ck._read_tensors(ck.read_header(str(out / "model.safetensors")))
    theirs = transformers.LlamaForCausalLM.from_pretrained(src).eval()
    args = QuantizationArgs(num_bits=4, type="int", symmetric=symmetric, strategy="group", group_size=64)
    apply_quantization_config(theirs, QuantizationConfig(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=args)}, ignore=["lm_head"],
        format="pack-quantized"))
    for name in ("self_attn.q_proj", "mlp.down_proj"):
        m = theirs.model.layers[0].get_submodule(name)
        key = f"model.layers.0.{name}.weight_scale"
        assert tuple(ours[key].shape) == tuple(m.weight_scale.shape) == (m.weight.shape[0],
                                                                         -(-m.weight.shape[1] // 64)), key
    assert ct.__version__  # the package whose layout the shapes above come from
    back = qtorch.from_pretrained(str(out))
    with torch.no_grad():
        assert torch.equal(back(CT_IDS).logits, model(CT_IDS).logits)
    a, b = model.model.layers[0].mlp.down_proj, back.model.layers[0].mlp.down_proj
    assert torch.equal(a.dequantized_weight(), b.dequantized_weight())


@pytest.mark.xfail(strict=True, raises=ValueError,
                   reason="compressed-tensors 0.20's dequantize (_process_group) refuses a column count that the "
                          "group size does not divide, although it allocates ceil(K / g) scales for such layers; "
                          "transformers decompresses through it. Strict: when a release dequantizes ragged groups, "
                          "this test fails and the limitation note goes")
def test_ragged_symmetric_folder_loads_in_transformers(tmp_path):
    pytest.importorskip("compressed_tensors")
    import transformers

    _, model, out = _ct_export(tmp_path, QuantScheme(4, True, PerGroup(64)))
    try:
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    except ValueError as e:  # only the known refusal counts as the expected failure
        assert "divisble by the given group_size" in str(e) or "divisible by the given group_size" in str(e)
        raise
    with torch.no_grad():
        ref = model(CT_IDS).logits
        assert (hf(CT_IDS).logits - ref).abs().max() <= 1e-5 * ref.abs().max()


@pytest.mark.parametrize("name", ["blocked", "int4pack"])
def test_ragged_tiled_layouts_give_the_input_gradient(name):
    """x is padded to whole groups inside the forward; its gradient comes back at in_features columns."""
    qa = _qa(32, 200, QuantScheme(4, False, PerGroup(64)), seed=3)
    layer = qtorch.QuantLinear.from_quantized_array(qa, dtype=torch.bfloat16)
    assert layer._w.hold_layout(name, torch.bfloat16)
    x = torch.randn(3, 200, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(3, 32, dtype=torch.bfloat16)
    layer(x).backward(g)
    w = torch.from_numpy(qcore.dequantize(qa))
    assert x.grad.shape == x.shape
    torch.testing.assert_close(x.grad.float(), g.float() @ w, rtol=3e-2, atol=3e-2 * float((g.float() @ w).abs().max()))
