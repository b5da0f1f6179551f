"""Gaussian OT refusal ablation (cdelta.baselines.ot) and SRA residualisation (cdelta.baselines.spectral)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from cdelta.baselines.ot import (
    ActivationSet,
    GaussianOTMap,
    OTFit,
    fit_gaussian_ot,
    fit_ot,
    fit_ot_maps,
    gaussian_ot_matrix,
    ledoit_wolf_shrinkage,
    ot_candidate_layers,
    ot_edit,
    ot_hooks,
    shrink_covariance,
)
from cdelta.baselines.spectral import concept_atoms, fit_sra, residualize
from cdelta.baselines.steering import apply_weight_edit
from cdelta.compare.base import MethodContext
from cdelta.data.prompts import HARMLESS
from cdelta.directions import capture_residuals
from cdelta.errors import CdeltaError
from cdelta.models.chat import encode_chat
from cdelta.models.loading import load_model
from tests.conftest import MIXED_PROMPTS as PROMPTS
from tests.conftest import chat_logits as _logits
from tests.conftest import hooks_left as _hooks_left
from tests.conftest import synthetic_prompts as _synthetic_prompts



def _gaussians(d: int = 16, k: int = 4, n: int = 20000, seed: int = 0):
    """Source and target samples [n, d] differing (mean and covariance) only inside a k-dim subspace."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    inside, outside = q[:, :k], q[:, k:]
    scale_s = torch.randn(k, k, generator=gen, dtype=torch.float64) + 3 * torch.eye(k, dtype=torch.float64)
    scale_t = torch.randn(k, k, generator=gen, dtype=torch.float64) + 2 * torch.eye(k, dtype=torch.float64)
    noise = lambda: 0.05 * torch.randn(n, d - k, generator=gen, dtype=torch.float64) @ outside.T  # noqa: E731
    source = (torch.randn(n, k, generator=gen, dtype=torch.float64) @ scale_s.T + 4.0) @ inside.T + noise()
    target = (torch.randn(n, k, generator=gen, dtype=torch.float64) @ scale_t.T - 4.0) @ inside.T + noise()
    return source.float(), target.float()


# ------------------------------------------------------------------ OT maths


def test_ot_matrix_is_the_symmetric_psd_solution_of_a_sigma_a():
    gen = torch.Generator().manual_seed(1)
    for k in (1, 3, 7):
        x, y = torch.randn(k, k, generator=gen, dtype=torch.float64), torch.randn(k, k, generator=gen, dtype=torch.float64)
        cov_s, cov_t = x @ x.T + 0.1 * torch.eye(k), y @ y.T + 0.1 * torch.eye(k)
        a = gaussian_ot_matrix(cov_s, cov_t)
        assert torch.allclose(a, a.T, atol=1e-10)  # symmetric
        assert torch.linalg.eigvalsh(a).min() > 0  # positive definite: T is monotone
        assert torch.allclose(a @ cov_s @ a, cov_t, atol=1e-8)  # pushes Σs onto Σt
    # commuting (diagonal) case: A = sqrt(σt / σs)
    a = gaussian_ot_matrix(torch.diag(torch.tensor([4.0, 1.0])), torch.diag(torch.tensor([1.0, 9.0])))
    assert torch.allclose(a, torch.diag(torch.tensor([0.5, 3.0], dtype=torch.float64)), atol=1e-10)


def test_ot_map_sends_source_mean_and_covariance_onto_the_targets_in_the_subspace():
    source, target = _gaussians()
    ot_map = fit_gaussian_ot(source, target, k=4, shrinkage=0.0)
    assert ot_map.info["explained_variance"] > 0.99
    moved = ot_map(source)
    zm, zt = ot_map.coordinates(moved).double(), ot_map.coordinates(target).double()
    assert torch.allclose(zm.mean(0), zt.mean(0), atol=1e-3)
    assert torch.allclose(torch.cov(zm.T), torch.cov(zt.T), rtol=1e-3, atol=1e-3)
    # identity on the orthogonal complement: the change lies in span(U)
    change = (moved - source).double()
    u = ot_map.basis.double()
    assert (change - change @ u @ u.T).abs().max() < 1e-3
    # sanity: the source really was elsewhere
    assert (ot_map.coordinates(source).mean(0) - zt.mean(0)).norm() > 5


