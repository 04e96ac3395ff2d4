"""qtorch.compile's layout choice: inductor's template layout or qtorch's own, by timing compiled one-layer probes.

Decisions are tested with injected probe timings (``_probe_runs`` replaced); the probes themselves are compiled and
run for real on small layers and checked against ``F.linear(x, dequantized_weight())``."""

import importlib
import time

import pytest
import torch
import torch._inductor.config as inductor_config
import torch.nn.functional as F

import qtorch
from qcore import PerChannel, PerGroup, QuantScheme
from qtorch import autotune, gemv
from qtorch.compile import _compiled_probe, _probe, choose_layouts, compile_options

qc = importlib.import_module("qtorch.compile")  # `qtorch.compile` the attribute is the function

W8 = QuantScheme(8, True, PerChannel(0))
W4 = QuantScheme(4, False, PerGroup(32))
TEMPLATE = {W8: "int8pack", W4: "int4pack"}
SCHEMES = pytest.mark.parametrize("scheme", [W8, W4], ids=["w8", "w4"])


_VNNI8_AVAILABLE = qtorch.vnni8.available


@pytest.fixture(autouse=True)
def without_vnni8(monkeypatch):
    """The injected timings below race the template layout, blocked and vnni; the vnni8 layout (AMX-INT8 CPUs
    only) is held out of them and tested on its own (test_vnni8_is_a_compiled_candidate_where_the_cpu_has_it)."""
    monkeypatch.setattr(qtorch.vnni8, "available", lambda: False)


def layer(scheme, n=64, k=128, dtype=torch.bfloat16, seed=0):
    torch.manual_seed(seed)
    return qtorch.QuantLinear.from_linear(torch.nn.Linear(k, n, dtype=dtype), scheme=scheme).eval()


def install(monkeypatch, tmp_path, env=None):
    """A measuring dispatcher with its own file (or ``env``) as the process's."""
    d = autotune.Dispatcher(cache_path=tmp_path / "dispatch.json", env=env or {}, evict=lambda: None)
    monkeypatch.setattr(autotune, "_DEFAULT", d)
    return d


class FakeProbes:
    """``_probe_runs`` with injected times: ``ms[(layout, rows)]`` per layer (a sleep; a call at the cold row
    counts runs every copy), ``fail``: layouts whose compiled call raises; records the (layout, rows) of each probe
    built."""

    def __init__(self, ms, fail=()):
        self.ms, self.fail, self.built = ms, set(fail), []

    def __call__(self, layer, layout, rows, options, copies=1):
        self.built.append((layout, rows))
        self.copies = copies

        def run(r):
            if layout in self.fail:
                raise RuntimeError("inductor failed")
            time.sleep(self.ms.get((layout, r), 0) * (copies if r in autotune.COLD_ROWS else 1) / 1e3)
        return {r: {"compiled": (lambda r=r: run(r))} for r in rows}


def fake(monkeypatch, ms, fail=()):
    probes = FakeProbes(ms, fail)
    monkeypatch.setattr(qc, "_probe_runs", probes)
    return probes


def check_outputs(q, x, tol=2e-2):
    ref = F.linear(x.float(), q.dequantized_weight(torch.float32), None if q.bias is None else q.bias.float())
    with torch.no_grad():
        y = q(x).float()
    assert torch.allclose(y, ref, atol=tol * float(ref.abs().max()), rtol=tol)


@SCHEMES
@pytest.mark.parametrize("faster", ["template", "own"])
def test_picks_the_faster_compiled_layout(monkeypatch, tmp_path, scheme, faster):
    install(monkeypatch, tmp_path)
    template = TEMPLATE[scheme]
    slow = "blocked" if faster == "template" else template
    # vnni, a third candidate on CPUs that have it, slow too: probes of no work alike are a tie decided by noise
    probes = fake(monkeypatch, {(slow, 16): 4, ("vnni", 16): 4})
    a, b, other = layer(scheme), layer(scheme, seed=1), layer(scheme, n=32)
    model = torch.nn.Sequential(a, b, other)
    got = choose_layouts(model, rows=16)
    want = template if faster == "template" else "blocked"
    assert got == {f"64x128|{qtorch.layouts.scheme_label(a.quantized_weight.spec)}|bfloat16": want,
                   f"32x128|{qtorch.layouts.scheme_label(other.quantized_weight.spec)}|bfloat16": want}
    assert a.quantized_weight.layout.name == b.quantized_weight.layout.name == want  # one probe per shape
    # one probe per candidate and shape: vnni's where the CPU has it and the layer's 64-channel tiles fit
    wide = [("vnni", (16,))] if scheme is W4 and qtorch.vnni.available() else []
    assert sorted(probes.built) == sorted([("blocked", (16,)), (template, (16,))] * 2 + wide)
    x = torch.randn(16, 128, dtype=torch.bfloat16)
    for q in (a, b):
        check_outputs(q, x)


