"""C-Δθ as its authors' released toolkit runs it, like for like with the project's default.

The published recipe (``PaperRecipe``): the circuit is attention heads only, the top 1% of
head nodes by |EAP-IG score|; two copies are fine-tuned on those heads' q/k/v/o slices,
θ_pos on refusal replies to the target category's train prompts and θ_neg on the model's
own greedy replies to the same prompts, each with AdamW (lr 1e-5), 50 steps, gradient norm
clipped to 1 and no retain loss; the edit is θ′ = θ + k·(θ_pos − θ_neg) with k = 2, fixed
(not chosen on val).

Everything else is the project's core: the EAP-IG node scores are the shared C-Δθ build's
localization (``OUT/shared/cdelta-run/localize``, same settings as ``cdelta``, so a run of
both localizes once), a head's slices are ``Circuit.param_masks`` (q rows, its GQA group's
k/v rows, o columns), training is ``masked_finetune`` and the arithmetic ``compose``.
Settings the recipe does not name are the project's: the batch size (8), the refusal
replies (``refusal_targets``), the own-reply length (24 tokens) and AdamW without weight
decay. Options: ``paper.<field>`` for any ``PaperRecipe`` field (``paper.k=1``,
``paper.head_frac=0.05``...); ``RunConfig`` localization fields as for ``cdelta``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from cdelta.circuits.circuit import Circuit
from cdelta.compare.base import Method, MethodContext, MethodResult
from cdelta.compare.shared import cdelta_config, cdelta_run_dir
from cdelta.compare.tuning import cached_edit, method_config, scaled_result
from cdelta.edit.delta import Delta, compose
from cdelta.edit.masks import mask_entries
from cdelta.edit.train import EditData, TrainConfig, masked_finetune
from cdelta.models.loading import LoadedModel
from cdelta.stages import file_digest, fingerprint, prompts_digest


@dataclass(frozen=True)
class PaperRecipe:
    """The authors' published C-Δθ settings (``batch_size`` is not among them: the project's)."""

    head_frac: float = 0.01
    lr: float = 1e-5
    steps: int = 50
    grad_clip: float = 1.0
    k: float = 2.0
    batch_size: int = 8
    seed: int = 0

    def train_config(self) -> TrainConfig:
        """Each copy's fine-tune: AdamW at ``lr`` for ``steps`` steps, no retain loss."""
        return TrainConfig(steps=self.steps, lr=self.lr, batch_size=self.batch_size, retain_weight=0.0, seed=self.seed)


def top_heads(circuit: Circuit, frac: float) -> Circuit:
    """``circuit`` re-selected to heads only: the top ``frac`` of its head nodes by |score| (at least one)."""
    heads = [node for node in circuit.ranked("abs") if not node.endswith(".MLP")]
    chosen = heads[: max(1, round(frac * len(heads)))]
    return circuit.with_nodes(chosen, {"kind": "top_frac_heads", "value": frac, "by": "abs"})


def paper_deltas(lm: LoadedModel, masks, refusals: list, own: list, recipe: PaperRecipe) -> tuple[Delta, Delta]:
    """(θ_pos − θ, θ_neg − θ): the two masked fine-tunes, on refusals and on the model's own replies."""
    train = recipe.train_config()
    runs = []
    for name, pairs in (("θ_pos", refusals), ("θ_neg", own)):
        runs.append(masked_finetune(lm.model, lm.tokenizer, masks, EditData(pairs, []), train,
                                    description=f"cdelta-paper: {name}", grad_clip=recipe.grad_clip))
    return runs[0], runs[1]


def fit(context: MethodContext) -> MethodResult:
    """Localize (shared with ``cdelta``), keep the top heads, train θ_pos and θ_neg, add k·(θ_pos − θ_neg) to a copy."""
    from cdelta.circuits.localize import localize_targets
    from cdelta.edit.data import TARGET_REPLY_TOKENS, cached_pairs, edit_prompts, own_reply_pairs, refusal_targets

    recipe = method_config(PaperRecipe, context, "paper.")
    cfg, run_dir = cdelta_config(context), cdelta_run_dir(context)
    lm, log = context.lm, context.log
    run_dir.mkdir(parents=True, exist_ok=True)
    base_key = {"model_sha256": lm.weights_sha256, "seed": cfg.seed}
    clock = time.perf_counter()
    (scored,), _ = localize_targets(cfg, run_dir, lm, context.prompts, base_key, log)
    circuit = top_heads(scored, recipe.head_frac)
    masks = circuit.param_masks(lm.model)
    n_heads = sum(not node.endswith(".MLP") for node in scored.scores)
    log(f"cdelta-paper: {len(circuit)} of {n_heads} heads ({', '.join(circuit.nodes)}), {mask_entries(masks)} parameters")
    seconds = {"localize": time.perf_counter() - clock}

    clock = time.perf_counter()
    target = edit_prompts(context.prompts, cfg)[1]  # the target category's train prompts, plain
    refusals = refusal_targets(target, [context.category], cfg.seed)
    own = cached_pairs(run_dir, "own_target", {**base_key, "prompts": prompts_digest(target)},
                       lambda: own_reply_pairs(lm.model, lm.tokenizer, target, TARGET_REPLY_TOKENS), log)
    seconds["data"] = time.perf_counter() - clock
    key = {"model_sha256": lm.weights_sha256, "category": context.category, "recipe": vars(recipe), "nodes": circuit.nodes,
           "scores": file_digest(run_dir / "localize" / context.category / "circuit.json"), "data": fingerprint([refusals, own])}

    def build() -> tuple[Delta, dict]:
        clock = time.perf_counter()
        positive, negative = paper_deltas(lm, masks, refusals, own, recipe)
        return compose(positive, negative, 1.0), {"train_seconds": time.perf_counter() - clock}

    raw, summary = cached_edit(context, "paper-edit", key, build)
    info = {"recipe": vars(recipe), "circuit_nodes": circuit.nodes, "head_scores": {n: scored.scores[n] for n in circuit.nodes},
            "heads_total": n_heads, "circuit_params": mask_entries(masks), "n_refusals": len(refusals), "n_own": len(own),
            "run_dir": str(run_dir), "stage_seconds": {**seconds, **summary}}
    return scaled_result(context, raw, {"k": recipe.k, "rule": "paper (fixed)"}, info)


METHOD = Method("cdelta-paper", "C-Δθ with the authors' published recipe: top 1% heads, θ+2(θ_pos−θ_neg), lr 1e-5, 50 steps, no retain", fit)
