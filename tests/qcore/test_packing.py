"""qcore.packing: the byte layout of docs/packing.md, round trips, and the errors at the boundary.

The reference below is a plain NumPy bit stream (np.unpackbits / np.packbits with bitorder="little"),
written independently of the numba kernels.
"""

import doctest
import re
import time

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import qcore
from qcore import _parallel, packing
from qcore.packing import pack, packed_shape, unpack
from qcore.testing.checks import ref_pack  # element i -> stream bits [i*b, (i+1)*b), LSB first, zero padding
from qcore.testing.strategies import LEADING_SHAPES, ROW_LENGTHS

WIDTHS = list(range(1, 9))


# --- the NumPy bit-stream reference ---------------------------------------------------------------


def ref_unpack(packed, bits, n):
    stream = np.unpackbits(packed, axis=-1, bitorder="little", count=n * bits)
    per_code = stream.reshape(packed.shape[:-1] + (n, bits)).astype(np.uint16)
    return (per_code << np.arange(bits, dtype=np.uint16)).sum(axis=-1).astype(np.uint8)


def random_codes(seed, shape, bits):
    return np.random.default_rng(seed).integers(0, 1 << bits, shape, dtype=np.uint8)


def check_round_trip(codes, bits):
    packed = pack(codes, bits)
    assert packed.dtype == np.uint8 and packed.flags.c_contiguous
    assert packed.shape == packed_shape(codes.shape, bits)
    np.testing.assert_array_equal(packed, ref_pack(codes, bits))
    back = unpack(packed, bits, codes.shape[-1])
    assert back.dtype == np.uint8 and back.shape == codes.shape
    np.testing.assert_array_equal(back, codes)
    return packed


# --- the documented layout ------------------------------------------------------------------------


def test_golden_bytes_from_the_module_docstring():
    doc = packing.__doc__
    m = re.search(r"``pack\(np\.array\(\[([\d, ]+)\], np\.uint8\), (\d)\)`` is ``\[([0-9xA-F, ]+)\]``", doc)
    assert m, "the worked example is missing from the module docstring"
    codes = np.array([int(v) for v in m.group(1).split(",")], np.uint8)
    bits = int(m.group(2))
    golden = [int(v, 16) for v in m.group(3).split(",")]
    assert (codes.tolist(), bits, golden) == ([5, 3, 7, 0, 6], 3, [0xDD, 0x61])
    assert pack(codes, bits).tolist() == golden
    assert unpack(np.array(golden, np.uint8), bits, len(codes)).tolist() == codes.tolist()


def test_docstring_examples_run():
    failures, tried = doctest.testmod(packing, globs={"np": np, **vars(packing)}, verbose=False)
    assert tried >= 2 and failures == 0


@pytest.mark.parametrize(
    "codes, bits, golden",
    [
        ([1, 2, 3], 4, [0x21, 0x03]),  # byte[j] = c[2j] | c[2j+1] << 4, zero padding
        ([1, 0, 1, 1, 0, 0, 0, 1, 1], 1, [0b10001101, 0b1]),
        ([3, 0, 1, 2, 1], 2, [0b10010011, 0b01]),
        ([31, 1], 5, [0x3F, 0x00]),  # 11111 10000 000000 -> 0b00111111, 0b00000000
        ([127, 1, 64], 7, [0xFF, 0x00, 0x10]),
        ([0xAB, 0x01], 8, [0xAB, 0x01]),  # bits=8 is the identity
    ],
)
def test_golden_bytes_small(codes, bits, golden):
    assert pack(np.array(codes, np.uint8), bits).tolist() == golden
    assert ref_pack(np.array(codes, np.uint8), bits).tolist() == golden


@pytest.mark.parametrize("bits", WIDTHS)
def test_exhaustive_every_code_at_every_phase(bits):
    """Every code value at every position of a group of 8 (the straddling widths wrap every 8
    codes), alone in a row of zeros, next to all-ones neighbours, and rows of every value."""
    top = (1 << bits) - 1
    values = np.arange(1 << bits, dtype=np.uint8)
    rows = []
    for fill in (0, top):
        for i in range(9):
            r = np.full((values.size, 9), fill, np.uint8)
            r[:, i] = values
            rows.append(r)
    grid = np.concatenate(rows)  # (2 * 9 * 2^b, 9): 9 codes -> a partial last byte for every width
    check_round_trip(grid, bits)
    for n in range(1, 18):  # all values in one stream, every row length up to 17
        stream = np.resize(values, (3, n * values.size))
        check_round_trip(stream, bits)
        check_round_trip(stream[0], bits)


