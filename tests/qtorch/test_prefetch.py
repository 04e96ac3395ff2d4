"""qtorch.prefetch: the one-row kernel's prefetch distance, chosen by measurement once per machine and width."""

import numpy as np
import pytest
import torch

import qtorch
from qtorch import autotune, gemv, prefetch


class Clock:
    """A timer that each fake pass advances by its own cost."""

    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def fake_trials(clock, cost, calls):
    def trials(bits):
        calls.append(bits)
        return {str(d): (lambda d=d: setattr(clock, "t", clock.t + cost(d))) for d in prefetch.DISTANCES}
    return trials


def test_the_fastest_distance_is_chosen_and_kept(monkeypatch, tmp_path):
    clock, calls = Clock(), []
    monkeypatch.setattr(prefetch, "_trials", fake_trials(clock, lambda d: 1.0 + abs(d - 8192) / 8192, calls))
    d = autotune.Dispatcher(tmp_path / "c.json", timer=clock, env={}, others_running=lambda: 0)
    assert prefetch.distance(4, d) == 8192
    assert prefetch.distance(4, d) == 8192 and calls == [4]  # kept: measured once
    assert prefetch.measured(d) == {4: 8192}
    # another process on the same machine reads it from the file, measuring nothing
    monkeypatch.setattr(prefetch, "_trials", lambda bits: pytest.fail("measured again"))
    fresh = autotune.Dispatcher(tmp_path / "c.json", timer=clock, env={}, others_running=lambda: 0)
    assert prefetch.distance(4, fresh) == 8192
    key = str(autotune.SettingKey.make("gemv-prefetch-w4"))
    assert fresh.decisions()[key]["path"] == "8192"


def test_the_shortest_distance_within_the_tie_wins(monkeypatch):
    # 8 KB fastest, 4 KB 1% behind (within TIE), 2 KB 10% behind: 4 KB; no prefetch 1.5% behind would win over all
    cost = {0: 1.10, 2048: 1.10, 4096: 1.01, 8192: 1.0, 16384: 1.0, 32768: 1.03}
    clock = Clock()
    monkeypatch.setattr(prefetch, "_trials", fake_trials(clock, cost.get, []))
    assert prefetch.distance(4, autotune.Dispatcher(cache_path=False, timer=clock, env={})) == 4096
    cost[0] = 1.015
    monkeypatch.setattr(prefetch, "_trials", fake_trials(clock, cost.get, []))
    assert prefetch.distance(4, autotune.Dispatcher(cache_path=False, timer=clock, env={})) == 0


def test_each_width_is_measured_for_itself(monkeypatch):
    clock, calls = Clock(), []
    monkeypatch.setattr(prefetch, "_trials", fake_trials(clock, lambda d: 1.0 + abs(d - 4096) / 4096, calls))
    d = autotune.Dispatcher(cache_path=False, timer=clock, env={})
    assert prefetch.distance(8, d) == 4096
    assert prefetch.distance(4, d) == 4096
    assert calls == [8, 4]


def test_nothing_is_measured_with_autotune_off(monkeypatch):
    monkeypatch.setattr(prefetch, "_trials", lambda bits: pytest.fail("measured"))
    d = autotune.Dispatcher(cache_path=False, env={"QTORCH_AUTOTUNE": "0"})
    assert prefetch.distance(4, d) == gemv.PREFETCH
    assert prefetch.measured(d) == {}


def test_qtorch_path_does_not_force_a_setting(monkeypatch):
    clock, calls = Clock(), []
    monkeypatch.setattr(prefetch, "_trials", fake_trials(clock, lambda d: 1.0 + abs(d - 2048) / 2048, calls))
    d = autotune.Dispatcher(cache_path=False, timer=clock, env={"QTORCH_PATH": "32768"})
    assert prefetch.distance(4, d) == 2048


@pytest.mark.parametrize("kept", ["abc", "12345", ""])
def test_a_kept_value_that_is_no_distance_is_measured_again(monkeypatch, kept):
    clock, calls = Clock(), []
    monkeypatch.setattr(prefetch, "_trials", fake_trials(clock, lambda d: 1.0 + abs(d - 4096), calls))
    d = autotune.Dispatcher(cache_path=False, timer=clock, env={})
    d.keep(autotune.SettingKey.make("gemv-prefetch-w8"), {"path": kept})  # another build's file, or edited
    assert prefetch.measured(d) == {}
    assert prefetch.distance(8, d) == 4096 and calls == [8]


