"""The measuring dispatcher (qtorch.autotune), driven by a fake clock: candidates "take" the time they advance it."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from qtorch import autotune as A

KEY = A.DispatchKey.make(4096, 4096, "w8-sym-channel", torch.bfloat16, rows=128, threads=2)


class FakeClock:
    def __init__(self):
        self.now = 0.0
        self.calls: dict[str, int] = {}

    def __call__(self):
        return self.now

    def path(self, name, *costs_ms):
        """A candidate that costs ``costs_ms`` per call (cycling), counting its calls."""
        self.calls[name] = 0

        def run():
            self.now += costs_ms[self.calls[name] % len(costs_ms)] / 1e3
            self.calls[name] += 1
        return run


def dispatcher(tmp_path=None, env=None, clock=None, **kw):
    path = False if tmp_path is None else tmp_path / "dispatch.json"
    return A.Dispatcher(cache_path=path, timer=clock or FakeClock(), env={} if env is None else env, **kw)


def test_row_buckets_cover_every_row_count_once():
    labels = [A.row_bucket(r) for r in range(1, 600)]
    assert labels[0] == "1" and labels[1] == labels[3] == "2-4" and labels[4] == labels[15] == "5-16"
    assert labels[16] == "17-64" and labels[64] == labels[255] == "65-256" and labels[256] == ">256"
    assert len(set(labels)) == 6
    for bad in (0, -1, 2.0, True, "3"):
        with pytest.raises(ValueError, match="rows must be an int"):
            A.row_bucket(bad)


def test_key_validation_names_the_field():
    with pytest.raises(ValueError, match="in_features"):
        A.DispatchKey.make(8, 0, "w8", torch.float32, rows=1)
    with pytest.raises(ValueError, match="scheme"):
        A.DispatchKey.make(8, 8, "", torch.float32, rows=1)
    assert str(KEY) == "4096x4096|w8-sym-channel|bfloat16|rows 65-256|threads 2"


def test_picks_the_fastest_and_measures_once():
    clock = FakeClock()
    d = dispatcher(clock=clock)
    cands = {"blocked": clock.path("blocked", 3.0), "dequant_mm": clock.path("dequant_mm", 1.0),
             "int8pack": clock.path("int8pack", 2.0)}
    assert d.choose(KEY, cands) == "dequant_mm"
    before = dict(clock.calls)
    assert d.choose(KEY, cands) == "dequant_mm"
    assert clock.calls == before  # the second call is a lookup
    assert d.decisions()[str(KEY)]["ms"] == {"blocked": 3.0, "dequant_mm": 1.0, "int8pack": 2.0}


def test_median_not_mean_decides():
    clock = FakeClock()
    d = dispatcher(clock=clock, min_rounds=5, max_rounds=5, budget_s=0)
    # "spiky" is faster on most calls but has one huge outlier: its median wins, its mean would not
    cands = {"steady": clock.path("steady", 1.0), "spiky": clock.path("spiky", 0.5, 0.5, 30.0, 0.5, 0.5, 0.5)}
    assert d.choose(KEY, cands) == "spiky"


def test_the_fastest_call_decides_not_the_median():
    clock = FakeClock()
    d = dispatcher(clock=clock, min_rounds=5, max_rounds=5, budget_s=1.0)
    # a neighbour held a core during most of "fast"'s calls (2.5 ms each; 1 ms when it ran alone): noise only adds
    # time, so its fastest call is its cost, and the decision is kept for good
    cands = {"steady": clock.path("steady", 2.0), "fast": clock.path("fast", 2.5, 2.5, 1.0, 2.5, 2.5, 2.5)}
    assert d.choose(KEY, cands) == "fast"
    assert d.decisions()[str(KEY)]["ms"] == {"steady": 2.0, "fast": 1.0}


@pytest.mark.parametrize("busy_at", ["before", "after", "never"])
def test_a_decision_measured_beside_other_work_is_kept_in_the_process_only(tmp_path, busy_at):
    clock = FakeClock()
    probes = iter({"before": (1, 0), "after": (0, 2), "never": (0, 0)}[busy_at])
    d = dispatcher(tmp_path, clock=clock, others_running=lambda: next(probes))
    cands = {"a": clock.path("a", 2.0), "b": clock.path("b", 1.0)}
    assert d.choose(KEY, cands) == "b"
    assert d.choose(KEY, cands) == "b" and clock.calls["b"] <= 1 + d.max_rounds  # measured once in the process
    again = dispatcher(tmp_path, clock=clock, others_running=lambda: 0)
    assert again.cached(KEY) == (None if busy_at != "never" else "b")  # a later process measures again


def test_a_clearly_slower_path_is_dropped_after_two_timed_calls():
    clock = FakeClock()
    d = dispatcher(clock=clock, min_rounds=3, max_rounds=10)
    cands = {"int8pack": clock.path("int8pack", 26.0), "dequant_mm": clock.path("dequant_mm", 3.5)}
    assert d.choose(KEY, cands) == "dequant_mm"
    assert A.DROP_AFTER == 2 and clock.calls["int8pack"] == 1 + 2  # warm-up and two timed calls, no more


def test_one_slow_call_does_not_drop_the_fastest_path():
    # MiniLM's 384x1536 layer at 104 rows beside another job: amx's first timed call took 5.6 ms (0.5 settled),
    # numba's 1.5; dropped on that one call, the layer ran numba, 3x slower, for the whole process
    clock = FakeClock()
    d = dispatcher(clock=clock, min_rounds=3, max_rounds=10)
    cands = {"numba": clock.path("numba", 1.5), "amx": clock.path("amx", 0.5, 5.6, *[0.5] * 20)}
    assert d.choose(KEY, cands) == "amx"
    assert d.decisions()[str(KEY)]["ms"]["amx"] == 0.5


def test_a_decision_is_bounded_by_the_budget():
    clock = FakeClock()
    d = dispatcher(clock=clock, budget_s=0.005, min_rounds=3, max_rounds=50)
    cands = {"a": clock.path("a", 1.0, 1.2), "b": clock.path("b", 1.1, 1.0)}  # too close to call early
    d.choose(KEY, cands)
    assert clock.calls["a"] == clock.calls["b"] == 1 + 3  # warm-up + min_rounds: 6.3 ms timed >= budget
    assert clock.now < 0.02


def test_a_path_that_raises_is_dropped_and_all_failing_raises():
    clock = FakeClock()
    d = dispatcher(clock=clock)

    def broken():
        raise RuntimeError("kernel refuses this shape")
    with pytest.warns(RuntimeWarning, match="'broken' raised"):
        assert d.choose(KEY, {"broken": broken, "ok": clock.path("ok", 5.0)}) == "ok"
    with pytest.raises(RuntimeError, match="refuses"):
        dispatcher().choose(KEY, {"x": broken, "y": broken})


def test_no_candidates_and_bad_key_are_errors():
    with pytest.raises(ValueError, match="no candidate"):
        dispatcher().choose(KEY, {})
    with pytest.raises(TypeError, match="DispatchKey"):
        dispatcher().choose("4096x4096", {"a": lambda: None})


def test_would_choose_the_amx_friendly_path_when_it_is_faster():
    # the Xeon (AMX), bf16, K = N = 4096, 128 rows: int8pack 25.96 ms, dequantize + oneDNN matmul ~3.6 ms
    clock = FakeClock()
    amx = {"blocked": clock.path("blocked", 20.0), "int8pack": clock.path("int8pack", 25.96),
           "dequant_mm": clock.path("dequant_mm", 3.6)}
    assert dispatcher(clock=clock).choose(KEY, amx) == "dequant_mm"
    # the AVX2 CPU, same layer: the blocked kernels beat both (48.6 ms vs 58.2 ms int8pack, bf16 matmul 196 ms)
    clock = FakeClock()
    avx2 = {"blocked": clock.path("blocked", 48.6), "int8pack": clock.path("int8pack", 58.2),
            "dequant_mm": clock.path("dequant_mm", 200.0)}
    assert dispatcher(clock=clock).choose(KEY, avx2) == "blocked"
    # one row on the Xeon: PyTorch's int8pack (0.49 ms) beats dense-speed dequantize + matmul
    key1 = A.DispatchKey.make(4096, 4096, "w8-sym-channel", torch.bfloat16, rows=1, threads=2)
    clock = FakeClock()
    one = {"dequant_mm": clock.path("dequant_mm", 1.3), "int8pack": clock.path("int8pack", 0.49)}
    assert dispatcher(clock=clock).choose(key1, one) == "int8pack"


def test_decisions_persist_on_disk_for_the_next_process(tmp_path):
    clock = FakeClock()
    cands = {"a": clock.path("a", 2.0), "b": clock.path("b", 1.0)}
    assert dispatcher(tmp_path, clock=clock).choose(KEY, cands) == "b"
    data = json.loads((tmp_path / "dispatch.json").read_text())
    assert data["format"] == "qtorch-dispatch" and data["decisions"][str(KEY)]["path"] == "b"
    assert data["fingerprint"] == A.fingerprint()
    before = dict(clock.calls)
    fresh = dispatcher(tmp_path, clock=clock)
    assert fresh.cached(KEY) == "b"
    assert fresh.choose(KEY, cands) == "b" and clock.calls == before  # nothing measured again


def test_a_cached_path_that_is_no_longer_eligible_is_measured_again(tmp_path):
    clock = FakeClock()
    dispatcher(tmp_path, clock=clock).choose(KEY, {"a": clock.path("a", 2.0), "b": clock.path("b", 1.0)})
    assert dispatcher(tmp_path, clock=clock).choose(KEY, {"a": clock.path("a", 2.0),
                                                          "c": clock.path("c", 3.0)}) == "a"


@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe\x00garbage", b"[1, 2, 3]", b'{"format": "other"}',
                                     b"", json.dumps({"format": "qtorch-dispatch", "version": 1, "fingerprint":
                                                      {"cpu": "another machine"}, "decisions": {
                                                          str(KEY): {"path": "a"}}}).encode()])
def test_a_corrupt_or_foreign_file_is_ignored_and_rewritten(tmp_path, content):
    path = tmp_path / "dispatch.json"
    path.write_bytes(content)
    clock = FakeClock()
    d = dispatcher(tmp_path, clock=clock)
    assert d.cached(KEY) is None
    assert d.choose(KEY, {"a": clock.path("a", 2.0), "b": clock.path("b", 1.0)}) == "b"
    data = json.loads(path.read_text())
    assert data["fingerprint"] == A.fingerprint() and list(data["decisions"]) == [str(KEY)]
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_an_unwritable_cache_warns_once_and_still_decides(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    clock = FakeClock()
    d = A.Dispatcher(cache_path=blocker / "sub" / "dispatch.json", timer=clock, env={})
    with pytest.warns(RuntimeWarning, match="cannot write the dispatch cache"):
        assert d.choose(KEY, {"a": clock.path("a", 2.0), "b": clock.path("b", 1.0)}) == "b"
    assert d.choose(KEY, {"a": clock.path("a", 2.0), "b": clock.path("b", 1.0)}) == "b"


def test_the_file_name_carries_the_machine_fingerprint(tmp_path, monkeypatch):
    env = {"QTORCH_CACHE_DIR": str(tmp_path)}
    p = A.default_cache_path(env)
    assert p.parent == tmp_path and p.name.startswith("dispatch-") and p.suffix == ".json"
    model, flags = A.cpu_info()
    assert model and flags
    monkeypatch.setattr(torch, "__version__", "0.0.0-other")
    assert A.default_cache_path(env) != p  # another torch: another file
    monkeypatch.setattr(A, "cpu_info", lambda: ("Other CPU", "sse2"))
    assert A.fingerprint()["cpu"] == "Other CPU"


def test_a_build_offering_another_path_uses_another_file(tmp_path, monkeypatch):
    # same versions, one more kernel (between two commits of a development install): decisions that never raced
    # it, layout decisions included, are not served
    from qtorch.layouts import blocked

    env = {"QTORCH_CACHE_DIR": str(tmp_path)}
    p = A.default_cache_path(env)
    real = blocked.BLOCKED.paths
    monkeypatch.setattr(blocked.BLOCKED, "paths", lambda *a, **k: real(*a, **k) + ("newer",))
    assert "blocked:newer" in A.fingerprint()["paths"] and A.default_cache_path(env) != p



@pytest.mark.parametrize("name, value", [("REQUEST_CALLS", {1: 64, 128: 8}), ("LAYOUT_ROWS", (1, 128)),
                                         ("LAYOUT_TIE", 1.05)])
def test_another_layout_rule_uses_another_file(tmp_path, monkeypatch, name, value):
    # layout decisions made under another rule (request, row counts timed, tie) are not served
    env = {"QTORCH_CACHE_DIR": str(tmp_path)}
    p = A.default_cache_path(env)
    monkeypatch.setattr(A, name, value)
    assert A.default_cache_path(env) != p


_WRITER = textwrap.dedent("""
    import sys, torch
    from qtorch import autotune as A
    path, tag, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    t = [0.0]
    def timer():
        return t[0]
    def cost(ms):
        def run():
            t[0] += ms / 1e3
        return run
    d = A.Dispatcher(cache_path=path, timer=timer, env={}, others_running=lambda: 0)
    for i in range(n):
        key = A.DispatchKey.make(64 + i, 64, "w8-" + tag, torch.float32, rows=1, threads=1)
        assert d.choose(key, {"slow": cost(2.0), tag: cost(1.0)}) == tag
