"""`qcore quantize`: streamed quantization of safetensors files and sharded folders, its errors, memory, no torch."""

import json
import math
import os
import pickle
import struct
import subprocess
import sys
import tempfile
import textwrap

import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

import qcore
from qcore import PerChannel, PerGroup, QuantScheme, dequantize, quantize
from qcore import checkpoint as ck
from qcore import cli, convert
from qcore.metrics import sqnr_db
from qcore.model_folder import quantization_marker

RNG = np.random.default_rng(7)
BF16 = ml_dtypes.bfloat16


def write_checkpoint(folder, shards, metadata=None, extra_files=None):
    """A sharded checkpoint: ``shards`` is a list of {name: array}; returns {name: array}."""
    os.makedirs(folder, exist_ok=True)
    weight_map, tensors = {}, {}
    n = len(shards)
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        with ck.SafetensorsWriter(os.path.join(folder, fname), [(k, v.dtype, v.shape) for k, v in shard.items()],
                                  metadata if metadata is not None else {"format": "pt"}) as w:
            for k, v in shard.items():
                w.write(k, v)
                weight_map[k] = fname
        tensors.update(shard)
    with open(os.path.join(folder, ck.INDEX_NAME), "w") as f:
        json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)
    for name, text in (extra_files or {}).items():
        os.makedirs(os.path.dirname(os.path.join(folder, name)), exist_ok=True)
        with open(os.path.join(folder, name), "w") as f:
            f.write(text)
    return tensors


def small_model():
    """Two shards in the shape of a decoder: embeddings, layers with norms and biases, lm_head, an int buffer."""
    def r(*shape, dtype=BF16):
        return RNG.standard_normal(shape).astype(dtype)
    s1 = {"model.embed_tokens.weight": r(50, 64), "model.layers.0.input_layernorm.weight": r(64),
          "model.layers.0.self_attn.q_proj.weight": r(32, 64), "model.layers.0.self_attn.q_proj.bias": r(32),
          "model.layers.0.mlp.up_proj.weight": r(96, 64, dtype=np.float32)}
    s2 = {"model.layers.1.self_attn.q_proj.weight": r(32, 64, dtype=np.float16),
          "model.layers.1.mlp.down_proj.weight": r(64, 96), "model.norm.weight": r(64),
          "lm_head.weight": r(50, 64), "model.rotary.positions": np.arange(16, dtype=np.int64)}
    return [s1, s2]


QUANTIZED_BY_DEFAULT = {"model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight",
                        "model.layers.1.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"}


@pytest.fixture
def model_dir(tmp_path):
    folder = tmp_path / "model"
    tensors = write_checkpoint(folder, small_model(), extra_files={"config.json": '{"model_type": "toy"}',
                                                                   "1_Pooling/config.json": '{"pool": 1}'})
    return folder, tensors


def run(*args):
    return cli.main([str(a) for a in args])


def leftovers(folder):
    """Temporary files or folders qcore could have left in ``folder`` (their names start with a dot)."""
    return [n for n in os.listdir(folder) if n.startswith(".")]


def same_quantization(loaded, x, scheme):
    ref = quantize(x.astype(np.float32), scheme)
    assert loaded.scheme == scheme
    assert np.array_equal(loaded.codes, ref.codes)
    assert np.array_equal(loaded.scale, ref.scale)
    if scheme.symmetric:
        assert loaded.zero_point is None
    else:
        assert np.array_equal(loaded.zero_point, ref.zero_point)


@pytest.mark.parametrize("bits, asym, group", [(8, False, None), (8, True, 32), (4, True, 32), (3, False, 16),
                                               (2, True, None), (1, True, 32)])
def test_sharded_round_trip(model_dir, tmp_path, capsys, bits, asym, group):
    folder, tensors = model_dir
    out = tmp_path / "out"
    args = ["quantize", folder, out, "--bits", bits] + (["--asymmetric"] if asym else []) + \
           (["--group-size", group] if group else [])
    assert run(*args) == 0
    scheme = QuantScheme(bits, not asym, PerGroup(group) if group else PerChannel(0))
    # output mirrors the input: the same shard names, a new index, the config copied
    assert sorted(os.listdir(out)) == sorted(os.listdir(folder))
    config = json.loads((out / "config.json").read_text())  # the source's config plus the marker
    assert config == {"model_type": "toy", "quantization_config": quantization_marker(
        "qcore", qcore.__version__, [scheme.to_dict()])}
    assert (out / "1_Pooling" / "config.json").read_text() == '{"pool": 1}'  # sentence-transformers modules
    index = json.loads((out / ck.INDEX_NAME).read_text())
    for fname in set(index["weight_map"].values()):
        assert set(load_file(out / fname)) == {k for k, v in index["weight_map"].items() if v == fname}
        with safe_open(out / fname, framework="numpy") as f:
            assert f.metadata()["format"] == "pt"  # input metadata kept (transformers checks it)
    loaded = ck.load(out)
    assert set(loaded) == set(tensors)
    for name, x in tensors.items():
        if name in QUANTIZED_BY_DEFAULT:
            same_quantization(loaded[name], x, scheme)  # pieces of rows == the whole tensor at once
        else:
            assert loaded[name].dtype == x.dtype and loaded[name].tobytes() == x.tobytes(), name
    assert leftovers(tmp_path) == [] and leftovers(out) == []
    summary = capsys.readouterr().out
    assert "4 tensors quantized" in summary and "6 copied unchanged" in summary and "worst SQNR" in summary


