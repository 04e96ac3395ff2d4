"""Sibling layers in eager decoding (qtorch.sibling_calls): layers that read one row in turn become a group after
two rounds, the group's launch gives each layer the bits of its own call, and every other pattern (an input changed
in place or another one, a member skipped, a weight replaced, copies) computes on its own."""

import copy
import pickle

import pytest
import torch

import qtorch
from qtorch import _launch, _omp, autotune, gemv, sibling_calls, vnni, vnni8


@pytest.fixture(autouse=True)
def grouping_on(monkeypatch):
    monkeypatch.setattr(sibling_calls, "ENABLED", True)
    monkeypatch.setattr(sibling_calls, "_RUN", [None, -1, []])


def layers(n=3, k=256, dtype=torch.float32, layout="blocked", bits=8, bias=True, seed=0):
    torch.manual_seed(seed)
    out = []
    for i in range(n):
        lin = torch.nn.Linear(k, 64 * (i + 1), bias=bias).to(dtype)
        m = (qtorch.W8A16Linear.from_linear(lin) if bits == 8
             else qtorch.W4A16Linear.from_linear(lin))
        assert m.quantized_weight.hold_layout(layout, dtype)
        out.append(m)
    return out


def apart(ms):
    """Copies of ``ms`` that never group: what each layer's own call gives."""
    copies = [copy.deepcopy(m) for m in ms]
    for c in copies:
        sibling_calls._REFUSED[c] = True
    return copies


def step(ms, x, other):
    """One decoding round: every layer of ``ms`` on ``x``, then a layer on another input (what closes the run)."""
    ys = [m(x) for m in ms]
    other(ys[0][..., :other.in_features].contiguous())
    return ys


def grouped(ms) -> bool:
    g = {id(m._sibling.group) if m._sibling is not None else None for m in ms}
    return len(g) == 1 and None not in g


CASES = [(torch.float32, "blocked", 8), (torch.bfloat16, "blocked", 8), (torch.bfloat16, "blocked", 4)]
if vnni.available():
    CASES += [(torch.bfloat16, "vnni", 4), (torch.float32, "vnni", 4)]
if vnni8.available() and vnni8.dot_eligible(256):
    CASES += [(torch.bfloat16, "vnni8", 8), (torch.float32, "vnni8", 8),  # one row on the tiles (unmeasured)
              (torch.bfloat16, "vnni8_dot", 8), (torch.float32, "vnni8_dot", 8)]


def chains_here(layout: str) -> bool:
    """Whether layers of ``layout`` can be chained in this process: ``blocked`` always (in Python where it must),
    ``vnni`` and ``vnni8`` only as one native launch (``QTORCH_NATIVE_LAUNCH=0`` or no OpenMP team of torch's:
    they stay apart, each on its own call)."""
    return layout == "blocked" or (gemv.NATIVE_LAUNCH and _omp.available() and _launch._gomp_address() != 0)


def on_dot_path(ms, dtype):
    """vnni8 layers decode one row by vpdpbusd (the path a race may keep; unmeasured here)."""
    for m in ms:
        m.quantized_weight._routes[("cpu", dtype, autotune.bucket_index(1))] = "vnni8_dot"


@pytest.mark.parametrize("dtype,layout,bits", CASES, ids=str)
def test_layers_reading_one_row_in_turn_group_and_keep_their_bits(dtype, layout, bits):
    dot = layout == "vnni8_dot"
    layout = "vnni8" if dot else layout
    ms = layers(dtype=dtype, layout=layout, bits=bits)
    if dot:
        on_dot_path(ms, dtype)
    ref = apart(ms)
    other = layers(1, k=64, dtype=dtype, seed=9)[0]  # (8 bits, blocked: any dtype)
    with torch.no_grad():
        for i in range(6):
            x = torch.randn(1, 1, 256, dtype=dtype)
            ys = step(ms, x, other)
            assert all(torch.equal(y, r(x)) for y, r in zip(ys, ref)), i
            if i >= 3:  # (round 1 keeps decoders, rounds 2 and 3 are seen, then grouped)
                assert grouped(ms) == chains_here(layout)
    if chains_here(layout):
        assert ms[0]._sibling.index == 0 and ms[2]._sibling.index == 2
    else:
        assert all(m._sibling is None and sibling_calls._REFUSED.get(m) for m in ms)


def test_an_input_changed_in_place_or_another_input_computes_apart_and_dissolves_the_group():
    ms = layers()
    ref = apart(ms)
    other = layers(1, k=64, seed=9)[0]
    with torch.no_grad():
        for _ in range(4):
            step(ms, torch.randn(1, 256), other)
        assert grouped(ms)
        x = torch.randn(1, 256)
        y0 = ms[0](x)
        x.mul_(2)  # between the lead's call and the others'
        assert torch.equal(y0, ref[0](x / 2))
        assert torch.equal(ms[1](x), ref[1](x)) and torch.equal(ms[2](x), ref[2](x))
        assert grouped(ms) and ms[0]._sibling.group.misses == 1  # one miss a round
        x = torch.randn(1, 256)
        ms[0](x)
        z = x.clone()  # equal values, another tensor
        assert torch.equal(ms[1](z), ref[1](z)) and torch.equal(ms[2](z), ref[2](z))
    assert all(m._sibling is None for m in ms)  # two missed rounds: apart for good
    assert all(m in sibling_calls._REFUSED for m in ms)