@pytest.mark.parametrize("bits", WIDTHS)
def test_against_numpy_bitstream_reference(bits):
    for shape in [(1,), (7,), (8,), (63,), (64,), (65,), (129,), (3, 33), (2, 5, 64), (4, 1000), (6, 1021)]:
        check_round_trip(random_codes(bits, shape, bits), bits)


@pytest.mark.parametrize("bits", WIDTHS)
def test_large_arrays_split_across_threads(bits, monkeypatch):
    monkeypatch.setattr(_parallel, "NUM_THREADS", 3)  # exercise the split even on a 1-cpu machine
    monkeypatch.setattr(_parallel, "DYNAMIC", False)  # ... or a busy one
    # one long row with a tail, byte-aligned rows (one stream), and rows that end mid-byte
    for shape in [(1, (1 << 20) + 13), (1024, 1024), (301, 4001)]:
        check_round_trip(random_codes(shape[1] + bits, shape, bits), bits)
    deadline = time.monotonic() + 10
    while _parallel._ACTIVE_WORKERS and time.monotonic() < deadline:  # late pool threads find no work
        time.sleep(0.01)
    assert _parallel._ACTIVE_WORKERS == 0


@pytest.mark.parametrize("bits", [1, 3, 4, 6, 7])
def test_bytewise_rows_path_alone(bits, monkeypatch):
    """The path big-endian machines take for every shape (here forced on any machine)."""
    monkeypatch.setattr(packing, "_LITTLE_ENDIAN", False)
    for shape in [(1,), (200,), (3, 64), (5, 33), (2, 2, 1000)]:
        check_round_trip(random_codes(bits, shape, bits), bits)


def test_thread_count_follows_idle_cores(monkeypatch):
    monkeypatch.setattr(_parallel._team, "on_torch_team", lambda: False)  # qcore's own team or threads
    monkeypatch.setattr(_parallel, "NUM_THREADS", 4)
    assert 1 <= _parallel.threads() <= 4
    monkeypatch.setattr(_parallel, "busy_cores", lambda: 100.0)
    assert _parallel.threads() == 1
    monkeypatch.setattr(_parallel, "busy_cores", lambda: 0.0)
    assert _parallel.threads() == min(4, _parallel.CPUS)
    monkeypatch.setattr(_parallel, "DYNAMIC", False)
    monkeypatch.setattr(_parallel, "busy_cores", lambda: 100.0)
    assert _parallel.threads() == 4


def test_all_zero_and_all_max_rows():
    for bits in WIDTHS:
        for fill in (0, (1 << bits) - 1):
            codes = np.full((5, 77), fill, np.uint8)
            packed = check_round_trip(codes, bits)
            if fill == 0:
                assert not packed.any()


def test_accepts_any_integer_dtype_and_lists():
    codes = np.array([[0, 3, 1], [2, 2, 3]])
    expected = pack(codes.astype(np.uint8), 2)
    for dtype in (np.int8, np.int16, np.int32, np.int64, np.uint16, np.uint32, np.uint64):
        np.testing.assert_array_equal(pack(codes.astype(dtype), 2), expected)
    np.testing.assert_array_equal(pack(codes.tolist(), 2), expected)
    np.testing.assert_array_equal(pack(codes, np.int64(2)), expected)
    np.testing.assert_array_equal(pack(np.array([255, 0], np.int32), 8), [255, 0])


