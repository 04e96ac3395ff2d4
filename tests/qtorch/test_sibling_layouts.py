"""Layers that read the same input: found in one eager call, and weighed together by the compiled layout choice.

The choice is tested with injected timings (the per-shape probes and the sets' savings replaced); the sets'
probes are compiled and run for real on small layers and checked against ``F.linear(x, dequantized_weight())``."""

import importlib

import pytest
import torch
import torch.nn.functional as F

import qtorch
from qcore import PerChannel, PerGroup, QuantScheme
from qtorch import autotune, sibling_layouts
from qtorch.compile import choose_layouts, compile_options

qc = importlib.import_module("qtorch.compile")

W8 = QuantScheme(8, True, PerChannel(0))
W4 = QuantScheme(4, False, PerGroup(32))


def layer(n, k=128, scheme=W8, dtype=torch.bfloat16, seed=0):
    torch.manual_seed(seed)
    return qtorch.QuantLinear.from_linear(torch.nn.Linear(k, n, dtype=dtype), scheme=scheme).eval()


class Block(torch.nn.Module):
    """Attention's shape of siblings (q, k, v read x; o reads their product) and an MLP's (gate, up)."""

    def __init__(self, k=128, kv=64, hidden=256):
        super().__init__()
        self.q, self.k, self.v, self.o = layer(k, k), layer(kv, k, seed=1), layer(kv, k, seed=2), layer(k, k, seed=3)
        self.gate, self.up, self.down = layer(hidden, k, seed=4), layer(hidden, k, seed=5), layer(k, hidden, seed=6)

    def forward(self, x):
        a = self.q(x)[:, : self.k.out_features] * self.k(x) + self.v(x)
        h = self.o(a.repeat(1, 2)) + x
        return self.down(F.silu(self.gate(h)) * self.up(h)) + h


class Model(torch.nn.Module):
    def __init__(self, blocks=2):
        super().__init__()
        self.blocks = torch.nn.ModuleList(Block() for _ in range(blocks))

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


def install(monkeypatch, tmp_path, env=None):
    d = autotune.Dispatcher(cache_path=tmp_path / "dispatch.json", env=env or {}, evict=lambda: None)
    monkeypatch.setattr(autotune, "_DEFAULT", d)
    monkeypatch.setattr(qtorch.vnni8, "available", lambda: False)
    return d


def test_find_siblings_sees_the_layers_that_read_one_tensor():
    m = Model()
    x = torch.randn(1, 128, dtype=torch.bfloat16)
    out, sets = sibling_layouts.record(m, (x,), {})
    with torch.no_grad():
        assert torch.equal(out, m(x))  # the call's own output
    b0, b1 = m.blocks
    assert [[id(layer) for layer in s] for s in sets] == [
        [id(b.q), id(b.k), id(b.v)] if i % 2 == 0 else [id(b.gate), id(b.up)]
        for b in (b0, b1) for i in range(2)]
    assert not any(h for layer in m.modules() for h in layer._forward_pre_hooks.values())  # hooks removed


