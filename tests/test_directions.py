"""Refusal directions, ActAdd / directional ablation (hooks and exported weights), CAST."""

from __future__ import annotations

import json

import pytest
import torch

from cdelta.baselines.cast import CastModel, cast_generate, fit_cast, grid_search_condition
from cdelta.baselines.steering import ablation_edit, actadd_edit, apply_weight_edit, export_direction_edit
from cdelta.directions import (
    Direction,
    ablation_hooks,
    actadd_hooks,
    capture_residuals,
    collect_prompt_activations,
    fit_refusal_direction,
    mean_difference,
    pca_direction,
)
from cdelta.generation import generate
from cdelta.models.chat import encode_chat
from cdelta.models.loading import load_model
from tests.conftest import MIXED_PROMPTS as PROMPTS
from tests.conftest import chat_logits as _logits
from tests.conftest import hooks_left as _hooks_left
from tests.conftest import synthetic_prompts as _synthetic_prompts
from tests.conftest import make_tokenizer



# ------------------------------------------------------------------- directions


def test_mean_difference_and_pca_recover_planted_direction():
    gen = torch.Generator().manual_seed(0)
    d, n = 64, 1000
    planted = torch.randn(d, generator=gen)
    planted = 3.0 * planted / planted.norm()
    negative = torch.randn(n, d, generator=gen)
    positive = torch.randn(n, d, generator=gen) + planted
    for found in (mean_difference(positive, negative), pca_direction(positive, negative)):
        assert torch.nn.functional.cosine_similarity(found, planted, dim=0) > 0.98
        assert abs(found.norm() - 3.0) < 0.3
    # per-layer batches: [layers, n, d]
    stacked = mean_difference(torch.stack([positive, negative]), torch.stack([negative, positive]))
    assert stacked.shape == (2, d) and torch.allclose(stacked[0], -stacked[1])


def test_collected_activations_recover_a_direction_planted_in_the_model(tiny):
    model, tokenizer = tiny
    planted = torch.randn(model.config.hidden_size)
    base = collect_prompt_activations(model, tokenizer, PROMPTS, [0, 1], ("mean", -1))
    with actadd_hooks(model, planted, layer=0, alpha=2.0):
        shifted = collect_prompt_activations(model, tokenizer, PROMPTS, [0, 1], ("mean", -1))
    assert _hooks_left(model) == 0
    for pos in ("mean", -1):
        found = mean_difference(shifted[pos][0], base[pos][0])
        assert torch.allclose(found, 2.0 * planted, atol=1e-4)


def test_mean_pooling_ignores_left_padding(tiny):
    model, tokenizer = tiny
    together = collect_prompt_activations(model, tokenizer, PROMPTS, [1], ("mean", -1))
    for i, prompt in enumerate(PROMPTS):
        alone = collect_prompt_activations(model, tokenizer, [prompt], [1], ("mean", -1))
        for pos in ("mean", -1):
            assert torch.allclose(together[pos][0, i], alone[pos][0, 0], atol=1e-4)


def test_ablation_hooks_remove_the_direction_everywhere(tiny):
    model, tokenizer = tiny
    r = torch.randn(model.config.hidden_size)
    with ablation_hooks(model, r), capture_residuals(model, [0, 1]) as store:
        model(**encode_chat(tokenizer, PROMPTS))
        for layer in (0, 1):
            assert (store[layer] @ (r / r.norm())).abs().max() < 1e-4
    assert _hooks_left(model) == 0


# ------------------------------------------------------- weight edits vs hooks


