"""The size × k search: one training per size, a non-dominated front holding the chosen trial,
determinism, the documented rule, resuming from SQLite, bad input, and the report section.

Training and evaluation are cheap fakes: a "delta" is one tensor holding the circuit fraction,
and the metrics are closed-form functions of fraction × k (no model), except the last test
of ``validation_evaluator``, which uses the tiny random llama.
"""

from __future__ import annotations

import base64
import json
from collections import Counter
from pathlib import Path

import optuna
import pytest
import torch
from conftest import make_model, make_tokenizer

from cdelta.edit.search import DEFAULT_SIZES, RULE, TrialMetrics, choose, plot_pareto, search_edit, validation_evaluator
from cdelta.errors import CdeltaError

TARGETS = ("cybercrime",)
BASE_RATES = {"cybercrime": 0.1, "drugs": 0.25, "harmless": 0.05, "lookalike": 0.0}


class Fakes:
    """Counting fake ``train_delta`` / ``evaluate``: bigger circuits and larger k refuse more, and over-refuse more."""

    def __init__(self, fail_after: int | None = None):
        self.trained: Counter[str] = Counter()
        self.calls: list[tuple[float, float]] = []
        self.fail_after = fail_after

    def train(self, size: str) -> dict[str, torch.Tensor]:
        self.trained[size] += 1
        return {"w": torch.tensor([float(size.split(":")[1]), 0.0, 0.0])}

    def evaluate(self, delta: dict[str, torch.Tensor], k: float) -> TrialMetrics:
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise RuntimeError("interrupted")
        f = float(delta["w"][0]) if delta else 0.0
        self.calls.append((f, k))
        x = 25 * f * k  # 0 for the base
        rates = {"cybercrime": min(1.0, 0.1 + x), "drugs": 0.25 + 0.1 * x * x, "harmless": 0.05 + 0.05 * x * (1 + (f > 0.015)),
                 "lookalike": 0.02 * x}
        return TrialMetrics(rates, TARGETS, 0.02 * x * x / (1 + 40 * f))


def _search(fakes: Fakes, **kw):
    args = {"sizes": DEFAULT_SIZES, "k_range": (0.5, 3.0), "n_trials": 10, "seed": 0, "log": lambda _: None} | kw
    return search_edit(fakes.train, fakes.evaluate, **args)


def _objectives(trial: dict) -> tuple[float, float, float]:
    """Objectives turned into minimisation."""
    v = trial["values"]
    return -v["target_refusal"], v["off_target_rise"], v["kl"]


def _dominates(a: dict, b: dict) -> bool:
    oa, ob = _objectives(a), _objectives(b)
    return all(x <= y for x, y in zip(oa, ob)) and oa != ob


def test_each_size_trained_once_base_once_and_values_match_the_metrics():
    fakes = Fakes()
    result = _search(fakes)
    assert fakes.trained == Counter({s: 1 for s in DEFAULT_SIZES})
    assert fakes.calls.count((0.0, 0.0)) == 1 and fakes.calls[0] == (0.0, 0.0)
    assert len(result.trials) == 10 and [t["number"] for t in result.trials] == list(range(10))
    # the first trials are every size at k = 1
    assert [t["params"] for t in result.trials[:4]] == [{"size": s, "k": 1.0} for s in DEFAULT_SIZES]
    for trial in result.trials:
        f, k = float(trial["params"]["size"].split(":")[1]), trial["params"]["k"]
        expected = fakes.evaluate({"w": torch.tensor([f])}, k)
        rises = {c: r - BASE_RATES[c] for c, r in expected.rates.items() if c not in TARGETS}
        assert trial["values"]["target_refusal"] == pytest.approx(expected.rates["cybercrime"])
        assert trial["values"]["off_target_rise"] == pytest.approx(max(rises.values()))
        assert trial["worst"] == max(rises, key=rises.get)
        assert trial["values"]["kl"] == pytest.approx(expected.kl)
        assert trial["score"] == pytest.approx(expected.rates["cybercrime"] - 2 * max(0.0, *rises.values()))
        assert 0.5 - 1e-9 <= k <= 3.0 + 1e-9 and abs(k / 0.05 - round(k / 0.05)) < 1e-6
    assert result.base["rates"] == pytest.approx(BASE_RATES) and result.base["kl"] == 0.0
    json.dumps(result.to_json())  # serialisable


