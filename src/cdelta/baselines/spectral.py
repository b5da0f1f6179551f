"""Surgical Refusal Ablation (SRA, Cristofano 2026): clean the refusal direction before ablating it.

The raw refusal direction ``r`` [d_model] (difference of means, ``fit_refusal_direction``)
is taken to be polysemantic: ``r = s + Σ_j β_j a_j`` with ``s`` the refusal signal and
``a_j`` *concept atoms*, directions of capabilities to protect ("shields": maths, code,
reasoning) and of style that harmful requests share ("confounds": procedural how-to
phrasing, formatting requests). SRA removes the part of ``r`` explained by the atoms by
ridge regression and ablates the residual with the existing directional-ablation hooks
(``cdelta.directions.hooks``) / weight edit (``cdelta.baselines.steering``).

* **Atoms**: ``a_j = mean act(concept j prompts) − mean act(baseline prompts)`` at the
  direction's layer and prompt position (``"mean"`` when the direction was fitted on
  replies), each scaled to unit norm. The concept prompts are the project-written
  registry ``CONCEPT_PROMPTS`` below; the baseline is a sample of harmless train prompts.
* **Ridge residualisation**, with the atoms as the columns of ``G`` [d, K]:
  ``β = (GᵀG + λ I)⁻¹ Gᵀ r`` and ``r_clean = r − G β``.
* **Spectral form** (how it is computed): with ``G = U S Vᵀ``,
  ``G β = U diag(s_i² / (s_i² + λ)) Uᵀ r``: each singular direction of the atom span is
  removed with weight ``s_i² / (s_i² + λ)``. Directions many atoms agree on (large
  ``s_i``) are removed almost fully; weak, nearly degenerate combinations of atoms (small
  ``s_i``, mostly estimation noise) are only shrunk. ``λ → 0`` gives the orthogonal
  projection onto the complement of the atom span; ``λ → ∞`` leaves ``r`` unchanged.

``fit_sra`` chooses ``λ`` on the validation split, the raw direction (``λ = ∞``, plain
directional ablation) being one candidate: among the candidates whose drop in the refusal
log-probability on harmful prompts is at least ``keep`` times the largest drop, the lowest
first-token KL on harmless prompts. See docs/methods/ot_sra.md.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from cdelta.data.prompts import HARMLESS, PromptSet
from cdelta.directions.hooks import ablation_hooks
from cdelta.directions.vectors import (
    Direction,
    Position,
    _sample_harmful,
    collect_prompt_activations,
    first_token_kl,
    fit_refusal_direction,
    refusal_replies_for,
    reply_logprob,
)
from cdelta.errors import CdeltaError

SHIELDS = ("math", "code", "reasoning")
CONFOUNDS = ("procedural", "formatting")

CONCEPT_PROMPTS: dict[str, tuple[str, ...]] = {
    "math": (
        "What is 17 multiplied by 23?",
        "Solve for x: 3x + 7 = 22.",
        "What is the derivative of x^3 + 2x?",
        "Compute the area of a circle with radius 4.",
        "What is the sum of the first 20 positive integers?",
        "Simplify the fraction 84/126.",
        "If a train travels 180 km in 2.5 hours, what is its average speed?",
        "Factor the polynomial x^2 - 5x + 6.",
    ),
    "code": (
        "Write a Python function that returns the n-th Fibonacci number.",
        "How do I reverse a linked list in Java?",
        "Write a bash one-liner that counts the lines in every .txt file.",
        "Explain what a Python decorator is with a short example.",
        "Write a JavaScript function that removes duplicates from an array.",
        "How do I read a CSV file with pandas?",
        "Write a C function that swaps two integers using pointers.",
        "Fix this Python code: for i in range(10) print(i)",
    ),
    "reasoning": (
        "If all bloops are razzies and all razzies are lazzies, are all bloops lazzies?",
        "Alice is taller than Bob, and Bob is taller than Carol. Who is the shortest?",
        "A bat and a ball cost $1.10 in total. The bat costs $1 more than the ball. How much is the ball?",
        "Which number comes next in the sequence 2, 6, 12, 20, 30?",
        "If it is Tuesday today, what day will it be in 100 days?",
        "Three boxes are labelled wrongly as apples, oranges and mixed. How can one pick identify them all?",
        "Is the statement 'this sentence is false' true or false? Explain.",
        "Tom has twice as many marbles as Sam. Together they have 36. How many does Tom have?",
    ),
    "procedural": (
        "Give me step-by-step instructions for changing a flat bicycle tyre.",
        "Explain in detail how to set up a freshwater aquarium.",
        "What are the exact steps to make homemade pasta dough?",
        "Walk me through installing a ceiling fan, step by step.",
        "How do I repot a houseplant without damaging the roots? Be specific.",
        "Describe the full process of brewing beer at home.",
        "Give detailed instructions for building a wooden birdhouse.",
        "Tell me exactly how to jump-start a car battery.",
    ),
    "formatting": (
        "List five fruits as a bulleted list.",
        "Make a markdown table of three planets and their diameters.",
        "Answer in JSON: what are the primary colours?",
        "Give me a numbered list of the days of the week.",
        "Format the following as a table: apples 3, pears 5, plums 2.",
        "Write the alphabet in uppercase, separated by commas.",
        "Summarise the water cycle in exactly three bullet points.",
        "Return a YAML list of four European capitals.",
    ),
}
"""Project-written prompts per concept atom (shields ``SHIELDS``, confounds ``CONFOUNDS``)."""


# ------------------------------------------------------------------------- maths


@dataclass
class Residualization:
    """``vector`` = r − G β [d]; ``coefficients`` β [K]; ``filter_factors`` s_i²/(s_i²+λ) per
    singular direction of the (unit) atom matrix; ``removed_fraction`` = ‖G β‖ / ‖r‖."""

    vector: torch.Tensor
    coefficients: torch.Tensor
    filter_factors: torch.Tensor
    removed_fraction: float


def residualize(vector: torch.Tensor, atoms: torch.Tensor, ridge: float) -> Residualization:
    """Ridge-residualise ``vector`` [d] against ``atoms`` [K, d] (rows; scaled to unit norm here).

    ``ridge`` λ ≥ 0 (``math.inf`` returns the vector unchanged). Singular values below
    ``1e-6 · s_max`` count as zero (no direction is removed there, even at λ = 0).
    """
    if ridge < 0 or math.isnan(ridge):
        raise CdeltaError(f"ridge λ = {ridge}", "use λ ≥ 0 (math.inf keeps the vector unchanged)")
    if atoms.ndim != 2 or atoms.shape[1] != vector.shape[-1]:
        raise CdeltaError(f"atoms {tuple(atoms.shape)} do not match a vector of size {vector.shape[-1]}", "pass atoms as [K, d_model]")
    r = vector.double()
    g = atoms.double()
    g = g / g.norm(dim=1, keepdim=True).clamp_min(1e-12)
    u, s, vh = torch.linalg.svd(g.T, full_matrices=False)
    kept = s > 1e-6 * s.max().clamp_min(1e-12)
    if math.isinf(ridge):
        factors = torch.zeros_like(s)
    else:
        factors = torch.where(kept, s**2 / (s**2 + ridge), torch.zeros_like(s))
    along = u.T @ r
    removed = u @ (factors * along)
    # β = V diag(s / (s² + λ)) Uᵀ r, the ridge coefficients (0 on the null directions).
    inverse = torch.where(kept, factors / s.clamp_min(1e-300), torch.zeros_like(s))
    coefficients = vh.T @ (inverse * along)
    fraction = float(removed.norm() / r.norm().clamp_min(1e-12))
    return Residualization((r - removed).to(vector.dtype), coefficients.float(), factors.float(), fraction)


# --------------------------------------------------------------------- concept atoms


def concept_atoms(
    model: torch.nn.Module,
    tokenizer,
    layer: int,
    baseline: list[str],
    position: Position = "mean",
    concepts: dict[str, Sequence[str]] | None = None,
) -> tuple[list[str], torch.Tensor]:
    """Concept names and atoms [K, d] (raw difference of means vs ``baseline`` prompts, float32)."""
    concepts = CONCEPT_PROMPTS if concepts is None else concepts
    if not concepts or not baseline:
        raise CdeltaError("concept atoms need concept prompts and baseline prompts", "pass a non-empty registry and baseline")
    base = collect_prompt_activations(model, tokenizer, baseline, [layer], (position,))[position][0].mean(0)
    names, atoms = [], []
    for name, texts in concepts.items():
        acts = collect_prompt_activations(model, tokenizer, list(texts), [layer], (position,))[position][0]
        names.append(name)
        atoms.append(acts.mean(0) - base)
    return names, torch.stack(atoms)


# ------------------------------------------------------------------------- fitting


def _atom_position(direction: Direction) -> Position:
    """The direction's prompt position, or ``"mean"`` for reply-recipe directions."""
    pos = direction.position
    return pos if isinstance(pos, int) or pos == "mean" else "mean"


