"""Measured choice between a layout's own path and ``dequant_mm`` (canonical, int8pack): numerics of every path,
the choice per row bucket with injected timings, QTORCH_PATH / QTORCH_AUTOTUNE, torch.compile and the state."""

import pytest
import torch
import torch.nn.functional as F

import qtorch
from qcore import PerChannel, PerGroup, PerTensor, QuantScheme
from qtorch import amx_rows, autotune
from qtorch.layouts.canonical import CANONICAL
from qtorch.layouts.int8pack import INT8PACK

EPS = {torch.float32: 1e-5, torch.bfloat16: 2.0**-6, torch.float16: 2.0**-9}
W8 = QuantScheme(8, True, PerChannel(0))
#: the int8pack tests hold that layout whatever the layout measurement would pick (tests/qtorch/test_layout_choice.py)
PIN = {"QTORCH_LAYOUT": "int8pack"}


@pytest.fixture(autouse=True)
def fresh_dispatcher(monkeypatch, tmp_path):
    """A measuring dispatcher of this test's own, its file under tmp_path: nothing read from or left in ~/.cache."""
    return use_dispatcher(monkeypatch, tmp_path, env={})


def use_dispatcher(monkeypatch, tmp_path, env, timer=None):
    kw = {} if timer is None else {"timer": timer}
    d = autotune.Dispatcher(cache_path=tmp_path / "dispatch.json", env=env, **kw)
    monkeypatch.setattr(autotune, "_DEFAULT", d)
    return d


class Costs:
    """Injected timings: the layout's ``linear`` advances a fake clock by ``cost(path, rows)`` ms, and records."""

    def __init__(self, monkeypatch, layout, cost):
        self.now, self.ran = 0.0, []
        orig = type(layout).linear

        def linear(weight, x2, path):
            self.now += cost(path, x2.shape[0]) / 1e3
            self.ran.append(path)
            return orig(layout, weight, x2, path)
        monkeypatch.setattr(layout, "linear", linear)

    def __call__(self):
        return self.now


def check_close(y, x, w):
    """|y - F.linear(x, W)| within the dtype's rounding of the dot products (W: float32 dequantized weight)."""
    ref = F.linear(x.float(), w)
    bound = F.linear(x.float().abs(), w.abs())
    assert y.dtype == x.dtype and y.shape == ref.shape
    err = (y.float() - ref).abs()
    assert torch.all(err <= EPS[x.dtype] * bound + 1e-6), float((err - EPS[x.dtype] * bound).max())


SCHEMES = [W8, QuantScheme(4, False, PerGroup(4)), QuantScheme(3, True, PerTensor()),  # groups: cut to divide k
           QuantScheme(2, False, PerChannel(1)), QuantScheme(8, False, PerGroup(2, axis=0))]


@pytest.mark.parametrize("scheme", SCHEMES, ids=str)
@pytest.mark.parametrize("k", [1, 7, 100, 500, 504, 520])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_every_canonical_path_equals_f_linear_on_odd_shapes(scheme, k, dtype):
    g = scheme.granularity
    if isinstance(g, PerGroup) and g.axis == -1:
        scheme = QuantScheme(scheme.bits, scheme.symmetric, PerGroup(max(d for d in (1, 2, 4) if k % d == 0)))
    q = qtorch.QuantLinear.from_linear(torch.nn.Linear(k, 30, bias=False, dtype=dtype), scheme)  # N = 30: no tile
    w = q.quantized_weight
    assert w.layout is CANONICAL
    for rows in (2, 3, 17, 130):
        x = torch.randn(rows, k, dtype=dtype)
        names = CANONICAL.paths("cpu", dtype, rows, scheme.bits)
        assert names == ("dense", "dequant_mm")
        for name in names:
            check_close(CANONICAL.linear(w, x, name), x, w.dequantize())
    assert CANONICAL.paths("cpu", dtype, 1, scheme.bits) == ("dense",)  # one row: the layout's own path only
    assert CANONICAL.paths("cuda", dtype, 8, scheme.bits) == ("dense",)


