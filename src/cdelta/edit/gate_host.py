"""Where the gated variant's gate lives and how its threshold is chosen.

The host is the layer of the MLP that EAP-IG ranks highest (or ``gate_layer``); its random
control hosts the gate in another scored MLP. ``threshold_chooser`` is ``fit_gate``'s
threshold rule for ``gate_threshold = "auto"``.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import TYPE_CHECKING

from cdelta.circuits.hooks import parse_node_id
from cdelta.data.prompts import HARMLESS, PromptSet
from cdelta.edit.gate import choose_threshold, decision_open_rates
from cdelta.errors import CdeltaError
from cdelta.models.loading import LoadedModel

if TYPE_CHECKING:
    from cdelta.config import RunConfig

Log = Callable[[str], None]


def scored_mlps(circuits: list) -> list[tuple[float, int]]:
    """``(|score|, layer)`` of every MLP node the circuits score (selected or not)."""
    return [(abs(score), parse_node_id(node)[0]) for c in circuits for node, score in c.scores.items() if node.endswith(".MLP")]


def gate_host_layer(circuits: list) -> int:
    """The gated variant's host: the layer of the MLP that EAP-IG ranks highest (largest
    |score| over every scored MLP node, whether or not the size budget selected it)."""
    scored = scored_mlps(circuits)
    if not scored:
        raise CdeltaError("variant gated needs MLP nodes in the localization, and it scored attention heads only",
                          "localize with MLP nodes (the default), or use variant direct")
    return max(scored)[1]


def chosen_host_layer(cfg: RunConfig, circuits: list, n_layers: int) -> int:
    """The gated variant's host: ``cfg.gate_layer`` when set (checked against the model's
    ``n_layers``), else ``gate_host_layer``."""
    if cfg.gate_layer is None:
        return gate_host_layer(circuits)
    if cfg.gate_layer >= n_layers:
        raise CdeltaError(f"gate_layer {cfg.gate_layer} is not a layer of this model (it has {n_layers}: 0 to {n_layers - 1})",
                          "set gate_layer to one of them, or leave it unset to host the gate in EAP-IG's top MLP")
    return cfg.gate_layer


def random_host_layer(circuits: list, chosen: int, seed: int) -> int:
    """The gated variant's random control: an MLP layer drawn uniformly among the scored
    ones other than the host ``chosen``."""
    return random.Random(seed).choice(sorted({layer for _, layer in scored_mlps(circuits) if layer != chosen}))


def threshold_chooser(lm: LoadedModel, cfg: RunConfig, val: PromptSet, label: str, log: Log) -> Callable:
    """``fit_gate``'s threshold rule for ``gate_threshold = "auto"``: ``choose_threshold`` on
    the opening rates at the decision position of ``val``'s prompts, the target categories
    pooled, every other category (harmless and look-alike included) a group of its own.
    Lift leaves harmless prompts out: a gate that opens on them only makes the model more
    helpful there, so it costs nothing."""
    groups: dict[str, list[str]] = {"target": []}
    for p in val:
        if cfg.direction == "lift" and p.kind == HARMLESS:
            continue
        groups.setdefault("target" if p.category in cfg.category else p.category, []).append(p.text)
    if not groups["target"]:
        raise CdeltaError(f"gate_threshold = \"auto\" needs validation-split prompts of {', '.join(cfg.category)}",
                          "add val-split prompts of the target category, or set gate_threshold to a number")

    def choose(gate) -> float:
        rates = decision_open_rates(lm.model, lm.tokenizer, gate, groups)
        tau = choose_threshold(rates, "target")
        for t, row in rates.items():
            log(f"{label}: gate τ={t:g} opens at the decision position on " + ", ".join(f"{n} {100 * r:.0f}%" for n, r in row.items())
                + (" (chosen)" if t == tau else ""))
        return tau
    return choose