@pytest.mark.skipif(not qtorch.vnni.available(), reason="the vnni layout needs a CPU with AVX512-VNNI")
def test_vnni_is_a_compiled_candidate_where_the_cpu_has_it(monkeypatch, tmp_path):
    install(monkeypatch, tmp_path)
    probes = fake(monkeypatch, {("int4pack", 1): 4, ("blocked", 1): 4})
    q = layer(W4)
    assert choose_layouts(torch.nn.Sequential(q), rows=1) == {
        f"64x128|{qtorch.layouts.scheme_label(q.quantized_weight.spec)}|bfloat16": "vnni"}
    assert sorted(probes.built) == [("blocked", (1,)), ("int4pack", (1,)), ("vnni", (1,))]
    assert q.quantized_weight.layout.name == "vnni"
    check_outputs(q, torch.randn(1, 128, dtype=torch.bfloat16))
    check_outputs(q, torch.randn(5, 128, dtype=torch.bfloat16))


@pytest.mark.skipif(not _VNNI8_AVAILABLE(), reason="the vnni8 layout needs a CPU with AMX-INT8")
def test_vnni8_is_a_compiled_candidate_where_the_cpu_has_it(monkeypatch, tmp_path):
    install(monkeypatch, tmp_path)
    monkeypatch.setattr(qtorch.vnni8, "available", _VNNI8_AVAILABLE)
    probes = fake(monkeypatch, {("int8pack", 16): 4, ("blocked", 16): 4})
    q = layer(W8)
    assert choose_layouts(torch.nn.Sequential(q), rows=16) == {
        f"64x128|{qtorch.layouts.scheme_label(q.quantized_weight.spec)}|bfloat16": "vnni8"}
    assert sorted(probes.built) == [("blocked", (16,)), ("int8pack", (16,)), ("vnni8", (16,))]
    assert q.quantized_weight.layout.name == "vnni8"
    check_outputs(q, torch.randn(16, 128, dtype=torch.bfloat16))
    check_outputs(q, torch.randn(1, 128, dtype=torch.bfloat16))


def test_rows_weigh_the_choice_as_a_request(monkeypatch, tmp_path):
    """Own kernels faster at one row, the template at 128: each wins alone; together a request (128 one-row
    steps, four 128-row calls: ``autotune.REQUEST_CALLS``) weighs them."""
    install(monkeypatch, tmp_path)
    fake(monkeypatch, {("int8pack", 1): 2, ("blocked", 128): 6})
    for rows, want in ((1, "blocked"), (128, "int8pack"), ((1, 128), "blocked"), (None, "blocked")):
        q = layer(W8)
        choose_layouts(torch.nn.Sequential(q), rows=rows)
        assert q.quantized_weight.layout.name == want, rows


def test_decision_is_kept_in_the_process_and_on_disk(monkeypatch, tmp_path):
    install(monkeypatch, tmp_path)
    probes = fake(monkeypatch, {("int4pack", 1): 3, ("vnni", 1): 3})
    choose_layouts(torch.nn.Sequential(layer(W4)), rows=1)
    n = len(probes.built)  # one per candidate: int4pack, blocked (and vnni where the CPU has it)
    assert n == 2 + qtorch.vnni.available()
    q = layer(W4, seed=3)
    choose_layouts(torch.nn.Sequential(q), rows=1)
    assert len(probes.built) == n and q.quantized_weight.layout.name == "blocked"
    install(monkeypatch, tmp_path)  # a new process: the file
    q = layer(W4, seed=4)
    choose_layouts(torch.nn.Sequential(q), rows=1)
    assert len(probes.built) == n and q.quantized_weight.layout.name == "blocked"
    choose_layouts(torch.nn.Sequential(q), rows=(1, 16))  # other rows: another decision
    assert len(probes.built) == 2 * n


