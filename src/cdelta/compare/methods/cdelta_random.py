"""The equal-size random-circuit control of C-Δθ: the same data, training and k, on a
circuit of as many heads and MLPs drawn at random. Options: as for ``cdelta``."""

from __future__ import annotations

from cdelta.compare.base import Method, MethodContext, MethodResult
from cdelta.compare.shared import cdelta_build, edited_copy


def fit(context: MethodContext) -> MethodResult:
    """Resume the C-Δθ build, train (or reload) the random-circuit control, apply it to a copy."""
    from cdelta.edit.delta import apply_to_model
    from cdelta.pipeline import build_control

    build = cdelta_build(context)
    delta, control = build_control(build.cfg, build.run_dir, context.lm, build.built, "random", context.log)
    model, touched = edited_copy(context.lm.model, lambda m: apply_to_model(m, delta))
    info = {"k": build.built.k, "circuit_nodes": control["nodes"], "circuit_params": control["params_touched"],
            "run_dir": str(build.run_dir), "config": build.cfg.model_dump()}
    return MethodResult(model=model, params_touched=touched, info=info)


METHOD = Method("cdelta-random", "control: the C-Δθ recipe on an equal-size random circuit", fit)
