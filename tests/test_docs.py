"""The README and docs/ link only to files inside the repository: a clone has nothing beside it."""
from __future__ import annotations

import re

import pytest

from tests.helpers import ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("doc", DOCS, ids=[d.name for d in DOCS])
def test_links_stay_inside_the_repository(doc):
    for target in re.findall(r"\]\(([^)#]+)[^)]*\)", doc.read_text()):
        if "://" in target:
            continue
        path = (doc.parent / target).resolve()
        assert path.is_relative_to(ROOT) and path.exists(), f"{doc.name}: link to {target}"