@pytest.mark.parametrize("n,k", [(30, 32), (1000, 64), (48, 512)])
def test_every_int8pack_path_equals_f_linear(n, k, monkeypatch, tmp_path):
    use_dispatcher(monkeypatch, tmp_path, env=PIN)
    q = qtorch.W8A16Linear.from_linear(torch.nn.Linear(k, n, bias=False, dtype=torch.bfloat16))
    w = q.quantized_weight
    assert w.layout is INT8PACK
    for dtype in (torch.bfloat16, torch.float32):
        for rows in (2, 5, 130):
            x = torch.randn(rows, k, dtype=dtype)
            names = INT8PACK.paths("cpu", dtype, rows, 8, spec=w.spec)
            amx = ("amx_rows",) if dtype == torch.bfloat16 and amx_rows.available() and k % 32 == 0 else ()
            assert names == ("int8pack" if dtype == torch.bfloat16 else "dense", "dequant_mm") + amx
            for name in names:
                check_close(INT8PACK.linear(w, x, name), x, w.dequantize())


def _int8pack_layer():
    q = qtorch.W8A16Linear.from_linear(torch.nn.Linear(64, 48, bias=False, dtype=torch.bfloat16))
    assert q.quantized_weight.layout is INT8PACK
    return q


def test_the_faster_path_wins_per_row_bucket(monkeypatch, tmp_path):
    # int8pack faster at a few rows, dequant_mm (the AMX matmul) faster at 128 rows, as on the Xeon
    costs = Costs(monkeypatch, INT8PACK, lambda path, rows: {"dequant_mm": 3.6}.get(path, 0.5 if rows < 8 else 26.0))
    d = use_dispatcher(monkeypatch, tmp_path, env=PIN, timer=costs)
    q = _int8pack_layer()
    w = q.quantized_weight
    for rows, want in ((3, "dense"), (128, "dequant_mm"), (100, "dequant_mm"), (4, "dense")):
        x = torch.randn(rows, 64, dtype=torch.bfloat16)
        costs.ran.clear()
        check_close(q(x), x, w.dequantize())
        assert costs.ran[-1] == want, (rows, costs.ran)
    # measured once per bucket: later calls of a bucket run the kept path alone
    assert set(w._routes.values()) == {"dense", "dequant_mm"} and len(w._routes) == 2
    costs.ran.clear()
    q(torch.randn(200, 64, dtype=torch.bfloat16))
    q(torch.randn(2, 64, dtype=torch.bfloat16))
    assert costs.ran == ["dequant_mm", "dense"]
    assert sorted(v["path"] for v in d.decisions().values()) == ["dequant_mm", "int8pack"]
    # a second layer of the same shape takes the kept decisions without measuring
    q2 = _int8pack_layer()
    costs.ran.clear()
    q2(torch.randn(128, 64, dtype=torch.bfloat16))
    assert costs.ran == ["dequant_mm"]


def test_a_faster_own_path_keeps_it_and_one_row_is_never_measured(monkeypatch, tmp_path):
    costs = Costs(monkeypatch, INT8PACK, lambda path, rows: 9.0 if path == "dequant_mm" else 1.0)
    use_dispatcher(monkeypatch, tmp_path, env=PIN, timer=costs)
    q = _int8pack_layer()
    q(torch.randn(128, 64, dtype=torch.bfloat16))
    assert costs.ran[-1] == "dense" and "dequant_mm" in costs.ran  # measured, the kernel kept
    costs.ran.clear()
    q(torch.randn(1, 64, dtype=torch.bfloat16))
    assert costs.ran == ["dense"]


def test_canonical_layer_picks_dequant_mm_when_faster(monkeypatch, tmp_path):
    costs = Costs(monkeypatch, CANONICAL, lambda path, rows: 2.0 if path == "dequant_mm" else 10.0)
    use_dispatcher(monkeypatch, tmp_path, env={}, timer=costs)
    q = qtorch.QuantLinear.from_linear(torch.nn.Linear(100, 30, bias=False), W8)
    x = torch.randn(16, 100)
    check_close(q(x), x, q.quantized_weight.dequantize())
    assert costs.ran[-1] == "dequant_mm"