def test_find_siblings_passes_keyword_inputs_and_removes_its_hooks_on_errors():
    class Kw(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = layer(64), layer(32)

        def forward(self, x, fail=False):
            if fail:
                raise RuntimeError("boom")
            return self.a(x).sum() + self.b(x).sum()

    m = Kw()
    x = torch.randn(2, 128, dtype=torch.bfloat16)
    assert [[id(layer) for layer in s] for s in sibling_layouts.find_siblings(m, x=x)] == [[id(m.a), id(m.b)]]
    with pytest.raises(RuntimeError, match="boom"):
        sibling_layouts.find_siblings(m, x, fail=True)
    assert not m.a._forward_pre_hooks and not m.b._forward_pre_hooks


def test_layers_of_other_schemes_on_one_input_are_no_set():
    class Mixed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = layer(64), layer(64, scheme=W4)

        def forward(self, x):
            return self.a(x) + self.b(x)

    assert sibling_layouts.find_siblings(Mixed(), torch.randn(1, 128, dtype=torch.bfloat16)) == []


GROUPS = {"q": (128, 128), "kv": (64, 128)}


def _settle(costs, picks, save_ms, rows=(1, 128), monkeypatch=None):
    m = Model()
    groups = qtorch.tune.layer_groups(m)
    key = {name: next(g for g in groups if g[:2] == shape) for name, shape in GROUPS.items()}
    sets = sibling_layouts.find_siblings(m, torch.randn(1, 128, dtype=torch.bfloat16))
    monkeypatch.setattr(sibling_layouts, "saving_ms", lambda members, options: save_ms.get(len(members)))
    got = sibling_layouts.settle(groups, {key[n]: c for n, c in costs.items()},
                                 {g: "blocked" for g in groups} | {key[n]: p for n, p in picks.items()},
                                 sets, {}, rows)
    return {n: got[key[n]] for n in GROUPS}


# per layer, a request's cost (ms); q's group also holds o (4 layers in all), kv's 4; 2 attention sets
COSTS = {"q": {"blocked": 10.0, "int8pack": 11.0}, "kv": {"blocked": 10.0, "int8pack": 9.0}}


def test_a_set_that_saves_more_than_the_mix_moves_its_groups_to_blocked(monkeypatch):
    # the mix saves 4 layers x 1 ms on kv; on blocked two attention sets save 128 calls x 0.02 ms each
    got = _settle(COSTS, {"q": "blocked", "kv": "int8pack"}, {3: 0.02, 2: None}, monkeypatch=monkeypatch)
    assert got == {"q": "blocked", "kv": "blocked"}


def test_a_small_saving_leaves_the_per_shape_choice(monkeypatch):
    got = _settle(COSTS, {"q": "blocked", "kv": "int8pack"}, {3: 0.01, 2: None}, monkeypatch=monkeypatch)
    assert got == {"q": "blocked", "kv": "int8pack"}


def test_no_one_row_calls_no_saving(monkeypatch):
    got = _settle(COSTS, {"q": "blocked", "kv": "int8pack"}, {3: 1.0}, rows=(16,), monkeypatch=monkeypatch)
    assert got == {"q": "blocked", "kv": "int8pack"}


def test_a_set_can_pull_a_group_off_its_own_faster_layout(monkeypatch):
    # q is faster on int8pack alone, kv too: only the sets' saving holds them on blocked
    costs = {"q": {"blocked": 10.0, "int8pack": 9.5}, "kv": {"blocked": 10.0, "int8pack": 9.5}}
    got = _settle(costs, {"q": "int8pack", "kv": "int8pack"}, {3: 0.05}, monkeypatch=monkeypatch)
    assert got == {"q": "blocked", "kv": "blocked"}
    got = _settle(costs, {"q": "int8pack", "kv": "int8pack"}, {3: 0.001}, monkeypatch=monkeypatch)
    assert got == {"q": "int8pack", "kv": "int8pack"}


class FakeProbes:
    def __init__(self, ms):
        self.ms = ms

    def __call__(self, layer, layout, rows, options, copies=1):
        import time
        n = layer.out_features

        def run(r):
            time.sleep(self.ms.get((n, layout, r), 0.0) * (copies if r in autotune.COLD_ROWS else 1) / 1e3)
        return {r: {"compiled": (lambda r=r: run(r))} for r in rows}


def test_choose_layouts_weighs_the_sets(monkeypatch, tmp_path):
    """Alone, the 64x128 layers are faster in int8pack; the attention sets' one call makes blocked cheaper."""
    install(monkeypatch, tmp_path)
    monkeypatch.setattr(qc, "_probe_runs", FakeProbes({(64, "blocked", 1): 0.6}))
    m = Model()
    x = torch.randn(1, 128, dtype=torch.bfloat16)
    sets = sibling_layouts.find_siblings(m, x)
    kv = f"64x128|{qtorch.layouts.scheme_label(m.blocks[0].k.quantized_weight.spec)}|bfloat16"
    assert choose_layouts(m, rows=1)[kv] == "int8pack"
    # together: the saving injected (ms per set call), the races' timings kept from the call before
    monkeypatch.setattr(sibling_layouts, "saving_ms", lambda members, options: 5.0 if len(members) == 3 else None)
    got = choose_layouts(m, rows=1, siblings=sets)
    # (the MLP's shapes are ties here: the static order decides them, which differs between CPUs)
    assert {layer.quantized_weight.layout.name for b in m.blocks for layer in (b.q, b.k, b.v, b.o)} == {"blocked"}
    assert got[kv] == "blocked"
    with torch.no_grad():
        ref = F.linear(x.float(), m.blocks[0].q.dequantized_weight(torch.float32), m.blocks[0].q.bias.float())
        assert torch.allclose(m.blocks[0].q(x).float(), ref, atol=2e-2 * float(ref.abs().max()), rtol=2e-2)


def _no_settle(*args, **kwargs):
    raise AssertionError("settle was called")


@pytest.mark.parametrize("env", [{"QTORCH_LAYOUT": "int8pack"}, {"QTORCH_AUTOTUNE": "0"}])
def test_a_forced_or_unmeasured_choice_is_not_settled(monkeypatch, tmp_path, env):
    install(monkeypatch, tmp_path, env)
    monkeypatch.setattr(sibling_layouts, "settle", _no_settle)
    m = Model()
    sets = sibling_layouts.find_siblings(m, torch.randn(1, 128, dtype=torch.bfloat16))
    got = choose_layouts(m, rows=1, siblings=sets)
    if "QTORCH_LAYOUT" in env:
        assert set(got.values()) == {"int8pack"}


def test_options_without_the_grouping_pass_are_not_settled(monkeypatch, tmp_path):
    """A model compiled without the siblings pass runs no set as one call: nothing to weigh."""
    install(monkeypatch, tmp_path)
    monkeypatch.setattr(qc, "_probe_runs", FakeProbes({(64, "blocked", 1): 0.6}))
    monkeypatch.setattr(sibling_layouts, "settle", _no_settle)
    m = Model()
    sets = sibling_layouts.find_siblings(m, torch.randn(1, 128, dtype=torch.bfloat16))
    for options in ({"freezing": True, "max_autotune": True},
                    {**compile_options("cpu"), "post_grad_custom_post_pass": qtorch.siblings.APART}):
        choose_layouts(m, rows=1, options=options, siblings=sets)


def test_a_set_whose_probes_fail_is_weighed_as_nothing(monkeypatch, tmp_path):
    install(monkeypatch, tmp_path)

    def crash():
        raise RuntimeError("inductor failed")

    m = Block()
    monkeypatch.setattr(sibling_layouts, "_set_probe", lambda *a: crash())  # not built: nothing measured
    assert sibling_layouts.saving_ms([m.q, m.k, m.v], compile_options("cpu")) is None
    monkeypatch.setattr(sibling_layouts, "_set_runs", lambda *a: {1: {"compiled": crash}})  # built, fails to run
    with pytest.warns(RuntimeWarning, match="no probe of"):
        assert sibling_layouts.saving_ms([m.q, m.k, m.v], compile_options("cpu")) is None


@pytest.mark.parametrize("together", [True, False])
def test_the_sets_probe_computes_every_layer(together):
    m = Block()
    members = [m.q, m.k, m.v]
    for layer_ in members:
        layer_.quantized_weight.hold_layout("blocked", layer_.compute_dtype)
    run = sibling_layouts._set_probe(members, 2, together, compile_options("cpu"))
    xs = [torch.randn(1, 128, dtype=torch.bfloat16) for _ in range(2)]
    outs = run(*xs)
    outs = run(*xs)
    assert len(outs) == 6
    for i, y in enumerate(outs):
        src, x = members[i % 3], xs[i // 3]
        ref = F.linear(x.float(), src.dequantized_weight(torch.float32), src.bias.float())
        assert torch.allclose(y.float(), ref, atol=2e-2 * float(ref.abs().max()), rtol=2e-2), i


def test_saving_is_measured_and_kept(monkeypatch, tmp_path):
    install(monkeypatch, tmp_path)
    m = Block()
    got = sibling_layouts.saving_ms([m.gate, m.up], compile_options("cpu"))
    assert isinstance(got, float)
    keys = [k for k in qc.probe_dispatcher().decisions() if "compiled-siblings-256+256" in k]
    assert len(keys) == 1 and {"together@1", "apart@1"} <= set(qc.probe_dispatcher().decisions()[keys[0]]["ms"])


@pytest.mark.usefixtures("native_launches")
@pytest.mark.parametrize("together,launches", [(True, 1), (False, 2)])
def test_the_sets_probe_runs_a_set_as_one_launch_or_apart(uncapped_team, together, launches):
    from qtorch import native_ops

    if native_ops.library() is None:
        pytest.skip(f"the C++ ops are not built here: {native_ops.reason()}")
    m = Block()
    members = [m.gate, m.up]
    for layer_ in members:
        if not layer_.quantized_weight.hold_layout("blocked", layer_.compute_dtype):
            pytest.skip("blocked cannot hold these layers here")
    run = sibling_layouts._set_probe(members, 2, together, compile_options("cpu"))
    xs = [torch.randn(1, 128, dtype=torch.bfloat16) for _ in range(2)]
    for _ in range(3):  # traced; the launches kept
        run(*xs)
    before = native_ops.runs()
    run(*xs)
    assert native_ops.runs() - before == 2 * launches  # two copies


def test_a_failed_choice_warns_and_keeps_the_first_calls_output(monkeypatch, tmp_path):
    install(monkeypatch, tmp_path)

    def broken(model, rows, options, siblings=None):
        raise RuntimeError("probe crashed")

    monkeypatch.setattr(qc, "choose_layouts", broken)
    m = Model()
    x = torch.randn(1, 128, dtype=torch.bfloat16)
    cm = qtorch.compile(m, rows=1, autotune=True)
    with torch.no_grad():
        want = m(x)
    with pytest.warns(RuntimeWarning, match="layout choice failed"):
        assert torch.equal(cm(x), want)
    assert cm._choose is None  # not tried again: the model ran


def test_a_first_call_that_raises_is_tried_again(monkeypatch, tmp_path):
    install(monkeypatch, tmp_path)
    seen = []
    monkeypatch.setattr(qc, "choose_layouts", lambda model, rows, options, siblings=None: seen.append(1) or {})
    monkeypatch.setattr(qc, "choose_blocking", lambda model, rows, options: None)  # (its own tests)
    m = Model()
    cm = qtorch.compile(m, rows=1)
    with pytest.raises(ValueError, match="in_features"):
        cm(torch.randn(1, 7, dtype=torch.bfloat16))  # the wrong width
    assert cm._choose is not None and seen == []
    assert not any(layer._forward_pre_hooks for layer in m.modules())
    cm(torch.randn(1, 128, dtype=torch.bfloat16))
    assert cm._choose is None and seen == [1]


def test_nothing_measured_chooses_at_compile(monkeypatch, tmp_path):
    install(monkeypatch, tmp_path, {"QTORCH_AUTOTUNE": "0"})
    seen = []
    monkeypatch.setattr(qc, "choose_layouts", lambda model, rows, options, siblings=None: seen.append(siblings) or {})
    cm = qtorch.compile(Model(), rows=1)
    assert cm._choose is None and seen == [None]


def test_compile_chooses_at_the_first_call_with_the_sets(monkeypatch, tmp_path):
    install(monkeypatch, tmp_path)
    seen = {}

    def choose(model, rows, options, siblings=None):
        seen["sets"] = siblings
        return {}

    monkeypatch.setattr(qc, "choose_layouts", choose)
    monkeypatch.setattr(qc, "choose_blocking", lambda model, rows, options: None)  # (its own tests)
    m = Model()
    x = torch.randn(1, 128, dtype=torch.bfloat16)
    cm = qtorch.compile(m, rows=1)
    assert "sets" not in seen
    with torch.no_grad():
        want = m(x)
    assert torch.equal(cm(x), want)  # the first call: eager
    assert len(seen["sets"]) == 4 and cm._choose is None
    y = cm(x)  # compiled
    assert torch.allclose(y.float(), want.float(), atol=5e-2 * float(want.abs().max()), rtol=5e-2)
