"""Refusal ablation by Gaussian optimal transport in a PCA subspace (Nanfack et al. 2026).

At one decoder layer ``L`` (the residual stream after it, see ``cdelta.directions.vectors``)
activations of a *source* set of prompts (harmful, for ablation) and a *target* set
(harmless) are fitted as Gaussians in the ``k``-dimensional PCA subspace of the pooled
activations, and every hidden state ``h`` [d_model] is sent through the closed-form
Wasserstein-2 optimal transport map between those Gaussians:

* PCA: ``U`` [d, k] = top-k right singular vectors of the pooled, centred activations
  (centre ``c`` = pooled mean); subspace coordinates ``z = Uᵀ(h − c)`` [k];
* Gaussians ``N(μ_s, Σ_s)`` and ``N(μ_t, Σ_t)`` of the source and target ``z``; each
  covariance is shrunk towards a scaled identity, ``Σ ← (1 − γ) Σ + γ (tr Σ / k) I + ε I``
  (``γ`` by Ledoit–Wolf unless given), so the square roots are stable with few samples;
* map ``T(z) = μ_t + A (z − μ_s)`` with
  ``A = Σ_s^{-1/2} (Σ_s^{1/2} Σ_t Σ_s^{1/2})^{1/2} Σ_s^{-1/2}`` (symmetric positive
  definite, so ``T`` is the gradient of a convex function: the Brenier map);
* in the full space ``h ↦ h + U (T(z) − z)``: the identity on the orthogonal complement of
  the subspace.

The map is applied by a forward hook on 1–2 layers around 40–60% depth (``ot_hooks``),
at every position, prompt and generated tokens alike. With two layers the second map is
fitted on activations that already went through the first (``fit_ot_maps``).

**No exact weight form** in general: the map acts on the residual stream, which is the
sum of every earlier write (embeddings, attention and MLP outputs) and is read, through a
non-linear RMSNorm, by every later sublayer and kept by the skip connections. A linear
change ``h ↦ M h + b`` of that sum can be pushed into the earlier writers only by also
changing what the earlier layers read, and cannot be pulled into later readers through the
norm unless ``M`` is orthogonal and ``b = 0``. The one exact case is a pure translation
(``A = I``): that is ActAdd of ``U(μ_t − μ_s)`` at layer ``L`` and ``ot_edit`` returns it as
a ``down_proj`` bias (``actadd_edit``); any other map stays a hook.

``fit_ot`` fits on the train split and chooses the layer(s) and ``k`` on the validation
split. Two modes:

* ``"ablate"`` (the paper): source = harmful prompts, target = harmless prompts, prompt
  positions; among the candidates whose first-token KL on harmless prompts is below
  ``kl_max`` and whose drop in the refusal-reply log-probability on harmful validation
  prompts is at least ``keep`` (0.8) times the largest such drop, the lowest KL;
* ``"induce"`` (the reverse map, an extension for models that should refuse one category):
  source = the model's own replies, target = project refusal replies, both teacher-forced
  after the target category's train prompts (``reply_mean`` activations; a model that
  refuses nothing has no "refusing" prompt distribution to map onto); chosen by the judged
  refusal rate on the category's validation prompts minus that on harmless validation
  prompts. The map is global (it is applied to every prompt), so it is not
  category-conditional.

See docs/methods/ot_sra.md.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cdelta.data.prompts import HARMLESS, PromptSet
from cdelta.baselines.steering import WeightEdit, actadd_edit
from cdelta.directions.vectors import (
    Position,
    _sample_harmful,
    base_refusal_rate,
    collect_prompt_activations,
    collect_reply_activations,
    first_token_kl,
    refusal_replies_for,
    reply_logprob,
    validation_samples,
)
from cdelta.errors import CdeltaError
from cdelta.models.architecture import architecture_of, decoder_layers

MODES = ("ablate", "induce")


# ------------------------------------------------------------------------- maths


def shrink_covariance(cov: torch.Tensor, shrinkage: float, eps: float = 1e-6) -> torch.Tensor:
    """``(1 − γ) Σ + γ (tr Σ / k) I + ε·(tr Σ / k) I`` for ``Σ`` [k, k] (float64).

    ``γ = shrinkage`` in [0, 1] pulls the eigenvalues towards their mean; ``ε`` (relative to
    the mean eigenvalue) keeps the smallest one positive.
    """
    if not 0.0 <= shrinkage <= 1.0:
        raise CdeltaError(f"shrinkage {shrinkage} is outside [0, 1]", "use a shrinkage between 0 and 1 (e.g. 0.1)")
    k = cov.shape[-1]
    scale = (torch.diagonal(cov).sum() / k).clamp_min(1e-12)
    eye = torch.eye(k, dtype=cov.dtype, device=cov.device)
    return (1.0 - shrinkage) * cov + (shrinkage + eps) * scale * eye


def ledoit_wolf_shrinkage(samples: torch.Tensor) -> float:
    """The Ledoit–Wolf (2004) shrinkage intensity γ for samples [n, k] (towards ``(tr S / k) I``).

    ``S`` = biased sample covariance, ``m = tr S / k``, ``δ² = ‖S − m I‖²_F``,
    ``β² = min(δ², n⁻² Σ_i ‖x_i x_iᵀ − S‖²_F)`` with centred ``x_i``; ``γ = β² / δ²``.
    """
    x = samples.double() - samples.double().mean(0)
    n, k = x.shape
    s = x.T @ x / n
    m = torch.diagonal(s).sum() / k
    delta = ((s - m * torch.eye(k, dtype=s.dtype)) ** 2).sum()
    if delta <= 1e-30:
        return 1.0
    norms = (x**2).sum(1)
    spread = (norms**2 - 2 * ((x @ s) * x).sum(1) + (s**2).sum()).sum() / n**2
    return float(torch.clamp(spread, max=delta) / delta)


def _sym_power(matrix: torch.Tensor, power: float) -> torch.Tensor:
    """``matrix ** power`` of a symmetric positive semi-definite matrix, via eigh (eigenvalues clamped ≥ 0)."""
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    values = values.clamp_min(0.0)
    if power < 0:
        values = values.clamp_min(values.max() * 1e-12)
    return (vectors * values.pow(power)) @ vectors.T


def gaussian_ot_matrix(cov_source: torch.Tensor, cov_target: torch.Tensor) -> torch.Tensor:
    """``A = Σs^{-1/2} (Σs^{1/2} Σt Σs^{1/2})^{1/2} Σs^{-1/2}`` [k, k] (float64, symmetric PSD).

    ``A Σs A = Σt``: the linear part of the W2-optimal map from ``N(·, Σs)`` to ``N(·, Σt)``.
    """
    source, target = cov_source.double(), cov_target.double()
    root = _sym_power(source, 0.5)
    inv_root = _sym_power(source, -0.5)
    middle = _sym_power(root @ target @ root, 0.5)
    a = inv_root @ middle @ inv_root
    return (a + a.T) / 2


@dataclass
class GaussianOTMap:
    """The OT map at one layer: ``h ↦ h + U (μ_t + A (Uᵀ(h − c) − μ_s) − Uᵀ(h − c))``.

    ``basis`` U [d, k] (orthonormal columns), ``center`` c [d], ``source_mean`` μ_s and
    ``target_mean`` μ_t [k] (subspace coordinates), ``matrix`` A [k, k]; all float32.
    """

    layer: int
    basis: torch.Tensor
    center: torch.Tensor
    source_mean: torch.Tensor
    target_mean: torch.Tensor
    matrix: torch.Tensor
    info: dict = field(default_factory=dict)

    @property
    def k(self) -> int:
        return self.basis.shape[1]

    def coordinates(self, hidden: torch.Tensor) -> torch.Tensor:
        """``Uᵀ(h − c)``: [..., d] -> [..., k] (float32)."""
        return (hidden.float() - self.center.to(hidden.device)) @ self.basis.to(hidden.device)

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """Apply the map to hidden states [..., d]; returns the input dtype."""
        device = hidden.device
        z = self.coordinates(hidden)
        moved = (z - self.source_mean.to(device)) @ self.matrix.to(device) + self.target_mean.to(device)
        return (hidden.float() + (moved - z) @ self.basis.to(device).T).to(hidden.dtype)

    @property
    def shift(self) -> torch.Tensor:
        """``U (μ_t − μ_s)`` [d]: the whole map when ``A = I``."""
        return self.basis @ (self.target_mean - self.source_mean)

    def is_translation(self, tol: float = 1e-4) -> bool:
        """Is ``A`` the identity (max |A − I| ≤ tol), i.e. the map a pure translation?"""
        eye = torch.eye(self.k, dtype=self.matrix.dtype)
        return bool((self.matrix - eye).abs().max() <= tol)

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """The five tensors named ``{prefix}.{field}`` (float32, contiguous) for saving."""
        names = ("basis", "center", "source_mean", "target_mean", "matrix")
        return {f"{prefix}.{name}": getattr(self, name).float().contiguous() for name in names}


def fit_gaussian_ot(
    source: torch.Tensor, target: torch.Tensor, k: int, layer: int = 0, shrinkage: float | None = None
) -> GaussianOTMap:
    """Fit the PCA-projected Gaussian OT map from ``source`` [n, d] to ``target`` [m, d] activations.

    PCA on the pooled samples (centred on their mean); ``k`` is capped at ``n + m − 1``.
    Covariances are the (1/(n−1)) sample covariances in the subspace, then shrunk
    (``shrink_covariance``) with ``shrinkage``, or with each side's Ledoit–Wolf intensity
    when None.
    """
    if source.ndim != 2 or target.ndim != 2 or source.shape[1] != target.shape[1]:
        raise CdeltaError(
            f"source {tuple(source.shape)} and target {tuple(target.shape)} must be [n, d] with the same d",
            "pass activations of one layer: [n_prompts, d_model]",
        )
    if source.shape[0] < 2 or target.shape[0] < 2:
        raise CdeltaError("each side needs at least 2 activation samples", "use more prompts")
    if k < 1:
        raise CdeltaError(f"k = {k} PCA components", "use k ≥ 1")
    src, tgt = source.double(), target.double()
    pooled = torch.cat([src, tgt])
    center = pooled.mean(0)
    k = min(k, pooled.shape[0] - 1, pooled.shape[1])
    _, singular, vh = torch.linalg.svd(pooled - center, full_matrices=False)
    basis = vh[:k].T
    zs, zt = (src - center) @ basis, (tgt - center) @ basis
    mu_s, mu_t = zs.mean(0), zt.mean(0)
    gamma_s = ledoit_wolf_shrinkage(zs) if shrinkage is None else shrinkage
    gamma_t = ledoit_wolf_shrinkage(zt) if shrinkage is None else shrinkage
    cov_s = shrink_covariance(torch.cov(zs.T).reshape(k, k), gamma_s)
    cov_t = shrink_covariance(torch.cov(zt.T).reshape(k, k), gamma_t)
    matrix = gaussian_ot_matrix(cov_s, cov_t)
    explained = float((singular[:k] ** 2).sum() / (singular**2).sum().clamp_min(1e-12))
    info = {
        "k": k,
        "shrinkage_source": gamma_s,
        "shrinkage_target": gamma_t,
        "n_source": source.shape[0],
        "n_target": target.shape[0],
        "explained_variance": explained,
    }
    return GaussianOTMap(layer, basis.float(), center.float(), mu_s.float(), mu_t.float(), matrix.float(), info)


# ------------------------------------------------------------------------- hooks


def _hidden(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _replace_hidden(output, hidden: torch.Tensor):
    return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden


@contextmanager
def ot_hooks(model: torch.nn.Module, maps: Sequence[GaussianOTMap]) -> Iterator[None]:
    """Apply each map to the residual stream after its layer, at every position; removed on exit."""
    blocks = decoder_layers(model)
    handles = []

    def make(ot_map: GaussianOTMap):
        def hook(_module, _args, output):
            return _replace_hidden(output, ot_map(_hidden(output)))

        return hook

    try:
        for ot_map in maps:
            handles.append(blocks[ot_map.layer].register_forward_hook(make(ot_map)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def ot_edit(model: torch.nn.Module, ot_map: GaussianOTMap, tol: float = 1e-4) -> WeightEdit:
    """The map as weights, only when it is a pure translation (``A = I``): ActAdd of ``U(μ_t − μ_s)``.

    Any other map has no exact weight form (module docstring) and raises ``CdeltaError``.
    """
    if not ot_map.is_translation(tol):
        deviation = float((ot_map.matrix - torch.eye(ot_map.k)).abs().max())
        raise CdeltaError(
            f"the OT map at layer {ot_map.layer} is not a pure translation (max |A − I| = {deviation:.3g}), "
            "so it has no exact weight form in a pre-norm transformer",
            "apply it at runtime with ot_hooks",
        )
    edit = actadd_edit(model, ot_map.shift, ot_map.layer, 1.0)
    edit.info.update({"method": "ot_translation", "k": ot_map.k})
    return edit


# --------------------------------------------------------------------- activations


@dataclass
class ActivationSet:
    """Prompts (and optionally teacher-forced replies) whose activations form one side of the map.

    Without replies: prompt activations at ``positions`` (each prompt contributes one sample
    per position). With replies: ``reply_mean`` activations (one sample per prompt).
    """

    prompts: list[str]
    replies: list[str] | None = None
    positions: tuple[Position, ...] = (-1,)

    def collect(self, model: torch.nn.Module, tokenizer, layers: Sequence[int], max_reply_tokens: int = 24) -> torch.Tensor:
        """Samples [len(layers), n, d_model] (float32) under whatever hooks are active (one pass)."""
        if self.replies is None:
            acts = collect_prompt_activations(model, tokenizer, self.prompts, layers, self.positions)
            return torch.cat([acts[pos] for pos in self.positions], dim=1)
        acts = collect_reply_activations(model, tokenizer, self.prompts, self.replies, layers, ("reply_mean",), max_reply_tokens)
        return acts["reply_mean"]


def fit_ot_maps(
    model: torch.nn.Module,
    tokenizer,
    source: ActivationSet,
    target: ActivationSet,
    layers: Sequence[int],
    k: int,
    shrinkage: float | None = None,
    max_reply_tokens: int = 24,
) -> list[GaussianOTMap]:
    """One map per layer (ascending); each is fitted on activations already moved by the earlier maps."""
    maps: list[GaussianOTMap] = []
    for layer in sorted(layers):
        with ot_hooks(model, maps):
            src = source.collect(model, tokenizer, [layer], max_reply_tokens)[0]
            tgt = target.collect(model, tokenizer, [layer], max_reply_tokens)[0]
        maps.append(fit_gaussian_ot(src, tgt, k, layer, shrinkage))
    return maps


# ---------------------------------------------------------------------- selection


def ot_candidate_layers(n_layers: int) -> list[int]:
    """Layers at 40–60% depth (the paper's window): ``round(0.4 n) … round(0.6 n)``."""
    return list(range(round(0.4 * n_layers), max(round(0.4 * n_layers), round(0.6 * n_layers)) + 1))


@dataclass
class OTFit:
    """Fitted maps plus how they were chosen (``scores``: one row per validation candidate)."""

    maps: list[GaussianOTMap]
    mode: str
    category: str | None = None
    scores: list[dict] = field(default_factory=list)
    info: dict = field(default_factory=dict)

    @property
    def layers(self) -> list[int]:
        return [m.layer for m in self.maps]

    def hooks(self, model: torch.nn.Module):
        """``ot_hooks(model, self.maps)``."""
        return ot_hooks(model, self.maps)

    def to_json(self) -> dict:
        return {
            "mode": self.mode,
            "category": self.category,
            "layers": self.layers,
            "k": [m.k for m in self.maps],
            "maps": [m.info for m in self.maps],
            "scores": self.scores,
            "info": self.info,
        }

    def save(self, path: Path) -> None:
        """Maps and metadata in one safetensors file."""
        from safetensors.torch import save_file

        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, torch.Tensor] = {}
        for i, ot_map in enumerate(self.maps):
            tensors.update(ot_map.tensors(f"map{i}"))
        meta = {**self.to_json(), "map_layers": self.layers}
        save_file(tensors, str(path), metadata={"ot": json.dumps(meta, default=str)})

    @classmethod
    def load(cls, path: Path) -> OTFit:
        from safetensors import safe_open

        names = ("basis", "center", "source_mean", "target_mean", "matrix")
        with safe_open(str(path), framework="pt") as handle:
            meta = json.loads(handle.metadata()["ot"])
            maps = []
            for i, (layer, info) in enumerate(zip(meta["map_layers"], meta["maps"])):
                tensors = [handle.get_tensor(f"map{i}.{name}") for name in names]
                maps.append(GaussianOTMap(layer, *tensors, info=info))
        return cls(maps=maps, mode=meta["mode"], category=meta["category"], scores=meta["scores"], info=meta["info"])


