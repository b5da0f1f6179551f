"""Baselines built on residual-stream directions: refusal directions, ActAdd, directional
ablation (Arditi et al. 2024), CAST (Lee et al. 2025) and linear probes with a detect-then-route
refuser. See docs/baselines.md and docs/methods/probes_tokens.md."""

from cdelta.directions.cast import CastHooks, CastModel, cast_generate, fit_cast, grid_search_condition
from cdelta.directions.probes import ProbeRouter, RoutedReplyHooks, fit_logistic, fit_probe_router
from cdelta.directions.ot import GaussianOTMap, OTFit, fit_gaussian_ot, fit_ot, ot_edit, ot_hooks
from cdelta.directions.spectral import concept_atoms, fit_sra, residualize
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
    "GaussianOTMap",
    "OTFit",
    "ProbeRouter",
    "RoutedReplyHooks",
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
    "concept_atoms",
    "export_direction_edit",
    "fit_cast",
    "fit_gaussian_ot",
    "fit_logistic",
    "fit_ot",
    "fit_probe_router",
    "fit_refusal_direction",
    "fit_sra",
    "grid_search_condition",
    "mean_difference",
    "ot_edit",
    "ot_hooks",
    "pca_direction",
    "residualize",
]
