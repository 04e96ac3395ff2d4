"""The "compressed-tensors" checkpoint format (pack-quantized), written and read without torch.

The bytes are pinned by golden words taken from the layout the module docstring states (and, in
tests/qtorch/test_compressed_tensors.py, by the compressed-tensors package's own pack_to_int32 and loaders).
"""

import json
import os

import ml_dtypes
import numpy as np
import pytest

from qcore import PerChannel, PerGroup, PerTensor, QuantizedArray, QuantScheme, dequantize, quantize
from qcore import checkpoint as ck
from qcore import cli, convert, formats
from qcore.formats import compressed_tensors as ctf

CT = formats.get_format("compressed-tensors")


def values(shape, salt, dtype=np.float32):
    i = np.arange(int(np.prod(shape)), dtype=np.int64)
    v = (((i * 7919 + salt * 104729) % 1009) - 504).astype(np.float32) / np.float32(97.0)
    return v.reshape(shape).astype(dtype)


def read(path):
    """{name: array} of a safetensors file, as stored (no decoding)."""
    return ck._read_tensors(ck.read_header(path))


def test_registered_and_offered_by_the_command_line():
    assert formats.format_names() == ["compressed-tensors", "qcore"]
    action = next(a for a in cli.build_parser()._subparsers._group_actions[0].choices["quantize"]._actions
                  if a.dest == "format")
    # the checkpoint formats, then the file formats (GGUF: qcore.formats.gguf_model)
    assert list(action.choices) == formats.output_format_names() == formats.format_names() + ["gguf"]
    assert action.default == "qcore"


def test_a_format_registered_later_is_a_choice_by_itself():
    class Later(type(CT)):
        name, metadata_prefix = "later", "later."

    formats.register_format(Later())
    try:
        action = next(a for a in cli.build_parser()._subparsers._group_actions[0].choices["quantize"]._actions
                      if a.dest == "format")
        assert "later" in action.choices
    finally:
        del formats._REGISTRY["later"]


def test_entries_name_dtype_and_shape():
    s = QuantScheme(4, False, PerGroup(32))
    assert CT.entries("m.fc.weight", (70, 96), s) == [
        ("m.fc.weight_packed", "I32", (70, 12)), ("m.fc.weight_scale", "F32", (70, 3)),
        ("m.fc.weight_zero_point", "I32", (9, 3)), ("m.fc.weight_shape", "I64", (2,))]
    assert CT.entries("fc.weight", (5, 40), QuantScheme(3, True, PerChannel(0))) == [
        ("fc.weight_packed", "I32", (5, 4)), ("fc.weight_scale", "F32", (5, 1)), ("fc.weight_shape", "I64", (2,))]
    assert CT.entries("fc.weight", (5, 40), QuantScheme(8, True, PerTensor()))[1] == ("fc.weight_scale", "F32", (1,))


def test_golden_words_codes_offset_and_zero_points_packed_along_rows():
    # asymmetric 4-bit: codes u stored as they are (their q = u - 8 plus the offset 8); row i holds codes i..i+7
    codes = (np.arange(8)[None, :] + np.arange(8)[:, None]).astype(np.uint8) % 16
    zp = np.arange(8, dtype=np.uint8).reshape(8, 1)  # one zero point per row: 0..7
    qa = QuantizedArray.from_parts(codes, np.ones(8, np.float32), zp.reshape(8), QuantScheme(4, False, PerChannel(0)))
    parts = CT.encode("fc.weight", qa)
    assert parts["fc.weight_packed"].dtype == np.int32
    assert parts["fc.weight_packed"][0, 0] == 0x76543210 and parts["fc.weight_packed"][1, 0] == (0x87654321 - 2**32)
    assert parts["fc.weight_zero_point"].tolist() == [[0x76543210]]  # 8 rows' zero points in one word
    assert parts["fc.weight_shape"].tolist() == [8, 8]
    # symmetric 4-bit: qcore's codes -7..7, stored with the offset 8 (as theirs, whose range adds -8)
    sym = QuantizedArray.from_parts(np.array([[-7, -1, 0, 1, 7, 0, 0, 0]], np.int8), np.ones(1, np.float32), None,
                                    QuantScheme(4, True, PerChannel(0)))
    assert CT.encode("fc.weight", sym)["fc.weight_packed"].tolist() == [[0x888F9871 - 2**32]]
    # 3 bits straddle bytes; a row of 12 codes (36 bits) takes two words, the rest zero
    three = QuantizedArray.from_parts(np.full((1, 12), 7, np.uint8), np.ones(1, np.float32), np.zeros(1, np.uint8),
                                      QuantScheme(3, False, PerChannel(0)))
    assert CT.encode("fc.weight", three)["fc.weight_packed"].tolist() == [[-1, 0xF]]


