"""MLP neurons: their ids and the parameter entries they own.

Neuron ``j`` of layer ``l`` (id ``"L{l}.N{j}"``) is one channel of the MLP's hidden
layer: the input of ``down_proj`` at index ``j``. It owns row ``j`` of ``gate_proj`` and
``up_proj`` (and of their biases, if any) and column ``j`` of ``down_proj``; a
``down_proj`` bias belongs to no neuron. A selection of neurons is a bool tensor
``[n_layers, d_mlp]``.
"""

from __future__ import annotations

import torch

from cdelta.errors import CdeltaError
from cdelta.models.architecture import Architecture, require_separate_mlp


def neuron_ids(selected: torch.Tensor) -> list[str]:
    """``["L{l}.N{j}", ...]`` of a bool selection ``[n_layers, d_mlp]``, layer-major."""
    return [f"L{layer}.N{index}" for layer, index in selected.nonzero().tolist()]


def parse_neuron_ids(ids: list[str], arch: Architecture) -> torch.Tensor:
    """Bool selection ``[n_layers, d_mlp]`` from ids like ``"L3.N17"``."""
    selected = torch.zeros(arch.n_layers, arch.d_mlp, dtype=torch.bool)
    for node in ids:
        layer_part, _, neuron_part = node.partition(".")
        try:
            layer, index = int(layer_part.removeprefix("L")), int(neuron_part.removeprefix("N"))
        except ValueError:
            raise CdeltaError(f"bad neuron id {node!r}", "use ids like L3.N17") from None
        if not (layer_part.startswith("L") and neuron_part.startswith("N") and 0 <= layer < arch.n_layers and 0 <= index < arch.d_mlp):
            raise CdeltaError(f"neuron {node!r} does not exist in this model ({arch.n_layers} layers x {arch.d_mlp} neurons)", "use a selection made for this model")
        selected[layer, index] = True
    return selected


def neuron_param_masks(model: torch.nn.Module, arch: Architecture, selected: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{param_name: bool mask}`` of the entries owned by the ``selected`` neurons (see module docstring).

    Only layers with at least one selected neuron appear.
    """
    require_separate_mlp(model, "a neuron selection")
    if tuple(selected.shape) != (arch.n_layers, arch.d_mlp):
        raise CdeltaError(f"neuron selection has shape {tuple(selected.shape)}, the model needs ({arch.n_layers}, {arch.d_mlp})", "use a selection made for this model")
    params = dict(model.named_parameters())
    masks: dict[str, torch.Tensor] = {}
    for layer in selected.any(1).nonzero().flatten().tolist():
        rows = selected[layer]
        for proj in ("gate", "up"):
            for name in (arch.mlp_param(layer, proj), arch.mlp_bias_param(layer, proj)):
                if name in params:
                    mask = torch.zeros(params[name].shape, dtype=torch.bool)
                    mask[rows] = True
                    masks[name] = mask
        down = arch.mlp_param(layer, "down")
        mask = torch.zeros(params[down].shape, dtype=torch.bool)
        mask[:, rows] = True
        masks[down] = mask
    return masks

