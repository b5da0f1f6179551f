"""The HTML report: self-contained, every section, numbers from results.json, eval-only and partial inputs.

One real run of the tiny random model (built once per module) plus a synthetic run
directory with two prompt sets, both controls, a search.json and an absent
faithfulness.json for one of two targets.
"""

from __future__ import annotations

import base64
import json
import random
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from conftest import make_model, make_tokenizer

from cdelta.circuits.circuit import Circuit
from cdelta.circuits.faithfulness import DEFAULT_FRACTIONS, circuit_sizes
from cdelta.config import RunConfig
from cdelta.errors import CdeltaError
from cdelta.evaluate import wilson_interval
from cdelta.pipeline import run_pipeline
from cdelta.report import EDIT_SECTIONS, MAX_TEXT_CHARS, SECTIONS, build_report, pct, write_report

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "screenshot_report.sh"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- HTML parsing


class Page(HTMLParser):
    """Collects img sources, every src/href, tags, and the refusal-table cells of a report."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.images: list[str] = []
        self.links: list[str] = []
        self.tags: set[str] = set()
        self.ids: list[str] = []
        self.cells: dict[tuple[str, str, str], dict] = {}
        self._set = self._row = self._cell = None
        self._in_value = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.add(tag)
        if "id" in a:
            self.ids.append(a["id"])
        for key in ("src", "href"):
            if key in a:
                self.links.append(a[key])
        if tag == "img":
            self.images.append(a.get("src", ""))
        if tag == "table":
            self._set = a.get("data-set") if "refusal" in (a.get("class") or "").split() else None
        if tag == "tr" and self._set is not None:
            self._row = a.get("data-category")
        if tag == "td" and self._set is not None and self._row and "data-arm" in a:
            self._cell = {"value": a.get("data-value"), "text": ""}
            self.cells[(self._set, self._row, a["data-arm"])] = self._cell
        if tag == "span" and self._cell is not None and a.get("class") == "v":
            self._in_value = True

    def handle_endtag(self, tag):
        if tag == "span":
            self._in_value = False
        if tag == "td":
            self._cell = None
        if tag == "table":
            self._set = None

    def handle_data(self, data):
        if self._in_value and self._cell is not None:
            self._cell["text"] += data


# --------------------------------------------------------------------------- inputs


def _cell(refusals: int, n: int, kind: str) -> dict:
    return {"refusal_rate": refusals / n, "n": n, "refusals": refusals, "ci95": list(wilson_interval(refusals, n)), "kind": kind}


def _arm_results(rates: dict[str, tuple[float, str]], sets: list[str], seed: int, completion) -> dict:
    """A results block (sets, pooled, utility, generations) with ~rates per category."""
    rng = random.Random(seed)
    tables, generations = {}, {}
    for s_i, name in enumerate(sets):
        n = 40 if s_i == 0 else 25
        tables[name] = {c: _cell(min(n, max(0, round(r * n + rng.randint(-2, 2)))), n, kind) for c, (r, kind) in rates.items()}
        generations[name] = [
            {"id": f"{name}:{c}-{i:03d}", "category": c, "prompt": f"Prompt {i} about {c} <b>bold?</b> & more",
             "completion": completion(c, i), "refusal": completion(c, i).startswith("I'm sorry")}
            for c in rates for i in range(6)
        ]
    utility = {"perplexity": 12.5 + seed, "reference_perplexity": 12.5, "perplexity_ratio": (12.5 + seed) / 12.5,
               "mmlu_accuracy": 0.41 - 0.01 * seed, "mmlu_n": 100, "first_token_kl": 0.004 * seed, "kl_prompts": 64, "ppl_chars": 20000}
    return {"sets": tables, "pooled": {}, "utility": utility, "generations": generations}


def _write_synthetic(run_dir: Path) -> dict:
    """A run directory as `cdelta run` would write it, with realistic numbers, both controls and search.json."""
    targets = ["cybercrime", "weapons"]
    base = {c: (0.35, "harmful") for c in ("cybercrime", "weapons", "drugs", "fraud", "hate", "privacy")}
    base |= {"harmless": (0.02, "harmless"), "lookalike": (0.1, "lookalike")}
    edited = dict(base, cybercrime=(0.92, "harmful"), weapons=(0.85, "harmful"), lookalike=(0.14, "lookalike"))
    full = {c: (min(1.0, r + 0.3), k) for c, (r, k) in base.items()}
    comply = lambda c, i: "Sure, here is how " + "x" * (1000 if i == 0 else 20) + " \x07 <script>alert(1)</script>"  # noqa: E731
    refuse = lambda c, i: "I'm sorry, but I can't help with that." if c in targets else comply(c, i)  # noqa: E731
    sets = ["builtin", "strongreject"]
    nodes = ["L3.H2", "L7.H1", "L9.MLP", "L10.H4"]
    results = {
        "meta": {"seed": 0, "model": "smollm2-135m", "weights_sha256": "ab" * 32, "versions": {"cdelta": "0.1.0", "torch": "2.x"},
                 "command": "cdelta run --category cybercrime,weapons", "created": "2026-01-01T00:00:00+00:00",
                 "config": {"category": targets, "circuit": "params:0.02", "controls": ["random", "full"]},
                 "timings": {"localize": 120.0, "edit": 300.5, "evaluate": 80.25}},
        "edit": {"category": ",".join(targets), "direction": "refuse", "k": 1.0, "seed": 0, "variant": "direct",
                 "circuit": {"selection": "params:0.02", "nodes": nodes, "method": "eap-ig"}, "base_model": "smollm2-135m",
                 "base_weights_sha256": "ab" * 32, "params_touched": 2_700_000, "params_total": 134_515_008, "params_touched_fraction": 2_700_000 / 134_515_008},
        "k_selection": {"k": 1.0, "base_rates": {c: r for c, (r, _) in base.items()}, "rule": "score", "trials": [
            {"k": k, "rates": {c: r * k if c in targets else r + 0.02 * k for c, (r, _) in edited.items()}, "score": 0.0} for k in (0.5, 1.0, 1.5)
        ]},
        "contrast": {"cybercrime": {"harmful_gap": 0.4, "harmful_gap_se": 0.05, "chosen": "harmful"},
                     "weapons": {"harmful_gap": 0.01, "harmful_gap_se": 0.05, "chosen": "harmless"}},
        "base": _arm_results(base, sets, 0, comply),
        "edited": _arm_results(edited, sets, 1, refuse),
        "controls": {"random": {"params_touched": 2_690_000, "results": _arm_results(base, sets, 2, comply)},
                     "full": {"params_touched": 134_515_008, "results": _arm_results(full, sets, 3, refuse)}},
    }
    run_dir.mkdir(parents=True)
    (run_dir / "results.json").write_text(json.dumps(results))
    rng = random.Random(0)
    scores = {f"L{l}.{h}": rng.gauss(0, 0.1) for l in range(12) for h in [*(f"H{i}" for i in range(6)), "MLP"]}
    n_nodes = len(scores)
    sizes = circuit_sizes(n_nodes, DEFAULT_FRACTIONS)
    for category in targets:
        meta = {"category": category, "contrast": "harmful", "method": "eap-ig", "steps": 5, "n_pairs": 32, "n_params": 1_350_000,
                "param_fraction": 0.01, "selection": {"kind": "params", "value": 0.02, "by": "abs"}, "warnings": []}
        Circuit(12, 6, scores, nodes, meta).to_json(run_dir / "localize" / category / "circuit.json")
    curve = {"ablation": "patch", "n_nodes": n_nodes, "fractions": list(DEFAULT_FRACTIONS), "sizes": sizes, "gap": 0.8, "gap_se": 0.05,
             "gap_resolved": True, "contrast": "harmful",
             "circuit": {"recovered": [0.3, 0.45, 0.7, 0.85, 0.95, 1.0]},
             "random": {"seeds": [0, 1, 2, 3, 4], "mean": [0.0, 0.02, 0.05, 0.1, 0.2, 0.5], "sd": [0.05] * 6},
             "shuffled": {"recovered": [0.01, 0.03, 0.06, 0.12, 0.25, 0.55]}}
    (run_dir / "localize" / "cybercrime" / "faithfulness.json").write_text(json.dumps(curve))  # none for weapons
    trials = [{"number": i, "params": {"size": f"params:{f}", "k": k}, "worst": "harmless",
               "values": {"target_refusal": min(1.0, 0.4 + 0.3 * k + 5 * f), "off_target_rise": 0.02 * k + 2 * f, "kl": 0.01 * k}}
              for i, (k, f) in enumerate((k, f) for k in (0.5, 1.0, 1.5) for f in (0.01, 0.02, 0.05))]
    for t in trials:
        v = t["values"]
        t["pareto"] = not any(o["values"]["target_refusal"] >= v["target_refusal"] and o["values"]["off_target_rise"] <= v["off_target_rise"]
                              and o["values"] != v for o in trials)
        t["chosen"] = t["params"] == {"size": "params:0.02", "k": 1.0}
    (run_dir / "search.json").write_text(json.dumps({"trials": trials}))
    return results


@pytest.fixture(scope="module")
def real_run(tmp_path_factory) -> Path:
    """A real `run_pipeline` run on the tiny random llama (faithfulness on, random control), with its report."""
    root = tmp_path_factory.mktemp("real")
    tokenizer = make_tokenizer()
    model_dir = root / "tiny-llama"
    make_model("llama", vocab_size=len(tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    cfg = RunConfig(
        model=str(model_dir), n_pairs=4, ig_steps=2, circuit="top_k:3", steps=3, lr=1e-3, k_grid=[0.5, 1.0],
        retain_harmless=4, retain_lookalike=4, retain_other=1, max_new_tokens=4, mmlu_n=4,
        eval_limit=3, faithfulness=True, judge="marker", controls=["random"],
    )
    run_pipeline(cfg, root / "run", log=lambda m: None)
    write_report(root / "run")
    return root / "run"


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("synthetic") / "run"
    _write_synthetic(run_dir)
    write_report(run_dir)
    return run_dir


def _page(run_dir: Path) -> tuple[str, Page]:
    text = (run_dir / "report.html").read_text(encoding="utf-8")
    return text, Page(text)


def _check_numbers(page: Page, arms: dict[str, dict]) -> int:
    """Every refusal cell of every arm appears with its rate (text and data-value); returns the count checked."""
    checked = 0
    for arm, block in arms.items():
        for set_name, cells in block["sets"].items():
            for category, cell in cells.items():
                shown = page.cells[(set_name, category, arm)]
                assert shown["text"] == pct(cell["refusal_rate"]), (set_name, category, arm)
                assert float(shown["value"]) == pytest.approx(cell["refusal_rate"], abs=0)
                checked += 1
    return checked


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("which", ["real_run", "synthetic_run"])
def test_report_has_every_section_and_only_embedded_pngs(which, request):
    run_dir = request.getfixturevalue(which)
    text, page = _page(run_dir)
    assert text.startswith("<!DOCTYPE html>")
    for section in SECTIONS:
        assert section in page.ids, section
        assert f'href="#{section}"' in text
    # refusal charts (one per set) + group chart + heat maps + faithfulness curves + Pareto chart
    results = json.loads((run_dir / "results.json").read_text())
    n_sets = len(results["edited"]["sets"])
    targets = results["edit"]["category"].split(",")
    n_faith = sum((run_dir / "localize" / c / "faithfulness.json").exists() for c in targets)
    assert len(page.images) == n_sets + 1 + len(targets) + n_faith + 1
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        png = base64.b64decode(src.split(",", 1)[1], validate=True)
        assert png.startswith(PNG_MAGIC) and len(png) > 2000
    assert not [link for link in page.links if link.lower().startswith(("http:", "https:", "//"))]
    assert not {"script", "link", "iframe"} & page.tags
    assert "http://" not in text and "https://" not in text


@pytest.mark.parametrize("which", ["real_run", "synthetic_run"])
def test_refusal_tables_match_results_json(which, request):
    run_dir = request.getfixturevalue(which)
    results = json.loads((run_dir / "results.json").read_text())
    _, page = _page(run_dir)
    arms = {"base": results["base"], "edited": results["edited"], **{k: v["results"] for k, v in results["controls"].items()}}
    assert _check_numbers(page, arms) == sum(len(cells) for block in arms.values() for cells in block["sets"].values())


def test_real_run_header_and_utility(real_run):
    results = json.loads((real_run / "results.json").read_text())
    text, _ = _page(real_run)
    assert results["meta"]["weights_sha256"] in text
    assert f"{results['edit']['params_touched']:,}" in text
    assert f"{results['edited']['utility']['perplexity_ratio']:.4g}" in text
    assert "torch" in text and "transformers" in text  # versions
    pareto = text.split('id="pareto"')[1].split("</section>")[0]
    assert "From <code>k_selection</code>" in pareto and pareto.count("<tr class=") == len(results["k_selection"]["trials"])
    assert f'<tr class="chosen" data-k="{results["k_selection"]["k"]!r}">' in pareto


def test_synthetic_report_uses_search_json_and_marks_missing_faithfulness(synthetic_run):
    text, _ = _page(synthetic_run)
    pareto = text.split('id="pareto"')[1].split("</section>")[0]
    assert "search over circuit size × k: 9 trials" in pareto
    assert '<tr class="chosen"><td>#4</td><td>size=params:0.02, k=1</td>' in pareto
    faith = text.split('id="faithfulness"')[1].split("</section>")[0]
    assert "localize/weapons/faithfulness.json is absent" in faith
    assert "random circuit" in text and "full fine-tune" in text
    assert "134,515,008" in text
    assert "weapons: harmless (auto; gap to other harmful 0.01 ± 0.05 SE)" in text


def test_generations_are_escaped_truncated_and_deterministic(synthetic_run):
    text, _ = _page(synthetic_run)
    gens = text.split('id="generations"')[1]
    assert "<script>" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in gens
    assert "&lt;b&gt;bold?&lt;/b&gt; &amp; more" in gens
    assert "\\x07" in gens and "\x07" not in text
    assert "x" * (MAX_TEXT_CHARS + 1) not in gens and "…" in gens
    assert gens.count("I&#x27;m sorry") > 0
    # three prompts per category and set, same choice on every build
    assert gens.count('<tr data-id="builtin:cybercrime-') == 3
    assert build_report(synthetic_run) == text


def test_eval_only_results_give_reduced_report(real_run, tmp_path):
    results = json.loads((real_run / "results.json").read_text())
    evaluated = {**results["base"], "meta": {**results["meta"], "prompts": ["builtin"], "reference": None}}
    (tmp_path / "results.json").write_text(json.dumps(evaluated))
    out = write_report(tmp_path)
    assert out == tmp_path / "report.html"
    text, page = _page(tmp_path)
    for section in SECTIONS:
        assert (section in page.ids) == (section not in EDIT_SECTIONS), section
    assert _check_numbers(page, {"model": evaluated}) > 0
    assert 'data-group="harmful"' in text and 'data-group="target"' not in text
    assert len(page.images) == len(evaluated["sets"]) + 1
    assert all(src.startswith("data:image/png;base64,") for src in page.images)


def test_missing_faithfulness_json_is_a_note(real_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(real_run, run_dir, ignore=shutil.ignore_patterns("checkpoint", "*.safetensors", "report.html"))
    (run_dir / "localize" / "cybercrime" / "faithfulness.json").unlink()
    out = write_report(run_dir)
    text, page = _page(run_dir)
    assert "faithfulness" in page.ids and "faithfulness.json is absent" in text
    assert len(page.images) == len(_page(real_run)[1].images) - 1
    assert not [p.name for p in run_dir.iterdir() if p.name.endswith(".tmp")], "atomic write leaves no temp file"
    assert out.stat().st_size > 10_000


def test_missing_results_json_is_a_clear_error(tmp_path):
    with pytest.raises(CdeltaError, match="does not exist"):
        write_report(tmp_path)
    (tmp_path / "results.json").write_text("{}")
    with pytest.raises(CdeltaError, match="neither"):
        write_report(tmp_path)


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed")
def test_screenshot_in_headless_chromium(synthetic_run, tmp_path):
    from PIL import Image

    out = tmp_path / "shot.png"
    subprocess.run(["bash", str(SCRIPT), str(synthetic_run), str(out)], check=True, timeout=180, capture_output=True)
    assert out.stat().st_size > 50_000
    image = Image.open(out).convert("RGB")
    assert image.size == (1400, 6000)
    small = image.resize((140, 600))
    colors = small.getcolors(maxcolors=1 << 16)
    assert colors is not None and len(colors) > 200, "a blank or near-blank page"
    non_white = sum(count for count, rgb in colors if sum(rgb) < 720)
    assert non_white > 0.2 * 140 * 600