@pytest.mark.parametrize("env,kernels,want", [({"QTORCH_LAYOUT": "blocked"}, "torch_pack_kernels", "blocked"),
                                              ({"QTORCH_LAYOUT": "int8pack"}, "blocked_kernels", "int8pack"),
                                              ({"QTORCH_LAYOUT": "canonical"}, "torch_pack_kernels", "canonical"),
                                              ({"QTORCH_AUTOTUNE": "0"}, "torch_pack_kernels", "int8pack"),
                                              ({"QTORCH_AUTOTUNE": "0"}, "blocked_kernels", "blocked")])
def test_env_forces_or_keeps_the_static_order(monkeypatch, tmp_path, request, env, kernels, want):
    request.getfixturevalue(kernels)
    install(monkeypatch, tmp_path, env)
    probes = fake(monkeypatch, {})
    q = layer(W8)
    assert q.quantized_weight.hold_layout("int8pack" if want == "blocked" else "blocked", torch.bfloat16)
    choose_layouts(torch.nn.Sequential(q), rows=16)
    assert q.quantized_weight.layout.name == want and probes.built == []
    check_outputs(q, torch.randn(3, 128, dtype=torch.bfloat16))


def test_unknown_forced_layout_is_an_error(monkeypatch, tmp_path):
    install(monkeypatch, tmp_path, {"QTORCH_LAYOUT": "nope"})
    with pytest.raises(ValueError, match="nope"):
        choose_layouts(torch.nn.Sequential(layer(W8)))


def test_a_failing_probe_loses(monkeypatch, tmp_path, torch_pack_kernels):
    install(monkeypatch, tmp_path)
    fake(monkeypatch, {("blocked", 16): 5}, fail={"int8pack"})
    q = layer(W8)
    with pytest.warns(RuntimeWarning, match="'int8pack:compiled@16' raised"):
        choose_layouts(torch.nn.Sequential(q), rows=16)
    assert q.quantized_weight.layout.name == "blocked"
    # every probe fails: the static order (template first here), with a warning; the layer is whole
    fake(monkeypatch, {}, fail={"int4pack", "blocked", "vnni"})
    q = layer(W4)
    with pytest.warns(RuntimeWarning, match="no layout probe"):
        choose_layouts(torch.nn.Sequential(q), rows=16)
    assert q.quantized_weight.layout.name == "int4pack"
    check_outputs(q, torch.randn(16, 128, dtype=torch.bfloat16))


def test_layers_without_a_template_layout_keep_theirs(monkeypatch, tmp_path, blocked_kernels):
    install(monkeypatch, tmp_path)
    probes = fake(monkeypatch, {})
    f32 = layer(W8, dtype=torch.float32)  # no template layout for float32 layers
    odd = layer(W4, n=30)  # N = 30: canonical only
    assert choose_layouts(torch.nn.Sequential(f32, odd)) == {} and probes.built == []
    assert (f32.quantized_weight.layout.name, odd.quantized_weight.layout.name) == ("blocked", "canonical")


def test_rows_are_checked():
    m = torch.nn.Sequential(layer(W8))
    for bad in (0, (1, -2), (), "16", (1.5,)):
        with pytest.raises(ValueError, match="rows"):
            qtorch.compile(m, rows=bad)
    with pytest.raises(TypeError, match="rows"):
        qtorch.compile(m, rows=1.5)


def test_probe_is_a_copy_with_a_forward_of_its_own():
    """Dynamo keeps compiled code per code object, at most 8 entries each: probes sharing the layer's forward
    would run eagerly past the eighth, and be timed eagerly."""
    q = layer(W8)
    p1, p2 = _probe(q, "blocked"), _probe(q, "int8pack")
    assert type(p1).forward.__code__ is not type(p2).forward.__code__
    assert (p1.layers[0].quantized_weight.layout.name,
            p2.layers[0].quantized_weight.layout.name) == ("blocked", "int8pack")
    # (empty buffers, such as a symmetric layout's zero points, have no storage to share: address 0)
    mine = {t.untyped_storage().data_ptr() for t in q.buffers() if t.numel()}
    assert not mine & {t.untyped_storage().data_ptr() for t in list(p1.buffers()) + list(p2.buffers()) if t.numel()}


