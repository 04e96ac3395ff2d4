"""qcore.checkpoint: round trips, the official safetensors loader, and hostile files."""

import json
import math
import os
import pickle
import re
import struct

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.numpy import load_file

from qcore import PerChannel, PerGroup, PerTensor, QuantScheme, QuantizedArray, quantize
from qcore import checkpoint as ck
from qcore.packing import packed_shape

RNG = np.random.default_rng(1234)
W = RNG.standard_normal((6, 48)).astype(np.float32)

GRANULARITIES = [PerTensor(), PerChannel(0), PerChannel(1), PerGroup(16), PerGroup(3, axis=0)]


SCHEMES = [pytest.param(QuantScheme(b, sym, g), id=str(QuantScheme(b, sym, g)))
           for b in range(1, 9) for sym in (True, False) for g in GRANULARITIES if not (b == 1 and sym)]


def _same_qa(a: QuantizedArray, b: QuantizedArray) -> None:
    assert a.scheme == b.scheme
    assert a.codes.dtype == b.codes.dtype and np.array_equal(a.codes, b.codes)
    assert a.scale.dtype == np.float32 and a.scale.shape == b.scale.shape
    assert np.array_equal(a.scale, b.scale)
    if b.zero_point is None:
        assert a.zero_point is None
    else:
        assert a.zero_point.dtype == np.uint8 and np.array_equal(a.zero_point, b.zero_point)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_round_trip_every_scheme(tmp_path, scheme):
    qa = quantize(W, scheme)
    path = tmp_path / "q.safetensors"
    ck.save(path, {"layer.weight": qa, "layer.bias": W[0].copy()})
    out = ck.load(path)
    assert set(out) == {"layer.weight", "layer.bias"}
    _same_qa(out["layer.weight"], qa)
    # the stored layout, read back by the official loader: qweight rule of the module docstring
    raw = load_file(path)
    q = raw["layer.weight.qweight"]
    if scheme.bits == 8:
        assert q.dtype == (np.int8 if scheme.symmetric else np.uint8) and np.array_equal(q, qa.codes)
    else:
        assert q.dtype == np.uint8 and q.shape == tuple(packed_shape(W.shape, scheme.bits))
        assert np.array_equal(q, qa.packed())
    assert ("layer.weight.zero_point" in raw) == (not scheme.symmetric)
    assert os.listdir(tmp_path) == ["q.safetensors"]


@pytest.mark.parametrize("shape", [(1,), (5, 33), (2, 3, 7), (0, 8)])
@pytest.mark.parametrize("bits", [2, 3, 8])
def test_round_trip_odd_shapes(tmp_path, shape, bits):
    x = RNG.standard_normal(shape).astype(np.float16)
    qa = quantize(x, QuantScheme(bits, False, PerChannel(0)))
    ck.save(tmp_path / "q.safetensors", {"t": qa})
    _same_qa(ck.load(tmp_path / "q.safetensors")["t"], qa)


PLAIN = {
    "f32": W,
    "f16": W.astype(np.float16),
    "bf16": W.astype(ml_dtypes.bfloat16),
    "f64": W[:2].astype(np.float64),
    "i8": np.arange(-5, 5, dtype=np.int8),
    "u8": np.arange(7, dtype=np.uint8),
    "i32": np.arange(12, dtype=np.int32).reshape(3, 4),
    "i64": np.arange(3, dtype=np.int64),
    "bool": np.array([True, False, True]),
    "scalar": np.array(3.5, np.float32),
    "empty": np.zeros((0, 4), np.float32),
    "transposed": W.T,  # non-contiguous input is written in C order
}


def test_plain_arrays_round_trip_and_official_loader(tmp_path):
    path = tmp_path / "p.safetensors"
    ck.save(path, PLAIN, metadata={"format": "pt", "note": "hello"})
    out = ck.load(path)
    official = load_file(path)
    for name, arr in PLAIN.items():
        for got in (out[name], official[name]):
            assert got.dtype == arr.dtype and got.shape == arr.shape, name
            assert np.array_equal(got.view(np.uint8) if arr.dtype == ml_dtypes.bfloat16 else got,
                                  arr.view(np.uint8) if arr.dtype == ml_dtypes.bfloat16 else arr), name
    with safe_open(path, framework="numpy") as f:
        md = f.metadata()
    assert md["format"] == "pt" and md["note"] == "hello" and md["qcore.format_version"] == "1"


