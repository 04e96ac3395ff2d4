"""pytest setup for the whole repository. The docstrings' worked examples (``--doctest-modules`` runs them from
``qcore/`` and ``qtorch/``) make their folders with ``tempfile.mkdtemp()``, as a reader would; here those folders
go under pytest's own temporary folder, which pytest removes, instead of piling up in the system's (six a run)."""

import tempfile

import pytest
from _pytest.doctest import DoctestItem


@pytest.fixture(autouse=True)
def _doctest_temporary_folders(request, tmp_path_factory):
    if not isinstance(request.node, DoctestItem):
        yield
        return
    before = tempfile.tempdir
    tempfile.tempdir = str(tmp_path_factory.mktemp("doctest"))
    try:
        yield
    finally:
        tempfile.tempdir = before
