"""`cdelta eval` on the bundled SmolLM2-135M-Instruct: small but real."""

import json
import sys

import pytest

from cdelta import cli

pytestmark = pytest.mark.integration


def test_eval_smollm2_writes_per_category_tables(monkeypatch, tmp_path):
    out = tmp_path / "results.json"
    monkeypatch.setattr(sys, "argv", [
        "cdelta", "--quiet", "eval", "--model", "smollm2-135m", "--prompts", "builtin", "--prompts", "jailbreakbench",
        "--limit-per-category", "3", "--max-new-tokens", "12", "--mmlu-n", "8", "--reference", "smollm2-135m", "--out", str(out),
    ])
    with pytest.raises(SystemExit) as done:
        cli.main()
    assert done.value.code == 0
    result = json.loads(out.read_text())
    builtin = result["sets"]["builtin"]
    assert {"cybercrime", "weapons", "drugs", "fraud", "hate", "privacy", "harmless", "lookalike"} <= set(builtin)
    for cell in (c for c in builtin.values() if c["kind"] != "lookalike-field"):  # per-field cells split the 3 look-alikes
        assert cell["n"] == 3 and 0.0 <= cell["ci95"][0] <= cell["refusal_rate"] <= cell["ci95"][1] <= 1.0
    assert "cybercrime" in result["sets"]["jailbreakbench"]
    utility = result["utility"]
    assert 1.0 < utility["perplexity"] < 1000 and utility["perplexity_ratio"] == pytest.approx(1.0)
    assert utility["first_token_kl"] == pytest.approx(0.0, abs=1e-6)
    assert 0.0 <= utility["mmlu_accuracy"] <= 1.0
    assert result["meta"]["weights_sha256"] == result["meta"]["reference_sha256"]
    assert len(result["generations"]["builtin"]) == 3 * sum(c["kind"] != "lookalike-field" for c in builtin.values())
    assert (tmp_path / "report.html").is_file()
    # SmolLM2 refuses almost nothing: harmful refusal stays low even on this tiny sample.
    harmful = [c for c in builtin.values() if c["kind"] == "harmful"]
    assert sum(c["refusals"] for c in harmful) <= len(harmful) * 3 // 2