def test_single_file_and_folder_with_model_safetensors(tmp_path):
    x = RNG.standard_normal((16, 32)).astype(BF16)
    src = tmp_path / "m.safetensors"
    ck.save(src, {"a.weight": x, "a.bias": x[0].copy()})
    assert run("quantize", src, tmp_path / "q.safetensors", "--bits", 4, "-q") == 0
    loaded = ck.load(tmp_path / "q.safetensors")
    same_quantization(loaded["a.weight"], x, QuantScheme(4))
    (tmp_path / "dir").mkdir()
    os.replace(src, tmp_path / "dir" / "model.safetensors")
    assert run("quantize", tmp_path / "dir", tmp_path / "qdir", "-q") == 0
    assert os.listdir(tmp_path / "qdir") == ["model.safetensors"]
    same_quantization(ck.load(tmp_path / "qdir")["a.weight"], x, QuantScheme(8))


def test_folder_output_config_is_marked_only_when_something_is_quantized(model_dir, tmp_path, capsys):
    """Before: config.json was copied unchanged, so transformers loaded a qcore folder with random weights. Now
    it carries the same kind of marker as a qtorch folder; a folder in which nothing was quantized keeps its
    config as it was, and a config.json that cannot carry the marker is refused before any work."""
    folder, _ = model_dir
    assert run("quantize", folder, tmp_path / "w4", "--bits", 4, "--asymmetric", "--group-size", 32, "-q") == 0
    marker = json.loads((tmp_path / "w4" / "config.json").read_text())["quantization_config"]
    assert marker["quantizer"] == "qcore" and marker["qcore_version"] == qcore.__version__
    assert "quant_method" not in marker and marker["loader"] == "qtorch.from_pretrained"
    assert marker["checkpoint_format"] == "qcore" and marker["checkpoint_format_version"] == ck.FORMAT_VERSION
    assert marker["schemes"] == [QuantScheme(4, False, PerGroup(32)).to_dict()]
    assert run("quantize", folder, tmp_path / "none", "--include", "nothing.like.this", "-q") == 0
    assert (tmp_path / "none" / "config.json").read_text() == '{"model_type": "toy"}'
    (folder / "config.json").write_text("[1, 2]")
    expect_error(capsys, ["quantize", folder, tmp_path / "bad"], "config.json: expected a JSON object",
                 "must carry a quantization_config")
    assert not (tmp_path / "bad").exists() and leftovers(tmp_path) == []


def test_side_files_copied_but_not_tensors_pickles_or_hidden(model_dir, tmp_path):
    folder, _ = model_dir
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({}))
    (folder / ".cache").mkdir()
    (folder / ".cache" / "x.json").write_text("{}")
    (folder / "tokenizer.model").write_bytes(b"spm")
    (folder / "stray.safetensors").write_bytes(b"")
    os.symlink(folder / "config.json", folder / "link.json")
    assert run("quantize", folder, tmp_path / "out", "-q") == 0
    got = sorted(os.listdir(tmp_path / "out"))
    assert got == sorted(["1_Pooling", "config.json", "tokenizer.model", ck.INDEX_NAME,
                          "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"])


def test_sqnr_in_summary_matches_metrics(model_dir, tmp_path):
    folder, tensors = model_dir
    s = cli.quantize_checkpoint(folder, tmp_path / "out", bits=3, symmetric=False, group_size=16)
    loaded = ck.load(tmp_path / "out")
    expected = sorted((sqnr_db(tensors[n].astype(np.float32), dequantize(loaded[n])), n) for n in QUANTIZED_BY_DEFAULT)
    assert [n for _, n, _ in s["worst_sqnr"]] == [n for _, n in expected]
    for (db, _, _), (ref, _) in zip(s["worst_sqnr"], expected):
        assert abs(db - ref) < 1e-3
    assert s["input_bytes"] == sum(os.path.getsize(folder / f) for f in os.listdir(folder) if f.endswith(".safetensors"))
    assert s["output_bytes"] == sum(os.path.getsize(tmp_path / "out" / f) for f in os.listdir(tmp_path / "out")
                                    if f.endswith(".safetensors"))