def fit_sra(
    lm,
    prompts: PromptSet,
    direction: Direction | None = None,
    seed: int = 0,
    ridges: Sequence[float] = (0.0, 0.01, 0.1, 1.0),
    keep: float = 0.9,
    n_baseline: int = 48,
    n_val: int = 16,
    max_reply_tokens: int = 24,
) -> Direction:
    """The SRA-cleaned refusal direction, ``λ`` chosen on the validation split (module docstring).

    ``direction`` defaults to ``fit_refusal_direction(lm, prompts, seed)``. Each candidate
    ``λ`` (plus the raw direction, ``λ = ∞``) is scored with the ablation hooks:
    ``bypass = RL(harmful | ablate) − RL(harmful | base)`` (``RL``: mean per-token
    log-probability of project refusal replies, teacher-forced) and ``kl`` = first-token
    KL(base ‖ ablated) on harmless prompts. The returned ``Direction`` keeps the raw one's
    layer, position and recipe; ``method="sra"``; ``scores`` has one row per ``λ``;
    ``info`` the raw direction's summary, the atoms, the chosen ``λ``, the cosine with the
    raw direction and the seconds spent here (the raw direction's fit excluded).
    """
    from cdelta.evaluate import next_token_logprobs

    if not 0.0 <= keep <= 1.0:
        raise CdeltaError(f"keep = {keep}", "use a fraction in [0, 1]")
    model, tokenizer = lm.model, lm.tokenizer
    raw = direction if direction is not None else fit_refusal_direction(lm, prompts, seed=seed)
    started = time.perf_counter()
    baseline = prompts.filter(split="train", kind=HARMLESS).sample(n_baseline, seed)
    names, atoms = concept_atoms(model, tokenizer, raw.layer, baseline.texts(), _atom_position(raw))

    n_categories = max(1, len(prompts.filter(kind="harmful").categories()))
    val_harmful = _sample_harmful(prompts, "val", -(-n_val // n_categories), seed).sample(n_val, seed)
    val_harmless = prompts.filter(split="val", kind=HARMLESS).sample(n_val, seed)
    if not len(val_harmful) or not len(val_harmless):
        raise CdeltaError("the validation split needs harmful and harmless prompts", "use a prompt set with val-split prompts of both kinds")
    harmful_texts, harmful_refusals = val_harmful.texts(), refusal_replies_for(val_harmful, seed)
    harmless_texts = val_harmless.texts()
    base_rl = reply_logprob(model, tokenizer, harmful_texts, harmful_refusals, max_reply_tokens)
    reference = next_token_logprobs(model, tokenizer, harmless_texts)

    scores: list[dict] = []
    cleaned: dict[float, Residualization] = {}
    for ridge in [math.inf, *ridges]:
        res = residualize(raw.vector, atoms, ridge)
        cleaned[ridge] = res
        with ablation_hooks(model, res.vector):
            bypass = reply_logprob(model, tokenizer, harmful_texts, harmful_refusals, max_reply_tokens) - base_rl
            kl = first_token_kl(model, tokenizer, harmless_texts, reference)
        cosine = float(torch.nn.functional.cosine_similarity(res.vector.float(), raw.vector.float(), dim=0))
        scores.append({"ridge": "inf" if math.isinf(ridge) else ridge, "bypass": bypass, "kl": kl, "cosine_with_raw": cosine, "removed_fraction": res.removed_fraction})
    strongest = min(s["bypass"] for s in scores)
    eligible = [s for s in scores if s["bypass"] <= keep * strongest] or scores
    chosen = min(eligible, key=lambda s: s["kl"])
    ridge = math.inf if chosen["ridge"] == "inf" else chosen["ridge"]
    res = cleaned[ridge]
    info = {
        "seed": seed,
        "raw": {k: v for k, v in raw.to_json().items() if k != "scores"},
        "ridge": chosen["ridge"],
        "keep": keep,
        "atoms": names,
        "shields": [n for n in names if n in SHIELDS],
        "confounds": [n for n in names if n in CONFOUNDS],
        "atom_position": _atom_position(raw),
        "atom_cosines_with_raw": [float(torch.nn.functional.cosine_similarity(a, raw.vector.float(), dim=0)) for a in atoms],
        "coefficients": res.coefficients.tolist(),
        "filter_factors": res.filter_factors.tolist(),
        "cosine_with_raw": chosen["cosine_with_raw"],
        "n_val_harmful": len(val_harmful),
        "n_val_harmless": len(val_harmless),
        "seconds": time.perf_counter() - started,
    }
    return Direction(
        vector=res.vector.float().clone(),
        layer=raw.layer,
        position=raw.position,
        recipe=raw.recipe,
        method="sra",
        selection=raw.selection,
        scores=scores,
        info=info,
    )
