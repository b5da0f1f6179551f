"""Baselines built on residual-stream directions: refusal directions, ActAdd, directional
ablation (Arditi et al. 2024) and CAST (Lee et al. 2025). See docs/baselines.md."""

from cdelta.directions.cast import CastHooks, CastModel, cast_generate, fit_cast, grid_search_condition
from cdelta.directions.steering import (
    WeightEdit,
    ablation_edit,
    ablation_hooks,
    actadd_edit,
    actadd_hooks,
    apply_weight_edit,
    export_direction_edit,
)
from cdelta.directions.vectors import (
    Direction,
    capture_residuals,
    collect_prompt_activations,
    collect_reply_activations,
    fit_refusal_direction,
    mean_difference,
    pca_direction,
)

__all__ = [
    "CastHooks",
    "CastModel",
    "Direction",
    "WeightEdit",
    "ablation_edit",
    "ablation_hooks",
    "actadd_edit",
    "actadd_hooks",
    "apply_weight_edit",
    "capture_residuals",
    "cast_generate",
    "collect_prompt_activations",
    "collect_reply_activations",
    "export_direction_edit",
    "fit_cast",
    "fit_refusal_direction",
    "grid_search_condition",
    "mean_difference",
    "pca_direction",
]
