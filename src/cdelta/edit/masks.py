"""Boolean parameter masks ``{param_name: bool tensor shaped like the parameter}``: the entries an edit may change."""

from __future__ import annotations

import torch


def merge_masks(*mask_sets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Element-wise OR of parameter masks (names missing from a set count as all False)."""
    merged: dict[str, torch.Tensor] = {}
    for masks in mask_sets:
        for name, mask in masks.items():
            merged[name] = merged[name] | mask if name in merged else mask.clone()
    return merged


def mask_entries(masks: dict[str, torch.Tensor]) -> int:
    """True entries of boolean parameter masks: the parameters an edit may change."""
    return int(sum(int(m.sum()) for m in masks.values()))


def changed_entries(delta: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The gated variant's masks: the entries its ΔθC changes (its rows are compiled, not masked)."""
    return {name: value != 0 for name, value in delta.items()}


def circuit_masks(circuits: list, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Element-wise OR of the circuits' boolean parameter masks on ``model``."""
    return merge_masks(*(circuit.param_masks(model) for circuit in circuits))


def all_masks(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Masks selecting every parameter (the unrestricted fine-tune control)."""
    return {name: torch.ones_like(p, dtype=torch.bool) for name, p in model.named_parameters()}
