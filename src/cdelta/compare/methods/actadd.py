"""ActAdd of the refusal direction exported as a weight edit: ``alpha · r`` baked into the
``down_proj`` bias of the direction's layer (unconditional: every prompt is steered).

Options: ``alpha`` (default 1), ``direction_kwargs`` (passed to ``fit_refusal_direction``).
"""

from __future__ import annotations

from cdelta.compare.base import Method, MethodContext, MethodResult
from cdelta.compare.shared import direction_summary, edited_copy, refusal_direction


def fit(context: MethodContext) -> MethodResult:
    """A copy of the base with the ActAdd bias applied (``params_touched`` = changed entries)."""
    from cdelta.baselines.steering import actadd_edit, apply_weight_edit

    shared = refusal_direction(context)
    edit = actadd_edit(context.lm.model, shared.direction, alpha=float(context.options.get("alpha", 1.0)))
    model, touched = edited_copy(context.lm.model, lambda m: apply_weight_edit(m, edit))
    info = {**edit.info, "config_updates": edit.config_updates, "direction": direction_summary(shared.direction),
            "reused_seconds": shared.reused_seconds}
    return MethodResult(model=model, params_touched=touched, info=info)


METHOD = Method("actadd", "ActAdd: refusal direction added after one layer for every prompt, baked into a bias", fit)
