"""The torch-based peers' adapters live in qtorch: qcore's command names them and points there."""

import pytest

from qcore.testing import __main__ as qcore_cli
from qcore.testing import adapters
from qtorch import conformance


def test_qtorch_conformance_adds_the_torch_based_peers_to_qcores_libraries():
    assert set(conformance.LIBRARIES) == set(adapters.LIBRARIES) | set(adapters.TORCH_PEERS)
    assert not set(adapters.LIBRARIES) & set(adapters.TORCH_PEERS)


def test_qcore_testing_points_a_torch_based_peer_to_qtorch(capsys):
    with pytest.raises(SystemExit):
        qcore_cli.main(["--against", "torchao"])
    assert "python -m qtorch.conformance" in capsys.readouterr().err


def test_qtorch_conformance_runs_qcore(capsys):
    assert conformance.main(["--against", "qcore", "--max-examples", "2", "--only", "codes_in_range"]) == 0
    assert "| codes_in_range | passed |" in capsys.readouterr().out


def test_a_known_peer_that_is_not_installed_is_skipped_and_said(capsys, monkeypatch):
    monkeypatch.setattr(adapters, "installed", lambda name, libraries=None: name == "qcore")
    argv = ["--against", "qcore,hqq", "--max-examples", "5", "--only", "error_bound,bit_order", "--ordinary"]
    assert conformance.main(argv) == 0
    out, err = capsys.readouterr()
    assert "| promise | qcore |" in out and "| error_bound | passed |" in out
    assert "hqq: not installed, skipped" in err