def test_tensors_are_aligned_to_their_item_size(tmp_path):
    path = tmp_path / "a.safetensors"
    ck.save(path, {"a": np.zeros(3, np.uint8), "b": np.zeros(3, np.float64),
                   "c": quantize(W, QuantScheme(3, True, PerGroup(16)))})
    h = ck.read_header(path)
    assert h.data_start % 8 == 0
    for t in h.tensors.values():
        assert (t.start - h.data_start) % t.np_dtype.itemsize == 0, t


@settings(max_examples=25)
@given(st.lists(st.tuples(st.sampled_from(sorted(ck.DTYPES)), st.lists(st.integers(0, 5), max_size=3),
                          st.integers(1, 4)), min_size=1, max_size=6),
       st.randoms(use_true_random=False))
def test_streaming_writer_in_pieces_matches_official_loader(tmp_path_factory, specs, rnd):
    """Tensors written in any order, each in several pieces, read back by safetensors itself."""
    path = tmp_path_factory.mktemp("w") / "s.safetensors"
    arrays = {}
    for i, (code, shape, _) in enumerate(specs):
        dt = ck.DTYPES[code]
        raw = RNG.integers(0, 256, size=int(np.prod(shape)) * dt.itemsize, dtype=np.uint8)
        arr = raw.view(dt).reshape(shape) if dt != np.bool_ else (raw % 2).astype(bool).reshape(shape)
        arrays[f"t{i}"] = arr
    with ck.SafetensorsWriter(path, [(n, a.dtype, a.shape) for n, a in arrays.items()]) as w:
        order = list(arrays)
        rnd.shuffle(order)
        for (name, (_, _, pieces)) in zip(order, [specs[int(n[1:])] for n in order]):
            flat = arrays[name].reshape(-1)
            for part in np.array_split(flat, pieces):
                w.write(name, part)
    got = load_file(path)
    for name, arr in arrays.items():
        assert got[name].dtype == arr.dtype and got[name].shape == arr.shape
        assert got[name].tobytes() == arr.tobytes()


@pytest.mark.parametrize("kernel_copy", [True, False])
def test_writer_copy_from_a_file(tmp_path, monkeypatch, kernel_copy):
    """Raw bytes copied file to file (os.copy_file_range, or pread/pwrite without it) beside array writes."""
    monkeypatch.setattr(ck, "_HAS_COPY_FILE_RANGE", kernel_copy and ck._HAS_COPY_FILE_RANGE)
    src = tmp_path / "src.bin"
    payload = RNG.standard_normal(1000).astype(ml_dtypes.bfloat16)
    src.write_bytes(b"junk" + payload.tobytes())
    path = tmp_path / "c.safetensors"
    with open(src, "rb") as f, ck.SafetensorsWriter(path, [("a", np.uint8, (3,)), ("b", ml_dtypes.bfloat16, (1000,))]) as w:
        w.write("a", np.array([1, 2], np.uint8))
        w.copy_from("b", f.fileno(), 4, 1200)
        w.write("a", np.array([3], np.uint8))
        w.copy_from("b", f.fileno(), 1204, 800)
        with pytest.raises(ValueError, match="holds 2000"):
            w.copy_from("b", f.fileno(), 4, 2)
    got = load_file(path)
    assert got["a"].tolist() == [1, 2, 3] and got["b"].tobytes() == payload.tobytes()


def test_writer_copy_from_a_short_source(tmp_path, monkeypatch):
    monkeypatch.setattr(ck, "_HAS_COPY_FILE_RANGE", False)
    src = tmp_path / "src.bin"
    src.write_bytes(b"1234")
    with open(src, "rb") as f, pytest.raises(ValueError, match="source ended early"):
        with ck.SafetensorsWriter(tmp_path / "c.safetensors", [("b", np.uint8, (8,))]) as w:
            w.copy_from("b", f.fileno(), 0, 8)
    assert sorted(os.listdir(tmp_path)) == ["src.bin"]


# ---------------------------------------------------------------------------------------------------------
# Writing never leaves partial files
# ---------------------------------------------------------------------------------------------------------

