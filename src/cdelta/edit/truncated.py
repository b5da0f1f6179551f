"""Run a decoder from layer ``L`` on cached residual-stream inputs.

When every trainable parameter lives in layers ``>= L``, the residual stream entering
layer ``L`` does not depend on the training; caching it once per example saves the
forward pass through layers ``< L`` at every step, with identical outputs.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from cdelta.models.architecture import decoder, decoder_layers, embedding_scale


def lowest_layer(param_names: list[str], layers_prefix: str) -> int | None:
    """Smallest decoder-layer index among ``param_names`` (None if any lies outside the layers)."""
    indices = []
    for name in param_names:
        if not name.startswith(layers_prefix + "."):
            return None
        indices.append(int(name[len(layers_prefix) + 1 :].split(".")[0]))
    return min(indices) if indices else None


@torch.no_grad()
def residual_at(model: torch.nn.Module, layer: int, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Residual stream entering decoder layer ``layer``, shape [batch, seq, d_model]."""
    captured: list[torch.Tensor] = []

    def grab(_module, args, kwargs):
        captured.append((args[0] if args else kwargs["hidden_states"]).detach())
        raise _Stop

    handle = decoder_layers(model)[layer].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    return captured[0]


class _Stop(Exception):
    """Raised by the capture hook to skip the layers above the one we need."""


@contextmanager
def starting_at(model: torch.nn.Module, layer: int):
    """Within the block, the decoder runs only layers ``>= layer`` (on ``inputs_embeds``).

    Decoders that pick each layer's attention mask by its position in the loop
    (``config.layer_types[i]``: sliding-window and full layers mixed, e.g. cohere2) see the
    layer types shifted the same way.
    """
    holder = decoder(model)
    full = holder.layers
    config = getattr(holder, "config", None)
    types = getattr(config, "layer_types", None)
    holder.layers = torch.nn.ModuleList(list(full)[layer:])
    if types is not None:
        config.layer_types = list(types)[layer:]
    try:
        yield
    finally:
        holder.layers = full
        if types is not None:
            config.layer_types = types


def decoder_from(model: torch.nn.Module, layer: int, residual: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Final hidden states [batch, seq, d_model] running layers ``>= layer`` on ``residual``."""
    with starting_at(model, layer):
        out = model.get_decoder()(
            inputs_embeds=residual / embedding_scale(model), attention_mask=attention_mask, use_cache=False
        )
    return out.last_hidden_state