@pytest.mark.parametrize("bits, asym", [(b, a) for b in range(1, 9) for a in (False, True) if a or b > 1])
@pytest.mark.parametrize("gran", ["channel", "group"])
def test_save_load_round_trip_is_exact(tmp_path, bits, asym, gran):
    s = QuantScheme(bits, not asym, PerGroup(16) if gran == "group" else PerChannel(0))
    qa = quantize(values((37, 48), bits), s)  # 37 rows: zero points fill 1..2 words with padding
    path = str(tmp_path / "m.safetensors")
    ck.save(path, {"blk.fc.weight": qa, "blk.fc.bias": values((37,), 1)}, format="compressed-tensors")
    back = ck.load(path)
    b = back["blk.fc.weight"]
    assert b.scheme == s and np.array_equal(b.codes, qa.codes) and np.array_equal(b.scale, qa.scale)
    assert (b.zero_point is None) == (qa.zero_point is None)
    if asym:
        assert np.array_equal(b.zero_point, qa.zero_point)
    assert np.array_equal(back["blk.fc.bias"], values((37,), 1))


def test_the_file_carries_format_pt_and_loads_through_the_generic_reader(tmp_path):
    path = str(tmp_path / "m.safetensors")
    ck.save(path, {"fc.weight": quantize(values((8, 32), 1), QuantScheme(4, False, PerGroup(32)))},
            format="compressed-tensors")
    header = ck.read_header(path)
    assert header.metadata["format"] == "pt" and formats.format_of(header.metadata).name == "compressed-tensors"
    assert list(ck.quantized_metadata(header)) == ["fc.weight"]


def model_folder(folder, rows=70, dtype=ml_dtypes.bfloat16):
    """A Llama-like folder: an embedding, two Linear weights (rows not a multiple of 32), a norm, lm_head."""
    os.makedirs(folder)
    tensors = {"model.embed_tokens.weight": values((20, 64), 1, dtype),
               "model.layers.0.mlp.up_proj.weight": values((rows, 64), 2, dtype),
               "model.layers.0.mlp.down_proj.weight": values((64, rows), 3, dtype)[:, :64],
               "model.norm.weight": values((64,), 4, dtype), "lm_head.weight": values((20, 64), 5, dtype)}
    ck.save(os.path.join(folder, "model.safetensors"), tensors)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}, f)
    return tensors


def test_streamed_pieces_equal_one_whole_write(tmp_path, monkeypatch):
    """Zero points are packed along the rows: pieces must hold whole words of them (32 rows at 4 bits)."""
    model_folder(tmp_path / "in")
    monkeypatch.setattr(convert, "CHUNK_ELEMENTS", 40 * 64)  # pieces of 40 rows before rounding down to 32
    convert.quantize_checkpoint(tmp_path / "in", tmp_path / "out", bits=4, symmetric=False, group_size=32,
                                quiet=True, format="compressed-tensors")
    got = read(str(tmp_path / "out" / "model.safetensors"))
    w = values((70, 64), 2, ml_dtypes.bfloat16).astype(np.float32)
    whole = CT.encode("model.layers.0.mlp.up_proj.weight", quantize(w, QuantScheme(4, False, PerGroup(32))))
    for name, arr in whole.items():
        assert np.array_equal(got[name], arr), name


