"""qcore.formats: the format seam of the checkpoint writer and reader.

The qcore format writes byte for byte what the writer wrote before the seam (digests taken from files written by
that code), and a new format is one class plus one registration: save, load, ``quantize_checkpoint`` and the
layout checks follow it without other changes.
"""

import hashlib
import json
import os

import ml_dtypes
import numpy as np
import pytest

from qcore import PerChannel, PerGroup, PerTensor, QuantizedArray, QuantScheme, quantize
from qcore import checkpoint as ck
from qcore import formats
from qcore.convert import quantize_checkpoint
from qcore.formats import CheckpointFormat, format_of, get_format, register_format


def values(shape, salt, dtype):
    """Exact, platform-independent test data: integers / 97, no random generator involved."""
    i = np.arange(int(np.prod(shape)), dtype=np.int64)
    v = (((i * 7919 + salt * 104729) % 1009) - 504).astype(np.float32) / np.float32(97.0)
    return v.reshape(shape).astype(dtype)


def digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def two_shards(folder):
    bf = ml_dtypes.bfloat16
    shards = [{"model.embed_tokens.weight": values((20, 32), 1, bf),
               "model.layers.0.q_proj.weight": values((16, 32), 2, bf),
               "model.layers.0.q_proj.bias": values((16,), 3, bf),
               "model.layers.0.up_proj.weight": values((24, 32), 4, np.float32)},
              {"model.layers.1.q_proj.weight": values((16, 32), 5, np.float16),
               "model.norm.weight": values((32,), 6, bf),
               "model.layers.1.down_proj.weight": values((32, 24), 7, np.float64),
               "lm_head.weight": values((20, 32), 8, bf), "model.positions": np.arange(8, dtype=np.int64)}]
    os.makedirs(folder)
    weight_map = {}
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-00002.safetensors"
        with ck.SafetensorsWriter(os.path.join(folder, fname), [(n, a.dtype, a.shape) for n, a in shard.items()],
                                  {"format": "pt"}) as w:
            for n, a in shard.items():
                w.write(n, a)
                weight_map[n] = fname
    with open(os.path.join(folder, ck.INDEX_NAME), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


#: sha256 of the files written before the format seam existed, for the inputs above.
GOLDEN = {
    "save/2FalsePerChannel": "4b9fccaf6bc9d889ddf586fc64781f3bff9757384f642e473221f0fe47e04ead",
    "save/4FalsePerGroup": "1035628a9059551513665b891532ec0859f0be2936f8bf624ede7405bbdcb773",
    "save/5TruePerTensor": "a4cf608d0f0b2a72f034a7512cd306f3240f7db9b4275a709eb6f8bd4537227f",
    "save/8TruePerChannel": "06e36356be856a53fadbdab05311dcb51b8294cec510efb571d20a5a5c57d273",
    "w3g8/model-00001-of-00002.safetensors": "c993bd4e78a988e51090b62a7d8d043f239f33fed035d763a71f926f16f81690",
    "w3g8/model-00002-of-00002.safetensors": "695b3d18d5e6c96e93f5f24066f69f5e0a3bf04ef401debd433294b0e59a8676",
    "w3g8/model.safetensors.index.json": "761ad2b9418bd6cb2b13a26af32a770bbc57b355ee949a2a87e1ffb564403f1a",
    "w4g8/model-00001-of-00002.safetensors": "c1836991003c4cd287f0aed6dbeab1690f2d17ab4da3c9e01130289d2103e90d",
    "w4g8/model-00002-of-00002.safetensors": "e565544b42e1de9ec1b92b547655044bceb24a64daaad7035e914b0991f2fa37",
    "w4g8/model.safetensors.index.json": "d73efe0581cd4a32c1a18ad938921eb6b8bd523ab5e7b74a0c19fdc03cd72633",
    "w8/model-00001-of-00002.safetensors": "138959bedeed9ef209053700f22742597dbabde766890929c82827605b9e6242",
    "w8/model-00002-of-00002.safetensors": "c31710dc0724f66fd8827d4c1293d61a1699346b630dcc4ec77fcf002a05f535",
    "w8/model.safetensors.index.json": "6c782a1db0983225a50ad37f429f8a66d226d08d82fc3f74334c408830aad0c7",
    "w8a/model-00001-of-00002.safetensors": "1f4c1eff0bf8b4d919d38e1bb16f87f4c35d4505de14ffa8850b77db4f137a45",
    "w8a/model-00002-of-00002.safetensors": "ec2074570d64a77f0142e9e5ccb4768d67c36c5522b13581afb870bc98725be3",
    "w8a/model.safetensors.index.json": "645f0d4cf51f6d80ce0bfb547052502530e09a463f636ea6276b102c7304415d"
}

CONVERT_RUNS = {"w8": {}, "w4g8": dict(bits=4, symmetric=False, group_size=8),
                "w3g8": dict(bits=3, symmetric=False, group_size=8), "w8a": dict(bits=8, symmetric=False)}
SAVE_RUNS = {"save/8TruePerChannel": QuantScheme(8, True, PerChannel(0)),
             "save/4FalsePerGroup": QuantScheme(4, False, PerGroup(8)),
             "save/5TruePerTensor": QuantScheme(5, True, PerTensor()),
             "save/2FalsePerChannel": QuantScheme(2, False, PerChannel(1))}


def test_qcore_format_output_is_byte_for_byte_what_it_was(tmp_path):
    src = tmp_path / "src"
    two_shards(src)
    got = {}
    for tag, kwargs in CONVERT_RUNS.items():
        quantize_checkpoint(src, tmp_path / tag, quiet=True, **kwargs)
        for f in sorted(os.listdir(tmp_path / tag)):
            if f.endswith(".safetensors") or f == ck.INDEX_NAME:
                got[f"{tag}/{f}"] = digest(tmp_path / tag / f)
    x = values((6, 24), 9, np.float32)
    for tag, scheme in SAVE_RUNS.items():
        path = tmp_path / "s.safetensors"
        ck.save(path, {"w": quantize(x, scheme), "b": x[0].copy()}, {"k": "v"})
        got[tag] = digest(path)
    assert got == GOLDEN


def test_the_qcore_format_is_registered_and_unknown_names_are_refused():
    assert get_format() is get_format("qcore") and get_format().version == ck.FORMAT_VERSION
    assert "qcore" in formats.format_names()
    with pytest.raises(ValueError, match="unknown checkpoint format 'gguf'; known: .*qcore"):
        get_format("gguf")
    with pytest.raises(ValueError, match="clashes with the registered"):
        register_format(type(get_format())())
    with pytest.raises(TypeError, match="CheckpointFormat"):
        register_format(object())


# ---------------------------------------------------------------------------------------------------------
# A new format: one class, one registration
# ---------------------------------------------------------------------------------------------------------

class Unpacked(CheckpointFormat):
    """A toy format: codes unpacked as ``W.codes``, parameters as ``W.scales`` / ``W.zeros``, table in ``toy.``."""

    name, version, metadata_prefix = "toy", 3, "toy."

    def entries(self, name, shape, scheme):
        p = tuple(scheme.params_shape(tuple(shape)))
        out = [(f"{name}.codes", "I8" if scheme.symmetric else "U8", tuple(shape)), (f"{name}.scales", "F32", p)]
        return out + ([] if scheme.symmetric else [(f"{name}.zeros", "U8", p)])

    def candidates(self, name):
        return (f"{name}.codes", f"{name}.scales", f"{name}.zeros")

    def encode(self, name, qa):
        out = {f"{name}.codes": qa.codes, f"{name}.scales": qa.scale}
        if qa.zero_point is not None:
            out[f"{name}.zeros"] = qa.zero_point
        return out

    def decode(self, path, name, scheme, shape, arrays):
        return QuantizedArray.from_parts(arrays[f"{name}.codes"], arrays[f"{name}.scales"],
                                         arrays.get(f"{name}.zeros"), scheme)

    def describe(self, scheme, shape, dtype=None):
        return {"scheme": scheme.to_dict(), "shape": list(shape)}

    def file_metadata(self, described, extra=None):
        return {**(extra or {}), "toy.table": json.dumps(dict(described), sort_keys=True)}

    def read_table(self, header):
        table = json.loads(header.metadata.get("toy.table", "{}"))
        return {n: (QuantScheme.from_dict(e["scheme"]), tuple(e["shape"]), None) for n, e in table.items()}

    def index_metadata(self):
        return {"toy.version": "3"}


@pytest.fixture
def toy():
    fmt = register_format(Unpacked())
    yield fmt
    del formats._REGISTRY[fmt.name]


def test_a_registered_format_is_written_and_read_back(tmp_path, toy):
    x = values((6, 24), 9, np.float32)
    qa = quantize(x, QuantScheme(4, False, PerGroup(8)))
    path = tmp_path / "t.safetensors"
    ck.save(path, {"w": qa, "b": x[0].copy()}, format="toy")
    header = ck.read_header(path)
    assert sorted(header.tensors) == ["b", "w.codes", "w.scales", "w.zeros"] and "toy.table" in header.metadata
    assert format_of(header.metadata) is toy
    out = ck.load(path)
    assert np.array_equal(out["w"].codes, qa.codes) and np.array_equal(out["w"].scale, qa.scale)
    assert list(ck.quantized_metadata(header)) == ["w"]
    # the layout checks follow the format: a stray entry of the format is refused by name
    ck.save(tmp_path / "bad.safetensors", {"w": quantize(x, QuantScheme(4, True, PerGroup(8))),
                                           "w.zeros": np.zeros((6, 3), np.uint8)}, format="toy")
    with pytest.raises(ValueError, match="unexpected tensor 'w.zeros'"):
        ck.load(tmp_path / "bad.safetensors")


def test_quantize_checkpoint_writes_a_registered_format(tmp_path, toy):
    src = tmp_path / "src"
    two_shards(src)
    quantize_checkpoint(src, tmp_path / "out", bits=4, symmetric=False, group_size=8, quiet=True, format="toy")
    index = json.loads((tmp_path / "out" / ck.INDEX_NAME).read_text())
    assert index["metadata"]["toy.version"] == "3" and "model.layers.0.q_proj.weight.codes" in index["weight_map"]
    ref = tmp_path / "ref"
    quantize_checkpoint(src, ref, bits=4, symmetric=False, group_size=8, quiet=True)
    got, want = ck.load(tmp_path / "out"), ck.load(ref)
    assert set(got) == set(want)
    for name, v in want.items():
        if isinstance(v, QuantizedArray):
            assert np.array_equal(got[name].codes, v.codes) and np.array_equal(got[name].scale, v.scale), name
        else:
            assert got[name].tobytes() == v.tobytes(), name
    # a file of one format is not quantized again, whichever format it is in
    with pytest.raises(ValueError, match=r"already a quantized checkpoint \(toy format\)"):
        quantize_checkpoint(tmp_path / "out", tmp_path / "again", quiet=True)


def test_metadata_of_two_formats_in_one_file_is_refused(tmp_path, toy):
    path = tmp_path / "m.safetensors"
    ck.save(path, {"b": np.zeros(3, np.float32)}, {"toy.table": "{}"})
    with pytest.raises(ValueError, match=r"metadata of several checkpoint formats \(qcore, toy\)"):
        ck.load(path)


def test_the_library_modules_of_the_command_do_not_import_torch():
    import subprocess
    import sys

    code = ("import sys, qcore.convert, qcore.model_folder, qcore.formats, qcore.labels, qcore.cli\n"
            "print(','.join(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
