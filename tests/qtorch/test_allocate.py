"""qtorch.allocate_bits: the plan fits its budget, more budget never costs accuracy, the sensitive layer gets the
bits, quantize_model applies the plan as planned, and bad input is refused before anything is measured."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import qcore
import qtorch
import itertools

from qtorch.allocate import DEFAULT_CANDIDATES, BitPlan, _choose
from qtorch.replace import resolve_scheme


def make_model(seed=0, sensitive=None):
    """Five Linear layers of mixed shapes (one with in_features 100: a shorter last group); ``sensitive``: the
    index of the layer given a few large-outlier columns."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 100), nn.ReLU(), nn.Linear(100, 128),
                          nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 32))
    if sensitive is not None:
        with torch.no_grad():
            model[sensitive].weight[:, ::16] *= 40
    return model


def cheapest_bits(model, candidates=DEFAULT_CANDIDATES, exclude=()):
    layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
    weights = sum(m.weight.numel() for m in layers)
    least = sum(min(qcore.quantize(m.weight.detach().numpy(), resolve_scheme(c)).nbytes for c in candidates)
                for m in layers)
    return 8 * least / weights


MODEL = make_model(1)
LEAST = cheapest_bits(MODEL)


@settings(max_examples=25)
@given(st.floats(0, 5))
def test_the_plan_fits_the_budget(extra):
    bits = LEAST + extra
    plan = qtorch.allocate_bits(MODEL, bits, exclude=())
    weights = sum(m.weight.numel() for m in MODEL.modules() if isinstance(m, nn.Linear))
    assert plan.weights == weights and plan.budget_bytes == math.floor(bits * weights / 8)
    assert plan.total_bytes <= plan.budget_bytes
    # the bytes planned are the bytes qcore stores for each layer's weight under the chosen scheme
    mods = dict(MODEL.named_modules())
    for c in plan.layers:
        assert c.nbytes == qcore.quantize(mods[c.name].weight.detach().numpy(), resolve_scheme(plan[c.name])).nbytes


@settings(max_examples=25)
@given(st.floats(0, 5), st.floats(0, 2))
def test_a_bigger_budget_never_gives_a_larger_total_error(extra, more):
    small = qtorch.allocate_bits(MODEL, LEAST + extra, exclude=())
    big = qtorch.allocate_bits(MODEL, LEAST + extra + more, exclude=())
    assert big.total_error <= small.total_error


@st.composite
def layer_options(draw):
    """Per layer, 1..4 candidates as (bytes, error)."""
    layers = []
    for _ in range(draw(st.integers(1, 5))):
        n = draw(st.integers(1, 4))
        costs = draw(st.lists(st.integers(1, 50), min_size=n, max_size=n))
        errs = draw(st.lists(st.floats(0, 100, allow_nan=False), min_size=n, max_size=n))
        layers.append(list(zip(costs, errs)))
    return layers


@settings(max_examples=300)
@given(layer_options(), st.integers(-5, 250))
def test_the_choice_is_the_least_error_that_fits(layers, budget):
    """Small ranges are searched exactly: the choice equals the brute-force optimum."""
    plans = list(itertools.product(*[range(len(o)) for o in layers]))
    cost = lambda p: sum(o[j][0] for o, j in zip(layers, p))
    error = lambda p: sum(o[j][1] for o, j in zip(layers, p))
    fitting = [p for p in plans if cost(p) <= budget]
    at = _choose(layers, budget)
    if not fitting:
        assert at is None
        return
    assert cost(at) <= budget
    assert error(at) == pytest.approx(min(error(p) for p in fitting), abs=1e-9)


@settings(max_examples=100)
@given(st.lists(st.tuples(st.integers(1, 3000), st.integers(0, 10**6)), min_size=1, max_size=30),
       st.floats(0, 1), st.floats(0, 1))