def test_writer_error_leaves_nothing_and_keeps_existing_file(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(b"precious")
    with pytest.raises(RuntimeError):
        with ck.SafetensorsWriter(path, [("a", np.float32, (4,))]) as w:
            w.write("a", np.zeros(2, np.float32))
            raise RuntimeError("crash in the middle")
    assert path.read_bytes() == b"precious"
    assert os.listdir(tmp_path) == ["x.safetensors"]


def test_writer_refuses_incomplete_or_overlong_tensors(tmp_path):
    path = tmp_path / "x.safetensors"
    w = ck.SafetensorsWriter(path, [("a", np.float32, (4,))])
    with pytest.raises(ValueError, match="holds 16"):
        w.write("a", np.zeros(5, np.float32))
    with pytest.raises(TypeError, match="declared float32"):
        w.write("a", np.zeros(4, np.float64))
    w.write("a", np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="incomplete tensors: a"):
        w.close()
    assert os.listdir(tmp_path) == []


def test_save_overwrite_false_refuses_existing(tmp_path):
    path = tmp_path / "x.safetensors"
    ck.save(path, {"a": np.ones(2, np.float32)})
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="already exists"):
        ck.save(path, {"a": np.zeros(2, np.float32)}, overwrite=False)
    assert path.read_bytes() == before
    ck.save(path, {"a": np.zeros(2, np.float32)})  # the default replaces, atomically
    assert ck.load(path)["a"].tolist() == [0.0, 0.0]
    assert os.listdir(tmp_path) == ["x.safetensors"]


def test_save_rejects_name_collisions_and_bad_values(tmp_path):
    qa = quantize(W, QuantScheme(4))
    with pytest.raises(ValueError, match="collide"):
        ck.save(tmp_path / "x.safetensors", {"w": qa, "w.scale": np.ones(1, np.float32)})
    with pytest.raises(TypeError, match="QuantizedArray or numpy.ndarray"):
        ck.save(tmp_path / "x.safetensors", {"w": [1, 2]})
    with pytest.raises(TypeError, match="cannot be stored"):
        ck.save(tmp_path / "x.safetensors", {"w": np.ones(2, np.complex128)})
    with pytest.raises(ValueError, match="reserved"):
        ck.save(tmp_path / "x.safetensors", {"w": qa}, metadata={"qcore.quantized": "{}"})
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------------------------
# Bad files: each is a ValueError naming the tensor and the field, and nothing is returned
# ---------------------------------------------------------------------------------------------------------

def _split(path):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), bytearray(raw[8 + n:])


def _join(path, header, data):
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    path.write_bytes(struct.pack("<Q", len(h)) + h + bytes(data))


@pytest.fixture
def qfile(tmp_path):
    """A valid file: asymmetric 4-bit per-group 'w', symmetric 8-bit 's', plain 'b'."""
    path = tmp_path / "q.safetensors"
    ck.save(path, {"w": quantize(W, QuantScheme(4, False, PerGroup(16))),
                   "s": quantize(W, QuantScheme(8, True, PerChannel(0))), "b": W[0].copy()})
    return path


def _edit_meta(path, name, fn):
    header, data = _split(path)
    table = json.loads(header["__metadata__"]["qcore.quantized"])
    fn(table[name])
    header["__metadata__"]["qcore.quantized"] = json.dumps(table)
    _join(path, header, data)


def _edit_data(path, tensor, fn):
    header, data = _split(path)
    start, end = header[tensor]["data_offsets"]
    dt = ck.DTYPES[header[tensor]["dtype"]]
    arr = np.frombuffer(bytes(data[start:end]), dt).copy()
    fn(arr)
    data[start:end] = arr.tobytes()
    _join(path, header, data)


def _expect(path, *fragments):
    with pytest.raises(ValueError) as info:
        ck.load(path)
    msg = str(info.value)
    for frag in fragments:
        assert frag in msg, msg
    return msg


def test_valid_fixture_loads(qfile):
    assert set(ck.load(qfile)) == {"w", "s", "b"}


def test_truncated_file(qfile):
    raw = qfile.read_bytes()
    for cut in (len(raw) - 1, len(raw) - 100, 60, 5, 0):
        qfile.write_bytes(raw[:cut])
        _expect(qfile, "truncated")


def test_trailing_bytes(qfile):
    qfile.write_bytes(qfile.read_bytes() + b"\0")
    _expect(qfile, "after the last tensor")


