"""Directional ablation (Arditi et al. 2024) of the refusal direction as a weight edit:
every matrix writing to the residual stream is orthogonalised against ``r̂``. It removes
refusal, so it is only informative on a base model that already refuses.

Options: ``direction_kwargs`` (passed to ``fit_refusal_direction``), ``alpha`` (used when
scoring candidate directions).
"""

from __future__ import annotations

from cdelta.compare.base import Method, MethodContext, MethodResult
from cdelta.compare.shared import direction_summary, edited_copy, refusal_direction


def fit(context: MethodContext) -> MethodResult:
    """A copy of the base with ``W ← W − r̂ r̂ᵀ W`` for every residual writer (``params_touched`` = changed entries)."""
    from cdelta.baselines.steering import ablation_edit, apply_weight_edit

    shared = refusal_direction(context)
    edit = ablation_edit(context.lm.model, shared.direction)
    model, touched = edited_copy(context.lm.model, lambda m: apply_weight_edit(m, edit))
    info = {**edit.info, "config_updates": edit.config_updates, "direction": direction_summary(shared.direction),
            "reused_seconds": shared.reused_seconds}
    return MethodResult(model=model, params_touched=touched, info=info)


METHOD = Method("ablation", "directional ablation: refusal direction projected out of every residual write (removes refusal)", fit,
                needs_refusing_base=True)
