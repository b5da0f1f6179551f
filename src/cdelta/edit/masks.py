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