def _ot_data(lm, prompts: PromptSet, mode: str, category: str | None, seed: int, n_train: int, positions, max_reply_tokens: int):
    """(source, target) ActivationSets from the train split for ``mode``."""
    if mode == "ablate":
        n_categories = max(1, len(prompts.filter(kind="harmful").categories()))
        harmful = _sample_harmful(prompts, "train", -(-n_train // n_categories), seed)
        harmless = prompts.filter(split="train", kind=HARMLESS).sample(n_train, seed)
        return ActivationSet(harmful.texts(), positions=tuple(positions)), ActivationSet(harmless.texts(), positions=tuple(positions))
    from cdelta.edit.data import own_reply_pairs

    train = prompts.filter(split="train", kind="harmful", category=category).sample(n_train, seed)
    own = [reply for _, reply in own_reply_pairs(lm.model, lm.tokenizer, train, max_reply_tokens, progress=False)]
    return ActivationSet(train.texts(), own), ActivationSet(train.texts(), refusal_replies_for(train, seed))


def fit_ot(
    lm,
    prompts: PromptSet,
    mode: str = "auto",
    category: str | None = None,
    seed: int = 0,
    layers: Sequence[int] | None = None,
    ks: Sequence[int] = (8, 32),
    shrinkage: float | None = None,
    positions: Sequence[Position] = (-1,),
    n_train: int = 48,
    n_val: int = 16,
    max_reply_tokens: int = 24,
    keep: float = 0.8,
    kl_max: float = 1.0,
    two_layers: bool = True,
    refusing_rate: float = 0.25,
    induce_tokens: int = 16,
) -> OTFit:
    """Fit OT maps on the train split; choose layer(s) and ``k`` on the validation split.

    ``mode="auto"``: ``"ablate"`` when the base refuses at least ``refusing_rate`` of
    ``n_val`` harmful validation prompts (greedy, classifier judge), else ``"induce"``
    (needs ``category``). Candidates: one map at each layer of ``layers`` (default
    ``ot_candidate_layers``) for each ``k`` in ``ks``; then, if ``two_layers``, the best one
    plus a second map at the next layer (the previous one for the last layer), the later map
    fitted after the earlier (one more candidate; the rule below picks among all).
    ``RL(set)`` is the mean per-token log-probability of project refusal replies,
    teacher-forced:

    * ablate: ``bypass = RL(harmful | maps) − RL(harmful | base)`` and ``kl`` = first-token
      KL(base ‖ maps) on harmless prompts; among the candidates with ``kl < kl_max`` (a
      broken model also stops producing refusals), those whose ``bypass`` is at least
      ``keep`` times the strongest, and of these the lowest ``kl`` (the lowest ``kl``
      overall if no candidate is under ``kl_max``);
    * induce: ``gain`` = refusal rate on the category's validation prompts − refusal rate on
      harmless ones, both under the maps (greedy, ``induce_tokens`` tokens, classifier
      judge); the highest ``gain``, ties broken by the lower ``kl``. (The teacher-forced
      ``RL`` fell on SmolLM2 even for the map that made it refuse every harmful prompt:
      the map presumably also moves the teacher-forced refusal tokens.)
    """
    from cdelta.evaluate import next_token_logprobs

    model, tokenizer = lm.model, lm.tokenizer
    started = time.perf_counter()
    n_layers = architecture_of(model).n_layers
    layers = ot_candidate_layers(n_layers) if layers is None else list(layers)
    if any(not 0 <= layer < n_layers for layer in layers):
        raise CdeltaError(f"layers {layers} out of range for a {n_layers}-layer model", f"use layers 0..{n_layers - 1}")
    val_harmful, val_harmless = validation_samples(prompts, n_val, seed)
    base_rate = None
    if mode == "auto":
        base_rate = base_refusal_rate(lm, val_harmful.texts())
        mode = "ablate" if base_rate >= refusing_rate else "induce"
    if mode not in MODES:
        raise CdeltaError(f"unknown OT mode {mode!r}", f"use one of: auto, {', '.join(MODES)}")
    if mode == "induce":
        categories = prompts.filter(kind="harmful").categories()
        if category not in categories:
            raise CdeltaError(f"induce mode needs a harm category, got {category!r}", f"use one of: {', '.join(categories)}")
        val_target = prompts.filter(split="val", kind="harmful", category=category).sample(n_val, seed)
    else:
        val_target = val_harmful

    source, target = _ot_data(lm, prompts, mode, category, seed, n_train, positions, max_reply_tokens)
    target_texts, harmless_texts = val_target.texts(), val_harmless.texts()
    reference = next_token_logprobs(model, tokenizer, harmless_texts)
    if mode == "ablate":
        target_refusals = refusal_replies_for(val_target, seed)
        base_target = reply_logprob(model, tokenizer, target_texts, target_refusals, max_reply_tokens)

    def score(maps: list[GaussianOTMap]) -> dict:
        row: dict = {"layers": [m.layer for m in maps], "k": maps[0].k}
        with ot_hooks(model, maps):
            row["kl"] = first_token_kl(model, tokenizer, harmless_texts, reference)
            if mode == "ablate":
                row["target_rl_change"] = reply_logprob(model, tokenizer, target_texts, target_refusals, max_reply_tokens) - base_target
            else:
                row["target_refusal"] = base_refusal_rate(lm, target_texts, induce_tokens)
                row["harmless_refusal"] = base_refusal_rate(lm, harmless_texts, induce_tokens)
                row["gain"] = row["target_refusal"] - row["harmless_refusal"]
        return row

    def best(rows: list[dict]) -> dict:
        if mode == "ablate":
            sane = [r for r in rows if r["kl"] < kl_max]
            if not sane:
                return min(rows, key=lambda r: r["kl"])
            strongest = min(r["target_rl_change"] for r in sane)
            eligible = [r for r in sane if r["target_rl_change"] <= keep * strongest] or sane
            return min(eligible, key=lambda r: r["kl"])
        return max(rows, key=lambda r: (r["gain"], -r["kl"]))

    # Single-layer candidates: one activation pass per side covers every layer.
    src_acts = source.collect(model, tokenizer, layers, max_reply_tokens)
    tgt_acts = target.collect(model, tokenizer, layers, max_reply_tokens)
    fitted: dict[tuple, list[GaussianOTMap]] = {}
    scores: list[dict] = []
    for i, layer in enumerate(layers):
        for k in ks:
            maps = [fit_gaussian_ot(src_acts[i], tgt_acts[i], k, layer, shrinkage)]
            row = score(maps)
            fitted[(layer,), maps[0].k] = maps
            scores.append(row)
    chosen = best(scores)
    first = chosen["layers"][0]
    second = first + 1 if first + 1 < n_layers else first - 1
    if two_layers and second >= 0:
        pair = sorted([first, second])
        maps = fit_ot_maps(model, tokenizer, source, target, pair, chosen["k"], shrinkage, max_reply_tokens)
        row = score(maps)
        fitted[tuple(pair), chosen["k"]] = maps
        scores.append(row)
        chosen = best(scores)
    info = {
        "seed": seed,
        "shrinkage": shrinkage,
        "keep": keep,
        "kl_max": kl_max,
        "positions": list(positions) if mode == "ablate" else ["reply_mean"],
        "n_source": len(source.prompts),
        "n_target": len(target.prompts),
        "n_val_target": len(val_target),
        "n_val_harmless": len(val_harmless),
        "base_refusal_rate_val_harmful": base_rate,
        "refusing_rate": refusing_rate,
        "chosen": chosen,
        "seconds": time.perf_counter() - started,
    }
    return OTFit(maps=fitted[tuple(chosen["layers"]), chosen["k"]], mode=mode, category=category if mode == "induce" else None, scores=scores, info=info)
