"""``cdelta compare`` on a tiny model: rows equal a direct evaluation, hooks live only during
their method's evaluation, rows resume, and the real method modules plug in."""

import hashlib
import importlib
import json
import sys
from contextlib import contextmanager

import pytest
import torch

from cdelta import cli
from cdelta.compare import Method, MethodResult
from cdelta.compare import run as compare_run
from cdelta.compare.methods import base as base_method
from cdelta.compare.shared import edited_copy, param_count
from cdelta.data.builtin import load_builtin
from cdelta.errors import CdeltaError
from cdelta.evaluate import EvalConfig, evaluate_model, first_token_kl, limit_per_category, next_token_logprobs
from cdelta.models.loading import load_model

CONFIG = EvalConfig("test", judge="hash", max_new_tokens=3, batch_size=32, limit_per_category=3, mmlu_n=0, ppl_chars=300, kl_prompts=6)
SPEED = compare_run.SpeedConfig(batch_size=2, repeats=1)
CATEGORY = "cybercrime"


class HashJudge:
    """Refusal iff the completion's sha256 starts with an even byte: ~half of the prompts, and a
    different verdict pattern for every model whose completions differ."""

    name = "hash"

    def is_refusal(self, prompt: str, completion: str) -> bool:
        return hashlib.sha256(completion.encode()).digest()[0] % 2 == 0


@pytest.fixture(autouse=True)
def hash_judge(monkeypatch):
    import cdelta.judge

    real = cdelta.judge.get_judge
    monkeypatch.setattr(cdelta.judge, "get_judge", lambda name="classifier": HashJudge() if name == "hash" else real(name))


def _perturb(model: torch.nn.Module) -> None:
    """A weight edit: new per-dimension gains of the final norm (changes greedy outputs)."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        model.model.norm.weight.add_(torch.randn(model.model.norm.weight.shape, generator=generator))


def _shift(model: torch.nn.Module) -> torch.Tensor:
    generator = torch.Generator().manual_seed(2)
    return 2 * torch.randn(model.config.hidden_size, generator=generator)


@contextmanager
def shift_hooks(model: torch.nn.Module, calls: list):
    """Runtime steering: add a fixed vector to the final norm's output while entered."""
    shift = _shift(model)

    def hook(_module, _args, output):
        calls.append(output.shape[0])
        return output + shift

    handle = model.model.norm.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@pytest.fixture
def fake_methods(monkeypatch):
    """Registers base, 'edited' (a weight edit on a copy) and 'hooked' (runtime hooks on the base)."""
    fits = {"edited": 0, "hooked": 0}
    calls: list[int] = []

    def fit_edited(context):
        fits["edited"] += 1
        model, touched = edited_copy(context.lm.model, _perturb)
        return MethodResult(model=model, params_touched=touched)

    def fit_hooked(context):
        fits["hooked"] += 1
        return MethodResult(model=context.lm.model, params_touched=0, hooks=lambda model: shift_hooks(model, calls))

    methods = {
        "base": base_method.METHOD,
        "edited": Method("edited", "a weight edit", fit_edited),
        "hooked": Method("hooked", "runtime hooks", fit_hooked),
    }
    monkeypatch.setattr("cdelta.compare.base.available_methods", lambda: methods)
    return fits, calls


def _compare(lm, out, methods, **kwargs):
    logs: list[str] = []
    result = compare_run.compare(lm, CATEGORY, methods, out, eval_config=CONFIG, log=logs.append, speed=SPEED, **kwargs)
    return result, logs


