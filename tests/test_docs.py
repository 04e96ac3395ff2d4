"""The project's documents live in the project: nothing cites a file outside it, and every link resolves."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "qcore").glob("*.py"),
                  *(ROOT / "qtorch").glob("*.py"), *(ROOT / "tests").rglob("*.py"), *(ROOT / "benchmarks").glob("*.py"),
                  *(ROOT / "examples").glob("*.py")])
# the team's design notes are not shipped: a citation of them sends users to a file they cannot open
OUTSIDE = re.compile(r"DESIGN(\.md)?\s+(section|s\.)|DESIGN\.md")


@pytest.mark.parametrize("path", [p for p in SOURCES if p.name != "test_docs.py"], ids=lambda p: str(p.relative_to(ROOT)))
def test_no_citation_of_documents_outside_the_repository(path):
    hits = [f"{i}: {line.strip()}" for i, line in enumerate(path.read_text().splitlines(), 1) if OUTSIDE.search(line)]
    assert not hits, f"{path.relative_to(ROOT)} cites a document that is not in the repository:\n" + "\n".join(hits)


@pytest.mark.parametrize("path", [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text())
    missing = [link for link in links if "://" not in link and not (path.parent / link).exists()]
    assert not missing, f"{path.relative_to(ROOT)} links to files that do not exist: {missing}"


def test_docs_cover_the_contract():
    names = {p.name for p in (ROOT / "docs").glob("*.md")}
    assert {"numerics.md", "packing.md", "checkpoint-format.md", "architecture.md"} <= names


def test_every_test_the_guarantees_name_exists():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Guarantees", 1)[1].split("\n## ", 1)[0]
    tests = set(re.findall(r"\b(test_\w+)\b(?!\.py)", section))
    files = set(re.findall(r"`(tests/[\w/]+\.py)", section))
    source = "\n".join(p.read_text() for p in (ROOT / "tests").rglob("test_*.py"))
    missing = sorted(t for t in tests if not re.search(rf"def {t}\(", source))
    assert not missing, f"README's Guarantees name tests that do not exist: {missing}"
    assert all((ROOT / f).exists() for f in files), [f for f in files if not (ROOT / f).exists()]
