"""Component naming per decoder architecture: the one place that knows module paths.

Supported families (``FAMILIES``) share the layout ``model.model.layers[i].self_attn`` (with
an ``o_proj`` whose input is the concatenated head outputs) and ``.mlp``, and a final
``model.model.norm``; multimodal wrappers (gemma3) hold the decoder under
``model.model.language_model``. They differ in head counts, grouped-query attention and
head_dim, which are read from the config here, and in the traits of ``Family``:

* llama, qwen2, mistral: plain pre-norm layers, ``{q,k,v,o}_proj`` and ``{gate,up,down}_proj``,
  norms ``input_layernorm`` (before attention) and ``post_attention_layernorm`` (before the MLP);
* qwen3: as llama plus ``q_norm``/``k_norm``, an RMSNorm over each head's ``head_dim`` applied
  after ``q_proj``/``k_proj``. A head's q rows still feed that head alone (the norm is per
  head), so head-slice edits and edges keep their meaning; only the norm's own weight, shared
  by all heads, is never edited;
* gemma2, gemma3 and olmo2: post-norm (``Family.post_norm``), each sublayer's output is
  normalised before it enters the residual stream (olmo2 has no norm *before* attention or the
  MLP at all: ``attn_norm``/``mlp_norm`` refuse). olmo2's ``q_norm``/``k_norm`` normalise the
  whole ``q_proj``/``k_proj`` output across heads, so editing one head's q rows rescales every
  head's queries a little: the rows stay the head's parameters (what it owns), but heads are not
  independent there;
* granite: llama layout with four config scalars. ``embedding_multiplier`` scales the token
  embeddings (``embedding_scale`` returns it, so ``edit.truncated`` restarts a forward pass
  exactly), ``residual_multiplier`` scales every attention and MLP output before the residual
  add (node attribution reads the real gradients so is unaffected; edge attribution, which
  sums writers, is refused), ``attention_multiplier`` replaces ``1/sqrt(head_dim)`` inside
  attention (nothing here depends on it) and ``logits_scaling`` divides the logits
  (``logit_scale``, applied wherever cdelta runs the LM head itself);
* cohere2: parallel block (``Family.parallel``): one ``input_layernorm`` feeds both attention
  and the MLP, whose outputs are added to the residual together (``mlp_norm`` is
  ``input_layernorm``; the MLP does not read the same layer's heads, so edges are refused);
  ``logit_scale`` multiplies the logits;
* phi3: fused projections (``Family.fused_qkv``/``fused_gate_up``). ``qkv_proj`` holds the q
  rows, then the k rows, then the v rows; ``gate_up_proj`` the gate rows, then the up rows.
  ``attn_param``/``mlp_param`` name the tensor that holds a projection and
  ``attn_offset``/``mlp_offset`` its first row in it, so a head's q rows are
  ``attn_offset("q") + [h·hd, (h+1)·hd)`` of ``qkv_proj.weight``; ``attn_proj``/``mlp_proj``
  return a ``RowSlice`` (a view of those rows, usable for reading weights and computing the
  projection, but not a module the forward pass runs, so it cannot be hooked: edges refused);
* qwen3_moe, mixtral, olmoe: mixture of experts (``Family.moe``). The MLP of a layer
  (``mlp(model, layer)``) is a routed block: a router ``mlp.gate.weight`` [n_experts, d_model]
  and the experts as fused 3-D parameters ``mlp.experts.gate_up_proj``
  [n_experts, 2·d_expert, d_model] and ``mlp.experts.down_proj`` [n_experts, d_model, d_expert]
  (transformers 5; on disk they are per-expert matrices, see ``stored_delta``). qwen3_moe may keep
  some layers dense (``mlp_only_layers``): ``is_moe_layer`` tells them apart.

Where an edit lives in a mixture of experts: the MLP node ``L{l}.MLP`` is the whole routed
block (its output is the sum of the chosen experts' outputs, what attribution patches) and owns
*every* parameter under ``.mlp.`` — router and all experts — so a direct or contrastive edit of
that node trains router and experts together (with edges, ``MLP.in`` is router + expert
gate/up, ``MLP.out`` the expert down projections). The gated variant needs one dense MLP whose
neurons it rewrites; a routed layer has none that every token passes through, so gating there is
refused (``require_dense_mlp``: use variant direct or contrastive, or a dense host layer).
Baselines that address single MLP neurons (NeST, SafeSeek, neuron selections, ActAdd and
ablation weight forms) refuse MoE and fused-MLP families the same way.

Adding a family: one ``FAMILIES`` entry (plus its tiny-model test); code elsewhere asks
the accessors below for modules and the family for its traits, never a ``model_type``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

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
    (gemma2/3, olmo2), so a head's or MLP's write is not its projection's output;
    ``edges``: layers whose residual stream is the plain sum of every writer and whose
    q/k/v and MLP modules can be hooked, which edge attribution needs (``no_edges`` says
    why not); ``scaled_embeddings``: the decoder multiplies ``inputs_embeds`` by
    ``sqrt(d_model)``; ``embedding_multiplier``: by ``config.embedding_multiplier``
    (granite); ``parallel``: attention and MLP read one normed input and write together
    (cohere2); ``fused_qkv``/``fused_gate_up``: q/k/v (gate/up) are row blocks of one
    matrix (phi3); ``moe``: the MLP of (some) layers is a routed mixture of experts;
    ``logit_scale``: the factor the LM head's logits are multiplied by, from the config;
    ``gguf``: llama.cpp's architecture name for the family (``general.architecture`` of a GGUF
    file; mistral and mixtral are llama.cpp's ``llama``), read by ``edit.gguf_export``.
    """

    post_norm: bool = False
    edges: bool = True
    scaled_embeddings: bool = False
    embedding_multiplier: bool = False
    parallel: bool = False
    fused_qkv: bool = False
    fused_gate_up: bool = False
    moe: bool = False
    logit_scale: Callable | None = None
    no_edges: str = ""
    gguf: str = ""


