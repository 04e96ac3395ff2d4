"""qtorch.save_quantized / load_quantized: exact round trips, meta-device models, tied weights, bad checkpoints."""

import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from torch import nn

import qcore
import qtorch
from qcore import PerGroup, QuantScheme


class Net(nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.embed = nn.Embedding(50, 64, dtype=dtype)
        self.fc1 = nn.Linear(64, 128, dtype=dtype)
        self.fc2 = nn.Linear(128, 64, bias=False, dtype=dtype)
        self.norm = nn.LayerNorm(64, dtype=dtype)
        self.lm_head = nn.Linear(64, 50, bias=False, dtype=dtype)
        self.lm_head.weight = self.embed.weight  # tied, as in many language models
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))

    def forward(self, ids):
        h = self.embed(ids)
        h = self.norm(h + self.fc2(torch.relu(self.fc1(h))))
        return self.lm_head(h)


def _quantized_net(dtype=torch.float32, scheme=None):
    torch.manual_seed(0)
    net = Net(dtype)
    mixed = scheme or {"fc1": QuantScheme(4, False, PerGroup(32)), "*": "w8a16"}
    qtorch.quantize_model(net, mixed, exclude=("lm_head",))
    return net


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_is_exact_into_a_usual_and_an_empty_model(tmp_path, dtype):
    net = _quantized_net(dtype)
    path = tmp_path / "net.safetensors"
    qtorch.save_quantized(net, path)
    ids = torch.randint(0, 50, (3, 7))
    want = net(ids)

    torch.manual_seed(123)
    usual = Net(dtype)  # different random weights: everything must come from the file
    qtorch.load_quantized(usual, path)
    assert isinstance(usual.fc1, qtorch.QuantLinear) and usual.fc1.scheme.bits == 4
    assert isinstance(usual.lm_head, nn.Linear) and not isinstance(usual.lm_head, qtorch.QuantLinear)
    assert torch.equal(usual(ids), want)

    with qtorch.empty_weights():
        empty = Net(dtype)
    assert empty.fc1.weight.device.type == "meta"
    qtorch.load_quantized(empty, path)
    assert torch.equal(empty(ids), want)
    assert empty.lm_head.weight is empty.embed.weight  # still tied after loading onto meta
    assert usual.fc1.dtype == dtype and empty.fc2.dtype == dtype


def test_load_quantized_takes_a_compute_dtype_for_every_quantized_layer(tmp_path):
    net = _quantized_net(torch.float32)
    path = tmp_path / "net.safetensors"
    qtorch.save_quantized(net, path)
    ids = torch.randint(0, 50, (3, 7))
    with qtorch.empty_weights():
        empty = Net(torch.bfloat16)
    qtorch.load_quantized(empty, path, dtype=torch.bfloat16)  # saved computing in float32
    quantized = [m for m in empty.modules() if isinstance(m, qtorch.QuantLinear)]
    assert quantized and all(m.compute_dtype == torch.bfloat16 for m in quantized)
    with torch.no_grad():
        assert torch.equal(empty(ids), net.to(torch.bfloat16)(ids))
    with pytest.raises(TypeError, match=r"dtype must be torch.float32, torch.float16 or torch.bfloat16, got "
                                        r"torch.int8"):
        qtorch.load_quantized(Net(torch.float32), path, dtype=torch.int8)


def test_checkpoint_reads_without_torch_as_qcore_tensors(tmp_path):
    net = _quantized_net()
    path = tmp_path / "net.safetensors"
    qtorch.save_quantized(net, path)
    loaded = qcore.checkpoint.load(str(path))
    qa = loaded["fc1.weight"]
    assert isinstance(qa, qcore.QuantizedArray) and qa.scheme == QuantScheme(4, False, PerGroup(32))
    np.testing.assert_array_equal(qcore.dequantize(qa), net.fc1.dequantized_weight(torch.float32).numpy())
    assert loaded["fc1.bias"].dtype == np.float32 and loaded["embed.weight"].shape == (50, 64)


