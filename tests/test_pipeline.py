"""The main job end to end on a tiny model: resumable, deterministic, drop-in export."""

import json

import torch
from transformers import AutoModelForCausalLM

from cdelta.config import RunConfig
from cdelta.edit.delta import load_sparse
from cdelta.models.loading import load_model
from cdelta.pipeline import run_pipeline


def _config(model_dir) -> RunConfig:
    return RunConfig(
        model=str(model_dir), n_pairs=4, ig_steps=2, circuit="top_k:3", steps=3, lr=1e-3, k_grid=[1.0],
        retain_harmless=4, retain_lookalike=4, retain_other=1, max_new_tokens=4, mmlu_n=4,
        eval_limit=3, faithfulness=False, judge="marker",
    )


def test_run_is_deterministic_resumable_and_exports_drop_in_checkpoint(tiny_llama_dir, tmp_path):
    cfg = _config(tiny_llama_dir)
    results = run_pipeline(cfg, tmp_path / "a", log=lambda m: None)
    run_pipeline(cfg, tmp_path / "b", log=lambda m: None)
    delta_a = (tmp_path / "a" / "delta.safetensors").read_bytes()
    assert delta_a == (tmp_path / "b" / "delta.safetensors").read_bytes(), "same seed and inputs: byte-identical delta"

    reused: list[str] = []
    run_pipeline(cfg, tmp_path / "a", log=reused.append)
    assert any(m.startswith("edit: reusing") for m in reused)
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