_PLAIN = Family()
_GEMMA = Family(post_norm=True, edges=False, scaled_embeddings=True,
                no_edges="its extra norms make head outputs non-additive in the residual stream")
_MOE = Family(moe=True)

FAMILIES: dict[str, Family] = {
    "llama": replace(_PLAIN, gguf="llama"),
    "qwen2": replace(_PLAIN, gguf="qwen2"),
    "mistral": replace(_PLAIN, gguf="llama"),
    "gemma2": replace(_GEMMA, gguf="gemma2"),
    "gemma3": replace(_GEMMA, gguf="gemma3"),
    "gemma3_text": replace(_GEMMA, gguf="gemma3"),
    "qwen3": replace(_PLAIN, gguf="qwen3"),
    "olmo2": Family(post_norm=True, edges=False, no_edges="its post-norms make head outputs non-additive in the residual stream",
                    gguf="olmo2"),
    "granite": Family(edges=False, embedding_multiplier=True, logit_scale=lambda c: 1.0 / c.logits_scaling,
                      no_edges="residual_multiplier scales every write into the residual stream", gguf="granite"),
    "cohere2": Family(edges=False, parallel=True, logit_scale=lambda c: c.logit_scale,
                      no_edges="its MLP reads the layer's input, not the heads' output (parallel block)", gguf="cohere2"),
    "phi3": Family(edges=False, fused_qkv=True, fused_gate_up=True,
                   no_edges="its fused qkv_proj cannot be hooked per q/k/v reader", gguf="phi3"),
    "qwen3_moe": replace(_MOE, gguf="qwen3moe"),
    "mixtral": replace(_MOE, gguf="llama"),
    "olmoe": replace(_MOE, gguf="olmoe"),
}
"""Supported ``model_type`` values (of the text config) and their traits."""

