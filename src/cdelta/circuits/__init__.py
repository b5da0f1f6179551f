"""Localization: find the sparse circuit (attention heads + MLP blocks) carrying a refusal.

Public entry points:

* ``localize`` — the pipeline behind ``cdelta localize``;
* ``attribute`` — node scores by EAP, EAP-IG (default), EAP-IG variants or exact patching;
* ``Circuit`` — scores, selection, parameter slices/masks, JSON save/load;
* ``faithfulness_curve`` — recovered metric vs size against random and shuffled controls;
* ``get_metric`` — refusal metrics (``logodds`` default, ``teacher-forced``);
  ``fit_category_metric`` — the fitted ``category`` metric for bases that do not refuse.
"""

from cdelta.circuits.attribution import METHODS, AttributionResult, attribute
from cdelta.circuits.circuit import Circuit, parse_selection
from cdelta.circuits.faithfulness import DEFAULT_FRACTIONS, evaluate_circuits, faithfulness_curve
from cdelta.circuits.hooks import node_ids, parse_node_id
from cdelta.circuits.localize import LocalizeResult, localize, make_pairs
from cdelta.circuits.metric import (
    METRICS,
    CategoryMetric,
    LogOddsMetric,
    Metric,
    TeacherForcedMetric,
    fit_category_metric,
    get_metric,
)

__all__ = [
    "METHODS",
    "METRICS",
    "DEFAULT_FRACTIONS",
    "AttributionResult",
    "CategoryMetric",
    "Circuit",
    "LocalizeResult",
    "LogOddsMetric",
    "Metric",
    "TeacherForcedMetric",
    "attribute",
    "evaluate_circuits",
    "faithfulness_curve",
    "fit_category_metric",
    "get_metric",
    "localize",
    "make_pairs",
    "node_ids",
    "parse_node_id",
    "parse_selection",
]
