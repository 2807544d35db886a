"""docs/bad_input.md names a test for every case: each named test exists."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_bad_input_case_names_existing_tests():
    rows = [line for line in (ROOT / "docs" / "bad_input.md").read_text().splitlines()
            if line.startswith("| ") and "`tests/" in line or line.startswith("| ") and "`::" in line]
    assert len(rows) >= 20
    for row in rows:
        current = None
        for ref in re.findall(r"`((?:tests/[\w/]+\.py)?(?:::\w+)?)`", row.split("|")[3]):
            path, _, name = ref.partition("::")
            current = path or current
            text = (ROOT / current).read_text()
            assert not name or re.search(rf"^def {name}\(", text, re.M), f"{current}::{name} ({row[:60]})"