SUPPORTED_MODEL_TYPES = tuple(FAMILIES)
EDGE_MODEL_TYPES = tuple(t for t, f in FAMILIES.items() if f.edges)
"""Families edge attribution supports (plain pre-norm layers)."""
POST_NORM_FAMILIES = tuple(t for t, f in FAMILIES.items() if f.post_norm)
"""Families whose sublayer outputs are normalised before the residual stream."""
MOE_FAMILIES = tuple(t for t, f in FAMILIES.items() if f.moe)
"""Families whose MLPs are (partly) routed mixtures of experts."""


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

    def mlp_prefix(self, layer: int) -> str:
        """Parameter-name prefix of ``layer``'s MLP (dense or mixture of experts)."""
        return f"{self.layer_prefix(layer)}.mlp"

    def _attn_module(self, proj: str) -> str:
        return "qkv" if self.family.fused_qkv and proj in ("q", "k", "v") else proj

    def _mlp_module(self, proj: str) -> str:
        return "gate_up" if self.family.fused_gate_up and proj in ("gate", "up") else proj

    def attn_param(self, layer: int, proj: str) -> str:
        """Name of the weight holding ``{q,k,v,o}_proj`` in ``layer`` (phi3: ``qkv_proj`` for q/k/v,
        its rows from ``attn_offset(proj)``)."""
        return f"{self.layer_prefix(layer)}.self_attn.{self._attn_module(proj)}_proj.weight"

    def mlp_param(self, layer: int, proj: str) -> str:
        """Name of the weight holding ``{gate,up,down}_proj`` in ``layer`` (phi3: ``gate_up_proj``
        for gate/up, its rows from ``mlp_offset(proj)``). Dense MLPs only (``require_dense_mlp``)."""
        return f"{self.mlp_prefix(layer)}.{self._mlp_module(proj)}_proj.weight"

    def attn_bias_param(self, layer: int, proj: str) -> str:
        """Name of ``{q,k,v,o}_proj.bias`` in ``layer`` (exists only for some families, e.g. qwen2 q/k/v)."""
        return f"{self.layer_prefix(layer)}.self_attn.{self._attn_module(proj)}_proj.bias"

    def mlp_bias_param(self, layer: int, proj: str) -> str:
        """Name of ``{gate,up,down}_proj.bias`` in ``layer`` (absent in the supported families)."""
        return f"{self.mlp_prefix(layer)}.{self._mlp_module(proj)}_proj.bias"

    def attn_offset(self, proj: str) -> int:
        """First row of ``proj``'s block in the tensor ``attn_param`` names (0 unless fused)."""
        if not self.family.fused_qkv or proj == "o":
            return 0
        return {"q": 0, "k": self.n_heads, "v": self.n_heads + self.n_kv_heads}[proj] * self.head_dim

    def mlp_offset(self, proj: str) -> int:
        """First row of ``proj``'s block in the tensor ``mlp_param`` names (0 unless fused)."""
        return self.d_mlp if self.family.fused_gate_up and proj == "up" else 0

    def mlp_params(self, layer: int, param_names) -> list[str]:
        """Every parameter of ``layer``'s MLP among ``param_names`` (router and experts of a mixture of experts)."""
        prefix = self.mlp_prefix(layer) + "."
        return sorted(name for name in param_names if name.startswith(prefix))


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


def _family_of(model: torch.nn.Module) -> tuple[str, Family]:
    model_type = getattr(_text_config(model.config), "model_type", "?")
    return model_type, family(model_type)


def attn_norm(model: torch.nn.Module, layer: int) -> torch.nn.Module:
    """Norm of ``layer`` applied to the residual stream entering attention (q/k/v read its output)."""
    block = decoder_layers(model)[layer]
    if not hasattr(block, "input_layernorm"):
        raise CdeltaError(f"{_family_of(model)[0]} layers have no norm before attention", "use node-level localization")
    return block.input_layernorm


def mlp_norm(model: torch.nn.Module, layer: int) -> torch.nn.Module:
    """Norm of ``layer`` applied to the residual stream entering the MLP (in pre-norm families;
    the shared ``input_layernorm`` in a parallel block)."""
    model_type, fam = _family_of(model)
    block = decoder_layers(model)[layer]
    if fam.parallel:
        return block.input_layernorm
    if fam.post_norm and not hasattr(block, "input_layernorm"):
        raise CdeltaError(f"{model_type} layers have no norm before the MLP", "use node-level localization")
    return block.post_attention_layernorm


def attention(model: torch.nn.Module, layer: int) -> torch.nn.Module:
    """Self-attention module of ``layer`` (has o_proj; q/k/v_proj or a fused qkv_proj)."""
    return decoder_layers(model)[layer].self_attn


def mlp(model: torch.nn.Module, layer: int) -> torch.nn.Module:
    """MLP module of ``layer`` (gate/up/down_proj, a fused gate_up_proj, or a routed mixture of experts)."""
    return decoder_layers(model)[layer].mlp


def is_moe_layer(model: torch.nn.Module, layer: int) -> bool:
    """Whether ``layer``'s MLP is a routed mixture of experts."""
    return hasattr(mlp(model, layer), "experts")


def require_dense_mlp(model: torch.nn.Module, layer: int | None, what: str) -> None:
    """``CdeltaError`` unless ``layer``'s MLP (every layer's, for None) is one dense gated MLP
    with separate neurons: ``what`` names the feature that needs it."""
    model_type = _family_of(model)[0]
    layers = range(len(decoder_layers(model))) if layer is None else [layer]
    routed = [i for i in layers if is_moe_layer(model, i)]
    if routed:
        where = f"layer {routed[0]}" if layer is not None else "its layers"
        raise CdeltaError(f"{what} needs a dense MLP, but {where} of this {model_type} model is a mixture of experts",
                          "use variant direct or contrastive (they edit the whole routed block)"
                          + (", or a dense host layer" if layer is not None else ""))