def test_on_a_coarse_grid_the_choice_still_fits_and_more_budget_never_hurts(shapes, a, b):
    """Layers whose sizes span far more than BUCKETS bytes: the search is thinned but stays sound."""
    layers = [[(rows * 130, rows * 1e3 / (1 + seed % 7)), (rows * 260, rows * 2e2), (rows * 520, float(rows))]
              for rows, seed in shapes]
    lo, hi = sum(o[0][0] for o in layers), sum(o[-1][0] for o in layers)
    small, big = lo + int(min(a, b) * (hi - lo)), lo + int(max(a, b) * (hi - lo))
    total = {}
    for budget in (small, big):
        at = _choose(layers, budget)
        assert sum(o[j][0] for o, j in zip(layers, at)) <= budget
        total[budget] = sum(o[j][1] for o, j in zip(layers, at))
    assert total[big] <= total[small]


@pytest.mark.parametrize("calibrated", [False, True])
@pytest.mark.parametrize("sensitive", [0, 2, 4])
def test_the_sensitive_layer_gets_more_bits(sensitive, calibrated):
    """Four equal layers; one has every 16th input column 20 times larger. At 6 bits per weight one layer can
    afford 8 bits: that one."""
    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(4) for m in (nn.Linear(128, 128), nn.ReLU())])
    with torch.no_grad():
        model[sensitive].weight[:, ::16] *= 20
    calibration = [torch.randn(16, 128) for _ in range(3)] if calibrated else None
    plan = qtorch.allocate_bits(model, 6.0, calibration=calibration, exclude=())
    bits = {c.name: c.bits_per_weight for c in plan.layers}
    assert plan[str(sensitive)] == "w8a16"
    assert all(bits[str(sensitive)] > b for name, b in bits.items() if name != str(sensitive)), bits


def test_quantize_model_applies_the_plan():
    model = make_model(3, sensitive=2)
    plan = qtorch.allocate_bits(model, 5.0, exclude=())
    assert isinstance(plan, BitPlan) and len(set(plan.values())) > 1  # a mixed plan
    report = qtorch.quantize_model(model, plan, exclude=())
    assert [r.status for r in report.layers] == ["quantized"] * 5
    mods = dict(model.named_modules())
    for c in plan.layers:
        assert isinstance(mods[c.name], qtorch.QuantLinear)
        assert mods[c.name].scheme == resolve_scheme(plan[c.name]) == c.scheme
    # the plan counts stored bytes (the state_dict, the file); in memory, codes of 1-3 bits may sit in the
    # blocked layout's 4-bit containers, so the layers hold at least that much
    stored = sum(t.numel() * t.element_size() for c in plan.layers for t in mods[c.name].state_dict().values())
    assert stored == plan.total_bytes + sum(
        m.bias.numel() * 4 for m in make_model(3).modules() if isinstance(m, nn.Linear))
    assert sum(r.bytes_after for r in report.layers) >= stored


def test_a_plan_with_hqq_and_its_table():
    model = make_model(4, sensitive=0)
    minmax = qtorch.allocate_bits(model, 4.6, exclude=())
    hqq = qtorch.allocate_bits(model, 4.6, exclude=(), method="hqq", candidates=["w4a16-g64", "w4a16-g128"])
    assert hqq.method == "hqq" and set(hqq.values()) <= {"w4a16-g64", "w4a16-g128"}
    for c in hqq.layers:  # hqq is never worse than min-max per group, so per layer on the same scheme
        same = [e for label, _, e in minmax.layers[[m.name for m in minmax.layers].index(c.name)].options
                if label == c.label]
        assert c.error <= same[0] * (1 + 1e-9)
    text = str(hqq)
    assert text.splitlines()[0].split() == ["layer", "shape", "scheme", "bits/weight", "weight", "error"]
    assert "total" in text and "budget: 4.6 bits/weight" in text and "params method 'hqq'" in text
    qtorch.quantize_model(model, hqq, exclude=(), method="hqq")
    assert all(isinstance(m, qtorch.QuantLinear) for m in model if not isinstance(m, nn.ReLU))