def _load_plain(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def test_ablation_export_reproduces_hooks(tiny_model_dir, tmp_path):
    lm = load_model(str(tiny_model_dir))
    r = torch.randn(lm.model.config.hidden_size)
    with ablation_hooks(lm.model, r):
        hooked = _logits(lm.model, lm.tokenizer)
    edit = ablation_edit(lm.model, r)
    out = export_direction_edit(lm, edit, tmp_path / "ablated")
    exported = _logits(_load_plain(out), lm.tokenizer)
    assert torch.allclose(exported, hooked, atol=1e-4)
    assert not torch.allclose(exported, _logits(lm.model, lm.tokenizer), atol=1e-3)
    apply_weight_edit(lm.model, edit)
    assert torch.allclose(_logits(lm.model, lm.tokenizer), hooked, atol=1e-4)
    assert json.loads((out / "direction-edit.json").read_text())["method"] == "directional_ablation"


def test_actadd_export_reproduces_hooks(tiny_model_dir, tmp_path):
    lm = load_model(str(tiny_model_dir))
    model_type = lm.model.config.model_type
    r = torch.randn(lm.model.config.hidden_size)
    with actadd_hooks(lm.model, r, layer=0, alpha=1.5):
        hooked = _logits(lm.model, lm.tokenizer)
    edit = actadd_edit(lm.model, r, layer=0, alpha=1.5)
    out = export_direction_edit(lm, edit, tmp_path / "actadd")
    plain = _load_plain(out)
    assert plain.config.mlp_bias is True
    assert plain.config.model_type == "llama"  # qwen2 is re-labelled as the equivalent llama
    exported = _logits(plain, lm.tokenizer)
    assert torch.allclose(exported, hooked, atol=1e-4), model_type
    assert not torch.allclose(exported, _logits(lm.model, lm.tokenizer), atol=1e-3)
    apply_weight_edit(lm.model, edit)
    assert torch.allclose(_logits(lm.model, lm.tokenizer), hooked, atol=1e-4)


def test_ablation_export_with_tied_embeddings(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = make_tokenizer()
    torch.manual_seed(1)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True,
    )
    base_dir = tmp_path / "tied"
    LlamaForCausalLM(config).eval().save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    lm = load_model(str(base_dir))
    r = torch.randn(32)
    with ablation_hooks(lm.model, r):
        hooked = _logits(lm.model, lm.tokenizer)
    edit = ablation_edit(lm.model, r, tied="untie")
    assert edit.config_updates == {"tie_word_embeddings": False}
    exported = _logits(_load_plain(export_direction_edit(lm, edit, tmp_path / "out")), lm.tokenizer)
    assert torch.allclose(exported, hooked, atol=1e-4)


# --------------------------------------------------------------------------- CAST


def _cast_for(model, tokenizer, behavior_layer: int, condition_layer: int, alpha: float = 4.0, center: bool = False) -> CastModel:
    """A CAST whose condition splits PROMPTS into firing and non-firing rows."""
    gen = torch.Generator().manual_seed(3)
    d = model.config.hidden_size
    cast = CastModel(
        condition_center=torch.randn(d, generator=gen) if center else None,
        behavior_vector=torch.randn(d, generator=gen),
        behavior_layers=(behavior_layer,),
        alpha=alpha,
        condition_vector=torch.randn(d, generator=gen),
        condition_layer=condition_layer,
        threshold=0.0,
    )
    scores = cast.condition_scores(model, tokenizer, PROMPTS).sort().values
    cast.threshold = float((scores[2] + scores[3]) / 2)  # 3 rows fire, 3 do not
    return cast


@pytest.mark.parametrize("behavior_layer,condition_layer,center", [(0, 1, False), (1, 0, True)])
def test_cast_gates_each_sequence_of_a_batch(tiny, behavior_layer, condition_layer, center):
    model, tokenizer = tiny
    cast = _cast_for(model, tokenizer, behavior_layer, condition_layer, center=center)
    expected = cast.fires(cast.condition_scores(model, tokenizer, PROMPTS))
    assert 0 < int(expected.sum()) < len(PROMPTS)
    batch = encode_chat(tokenizer, PROMPTS)
    settings = dict(max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=tokenizer.pad_token_id)

    def run():
        with torch.no_grad():
            out = model.generate(**batch, **settings)
        return out.sequences, torch.stack(out.logits, 1)

    base_seq, base_logits = run()
    with actadd_hooks(model, cast.behavior_vector, behavior_layer, cast.alpha):
        steer_seq, steer_logits = run()
    with cast.attach(model) as hooks:
        cast_seq, cast_logits = run()
        assert torch.equal(hooks.mask, expected)
    assert _hooks_left(model) == 0
    for row in range(len(PROMPTS)):
        reference = (steer_seq, steer_logits) if expected[row] else (base_seq, base_logits)
        assert torch.equal(cast_seq[row], reference[0][row])
        assert torch.equal(cast_logits[row], reference[1][row])
    fired = expected.nonzero().flatten()
    assert not torch.equal(cast_logits[fired], base_logits[fired])


def test_cast_hooks_detach_and_leave_the_base_untouched(tiny):
    model, tokenizer = tiny
    cast = _cast_for(model, tokenizer, behavior_layer=0, condition_layer=1)
    before = _logits(model, tokenizer)
    texts = generate(model, tokenizer, PROMPTS, max_new_tokens=5, progress=False)
    steered = cast_generate(model, tokenizer, cast, PROMPTS, max_new_tokens=5, progress=False)
    with cast.attach(model):
        during = _logits(model, tokenizer)
    assert _hooks_left(model) == 0
    assert torch.equal(_logits(model, tokenizer), before)
    assert generate(model, tokenizer, PROMPTS, max_new_tokens=5, progress=False) == texts
    assert not torch.equal(during, before)
    fires = cast.fires(cast.condition_scores(model, tokenizer, PROMPTS))
    assert all(s == t for s, t, f in zip(steered, texts, fires) if not f)
    # an exception inside the context still removes every hook
    with pytest.raises(RuntimeError), cast.attach(model):
        raise RuntimeError("boom")
    assert _hooks_left(model) == 0


def test_grid_search_picks_the_separating_layer_and_side():
    labels = torch.tensor([True] * 5 + [False] * 15)
    noise = torch.linspace(-0.1, 0.1, 20)[torch.randperm(20, generator=torch.Generator().manual_seed(0))]
    separating = torch.where(labels, -0.3, 0.2) + 0.01 * noise  # target is *below* the rest
    scores = torch.stack([noise, separating])
    best = grid_search_condition(scores, labels, [4, 7])[0]
    assert (best["layer"], best["comparator"], best["f1"]) == (7, "smaller", 1.0)
    assert -0.3 < best["threshold"] < 0.2


def test_fit_cast_end_to_end_on_a_tiny_model(tiny_llama_dir, tmp_path):
    lm = load_model(str(tiny_llama_dir))
    prompts = _synthetic_prompts()
    cast = fit_cast(lm, prompts, "cybercrime", seed=0, n_contrast_per_category=6,
                    direction_kwargs=dict(recipe="reply", layers=[0, 1], n_train_per_category=3, n_train_harmless=3, n_val=4))
    assert cast.category == "cybercrime" and cast.behavior_layers[0] in (0, 1)
    assert {(row["layer"], row["center"]) for row in cast.grid} == {(0, False), (1, False), (0, True), (1, True)}
    assert cast.grid[0]["f1"] > 0 and (cast.condition_center is not None) == cast.grid[0]["center"]
    assert cast.info["behavior"]["recipe"] == "reply" and len(cast.info["behavior"]["scores"]) == 2
    cast.save(tmp_path / "cast.safetensors")
    loaded = CastModel.load(tmp_path / "cast.safetensors")
    assert torch.equal(loaded.condition_vector, cast.condition_vector) and loaded.threshold == cast.threshold
    cast.condition_center = torch.ones_like(cast.condition_vector)
    cast.save(tmp_path / "centred.safetensors")
    assert torch.equal(CastModel.load(tmp_path / "centred.safetensors").condition_center, cast.condition_center)
    direction = Direction(torch.randn(8), 3, -1, "harmful-harmless", scores=[{"layer": 3, "induce": 0.1}])
    direction.save(tmp_path / "dir.safetensors")
    again = Direction.load(tmp_path / "dir.safetensors")
    assert torch.equal(again.vector, direction.vector) and again.position == -1 and again.scores == direction.scores
    with cast.attach(lm.model):
        _logits(lm.model, lm.tokenizer)
    assert _hooks_left(lm.model) == 0


def test_fit_refusal_direction_arditi_recipe_picks_as_if_all_were_scored(tiny_llama_dir):
    lm = load_model(str(tiny_llama_dir))
    direction = fit_refusal_direction(
        lm, _synthetic_prompts(), seed=0, recipe="harmful-harmless", method="pca", layers=[0, 1],
        positions=(-1, "mean"), n_train_per_category=3, n_train_harmless=3, n_val=4,
    )
    assert direction.selection == "bypass" and direction.recipe == "harmful-harmless"
    assert {(s["layer"], s["position"]) for s in direction.scores} == {(0, -1), (1, -1), (0, "mean"), (1, "mean")}
    assert all("bypass" in s for s in direction.scores)
    # induce and kl are scored lazily in bypass order; the pick is still the Arditi rule's
    picked = next(s for s in direction.scores if (s["layer"], s["position"]) == (direction.layer, direction.position))
    eligible = [s for s in direction.scores if "kl" in s and s["kl"] < 0.1 and s["induce"] > 0]
    lower = [s for s in direction.scores if s["bypass"] < picked["bypass"]]
    assert all("kl" in s and s not in eligible for s in lower)
    assert picked in eligible or picked == min(direction.scores, key=lambda s: s["bypass"])
    assert direction.vector.shape == (lm.model.config.hidden_size,) and direction.norm > 0
    assert _hooks_left(lm.model) == 0


@pytest.mark.parametrize(("rate", "recipe"), [(5 / 16, "harmful-harmless"), (3 / 16, "reply")])
def test_auto_recipe_takes_arditi_for_a_base_refusing_a_quarter(tiny_llama_dir, monkeypatch, rate, recipe):
    import cdelta.directions.vectors as vectors

    monkeypatch.setattr(vectors, "base_refusal_rate", lambda lm, texts: rate)
    direction = fit_refusal_direction(load_model(str(tiny_llama_dir)), _synthetic_prompts(), seed=0, layers=[1],
                                      n_train_per_category=2, n_train_harmless=2, n_val=4)
    assert direction.recipe == recipe
