"""Every relative link in README.md, BENCHMARKS.md and docs/ points at a file that exists, and
every result file the docs name by its path is there (result files move to archive/)."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted([ROOT / "README.md", ROOT / "BENCHMARKS.md", *ROOT.glob("docs/**/*.md"),
               *ROOT.glob("benchmarks/results/**/*.md")])
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
RESULT = re.compile(r"benchmarks/results/[\w./-]+\.(?:json|csv)")


def relative_links(text: str) -> list[str]:
    """Link targets that are paths in this repository (no URL, no bare anchor)."""
    targets = (m.group(1).split("#", 1)[0] for m in LINK.finditer(text))
    return [t for t in targets if t and not re.match(r"^[a-z]+:", t)]


def test_link_parser():
    text = "[a](docs/x.md) [b](https://e.org/y) [c](#top) [d](../z.md#part) `[e](not a link)`"
    assert relative_links(text) == ["docs/x.md", "../z.md"]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc):
    text = doc.read_text()
    missing = [t for t in relative_links(text) if not (doc.parent / t).exists()]
    assert not missing, f"{doc.relative_to(ROOT)}: links to missing paths {missing}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_named_result_files_exist(doc):
    named = set(RESULT.findall(doc.read_text()))
    missing = sorted(p for p in named if not (ROOT / p).exists())
    assert not missing, f"{doc.relative_to(ROOT)}: names result files that do not exist {missing}"