def _hooks_left(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_rows_equal_a_direct_evaluation_and_hooks_live_only_during_their_method(tiny_llama_dir, tmp_path, fake_methods):
    _, calls = fake_methods
    lm = load_model(str(tiny_llama_dir))
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    result, _ = _compare(lm, tmp_path / "cmp", ["hooked", "edited"])
    rows = {row["method"]: row for row in result["rows"]}
    assert [row["method"] for row in result["rows"]] == ["base", "hooked", "edited"], "base first, then as asked"
    assert calls and _hooks_left(lm.model) == 0, "hooks were active during the evaluation and removed after"
    assert all(torch.equal(before[k], v) for k, v in lm.model.state_dict().items())

    prompts = load_builtin()
    edited, _ = edited_copy(lm.model, _perturb)
    direct = {"base": evaluate_model(lm.model, lm.tokenizer, [prompts], CONFIG, progress=False),
              "edited": evaluate_model(edited, lm.tokenizer, [prompts], CONFIG, progress=False)}
    with shift_hooks(lm.model, []):
        direct["hooked"] = evaluate_model(lm.model, lm.tokenizer, [prompts], CONFIG, progress=False)
    for name, evaluation in direct.items():
        cells, row = evaluation["sets"]["builtin"], rows[name]
        assert row["per_category"] == cells
        other = [c for cat, c in cells.items() if c["kind"] == "harmful" and cat != CATEGORY]
        assert row["target"]["refusals"] == cells[CATEGORY]["refusals"] and row["target"]["n"] == 3
        assert (row["other_harmful"]["refusals"], row["other_harmful"]["n"]) == (sum(c["refusals"] for c in other), 15)
        assert row["harmless"]["refusals"] == cells["harmless"]["refusals"]
        assert row["lookalike"]["refusal_rate"] == cells["lookalike"]["refusal_rate"]
        lo, hi = row["other_harmful"]["ci95"]
        assert lo <= row["other_harmful"]["refusal_rate"] <= hi
        for group in compare_run.GROUPS:
            delta = row[group]["refusal_rate"] - rows["base"][group]["refusal_rate"]
            assert row[group]["delta_vs_base"] == pytest.approx(delta)
    assert rows["hooked"]["per_category"] != rows["base"]["per_category"], "the hooks changed what was generated"

    assert rows["base"]["first_token_kl"] == 0 and rows["base"]["perplexity_ratio"] == 1
    kl_texts = limit_per_category(prompts.filter(split="test", kind="harmless"), 3, CONFIG.seed).texts()
    reference = next_token_logprobs(lm.model, lm.tokenizer, kl_texts)
    with shift_hooks(lm.model, []):
        hooked_kl = first_token_kl(reference, next_token_logprobs(lm.model, lm.tokenizer, kl_texts))
    assert rows["hooked"]["first_token_kl"] == pytest.approx(hooked_kl) and hooked_kl > 1e-3
    assert rows["edited"]["first_token_kl"] == pytest.approx(first_token_kl(reference, next_token_logprobs(edited, lm.tokenizer, kl_texts)))
    assert rows["edited"]["perplexity_ratio"] == pytest.approx(rows["edited"]["perplexity"] / rows["base"]["perplexity"])
    hidden = lm.model.config.hidden_size
    assert rows["edited"]["params_touched"] == hidden
    assert rows["edited"]["params_fraction"] == pytest.approx(hidden / param_count(lm.model))
    assert (rows["hooked"]["runtime_hooks"], rows["edited"]["runtime_hooks"]) == (True, False)
    assert all(row["tokens_per_s_ratio"] > 0 and row["speed"]["batch_size"] == 2 for row in rows.values())

    out = tmp_path / "cmp"
    assert json.loads((out / "compare.json").read_text())["meta"]["category"] == CATEGORY
    assert "| hooked |" in (out / "compare.md").read_text()
    page = (out / "compare.html").read_text()
    assert "data:image/png;base64," in page and "http" not in page and len(page) < 200_000


def test_rows_resume_and_refit_recomputes(tiny_llama_dir, tmp_path, fake_methods):
    fits, _ = fake_methods
    lm = load_model(str(tiny_llama_dir))
    first, _ = _compare(lm, tmp_path / "cmp", ["edited"])
    second, logs = _compare(lm, tmp_path / "cmp", ["edited"])
    assert fits["edited"] == 1 and any(m.startswith("row-edited: reusing") for m in logs)
    assert second["rows"] == first["rows"]
    _compare(lm, tmp_path / "cmp", ["edited"], refit=True)
    assert fits["edited"] == 2
    _compare(lm, tmp_path / "cmp", ["edited"], options={"alpha": 2})
    assert fits["edited"] == 3, "changed options are changed inputs"


def test_a_method_editing_the_base_in_place_is_refused(tiny_llama_dir, tmp_path, monkeypatch):
    def fit_in_place(context):
        _perturb(context.lm.model)
        return MethodResult(model=context.lm.model, params_touched=0)

    methods = {"base": base_method.METHOD, "bad": Method("bad", "edits in place", fit_in_place)}
    monkeypatch.setattr("cdelta.compare.base.available_methods", lambda: methods)
    with pytest.raises(CdeltaError, match="in place"):
        _compare(load_model(str(tiny_llama_dir)), tmp_path / "cmp", ["bad"])


def _cli_error(monkeypatch, capsys, *args) -> str:
    monkeypatch.setattr(sys, "argv", ["cdelta", *args])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), lines
    return lines[0]


