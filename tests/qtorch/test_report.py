"""QuantizationReport: per-layer records, totals, the text table and the JSON-safe dict."""

import json

import pytest
import torch
from torch import nn

import qtorch


def test_scheme_labels_have_one_home_in_qcore():
    import qcore
    from qcore.labels import granularity_label, scheme_label

    assert qtorch.report.scheme_label is scheme_label
    assert [granularity_label(g) for g in (qcore.PerTensor(), qcore.PerChannel(0), qcore.PerGroup(32))] == [
        "per-tensor", "per-channel", "g32"]
    assert scheme_label(None) == "-" and scheme_label("custom") == "custom"


def model():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 100), nn.Linear(100, 128))
    m.lm_head = nn.Linear(128, 10)
    with torch.no_grad():
        m[2].weight.zero_()  # an exact layer: SQNR is +inf, which JSON cannot hold as a number
    return m


@pytest.fixture(scope="module")
def reports():
    planned = model()
    with torch.no_grad():
        planned[3].weight[0, 0] = float("nan")  # incompatible with any scheme
    plan = qtorch.plan(planned, "w4a16", on_incompatible="skip")
    m = model()
    applied = qtorch.quantize_model(m, "w8a16", exclude=["lm_head", "3"])
    return plan, applied, m


def test_records_and_totals(reports):
    plan, applied, m = reports
    assert [r.name for r in plan] == ["0", "2", "3", "lm_head"]
    assert [r.status for r in plan] == ["planned", "planned", "incompatible", "excluded"]
    assert plan["3"].reason == "weight contains NaN or Inf (first at index (0, 0) of the [out, in] weight)"
    assert plan["0"].shape == (128, 256) and plan["0"].dtype == "float32" and plan["0"].kind == "Linear"
    assert plan["0"].bytes_before == (128 * 256 + 128) * 4
    # int4 codes packed two per byte + float32 scale and uint8 zero point per group of 128 + the bias
    assert plan["0"].bytes_after == 128 * 128 + 128 * 2 * (4 + 1) + 128 * 4
    assert plan.bytes_before == sum(r.bytes_before for r in plan)
    assert plan.bytes_saved == plan["0"].bytes_saved + plan["2"].bytes_saved > 0
    assert plan.model_bytes_after == plan.model_bytes_before - plan.bytes_saved
    assert applied.counts() == {"quantized": 2, "excluded": 2}
    assert applied["2"].sqnr_db == float("inf") and applied["2"].max_abs_error == 0.0
    assert applied["0"].sqnr_db > 35 and 0 < applied["0"].max_abs_error < 1e-3
    assert applied.model_bytes_after == qtorch.memory_footprint(m)
    # dense bytes of the quantized weights / their stored bytes (int8 codes + one float32 scale per row); no biases
    assert applied.compression_ratio == (128 * 256 * 4 + 100 * 128 * 4) / (128 * 256 + 128 * 4 + 100 * 128 + 100 * 4)
    assert [r.name for r in applied.skipped] == ["3", "lm_head"] and len(applied.quantized) == 2
    with pytest.raises(KeyError, match="nope"):
        applied["nope"]


def test_to_dict_is_json_safe_and_complete(reports):
    for rep in reports[:2]:
        d = json.loads(json.dumps(rep.to_dict(), allow_nan=False))
        assert d["applied"] == rep.applied and len(d["layers"]) == len(rep)
        assert d["totals"]["bytes_saved"] == rep.bytes_saved
        assert d["totals"]["model_bytes_after"] == rep.model_bytes_after
    d = reports[1].to_dict()
    layer = next(x for x in d["layers"] if x["name"] == "2")
    assert layer["sqnr_db"] == "inf" and layer["scheme"]["bits"] == 8 and layer["shape"] == [100, 128]
    assert next(x for x in d["layers"] if x["name"] == "3")["reason"] == "excluded by pattern '3'"


def test_str_is_a_readable_table(reports):
    plan, applied, _ = reports
    text = str(plan)
    assert text.startswith("Quantization plan (dry run, model unchanged): 4 Linear layers")
    lines = text.splitlines()
    for name in ("0", "2", "3", "lm_head"):
        assert any(line.split()[0] == name for line in lines[3:]), name
    row = next(line for line in lines if line.startswith("3 "))
    assert "128x100" in row and "dense: incompatible" in row and "NaN" in row
    assert any(line.startswith("total") and "x smaller" in line for line in lines)
    assert "model memory (predicted):" in text
    text = str(applied)
    assert text.startswith("Quantization report: 4 Linear layers (2 quantized, 2 excluded)")
    row = next(line for line in text.splitlines() if line.startswith("0 "))
    assert "int8 sym per-channel" in row and "128x256" in row and "QuantLinear" in row
    assert "inf" in next(line for line in text.splitlines() if line.startswith("2 "))
    assert repr(applied).startswith("QuantizationReport(applied=True")


def test_compression_ratio_is_the_weights_ratio_that_qtorch_info_prints():
    from qtorch.memory import compression_ratio, dense_weight_nbytes, quantized_weight_nbytes

    m = model()
    report = qtorch.quantize_model(m, "w4a16-g32", exclude=["lm_head", "3"])  # 100 inputs: no groups of 32
    layers = [r for r in report.quantized]
    dense = sum(dense_weight_nbytes(r.shape, r.dtype) for r in layers)
    stored = sum(q.qweight.nbytes + q.scale.nbytes + q.zero_point.nbytes
                 for q in m.modules() if isinstance(q, qtorch.QuantLinear))
    assert sum(quantized_weight_nbytes(r.shape, r.scheme) for r in layers) == stored
    assert report.compression_ratio == compression_ratio(dense, stored) == dense / stored
    assert f"quantized weights {dense / stored:.2f}x smaller" in str(report)
    assert compression_ratio(0, 0) == 1.0


@pytest.mark.parametrize("exclude", [None, "lm_head", ["lm_head"], ("lm_head",)])
def test_the_default_lm_head_exclusion_is_not_an_unmatched_pattern(exclude):
    m = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 8))  # no lm_head
    kwargs = {} if exclude is None else {"exclude": exclude}
    for report in (qtorch.plan(m, "w8a16", **kwargs), qtorch.quantize_model(m, "w8a16", **kwargs)):
        assert report.unused_patterns == [] and "matched no layer" not in str(report)
    with pytest.warns(UserWarning, match="'nope'"):
        report = qtorch.quantize_model(nn.Sequential(nn.Linear(64, 8)), "w8a16", exclude=["nope"])
    assert report.unused_patterns == ["nope"]  # a pattern the user wrote still is


def test_a_report_with_nothing_quantized_says_so():
    import warnings

    model = torch.nn.Sequential(torch.nn.Linear(16, 16))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = qtorch.quantize_model(model, "w8a16", exclude=["*"])
    total = [line for line in str(report).splitlines() if line.startswith("total")][0]
    assert total.endswith("nothing quantized") and "smaller" not in total
