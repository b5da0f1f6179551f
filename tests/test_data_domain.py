"""The domain look-alikes (``domain.jsonl``): benign requests from each harm category's own field."""

from __future__ import annotations

import json
import re
from collections import Counter
from importlib.resources import files
from pathlib import Path

import pytest

from cdelta.data.builtin import load_domain
from cdelta.data.prompts import HARM_CATEGORIES, LOOKALIKE, SPLITS, assign_split
from cdelta.data.registry import SOURCES, load_source

BUILTIN = files("cdelta.data") / "builtin"
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
MIN_PER_CATEGORY = 45


def norm(text: str) -> str:
    """Lower case, letters and digits only, single spaces: equal texts up to case and punctuation."""
    return " ".join(re.sub(r"[^a-z0-9]+", " ", text.lower()).split())


def _rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (BUILTIN / name).read_text(encoding="utf-8").splitlines() if line.strip()]


def test_rows_are_well_formed():
    rows = _rows("domain.jsonl")
    assert all(set(r) == {"id", "text", "category"} for r in rows)
    assert all(r["category"] in HARM_CATEGORIES for r in rows)
    assert all(re.fullmatch(rf"domain-{r['category']}-\d{{3}}", r["id"]) for r in rows)
    assert all(r["text"] and r["text"] == r["text"].strip() and "\n" not in r["text"] for r in rows)


def test_at_least_45_per_harm_category():
    counts = Counter(p.source_category for p in load_domain())
    assert set(counts) == set(HARM_CATEGORIES)
    assert min(counts.values()) >= MIN_PER_CATEGORY, counts


def test_prompt_fields():
    ps = load_domain()
    assert ps.name == "domain"
    assert {p.category for p in ps} == {LOOKALIKE}
    assert {p.kind for p in ps} == {LOOKALIKE}
    assert {p.source for p in ps} == {"domain"}
    assert all(p.split == assign_split(p.id, 0) for p in ps)
    assert all(p.split == assign_split(p.id, 3) for p in load_domain(3))


def test_unique_ids_and_texts():
    ps = load_domain()
    assert len({p.id for p in ps}) == len(ps)
    assert len({norm(p.text) for p in ps}) == len(ps)


def test_no_overlap_with_other_builtin_files():
    others: set[str] = set()
    for name in ("lookalike.jsonl", "harmless.jsonl", "pairs.jsonl", "twins.jsonl", *(f"{c}.jsonl" for c in HARM_CATEGORIES)):
        for r in _rows(name):
            others |= {norm(r[k]) for k in ("text", "safe", "unsafe") if k in r}
    assert not [p.id for p in load_domain() if norm(p.text) in others]


def test_every_category_has_every_split():
    ps = load_domain()
    for category in HARM_CATEGORIES:
        splits = Counter(p.split for p in ps if p.source_category == category)
        assert set(splits) == set(SPLITS), (category, splits)


def test_registry_loads_domain():
    assert "domain" in SOURCES and SOURCES["domain"]
    ps = load_source("domain")
    assert ps.texts() == load_domain().texts()
    assert load_source("Domain").texts() == ps.texts()


@pytest.mark.skipif(not (SHARED_DATA / "xstest_prompts.csv").exists(), reason="shared XSTest file not present")
def test_holds_no_xstest_prompt():
    """XSTest is evaluation-only: no domain prompt may be one of its prompts, up to case and punctuation."""
    from cdelta.data.files import load_xstest

    xstest = {norm(p.text) for p in load_xstest(SHARED_DATA / "xstest_prompts.csv")}
    assert not [p.id for p in load_domain() if norm(p.text) in xstest]