@pytest.mark.parametrize("header_bytes, fragment", [
    (b"not json at all!", "not valid JSON"),
    (b"[1, 2, 3]       ", "expected a JSON object"),
    (b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],'
     b'"data_offsets":[0,4]}}', "duplicate key 'a'"),
    (b'{"__metadata__":{"x":1}}', "__metadata__ must map strings to strings"),
    (b'{"a":{"dtype":"F8_E4M3","shape":[4],"data_offsets":[0,4]}}', "dtype 'F8_E4M3' is not supported"),
    (b'{"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}', "tensor 'a': shape [-1]"),
    (b'{"a":{"dtype":"F32","shape":[1099511627776,1099511627776],"data_offsets":[0,4]}}', "spans more than 2^60"),
    (b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,0]}}', "data_offsets must be"),
    (b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],'
     b'"data_offsets":[2,6]}}', "overlaps"),
    (b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}', "gap of 4 bytes"),
    (b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"extra":1}}', "exactly dtype, shape, data_offsets"),
])
def test_bad_header(tmp_path, header_bytes, fragment):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(header_bytes)) + header_bytes + b"\0" * 8)
    _expect(path, fragment)


def test_enormous_header_length(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", 1 << 60) + b"{}")
    _expect(path, "exceeds")


@pytest.mark.parametrize("edit, fragments", [
    (lambda e: e["scheme"].update(bits=99), ("quantized tensor 'w'", "field scheme", "bits must be in 1..8")),
    (lambda e: e["scheme"].update(version=99), ("quantized tensor 'w'", "field scheme", "version 99")),
    (lambda e: e["scheme"].update(bits="4"), ("quantized tensor 'w'", "field scheme")),
    (lambda e: e["scheme"]["granularity"].update(type="per_block"), ("'w'", "field scheme", "per_block")),
    (lambda e: e.update(shape=[-6, 48]), ("quantized tensor 'w'", "field shape", "[-6, 48]")),
    (lambda e: e.update(shape=[1 << 40, 1 << 40]), ("quantized tensor 'w'", "field", "shape")),
    (lambda e: e.update(shape=[6, 64]), ("quantized tensor 'w'", "field qweight", "shape [6, 24]")),
    (lambda e: e.update(shape=[6, 40]), ("quantized tensor 'w'", "field qweight", "expected [6, 20]")),
    (lambda e: e.update(shape="6x48"), ("quantized tensor 'w'", "field shape")),
    (lambda e: e.update(dtype="float8"), ("quantized tensor 'w'", "field dtype")),
    (lambda e: e.update(extra=1), ("quantized tensor 'w'", "metadata entry")),
    (lambda e: e["scheme"].update(symmetric=True), ("quantized tensor 'w'", "unexpected tensor 'w.zero_point'")),
    (lambda e: e["scheme"].update(bits=3), ("quantized tensor 'w'", "field qweight", "shape [6, 24]")),
])
def test_hostile_metadata(qfile, edit, fragments):
    _edit_meta(qfile, "w", edit)
    _expect(qfile, *fragments)


def test_unknown_format_version(qfile):
    header, data = _split(qfile)
    header["__metadata__"]["qcore.format_version"] = "2"
    _join(qfile, header, data)
    _expect(qfile, "unknown qcore format version '2'")


def test_quantized_table_not_json(qfile):
    header, data = _split(qfile)
    header["__metadata__"]["qcore.quantized"] = "{oops"
    _join(qfile, header, data)
    _expect(qfile, "qcore.quantized", "not valid JSON")


def test_metadata_without_version(qfile):
    header, data = _split(qfile)
    del header["__metadata__"]["qcore.format_version"]
    _join(qfile, header, data)
    _expect(qfile, "no 'qcore.format_version'")


def test_missing_tensor(qfile):
    header, data = _split(qfile)
    start, end = header.pop("w.scale")["data_offsets"]
    # close the gap so that only the qcore layer can notice
    for entry in header.values():
        if isinstance(entry, dict) and "data_offsets" in entry and entry["data_offsets"][0] >= end:
            entry["data_offsets"] = [o - (end - start) for o in entry["data_offsets"]]
    del data[start:end]
    _join(qfile, header, data)
    _expect(qfile, "quantized tensor 'w'", "field scale", "missing tensor 'w.scale'")


@pytest.mark.parametrize("value", [np.nan, np.inf, 0.0, -1.0])
def test_bad_scale(qfile, value):
    def put(a):
        a[3] = value
    _edit_data(qfile, "w.scale", put)
    _expect(qfile, "quantized tensor 'w'", "field scale", "finite and > 0")


def test_zero_point_out_of_range(qfile):
    def put(a):
        a[0] = 16  # 4 bits: 0..15
    _edit_data(qfile, "w.zero_point", put)
    _expect(qfile, "quantized tensor 'w'", "field zero_point", "0..15")


def test_int8_code_out_of_range(qfile):
    def put(a):
        a[0] = -128  # symmetric codes are -127..127
    _edit_data(qfile, "s.qweight", put)
    _expect(qfile, "quantized tensor 's'", "field qweight")


def test_wrong_dtype_for_field(qfile):
    header, data = _split(qfile)
    header["s.qweight"]["dtype"] = "U8"
    _join(qfile, header, data)
    _expect(qfile, "quantized tensor 's'", "field qweight", "dtype U8, expected I8")


def test_plain_tensor_shadowing_a_quantized_one(qfile):
    header, data = _split(qfile)
    header["w"] = header.pop("b")
    _join(qfile, header, data)
    _expect(qfile, "quantized tensor 'w'", "plain tensor has the same name")


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".pth", ".ckpt"])
def test_pickle_suffix_refused_unread(tmp_path, suffix):
    path = tmp_path / f"pytorch_model{suffix}"
    path.write_bytes(pickle.dumps({"w": [1.0, 2.0]}))
    with pytest.raises(ValueError, match="pickle.*arbitrary code"):
        ck.load(path)