def test_cli_rejects_unknown_methods_categories_and_options(monkeypatch, capsys, tmp_path):
    out = tmp_path / "cmp"
    message = _cli_error(monkeypatch, capsys, "compare", "--methods", "base,nope", "--out", str(out))
    assert "nope" in message and "cast" in message and "cdelta-random" in message
    message = _cli_error(monkeypatch, capsys, "compare", "--category", "knitting", "--out", str(out))
    assert "knitting" in message and "weapons" in message
    message = _cli_error(monkeypatch, capsys, "compare", "--option", "alpha", "--out", str(out))
    assert "KEY=VALUE" in message
    assert not out.exists()


def test_direction_methods_share_one_direction(tiny_llama_dir, tmp_path):
    lm = load_model(str(tiny_llama_dir))
    options = {
        "direction_kwargs": {"recipe": "harmful-harmless", "layers": [0, 1], "positions": [-1], "n_train_per_category": 2,
                             "n_train_harmless": 4, "n_val": 4},
        "cast_kwargs": {"n_contrast_per_category": 3, "condition_layers": [0, 1], "n_thresholds": 11},
    }
    result, logs = _compare(lm, tmp_path / "cmp", ["cast", "actadd", "ablation"], options=options)
    rows = {row["method"]: row for row in result["rows"]}
    assert sum("refusal direction: fitting" in m for m in logs) == 1
    assert (tmp_path / "cmp" / "shared" / "direction.safetensors").is_file()
    assert rows["cast"]["info"]["reused_seconds"] == 0, "cast fitted the direction: its wall time counts it"
    assert rows["actadd"]["info"]["reused_seconds"] > 0, "actadd reused it: charged its recorded fit time"
    assert rows["actadd"]["fit_seconds"] >= rows["actadd"]["info"]["reused_seconds"]
    assert rows["cast"]["runtime_hooks"] and rows["cast"]["params_touched"] == 0
    assert rows["cast"]["info"]["direction"] == rows["actadd"]["info"]["direction"] == rows["ablation"]["info"]["direction"]
    assert rows["actadd"]["params_touched"] == lm.model.config.hidden_size, "one baked bias vector"
    # ablation orthogonalises the embedding and every o_proj / down_proj against r̂
    config = lm.model.config
    writers = config.vocab_size * config.hidden_size + config.num_hidden_layers * config.hidden_size * (config.hidden_size + config.intermediate_size)
    assert 0.9 * writers < rows["ablation"]["params_touched"] <= writers
    assert rows["ablation"]["needs_refusing_base"] and "†" in (tmp_path / "cmp" / "compare.md").read_text()
    assert _hooks_left(lm.model) == 0


def test_cdelta_and_its_random_control_share_one_build(tiny_llama_dir, tmp_path, monkeypatch):
    localize_module = importlib.import_module("cdelta.circuits.localize")
    localized = []
    real_localize = localize_module.localize
    monkeypatch.setattr(localize_module, "localize", lambda *a, **k: localized.append(1) or real_localize(*a, **k))
    lm = load_model(str(tiny_llama_dir))
    options = {"n_pairs": 4, "ig_steps": 2, "circuit": "top_k:3", "steps": 2, "k_grid": [1.0], "retain_harmless": 4,
               "retain_lookalike": 4, "retain_other": 1, "faithfulness": False, "judge": "marker", "contrast": "harmful"}
    result, logs = _compare(lm, tmp_path / "cmp", ["cdelta", "cdelta-random"], options=options)
    rows = {row["method"]: row for row in result["rows"]}
    assert len(localized) == 1, "the control resumed the C-Δθ build instead of localizing again"
    for name in ("cdelta", "cdelta-random"):
        info = rows[name]["info"]
        assert 0 < rows[name]["params_touched"] <= info["circuit_params"], "changes stay inside the circuit"
        assert len(info["circuit_nodes"]) == 3 and info["k"] == 1.0 and not rows[name]["runtime_hooks"]
    assert rows["cdelta"]["info"]["circuit_nodes"] != rows["cdelta-random"]["info"]["circuit_nodes"]