def test_front_is_the_non_dominated_set_and_holds_the_chosen_trial():
    result = _search(Fakes(), n_trials=14)
    front = result.front
    assert front and result.chosen in front
    for trial in result.trials:
        dominated = any(_dominates(other, trial) for other in result.trials)
        assert trial["pareto"] == (not dominated), trial
    assert [t for t in result.trials if t["chosen"]] == [result.chosen]
    assert result.to_json()["chosen"] == result.chosen["number"]


def test_same_seed_same_search_other_seed_other_proposals():
    first, second = _search(Fakes()), _search(Fakes())
    assert first.to_json() == second.to_json()
    other = _search(Fakes(), seed=1)
    assert [t["params"] for t in other.trials[4:]] != [t["params"] for t in first.trials[4:]]


def test_chosen_trial_follows_the_documented_rule():
    result = _search(Fakes(), n_trials=14)
    best = max(t["score"] for t in result.trials)
    assert result.chosen["score"] == pytest.approx(best)  # highest score of all trials, not just of the front
    ties = [t for t in result.front if abs(t["score"] - best) < 1e-6]
    assert result.chosen["values"]["kl"] == min(t["values"]["kl"] for t in ties)
    assert result.rule == RULE and "2 × max(0, worst off-target rise)" in RULE
    assert (result.size, result.k) == (result.chosen["params"]["size"], result.chosen["params"]["k"])


def _trial(number: int, score: float, kl: float, pareto: bool = True) -> dict:
    return {"number": number, "score": score, "values": {"kl": kl}, "pareto": pareto}


def test_choose_on_ties_prefers_low_kl_then_the_earliest_and_never_leaves_the_front():
    assert choose([_trial(0, 0.5, 0.2), _trial(1, 0.7, 0.9), _trial(2, 0.6, 0.0)])["number"] == 1
    assert choose([_trial(0, 0.7, 0.2), _trial(1, 0.7 + 1e-9, 0.1), _trial(2, 0.7, 0.3)])["number"] == 1
    assert choose([_trial(0, 0.7, 0.1), _trial(1, 0.7, 0.1)])["number"] == 0
    assert choose([_trial(0, 0.9, 0.0, pareto=False), _trial(1, 0.7, 0.1)])["number"] == 1
    with pytest.raises(CdeltaError):
        choose([])


def test_worst_rise_and_target_refusal():
    base = TrialMetrics({"a": 0.2, "b": 0.4, "h": 0.1, "l": 0.3}, ("a", "b"), 0.0)
    edited = TrialMetrics({"a": 0.8, "b": 0.6, "h": 0.05, "l": 0.45}, ("a", "b"), 0.1)
    assert edited.target_refusal == pytest.approx(0.7)
    assert edited.worst_rise(base) == pytest.approx((0.15, "l"))
    fell = TrialMetrics({"a": 0.8, "b": 0.6, "h": 0.0, "l": 0.2}, ("a", "b"), 0.1)
    assert fell.worst_rise(base)[0] == pytest.approx(-0.1)  # negative: every off-target cell fell


def test_repeated_proposals_are_not_re_evaluated():
    fakes = Fakes()
    result = _search(fakes, sizes=["params:0.01"], k_range=(0.5, 0.6), n_trials=6)
    distinct = {(t["params"]["size"], t["params"]["k"]) for t in result.trials}
    assert len(result.trials) == 6 and len(distinct) <= 3
    assert len(fakes.calls) == 1 + len(distinct)  # base + one evaluation per distinct point