def test_bad_loads_list_every_problem_and_change_nothing(tmp_path):
    net = _quantized_net()
    path = tmp_path / "net.safetensors"
    qtorch.save_quantized(net, path)

    class Wrong(Net):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(64, 96)  # shape differs
            self.fc2 = nn.Conv1d(128, 64, 1)  # not a Linear
            self.extra = nn.Linear(4, 4)  # not in the checkpoint

    wrong = Wrong()
    before = {k: v.clone() for k, v in wrong.state_dict().items()}
    with pytest.raises(ValueError) as e:
        qtorch.load_quantized(wrong, path)
    msg = str(e.value)
    assert "the model was not changed" in msg
    assert "fc1.weight: checkpoint shape [128, 64], model expects [96, 64]" in msg
    assert "fc2.weight: quantized tensor for fc2 (Conv1d is not a Linear)" in msg
    assert "extra.weight: missing from the checkpoint" in msg and "extra.bias: missing" in msg
    assert type(wrong.fc1) is nn.Linear and type(wrong.fc2) is nn.Conv1d
    for k, v in wrong.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_unexpected_keys_and_non_strict(tmp_path):
    net = _quantized_net()
    path = tmp_path / "net.safetensors"
    qtorch.save_quantized(net, path)

    class Smaller(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(64, 128)
            self.other = nn.Linear(2, 2)

    with pytest.raises(ValueError, match="embed.weight: unexpected key"):
        qtorch.load_quantized(Smaller(), path)

    class Larger(Net):
        def __init__(self):
            super().__init__()
            self.extra = nn.Linear(4, 4)

    larger = qtorch.load_quantized(Larger(), path, strict=False)  # extra keeps its own weights
    assert isinstance(larger.fc1, qtorch.QuantLinear)
    with qtorch.empty_weights():
        meta = Larger()
    with pytest.raises(ValueError, match="extra.weight: on the meta device and not in the checkpoint"):
        qtorch.load_quantized(meta, path, strict=False)


def test_saving_refuses_meta_tensors_and_bad_arguments(tmp_path):
    with qtorch.empty_weights():
        net = Net()
    with pytest.raises(ValueError, match="embed.weight is on the meta device"):
        qtorch.save_quantized(net, tmp_path / "x.safetensors")
    assert not os.listdir(tmp_path)  # nothing written, not even a temporary file
    with pytest.raises(TypeError, match="nn.Module"):
        qtorch.save_quantized({"a": 1}, tmp_path / "x.safetensors")
    with pytest.raises(TypeError, match="nn.Module"):
        qtorch.load_quantized(object(), tmp_path / "x.safetensors")


def test_pickle_checkpoints_are_refused(tmp_path):
    p = tmp_path / "pytorch_model.bin"
    torch.save({"fc1.weight": torch.zeros(2, 2)}, p)
    with pytest.raises(ValueError, match="pickle"):
        qtorch.load_quantized(Net(), p)


def test_qcore_quantize_output_loads_into_the_transformers_model(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=120, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, max_position_embeddings=32)
    torch.manual_seed(0)
    dense = transformers.BertModel(cfg).eval()
    src = tmp_path / "dense"
    dense.save_pretrained(src, safe_serialization=True)
    out = tmp_path / "q8"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    run = subprocess.run([sys.executable, "-m", "qcore", "quantize", str(src), str(out), "--quiet"],
                         capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    with qtorch.empty_weights():
        q = transformers.BertModel(cfg).eval()
    qtorch.load_quantized(q, out)
    n_quant = sum(isinstance(m, qtorch.QuantLinear) for m in q.modules())
    assert n_quant == 2 * 6 + 1  # q, k, v, attn out, intermediate, output per layer, and the pooler
    ids = torch.randint(0, 120, (2, 9))
    a, b = dense(ids).last_hidden_state, q(ids).last_hidden_state
    cos = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)
    assert cos > 0.999


# ------------------------------------------------------------------------------------------------------------------
# GPT-2 style Conv1D layers (weight stored [in, out]): qtorch files and `qcore quantize` files both load
# ------------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=100, n_embd=64, n_layer=2, n_head=4, n_positions=32,
                                  bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    dense = transformers.GPT2LMHeadModel(cfg).eval()
    folder = tmp_path_factory.mktemp("gpt2") / "dense"
    dense.save_pretrained(folder)
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    return transformers, cfg, dense, folder, ids


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_gpt2_conv1d_round_trip_is_exact_into_a_usual_and_an_empty_model(tiny_gpt2, tmp_path):
    transformers, cfg, dense, _, ids = tiny_gpt2
    q = transformers.GPT2LMHeadModel(cfg).eval()
    q.load_state_dict(dense.state_dict())
    report = qtorch.quantize_model(q, "w8a16")
    assert report.counts()["quantized"] == 8  # c_attn, attn c_proj (square 64x64), c_fc, mlp c_proj per layer
    want = _logits(q, ids)
    path = tmp_path / "gpt2.safetensors"
    qtorch.save_quantized(q, path)
    layout = json.loads(qcore.checkpoint.read_header(str(path)).metadata["qtorch.layout"])
    assert layout["transformer.h.0.attn.c_proj"] == "out_in" and len(layout) == 8

    torch.manual_seed(5)
    usual = transformers.GPT2LMHeadModel(cfg).eval()
    qtorch.load_quantized(usual, path)
    with qtorch.empty_weights():
        empty = transformers.GPT2LMHeadModel(cfg).eval()
    qtorch.load_quantized(empty, path)
    for m in (usual, empty):
        layer = m.transformer.h[1].attn.c_attn
        assert isinstance(layer, qtorch.QuantLinear) and (layer.in_features, layer.out_features) == (64, 192)
        assert torch.equal(_logits(m, ids), want)


def test_gpt2_file_from_an_earlier_save_without_layout_metadata_still_loads(tiny_gpt2, tmp_path):
    transformers, cfg, dense, _, ids = tiny_gpt2
    q = transformers.GPT2LMHeadModel(cfg).eval()
    q.load_state_dict(dense.state_dict())
    qtorch.quantize_model(q, "w8a16")
    path = tmp_path / "gpt2.safetensors"
    qtorch.save_quantized(q, path)
    md = qcore.checkpoint.read_header(str(path)).metadata
    old = tmp_path / "old.safetensors"  # what save_quantized wrote before: the compute dtypes only
    qcore.checkpoint.save(str(old), qcore.checkpoint.load(str(path)),
                          metadata={"qtorch.compute_dtypes": md["qtorch.compute_dtypes"]})
    with qtorch.empty_weights():
        empty = transformers.GPT2LMHeadModel(cfg).eval()
    qtorch.load_quantized(empty, old)
    assert torch.equal(_logits(empty, ids), _logits(q, ids))


def test_qcore_quantize_of_a_gpt2_checkpoint_loads_into_the_transformers_model(tiny_gpt2, tmp_path):
    transformers, cfg, dense, src, ids = tiny_gpt2
    out = tmp_path / "q8"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    run = subprocess.run([sys.executable, "-m", "qcore", "quantize", str(src), str(out), "--quiet"],
                         capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    ref = _logits(dense, ids)
    for build_empty in (False, True):
        if build_empty:
            with qtorch.empty_weights():
                m = transformers.GPT2LMHeadModel(cfg).eval()
        else:
            m = transformers.GPT2LMHeadModel(cfg).eval()
        qtorch.load_quantized(m, out)
        layer = m.transformer.h[0].mlp.c_fc  # stored [in=64, out=256], per input feature (PerChannel(0))
        assert isinstance(layer, qtorch.QuantLinear) and (layer.in_features, layer.out_features) == (64, 256)
        assert layer.scheme.granularity == qcore.PerChannel(1)
        assert sum(isinstance(x, qtorch.QuantLinear) for x in m.modules()) == 8
        cos = torch.nn.functional.cosine_similarity(_logits(m, ids).flatten(), ref.flatten(), dim=0)
        assert cos > 0.999


def test_qcore_quantize_gpt2_with_groups_loads_transposed_groups(tiny_gpt2, tmp_path):
    from qcore.cli import quantize_checkpoint

    transformers, cfg, dense, src, ids = tiny_gpt2
    out = tmp_path / "q4"
    quantize_checkpoint(str(src), str(out), bits=4, symmetric=False, group_size=32)
    stored = qcore.checkpoint.load(str(out))["transformer.h.0.attn.c_attn.weight"]
    assert stored.shape == (64, 192) and stored.scheme.granularity == PerGroup(32)
    with qtorch.empty_weights():
        m = transformers.GPT2LMHeadModel(cfg).eval()
    qtorch.load_quantized(m, out)
    layer = m.transformer.h[0].attn.c_attn
    assert layer.scheme.granularity == PerGroup(32, 0)
    np.testing.assert_array_equal(layer.dequantized_weight(torch.float32).numpy(), qcore.dequantize(stored).T)
    cos = torch.nn.functional.cosine_similarity(_logits(m, ids).flatten(), _logits(dense, ids).flatten(), dim=0)
    assert cos > 0.99


@pytest.mark.parametrize("scheme", [
    QuantScheme(8, True, qcore.PerTensor()), QuantScheme(8, True, qcore.PerChannel(0)),
    QuantScheme(8, False, qcore.PerChannel(1)), QuantScheme(4, False, PerGroup(2)),
    QuantScheme(4, True, PerGroup(4, 0)), QuantScheme(3, False, PerGroup(3, -1)),
    QuantScheme(2, False, qcore.PerChannel(-1)),
])
def test_transpose_quantized_is_exact(scheme):
    from qtorch.serialization import transpose_quantized

    w = np.random.default_rng(3).standard_normal((12, 6)).astype(np.float32)
    qa = qcore.quantize(w, scheme)
    t = transpose_quantized(qa)
    assert t.shape == (6, 12) and t.scheme.bits == scheme.bits and t.scheme.symmetric == scheme.symmetric
    np.testing.assert_array_equal(qcore.dequantize(t), qcore.dequantize(qa).T)
    np.testing.assert_array_equal(t.packed(), qcore.QuantizedArray.from_parts(
        np.ascontiguousarray(qa.codes.T), t.scale, t.zero_point, t.scheme).packed())
    back = transpose_quantized(t)
    np.testing.assert_array_equal(qcore.dequantize(back), qcore.dequantize(qa))
    # and a QuantLinear built from it computes with exactly that weight
    q = qtorch.QuantLinear(12, 6, bias=False, scheme=t.scheme)
    state = {"qweight": torch.from_numpy(qcore.checkpoint.encode_qweight(t)), "scale": torch.from_numpy(t.scale)}
    if t.zero_point is not None:
        state["zero_point"] = torch.from_numpy(t.zero_point)
    q.load_state_dict(state)
    np.testing.assert_array_equal(q.dequantized_weight(torch.float32).numpy(), qcore.dequantize(qa).T)


# ------------------------------------------------------------------------------------------------------------------
# strict=False and a bias the file lacks
# ------------------------------------------------------------------------------------------------------------------

def test_non_strict_load_keeps_a_real_bias_the_file_lacks_and_reports_a_meta_one(tmp_path):
    net = _quantized_net()
    path = tmp_path / "net.safetensors"
    qtorch.save_quantized(net, path)
    tensors = qcore.checkpoint.load(str(path))
    del tensors["fc1.bias"]
    md = qcore.checkpoint.read_header(str(path)).metadata
    nobias = tmp_path / "nobias.safetensors"
    qcore.checkpoint.save(str(nobias), tensors, metadata={k: v for k, v in md.items() if not k.startswith("qcore.")})

    with pytest.raises(ValueError, match="fc1.bias: missing from the checkpoint"):
        qtorch.load_quantized(Net(), nobias)
    usual = Net()
    own = usual.fc1.bias.detach().clone()
    qtorch.load_quantized(usual, nobias, strict=False)
    assert isinstance(usual.fc1, qtorch.QuantLinear) and torch.equal(usual.fc1.bias, own)
    np.testing.assert_array_equal(usual.fc1.dequantized_weight(torch.float32).numpy(),
                                  net.fc1.dequantized_weight(torch.float32).numpy())

    with qtorch.empty_weights():
        meta = Net()
    with pytest.raises(ValueError, match="fc1.bias: on the meta device and not in the checkpoint") as e:
        qtorch.load_quantized(meta, nobias, strict=False)
    assert "the model was not changed" in str(e.value) and type(meta.fc1) is nn.Linear


def _load_in_thread(model, path, seconds=20):
    """load_quantized(model, path) in a thread: the exception it raised, or "blocked" after ``seconds`` (a hang
    guard, not a timing assertion: a FIFO blocks forever)."""
    out = []

    def run():
        try:
            qtorch.load_quantized(model, path)
            out.append(None)
        except Exception as e:  # noqa: BLE001 - handed to the test
            out.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():  # release the blocked reader: a writer opens and closes the FIFO
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        t.join(seconds)
        return "blocked"
    return out[0]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_fifos_and_devices_are_refused_before_opening(tmp_path):
    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)
    err = _load_in_thread(Net(), fifo)
    assert isinstance(err, ValueError) and f"{fifo}: is a FIFO" in str(err), err
    with pytest.raises(ValueError, match="is a character device"):
        qtorch.load_quantized(Net(), os.devnull)
    # saving never renames a file over one either
    with pytest.raises(ValueError, match=r"is a FIFO, not a regular file or a folder; refusing to write over it"):
        qtorch.save_quantized(_quantized_net(), fifo)
    assert os.path.exists(fifo) and sorted(os.listdir(tmp_path)) == ["model.safetensors"]


@pytest.mark.parametrize("build", ["usual", "empty_weights", "meta"])
def test_loaded_layers_hold_the_layout_they_build_themselves(tmp_path, build, torch_pack_kernels):
    net = _quantized_net(torch.bfloat16, scheme="w8a16")  # bf16 8-bit per channel: PyTorch's int8pack kernel
    path = tmp_path / "net.safetensors"
    qtorch.save_quantized(net, path)
    if build == "usual":
        fresh = Net(torch.bfloat16)
    elif build == "empty_weights":
        with qtorch.empty_weights():
            fresh = Net(torch.bfloat16)
    else:
        with torch.device("meta"):
            fresh = Net(torch.bfloat16)
    qtorch.load_quantized(fresh, path)
    for name, m in fresh.named_modules():
        if isinstance(m, qtorch.QuantLinear):
            ref = net.get_submodule(name)
            assert m.weight_layout == ref.weight_layout
            for key, t in ref._buffers.items():
                if t is not None:
                    assert m._buffers[key].stride() == t.stride() and m._buffers[key].is_contiguous(), (name, key)
    ids = torch.randint(0, 50, (3, 7))
    assert torch.equal(fresh(ids), net(ids))


def _conversions(fn):
    """Calls of the codec functions (qcore's pack / unpack, qtorch's torch ones) made by ``fn()``, by name."""
    import qcore.packing
    from qtorch.layouts import blocked, codec, int4pack
    # the functions themselves, by code object: a method of another class may share a name (Operands.pack)
    funcs = [qcore.packing.pack, qcore.packing.unpack, codec.pack_codes, codec.unpack_codes,
             int4pack.int4pack_unpack, blocked.from_blocked, blocked.to_blocked]
    codes = {f.__code__: f.__name__ for f in funcs}
    seen = {}

    def profile(frame, event, arg):
        name = codes.get(frame.f_code) if event == "call" else None
        if name is not None:
            seen[name] = seen.get(name, 0) + 1

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return seen


def _w4_model(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(256, 256, dtype=dtype) for _ in range(3)])
    qtorch.quantize_model(model, "w4a16", exclude=())
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_saving_converts_each_4bit_weight_once(tmp_path, dtype, monkeypatch):
    # the blocked layout (float32) and PyTorch's int4pack one (bfloat16, where its kernel is preferred) are read
    # once into codes, which the file writer packs once; no canonical copy is packed or unpacked on the way
    import qtorch.layouts
    monkeypatch.setattr(qtorch.layouts, "TORCH_PACK_KERNELS", True, raising=False)
    model = _w4_model(dtype)
    layout = "int4pack" if dtype == torch.bfloat16 else "blocked"
    assert all(m.weight_layout == layout for m in model)
    path = tmp_path / "m.safetensors"
    seen = _conversions(lambda: qtorch.save_quantized(model, path))
    want = {"pack": 3} if layout == "blocked" else {"pack": 3, "int4pack_unpack": 3}
    assert seen == want
    fresh = qtorch.load_quantized(nn.Sequential(*[nn.Linear(256, 256, dtype=dtype) for _ in range(3)]), path)
    x = torch.randn(2, 256, dtype=dtype)
    assert torch.equal(fresh(x), model(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_loading_converts_each_4bit_weight_once(tmp_path, dtype, monkeypatch):
    # qcore unpacks the file's codes once (and validates them); the layer's layout is built from those codes
    # (int4pack verifies its packing by reading it back once)
    import qtorch.layouts
    monkeypatch.setattr(qtorch.layouts, "TORCH_PACK_KERNELS", True, raising=False)
    model = _w4_model(dtype)
    path = tmp_path / "m.safetensors"
    qtorch.save_quantized(model, path)
    fresh = nn.Sequential(*[nn.Linear(256, 256, dtype=dtype) for _ in range(3)])
    seen = _conversions(lambda: qtorch.load_quantized(fresh, path))
    want = {"unpack": 3} if dtype == torch.float32 else {"unpack": 3, "int4pack_unpack": 3}
    assert seen == want
    x = torch.randn(2, 256, dtype=dtype)
    assert all(a.weight_layout == b.weight_layout for a, b in zip(fresh, model))
    assert torch.equal(fresh(x), model(x))


def test_saving_a_canonical_4bit_weight_converts_it_once(tmp_path):
    # N = 40 has no blocked tile: the weight stays canonical (packed rows). Saving reads its codes once (one
    # unpack, validated by qcore) and writes the packed rows it already holds: no second packing pass.
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(256, 40) for _ in range(3)])  # three parallel heads, called one by one
    qtorch.quantize_model(model, "w4a16", exclude=())
    assert all(m.weight_layout == "canonical" for m in model)
    path = tmp_path / "m.safetensors"
    assert _conversions(lambda: qtorch.save_quantized(model, path)) == {"unpack": 3}
    fresh = qtorch.load_quantized(nn.Sequential(*[nn.Linear(256, 40) for _ in range(3)]), path)
    x = torch.randn(2, 256)
    assert all(torch.equal(a(x), b(x)) for a, b in zip(fresh, model))
    assert all(torch.equal(a.state_dict()["qweight"], b.state_dict()["qweight"]) for a, b in zip(fresh, model))