@pytest.mark.parametrize("bits", [0, 2, 16, "4", 4.0, True])
def test_other_widths_are_refused(bits):
    with pytest.raises(ValueError, match="4- or 8-bit"):
        prefetch.distance(bits, autotune.Dispatcher(cache_path=False, env={}))


@pytest.mark.parametrize("name", ["", "a|b", 3])
def test_a_setting_key_needs_a_plain_name(name):
    with pytest.raises(ValueError, match="setting's name"):
        autotune.SettingKey.make(name)


@pytest.mark.parametrize("bits", [4, 8])
def test_the_real_trials_run_every_distance_with_the_same_result(monkeypatch, bits):
    monkeypatch.setattr(autotune, "cold_bytes", lambda: 8 << 20)  # a few copies suffice here
    passes = prefetch._trials(bits)
    assert list(passes) == [str(d) for d in prefetch.DISTANCES]
    outs = [passes[name]().copy() for name in passes]
    assert np.isfinite(outs[0]).all() and np.abs(outs[0]).max() > 0
    for out in outs[1:]:
        np.testing.assert_array_equal(out, outs[0])  # no bit depends on the distance


def test_the_real_measurement_picks_a_raced_distance(monkeypatch):
    monkeypatch.setattr(autotune, "cold_bytes", lambda: 8 << 20)
    d = autotune.Dispatcher(cache_path=False, env={}, budget_s=0.0, min_rounds=1, max_rounds=1)
    assert prefetch.distance(4, d) in prefetch.DISTANCES


@pytest.mark.parametrize("layer_cls,bits", [(qtorch.W4A16Linear, 4), (qtorch.W8A16Linear, 8)])
def test_a_blocked_layers_one_row_plan_takes_the_machines_distance(monkeypatch, layer_cls, bits):
    from qtorch.layouts import blocked

    clock = Clock()
    chosen = 2048 if bits == 4 else 16384
    monkeypatch.setattr(prefetch, "_trials", fake_trials(clock, lambda d: 1.0 + abs(d - chosen), []))
    monkeypatch.setattr(autotune, "_DEFAULT", autotune.Dispatcher(cache_path=False, timer=clock, env={}))
    layer = layer_cls.from_linear(torch.nn.Linear(256, 128)).to(torch.bfloat16)
    layer.quantized_weight.hold_layout("blocked", torch.bfloat16)
    x = torch.randn(1, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        y = layer(x)
    plan = blocked._PLANS[layer.quantized_weight][3]
    assert plan.prefetch == chosen
    ref = torch.nn.functional.linear(x.float(), layer.dequantized_weight(torch.float32), layer.bias.float())
    torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=2e-2)


def fake_vnni_trials(clock, cost, calls):
    """The vnni race's passes: every distance without and with the second reads, ``cost(distance, touch)``."""
    def trials():
        calls.append("vnni")
        return {prefetch._reads_name(d, t): (lambda d=d, t=t: setattr(clock, "t", clock.t + cost(d, t)))
                for d in prefetch.DISTANCES for t in (False, True)}
    return trials


def fake_vnni8_trials(clock, cost, calls):
    """The vnni8 race's passes, ``"once"`` and ``"twice"``, each ``cost[name]``."""
    def trials():
        calls.append("vnni8")
        return {n: (lambda c=c: setattr(clock, "t", clock.t + c)) for n, c in cost.items()}
    return trials


def test_the_vnni_kernel_has_its_own_distance(monkeypatch):
    clock, calls = Clock(), []
    monkeypatch.setattr(prefetch, "_trials", fake_trials(clock, lambda d: 1.0 + abs(d - 4096) / 4096, calls))
    monkeypatch.setattr(prefetch, "_vnni_trials",
                        fake_vnni_trials(clock, lambda d, t: 1.0 + abs(d - 16384) / 16384, calls))
    d = autotune.Dispatcher(cache_path=False, timer=clock, env={})
    assert prefetch.vnni_distance(d) == 16384 and prefetch.distance(4, d) == 4096
    # a tie between the two ways of reading goes to the one read (the first named)
    assert prefetch.vnni_reads(d) == (16384, False)
    assert calls == ["vnni", 4] and prefetch.measured(d) == {4: 4096, "vnni": 16384, "vnni touch": False}
    off = autotune.Dispatcher(cache_path=False, env={"QTORCH_AUTOTUNE": "0"})
    assert prefetch.vnni_reads(off) == (qtorch.vnni.PREFETCH, qtorch.vnni.TOUCH)