""")


def test_two_processes_writing_at_once_lose_nothing(tmp_path):
    path = tmp_path / "dispatch.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(path), tag, "40"], env=env,
                              stderr=subprocess.PIPE) for tag in ("p", "q")]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()
    decisions = json.loads(path.read_text())["decisions"]
    assert len(decisions) == 80
    assert {v["path"] for v in decisions.values()} == {"p", "q"}


def test_qtorch_path_forces_an_eligible_path_only():
    clock = FakeClock()
    d = dispatcher(env={"QTORCH_PATH": "int8pack"}, clock=clock)
    cands = {"int8pack": clock.path("int8pack", 26.0), "dequant_mm": clock.path("dequant_mm", 3.0)}
    assert d.choose(KEY, cands) == "int8pack"
    assert clock.calls == {"int8pack": 0, "dequant_mm": 0}
    assert d.choose(KEY, {"dequant_mm": cands["dequant_mm"], "blocked": clock.path("blocked", 5.0)}) == "dequant_mm"


def test_a_tie_goes_to_the_first_candidate_within_it():
    clock = [0.0]
    cost = {"a": 1.05, "b": 1.01, "c": 1.0}

    def run(name):
        clock[0] += cost[name]

    cands = {n: (lambda n=n: run(n)) for n in cost}
    assert A.Dispatcher(cache_path=False, env={}, timer=lambda: clock[0]).choose(KEY, cands) == "c"
    assert A.Dispatcher(cache_path=False, env={}, timer=lambda: clock[0]).choose(KEY, cands, tie=1.02) == "b"
    assert A.Dispatcher(cache_path=False, env={}, timer=lambda: clock[0]).choose(KEY, cands, tie=1.1) == "a"


def test_autotune_off_takes_the_default_order():
    clock = FakeClock()
    d = dispatcher(env={"QTORCH_AUTOTUNE": "0"}, clock=clock)
    assert d.choose(KEY, {"blocked": clock.path("blocked", 9.0), "fast": clock.path("fast", 1.0)}) == "blocked"
    assert clock.calls == {"blocked": 0, "fast": 0}
    with pytest.raises(ValueError, match="QTORCH_AUTOTUNE"):
        dispatcher(env={"QTORCH_AUTOTUNE": "maybe"})


def test_nothing_is_measured_while_compiling(monkeypatch, tmp_path):
    clock = FakeClock()
    cands = {"a": clock.path("a", 2.0), "b": clock.path("b", 1.0)}
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    d = dispatcher(tmp_path, clock=clock)
    assert d.choose(KEY, cands) == "a"  # the default, nothing timed
    assert clock.calls == {"a": 0, "b": 0} and d.decisions() == {}
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    assert d.choose(KEY, cands) == "b"  # measured eagerly
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    calls = dict(clock.calls)
    assert d.choose(KEY, cands) == "b" and clock.calls == calls  # the cached choice under tracing


def test_choose_runs_inside_torch_compile_fullgraph():
    d = dispatcher()
    d._decisions[str(KEY)] = {"path": "double", "ms": {}}

    def f(x):
        path = d.choose(KEY, {"inc": lambda: None, "double": lambda: None})
        return x * 2 if path == "double" else x + 1
    x = torch.ones(3)
    assert torch.equal(torch.compile(f, fullgraph=True, backend="eager")(x), torch.full((3,), 2.0))


def test_a_path_added_since_the_decision_is_raced_against_the_kept_one(tmp_path):
    # a newer build offers a path the kept decision never timed: it is measured, and wins where it is faster
    clock = FakeClock()
    dispatcher(tmp_path, clock=clock).choose(KEY, {"a": clock.path("a", 2.0), "b": clock.path("b", 1.0)})
    newer = {"a": clock.path("a", 2.0), "b": clock.path("b", 1.0), "c": clock.path("c", 0.5)}
    assert dispatcher(tmp_path, clock=clock).choose(KEY, newer) == "c"
    before = dict(clock.calls)
    assert dispatcher(tmp_path, clock=clock).choose(KEY, newer) == "c" and clock.calls == before  # kept again


def test_a_candidate_that_failed_its_race_does_not_make_every_call_measure_again(tmp_path):
    clock = FakeClock()

    def broken():
        raise RuntimeError("not for this shape")

    cands = {"a": clock.path("a", 2.0), "b": clock.path("b", 1.0), "broken": broken}
    d = dispatcher(tmp_path, clock=clock)
    with pytest.warns(RuntimeWarning, match="'broken' raised.*not for this shape"):
        assert d.choose(KEY, cands) == "b"
    before = dict(clock.calls)
    assert d.choose(KEY, cands) == "b" and clock.calls == before  # kept: nothing timed again


def test_a_decision_made_without_a_path_that_raised_is_not_written(tmp_path):
    """The failure may be one this process alone has: the next process measures again, and the path wins
    there once it runs."""
    clock = FakeClock()
    calls = []

    def flaky():
        calls.append(1)
        raise OSError("kernel cache file truncated")

    d = dispatcher(tmp_path, clock=clock)
    with pytest.warns(RuntimeWarning, match="'fast' raised.*OSError: kernel cache file truncated"):
        assert d.choose(KEY, {"slow": clock.path("slow", 3.0), "fast": flaky}) == "slow"
    assert d.decisions()[str(KEY)]["failed"] == ["fast"]
    assert not (tmp_path / "dispatch.json").exists()
    later = dispatcher(tmp_path, clock=clock)
    assert later.choose(KEY, {"slow": clock.path("slow", 3.0), "fast": clock.path("fast", 1.0)}) == "fast"
    assert json.loads((tmp_path / "dispatch.json").read_text())["decisions"][str(KEY)]["path"] == "fast"


def test_the_last_level_cache_is_read_from_the_cpu_cache_listing(tmp_path, monkeypatch):
    """Linux lists CPU 0's caches in sysfs (Python's os.sysconf has no SC_LEVEL3_CACHE_SIZE there): the largest one
    sizes the eviction and the layout trials' rotation, within 32-256 MB."""
    for name, size in (("index0", "48K"), ("index2", "2048K"), ("index3", "491520K")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "size").write_text(size + "\n")
    (tmp_path / "uevent").write_text("")  # not a cache: no size
    monkeypatch.setattr(A, "_CPU_CACHES", str(tmp_path))
    assert A.last_level_cache() == 480 << 20 and A.cold_bytes() == 256 << 20
    (tmp_path / "index3" / "size").write_text("8M")
    assert A.last_level_cache() == 8 << 20 and A.cold_bytes() == 32 << 20
    (tmp_path / "index3" / "size").write_text("24M")
    assert A.cold_bytes() == 48 << 20
    monkeypatch.setattr(A, "_CPU_CACHES", str(tmp_path / "absent"))
    monkeypatch.setattr(A.os, "sysconf", lambda name: (_ for _ in ()).throw(ValueError(name)))
    assert A.last_level_cache() == 0 and A.cold_bytes() == 32 << 20
