"""ActAdd and directional ablation as forward hooks (their weight forms: ``cdelta.baselines.steering``).

* **ActAdd** (activation addition): add ``alpha · r`` to the residual stream after
  decoder layer ``L`` at every position (a forward hook on that layer).
* **Directional ablation** (Arditi et al. 2024): remove the component along ``r̂`` from
  every write into the residual stream (token embeddings, every attention output, every
  MLP output), so the residual stream never carries ``r̂``: ``h ← h − (h · r̂) r̂`` on
  each of those module outputs.

Gemma2/3 and OLMo2 normalise each sublayer's output before adding it to the residual stream, so
ablation by these hooks is not the same computation there and raises ``CdeltaError``
(the ActAdd hook works on every family).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from cdelta.directions.vectors import Direction, unit
from cdelta.errors import CdeltaError
from cdelta.models.architecture import POST_NORM_FAMILIES, architecture_of, attention, decoder_layers, mlp


def vector_of(direction: Direction | torch.Tensor) -> torch.Tensor:
    """The raw vector ``r`` [d_model] of a ``Direction`` or a bare tensor."""
    return direction.vector if isinstance(direction, Direction) else direction


def layer_of(direction: Direction | torch.Tensor, layer: int | None) -> int:
    """``layer`` if given, else the direction's own layer (a bare vector has none: error)."""
    if layer is not None:
        return layer
    if isinstance(direction, Direction):
        return direction.layer
    raise CdeltaError("no layer given for a bare direction vector", "pass layer=... or a Direction")


def require_pre_norm(model: torch.nn.Module, what: str) -> None:
    """Raise for families whose sublayer outputs are normalised before the residual add (``POST_NORM_FAMILIES``)."""
    model_type = architecture_of(model).model_type
    if model_type in POST_NORM_FAMILIES:
        raise CdeltaError(
            f"{what} is not implemented for {model_type}: its sublayer outputs are normalised before entering the residual stream",
            "use a llama, qwen2 or mistral model (the ActAdd hook works on every family)",
        )


def _replace_hidden(output, hidden: torch.Tensor):
    return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden


def _hidden(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


@contextmanager
def actadd_hooks(
    model: torch.nn.Module, direction: Direction | torch.Tensor, layer: int | None = None, alpha: float = 1.0
) -> Iterator[None]:
    """Add ``alpha · r`` to the residual stream after decoder layer ``layer``, at every position."""
    layer = layer_of(direction, layer)
    block = decoder_layers(model)[layer]
    shift = alpha * vector_of(direction).float()

    def hook(_module, _args, output):
        hidden = _hidden(output)
        return _replace_hidden(output, hidden + shift.to(hidden.device, hidden.dtype))

    handle = block.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def project_out(hidden: torch.Tensor, r_hat: torch.Tensor) -> torch.Tensor:
    """``hidden − (hidden · r̂) r̂`` along the last axis."""
    r = r_hat.to(hidden.device, hidden.dtype)
    return hidden - (hidden @ r).unsqueeze(-1) * r


@contextmanager
def ablation_hooks(model: torch.nn.Module, direction: Direction | torch.Tensor) -> Iterator[None]:
    """Project ``r̂`` out of the embeddings and every attention and MLP output (all layers)."""
    require_pre_norm(model, "directional ablation")
    r_hat = unit(vector_of(direction))

    def hook(_module, _args, output):
        return _replace_hidden(output, project_out(_hidden(output), r_hat))

    modules = [model.get_input_embeddings()]
    for layer in range(len(decoder_layers(model))):
        modules += [attention(model, layer), mlp(model, layer)]
    handles = []
    try:
        for module in modules:
            handles.append(module.register_forward_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()