def test_a_one_row_probe_calls_its_copies_in_turn():
    """At one row a probe runs its copies one after another in one compiled call (each weight then comes from
    memory, as a compiled model's layers do), at other rows the first copy alone; every copy is the layer."""
    q = layer(W4)
    p = _probe(q, "blocked", copies=3, rotate=(1,))
    assert len(p.layers) == 3 and len({m.quantized_weight.buffers["qweight"].data_ptr() for m in p.layers}) == 3
    torch._dynamo.reset()
    run = _compiled_probe(q, "blocked", (1, 5), compile_options("cpu", autotune=False), copies=3, rotate=(1,))
    x1, x5 = torch.randn(1, 128, dtype=torch.bfloat16), torch.randn(5, 128, dtype=torch.bfloat16)
    with torch.no_grad():
        ys, y5 = run(x1), run(x5)
    assert isinstance(ys, tuple) and len(ys) == 3 and all(torch.equal(y, ys[0]) for y in ys)
    for x, y in ((x1, ys[0]), (x5, y5)):
        ref = F.linear(x.float(), q.dequantized_weight(torch.float32), q.bias.float())
        assert y.shape == ref.shape and torch.allclose(y.float(), ref, atol=2e-2 * float(ref.abs().max()))


def test_one_row_probes_rotate_and_are_timed_per_layer(monkeypatch, tmp_path):
    """The race divides a rotating call's time by its copies: a one-row call of 16 copies of a 1 ms layer prices
    it at 1 ms, not 16."""
    install(monkeypatch, tmp_path)
    probes = fake(monkeypatch, {("int4pack", 1): 2, ("blocked", 1): 1, ("vnni", 1): 2})
    q = layer(W4)
    assert qc.probe_copies(q) == qc.PROBE_COPIES  # a small weight: as many as a probe takes
    with monkeypatch.context() as m:  # a large weight: the copies that stream the caches' size
        m.setattr(autotune, "rotation_copies", lambda nbytes: 3 if nbytes == 64 * 128 // 2 else 0)
        assert qc.probe_copies(q) == 3
    choose_layouts(torch.nn.Sequential(q), rows=1)
    assert probes.copies == qc.PROBE_COPIES
    entry = next(v for k, v in qc.probe_dispatcher()._decisions.items() if "compiled" in k)
    assert entry["path"] == "blocked" and 0.9 < entry["ms"]["blocked@1"] < 4, entry


@SCHEMES
def test_every_candidate_runs_compiled_within_tolerance(scheme):
    """Each candidate's probe, compiled with max-autotune as qtorch.compile compiles (C++ templates and ATen, no
    other backend, to keep the test short), equals ``F.linear(x, dequantized_weight())`` within bfloat16's
    tolerance, at odd rows."""
    q = layer(scheme, n=48, k=96)
    rows = (1, 5)
    with inductor_config.patch(max_autotune_gemm_backends="CPP,ATEN"):
        for name in (TEMPLATE[scheme], "blocked"):
            torch._dynamo.reset()
            run = _compiled_probe(q, name, rows, compile_options("cpu"))
            assert run._orig_mod.layers[0].quantized_weight.layout.name == name
            for r in rows:
                x = torch.randn(r, 96, dtype=torch.bfloat16)
                ref = F.linear(x.float(), q.dequantized_weight(torch.float32), q.bias.float())
                y = run(x).float()
                assert torch.allclose(y, ref, atol=2e-2 * float(ref.abs().max()), rtol=2e-2), (name, r)


def test_compile_end_to_end_holds_the_choice_and_keeps_paths(monkeypatch, tmp_path):
    """qtorch.compile(rows=...) moves the layer to the measured winner before tracing, and runs each row count
    once eagerly so the trace takes the path kept for it."""
    install(monkeypatch, tmp_path)
    fake(monkeypatch, {("int4pack", 5): 4, ("vnni", 5): 4})  # (vnni, where the CPU has it, slow too: no tie)
    q = layer(W4)
    torch._dynamo.reset()
    with inductor_config.patch(max_autotune_gemm_backends="CPP"):
        cm = qtorch.compile(torch.nn.Sequential(q), rows=5)
        x = torch.randn(5, 128, dtype=torch.bfloat16)
        y = cm(x).float()
    assert q.quantized_weight.layout.name == "blocked"
    assert ("cpu", torch.bfloat16, autotune.bucket_index(5)) in q.quantized_weight._routes
    ref = F.linear(x.float(), q.dequantized_weight(torch.float32), q.bias.float())
    assert torch.allclose(y, ref, atol=2e-2 * float(ref.abs().max()), rtol=2e-2)


def test_probe_dispatcher_shares_the_file_with_a_longer_budget(monkeypatch, tmp_path):
    d = install(monkeypatch, tmp_path)
    p = qc.probe_dispatcher()
    assert p is qc.probe_dispatcher() and p.cache_path == d.cache_path and p.measuring
    assert (p.budget_s, p.min_rounds, p.max_rounds) == (qc.PROBE_BUDGET_S, *qc.PROBE_ROUNDS)
    install(monkeypatch, tmp_path, {"QTORCH_AUTOTUNE": "0"})
    assert qc.probe_dispatcher() is not p and not qc.probe_dispatcher().measuring


def test_compile_keeps_each_rows_path_before_tracing():
    """A layer never called eagerly: under tracing nothing is measured, so without a kept path the trace took the
    layout's own (``numba`` for a float32 blocked layer at 128 rows: 0.46-0.72x of compiled dense at K = N = 4096
    on the AMX Xeon, where the kept ``amx`` ran at 1.10-1.58x)."""
    q = layer(W8, dtype=torch.float32)
    assert q.quantized_weight.layout.name == "blocked" and q.quantized_weight._routes == {}
    qtorch.compile(q, rows=(3, 100))  # (nothing measured in tests: chosen at once, no first call needed)
    assert set(q.quantized_weight._routes) == {("cpu", torch.float32, autotune.bucket_index(r)) for r in (3, 100)}


def test_probes_time_the_cpp_ops_the_model_runs_and_keep_copies_apart(uncapped_team):
    """A probe runs the inference ops' C++ twins as a model compiled by qtorch.compile does (a probe of the Python
    ops timed a layer 1.5x slower than the model runs it), each copy by its own call: grouped as siblings, copies
    that read one row would time a chain no model runs."""
    from qtorch import native_ops

    if native_ops.library() is None:
        pytest.skip(f"the C++ ops are not built here: {native_ops.reason()}")
    q = layer(W8, n=256)
    run = _compiled_probe(q, "blocked", (1,), compile_options("cpu"), copies=3, rotate=(1,))
    x = torch.randn(1, 128, dtype=torch.bfloat16)
    for _ in range(3):  # traced; each copy keeps its plan, then its launch
        outs = run(x)
    before = native_ops.runs()
    outs = run(x)
    # (QTORCH_NATIVE_LAUNCH=0: the C++ ops hand every call to the Python ops, the same numbers)
    assert native_ops.runs() - before == (3 if gemv.NATIVE_LAUNCH else 0)
    ref = F.linear(x.float(), q.dequantized_weight(torch.float32), q.bias.float())
    for y in outs:
        assert torch.allclose(y.float(), ref, atol=2e-2 * float(ref.abs().max()), rtol=2e-2)


# -- inductor's cache blocking for the template layouts


class FakeBlockingProbes(FakeProbes):
    """``_probe_runs`` with injected times per blocking: ``ms[(blocking, rows)]`` (``"inductor"``: the options set
    none)."""

    def __call__(self, layer, layout, rows, options, copies=1):
        blocking = options.get(qc.BLOCKING_OPTION, qc.OWN_BLOCKING)
        self.built.append((layout, blocking, rows))

        def run(r):
            time.sleep(self.ms.get((blocking, r), 0) * (copies if r in autotune.COLD_ROWS else 1) / 1e3)
        return {r: {"compiled": (lambda r=r: run(r))} for r in rows}


def blocking_probes(monkeypatch, ms):
    probes = FakeBlockingProbes(ms)
    monkeypatch.setattr(qc, "_probe_runs", probes)
    return probes


def holding(scheme, layout, **kw):
    q = layer(scheme, **kw)
    assert q.quantized_weight.hold_layout(layout, q.compute_dtype)
    return q


@SCHEMES
def test_a_faster_blocking_is_chosen_for_the_template_layers(monkeypatch, tmp_path, scheme):
    install(monkeypatch, tmp_path)
    slow = {(qc.OWN_BLOCKING, 16): 4, (qc.TEMPLATE_BLOCKINGS[1], 16): 4}
    probes = blocking_probes(monkeypatch, slow)
    model = torch.nn.Sequential(holding(scheme, TEMPLATE[scheme]), holding(scheme, TEMPLATE[scheme], seed=1))
    assert qc.choose_blocking(model, rows=16) == qc.TEMPLATE_BLOCKINGS[0]
    # one probe per blocking for the shape group, each compiled with its options
    assert sorted(probes.built) == sorted((TEMPLATE[scheme], b, (16,)) for b in (qc.OWN_BLOCKING,)
                                          + qc.TEMPLATE_BLOCKINGS)
    probes.built.clear()
    assert qc.choose_blocking(model, rows=16) == qc.TEMPLATE_BLOCKINGS[0] and probes.built == []  # kept


def test_inductors_own_blocking_holds_within_the_tie(monkeypatch, tmp_path):
    install(monkeypatch, tmp_path)
    blocking_probes(monkeypatch, {(b, 16): 4 for b in (qc.OWN_BLOCKING,) + qc.TEMPLATE_BLOCKINGS})
    assert qc.choose_blocking(torch.nn.Sequential(holding(W8, "int8pack")), rows=16) is None


def test_the_blocking_weighs_every_template_group_by_its_layers(monkeypatch, tmp_path):
    """One option serves the whole graph: a blocking that helps one layer but slows three loses."""
    install(monkeypatch, tmp_path)

    class PerShape(FakeBlockingProbes):
        def __call__(self, layer, layout, rows, options, copies=1):
            self.ms = ({(qc.OWN_BLOCKING, 16): 6, (qc.TEMPLATE_BLOCKINGS[1], 16): 6} if layer.out_features == 64
                       else {(qc.TEMPLATE_BLOCKINGS[0], 16): 3, (qc.TEMPLATE_BLOCKINGS[1], 16): 3})
            return super().__call__(layer, layout, rows, options, copies)

    monkeypatch.setattr(qc, "_probe_runs", PerShape({}))
    one = holding(W8, "int8pack")  # 64 x 128: TEMPLATE_BLOCKINGS[0] saves 6 ms a call
    three = [holding(W8, "int8pack", n=128, seed=s) for s in range(3)]  # 128 x 128: it costs 3 ms each
    assert qc.choose_blocking(torch.nn.Sequential(one, *three), rows=16) is None
    assert qc.choose_blocking(torch.nn.Sequential(one, three[0]), rows=16) == qc.TEMPLATE_BLOCKINGS[0]


def test_nothing_is_measured_without_template_layers_or_with_a_callers_blocking(monkeypatch, tmp_path):
    install(monkeypatch, tmp_path)
    probes = blocking_probes(monkeypatch, {(qc.OWN_BLOCKING, 16): 4})
    assert qc.choose_blocking(torch.nn.Sequential(holding(W8, "blocked")), rows=16) is None
    model = torch.nn.Sequential(holding(W8, "int8pack"))
    assert qc.choose_blocking(model, rows=16, options={**compile_options("cpu"), qc.BLOCKING_OPTION: "4,1,4"}) is None
    with inductor_config.patch(**{qc.BLOCKING_OPTION: "4,1,4"}):
        assert qc.choose_blocking(model, rows=16) is None
    install(monkeypatch, tmp_path, env={"QTORCH_AUTOTUNE": "0"})
    assert qc.choose_blocking(model, rows=16) is None
    assert probes.built == []


def test_the_compiled_model_runs_with_the_chosen_blocking(monkeypatch, tmp_path):
    """After the first call, the model compiles with the blocking chosen (inductor accepts it) and its outputs
    stay within the dtype's tolerance of F.linear on the dequantized weight."""
    install(monkeypatch, tmp_path)
    fake(monkeypatch, {("blocked", 32): 4, ("vnni", 32): 4, ("vnni8", 32): 4})  # the template layout wins
    monkeypatch.setattr(qc, "choose_blocking", lambda model, rows, options: qc.TEMPLATE_BLOCKINGS[0])
    q = layer(W8)
    torch._dynamo.reset()
    cm = qtorch.compile(torch.nn.Sequential(q), rows=32)
    x = torch.randn(32, 128, dtype=torch.bfloat16)
    cm(x)  # the choices
    assert q.quantized_weight.layout.name == "int8pack"
    assert cm.options[qc.BLOCKING_OPTION] == qc.TEMPLATE_BLOCKINGS[0]
    y = cm(x).float()
    ref = F.linear(x.float(), q.dequantized_weight(torch.float32), q.bias.float())
    assert torch.allclose(y, ref, atol=2e-2 * float(ref.abs().max()), rtol=2e-2)