def test_ot_map_is_the_identity_when_source_equals_target():
    source, _ = _gaussians(n=500)
    ot_map = fit_gaussian_ot(source, source.clone(), k=6, shrinkage=0.2)
    assert torch.allclose(ot_map.matrix, torch.eye(6), atol=1e-5)
    assert ot_map.is_translation() and ot_map.shift.abs().max() < 1e-6
    h = torch.randn(3, 5, source.shape[1]) * 10
    assert torch.allclose(ot_map(h), h, atol=1e-4)


def test_shrinkage_keeps_the_map_finite_with_fewer_samples_than_dimensions():
    source, target = _gaussians(d=64, k=4, n=6)
    ot_map = fit_gaussian_ot(source, target, k=32, shrinkage=0.1)
    assert ot_map.k == 11  # capped at n_source + n_target − 1
    assert torch.isfinite(ot_map.matrix).all() and torch.linalg.eigvalsh(ot_map.matrix.double()).min() > 0
    cov = torch.tensor([[4.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
    assert torch.allclose(shrink_covariance(cov, 1.0, eps=0.0), 3.0 * torch.eye(2, dtype=torch.float64))
    assert torch.allclose(shrink_covariance(cov, 0.0, eps=0.0), cov)
    with pytest.raises(CdeltaError):
        shrink_covariance(cov, 1.5)
    with pytest.raises(CdeltaError):
        fit_gaussian_ot(source, target[:, :10], k=2)


def test_ledoit_wolf_shrinks_more_with_fewer_samples():
    gen = torch.Generator().manual_seed(2)
    scales = torch.linspace(0.2, 3.0, 20)
    many = ledoit_wolf_shrinkage(torch.randn(5000, 20, generator=gen) * scales)
    few = ledoit_wolf_shrinkage(torch.randn(8, 20, generator=gen) * scales)
    assert 0.0 <= many < 0.05 and 0.5 < few <= 1.0
    source, target = _gaussians(d=64, k=4, n=6)
    auto = fit_gaussian_ot(source, target, k=8)
    assert 0 < auto.info["shrinkage_source"] <= 1 and torch.isfinite(auto.matrix).all()


def test_candidate_layers_cover_40_to_60_percent_depth():
    assert ot_candidate_layers(30) == [12, 13, 14, 15, 16, 17, 18]
    assert ot_candidate_layers(24) == [10, 11, 12, 13, 14]
    assert ot_candidate_layers(2) == [1]


# ------------------------------------------------------------------ OT hooks


def _fitted_map(model, tokenizer, layer: int, k: int = 3) -> GaussianOTMap:
    source = ActivationSet(PROMPTS[:3], positions=(-1, -2, "mean"))
    target = ActivationSet(PROMPTS[3:], positions=(-1, -2, "mean"))
    return fit_ot_maps(model, tokenizer, source, target, [layer], k, shrinkage=0.0)[0]


def test_ot_hooks_apply_the_map_after_their_layer_and_detach(tiny):
    model, tokenizer = tiny
    base = _logits(model, tokenizer)
    with capture_residuals(model, [0]) as store:
        model(**encode_chat(tokenizer, PROMPTS))
        before = store[0].clone()
    ot_map = _fitted_map(model, tokenizer, layer=0)
    with ot_hooks(model, [ot_map]), capture_residuals(model, [0]) as store:
        hooked = _logits(model, tokenizer)
        assert torch.allclose(store[0], ot_map(before), atol=1e-5)
    assert not torch.allclose(hooked, base, atol=1e-3)
    assert _hooks_left(model) == 0
    assert torch.equal(_logits(model, tokenizer), base)
    with pytest.raises(RuntimeError), ot_hooks(model, [ot_map]):
        raise RuntimeError("boom")
    assert _hooks_left(model) == 0


def test_second_map_is_fitted_on_activations_moved_by_the_first(tiny):
    model, tokenizer = tiny
    source = ActivationSet(PROMPTS[:3], positions=(-1, -2, -3, "mean"))
    target = ActivationSet(PROMPTS[3:], positions=(-1, -2, -3, "mean"))
    maps = fit_ot_maps(model, tokenizer, source, target, [1, 0], k=3, shrinkage=0.0)
    assert [m.layer for m in maps] == [0, 1]
    with ot_hooks(model, maps):
        moved = source.collect(model, tokenizer, [1])[0]  # after both maps
    with ot_hooks(model, maps[:1]):
        target_after_first = target.collect(model, tokenizer, [1])[0]
    # the affine map sends the sample mean of the (already moved) source onto the target's
    second = maps[1]
    assert torch.allclose(second.coordinates(moved).mean(0), second.coordinates(target_after_first).mean(0), atol=1e-3)
    assert _hooks_left(model) == 0


def test_translation_map_bakes_into_weights_exactly_and_others_refuse(tiny_model_dir):
    lm = load_model(str(tiny_model_dir))
    d = lm.model.config.hidden_size
    gen = torch.Generator().manual_seed(3)
    basis, _ = torch.linalg.qr(torch.randn(d, 4, generator=gen))
    translation = GaussianOTMap(0, basis, torch.randn(d, generator=gen), torch.randn(4, generator=gen), torch.randn(4, generator=gen), torch.eye(4))
    with ot_hooks(lm.model, [translation]):
        hooked = _logits(lm.model, lm.tokenizer)
    edited = copy.deepcopy(lm.model)
    apply_weight_edit(edited, ot_edit(lm.model, translation))
    assert torch.allclose(_logits(edited, lm.tokenizer), hooked, atol=1e-4)
    assert not torch.allclose(_logits(lm.model, lm.tokenizer), hooked, atol=1e-3)
    scaled = GaussianOTMap(0, basis, translation.center, translation.source_mean, translation.target_mean, 2 * torch.eye(4))
    with pytest.raises(CdeltaError, match="not a pure translation"):
        ot_edit(lm.model, scaled)


# ------------------------------------------------------------------ SRA maths


def test_residualize_matches_the_ridge_formula_and_its_limits():
    gen = torch.Generator().manual_seed(0)
    d, k = 20, 4
    atoms = torch.randn(k, d, generator=gen, dtype=torch.float64)
    r = torch.randn(d, generator=gen, dtype=torch.float64)
    g = (atoms / atoms.norm(dim=1, keepdim=True)).T
    for ridge in (0.05, 0.5, 3.0):
        res = residualize(r, atoms, ridge)
        beta = torch.linalg.solve(g.T @ g + ridge * torch.eye(k, dtype=torch.float64), g.T @ r)
        assert torch.allclose(res.vector, r - g @ beta, atol=1e-10)
        assert torch.allclose(res.coefficients.double(), beta, atol=1e-5)
    exact = residualize(r, atoms, 0.0)
    assert (g.T @ exact.vector).abs().max() < 1e-10  # λ → 0: orthogonal to the atom span
    assert torch.allclose(exact.filter_factors, torch.ones(k))
    tiny_ridge = residualize(r, atoms, 1e-9)
    assert (g.T @ tiny_ridge.vector).abs().max() < 1e-6
    assert torch.allclose(residualize(r, atoms, 1e12).vector, r, atol=1e-9)  # λ → ∞: unchanged
    assert torch.equal(residualize(r, atoms, math.inf).vector, r)
    # shrinking: larger λ removes less
    removed = [residualize(r, atoms, lam).removed_fraction for lam in (0.0, 0.1, 1.0, 10.0)]
    assert removed == sorted(removed, reverse=True) and removed[0] > removed[-1]
    # atom scale does not matter (atoms are normalised), nor duplicated atoms at λ = 0
    assert torch.allclose(residualize(r, 5 * atoms, 0.3).vector, residualize(r, atoms, 0.3).vector, atol=1e-10)
    duplicated = residualize(r, torch.cat([atoms, atoms[:1]]), 0.0)
    assert (g.T @ duplicated.vector).abs().max() < 1e-9
    with pytest.raises(CdeltaError):
        residualize(r, atoms, -1.0)
    with pytest.raises(CdeltaError):
        residualize(r, atoms[:, :5], 0.1)


def test_concept_atoms_are_differences_of_means(tiny):
    model, tokenizer = tiny
    concepts = {"a": PROMPTS[:2], "b": PROMPTS[2:4]}
    names, atoms = concept_atoms(model, tokenizer, 1, PROMPTS[4:], "mean", concepts)
    from cdelta.directions import collect_prompt_activations

    acts = collect_prompt_activations(model, tokenizer, PROMPTS, [1], ("mean",))["mean"][0]
    assert names == ["a", "b"] and atoms.shape == (2, model.config.hidden_size)
    assert torch.allclose(atoms[1], acts[2:4].mean(0) - acts[4:].mean(0), atol=1e-5)


# ------------------------------------------------------------ end to end (tiny)


@pytest.mark.parametrize("mode", ["ablate", "induce"])
def test_fit_ot_scores_candidates_and_round_trips(tiny_llama_dir, tmp_path, mode):
    lm = load_model(str(tiny_llama_dir))
    fitted = fit_ot(lm, _synthetic_prompts(), mode=mode, category="cybercrime", layers=[0, 1], ks=(2, 4), n_train=8, n_val=4, max_reply_tokens=6)
    assert fitted.mode == mode and len(fitted.scores) == 4 + 1  # 2 layers × 2 k, plus one two-layer candidate
    assert {tuple(s["layers"]) for s in fitted.scores[:4]} == {(0,), (1,)}
    assert fitted.info["chosen"] in fitted.scores and fitted.layers == fitted.info["chosen"]["layers"]
    key = "kl" if mode == "ablate" else "gain"
    assert all(key in s for s in fitted.scores)
    fitted.save(tmp_path / "ot.safetensors")
    loaded = OTFit.load(tmp_path / "ot.safetensors")
    with fitted.hooks(lm.model):
        expected = _logits(lm.model, lm.tokenizer)
    with loaded.hooks(lm.model):
        again = _logits(lm.model, lm.tokenizer)
    assert torch.allclose(expected, again, atol=1e-5) and loaded.layers == fitted.layers
    assert _hooks_left(lm.model) == 0


def test_fit_sra_keeps_the_raw_direction_as_a_candidate(tiny_llama_dir):
    from cdelta.directions import Direction

    lm = load_model(str(tiny_llama_dir))
    raw = Direction(torch.randn(lm.model.config.hidden_size), 1, -1, "harmful-harmless", selection="bypass", info={"seed": 0})
    clean = fit_sra(lm, _synthetic_prompts(), raw, ridges=(0.0, 1.0), n_baseline=6, n_val=4, max_reply_tokens=6)
    assert [s["ridge"] for s in clean.scores] == ["inf", 0.0, 1.0]
    assert clean.scores[0]["cosine_with_raw"] == pytest.approx(1.0)
    assert clean.method == "sra" and clean.layer == 1 and clean.info["ridge"] in ("inf", 0.0, 1.0)
    strongest = min(s["bypass"] for s in clean.scores)
    eligible = [s for s in clean.scores if s["bypass"] <= 0.9 * strongest] or clean.scores
    assert clean.info["ridge"] == min(eligible, key=lambda s: s["kl"])["ridge"]
    baseline = _synthetic_prompts().filter(split="train", kind=HARMLESS).sample(6, 0).texts()
    _, atoms = concept_atoms(lm.model, lm.tokenizer, 1, baseline, -1)
    assert (atoms @ residualize(raw.vector, atoms, 0.0).vector).abs().max() < 1e-3  # λ = 0: ⟂ every atom
    ridge = math.inf if clean.info["ridge"] == "inf" else clean.info["ridge"]
    assert torch.allclose(clean.vector, residualize(raw.vector, atoms, ridge).vector, atol=1e-5)
    assert clean.info["atoms"] == ["math", "code", "reasoning", "procedural", "formatting"]
    assert _hooks_left(lm.model) == 0


def test_compare_methods_fit_on_a_tiny_model(tiny_llama_dir, tmp_path):
    from cdelta.compare.methods import ot_ablation, sra

    lm = load_model(str(tiny_llama_dir))
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    context = MethodContext(lm, _synthetic_prompts(), "cybercrime", 0, tmp_path / "ot", log=lambda _: None, options={"ot_mode": "ablate"})
    result = ot_ablation.METHOD.fit(context)
    assert result.params_touched == 0 and result.runtime_hooks and result.model is lm.model
    with result.hooks(lm.model):
        hooked = _logits(lm.model, lm.tokenizer)
    assert not torch.allclose(hooked, _logits(lm.model, lm.tokenizer), atol=1e-4)
    assert (tmp_path / "ot" / "ot.safetensors").is_file()
    assert ot_ablation.METHOD.fit(context).info["scores"] == result.info["scores"]  # reused from the cache
    with pytest.raises(CdeltaError):
        ot_ablation.METHOD.fit(MethodContext(lm, _synthetic_prompts(), "cybercrime", 0, tmp_path / "x", options={"ot_mode": "sideways"}))

    context = MethodContext(lm, _synthetic_prompts(), "cybercrime", 0, tmp_path / "sra", log=lambda _: None)
    result = sra.METHOD.fit(context)
    assert sra.METHOD.needs_refusing_base and result.hooks is None and result.model is not lm.model
    changed = sum(int((p != before[n]).sum()) for n, p in result.model.named_parameters() if n in before)
    assert result.params_touched == changed > 0
    assert all(torch.equal(p, before[n]) for n, p in lm.model.named_parameters())  # base untouched
    assert _hooks_left(lm.model) == 0