def test_the_vnni_kernel_reads_each_line_twice_where_that_is_faster(monkeypatch, tmp_path):
    clock, calls = Clock(), []
    # on this machine the second reads save 10% at every distance, and 4 KB is the best distance
    monkeypatch.setattr(prefetch, "_vnni_trials", fake_vnni_trials(
        clock, lambda d, t: (1.0 + abs(d - 4096) / 4096) * (0.9 if t else 1.0), calls))
    d = autotune.Dispatcher(tmp_path / "c.json", timer=clock, env={}, others_running=lambda: 0)
    assert prefetch.vnni_reads(d) == (4096, True) and prefetch.vnni_distance(d) == 4096 and calls == ["vnni"]
    # kept in the file: another process reads it back, measuring nothing
    again = autotune.Dispatcher(tmp_path / "c.json", timer=clock, env={}, others_running=lambda: 0)
    assert prefetch.vnni_reads(again) == (4096, True) and calls == ["vnni"]


def test_the_vnni_decisions_are_kept_per_thread_count(monkeypatch):
    # a process that changes torch's thread count reads with another team: measured again, not the other count's
    clock, calls = Clock(), []
    monkeypatch.setattr(prefetch, "_vnni_trials", fake_vnni_trials(clock, lambda d, t: 1.0 + abs(d - 4096), calls))
    monkeypatch.setattr(prefetch, "_vnni8_trials", fake_vnni8_trials(clock, {"once": 1.0, "twice": 2.0}, calls))
    monkeypatch.setattr(qtorch.vnni8, "dot_eligible", lambda k: True)
    d = autotune.Dispatcher(cache_path=False, timer=clock, env={})
    before = torch.get_num_threads()
    try:
        for n in (1, 2, 1):
            torch.set_num_threads(n)
            assert prefetch.vnni_reads(d) == (4096, False) and prefetch.vnni8_touch(d) is False
    finally:
        torch.set_num_threads(before)
    assert calls == ["vnni", "vnni8", "vnni", "vnni8"]


@pytest.mark.parametrize("kept", ["4096 twice", "4097", "touch", "", "4096 touch extra"])
def test_a_vnni_decision_that_is_not_one_is_measured_again(kept):
    assert prefetch._reads_value(kept) is None
    assert prefetch._reads_value("2048 touch") == (2048, True) and prefetch._reads_value("0") == (0, False)


@pytest.mark.parametrize("faster", [False, True])
def test_the_vnni8_kernel_reads_each_line_twice_only_where_that_is_faster(monkeypatch, tmp_path, faster):
    clock, calls = Clock(), []

    cost = {"once": 1.0, "twice": 0.9 if faster else 1.01}  # (1% is within the tie: the one read wins)
    monkeypatch.setattr(prefetch, "_vnni8_trials", fake_vnni8_trials(clock, cost, calls))
    monkeypatch.setattr(qtorch.vnni8, "dot_eligible", lambda k: True)
    d = autotune.Dispatcher(tmp_path / "c.json", timer=clock, env={}, others_running=lambda: 0)
    assert prefetch.vnni8_touch(d) is faster and prefetch.vnni8_touch(d) is faster and calls == ["vnni8"]
    assert prefetch.measured(d) == {"vnni8 touch": faster}
    assert prefetch.vnni8_touch(autotune.Dispatcher(cache_path=False, env={"QTORCH_AUTOTUNE": "0"})) is False
    monkeypatch.setattr(qtorch.vnni8, "dot_eligible", lambda k: False)  # no kernel to time: one read, no race
    assert prefetch.vnni8_touch(autotune.Dispatcher(cache_path=False, timer=clock, env={})) is False
    assert calls == ["vnni8"]


@pytest.mark.skipif(not qtorch.vnni8.dot_eligible(1024), reason="the vnni8 one-row kernel needs AVX512-VNNI")
def test_the_vnni8_trials_compute_the_same_either_way():
    passes = prefetch._vnni8_trials()
    assert list(passes) == ["once", "twice"]
    assert torch.equal(passes["once"]().clone(), passes["twice"]())


@pytest.mark.skipif(not qtorch.vnni.available(), reason="the vnni kernel needs AVX512-VNNI (not on this CPU)")
def test_the_vnni_trials_compute_the_same_at_every_distance():
    passes = prefetch._vnni_trials()
    names = [prefetch._reads_name(d, t) for d in prefetch.DISTANCES for t in (False, True)]
    assert list(passes) == names
    outs = [passes[n]().clone() for n in names]
    assert all(torch.equal(outs[0], o) for o in outs[1:])
