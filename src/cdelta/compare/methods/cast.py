"""CAST (Lee et al. 2025): ActAdd of the refusal direction, only for prompts whose
activations match the target category's condition vector; runtime hooks.

Options: ``alpha`` (steering strength, default 1), ``direction_kwargs`` (passed to
``fit_refusal_direction``), ``cast_kwargs`` (passed to ``fit_cast``, e.g.
``{"lookalike": true, "centers": [false]}``).
"""

from __future__ import annotations

from cdelta.compare.base import Method, MethodContext, MethodResult
from cdelta.compare.shared import cached_with_status, direction_summary, prompts_digest, refusal_direction, reused_seconds

CAST_FILE = "cast.safetensors"


def fit(context: MethodContext) -> MethodResult:
    """Fit (or reload) the condition vector, layer and threshold on top of the shared direction."""
    from cdelta.baselines.cast import CastModel, fit_cast

    shared = refusal_direction(context)
    alpha = float(context.options.get("alpha", 1.0))
    kwargs = dict(context.options.get("cast_kwargs") or {})
    key = {"model_sha256": context.lm.weights_sha256, "seed": context.seed, "category": context.category, "alpha": alpha,
           "cast_kwargs": kwargs, "direction": shared.digest, "prompts": prompts_digest(context.prompts)}

    def compute(path):
        context.log(f"cast: fitting the {context.category} condition (train split; layer and threshold by F1 on val)")
        cast = fit_cast(context.lm, context.prompts, context.category, seed=context.seed, behavior=shared.direction, alpha=alpha, **kwargs)
        cast.save(path)
        return cast

    cast, reused = cached_with_status(context.out_dir, "cast", key, CAST_FILE, compute, CastModel.load, context.log, context.refit)
    info = {**{k: v for k, v in cast.to_json().items() if k != "grid"}, "val_grid_top": cast.grid[:5],
            "direction": direction_summary(shared.direction),
            "reused_seconds": shared.reused_seconds + reused_seconds(cast.info, reused)}
    return MethodResult(model=context.lm.model, params_touched=0, hooks=cast.attach, info=info)


METHOD = Method("cast", "CAST: refusal direction added only when the prompt matches the category's condition vector (runtime hooks)", fit)