@pytest.mark.parametrize("env,want", [({"QTORCH_PATH": "dequant_mm"}, "dequant_mm"),
                                      ({"QTORCH_PATH": "dequant_mm", "QTORCH_AUTOTUNE": "0"}, "dequant_mm"),
                                      ({"QTORCH_PATH": "int8pack"}, "dense"),
                                      ({"QTORCH_AUTOTUNE": "0"}, "dense")])
def test_environment_forces_a_path_or_turns_measuring_off(env, want, monkeypatch, tmp_path):
    # dequant_mm would win by far: only the environment keeps the own path
    costs = Costs(monkeypatch, INT8PACK, lambda path, rows: 1.0 if path == "dequant_mm" else 50.0)
    use_dispatcher(monkeypatch, tmp_path, env={**PIN, **env}, timer=costs)
    q = _int8pack_layer()
    x = torch.randn(128, 64, dtype=torch.bfloat16)
    check_close(q(x), x, q.quantized_weight.dequantize())
    assert costs.ran == [want]  # nothing measured: one call, on the forced or default path
    assert not (tmp_path / "dispatch.json").exists()


def test_compile_fullgraph_takes_the_kept_or_default_path_and_measures_nothing(monkeypatch, tmp_path):
    costs = Costs(monkeypatch, INT8PACK, lambda path, rows: 1.0 if path == "dequant_mm" else 50.0)
    use_dispatcher(monkeypatch, tmp_path, env=PIN, timer=costs)
    x = torch.randn(128, 64, dtype=torch.bfloat16)
    torch._dynamo.reset()
    fresh = _int8pack_layer()
    y = torch.compile(fresh, fullgraph=True, backend="aot_eager")(x)
    assert costs.ran == ["dense"] and fresh.quantized_weight._routes == {}  # the default, nothing timed or kept
    check_close(y, x, fresh.quantized_weight.dequantize())
    torch._dynamo.reset()
    q = _int8pack_layer()
    q(x)  # eager: measured, dequant_mm kept
    assert costs.ran[-1] == "dequant_mm"
    costs.ran.clear()
    y = torch.compile(q, fullgraph=True, backend="aot_eager")(x)
    assert costs.ran == ["dequant_mm"]
    check_close(y, x, q.quantized_weight.dequantize())


def test_state_dict_is_unchanged_by_the_choice(monkeypatch, tmp_path):
    costs = Costs(monkeypatch, INT8PACK, lambda path, rows: 1.0 if path == "dequant_mm" else 50.0)
    use_dispatcher(monkeypatch, tmp_path, env=PIN, timer=costs)
    q = _int8pack_layer()
    before = {k: v.clone() for k, v in q.state_dict().items()}
    q(torch.randn(128, 64, dtype=torch.bfloat16))
    after = q.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert q.quantized_weight.layout is INT8PACK and q.quantized_weight._routes


def test_a_new_layout_forgets_the_kept_paths(monkeypatch, tmp_path):
    costs = Costs(monkeypatch, INT8PACK, lambda path, rows: 1.0 if path == "dequant_mm" else 50.0)
    use_dispatcher(monkeypatch, tmp_path, env=PIN, timer=costs)
    q = _int8pack_layer()
    q(torch.randn(128, 64, dtype=torch.bfloat16))
    assert q.quantized_weight._routes
    q.float()  # float32 layer: another layout
    assert q.quantized_weight._routes == {}
    x = torch.randn(128, 64)
    check_close(q(x), x, q.quantized_weight.dequantize())


def test_measuring_uses_the_real_paths_and_writes_the_decision(fresh_dispatcher, tmp_path):
    q = qtorch.QuantLinear.from_linear(torch.nn.Linear(64, 30, bias=False), W8)
    x = torch.randn(128, 64)
    check_close(q(x), x, q.quantized_weight.dequantize())
    (entry,) = fresh_dispatcher.decisions().values()
    assert entry["path"] in ("dense", "dequant_mm") and set(entry["ms"]) == {"dense", "dequant_mm"}
    assert (tmp_path / "dispatch.json").exists()


def test_bucket_index_agrees_with_row_bucket():
    labels = {}
    for rows in range(1, 1100):
        labels.setdefault(autotune.bucket_index(rows), set()).add(autotune.row_bucket(rows))
    assert all(len(v) == 1 for v in labels.values()) and len(labels) == len(autotune.ROW_BUCKETS) + 1
