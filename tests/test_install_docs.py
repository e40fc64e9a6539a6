"""The documents installed with medge (docs/safety.md, docs/security.md) stay true to the tests.

Acceptance criterion (issue 10, documents): every risk control in the hazard analysis and every
threat-model control names a test that proves it; a renamed or deleted test must fail here
instead of leaving the risk management file pointing at nothing.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TEST_NAME = re.compile(r"`(test_[A-Za-z0-9_]+)(?:\[[^\]]*\])?`")
DEFINED = {match for path in (REPO / "tests").glob("test_*.py")
           for match in re.findall(r"^(?:async )?def (test_\w+)\(", path.read_text(), re.M)}


@pytest.mark.parametrize("doc", ["safety.md", "security.md"])
def test_every_named_test_exists(doc: str) -> None:
    named = set(TEST_NAME.findall((REPO / "docs" / doc).read_text()))
    assert len(named) >= 20, "the document should name the tests behind its controls"
    assert sorted(named - DEFINED) == []


def test_every_hazard_row_names_at_least_one_test() -> None:
    rows = [line for line in (REPO / "docs" / "safety.md").read_text().splitlines()
            if re.match(r"^\| [MGS]\d+ \|", line)]
    assert len(rows) >= 25
    assert [row.split("|")[1].strip() for row in rows if not TEST_NAME.search(row)] == []
