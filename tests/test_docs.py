"""The README and docs/ link only into the repository (a clone has no ``../shared``)."""
from __future__ import annotations

import re

import pytest

from tests.helpers import ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("doc", DOCS, ids=[d.name for d in DOCS])
def test_links_stay_inside_the_repository(doc):
    text = doc.read_text()
    assert "../shared" not in text
    for target in re.findall(r"\]\(([^)#]+)[^)]*\)", text):
        if "://" in target:
            continue
        path = (doc.parent / target).resolve()
        assert path.is_relative_to(ROOT) and path.exists(), f"{doc.name}: link to {target}"