def test_a_member_skipped_is_a_miss():
    ms = layers(2)
    other = layers(1, k=64, seed=9)[0]
    with torch.no_grad():
        for _ in range(4):
            step(ms, torch.randn(1, 256), other)
        assert grouped(ms)
        ref = apart(ms)
        for _ in range(2):  # the lead alone, twice: the second's outputs for the member never taken
            x = torch.randn(1, 256)
            assert torch.equal(ms[0](x), ref[0](x))
        x = torch.randn(1, 256)
        assert torch.equal(ms[0](x), ref[0](x)) and torch.equal(ms[1](x), ref[1](x))
    assert ms[0]._sibling is None


def test_a_replaced_weight_is_read_and_the_group_forms_again():
    ms = layers()
    other = layers(1, k=64, seed=9)[0]
    with torch.no_grad():
        for _ in range(4):
            step(ms, torch.randn(1, 256), other)
        assert grouped(ms)
        ms[1].quantize(torch.randn(128, 256))  # new buffers for a member
        ref = apart(ms)
        x = torch.randn(1, 256)
        assert all(torch.equal(y, r(x)) for y, r in zip(step(ms, x, other), ref))
        assert ms[0]._sibling is None  # dissolved, not refused: the calls' pattern still holds
        for _ in range(3):
            x = torch.randn(1, 256)
            assert all(torch.equal(y, r(x)) for y, r in zip(step(ms, x, other), ref))
        assert grouped(ms)
        assert ms[2].quantized_weight.hold_layout("canonical", torch.float32)  # another layout: no chain
        ref = apart(ms)
        for _ in range(4):
            x = torch.randn(1, 256)
            assert all(torch.equal(y, r(x)) for y, r in zip(step(ms, x, other), ref))
        assert grouped(ms[:2]) and ms[2]._sibling is None  # the two that still chain


def test_biases_are_each_layers_own():
    ms = layers(bias=True)
    other = layers(1, k=64, seed=9)[0]
    with torch.no_grad():
        for m in ms:
            m.bias.add_(torch.arange(m.out_features, dtype=m.bias.dtype))
        ref = apart(ms)
        for _ in range(5):
            x = torch.randn(1, 256)
            ys = step(ms, x, other)
            assert all(torch.equal(y, r(x)) for y, r in zip(ys, ref))
    assert grouped(ms)


def test_copies_and_pickles_of_a_grouped_layer_are_apart():
    ms = layers()
    other = layers(1, k=64, seed=9)[0]
    with torch.no_grad():
        for _ in range(4):
            step(ms, torch.randn(1, 256), other)
    assert grouped(ms)
    twin = copy.deepcopy(torch.nn.ModuleList(ms))
    thawed = pickle.loads(pickle.dumps(torch.nn.ModuleList(ms)))
    assert all(m._sibling is None for m in list(twin) + list(thawed))
    x = torch.randn(1, 256)
    with torch.no_grad():
        assert all(torch.equal(a(x), b(x)) for a, b in zip(twin, apart(ms)))


def test_only_layers_of_one_kernel_k_and_dtype_group():
    a = layers(1, k=256)[0]
    b = layers(1, k=256, dtype=torch.bfloat16)[0]  # another dtype: another kind
    other = layers(1, k=64, seed=9)[0]
    with torch.no_grad():
        for _ in range(5):
            x = torch.randn(1, 256)
            a(x)
            b(x.bfloat16())
            other(torch.randn(1, 64))
    assert a._sibling is None and b._sibling is None


def test_a_round_whose_launch_cannot_run_goes_apart_without_a_miss(monkeypatch):
    ms = layers()
    ref = apart(ms)
    other = layers(1, k=64, seed=9)[0]
    with torch.no_grad():
        for _ in range(4):
            step(ms, torch.randn(1, 256), other)
        group = ms[0]._sibling.group
        monkeypatch.setattr(group, "run", lambda xa, oas: False)  # e.g. no native launch on a busy machine
        for _ in range(4):
            x = torch.randn(1, 256)
            assert all(torch.equal(y, r(x)) for y, r in zip(step(ms, x, other), ref))
    assert grouped(ms) and group.misses == 0


def test_grouping_off(monkeypatch):
    monkeypatch.setattr(sibling_calls, "ENABLED", False)
    ms = layers()
    other = layers(1, k=64, seed=9)[0]
    with torch.no_grad():
        for _ in range(5):
            step(ms, torch.randn(1, 256), other)
    assert all(m._sibling is None for m in ms)


def test_a_grouped_model_is_freed_when_deleted():
    import gc
    import weakref

    ms = layers()
    other = layers(1, k=64, seed=9)[0]
    with torch.no_grad():
        for _ in range(4):
            step(ms, torch.randn(1, 256), other)
    assert grouped(ms)
    group = weakref.ref(ms[0]._sibling.group)
    refs = [weakref.ref(m) for m in ms]
    gc.disable()  # freed by reference counts alone: no cycle through the group
    try:
        del ms
        assert all(r() is None for r in refs) and group() is None
    finally:
        gc.enable()


