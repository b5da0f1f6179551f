"""C-Δθ: the circuit-restricted weight edit of ``cdelta run`` (localize → edit → choose k on
val), applied to a copy of the base. Options: any ``RunConfig`` field (``steps``,
``circuit``, ``variant``, ``k``, ``judge``...)."""

from __future__ import annotations

from cdelta.compare.base import Method, MethodContext, MethodResult
from cdelta.compare.shared import cdelta_build, edited_copy


def fit(context: MethodContext) -> MethodResult:
    """Build (or resume) ΔθC in the shared C-Δθ run directory and apply k·ΔθC to a copy."""
    from cdelta.edit.delta import apply_to_model

    build = cdelta_build(context)
    built = build.built
    model, touched = edited_copy(context.lm.model, lambda m: apply_to_model(m, built.delta))
    info = {"k": built.k, "circuit_nodes": built.circuit_nodes, "circuit_params": built.params_touched,
            "run_dir": str(build.run_dir), "config": build.cfg.model_dump(), "stage_seconds": built.timings}
    return MethodResult(model=model, params_touched=touched, info=info)


METHOD = Method("cdelta", "C-Δθ: masked fine-tune of the category's refusal circuit, scaled by k chosen on val", fit)