def require_separate_mlp(model: torch.nn.Module, what: str) -> None:
    """``CdeltaError`` for families whose MLP is not separate gate/up/down matrices in every layer
    (fused gate_up_proj, mixture of experts): the neuron-level baselines need them."""
    model_type, fam = _family_of(model)
    if fam.fused_gate_up or fam.moe:
        raise CdeltaError(f"{what} is not implemented for {model_type}: its MLP is "
                          f"{'a fused gate_up_proj' if fam.fused_gate_up else 'a mixture of experts'}",
                          "use the cdelta edit (variant direct) on this model, or a llama/qwen2/qwen3 model")


class RowSlice(torch.nn.Module):
    """Rows ``[start, stop)`` of a fused ``nn.Linear`` as a projection of its own.

    ``weight``/``bias`` are views of the fused tensors (edits through them edit the model);
    calling it computes that projection. It is not part of the forward pass, so hooks on it
    never fire.
    """

    def __init__(self, linear: torch.nn.Linear, start: int, stop: int) -> None:
        super().__init__()
        self.fused, self.start, self.stop = [linear], start, stop  # a list: not registered as a submodule

    @property
    def weight(self) -> torch.Tensor:
        return self.fused[0].weight[self.start : self.stop]

    @property
    def bias(self) -> torch.Tensor | None:
        bias = self.fused[0].bias
        return None if bias is None else bias[self.start : self.stop]

    @property
    def out_features(self) -> int:
        return self.stop - self.start

    @property
    def in_features(self) -> int:
        return self.fused[0].in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.weight, self.bias)


def attn_proj(model: torch.nn.Module, layer: int, proj: str) -> torch.nn.Module:
    """``{proj}_proj`` (``proj`` in ``ATTN_PROJS``) of ``layer``'s attention.

    q/k/v: weight ``[n_heads·hd | n_kv_heads·hd, d_model]``; o: ``[d_model, n_heads·hd]``.
    In phi3 q/k/v are ``RowSlice`` views of ``qkv_proj``.
    """
    return attn_proj_of(attention(model, layer), proj)


def mlp_proj(model: torch.nn.Module, layer: int, proj: str) -> torch.nn.Module:
    """``{proj}_proj`` (``proj`` in ``MLP_PROJS``) of ``layer``'s MLP.

    gate/up: weight ``[d_mlp, d_model]``; down: ``[d_model, d_mlp]``. In phi3 gate/up are
    ``RowSlice`` views of ``gate_up_proj``. A routed layer has none (``CdeltaError``).
    """
    return mlp_proj_of(mlp(model, layer), proj)


def attn_proj_of(attn: torch.nn.Module, proj: str) -> torch.nn.Module:
    """``{proj}_proj`` of an attention module (``attention(model, layer)``)."""
    if proj not in ATTN_PROJS:
        raise ValueError(f"unknown attention projection {proj!r}")
    if proj != "o" and not hasattr(attn, f"{proj}_proj") and hasattr(attn, "qkv_proj"):
        hd = attn.head_dim
        q, kv = attn.config.num_attention_heads * hd, attn.num_key_value_heads * hd
        start = {"q": 0, "k": q, "v": q + kv}[proj]
        return RowSlice(attn.qkv_proj, start, start + (q if proj == "q" else kv))
    return getattr(attn, f"{proj}_proj")


def mlp_proj_of(block: torch.nn.Module, proj: str) -> torch.nn.Module:
    """``{proj}_proj`` of an MLP module (``mlp(model, layer)``)."""
    if proj not in MLP_PROJS:
        raise ValueError(f"unknown MLP projection {proj!r}")
    if hasattr(block, "experts"):
        raise CdeltaError("a mixture-of-experts MLP has no single gate/up/down projection", "use variant direct or contrastive")
    if proj != "down" and not hasattr(block, f"{proj}_proj") and hasattr(block, "gate_up_proj"):
        half = block.gate_up_proj.out_features // 2
        return RowSlice(block.gate_up_proj, 0, half) if proj == "gate" else RowSlice(block.gate_up_proj, half, 2 * half)
    return getattr(block, f"{proj}_proj")