@pytest.mark.parametrize("content", [pickle.dumps({"w": 1}, protocol=4), b"PK\x03\x04" + b"\0" * 60])
def test_pickle_under_a_safetensors_name_refused(tmp_path, content):
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="pickle.*arbitrary code"):
        ck.load(path)


def test_folder_with_only_a_pickle_refused(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(pickle.dumps({}))
    with pytest.raises(ValueError, match="pickle"):
        ck.load(tmp_path)


# ---------------------------------------------------------------------------------------------------------
# Sharded folders
# ---------------------------------------------------------------------------------------------------------

def _sharded(folder):
    folder.mkdir()
    qa = quantize(W, QuantScheme(4, False, PerGroup(16)))
    ck.save(folder / "model-00001-of-00002.safetensors", {"a.weight": qa})
    ck.save(folder / "model-00002-of-00002.safetensors", {"b.bias": W[0].copy()})
    wm = {"a.weight.qweight": "model-00001-of-00002.safetensors", "a.weight.scale": "model-00001-of-00002.safetensors",
          "a.weight.zero_point": "model-00001-of-00002.safetensors", "b.bias": "model-00002-of-00002.safetensors"}
    (folder / ck.INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    return qa, wm


def test_sharded_folder_loads(tmp_path):
    qa, _ = _sharded(tmp_path / "m")
    out = ck.load(tmp_path / "m")
    _same_qa(out["a.weight"], qa)
    assert np.array_equal(out["b.bias"], W[0])


@pytest.mark.parametrize("edit, fragment", [
    (lambda wm: wm.update({"b.bias": "../escape.safetensors"}), "plain file name"),
    (lambda wm: wm.update({"b.bias": "/abs/x.safetensors"}), "plain file name"),
    (lambda wm: wm.update({"b.bias": "model-00003-of-00002.safetensors"}), "does not exist"),
    (lambda wm: wm.pop("a.weight.scale"), "not listed in the index"),
    (lambda wm: wm.update({"ghost": "model-00002-of-00002.safetensors"}), "'ghost' is listed"),
])
def test_hostile_index(tmp_path, edit, fragment):
    _, wm = _sharded(tmp_path / "m")
    edit(wm)
    (tmp_path / "m" / ck.INDEX_NAME).write_text(json.dumps({"weight_map": wm}))
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(").replace(".", r"\.")):
        ck.load(tmp_path / "m")


# ---------------------------------------------------------------------------------------------------------
# Sizes, nesting, special files: what the reader refuses, the writer refuses too
# ---------------------------------------------------------------------------------------------------------

def _raw_file(path, header: dict, data: bytes = b""):
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)
    return path


@pytest.mark.parametrize("name, code, shape, fragment", [
    ("t", "F32", [2**48] * 8 + [0], "spans more than 2^60"),      # safetensors: overflow computing buffer size
    ("t", "F32", [0, 2**48, 2**48], "spans more than 2^60"),      # NumPy: array is too big
    ("t", "F32", [1] * 65, "65 dimensions"),                       # NumPy: at most 64 dimensions
    ("t", "U8", [2**49], "dimensions must be ints in 0.."),
    ("bad\ud800name", "F32", [1], "lone surrogate"),               # serde_json refuses lone surrogates
])
def test_reader_and_writer_refuse_the_same_tensors(tmp_path, name, code, shape, fragment):
    """Before: read_header passed these (load or safetensors then failed with NumPy's or Rust's words), and the
    writer wrote files that load refused."""
    nbytes = math.prod(shape) * ck.DTYPES[code].itemsize if math.prod(shape) < 2**20 else 0
    hdr = {name: {"dtype": code, "shape": shape, "data_offsets": [0, nbytes]}}
    h = json.dumps(hdr).encode()  # ensure_ascii: the surrogate stays a \ud800 escape, as a hostile file has it
    h += b" " * (-len(h) % 8)
    path = tmp_path / "r.safetensors"
    path.write_bytes(struct.pack("<Q", len(h)) + h + b"\0" * nbytes)
    with pytest.raises(ValueError, match=re.escape(fragment)) as info:
        ck.read_header(path)
    assert str(path) in str(info.value)
    _expect(path, str(path), fragment)
    out = tmp_path / "w.safetensors"
    with pytest.raises(ValueError, match=re.escape(fragment)):
        ck.SafetensorsWriter(out, [(name, code, shape)])
    assert not out.exists() and sorted(os.listdir(tmp_path)) == ["r.safetensors"]


def test_writer_refuses_what_the_reader_refuses_in_metadata(tmp_path):
    with pytest.raises(ValueError, match="lone surrogates"):
        ck.SafetensorsWriter(tmp_path / "w.safetensors", [("a", "F32", [1])], {"note": "x\udc80"})
    with pytest.raises(ValueError, match="'__metadata__' is reserved"):
        ck.SafetensorsWriter(tmp_path / "w.safetensors", [("__metadata__", "F32", [1])])
    with pytest.raises(ValueError, match="over the 100000000-byte limit"):
        ck.SafetensorsWriter(tmp_path / "w.safetensors", [("a", "F32", [1])], {"big": "x" * 100_000_001})
    assert os.listdir(tmp_path) == []


def test_64_dimensions_round_trip(tmp_path):
    x = np.arange(2, dtype=np.float32).reshape((1,) * 63 + (2,))
    ck.save(tmp_path / "a.safetensors", {"t": x})
    assert np.array_equal(ck.load(tmp_path / "a.safetensors")["t"], x)
    assert np.array_equal(load_file(tmp_path / "a.safetensors")["t"], x)


DEEP = "[" * 100_000 + "]" * 100_000
SHALLOW_BUT_TOO_DEEP = "[" * 70 + "]" * 70  # under Python's recursion limit: refused by the depth walk


@pytest.mark.parametrize("deep", [DEEP, SHALLOW_BUT_TOO_DEEP])
@pytest.mark.parametrize("where", ["header", "metadata", "index"])
def test_deeply_nested_json_is_a_value_error_naming_the_file(tmp_path, where, deep):
    """Before: RecursionError with a traceback (header, qcore.quantized and index alike)."""
    if where == "header":
        path = _raw_file(tmp_path / "d.safetensors", {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}},
                         b"\0" * 4)
        header, data = _split(path)
        raw = json.dumps(header)[:-1] + ', "b": ' + deep + "}"
        h = raw.encode() + b" " * (-len(raw) % 8)
        path.write_bytes(struct.pack("<Q", len(h)) + h + bytes(data))
        named = path
    elif where == "metadata":
        path = tmp_path / "d.safetensors"
        ck.save(path, {"w": quantize(W, QuantScheme(4))})
        header, data = _split(path)
        header["__metadata__"]["qcore.quantized"] = deep
        _join(path, header, data)
        named = path
    else:
        _sharded(tmp_path / "m")
        index = tmp_path / "m" / ck.INDEX_NAME
        index.write_text(index.read_text()[:-1] + ', "extra": ' + deep + "}")
        path, named = tmp_path / "m", index
    msg = _expect(path, str(named), "nested more than 64 levels")
    assert "Recursion" not in msg


def _alarm(seconds):
    """A hang guard: a blocked open() or read() is interrupted with TimeoutError after ``seconds``."""
    import signal

    def fire(*_):
        raise TimeoutError(f"blocked for more than {seconds} s")
    previous = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    return lambda: (signal.alarm(0), signal.signal(signal.SIGALRM, previous))


@pytest.mark.parametrize("what", ["file", "read_header", "single in folder", "shard", "index"])
def test_fifo_is_refused_not_waited_on(tmp_path, what):
    """Before: open() of a FIFO blocked forever (load, read_header, a folder's model.safetensors, a shard, the
    index). Now: a ValueError naming the path, at once."""
    folder = tmp_path / "m"
    if what in ("shard", "index"):
        _sharded(folder)
        fifo = folder / ("model-00002-of-00002.safetensors" if what == "shard" else ck.INDEX_NAME)
        fifo.unlink()
        target = folder
    elif what == "single in folder":
        folder.mkdir()
        fifo = target = folder / "model.safetensors"
    else:
        fifo = target = tmp_path / "f.safetensors"
    os.mkfifo(fifo)
    done = _alarm(10)
    try:
        with pytest.raises(ValueError, match="FIFO") as info:
            ck.read_header(target) if what == "read_header" else ck.load(target)
    finally:
        done()
    assert str(fifo) in str(info.value)


def test_device_file_is_refused(tmp_path):
    done = _alarm(10)
    try:
        with pytest.raises(ValueError, match="a device"):
            ck.read_header("/dev/zero")
    finally:
        done()


@pytest.mark.parametrize("scheme, value", [(QuantScheme(8, True, PerChannel(0)), 3e38),
                                           (QuantScheme(4, False, PerGroup(16)), 1e38)])
def test_finite_scale_that_makes_a_code_dequantize_to_inf_is_refused(tmp_path, scheme, value):
    """3e38 is finite and > 0, but 127 * 3e38 is inf in float32. Before: loaded, and dequantize gave inf (on
    this branch: refused as 'field qweight'). Now: 'field scale', naming the tensor."""
    path = tmp_path / "q.safetensors"
    ck.save(path, {"w": quantize(W, scheme)})

    def put(a):
        a.reshape(-1)[0] = value
    _edit_data(path, "w.scale", put)
    _expect(path, str(path), "quantized tensor 'w'", "field scale", "dequantize to inf")


def test_load_reads_the_file_its_header_came_from(tmp_path, monkeypatch):
    """The data is read through a descriptor checked against the header's file: a file swapped in between
    (here, replaced by another one) is reported, never mixed with the first file's header."""
    path = tmp_path / "a.safetensors"
    ck.save(path, {"a": np.ones(4, np.float32)})
    real = ck.read_header

    def then_swap(p):
        h = real(p)
        ck.save(path, {"a": np.zeros(4, np.float32)})  # same size, another inode
        return h
    monkeypatch.setattr(ck, "read_header", then_swap)
    _expect(path, "changed after its header was read")


def test_nonzero_padding_bits_are_refused(tmp_path):
    """7 codes of 3 bits fill 21 bits of 3 bytes; the top 3 bits of each row's last byte are padding, zero in
    the layout (found by the mutation test). Before: loaded, the padding silently ignored."""
    path = tmp_path / "q.safetensors"
    ck.save(path, {"w": quantize(W[:2, :7].copy(), QuantScheme(3, True, PerTensor()))})

    def put(a):
        a.reshape(2, 3)[1, 2] |= 0x80
    _edit_data(path, "w.qweight", put)
    _expect(path, "quantized tensor 'w'", "field qweight", "padding bits of the last byte of row (1,)")


def test_saving_to_a_folder_names_the_folder_before_writing(tmp_path):
    (tmp_path / "d").mkdir()
    for overwrite in (False, True):
        with pytest.raises(IsADirectoryError, match=r"d is a folder; a checkpoint is written to a file path"):
            ck.save(tmp_path / "d", {"w": np.ones(4, np.float32)}, overwrite=overwrite)
    assert os.listdir(tmp_path) == ["d"] and not os.listdir(tmp_path / "d")
