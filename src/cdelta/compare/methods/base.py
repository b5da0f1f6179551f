"""The unmodified base model: the reference row of every comparison."""

from __future__ import annotations

from cdelta.compare.base import Method, MethodContext, MethodResult


def fit(context: MethodContext) -> MethodResult:
    """Nothing to fit: the base model as loaded."""
    return MethodResult(model=context.lm.model, params_touched=0, info={"model": context.lm.name, "weights_sha256": context.lm.weights_sha256})


METHOD = Method("base", "the unmodified model", fit)