# ---------------------------------------------------------------------------------------------------------
# Selection and patterns
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pattern, name, hit", [
    ("layers.1", "layers.1.q.weight", True),
    ("layers.1", "layers.10.q.weight", False),
    ("layers.1", "xlayers.1.q.weight", False),
    ("lm_head", "lm_head.weight", True),
    ("lm_head", "model.lm_head.weight", False),
    ("*lm_head", "model.lm_head.weight", True),
    ("*.mlp.*", "model.layers.0.mlp.up.weight", True),
    ("layers.?.q", "layers.3.q.weight", True),
    ("layers.?.q", "layers.13.q.weight", False),
    ("re:.*\\.(q|k)_proj", "m.layers.0.q_proj.weight", True),
    ("re:.*\\.(q|k)_proj", "m.layers.0.v_proj.weight", False),
    ("re:layers\\.1", "layers.10.weight", False),
    ("q.weight", "layers.1.q.weight", False),
])
def test_patterns_match_whole_dotted_names(pattern, name, hit):
    assert cli.Pattern(pattern).matches(name) is hit


def test_bad_regex_is_reported(model_dir, tmp_path, capsys):
    assert run("quantize", model_dir[0], tmp_path / "out", "--exclude", "re:(") == 1
    assert "not a valid regular expression" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_include_and_exclude(model_dir, tmp_path):
    folder, tensors = model_dir
    s = cli.quantize_checkpoint(folder, tmp_path / "a", exclude=["model.layers.1", "*up_proj"])
    assert {n for _, n, _ in s["worst_sqnr"]} == {"model.layers.0.self_attn.q_proj.weight"}
    s = cli.quantize_checkpoint(folder, tmp_path / "b", include=["lm_head", "re:.*embed_tokens"],
                                exclude=["model.layers.1"])
    assert {n for _, n, _ in s["worst_sqnr"]} == {"lm_head.weight", "model.embed_tokens.weight"}


def test_a_str_include_or_exclude_is_one_pattern_not_its_letters(model_dir, tmp_path, capsys):
    folder, _ = model_dir
    s = cli.quantize_checkpoint(folder, tmp_path / "a", include="lm_head", exclude="model.layers.1")
    t = cli.quantize_checkpoint(folder, tmp_path / "b", include=["lm_head"], exclude=["model.layers.1"])
    assert s["worst_sqnr"] == t["worst_sqnr"] and {n for _, n, _ in s["worst_sqnr"]} >= {"lm_head.weight"}
    assert "matches no tensor" not in capsys.readouterr().err


def test_layer_1_does_not_cover_layer_10(tmp_path):
    x = RNG.standard_normal((8, 16)).astype(np.float32)
    ck.save(tmp_path / "m.safetensors", {f"layers.{i}.q.weight": x for i in (1, 10, 11)})
    s = cli.quantize_checkpoint(tmp_path / "m.safetensors", tmp_path / "q.safetensors", exclude=["layers.1"])
    assert {n for _, n, _ in s["worst_sqnr"]} == {"layers.10.q.weight", "layers.11.q.weight"}


def test_unmatched_pattern_warns(model_dir, tmp_path, capsys):
    assert run("quantize", model_dir[0], tmp_path / "out", "--exclude", "nothing.like.this") == 0
    assert "pattern 'nothing.like.this' matches no tensor" in capsys.readouterr().err


def test_a_pattern_list_before_the_paths_is_explained_and_dash_dash_ends_it(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    # nargs="+" takes every word up to the next option: the paths end up as patterns
    assert run("quantize", "--exclude", "nothing.like.this", model_dir[0], out) == 2
    err = capsys.readouterr().err
    assert "INPUT and OUTPUT are missing" in err and "end the list with --" in err and not out.exists()
    assert run("quantize", "-q", "--exclude", "nothing.like.this", "--", model_dir[0], out) == 0
    assert out.exists()
    assert run("quantize", model_dir[0]) == 2
    assert "OUTPUT is missing" in capsys.readouterr().err


def test_progress_bar_only_on_a_terminal(model_dir, tmp_path, monkeypatch):
    import io

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    for tty, name in ((False, "a"), (True, "b")):
        err = Terminal() if tty else io.StringIO()
        monkeypatch.setattr(sys, "stderr", err)
        assert run("quantize", model_dir[0], tmp_path / name) == 0
        assert ("100%" in err.getvalue()) is tty, err.getvalue()
        assert ("MiB" in err.getvalue()) is tty and " MB" not in err.getvalue()  # binary units


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit) as e:
        run("quantize", "--help")
    assert e.value.code == 0
    text = capsys.readouterr().out
    for frag in ("default: 8", "*embed*", "*lm_head", "*norm*", "layers.10", "re:<regex>", "--overwrite"):
        assert frag in text, frag


