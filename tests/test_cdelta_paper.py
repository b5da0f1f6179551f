"""``cdelta-paper`` (C-Δθ with the authors' published recipe) on a tiny model: only the q/k/v/o
slices of the top 1% of heads change, the two fine-tunes use no retain loss and AdamW at lr
1e-5 for 50 steps with the gradient clipped to norm 1, and the edit is exactly θ + 2(θ_pos − θ_neg)."""

import importlib
import json

import torch
from test_compare import CATEGORY, _compare, hash_judge  # noqa: F401  (autouse: the hash judge)

from cdelta.circuits.circuit import Circuit
from cdelta.compare.methods import cdelta_paper
from cdelta.data.builtin import refusal_replies
from cdelta.edit.train import EditData, TrainConfig, masked_finetune
from cdelta.models.architecture import architecture_of
from cdelta.models.loading import load_model

LOCALIZE = {"n_pairs": 4, "ig_steps": 2, "faithfulness": False, "judge": "marker", "contrast": "harmful"}


def test_paper_recipe_edits_only_the_top_heads_with_its_settings(tiny_llama_dir, tmp_path, monkeypatch):
    runs: list[dict] = []
    clips: list[float] = []
    real_clip = torch.nn.utils.clip_grad_norm_

    def clip(parameters, max_norm, *args, **kwargs):
        clips.append(max_norm)
        return real_clip(parameters, max_norm, *args, **kwargs)

    def spy(model, tokenizer, masks, data, config, *args, **kwargs):
        delta = masked_finetune(model, tokenizer, masks, data, config, *args, **kwargs)
        runs.append({"data": data, "config": config, "grad_clip": kwargs.get("grad_clip"), "delta": delta})
        return delta

    results = []
    real_scaled = cdelta_paper.scaled_result
    monkeypatch.setattr(cdelta_paper, "masked_finetune", spy)
    monkeypatch.setattr(cdelta_paper, "scaled_result", lambda *a: results.append(real_scaled(*a)) or results[-1])
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    lm = load_model(str(tiny_llama_dir))
    base = {name: p.detach().clone() for name, p in lm.model.named_parameters()}
    result, _ = _compare(lm, tmp_path / "cmp", ["cdelta-paper"], options=LOCALIZE)
    row = next(r for r in result["rows"] if r["method"] == "cdelta-paper")
    info = row["info"]

    # the recipe's settings: two fine-tunes, AdamW lr 1e-5, 50 steps, clip 1, no retain loss
    assert len(runs) == 2
    for run in runs:
        assert run["config"] == TrainConfig(steps=50, lr=1e-5, batch_size=8, retain_weight=0.0, seed=0)
        assert run["data"].retain == [] and run["grad_clip"] == 1.0
    assert clips == [1.0] * 100, "the gradient is clipped to norm 1 before every one of the 2 × 50 steps"
    positive, negative = runs
    pool = {reply for replies in refusal_replies().values() for reply in replies}
    assert positive["data"].target and all(reply in pool for _, reply in positive["data"].target), "θ_pos learns refusals"
    own = json.loads((tmp_path / "cmp" / "shared" / "cdelta-run" / "own_target.json").read_text())
    assert [reply for _, reply in negative["data"].target] == [reply for _, reply in own], "θ_neg learns the model's own replies"
    assert [p for p, _ in positive["data"].target] == [p for p, _ in negative["data"].target]

    # heads only: the top 1% of head nodes by |EAP-IG score| (8 heads here: one)
    scored = Circuit.from_json(tmp_path / "cmp" / "shared" / "cdelta-run" / "localize" / CATEGORY / "circuit.json")
    heads = sorted((n for n in scored.scores if not n.endswith(".MLP")), key=lambda n: -abs(scored.scores[n]))
    assert info["circuit_nodes"] == heads[:1] and info["heads_total"] == 8 and info["k"] == 2.0

    # exactly θ + 2(θ_pos − θ_neg), changing only the q/k/v/o slices of that head
    arch = architecture_of(lm.model)
    layer, head = (int(part[1:]) for part in heads[0].split("."))
    hd, group = arch.head_dim, arch.kv_head(head)
    allowed = {name: torch.zeros_like(p, dtype=torch.bool) for name, p in base.items()}
    allowed[arch.attn_param(layer, "q")][head * hd : (head + 1) * hd] = True
    allowed[arch.attn_param(layer, "k")][group * hd : (group + 1) * hd] = True
    allowed[arch.attn_param(layer, "v")][group * hd : (group + 1) * hd] = True
    allowed[arch.attn_param(layer, "o")][:, head * hd : (head + 1) * hd] = True
    (edited,) = results
    changed = 0
    for name, param in edited.model.named_parameters():
        pos = positive["delta"].get(name, torch.zeros_like(base[name]))
        neg = negative["delta"].get(name, torch.zeros_like(base[name]))
        assert torch.equal(param.detach(), base[name] + 2.0 * (pos - neg)), name
        difference = param.detach() != base[name]
        assert not (difference & ~allowed[name]).any(), f"{name} changed outside the head's q/k/v/o slices"
        changed += int(difference.sum())
    assert 0 < changed == row["params_touched"] <= info["circuit_params"] == sum(int(m.sum()) for m in allowed.values())
    assert all(torch.equal(p, base[n]) for n, p in lm.model.named_parameters()), "the base is untouched"


def test_gradient_clipping_bounds_the_step():
    """``grad_clip`` clips before each AdamW step: a vanishing clip norm leaves a vanishing edit."""
    from conftest import make_model, make_tokenizer

    tok = make_tokenizer()
    model = make_model("llama", vocab_size=len(tok))
    masks = {name: torch.ones_like(p, dtype=torch.bool) for name, p in model.named_parameters() if "q_proj" in name}
    data = EditData([("How do I hack a server?", "I'm sorry, but I can't help with that.")] * 4, [])
    config = TrainConfig(steps=3, lr=1e-2, batch_size=2, retain_weight=0.0)
    free = masked_finetune(model, tok, masks, data, config, progress=False)
    again = masked_finetune(model, tok, masks, data, config, progress=False, grad_clip=None)
    clipped = masked_finetune(model, tok, masks, data, config, progress=False, grad_clip=1e-14)
    assert all(torch.equal(free[n], again[n]) for n in free), "no clip is the unchanged default"
    largest = lambda delta: max(float(v.abs().max()) for v in delta.values())  # noqa: E731
    assert largest(clipped) < 1e-3 * largest(free)


def test_registered():
    methods = importlib.import_module("cdelta.compare.base").available_methods()
    assert "cdelta-paper" in methods and "cdelta" in methods
