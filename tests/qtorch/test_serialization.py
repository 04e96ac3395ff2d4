"""qtorch.save_quantized / load_quantized: exact round trips, meta-device models, tied weights, bad checkpoints."""

import os
import subprocess
import sys

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