def test_calibrated_errors_are_the_output_errors_on_the_sampled_inputs():
    model = nn.Sequential(nn.Linear(48, 40))
    x = torch.randn(5, 7, 48)  # 35 rows, fewer than sample_rows: all of them
    plan = qtorch.allocate_bits(model, 9, calibration=[x], exclude=(), candidates=["w4a16-g16", "w8a16"])
    assert plan.error_kind == "output"
    w = model[0].weight.detach().numpy()
    for label, _, err in plan.layers[0].options:
        d = qcore.dequantize(qcore.quantize(w, resolve_scheme(label))) - w
        want = float(((x.reshape(-1, 48).double().numpy() @ d.T.astype(np.float64)) ** 2).sum())
        assert err == pytest.approx(want, rel=1e-5)


def test_the_model_is_left_as_it_was():
    model = make_model(5)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    qtorch.allocate_bits(model, 5, calibration=[torch.randn(4, 64)], exclude=())
    assert model.training and all(m.training for m in model.modules())
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(type(m) in (nn.Sequential, nn.Linear, nn.ReLU) for m in model.modules())


def test_a_budget_below_the_cheapest_plan_names_the_minimum():
    minimum = math.ceil(LEAST * 1e4) / 1e4
    with pytest.raises(ValueError, match=rf"below the cheapest plan.*the minimum is bits_per_weight={minimum}$"):
        qtorch.allocate_bits(MODEL, LEAST - 0.01, exclude=())
    plan = qtorch.allocate_bits(MODEL, minimum, exclude=())  # the minimum named is enough: the cheapest plan
    assert all(c.nbytes == min(b for _, b, _ in c.options) for c in plan.layers)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(bits_per_weight="4.5"), TypeError, r"bits_per_weight must be a number, got str"),
    (dict(bits_per_weight=True), TypeError, r"bits_per_weight must be a number, got bool"),
    (dict(bits_per_weight=float("nan")), ValueError, r"bits_per_weight must be a finite number > 0, got nan"),
    (dict(bits_per_weight=0), ValueError, r"bits_per_weight must be a finite number > 0, got 0"),
    (dict(bits_per_weight=5, candidates=[]), ValueError, r"candidates is empty"),
    (dict(bits_per_weight=5, candidates=["w5a16"]), ValueError, r"unknown scheme preset 'w5a16'"),
    (dict(bits_per_weight=5, candidates=3), TypeError, r"candidates must be an iterable"),
    (dict(bits_per_weight=5, method="nope"), ValueError, r"unknown params method 'nope'"),
    (dict(bits_per_weight=5, calibration=[]), ValueError, r"calibration is empty"),
    (dict(bits_per_weight=5, calibration=torch.randn(2, 64)), TypeError, r"calibration must be a list of model"),
    (dict(bits_per_weight=5, sample_rows=0), ValueError, r"sample_rows must be an int >= 1, got 0"),
    (dict(bits_per_weight=5, exclude=["*"]), ValueError, r"no Linear layer to quantize"),
])
def test_bad_input_is_refused_by_name(kwargs, error, match):
    with pytest.raises(error, match=match):
        qtorch.allocate_bits(make_model(), **{"exclude": (), **kwargs})


def test_a_model_that_is_no_module_is_refused():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got dict"):
        qtorch.allocate_bits({"w": torch.zeros(2, 2)}, 5)


def test_excluded_layers_are_left_out_of_the_plan_and_stay_dense():
    model = nn.ModuleDict({"body": nn.Linear(64, 64), "lm_head": nn.Linear(64, 100)})
    plan = qtorch.allocate_bits(model, 5)  # lm_head is excluded by default, as in quantize_model
    assert list(plan) == ["body"] and plan.weights == 64 * 64
    report = qtorch.quantize_model(model, plan)
    assert isinstance(model["body"], qtorch.QuantLinear) and type(model["lm_head"]) is nn.Linear
    assert {r.name: r.status for r in report.layers}["body"] == "quantized"