def mlp_neurons(block: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The input of ``down_proj`` (the neuron activations ``act(gate(x)) · up(x)``) of a gated MLP module."""
    if hasattr(block, "gate_up_proj") and not hasattr(block, "experts"):  # phi3: gate rows, then up rows
        gate, up = block.gate_up_proj(x).chunk(2, dim=-1)
        return block.activation_fn(gate) * up
    return block.act_fn(mlp_proj_of(block, "gate")(x)) * mlp_proj_of(block, "up")(x)


def head_output_proj(model: torch.nn.Module, layer: int) -> torch.nn.Module:
    """``o_proj`` of ``layer``: its input is the concatenation of the per-head outputs.

    Input shape ``[batch, seq, n_heads * head_dim]``; head ``h`` owns the slice
    ``[h * head_dim, (h + 1) * head_dim)`` of the last dimension.
    """
    return attn_proj(model, layer, "o")


def embedding_scale(model: torch.nn.Module) -> float:
    """Factor the decoder multiplies ``inputs_embeds`` by: ``sqrt(d_model)`` where the family
    scales its embeddings (``Family.scaled_embeddings``), ``config.embedding_multiplier``
    (granite), else 1."""
    config = _text_config(model.config)
    fam = family(config.model_type)
    if fam.embedding_multiplier:
        return float(config.embedding_multiplier)
    return config.hidden_size**0.5 if fam.scaled_embeddings else 1.0


def logit_scale(model: torch.nn.Module) -> float:
    """Factor the model multiplies the LM head's output by (granite: ``1/logits_scaling``,
    cohere2: ``logit_scale``; else 1): code that runs the LM head itself applies it."""
    config = _text_config(model.config)
    fam = FAMILIES.get(getattr(config, "model_type", None))
    scale = fam.logit_scale if fam is not None else None
    return float(scale(config)) if scale is not None else 1.0


_EXPERT_LAYOUTS = (
    # (block name on disk, {in-memory projection: on-disk per-expert names (gate, up) or (down,)}, router on disk)
    ("mlp", {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}, "gate"),  # qwen3_moe, olmoe
    ("block_sparse_moe", {"gate_up_proj": ("w1", "w3"), "down_proj": ("w2",)}, "gate"),  # mixtral
)


_WRAPPER_PREFIXES = (("model.language_model.", "language_model.model."),)
"""(in memory, on disk) prefixes of a multimodal wrapper's decoder."""


def stored_delta(delta: dict[str, torch.Tensor], stored: set[str]) -> dict[str, torch.Tensor]:
    """``delta`` renamed and split as the checkpoint on disk stores its tensors.

    transformers 5 holds a mixture of experts' weights as fused 3-D parameters
    (``….mlp.experts.gate_up_proj`` [n_experts, 2·d_expert, d_model], ``….mlp.experts.down_proj``)
    but reads and writes checkpoints in their original per-expert layout
    (``….mlp.experts.{e}.{gate,up,down}_proj.weight``; mixtral ``….block_sparse_moe.experts.{e}.{w1,w3,w2}.weight``
    and ``….block_sparse_moe.gate.weight``); multimodal wrappers hold their decoder as
    ``model.language_model.…`` in memory and may store it as ``language_model.model.…`` (gemma3).
    Names already in ``stored`` pass unchanged; a name with no stored form is returned as it is (the
    caller reports it).
    """
    out: dict[str, torch.Tensor] = {}
    for name, value in delta.items():
        for memory, disk in _WRAPPER_PREFIXES:
            if name not in stored and name.startswith(memory) and disk + name[len(memory):] in stored:
                name = disk + name[len(memory):]
        if name in stored:
            out[name] = value
            continue
        head, _, leaf = name.rpartition(".")
        layer_prefix, _, block = head.rpartition(".mlp") if ".mlp" in head else ("", "", "")
        done = False
        for disk_block, projs, router in _EXPERT_LAYOUTS:
            base = f"{layer_prefix}.{disk_block}"
            if block == ".experts" and leaf in projs and f"{base}.experts.0.{projs[leaf][0]}.weight" in stored:
                parts = projs[leaf]
                for e in range(value.shape[0]):
                    for part, chunk in zip(parts, value[e].chunk(len(parts), dim=0)):
                        out[f"{base}.experts.{e}.{part}.weight"] = chunk.contiguous()
                done = True
            elif block == f".{router}" and leaf == "weight" and f"{base}.{router}.weight" in stored:
                out[f"{base}.{router}.weight"] = value
                done = True
            if done:
                break
        if not done:
            out[name] = value
    return out
