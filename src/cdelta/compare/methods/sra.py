"""Surgical Refusal Ablation (Cristofano 2026): directional ablation of a spectrally cleaned direction.

The shared refusal direction (``cdelta.compare.shared.refusal_direction``) is
ridge-residualised against concept atoms (``cdelta.baselines.spectral``), ``λ`` chosen on the
validation split, and ablated as a weight edit on a copy of the base (``params_touched`` =
changed entries). It removes refusal, so it needs a base that refuses; on one that does not,
the row shows how little the edit changes.

Options: ``direction_kwargs`` and ``alpha`` (the shared direction), ``sra_kwargs`` (passed to
``fit_sra``, e.g. ``{"ridges": [0.0, 0.1]}``).
"""

from __future__ import annotations

from cdelta.compare.base import Method, MethodContext, MethodResult
from cdelta.compare.shared import cached_with_status, direction_summary, edited_copy, prompts_digest, refusal_direction, reused_seconds

SRA_FILE = "sra-direction.safetensors"


def fit(context: MethodContext) -> MethodResult:
    """Clean (or reload) the direction, then orthogonalise every residual writer against it."""
    from cdelta.baselines.spectral import fit_sra
    from cdelta.baselines.steering import ablation_edit, apply_weight_edit
    from cdelta.directions import Direction

    shared = refusal_direction(context)
    kwargs = dict(context.options.get("sra_kwargs") or {})
    key = {"model_sha256": context.lm.weights_sha256, "seed": context.seed, "direction": shared.digest,
           "sra_kwargs": kwargs, "prompts": prompts_digest(context.prompts)}

    def compute(path):
        context.log("sra: residualising the refusal direction against concept atoms (ridge λ chosen on val)")
        clean = fit_sra(context.lm, context.prompts, shared.direction, seed=context.seed, **kwargs)
        clean.save(path)
        return clean

    clean, reused = cached_with_status(context.out_dir, "sra", key, SRA_FILE, compute, Direction.load, context.log, context.refit)
    context.log(f"sra: layer {clean.layer}, ridge {clean.info['ridge']}, cosine with raw {clean.info['cosine_with_raw']:.3f}")
    edit = ablation_edit(context.lm.model, clean)
    model, touched = edited_copy(context.lm.model, lambda m: apply_weight_edit(m, edit))
    info = {**direction_summary(clean), "sra_scores": clean.scores, "edit": edit.info,
            "reused_seconds": shared.reused_seconds + reused_seconds(clean.info, reused)}
    return MethodResult(model=model, params_touched=touched, info=info)


METHOD = Method(
    "sra",
    "SRA: directional ablation (weights) of the refusal direction ridge-residualised against capability/style concept atoms (removes refusal)",
    fit,
    needs_refusing_base=True,
)