# ---------------------------------------------------------------------------------------------------------
# Errors: a clear message, exit status 1, nothing left behind, an existing output untouched
# ---------------------------------------------------------------------------------------------------------

def expect_error(capsys, args, *fragments):
    assert run(*args) == 1
    err = capsys.readouterr().err
    assert err.startswith("qcore quantize: error: ")
    for frag in fragments:
        assert frag in err, err
    return err


def test_existing_output_refused_unless_overwrite(model_dir, tmp_path, capsys):
    folder, _ = model_dir
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    expect_error(capsys, ["quantize", folder, out], "already exists", "--overwrite")
    assert os.listdir(out) == ["keep.txt"]
    assert run("quantize", folder, out, "--overwrite", "-q") == 0
    assert "keep.txt" not in os.listdir(out) and ck.INDEX_NAME in os.listdir(out)
    assert leftovers(tmp_path) == []
    f = tmp_path / "f.safetensors"
    f.write_bytes(b"old")
    src = folder / "model-00001-of-00002.safetensors"
    expect_error(capsys, ["quantize", src, f], "already exists")
    assert f.read_bytes() == b"old"
    assert run("quantize", src, f, "--overwrite", "-q") == 0
    assert "model.layers.0.mlp.up_proj.weight" in ck.load(f)


def test_failure_midway_leaves_no_output_and_keeps_existing(model_dir, tmp_path, capsys):
    folder, tensors = model_dir
    x = tensors["model.layers.1.mlp.down_proj.weight"].copy()
    x[40, 7] = np.nan  # in the second shard: the first shard is already written when this is found
    shards = small_model()
    shards[1]["model.layers.1.mlp.down_proj.weight"] = x
    bad = tmp_path / "bad"
    write_checkpoint(bad, shards)
    out = tmp_path / "out"
    expect_error(capsys, ["quantize", bad, out], "model.layers.1.mlp.down_proj.weight", "(40, 7)", "NaN")
    assert not out.exists() and leftovers(tmp_path) == []
    assert run("quantize", folder, out, "-q") == 0
    def snapshot():
        return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}

    before = snapshot()
    expect_error(capsys, ["quantize", bad, out, "--overwrite"], "NaN")
    assert snapshot() == before
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("how, status", [("sigint", 130), ("sigterm", 143)])
def test_interrupted_run_leaves_nothing(model_dir, tmp_path, capsys, monkeypatch, how, status):
    """Ctrl-C or SIGTERM in the middle of the second shard: temporary files removed, no output."""
    import signal

    real, calls = convert._stream_tensor, []

    def interrupting(*args):
        calls.append(1)
        if len(calls) == 7:
            if how == "sigint":
                raise KeyboardInterrupt
            os.kill(os.getpid(), signal.SIGTERM)  # the handler of main() turns it into an exception
        return real(*args)

    monkeypatch.setattr(convert, "_stream_tensor", interrupting)
    out = tmp_path / "out"
    before = signal.getsignal(signal.SIGTERM)
    assert run("quantize", model_dir[0], out) == status
    assert "no output written" in capsys.readouterr().err
    assert not out.exists() and leftovers(tmp_path) == []
    assert signal.getsignal(signal.SIGTERM) is before  # main() restores the handler it replaced


def test_scheme_that_does_not_fit_is_refused_before_writing(model_dir, tmp_path, capsys):
    expect_error(capsys, ["quantize", model_dir[0], tmp_path / "out", "--bits", 1], "use symmetric=False")
    assert os.listdir(tmp_path) == ["model"]


def test_output_parent_is_a_file(model_dir, tmp_path, capsys):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    expect_error(capsys, ["quantize", model_dir[0], blocker / "out"], "is not a folder")
    src = model_dir[0] / "model-00001-of-00002.safetensors"
    expect_error(capsys, ["quantize", src, blocker / "q.safetensors"], "is not a folder")
    expect_error(capsys, ["quantize", src, tmp_path / "missing" / "q.safetensors"], "does not exist")
    assert sorted(os.listdir(tmp_path)) == ["file.txt", "model"]


