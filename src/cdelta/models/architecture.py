"""Component naming per decoder architecture: the one place that knows module paths.

Supported families (``FAMILIES``: llama, qwen2, mistral, gemma2, gemma3 text) share the
layout ``model.model.layers[i].self_attn.{q,k,v,o}_proj`` and ``.mlp.{gate,up,down}_proj``
with norms ``input_layernorm`` (before attention), ``post_attention_layernorm`` (before the
MLP) and a final ``model.model.norm``; multimodal wrappers (gemma3) hold the decoder under
``model.model.language_model``. They differ in head counts, grouped-query attention and
head_dim, which are read from the config here, and in the traits of ``Family``.

Adding a family: one ``FAMILIES`` entry (plus its tiny-model test); code elsewhere asks
the accessors below for modules and the family for its traits, never a ``model_type``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cdelta.errors import CdeltaError

ATTN_PROJS = ("q", "k", "v", "o")
"""Attention projections: ``{p}_proj`` of the attention module."""
MLP_PROJS = ("gate", "up", "down")
"""MLP projections: ``{p}_proj`` of the MLP module."""


@dataclass(frozen=True)
class Family:
    """Traits of a model family that change how its residual stream can be read or edited.

    ``post_norm``: sublayer outputs are normalised before entering the residual stream
    (gemma2/3), so a head's or MLP's write is not its projection's output;
    ``edges``: plain pre-norm layers whose residual stream is the plain sum of every
    writer, which edge attribution needs; ``scaled_embeddings``: the decoder multiplies
    ``inputs_embeds`` by ``sqrt(d_model)``.
    """

    post_norm: bool = False
    edges: bool = True
    scaled_embeddings: bool = False


_PLAIN = Family()
_GEMMA = Family(post_norm=True, edges=False, scaled_embeddings=True)

FAMILIES: dict[str, Family] = {
    "llama": _PLAIN,
    "qwen2": _PLAIN,
    "mistral": _PLAIN,
    "gemma2": _GEMMA,
    "gemma3": _GEMMA,
    "gemma3_text": _GEMMA,
}
"""Supported ``model_type`` values (of the text config) and their traits."""

SUPPORTED_MODEL_TYPES = tuple(FAMILIES)
EDGE_MODEL_TYPES = tuple(t for t, f in FAMILIES.items() if f.edges)
"""Families edge attribution supports (plain pre-norm layers)."""
POST_NORM_FAMILIES = tuple(t for t, f in FAMILIES.items() if f.post_norm)
"""Families whose sublayer outputs are normalised before the residual stream."""


def family(model_type: str) -> Family:
    """Traits of ``model_type``; raises ``CdeltaError`` for an unsupported family."""
    if model_type not in FAMILIES:
        raise CdeltaError(
            f"model type '{model_type}' is not supported for circuits and edits",
            f"use one of: {', '.join(SUPPORTED_MODEL_TYPES)}",
        )
    return FAMILIES[model_type]


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
    def family(self) -> Family:
        """Traits of this model's family."""
        return FAMILIES[self.model_type]

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
    family(model_type)
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


def decoder(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder stack (embeddings, layers, final norm) of a causal LM."""
    inner = model.model
    return getattr(inner, "language_model", inner)


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The ``ModuleList`` of decoder layers."""
    return decoder(model).layers


def final_norm(model: torch.nn.Module) -> torch.nn.Module:
    """The norm applied to the last residual stream before the LM head."""
    return decoder(model).norm


def attn_norm(model: torch.nn.Module, layer: int) -> torch.nn.Module:
    """Norm of ``layer`` applied to the residual stream entering attention (q/k/v read its output)."""
    return decoder_layers(model)[layer].input_layernorm


def mlp_norm(model: torch.nn.Module, layer: int) -> torch.nn.Module:
    """Norm of ``layer`` applied to the residual stream entering the MLP (in pre-norm families)."""
    return decoder_layers(model)[layer].post_attention_layernorm


def attention(model: torch.nn.Module, layer: int) -> torch.nn.Module:
    """Self-attention module of ``layer`` (has q/k/v/o_proj)."""
    return decoder_layers(model)[layer].self_attn


def mlp(model: torch.nn.Module, layer: int) -> torch.nn.Module:
    """MLP module of ``layer`` (has gate/up/down_proj)."""
    return decoder_layers(model)[layer].mlp


def attn_proj(model: torch.nn.Module, layer: int, proj: str) -> torch.nn.Linear:
    """``{proj}_proj`` (``proj`` in ``ATTN_PROJS``) of ``layer``'s attention.

    q/k/v: weight ``[n_heads·hd | n_kv_heads·hd, d_model]``; o: ``[d_model, n_heads·hd]``.
    """
    return attn_proj_of(attention(model, layer), proj)


def mlp_proj(model: torch.nn.Module, layer: int, proj: str) -> torch.nn.Linear:
    """``{proj}_proj`` (``proj`` in ``MLP_PROJS``) of ``layer``'s MLP.

    gate/up: weight ``[d_mlp, d_model]``; down: ``[d_model, d_mlp]``.
    """
    return mlp_proj_of(mlp(model, layer), proj)


def attn_proj_of(attn: torch.nn.Module, proj: str) -> torch.nn.Linear:
    """``{proj}_proj`` of an attention module (``attention(model, layer)``)."""
    if proj not in ATTN_PROJS:
        raise ValueError(f"unknown attention projection {proj!r}")
    return getattr(attn, f"{proj}_proj")


def mlp_proj_of(block: torch.nn.Module, proj: str) -> torch.nn.Linear:
    """``{proj}_proj`` of an MLP module (``mlp(model, layer)``)."""
    if proj not in MLP_PROJS:
        raise ValueError(f"unknown MLP projection {proj!r}")
    return getattr(block, f"{proj}_proj")


def mlp_neurons(block: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The input of ``down_proj`` (the neuron activations ``act(gate(x)) · up(x)``) of a gated MLP module."""
    return block.act_fn(block.gate_proj(x)) * block.up_proj(x)


def head_output_proj(model: torch.nn.Module, layer: int) -> torch.nn.Module:
    """``o_proj`` of ``layer``: its input is the concatenation of the per-head outputs.

    Input shape ``[batch, seq, n_heads * head_dim]``; head ``h`` owns the slice
    ``[h * head_dim, (h + 1) * head_dim)`` of the last dimension.
    """
    return attn_proj(model, layer, "o")


def embedding_scale(model: torch.nn.Module) -> float:
    """Factor the decoder multiplies ``inputs_embeds`` by: ``sqrt(d_model)`` where the family
    scales its embeddings (``Family.scaled_embeddings``), else 1."""
    config = _text_config(model.config)
    return config.hidden_size**0.5 if family(config.model_type).scaled_embeddings else 1.0
