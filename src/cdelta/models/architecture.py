"""Component naming per decoder architecture: the one place that knows module paths.

Supported families (llama, qwen2, mistral, gemma2, gemma3 text) share the layout
``model.model.layers[i].self_attn.{q,k,v,o}_proj`` and ``.mlp.{gate,up,down}_proj``;
they differ in head counts, grouped-query attention and head_dim, which are read
from the config here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cdelta.errors import CdeltaError

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral", "gemma2", "gemma3", "gemma3_text")


@dataclass(frozen=True)
class Architecture:
    """Shapes and module paths of a decoder-only model.

    ``head_dim`` is the per-head width of q/k/v; query head ``h`` reads key/value
    head ``h // (n_heads // n_kv_heads)`` under grouped-query attention.
    """

    model_type: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_model: int
    d_mlp: int
    layers_prefix: str = "model.layers"

    @property
    def group_size(self) -> int:
        """Query heads per key/value head."""
        return self.n_heads // self.n_kv_heads

    def kv_head(self, head: int) -> int:
        """Key/value head index shared by query head ``head``."""
        return head // self.group_size

    def layer_prefix(self, layer: int) -> str:
        """Parameter-name prefix of decoder layer ``layer``."""
        return f"{self.layers_prefix}.{layer}"

    def attn_param(self, layer: int, proj: str) -> str:
        """Name of ``{q,k,v,o}_proj.weight`` in ``layer``."""
        return f"{self.layer_prefix(layer)}.self_attn.{proj}_proj.weight"

    def mlp_param(self, layer: int, proj: str) -> str:
        """Name of ``{gate,up,down}_proj.weight`` in ``layer``."""
        return f"{self.layer_prefix(layer)}.mlp.{proj}_proj.weight"

    def attn_bias_param(self, layer: int, proj: str) -> str:
        """Name of ``{q,k,v,o}_proj.bias`` in ``layer`` (exists only for some families, e.g. qwen2 q/k/v)."""
        return f"{self.layer_prefix(layer)}.self_attn.{proj}_proj.bias"

    def mlp_bias_param(self, layer: int, proj: str) -> str:
        """Name of ``{gate,up,down}_proj.bias`` in ``layer`` (absent in the supported families)."""
        return f"{self.layer_prefix(layer)}.mlp.{proj}_proj.bias"


def _text_config(config):
    """The text sub-config for multimodal wrappers (gemma3), else the config itself."""
    return getattr(config, "text_config", None) or config


def architecture_of(model: torch.nn.Module) -> Architecture:
    """Read the architecture of a loaded causal LM, or fail with a clear error."""
    config = _text_config(model.config)
    model_type = getattr(config, "model_type", "?")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CdeltaError(
            f"model type '{model_type}' is not supported for circuits and edits",
            f"use one of: {', '.join(SUPPORTED_MODEL_TYPES)}",
        )
    n_heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    layers = decoder_layers(model)
    prefix = next(name for name, module in model.named_modules() if module is layers)
    return Architecture(
        model_type=model_type,
        n_layers=config.num_hidden_layers,
        n_heads=n_heads,
        n_kv_heads=getattr(config, "num_key_value_heads", None) or n_heads,
        head_dim=head_dim,
        d_model=config.hidden_size,
        d_mlp=config.intermediate_size,
        layers_prefix=prefix,
    )


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The ``ModuleList`` of decoder layers."""
    inner = model.model
    inner = getattr(inner, "language_model", inner)
    return inner.layers


def attention(model: torch.nn.Module, layer: int) -> torch.nn.Module:
    """Self-attention module of ``layer`` (has q/k/v/o_proj)."""
    return decoder_layers(model)[layer].self_attn


def mlp(model: torch.nn.Module, layer: int) -> torch.nn.Module:
    """MLP module of ``layer`` (has gate/up/down_proj)."""
    return decoder_layers(model)[layer].mlp


def head_output_proj(model: torch.nn.Module, layer: int) -> torch.nn.Module:
    """``o_proj`` of ``layer``: its input is the concatenation of the per-head outputs.

    Input shape ``[batch, seq, n_heads * head_dim]``; head ``h`` owns the slice
    ``[h * head_dim, (h + 1) * head_dim)`` of the last dimension.
    """
    return attention(model, layer).o_proj
