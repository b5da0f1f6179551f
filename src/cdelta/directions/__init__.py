"""Residual-stream directions: activations, the refusal direction (difference of means, PCA;
layer and position chosen on validation) and its ActAdd / directional-ablation hooks.

The pipeline's lift teacher ablates this direction; the baselines built on directions
(CAST, OT, SRA, probes, the weight forms of ActAdd and ablation) live in
``cdelta.baselines``. See docs/baselines.md.
"""

from cdelta.directions.hooks import ablation_hooks, actadd_hooks
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
    "Direction",
    "ablation_hooks",
    "actadd_hooks",
    "capture_residuals",
    "collect_prompt_activations",
    "collect_reply_activations",
    "fit_refusal_direction",
    "mean_difference",
    "pca_direction",
]