def test_sqlite_search_resumes_instead_of_restarting(tmp_path):
    db = tmp_path / "search.db"
    interrupted = Fakes(fail_after=6)  # base + 5 trials, then the 6th evaluation fails
    with pytest.raises(RuntimeError, match="interrupted"):
        _search(interrupted, storage=db, n_trials=9)
    done = [t for t in optuna.load_study(study_name="cdelta-search", storage=f"sqlite:///{db}").trials if t.state.name == "COMPLETE"]
    assert len(done) == 5
    # a process killed mid-trial leaves it RUNNING: it is failed and its parameters retried
    study = optuna.load_study(study_name="cdelta-search", storage=f"sqlite:///{db}")
    zombie = study.ask({"size": optuna.distributions.CategoricalDistribution(list(DEFAULT_SIZES)),
                        "k": optuna.distributions.FloatDistribution(0.5, 3.0, step=0.05)})
    resumed = Fakes()
    result = _search(resumed, storage=db, n_trials=9)
    assert len(result.trials) == 9
    assert [t["params"] for t in result.trials[:5]] == [{"size": t.params["size"], "k": round(t.params["k"], 6)} for t in done]
    assert (0.0, 0.0) not in resumed.calls  # the base is stored, not re-evaluated
    assert len(resumed.calls) <= 4  # only the missing trials are evaluated
    assert any(t["params"] == {"size": zombie.params["size"], "k": round(zombie.params["k"], 6)} for t in result.trials[5:])
    again = Fakes()
    assert _search(again, storage=db, n_trials=9).to_json() == result.to_json() and not again.calls and not again.trained
    with pytest.raises(CdeltaError, match="other settings"):
        _search(Fakes(), storage=db, n_trials=9, k_range=(0.5, 2.0))


@pytest.mark.parametrize("kw", [
    {"k_range": (2.0, 1.0)}, {"k_range": (-0.5, 1.0)}, {"k_range": (0.5, 1.03)}, {"k_range": (1.0,)},
    {"sizes": []}, {"sizes": ["params:0.01", "params:0.01"]}, {"sizes": ["biggest"]}, {"n_trials": 3},
])
def test_bad_settings_raise_cdelta_error(kw):
    with pytest.raises(CdeltaError):
        _search(Fakes(), **kw)


def test_plot_and_report_section(tmp_path):
    from test_report import _write_synthetic

    from cdelta.report import build_report

    result = _search(Fakes(), n_trials=8).to_json()
    png = plot_pareto(result, tmp_path / "pareto.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    run_dir = tmp_path / "run"
    results = _write_synthetic(run_dir)
    (run_dir / "search.json").unlink()
    (run_dir / "results.json").write_text(json.dumps(results | {"search": result}))
    pareto = build_report(run_dir).split('id="pareto"')[1].split("</section>")[0]
    assert "search over circuit size × k: 8 trials" in pareto and "2 × max(0, worst off-target rise)" in pareto
    chosen = next(t for t in result["trials"] if t["chosen"])
    params = f"size={chosen['params']['size']}, k={chosen['params']['k']:g}"
    assert f'<tr class="chosen"><td>#{chosen["number"]}</td><td>{params}</td>' in pareto
    assert pareto.count("<tr class=") == len({t["number"] for t in result["trials"] if t["pareto"] or t["chosen"]})
    image = pareto.split('src="data:image/png;base64,')[1].split('"')[0]
    assert base64.b64decode(image).startswith(b"\x89PNG")


def test_validation_evaluator_on_a_tiny_model():
    from cdelta.data.builtin import load_builtin
    from cdelta.data.prompts import PromptSet
    from cdelta.judge import get_judge
    from cdelta.edit.select_k import validation_prompts

    torch.manual_seed(0)
    tokenizer = make_tokenizer()
    model = make_model("llama", vocab_size=len(tokenizer))
    full = validation_prompts(load_builtin(), ["cybercrime"], 0)
    val = PromptSet("val", full.prompts[:6] + [p for p in full.prompts if p.kind != "harmful"][:6])
    before = {n: p.clone() for n, p in model.named_parameters()}
    evaluate = validation_evaluator(model, tokenizer, val, get_judge("marker"), ["cybercrime"], 8)
    base = evaluate({}, 0.0)
    assert base.kl == 0.0 and set(base.rates) == {p.category for p in val} and base.targets == ("cybercrime",)
    name = "model.layers.0.mlp.down_proj.weight"
    delta = {name: torch.randn_like(before[name]) * 0.5}
    small, large = evaluate(delta, 0.5), evaluate(delta, 2.0)
    assert 0 < small.kl < large.kl
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # trials edit a copy
