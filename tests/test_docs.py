"""docs/bad_input.md names a test for every case: each named test exists."""

import re
from pathlib import Path

import pytest

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


@pytest.mark.parametrize("page, run", [("results.md", "budget"), ("results_capacity.md", "capacity"),
                                       ("results_finetune.md", "finetune"), ("results_bundled.md", "bundled"),
                                       ("results_depth.md", "depth")])
def test_results_pages_are_generated_from_their_pareto_json(page, run):
    """Each results page is the table `haltdet pareto` writes from its docs/results/RUN/pareto.json,
    unedited; the json's points are the spec's."""
    import json

    from haltdet.pareto import load_spec, markdown

    result = json.loads((ROOT / "docs" / "results" / run / "pareto.json").read_text())
    assert (ROOT / "docs" / page).read_text() == markdown(result)
    spec = load_spec(ROOT / result["spec"])
    assert [(p["name"], p["seed"]) for p in result["points"]] == [(p["name"], p["seed"]) for p in spec["points"]]
    assert result["data"] == spec["data"] and result["about"] == spec["about"]
    assert result.get("title", spec["title"]) == spec["title"]
