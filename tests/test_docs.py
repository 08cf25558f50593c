"""The README stays a start (the reference lives in docs/), every docs page is reachable from it,
and no relative link in the README or docs/ points at nothing."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README_LINES = 150
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def _links(page: Path) -> list[str]:
    return [target for target in LINK.findall(page.read_text()) if "://" not in target]


def test_the_readme_is_a_start_not_the_reference():
    assert len((ROOT / "README.md").read_text().splitlines()) <= README_LINES


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(ROOT / target).resolve() for target in _links(ROOT / "README.md")}
    pages = {page.resolve() for page in (ROOT / "docs").glob("*.md")}
    assert sorted(str(p.relative_to(ROOT)) for p in pages - linked) == []


def test_no_relative_link_points_at_nothing():
    broken = [f"{page.relative_to(ROOT)}: {target}" for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
              for target in _links(page) if not (page.parent / target).exists()]
    assert broken == []