@pytest.mark.skipif(not (vnni8.available() and vnni8.dot_eligible(256)), reason="vnni8's dot path needs AMX-INT8")
def test_vnni8_layers_on_different_one_row_paths_stay_apart():
    ms = layers(dtype=torch.bfloat16, layout="vnni8")
    on_dot_path(ms[1:2], torch.bfloat16)  # the key layer on vpdpbusd, the others on the tiles: no chain joins them
    other = layers(1, k=64, dtype=torch.bfloat16, seed=9)[0]
    with torch.no_grad():
        for _ in range(5):
            step(ms, torch.randn(1, 256, dtype=torch.bfloat16), other)
    assert all(m._sibling is None for m in ms)


@pytest.mark.skipif(not (vnni8.available() and vnni8.dot_eligible(256)), reason="vnni8's dot path needs AMX-INT8")
@pytest.mark.skipif(torch.get_num_threads() < 2, reason="one thread: no native launch")
@pytest.mark.parametrize("dot", [True, False], ids=["vpdpbusd", "tiles"])
@pytest.mark.parametrize("kind", [0, 1], ids=["float32", "bfloat16"])
def test_a_vnni8_chain_gives_each_plans_own_bits_and_refuses_what_it_cannot_take(dot, kind):
    import numpy as np

    rng = np.random.default_rng(0)
    plans = [vnni8.Plan(vnni8.pack(rng.integers(-127, 128, (n, 256)).astype(np.int8)),
                        rng.random(n).astype(np.float32)) for n in (128, 64, 192)]
    dtype = torch.bfloat16 if kind else torch.float32
    x = torch.randn(1, 256, dtype=dtype)
    want = []
    for p in plans:
        want.append(torch.empty(1, p.T * 64, dtype=dtype))
        assert p(x.data_ptr(), kind, 1, want[-1].data_ptr(), kind, dot=dot)
    if not chains_here("vnni8"):  # (QTORCH_NATIVE_LAUNCH=0: no chain to make, said by name)
        with pytest.raises(ValueError, match="native launch"):
            vnni8.Chain([(p, kind, kind, dot) for p in plans])
        return
    chain = vnni8.Chain([(p, kind, kind, dot) for p in plans])
    for _ in range(2):  # (the second launch starts afresh)
        got = [torch.full_like(w, 7) for w in want]
        assert chain(x.data_ptr(), [g.data_ptr() for g in got])
        assert all(torch.equal(a, b) for a, b in zip(got, want))
    bad = x.clone()
    bad[0, 9] = float("nan")
    assert not chain(bad.data_ptr(), [g.data_ptr() for g in got])
    other = vnni8.Plan(vnni8.pack(np.ones((64, 128), np.int8)), np.ones(64, np.float32))
    with pytest.raises(ValueError, match="one K"):
        vnni8.Chain([(plans[0], kind, kind, dot), (other, kind, kind, dot)])
    with pytest.raises(ValueError, match="one path"):
        vnni8.Chain([(plans[0], kind, kind, dot), (plans[1], kind, kind, not dot)])


def test_inference_mode_tensors_never_group_and_decode_as_apart():
    # an inference tensor keeps no version counter: a change in place between two calls could not be seen
    ms = layers()
    ref = apart(ms)
    other = layers(1, k=64, seed=9)[0]
    with torch.inference_mode():
        for _ in range(5):
            x = torch.randn(1, 256)
            assert all(torch.equal(y, r(x)) for y, r in zip(step(ms, x, other), ref))
    assert all(m._sibling is None for m in ms)
    with torch.no_grad():  # grouped, then an inference tensor: that round goes apart, none of it a miss
        for _ in range(4):
            step(ms, torch.randn(1, 256), other)
        assert grouped(ms)
        with torch.inference_mode():
            x = torch.randn(1, 256)
            ys = [m(x) for m in ms]
        assert all(torch.equal(y, r(x)) for y, r in zip(ys, ref))
    assert grouped(ms) and ms[0]._sibling.group.misses == 0


def test_a_layer_seen_alone_is_watched_again_later(monkeypatch):
    monkeypatch.setattr(sibling_calls, "REWATCH", 20)
    ms = layers(2)
    ms[1].quantized_weight.hold_layout("canonical", torch.float32)  # no chain: the first reads its input alone
    other = layers(1, k=64, seed=9)[0]
    with torch.no_grad():
        for _ in range(12):
            step(ms, torch.randn(1, 256), other)
        assert ms[0]._lonely >= sibling_calls.LONELY and ms[0]._sibling is None
        assert ms[1].quantized_weight.hold_layout("blocked", torch.float32)  # now it chains
        ref = apart(ms)
        for _ in range(30):
            x = torch.randn(1, 256)
            assert all(torch.equal(y, r(x)) for y, r in zip(step(ms, x, other), ref))
    assert grouped(ms)