def test_folder_config_is_compressed_tensors_own_and_names_dense_weights(tmp_path):
    model_folder(tmp_path / "in")
    assert cli.main(["quantize", str(tmp_path / "in"), str(tmp_path / "out"), "--bits", "4", "--asymmetric",
                     "--group-size", "32", "--format", "compressed-tensors", "-q"]) == 0
    qc = json.load(open(tmp_path / "out" / "config.json"))["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert "quantizer" not in qc  # qcore's marker is only for the qcore format
    assert qc["ignore"] == ["lm_head", "model.embed_tokens"]
    (group,) = qc["config_groups"].values()
    assert group["targets"] == ["Linear"]
    assert group["weights"] == {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "group",
                                "group_size": 32, "dynamic": False, "actorder": None, "observer": "minmax"}
    loaded = ctf.load_folder(tmp_path / "out")  # the reader of others' folders reads ours too
    w = values((70, 64), 2, ml_dtypes.bfloat16).astype(np.float32)
    ref = quantize(w, QuantScheme(4, False, PerGroup(32)))
    assert np.array_equal(dequantize(loaded["model.layers.0.mlp.up_proj.weight"]), dequantize(ref))
    assert loaded["lm_head.weight"].dtype == ml_dtypes.bfloat16


def test_a_group_that_does_not_divide_is_written_with_ceil_groups(tmp_path, capsys):
    model_folder(tmp_path / "in", rows=72)  # down_proj is [64, 64], up_proj [72, 64]: groups of 48 and 16
    rc = cli.main(["quantize", str(tmp_path / "in"), str(tmp_path / "out"), "--bits", "4", "--group-size", "48",
                   "--format", "compressed-tensors"])
    assert rc == 0, capsys.readouterr().err
    loaded = ctf.load_folder(tmp_path / "out")
    assert loaded["model.layers.0.mlp.up_proj.weight"].scale.shape == (72, 2)


def test_a_tensor_that_is_not_a_module_weight_is_refused_before_writing(tmp_path, capsys):
    os.makedirs(tmp_path / "in")
    ck.save(str(tmp_path / "in" / "model.safetensors"), {"proj": values((8, 32), 1)})
    rc = cli.main(["quantize", str(tmp_path / "in"), str(tmp_path / "out"), "--include", "proj", "--format",
                   "compressed-tensors"])
    err = capsys.readouterr().err
    assert rc == 1 and "proj [8, 32]" in err and "must end in .weight" in err and "nothing was written" in err
    assert not os.path.exists(tmp_path / "out")


def ct_arrays(codes_u, bits, scale, zp_u=None):
    """Entries of a module "fc" as compressed-tensors writes them, built by hand from unsigned codes."""
    from qcore.packing import pack

    rows, cols = codes_u.shape
    out = {"fc.weight_packed": ctf._to_words(pack(codes_u, bits)), "fc.weight_scale": scale,
           "fc.weight_shape": np.array([rows, cols], np.int64)}
    if zp_u is not None:
        out["fc.weight_zero_point"] = np.ascontiguousarray(ctf._to_words(pack(zp_u.T, bits)).T)
    return out


def test_their_full_symmetric_range_is_imported_exactly_as_asymmetric():
    s = QuantScheme(4, True, PerChannel(0))
    codes_u = np.array([[0, 8, 15, 1], [1, 8, 15, 2]], np.uint8)  # row 0 uses their code -8
    arrays = ct_arrays(codes_u, 4, np.array([[0.5], [0.25]], np.float32))
    qa = ctf.decode_parts(arrays, "fc", s, "full")
    assert qa.scheme == QuantScheme(4, False, PerChannel(0)) and qa.zero_point.tolist() == [8, 8]
    assert dequantize(qa).tolist() == [[-4.0, 0.0, 3.5, -3.5], [-1.75, 0.0, 1.75, -1.5]]
    inside = ctf.decode_parts(ct_arrays(codes_u[1:], 4, np.array([[0.25]], np.float32)), "fc", s, "full")
    assert inside.scheme == s and inside.codes.tolist() == [[-7, 0, 7, -6]]


def test_their_bfloat16_scales_widen_exactly():
    scale = np.array([[0.3], [0.7]], np.float32).astype(ml_dtypes.bfloat16)
    qa = ctf.decode_parts(ct_arrays(np.full((2, 8), 9, np.uint8), 4, scale), "fc", QuantScheme(4, True,
                          PerChannel(0)), "full")
    assert qa.scale.tolist() == scale.astype(np.float32).reshape(2).tolist()


@pytest.mark.parametrize("damage, message", [
    (lambda a: a["fc.weight_packed"].__setitem__((1, 0), a["fc.weight_packed"][1, 0] | 1 << 28),
     "padding bits after the 6 codes of row 1"),
    (lambda a: a.__setitem__("fc.weight_shape", np.array([2, 9], np.int64)), "field weight_packed: shape"),
    (lambda a: a.__setitem__("fc.weight_scale", np.ones((2, 2), np.float32)), "field weight_scale: shape"),
    (lambda a: a.pop("fc.weight_shape"), "missing tensor fc.weight_shape"),
    (lambda a: a.__setitem__("fc.weight_scale", np.array([[1.0], [np.nan]], np.float32)), "finite"),
])
def test_a_damaged_module_is_a_clear_error(damage, message):
    arrays = ct_arrays(np.full((2, 6), 9, np.uint8), 4, np.ones((2, 1), np.float32))
    damage(arrays)
    with pytest.raises(ValueError, match=message):
        ctf.decode_parts(arrays, "fc", QuantScheme(4, True, PerChannel(0)), "full")


def test_load_folder_of_another_writer_uses_config_json(tmp_path):
    """A folder without qcore's metadata (as the compressed-tensors package writes it): the scheme is config.json's."""
    os.makedirs(tmp_path / "f")
    zp_u = np.array([[3], [12]], np.uint8)
    arrays = ct_arrays(np.arange(64, dtype=np.uint8).reshape(2, 32) % 16, 4, np.array([[0.5], [2.0]], np.float32),
                       zp_u)
    arrays["fc.bias"] = np.zeros(2, np.float32)
    with ck.SafetensorsWriter(str(tmp_path / "f" / "model.safetensors"),
                              [(n, a.dtype, a.shape) for n, a in arrays.items()], {"format": "pt"}) as w:
        for n, a in arrays.items():
            w.write(n, a)
    qc = {"quant_method": "compressed-tensors", "format": "pack-quantized", "ignore": [],
          "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
              "num_bits": 4, "type": "int", "symmetric": False, "strategy": "channel"}}}}
    with open(tmp_path / "f" / "config.json", "w") as f:
        json.dump({"quantization_config": qc}, f)
    got = ctf.load_folder(tmp_path / "f")
    qa = got["fc.weight"]
    assert qa.scheme == QuantScheme(4, False, PerChannel(0)) and qa.zero_point.tolist() == [3, 12]
    assert dequantize(qa)[1, :3].tolist() == [(0 - 12) * 2.0, (1 - 12) * 2.0, (2 - 12) * 2.0]
    assert set(got) == {"fc.weight", "fc.bias"}
    qc["config_groups"]["group_0"]["input_activations"] = {"num_bits": 8, "type": "int"}
    with open(tmp_path / "f" / "config.json", "w") as f:
        json.dump({"quantization_config": qc}, f)
    with pytest.raises(ValueError, match="activation quantization is not imported"):
        ctf.load_folder(tmp_path / "f")