def test_packed_shape():
    assert packed_shape((4096, 4096), 4) == (4096, 2048)
    assert packed_shape((5,), 3) == (2,)
    assert packed_shape(5, 3) == (2,)
    assert packed_shape((2, 3, 0), 7) == (2, 3, 0)
    assert packed_shape((0, 9), 1) == (0, 2)
    assert packed_shape([3, 10], 8) == (3, 10)
    for n in range(40):
        for bits in WIDTHS:
            assert packed_shape((2, n), bits) == (2, -(-n * bits // 8))


def test_empty_shapes():
    for shape in [(0,), (3, 0), (0, 5), (2, 0, 4)]:
        for bits in (1, 3, 8):
            check_round_trip(np.zeros(shape, np.uint8), bits)


def test_output_is_a_new_array():
    codes = np.arange(16, dtype=np.uint8)
    for bits in (4, 8):
        packed = pack(codes, bits)
        assert not np.shares_memory(packed, codes)
        assert not np.shares_memory(unpack(packed, bits, 16), packed)


# --- the compressed-tensors consequence (docs/packing.md) --------------------------------------


def pack_to_int32_reference(value, num_bits):
    """compressed-tensors' ``pack_to_int32`` (the layout vLLM loads), written out in NumPy: signed int8
    values are offset by 2^(b-1) to unsigned, then each int32 holds 32/b consecutive values of a row,
    value i of the word at bit i*b."""
    assert value.dtype == np.int8 and num_bits in (2, 4, 8)
    unsigned = (value.astype(np.int32) + (1 << (num_bits - 1))).astype(np.uint32)
    pack_factor = 32 // num_bits
    rows, cols = unsigned.shape
    packed = np.zeros((rows, -(-cols // pack_factor)), np.uint32)
    for i in range(pack_factor):
        packed |= unsigned[:, i::pack_factor] << np.uint32(num_bits * i)
    return packed.astype(np.int32)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_rows_viewed_as_int32_are_compressed_tensors_pack_to_int32(bits):
    rng = np.random.default_rng(bits)
    half = 1 << (bits - 1)
    for cols in (32, 64, 96, 4096):
        signed = rng.integers(-half, half, (7, cols), dtype=np.int8)  # full signed range, incl. -2^(b-1)
        packed = pack((signed.astype(np.int16) + half).astype(np.uint8), bits)  # docs/packing.md: offset first
        as_int32 = packed.view("<i4")
        assert as_int32.shape == (7, cols * bits // 32)
        np.testing.assert_array_equal(as_int32, pack_to_int32_reference(signed, bits))


# --- strides, alignment, read-only memory ------------------------------------------------------------


@pytest.mark.parametrize("bits", WIDTHS)
def test_non_contiguous_equals_contiguous_copy(bits):
    base = random_codes(100 + bits, (40, 2 * 130), bits)
    for view in (base[:, ::2], base[::-1, 3:200], base.T, base[::3, ::-5], base.reshape(40, 2, 130)[:, 1]):
        assert pack(view, bits).tolist() == pack(np.ascontiguousarray(view), bits).tolist()
    packed = pack(base, bits)
    wide = np.zeros((packed.shape[0], 2 * packed.shape[1]), np.uint8)
    wide[:, ::2] = packed
    np.testing.assert_array_equal(unpack(wide[:, ::2], bits, base.shape[1]), base)
    np.testing.assert_array_equal(unpack(packed[::-1], bits, base.shape[1]), base[::-1])


@pytest.mark.parametrize("bits", [1, 3, 4, 7])
def test_unaligned_and_read_only_buffers(bits):
    n = 64 * 20 + 5
    buf = np.zeros(n + 1, np.uint8)
    buf[1:] = random_codes(bits, n, bits)
    codes = buf[1:]  # contiguous, but not 8-byte aligned
    codes.setflags(write=False)
    packed = check_round_trip(codes, bits)
    pbuf = np.zeros(packed.size + 3, np.uint8)
    pbuf[3:] = packed
    ro = pbuf[3:]
    ro.setflags(write=False)
    np.testing.assert_array_equal(unpack(ro, bits, n), codes)


# --- Hypothesis -------------------------------------------------------------------------------------

LAST_AXIS, LEADING = ROW_LENGTHS, LEADING_SHAPES  # the row lengths and leading shapes of qcore.testing


@given(bits=st.integers(1, 8), lead=LEADING, n=LAST_AXIS, seed=st.integers(0, 2**32 - 1))
def test_round_trip_any_shape(bits, lead, n, seed):
    shape = tuple(lead) + (n,)
    if np.prod(shape) > 200_000:
        shape = (2, n)
    check_round_trip(random_codes(seed, shape, bits), bits)


@given(bits=st.integers(1, 8), lead=LEADING, n=LAST_AXIS, seed=st.integers(0, 2**32 - 1))
def test_unpack_arbitrary_bytes(bits, lead, n, seed):
    shape = tuple(lead) + (packed_shape((n,), bits)[0],)
    if np.prod(shape) > 200_000:
        shape = shape[-1:]
    raw = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
    codes = unpack(raw, bits, n)
    assert codes.shape == shape[:-1] + (n,)
    assert codes.dtype == np.uint8 and (codes < (1 << bits)).all()
    np.testing.assert_array_equal(codes, ref_unpack(raw, bits, n))
    # packing again gives the same bytes with the padding bits cleared
    pad = (-n * bits) % 8
    expected = raw.copy()
    if pad and expected.size:
        expected[..., -1] &= np.uint8((1 << (8 - pad)) - 1)
    np.testing.assert_array_equal(pack(codes, bits), expected)


@given(bits=st.integers(1, 8), n=st.integers(1, 3000), seed=st.integers(0, 2**32 - 1),
       threads=st.integers(1, 4), min_part=st.sampled_from([64, 256, 1000, 1 << 18]),
       pad_chunk=st.sampled_from([1, 2000, 1 << 22]))
def test_any_work_split_gives_the_same_bytes(bits, n, seed, threads, min_part, pad_chunk):
    codes = random_codes(seed, (5, n), bits)
    expected = ref_pack(codes, bits)
    knobs = [(_parallel, "NUM_THREADS", threads), (packing, "_PARALLEL_MIN_CODES", min_part),
             (_parallel, "DYNAMIC", False), (packing, "_PAD_CHUNK_CODES", pad_chunk)]
    saved = [(mod, k, getattr(mod, k)) for mod, k, _ in knobs]
    try:
        for mod, k, v in knobs:
            setattr(mod, k, v)
        np.testing.assert_array_equal(pack(codes, bits), expected)
        np.testing.assert_array_equal(unpack(expected, bits, n), codes)
        np.testing.assert_array_equal(pack(codes[1], bits), expected[1])
    finally:
        for mod, k, v in saved:
            setattr(mod, k, v)


# --- bad input --------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7])
@pytest.mark.parametrize("shape, where", [
    ((10,), (9,)),                 # tail of a single short row
    ((3, 64), (2, 5)),             # byte-aligned rows: one stream of whole blocks
    ((4, 33), (3, 32)),            # rows ending mid-byte (rows path), last code
    ((1, (1 << 20) + 3), (0, 700_000)),  # split across threads
    ((2, 100), (1, 99)),           # rows ending mid-byte, long enough for the padded path
])
def test_code_too_large_names_first_index_and_value(bits, shape, where, monkeypatch):
    monkeypatch.setattr(_parallel, "NUM_THREADS", 2)
    monkeypatch.setattr(_parallel, "DYNAMIC", False)
    codes = np.zeros(shape, np.uint8)
    codes[where] = 1 << bits
    later = tuple(s - 1 for s in shape)
    if later != where:
        codes[later] = 255
    msg = rf"code {1 << bits} at index \({', '.join(map(str, where))},?\).*{bits} bits.*0\.\.{(1 << bits) - 1}"
    with pytest.raises(ValueError, match=msg):
        pack(codes, bits)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7])
def test_a_single_code_too_large_is_found_at_every_position(bits):
    # one stream with a tail; whole blocks; rows ending mid-byte, short (row kernel) and long (padded)
    for shape in [(2 * 64 + 13,), (3, 64), (3, 9), (2, 67)]:
        size = int(np.prod(shape))
        for pos in range(size):
            codes = random_codes(pos, size, bits)
            bad = (1 << bits) + pos % (256 - (1 << bits))  # every value that does not fit shows up
            codes[pos] = bad
            codes = codes.reshape(shape)
            where = np.unravel_index(pos, shape)
            with pytest.raises(ValueError, match=rf"code {bad} at index \({', '.join(map(str, where))},?\)"):
                pack(codes, bits)


def test_code_too_large_in_wide_and_signed_dtypes():
    with pytest.raises(ValueError, match=r"code 256 at index \(1,\).*8 bits"):
        pack(np.array([0, 256], np.int32), 8)
    with pytest.raises(ValueError, match=r"code 4 at index \(0, 2\)"):
        pack(np.array([[0, 1, 4, 9]], np.uint16), 2)
    with pytest.raises(ValueError, match=r"code -1 at index \(1, 0\) is negative"):
        pack(np.array([[0, 1], [-1, 3]], np.int8), 4)
    with pytest.raises(ValueError, match=r"code -3 at index \(2,\) is negative"):
        pack(np.array([0, 1, -3], np.int64), 8)


@pytest.mark.parametrize("bad", [np.float32, np.float64, np.float16, bool, np.complex64])
def test_non_integer_codes_are_a_type_error(bad):
    with pytest.raises(TypeError, match="integer"):
        pack(np.zeros(8, bad), 4)
    with pytest.raises(TypeError, match="integer"):
        pack([0.0, 1.0], 4)


@pytest.mark.parametrize("bits", [0, 9, -1, 16, True, False, 4.0, "4", None, np.float32(2), np.bool_(True)])
def test_bad_bits(bits):
    codes = np.zeros(8, np.uint8)
    with pytest.raises(ValueError, match="bits"):
        pack(codes, bits)
    with pytest.raises(ValueError, match="bits"):
        unpack(codes, bits, 8)
    with pytest.raises(ValueError, match="bits"):
        packed_shape((8,), bits)


def test_scalar_inputs_are_rejected():
    with pytest.raises(ValueError, match="at least one axis"):
        pack(np.uint8(3), 4)
    with pytest.raises(ValueError, match="at least one axis"):
        unpack(np.uint8(3), 4, 1)
    with pytest.raises(ValueError, match="at least one axis"):
        packed_shape((), 4)
    with pytest.raises(ValueError, match="non-negative"):
        packed_shape((3, -1), 4)


@pytest.mark.parametrize("dtype", [np.int8, np.uint16, np.int32, np.float32, bool])
def test_unpack_needs_uint8(dtype):
    with pytest.raises(TypeError, match="uint8"):
        unpack(np.zeros((2, 4), dtype), 4, 8)


def test_unpack_length_must_match_last_axis():
    packed = np.zeros((2, 5), np.uint8)
    assert unpack(packed, 4, 10).shape == (2, 10)
    assert unpack(packed, 4, 9).shape == (2, 9)
    for length in (8, 11, 0, 100):
        with pytest.raises(ValueError, match=rf"5 bytes.*{length} codes of 4 bits.*need"):
            unpack(packed, 4, length)
    with pytest.raises(ValueError, match="3 bytes"):
        unpack(np.zeros(3, np.uint8), 3, 9)  # ceil(27/8) = 4
    for length in (-1, 2.0, True, "10", None):
        with pytest.raises(ValueError, match="length"):
            unpack(packed, 4, length)
    assert unpack(packed, 4, np.int64(10)).shape == (2, 10)


def test_exported_from_qcore():
    assert qcore.pack is pack and qcore.unpack is unpack and qcore.packed_shape is packed_shape


def test_from_packed_keeps_the_bytes_it_was_given_for_packed():
    from qcore import QuantizedArray, QuantScheme, PerChannel, quantize

    x = np.random.default_rng(3).standard_normal((4, 13)).astype(np.float32)  # 13 codes: padding in the last byte
    qa = quantize(x, QuantScheme(3, True, PerChannel(0)))
    p = qa.packed()
    again = QuantizedArray.from_packed(p, qa.scale, None, qa.scheme, qa.shape)
    out = again.packed()
    np.testing.assert_array_equal(out, p)
    out[:] = 0  # a copy: the kept bytes are not the caller's to change
    np.testing.assert_array_equal(again.packed(), p)
    p[:] = 0  # nor is the source
    np.testing.assert_array_equal(again.packed(), qa.packed())
    # bytes with set padding bits are not the layout packed() writes: not kept, packed again
    dirty = qa.packed()
    dirty[:, -1] |= 0x80
    np.testing.assert_array_equal(QuantizedArray.from_packed(dirty, qa.scale, None, qa.scheme, qa.shape).packed(),
                                  qa.packed())