def _run_as_nobody(fn):
    """Run ``fn()`` in a forked child that dropped root privileges; returns what it printed."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            os.write(w, fn().encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        text = f.read()
    os.waitpid(pid, 0)
    return text


def test_read_only_output_folder():
    """A folder the user cannot write to. Root ignores permission bits, so as root the check runs in a
    child process that drops to the 'nobody' user; the folders live outside pytest's root-only tmp dir."""
    base = tempfile.mkdtemp(prefix="qcore-ro-")
    try:
        os.chmod(base, 0o755)
        os.mkdir(os.path.join(base, "in"), 0o755)
        src = os.path.join(base, "in", "model.safetensors")
        ck.save(src, {"a.weight": np.ones((4, 8), np.float32)})
        os.chmod(src, 0o644)
        ro = os.path.join(base, "ro")
        os.mkdir(ro)
        os.chmod(ro, 0o555)
        args = ["quantize", src, os.path.join(ro, "q.safetensors")]
        args_dir = ["quantize", os.path.dirname(src), os.path.join(ro, "out")]

        def attempt():
            import contextlib
            import io

            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                codes = (cli.main(args), cli.main(args_dir))
            return f"{codes}\n{err.getvalue()}"

        text = _run_as_nobody(attempt) if os.geteuid() == 0 else attempt()
        codes, err = text.split("\n", 1)
        assert codes == "(1, 1)", text
        assert err.count("Permission denied") == 2, err
        assert os.listdir(ro) == []
    finally:
        os.chmod(os.path.join(base, "ro"), 0o755)
        import shutil
        shutil.rmtree(base)


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt"])
def test_pickle_input_refused(tmp_path, capsys, name):
    path = tmp_path / name
    path.write_bytes(pickle.dumps({"w": 1}))
    err = expect_error(capsys, ["quantize", path, tmp_path / "q.safetensors"], str(path), "pickle", "arbitrary code")
    assert "Traceback" not in err and "Unpickling" not in err
    folder = tmp_path / "hf"
    folder.mkdir()
    os.replace(path, folder / name)
    expect_error(capsys, ["quantize", folder, tmp_path / "out"], str(folder / name), "pickle", "arbitrary code")
    assert sorted(os.listdir(tmp_path)) == ["hf"]


def test_bad_input_files(model_dir, tmp_path, capsys):
    folder, _ = model_dir
    expect_error(capsys, ["quantize", folder, folder], "same as INPUT")
    shard = folder / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    expect_error(capsys, ["quantize", folder, tmp_path / "out"], "model-00002-of-00002.safetensors", "truncated")
    expect_error(capsys, ["quantize", tmp_path / "nope.safetensors", tmp_path / "q.safetensors"], "no such file")
    assert sorted(os.listdir(tmp_path)) == ["model"]


def test_quantized_checkpoint_is_not_requantized(tmp_path, capsys):
    ck.save(tmp_path / "q.safetensors", {"w": quantize(np.ones((4, 8), np.float32), QuantScheme(4))})
    expect_error(capsys, ["quantize", tmp_path / "q.safetensors", tmp_path / "qq.safetensors"],
                 "already a quantized checkpoint (qcore format)")


# ---------------------------------------------------------------------------------------------------------
# Subprocesses: python -m qcore without torch, and the peak memory of a streamed run
# ---------------------------------------------------------------------------------------------------------

