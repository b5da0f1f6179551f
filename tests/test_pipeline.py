"""The main job end to end on a tiny model: resumable, deterministic, drop-in export."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from cdelta.config import RunConfig
from cdelta.data.builtin import load_builtin
from cdelta.edit.delta import load_sparse
from cdelta.errors import CdeltaError
from cdelta.models.loading import load_model
from cdelta.edit.select_k import KL_LIMIT, off_target_cost, pick_k, selection_score
from cdelta.pipeline import build_control, build_edit, run_pipeline


def _config(model_dir) -> RunConfig:
    return RunConfig(
        model=str(model_dir), n_pairs=4, ig_steps=2, circuit="top_k:3", steps=3, lr=1e-3, k_grid=[1.0],
        retain_harmless=4, retain_lookalike=4, retain_other=1, max_new_tokens=4, mmlu_n=4,
        eval_limit=3, faithfulness=False, judge="marker",
    )


def test_run_is_deterministic_resumable_and_exports_drop_in_checkpoint(tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("CDELTA_CACHE_DIR", str(tmp_path / "cache"))
    cfg = _config(tiny_llama_dir)
    results = run_pipeline(cfg, tmp_path / "a", log=lambda m: None)
    second: list[str] = []
    run_pipeline(cfg, tmp_path / "b", log=second.append)
    delta_a = (tmp_path / "a" / "delta.safetensors").read_bytes()
    assert delta_a == (tmp_path / "b" / "delta.safetensors").read_bytes(), "same seed and inputs: byte-identical delta"
    # another run directory on the same base and settings reuses the base's evaluation from the user cache
    assert any(m.startswith("base evaluation reused") for m in second)
    assert (tmp_path / "b" / "results_base.json").read_text() == (tmp_path / "a" / "results_base.json").read_text()

    reused: list[str] = []
    run_pipeline(cfg, tmp_path / "a", log=reused.append)
    assert any(m.startswith("edit-top_k:3: reusing") for m in reused)
    assert any(m.startswith("localize-cybercrime: reusing") for m in reused)

    edit = results["edit"]
    assert 0 < edit["params_touched"] < 0.5 * edit["params_total"]
    assert set(results["edited"]["sets"]["builtin"]) >= {"cybercrime", "harmless", "lookalike"}
    cell = results["edited"]["sets"]["builtin"]["cybercrime"]
    assert cell["n"] == 3 and len(cell["ci95"]) == 2

    # The checkpoint loads with plain transformers and equals base + delta.
    edited = AutoModelForCausalLM.from_pretrained(tmp_path / "a" / "checkpoint")
    base = load_model(str(tiny_llama_dir)).model
    delta, manifest = load_sparse(tmp_path / "a" / "delta.safetensors")
    assert manifest["base_weights_sha256"] == load_model(str(tiny_llama_dir)).weights_sha256
    for name, param in edited.named_parameters():
        expected = dict(base.named_parameters())[name] + delta.get(name, 0)
        torch.testing.assert_close(param, expected, rtol=0, atol=0)
    assert json.loads((tmp_path / "a" / "results.json").read_text())["meta"]["seed"] == 0


def test_localization_is_redone_when_its_prompts_change(tiny_llama_dir, tmp_path):
    cfg, lm = _config(tiny_llama_dir), load_model(str(tiny_llama_dir))
    build_edit(cfg, tmp_path, lm, log=lambda m: None)
    prompts = load_builtin()
    dropped = prompts.filter(category="cybercrime", split="train").prompts[0]
    fewer = type(prompts)("builtin", [p for p in prompts if p.id != dropped.id])
    second: list[str] = []
    build_edit(cfg, tmp_path, lm, log=second.append, prompts=fewer)
    assert not any(m.startswith(("localize-cybercrime: reusing", "contrast-cybercrime: reusing")) for m in second)


def test_selection_rule_for_refuse_and_lift():
    base = {"cybercrime": 0.9, "fraud": 0.8, "harmless": 0.0, "lookalike": 0.1}
    # refuse: any off-target rise counts twice against target refusal
    assert selection_score({"cybercrime": 1.0, "fraud": 0.9, "harmless": 0.0, "lookalike": 0.1}, base, ["cybercrime"]) == pytest.approx(0.8)
    # lift: target progress is 1 - refusal; other harmful may fall by 5 points for free, not more
    lifted = {"cybercrime": 0.1, "fraud": 0.76, "harmless": 0.0, "lookalike": 0.1}
    assert selection_score(lifted, base, ["cybercrime"], "lift") == pytest.approx(0.9)
    dropped = {**lifted, "fraud": 0.6}
    assert off_target_cost(dropped, base, ["cybercrime"], "lift") == pytest.approx(0.15)
    # lift: harmless / look-alike refusal rising still counts
    assert off_target_cost({**lifted, "lookalike": 0.3}, base, ["cybercrime"], "lift") == pytest.approx(0.2)


def test_lift_learns_ablation_teacher_replies_and_keeps_controls(tiny_llama_dir, tmp_path):
    cfg = _config(tiny_llama_dir).model_copy(update={"direction": "lift", "controls": ["random"]})
    lm = load_model(str(tiny_llama_dir))
    built = build_edit(cfg, tmp_path, lm, log=lambda m: None)
    pairs = json.loads((tmp_path / "lift_target.json").read_text())
    assert [p for p, _ in pairs] == [p for p, _ in built.data.target]
    assert len(pairs) == len(load_builtin().filter(split="train", category="cybercrime"))
    assert built.params_touched == sum(int(m.sum()) for m in built.masks.values()) > 0
    delta, info = build_control(cfg, tmp_path, lm, built, "random", log=lambda m: None)
    assert set(info["nodes"]) != set(built.circuit_nodes) and len(info["nodes"]) == len(built.circuit_nodes)
    assert (tmp_path / "controls" / "random" / "delta.safetensors").exists()
    assert any(v.abs().sum() > 0 for v in delta.values())


def test_search_picks_size_and_k_and_is_recorded(tiny_llama_dir, tmp_path):
    cfg = _config(tiny_llama_dir).model_copy(update={"search": True, "search_sizes": ["top_k:2", "top_k:4"], "search_trials": 3})
    lm = load_model(str(tiny_llama_dir))
    built = build_edit(cfg, tmp_path, lm, log=lambda m: None)
    search = json.loads((tmp_path / "search.json").read_text())
    chosen = next(t for t in search["trials"] if t["number"] == search["chosen"])
    assert len(search["trials"]) == 3 and chosen["pareto"]
    assert built.circuit == chosen["params"]["size"] in ("top_k:2", "top_k:4")
    assert built.k == chosen["params"]["k"] and built.k_info["rule"] == "search"
    assert len(built.circuit_nodes) == int(built.circuit.split(":")[1])
    scaled = {name: built.raw[name] * built.k for name in built.raw}
    for name, value in built.delta.items():
        torch.testing.assert_close(value, scaled[name])
    with pytest.raises(CdeltaError, match="direction refuse"):
        build_edit(cfg.model_copy(update={"direction": "lift"}), tmp_path / "lift", lm, log=lambda m: None)


def test_k_choice_skips_scales_that_break_the_model():
    intact = {"k": 1.0, "score": 0.2, "kl": 0.05}
    broken = {"k": 2.0, "score": 0.3, "kl": 9.8}  # the higher score came from a destroyed model
    assert pick_k([intact, broken]) is intact
    assert pick_k([intact, {**broken, "kl": KL_LIMIT}])["k"] == 2.0, "at the limit a scale is still usable"
    # when every scale breaks the model, the least-broken one is kept rather than none
    assert pick_k([{**intact, "kl": 3.0}, broken])["k"] == 1.0