def test_python_m_qcore_never_imports_torch(model_dir, tmp_path):
    code = textwrap.dedent(f"""
        import runpy, sys
        sys.argv = ["qcore", "quantize", {str(model_dir[0])!r}, {str(tmp_path / 'out')!r}, "--bits", "4"]
        try:
            runpy.run_module("qcore", run_name="__main__")
        except SystemExit as e:
            assert e.code in (0, None), e.code
        bad = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
        print("TORCH:", bad)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "TORCH: []" in r.stdout and "4 tensors quantized" in r.stdout


def test_peak_rss_is_bounded_by_the_largest_tensor_not_the_checkpoint(tmp_path):
    """A 160 MB checkpoint in two 80 MB shards whose largest tensor is 2 MB. Two bounds: the issue's budget
    (3 x largest + 300 MB), which holding the whole checkpoint in memory exceeds (Python + numba alone take
    ~170 MB), and, tighter, the peak of the same command on a one-tensor checkpoint + 3 x largest + 40 MB,
    which holding one shard (as a memory map does until it is closed) also exceeds."""
    block = RNG.standard_normal((1024, 1024)).astype(BF16)  # 2 MB
    shards = [{(f"layers.{s}.w{t}.weight" if t < 3 else f"layers.{s}.buf{t}"): block for t in range(40)}
              for s in range(2)]
    write_checkpoint(tmp_path / "big", shards)
    write_checkpoint(tmp_path / "tiny", [{"layers.0.w0.weight": block}])
    size = sum(os.path.getsize(tmp_path / "big" / f) for f in os.listdir(tmp_path / "big"))
    largest = block.nbytes
    # One worker process runs the one-tensor checkpoint first (its peak includes imports and numba), then the
    # big one. It is started by a small wrapper that reads RUSAGE_CHILDREN: Linux carries a process's peak RSS
    # across fork and exec, so a child of the (large) pytest process would report pytest's own peak.
    worker = textwrap.dedent(f"""
        import resource
        from qcore.cli import main
        args = ["--bits", "4", "--group-size", "128", "-q"]
        assert main(["quantize", {str(tmp_path / 'tiny')!r}, {str(tmp_path / 'tiny-out')!r}, *args]) == 0
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, flush=True)
        assert main(["quantize", {str(tmp_path / 'big')!r}, {str(tmp_path / 'big-out')!r}, *args]) == 0
    """)
    wrapper = textwrap.dedent(f"""
        import resource, subprocess, sys
        r = subprocess.run([sys.executable, "-c", {worker!r}], capture_output=True, text=True)
        print(r.returncode, r.stdout.strip(), resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
        sys.stderr.write(r.stderr)
    """)
    r = subprocess.run([sys.executable, "-c", wrapper], capture_output=True, text=True, timeout=300)
    rc, baseline, peak = map(int, r.stdout.split())
    assert rc == 0, r.stderr
    budget = 3 * largest + 300 * 2**20
    assert baseline + size > budget  # the budget does separate streaming from loading everything
    mib = 2**20
    assert peak <= budget, f"peak RSS {peak / mib:.0f} MiB > budget {budget / mib:.0f} MiB"
    assert peak <= baseline + 3 * largest + 40 * mib, \
        f"peak RSS {peak / mib:.0f} MiB, one-tensor run {baseline / mib:.0f} MiB, largest tensor {largest / mib} MiB"
    assert len(ck.load(tmp_path / "big-out" / "model-00001-of-00002.safetensors")) == 40


# ---------------------------------------------------------------------------------------------------------
# Hostile sizes: every planned output and loop is bounded by the real input
# ---------------------------------------------------------------------------------------------------------

def _header_only(path, shape, dtype="F32", name="z.weight"):
    h = json.dumps({name: {"dtype": dtype, "shape": shape, "data_offsets": [0, 0]}}).encode()
    h += b" " * (-len(h) % 8)
    path.write_bytes(struct.pack("<Q", len(h)) + h)
    return path


@pytest.fixture
def few_pieces(monkeypatch):
    """Fail the test (instead of filling the disk) when a tensor is quantized in more than 10 pieces."""
    real, calls = convert.quantize, []

    def counted(*args, **kwargs):
        calls.append(1)
        if len(calls) > 10:
            raise RuntimeError("more than 10 pieces quantized for a checkpoint of a few bytes")
        return real(*args, **kwargs)
    monkeypatch.setattr(convert, "quantize", counted)
    return calls


def test_empty_tensor_with_huge_parameters_is_refused_before_writing(tmp_path, capsys, few_pieces):
    """A 96-byte file with one tensor [2**40, 0]. Before: 2**40 per-row scales planned and streamed out (5.3 GB
    in 15 s, until the disk was full). Now: refused before anything is written, naming file and tensor."""
    src = _header_only(tmp_path / "z.safetensors", [2**40, 0])
    assert os.path.getsize(src) == 96
    expect_error(capsys, ["quantize", src, tmp_path / "q.safetensors"], str(src), "'z.weight'",
                 "has no elements", "4.00 TiB", "--exclude z.weight")
    assert sorted(os.listdir(tmp_path)) == ["z.safetensors"] and few_pieces == []


def test_empty_tensor_with_empty_parameters_takes_no_loop(tmp_path, few_pieces):
    """[2**40, 0] per group has empty scales: allowed, and written without looping over 2**40 empty rows
    (before: ~2**19 rounds of quantizing nothing)."""
    src = _header_only(tmp_path / "z.safetensors", [2**40, 0])
    assert run("quantize", src, tmp_path / "q.safetensors", "--group-size", 16, "-q") == 0
    qa = ck.load(tmp_path / "q.safetensors")["z.weight"]
    assert qa.shape == (2**40, 0) and qa.scale.shape == (2**40, 0) and few_pieces == []


@pytest.mark.parametrize("shape, fragment", [([2**48] * 8 + [0], "spans more than 2^60"),
                                             ([1] * 65, "65 dimensions")])
def test_tensor_that_safetensors_or_numpy_refuse_is_refused_before_writing(tmp_path, capsys, shape, fragment):
    """Before: [2**48]*8+[0] was copied into an output that safetensors refuses ('overflow computing buffer
    size'), and a 65-dimensional tensor into one that load refuses. Now both are refused by read_header."""
    src = _header_only(tmp_path / "z.safetensors", shape, name="buf")
    if math.prod(shape):  # [1]*65 holds one element
        src.write_bytes(src.read_bytes().replace(b'"data_offsets": [0, 0]', b'"data_offsets": [0, 4]') + b"\0" * 4)
    expect_error(capsys, ["quantize", src, tmp_path / "q.safetensors"], str(src), "'buf'", fragment)
    assert sorted(os.listdir(tmp_path)) == ["z.safetensors"]


# ---------------------------------------------------------------------------------------------------------
# The commit window: a run killed while replacing OUTPUT is repaired by the next one
# ---------------------------------------------------------------------------------------------------------

def _killed_at_rename(args, n):
    """Run ``qcore`` in a child that dies (as under kill -9: no cleanup) when it calls os.rename for the n-th time."""
    code = textwrap.dedent(f"""
        import os, sys
        from qcore import cli
        real, calls = os.rename, []
        def rename(a, b, **kw):
            calls.append(1)
            if len(calls) == {n}:
                os._exit(9)
            return real(a, b, **kw)
        os.rename = rename
        sys.exit(cli.main({[str(a) for a in args]!r}))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 9, r.stderr


def _tree(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("n, outcome", [(1, "old"), (2, "old"), (3, "new")])
def test_kill_inside_the_commit_is_repaired_by_the_next_run(model_dir, tmp_path, capsys, n, outcome):
    """The commit renames staging -> ready (1), OUTPUT -> aside (2), ready -> OUTPUT (3). Before: a kill at (3)
    left OUTPUT missing (the old result in .out.old.*, the new one in .out.*.tmp), and nothing ever cleaned
    them. Now the next run on OUTPUT puts back the old result or finishes the commit, and removes the rest."""
    folder, _ = model_dir
    out = tmp_path / "out"
    assert run("quantize", folder, out, "--bits", 8, "-q") == 0
    old = _tree(out)
    assert run("quantize", folder, tmp_path / "ref", "--bits", 4, "-q") == 0
    new = _tree(tmp_path / "ref")
    _killed_at_rename(["quantize", folder, out, "--bits", 4, "--overwrite", "-q"], n)
    # the next run without --overwrite first repairs OUTPUT (and says so), then refuses to replace it
    assert run("quantize", folder, out) == 1
    err = capsys.readouterr().err
    assert f"OUTPUT {str(out)!r} already exists" in err
    assert ("note: finished the replacement of" in err) is (outcome == "new"), err
    assert _tree(out) == (old if outcome == "old" else new)
    assert leftovers(tmp_path) == []
    ck.load(out)
    assert run("quantize", folder, out, "--bits", 4, "--overwrite", "-q") == 0
    assert _tree(out) == new and leftovers(tmp_path) == []


def test_staging_left_by_a_dead_process_is_removed_but_not_a_live_ones(model_dir, tmp_path):
    """Before: folders of killed runs stayed forever. Now a run removes those whose owner is gone (pid and
    start time in the name) and leaves those of live processes alone."""
    folder, _ = model_dir
    out = tmp_path / "out"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = tmp_path / f".out.qcore-{dead}-1-abc.tmp"
    stale.mkdir()
    (stale / "model-00001-of-00002.safetensors").write_bytes(b"partial")
    stale_file = tmp_path / f".q.safetensors.qcore-{dead}-1-abd.tmp"
    stale_file.write_bytes(b"partial")
    live = tmp_path / f".out.qcore-{os.getpid()}-{ck._start_time(os.getpid())}-abe.tmp"
    live.mkdir()
    assert run("quantize", folder, out, "-q") == 0
    assert run("quantize", folder / "model-00001-of-00002.safetensors", tmp_path / "q.safetensors", "-q") == 0
    assert leftovers(tmp_path) == [live.name]


@pytest.mark.parametrize("kind", ["folder", "file"])
def test_directory_fsync_error_is_not_reported_as_success(model_dir, tmp_path, capsys, monkeypatch, kind):
    """Before: an fsync error on the folder after the rename was swallowed and the run reported success."""
    import errno
    import stat

    real = os.fsync

    def failing(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EIO, "Input/output error")
        return real(fd)
    monkeypatch.setattr(os, "fsync", failing)
    folder, _ = model_dir
    src, out = (folder, tmp_path / "out") if kind == "folder" else \
        (folder / "model-00001-of-00002.safetensors", tmp_path / "q.safetensors")
    expect_error(capsys, ["quantize", src, out], "Input/output error", "may not survive a crash")


def test_output_inside_input_is_refused(model_dir, tmp_path, capsys):
    """Before: accepted; a later run on INPUT then copied this output's index, whose shards are not there."""
    folder, _ = model_dir
    before = sorted(os.listdir(folder))
    expect_error(capsys, ["quantize", folder, folder / "q"], "inside INPUT")
    expect_error(capsys, ["quantize", folder, folder / "sub" / "q"], "inside INPUT")
    assert sorted(os.listdir(folder)) == before


# ---------------------------------------------------------------------------------------------------------
# The command as a new user meets it
# ---------------------------------------------------------------------------------------------------------

def test_version(capsys):
    """Before: 'unrecognized arguments: --version' (exit 2)."""
    with pytest.raises(SystemExit) as e:
        run("--version")
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"qcore {cli.package_version()}"
    assert cli.package_version().count(".") >= 1


def test_quiet_prints_nothing_but_errors(model_dir, tmp_path, capsys, monkeypatch):
    """Before: -q only dropped the summary; warnings and the progress bar (on a terminal) still printed."""
    import io

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    err = Terminal()
    monkeypatch.setattr(sys, "stderr", err)
    assert run("quantize", model_dir[0], tmp_path / "out", "--exclude", "nothing.like.this", "-q") == 0
    assert err.getvalue() == "" and capsys.readouterr().out == ""
    assert run("quantize", model_dir[0], tmp_path / "out", "-q") == 1  # errors still print
    assert "already exists" in err.getvalue()


def test_sizes_are_in_binary_units(model_dir, tmp_path, capsys):
    """Before: '36.87 KB' (powers of 1000). Now KiB/MiB/GiB, as the rest of the project."""
    assert run("quantize", model_dir[0], tmp_path / "out") == 0
    text = capsys.readouterr().out
    assert "KiB" in text and "GiB/s" in text and " KB" not in text and "GB/s" not in text
    assert cli.fmt_bytes(1536) == "1.50 KiB" and cli.fmt_bytes(3 * 2**30) == "3.00 GiB"
    assert cli.fmt_bytes(1023) == "1023 B"


@pytest.mark.parametrize("args", [["--version"], ["quantize", "IN", "OUT"]])
def test_closed_pipe_is_silent(model_dir, tmp_path, args):
    """`qcore ... | head -1` where the reader has gone. Before: a BrokenPipeError traceback (exit 1)."""
    args = [str(model_dir[0]) if a == "IN" else str(tmp_path / "out") if a == "OUT" else a for a in args]
    r, w = os.pipe()
    os.close(r)  # the reader is gone before the first line is written
    try:
        p = subprocess.run([sys.executable, "-m", "qcore", *args], stdout=w, stderr=subprocess.PIPE, text=True,
                           timeout=120)
    finally:
        os.close(w)
    assert p.returncode == 0 and p.stderr == "", p.stderr
    if "quantize" in args:
        assert "model.layers.0.mlp.up_proj.weight" in ck.load(tmp_path / "out")


def test_folder_input_with_a_file_output_is_explained(model_dir, tmp_path, capsys):
    """Before: a folder named out.safetensors was created."""
    expect_error(capsys, ["quantize", model_dir[0], tmp_path / "out.safetensors"], "INPUT", "is a folder",
                 "OUTPUT must be a folder")
    assert sorted(os.listdir(tmp_path)) == ["model"]


def test_value_errors_about_a_tensor_name_it(tmp_path):
    """Before: 'dtype complex128 cannot be stored', naming no tensor."""
    with pytest.raises(TypeError, match="tensor 'w': dtype complex128 cannot be stored"):
        ck.save(tmp_path / "x.safetensors", {"w": np.ones(2, np.complex128)})
    with pytest.raises(TypeError, match="tensor 'w'"):
        ck.SafetensorsWriter(tmp_path / "x.safetensors", [("w", np.complex64, (2,))])
    assert os.listdir(tmp_path) == []


def test_failed_commit_keeps_output_and_names_it(model_dir, tmp_path, capsys, monkeypatch):
    """The last rename of the commit fails: the previous OUTPUT is put back, nothing is left beside it, and
    the message names OUTPUT (before: the temporary folder's name)."""
    import errno

    folder, _ = model_dir
    out = tmp_path / "out"
    assert run("quantize", folder, out, "-q") == 0
    before = _tree(out)
    real, calls = os.rename, []

    def rename(a, b, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real(a, b, **kw)
    monkeypatch.setattr(os, "rename", rename)
    err = expect_error(capsys, ["quantize", folder, out, "--bits", 4, "--overwrite"], "Invalid cross-device link")
    assert err.startswith(f"qcore quantize: error: {out}: cannot move the new output into place"), err
    assert _tree(out) == before and leftovers(tmp_path) == []


def test_worst_sqnr_leaves_out_empty_tensors_and_calls_no_error_exact(tmp_path, capsys):
    x = RNG.standard_normal((8, 16)).astype(np.float32)
    exact = np.tile(np.array([-2.0, -1.0, 0.0, 1.0], np.float32), (8, 4))  # on the 8-bit grid of its rows
    ck.save(tmp_path / "m.safetensors", {"a.weight": x, "empty.weight": np.zeros((0, 16), np.float32),
                                         "exact.weight": exact})
    s = cli.quantize_checkpoint(tmp_path / "m.safetensors", tmp_path / "q.safetensors", bits=8, symmetric=False,
                                quiet=True)
    assert [n for _, n, _ in s["worst_sqnr"]] == ["a.weight", "exact.weight"] and s["quantized"] == 3
    assert run("quantize", tmp_path / "m.safetensors", tmp_path / "r.safetensors", "--bits", "8", "--asymmetric") == 0
    out = capsys.readouterr().out
    assert "     exact  exact.weight  [8, 16]" in out and "empty.weight" not in out and " dB  a.weight" in out
